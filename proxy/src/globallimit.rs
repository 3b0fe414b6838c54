//! Rate limits shared by every replica: one token bucket per route (or per key) kept
//! in Redis, handed out to each proxy in small leases so that no request waits on
//! Redis.
//!
//! Why leases: Envoy's global rate limit asks its rate-limit service on every
//! request, which puts a network round trip on the request path and makes every
//! request fail open or closed with that service. Here a proxy claims a few tokens
//! at a time from the shared bucket (one atomic Lua script, clocked by Redis's own
//! `TIME`, so the replicas' clocks do not matter) and spends them locally; the
//! background [`sync`] task claims the next lease when this one is half spent.
//! Requests admitted without a lease (below) are charged to the shared bucket at
//! the next claim, so together the replicas admit what the shared bucket allows,
//! give or take what they admit before they hear that it ran dry.
//!
//! A request that finds no leased token:
//! - Redis is unreachable: the replica's own bucket (`whenUnreachable`, by default
//!   the shared rate and burst) decides. An outage of Redis neither blocks traffic
//!   nor lifts the limit; at worst each replica admits its own bucket's rate.
//! - the shared bucket was dry at the last claim and has not refilled since: 429,
//!   with the shared bucket's own wait as `Retry-After`. A dry share re-asks Redis
//!   at least every [`PROBE_EVERY`] (another replica may have given tokens back).
//! - otherwise the demand outran the lease and the next one is on its way (or this
//!   replica has not claimed yet): up to one lease's worth is admitted on credit,
//!   then the own bucket decides; both are charged to the shared bucket at the
//!   claim, and the next lease is asked twice as large.
//!
//! A round trip whose outcome is unknown (a timeout, a dropped connection) is never
//! replayed: its claims are asked again, tokens it gave back and charges it carried
//! are dropped, so nothing is counted twice (an unpaid charge is at most one lease
//! plus the own bucket's burst per share and failed round).
//!
//! Bounds: each limiter tracks at most `maxKeys` keys (later keys share one overflow
//! bucket, as in [`crate::ratelimit`]); a lease is at most half the burst; one round
//! trip carries at most [`MAX_OPS_PER_ROUND`] scripts; keyed shares wanting a lease
//! wait in a queue (at most one entry per share), so a round does not scan every
//! key; a lease unused for [`IDLE_RETURN`] goes back to the shared bucket, and a key
//! idle for [`IDLE_FORGET`] is forgotten (both found by a scan once a second).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::DefaultClock;
use sluice_policy::{GlobalRateLimit, Key};
use tokio::sync::Notify;

use crate::ratelimit::{Decision, RouteLimiter};

/// A lease not drawn from for this long goes back to the shared bucket, so an idle
/// replica does not sit on tokens others could use.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
/// A key idle this long (and holding nothing) is forgotten, freeing room under
/// `maxKeys`.
pub const IDLE_FORGET: Duration = Duration::from_secs(5);
/// A share that found the shared bucket dry asks again at least this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Scripts per pipelined round trip; the rest wait for the next round.
pub const MAX_OPS_PER_ROUND: usize = 1024;

/// The token bucket, atomically, in Redis. Keys: the bucket. Arguments: rate
/// (tokens/s), burst, want (tokens to lease; negative gives tokens back), charge
/// (tokens spent without a lease, taken first; the bucket may go down to -burst, a
/// debt paid by waiting). Returns {granted, wait in µs until one token, whole tokens
/// left}. The state expires once the bucket would be full again anyway (an absent
/// bucket is a full one). Numbers are stored with explicit formats: Lua's own
/// `tostring` keeps 14 digits, which would round a microsecond clock.
pub const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local charge = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate / 1000000)
end
tokens = math.max(-burst, tokens - charge)
local granted = 0
if want > 0 then
  granted = math.max(0, math.min(want, math.floor(tokens)))
  tokens = tokens - granted
else
  tokens = math.min(burst, tokens - want)
end
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
local ttl = math.min(math.ceil((burst - tokens) * 1000 / rate) + 1000, 1e12)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl))
return {granted, wait, math.max(0, math.floor(tokens))}
";

/// What every global limiter of a proxy shares: whether Redis answers, and the
/// signal that wakes the sync task.
pub struct GlobalLimits {
    /// `--redis` was given; without it every global limit runs on its local bucket.
    configured: bool,
    reachable: AtomicBool,
    wake: Notify,
    /// The time base of the limiters' millisecond stamps.
    epoch: Instant,
}

impl GlobalLimits {
    pub fn new(configured: bool) -> Arc<Self> {
        Arc::new(GlobalLimits {
            configured,
            reachable: AtomicBool::new(false),
            wake: Notify::new(),
            epoch: Instant::now(),
        })
    }

    pub fn configured(&self) -> bool {
        self.configured
    }

    /// Whether the last exchange with Redis succeeded.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    pub fn set_reachable(&self, up: bool) {
        self.reachable.store(up, Ordering::Relaxed);
    }

    /// Wakes the sync task (a stored permit if it is busy: the next round follows).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Milliseconds since this proxy's epoch; 0 before it.
    pub fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

/// This replica's part of one shared bucket.
pub struct Share {
    /// The bucket's Redis key.
    redis_key: String,
    /// Tokens leased and not spent yet (never negative).
    leased: AtomicI64,
    /// Requests admitted without a lease while Redis was reachable (on credit, or by
    /// the own bucket): charged at the next claim.
    unleased: AtomicU32,
    /// The lease ran out before the next one arrived: the next is asked larger.
    ran_out: AtomicBool,
    /// Requests since the last claim (the next lease's size).
    spent: AtomicU32,
    /// The lease size asked last (a claim is wanted below half of it).
    lease: AtomicU32,
    /// 0 while the shared bucket had tokens to spare at the last claim; else the
    /// stamp (ms) at which it holds a token again.
    dry_until: AtomicU64,
    /// While dry, the stamp from which a request asks Redis again.
    probe_at: AtomicU64,
    /// Whole tokens the shared bucket held at the last claim.
    shared_left: AtomicU32,
    wanted: AtomicBool,
    last_used: AtomicU64,
}

impl Share {
    fn new(redis_key: String) -> Self {
        Share {
            redis_key,
            leased: AtomicI64::new(0),
            unleased: AtomicU32::new(0),
            ran_out: AtomicBool::new(false),
            spent: AtomicU32::new(0),
            lease: AtomicU32::new(1),
            dry_until: AtomicU64::new(0),
            probe_at: AtomicU64::new(0),
            shared_left: AtomicU32::new(0),
            wanted: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
        }
    }

    /// Takes one leased token; never lets `leased` go below zero (a sync round may
    /// be taking the lease back at the same moment).
    fn take(&self) -> Option<i64> {
        let mut left = self.leased.load(Ordering::Acquire);
        while left > 0 {
            match self.leased.compare_exchange_weak(
                left,
                left - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(left - 1),
                Err(actual) => left = actual,
            }
        }
        None
    }

    /// Takes one unit of credit (owed at the next claim), if fewer than `credit`
    /// are owed.
    fn borrow(&self, credit: u32) -> bool {
        self.unleased
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                (owed < credit).then_some(owed + 1)
            })
            .is_ok()
    }

    pub fn leased(&self) -> i64 {
        self.leased.load(Ordering::Relaxed)
    }
}

enum Shares {
    Single(Arc<Share>),
    PerKey {
        keys: DashMap<String, Arc<Share>>,
        /// Slots taken in `keys`, reserved before inserting so the cap holds.
        len: AtomicUsize,
        max_keys: usize,
        overflow: Arc<Share>,
        /// Shares that want a claim, each at most once (its `wanted` flag).
        queue: Mutex<VecDeque<Arc<Share>>>,
    },
}

/// One route's global limit. Carried over a reload while its rule is unchanged; a
/// changed rule keeps the shares (leases, debts) while the bucket's name and keying
/// are the same.
pub struct GlobalLimiter {
    rule: GlobalRateLimit,
    hub: Arc<GlobalLimits>,
    /// `sluice:rl:[<namespace>/]<policy>:<route>`; keyed buckets append
    /// `:<hash of the key>`.
    prefix: String,
    shares: Arc<Shares>,
    /// This replica's own bucket (`whenUnreachable`).
    local: Arc<RouteLimiter>,
    /// Requests the local bucket decided since the last report (a counter metric).
    local_decisions: AtomicU64,
}

/// One script call of a sync round.
pub struct Op {
    share: Arc<Share>,
    /// Its limiter's shares: a failed claim re-queues a keyed share there.
    shares: Arc<Shares>,
    pub redis_key: String,
    /// Tokens asked (> 0) or given back (< 0).
    pub want: i64,
    pub charge: u32,
    pub rate: f64,
    pub burst: u32,
}

/// How a script call ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// (granted, wait in µs until one token, whole tokens left).
    Done(i64, i64, i64),
    /// Redis refused the script: nothing happened, everything is kept for later.
    Refused,
    /// The round trip failed midway (timeout, connection lost): whatever it gave
    /// back or paid is dropped rather than risk counting it twice; claims are asked
    /// again.
    Unknown,
}

impl GlobalLimiter {
    pub fn new(
        rule: &GlobalRateLimit,
        namespace: Option<&str>,
        policy: &str,
        route: &str,
        hub: Arc<GlobalLimits>,
        previous: Option<&GlobalLimiter>,
    ) -> Self {
        let prefix = Self::prefix_for(namespace, policy, route);
        let shares = match previous {
            Some(p) if p.prefix == prefix && p.rule.shared.key == rule.shared.key => {
                Arc::clone(&p.shares)
            }
            _ => Arc::new(match &rule.shared.key {
                None => Shares::Single(Arc::new(Share::new(prefix.clone()))),
                Some(keyed) => Shares::PerKey {
                    keys: DashMap::new(),
                    len: AtomicUsize::new(0),
                    max_keys: keyed.max_keys as usize,
                    overflow: Arc::new(Share::new(format!("{prefix}:overflow"))),
                    queue: Mutex::new(VecDeque::new()),
                },
            }),
        };
        let local = match previous {
            Some(p) if p.rule.when_unreachable == rule.when_unreachable => Arc::clone(&p.local),
            _ => Arc::new(RouteLimiter::new(
                &rule.when_unreachable,
                DefaultClock::default(),
            )),
        };
        GlobalLimiter {
            rule: rule.clone(),
            local,
            hub,
            prefix,
            shares,
            local_decisions: AtomicU64::new(0),
        }
    }

    /// The Redis key (or key prefix) of a route's bucket: `sluice:rl:[<namespace>/]
    /// <policy>:<route>`.
    pub fn prefix_for(namespace: Option<&str>, policy: &str, route: &str) -> String {
        match namespace {
            Some(ns) => format!("sluice:rl:{ns}/{policy}:{route}"),
            None => format!("sluice:rl:{policy}:{route}"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn rule(&self) -> &GlobalRateLimit {
        &self.rule
    }

    pub fn key(&self) -> Option<&Key> {
        self.rule.shared.key.as_ref().map(|k| &k.key)
    }

    /// The shared bucket's size, as advertised in `RateLimit-Limit`.
    pub fn limit(&self) -> u32 {
        self.rule.shared.burst
    }

    /// Takes one token for `key` (ignored when the limit is not keyed) at `now`.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        if !self.hub.configured() {
            // No Redis to share with (no --redis): the own bucket is the limit, and
            // nothing is tracked for claims that will never be made.
            self.local_decisions.fetch_add(1, Ordering::Relaxed);
            return self.local.check(key);
        }
        let stamp = self.hub.millis(now);
        let keyed = match &*self.shares {
            Shares::Single(_) => None,
            Shares::PerKey { .. } => Some(self.share_for(key)),
        };
        let share: &Arc<Share> = match (&*self.shares, &keyed) {
            (_, Some(share)) | (Shares::Single(share), None) => share,
            (Shares::PerKey { overflow, .. }, None) => overflow,
        };
        share.last_used.store(stamp, Ordering::Relaxed);
        share.spent.fetch_add(1, Ordering::Relaxed);
        if let Some(left) = share.take() {
            let lease = i64::from(share.lease.load(Ordering::Relaxed));
            if left * 2 < lease {
                self.want(share);
            }
            let remaining = u32::try_from(left)
                .unwrap_or(u32::MAX)
                .saturating_add(share.shared_left.load(Ordering::Relaxed))
                .min(self.rule.shared.burst);
            return Decision::Allowed {
                remaining,
                reset: self.refill(self.rule.shared.burst - remaining),
            };
        }
        if !self.hub.reachable() {
            self.local_decisions.fetch_add(1, Ordering::Relaxed);
            return self.local.check(key);
        }
        let dry_until = share.dry_until.load(Ordering::Acquire);
        if stamp < dry_until {
            if stamp >= share.probe_at.load(Ordering::Acquire) {
                self.want(share);
            }
            return Decision::Limited {
                retry_after: Duration::from_millis(dry_until - stamp),
            };
        }
        // The demand outran the lease (or none was claimed yet) and the next is on
        // its way: admit on credit, up to one lease's worth per claim...
        self.want(share);
        share.ran_out.store(true, Ordering::Relaxed);
        if share.borrow(share.lease.load(Ordering::Relaxed).max(1)) {
            let remaining = share
                .shared_left
                .load(Ordering::Relaxed)
                .min(self.rule.shared.burst);
            return Decision::Allowed {
                remaining,
                reset: self.refill(self.rule.shared.burst - remaining),
            };
        }
        // ...then by the own bucket; either way it is charged at the claim.
        self.local_decisions.fetch_add(1, Ordering::Relaxed);
        let decision = self.local.check(key);
        if matches!(decision, Decision::Allowed { .. }) {
            share.unleased.fetch_add(1, Ordering::Relaxed);
        }
        decision
    }

    /// Asks the sync task for a claim for `share` (once until it is made).
    fn want(&self, share: &Arc<Share>) {
        if rearm(&self.shares, share) {
            self.hub.wake();
        }
    }

    /// How long the shared bucket takes to refill `tokens`.
    fn refill(&self, tokens: u32) -> Duration {
        Duration::from_secs_f64(f64::from(tokens) / self.rule.shared.requests_per_second)
    }

    /// The share of `key`: its own while there is room under `maxKeys`, else the
    /// overflow share.
    fn share_for(&self, key: &str) -> Arc<Share> {
        let Shares::PerKey {
            keys,
            len,
            max_keys,
            overflow,
            ..
        } = &*self.shares
        else {
            unreachable!("share_for is only called on keyed limiters")
        };
        if let Some(share) = keys.get(key) {
            return Arc::clone(&share);
        }
        // Reserve a slot first, so concurrent new keys never push the map past the cap.
        let reserved = len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < *max_keys).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return Arc::clone(overflow);
        }
        let redis_key = format!("{}:{:016x}", self.prefix, fnv64(key.as_bytes()));
        let mut inserted = false;
        let share = keys
            .entry(key.to_owned())
            .or_insert_with(|| {
                inserted = true;
                Arc::new(Share::new(redis_key))
            })
            .clone();
        if !inserted {
            // Another request inserted it first: give the reserved slot back.
            len.fetch_sub(1, Ordering::AcqRel);
        }
        share
    }

    /// Tokens this replica holds in leases right now, over all its shares.
    pub fn leased(&self) -> i64 {
        match &*self.shares {
            Shares::Single(share) => share.leased(),
            Shares::PerKey { keys, overflow, .. } => {
                overflow.leased() + keys.iter().map(|e| e.value().leased()).sum::<i64>()
            }
        }
    }

    /// Keys with a share of their own right now.
    pub fn tracked_keys(&self) -> usize {
        match &*self.shares {
            Shares::Single(_) => 0,
            Shares::PerKey { len, .. } => len.load(Ordering::Relaxed),
        }
    }

    /// Requests decided by the local bucket since the last call.
    pub fn take_local_decisions(&self) -> u64 {
        self.local_decisions.swap(0, Ordering::Relaxed)
    }

    /// The local bucket's housekeeping (its own keys).
    pub fn sweep_local(&self) {
        self.local.sweep();
    }

    /// A sync round's script calls for this limiter at `now` (until `ops` holds
    /// `room`): the claims wanted, and with `scan` (once a second) idle leases given
    /// back and idle keys forgotten.
    pub fn collect(&self, now: Instant, room: usize, scan: bool, ops: &mut Vec<Op>) {
        let stamp = self.hub.millis(now);
        match &*self.shares {
            Shares::Single(share) => {
                if scan {
                    self.give_back(share, stamp, room, ops);
                }
                self.claim(share, room, ops);
            }
            Shares::PerKey {
                keys,
                len,
                overflow,
                queue,
                ..
            } => {
                if scan {
                    let forget = IDLE_FORGET.as_millis() as u64;
                    self.give_back(overflow, stamp, room, ops);
                    keys.retain(|_, share| {
                        self.give_back(share, stamp, room, ops);
                        let idle = stamp.saturating_sub(share.last_used.load(Ordering::Relaxed));
                        let holds = share.leased() > 0
                            || share.unleased.load(Ordering::Relaxed) > 0
                            || share.wanted.load(Ordering::Relaxed);
                        // A request or an op still holding it keeps it too.
                        let keep = idle < forget || holds || Arc::strong_count(share) > 1;
                        if !keep {
                            len.fetch_sub(1, Ordering::AcqRel);
                        }
                        keep
                    });
                }
                let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
                while ops.len() < room {
                    let Some(share) = queue.pop_front() else {
                        break;
                    };
                    self.claim(&share, room, ops);
                }
            }
        }
    }

    /// Every lease and debt, for the last round before shutdown.
    pub fn collect_all(&self, room: usize, ops: &mut Vec<Op>) {
        let everything = u64::MAX;
        match &*self.shares {
            Shares::Single(share) => self.give_back(share, everything, room, ops),
            Shares::PerKey { keys, overflow, .. } => {
                self.give_back(overflow, everything, room, ops);
                for entry in keys.iter() {
                    self.give_back(entry.value(), everything, room, ops);
                }
            }
        }
    }

    fn op(&self, share: &Arc<Share>, want: i64, charge: u32) -> Op {
        Op {
            share: Arc::clone(share),
            shares: Arc::clone(&self.shares),
            redis_key: share.redis_key.clone(),
            want,
            charge,
            rate: self.rule.shared.requests_per_second,
            burst: self.rule.shared.burst,
        }
    }

    /// Gives an idle share's lease back and pays what it owes.
    fn give_back(&self, share: &Arc<Share>, stamp: u64, room: usize, ops: &mut Vec<Op>) {
        let idle = stamp.saturating_sub(share.last_used.load(Ordering::Relaxed));
        if ops.len() >= room || idle < IDLE_RETURN.as_millis() as u64 {
            return;
        }
        let back = share.leased.swap(0, Ordering::AcqRel);
        let charge = share.unleased.swap(0, Ordering::Relaxed);
        if back > 0 || charge > 0 {
            ops.push(self.op(share, -back, charge));
        }
    }

    /// The claim `share` wants, if any.
    fn claim(&self, share: &Arc<Share>, room: usize, ops: &mut Vec<Op>) {
        if ops.len() >= room || !share.wanted.swap(false, Ordering::AcqRel) {
            return;
        }
        let charge = share.unleased.swap(0, Ordering::Relaxed);
        // Lease what was spent since the last claim (the demand over one claim
        // interval), twice the last lease if that ran out before this claim, at most
        // half the burst so other replicas keep a share.
        let spent = share.spent.swap(0, Ordering::Relaxed);
        let grown = if share.ran_out.swap(false, Ordering::Relaxed) {
            share.lease.load(Ordering::Relaxed).saturating_mul(2)
        } else {
            0
        };
        let want = spent
            .max(grown)
            .clamp(1, (self.rule.shared.burst / 2).max(1));
        ops.push(self.op(share, i64::from(want), charge));
    }
}

/// Marks `share` as wanting a claim; a keyed share joins its limiter's queue. True
/// when it did not want one yet.
fn rearm(shares: &Shares, share: &Arc<Share>) -> bool {
    if share.wanted.swap(true, Ordering::AcqRel) {
        return false;
    }
    if let Shares::PerKey { queue, .. } = shares {
        queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Arc::clone(share));
    }
    true
}

/// Settles a script call at `stamp` (see [`Outcome`]).
pub fn settle(op: &Op, stamp: u64, outcome: Outcome) {
    let share = &op.share;
    let (granted, wait_us, left) = match outcome {
        Outcome::Done(granted, wait_us, left) => (granted, wait_us, left),
        Outcome::Refused => {
            if op.want < 0 {
                share.leased.fetch_add(-op.want, Ordering::AcqRel);
            }
            share.unleased.fetch_add(op.charge, Ordering::Relaxed);
            if op.want > 0 {
                rearm(&op.shares, share);
            }
            return;
        }
        Outcome::Unknown => {
            if op.want > 0 {
                rearm(&op.shares, share);
            }
            return;
        }
    };
    if op.want <= 0 {
        return;
    }
    share.lease.store(op.want as u32, Ordering::Relaxed);
    share.shared_left.store(
        u32::try_from(left.max(0)).unwrap_or(u32::MAX),
        Ordering::Relaxed,
    );
    if wait_us > 0 {
        // The shared bucket has less than a token to spare: once this lease is
        // spent, refuse until it has one again (asking again meanwhile, at most
        // every PROBE_EVERY, in case another replica gives tokens back).
        let wait_ms = (wait_us as u64).div_ceil(1000).max(1);
        let until = stamp.saturating_add(wait_ms);
        share.probe_at.store(
            until.min(stamp + PROBE_EVERY.as_millis() as u64),
            Ordering::Release,
        );
        share.dry_until.store(until, Ordering::Release);
    } else {
        share.dry_until.store(0, Ordering::Release);
    }
    share
        .leased
        .fetch_add(granted.clamp(0, op.want), Ordering::AcqRel);
}

/// A stable hash (the same on every replica and build) for keyed bucket names, so
/// a key's bytes never reach Redis and names stay short.
use sluice_policy::hash::fnv1a64 as fnv64;

/// The first wait after a failed connection to Redis; it doubles up to
/// [`MAX_BACKOFF`] until a round succeeds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often leases are looked at without a wake-up; a policy without global
/// limits is looked at once a second.
const TICK: Duration = Duration::from_millis(100);
/// Idle leases and keys are looked for this often.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Without claims to make, Redis is pinged this often.
const PING_EVERY: Duration = Duration::from_secs(1);
/// At shutdown, rounds giving leases back (each up to MAX_OPS_PER_ROUND).
const MAX_FINAL_ROUNDS: u32 = 16;

/// `--redis` as a URL: `host:port` becomes `redis://host:port/`; a `redis://` URL
/// (with a password or a database) is taken as it is.
pub fn redis_url(addr: &str) -> String {
    if addr.starts_with("redis://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}/")
    }
}

/// The URL without its password, for logs.
pub fn redacted(addr: &str) -> String {
    match (addr.strip_prefix("redis://"), addr.rfind('@')) {
        (Some(_), Some(at)) => format!("redis://***{}", &addr[at..]),
        _ => addr.to_owned(),
    }
}

/// Keeps every global limiter of the live policy supplied with leases from the Redis
/// at `addr` until shutdown, reconnecting with backoff; at shutdown, gives the
/// leases back. `timeout` bounds connecting and each round trip; past it Redis
/// counts as unreachable and the local buckets decide until it answers again.
pub async fn sync(
    shared: Arc<crate::shared::Shared>,
    addr: String,
    timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let hub = Arc::clone(&shared.globals);
    let metrics = &shared.metrics;
    let shown = redacted(&addr);
    let client = match redis::Client::open(redis_url(&addr)) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(
                redis = shown,
                error = &e as &dyn std::error::Error,
                "redis address rejected; global rate limits use their local buckets"
            );
            return;
        }
    };
    let script = redis::Script::new(SCRIPT);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut backoff = MIN_BACKOFF;
    let mut was_up = None;
    let mut ops = Vec::new();
    // Ends on shutdown; each iteration is one connection.
    loop {
        let connect = async {
            let mut con = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            script.prepare_invoke().load_async(&mut con).await?;
            Ok::<_, redis::RedisError>(con)
        };
        let connected = tokio::select! {
            _ = shutdown.changed() => return,
            c = connect => c,
        };
        let mut con = match connected {
            Ok(con) => con,
            Err(e) => {
                metrics.global_syncs.with_label_values(&["error"]).inc();
                note_reachable(&hub, metrics, &mut was_up, false, &shown, Some(&e));
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // What a share knew of its bucket before may be stale (a restarted Redis
        // starts it full): a dry share asks again within PROBE_EVERY anyway.
        note_reachable(&hub, metrics, &mut was_up, true, &shown, None);
        let mut last_answer = Instant::now();
        let mut last_scan = Instant::now();
        let mut refusal_logged = false;
        let mut round: usize = 0;
        let mut stopped_rounds = 0;
        let mut stopping = false;
        // One round per wake-up or tick, while Redis answers.
        let failure = loop {
            let any = shared
                .runtime
                .load()
                .as_deref()
                .is_some_and(|r| r.routes().any(|r| r.global.is_some()));
            let tick = if any { TICK } else { Duration::from_secs(1) };
            if !stopping {
                stopping = tokio::select! {
                    _ = shutdown.changed() => true,
                    () = hub.woken() => false,
                    () = tokio::time::sleep(tick) => false,
                };
            }
            let Some(runtime) = shared.runtime.load_full() else {
                if stopping {
                    return;
                }
                continue;
            };
            let now = Instant::now();
            let scan = now.duration_since(last_scan) >= SCAN_EVERY;
            if scan {
                last_scan = now;
            }
            ops.clear();
            // Each round starts at the next limiter, so a busy one cannot keep the
            // others out of the round's room.
            let limiters: Vec<&GlobalLimiter> = runtime
                .routes()
                .filter_map(|r| r.global.as_deref())
                .collect();
            round = round.wrapping_add(1);
            let first = if limiters.is_empty() {
                0
            } else {
                round % limiters.len()
            };
            for limiter in limiters[first..].iter().chain(&limiters[..first]) {
                if stopping {
                    limiter.collect_all(MAX_OPS_PER_ROUND, &mut ops);
                } else {
                    limiter.collect(now, MAX_OPS_PER_ROUND, scan, &mut ops);
                }
            }
            drop(limiters);
            if ops.is_empty() {
                if stopping {
                    // Requests still draining decide on their own buckets now.
                    hub.set_reachable(false);
                    return;
                }
                // Nothing to claim: a PING now and then keeps the reachability (and
                // its gauge) current for when a claim is needed.
                if last_answer.elapsed() < PING_EVERY {
                    continue;
                }
                let ping: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut con).await;
                match ping {
                    Ok(_) => {
                        last_answer = Instant::now();
                        backoff = MIN_BACKOFF;
                        continue;
                    }
                    Err(e) => break e,
                }
            }
            let mut pipe = redis::pipe();
            // One script's refusal (a key of the wrong type, say) must not sink the
            // others: each answer is settled on its own.
            pipe.ignore_errors();
            for op in &ops {
                pipe.cmd("EVALSHA")
                    .arg(script.get_hash())
                    .arg(1)
                    .arg(&op.redis_key)
                    .arg(op.rate)
                    .arg(op.burst)
                    .arg(op.want)
                    .arg(op.charge);
            }
            let answer: redis::RedisResult<Vec<redis::RedisResult<(i64, i64, i64)>>> =
                pipe.query_async(&mut con).await;
            let stamp = hub.millis(Instant::now());
            let mut script_lost = None;
            match answer {
                Ok(answers) if answers.len() == ops.len() => {
                    for (op, answer) in ops.iter().zip(answers) {
                        match answer {
                            Ok((granted, wait, left)) => {
                                settle(op, stamp, Outcome::Done(granted, wait, left));
                            }
                            Err(e)
                                if e.kind()
                                    == redis::ErrorKind::Server(
                                        redis::ServerErrorKind::NoScript,
                                    ) =>
                            {
                                // Redis lost the script (SCRIPT FLUSH, a failover
                                // behind the same address): nothing ran; reconnect,
                                // which loads it again.
                                settle(op, stamp, Outcome::Refused);
                                script_lost = Some(e);
                            }
                            Err(e) => {
                                settle(op, stamp, Outcome::Refused);
                                metrics.global_syncs.with_label_values(&["error"]).inc();
                                if !refusal_logged {
                                    refusal_logged = true;
                                    tracing::warn!(
                                        redis = shown,
                                        key = op.redis_key.as_str(),
                                        error = &e as &dyn std::error::Error,
                                        "redis refused a global rate-limit script"
                                    );
                                }
                            }
                        }
                    }
                    if let Some(e) = script_lost {
                        if stopping {
                            hub.set_reachable(false);
                            return;
                        }
                        break e;
                    }
                    metrics.global_syncs.with_label_values(&["ok"]).inc();
                    last_answer = Instant::now();
                    backoff = MIN_BACKOFF;
                    if stopping {
                        // Another round if the room was full, until all is given back.
                        if ops.len() < MAX_OPS_PER_ROUND || stopped_rounds >= MAX_FINAL_ROUNDS {
                            hub.set_reachable(false);
                            return;
                        }
                        stopped_rounds += 1;
                    }
                }
                answer => {
                    for op in &ops {
                        settle(op, stamp, Outcome::Unknown);
                    }
                    if stopping {
                        hub.set_reachable(false);
                        return;
                    }
                    break match answer {
                        Err(e) => e,
                        Ok(answers) => redis::RedisError::from((
                            redis::ErrorKind::Parse,
                            "wrong number of answers",
                            format!("{} for {} scripts", answers.len(), ops.len()),
                        )),
                    };
                }
            }
        };
        metrics.global_syncs.with_label_values(&["error"]).inc();
        note_reachable(&hub, metrics, &mut was_up, false, &shown, Some(&failure));
        // A connection that fails again right away must not be retried in a loop.
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Records whether Redis answers (flag, gauge) and logs each change once.
fn note_reachable(
    hub: &GlobalLimits,
    metrics: &crate::metrics::Metrics,
    was_up: &mut Option<bool>,
    up: bool,
    shown: &str,
    error: Option<&redis::RedisError>,
) {
    hub.set_reachable(up);
    metrics.global_redis_up.set(i64::from(up));
    if *was_up == Some(up) {
        return;
    }
    *was_up = Some(up);
    let error = error.map(|e| e as &dyn std::error::Error);
    if up {
        tracing::info!(
            redis = shown,
            error,
            "redis connected; global rate limits shared"
        );
    } else {
        tracing::warn!(
            redis = shown,
            error,
            "redis unreachable; global rate limits use their local buckets"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::{KeyedLimit, RateLimit};

    fn rule(rps: f64, burst: u32, local_burst: u32, key: Option<KeyedLimit>) -> GlobalRateLimit {
        GlobalRateLimit {
            shared: RateLimit {
                requests_per_second: rps,
                burst,
                key: key.clone(),
            },
            when_unreachable: RateLimit {
                requests_per_second: 0.001,
                burst: local_burst,
                key,
            },
        }
    }

    fn limiter(rule: &GlobalRateLimit, reachable: bool) -> (GlobalLimiter, Arc<GlobalLimits>) {
        let hub = GlobalLimits::new(true);
        hub.set_reachable(reachable);
        (
            GlobalLimiter::new(rule, None, "shop", "checkout", Arc::clone(&hub), None),
            hub,
        )
    }

    fn allowed(d: Decision) -> bool {
        matches!(d, Decision::Allowed { .. })
    }

    fn ops(l: &GlobalLimiter, now: Instant) -> Vec<Op> {
        let mut ops = Vec::new();
        l.collect(now, MAX_OPS_PER_ROUND, true, &mut ops);
        ops
    }

    #[test]
    fn unreachable_redis_leaves_the_local_bucket_deciding() {
        let (l, _) = limiter(&rule(100.0, 50, 2, None), false);
        let now = Instant::now();
        assert!(allowed(l.check("", now)));
        assert!(allowed(l.check("", now)));
        assert!(!allowed(l.check("", now)), "the local burst is 2");
        assert_eq!(l.take_local_decisions(), 3);
        // Nothing to charge: Redis never heard of these requests.
        assert!(ops(&l, now).is_empty());
    }

    #[test]
    fn before_its_first_lease_a_replica_admits_on_credit_and_pays_at_the_claim() {
        let (l, _) = limiter(&rule(10.0, 20, 5, None), true);
        let now = Instant::now();
        assert!(allowed(l.check("", now)));
        assert!(allowed(l.check("", now)));
        let ops = ops(&l, now);
        assert_eq!(ops.len(), 1);
        let op = &ops[0];
        assert_eq!(op.redis_key, "sluice:rl:shop:checkout");
        assert_eq!(op.charge, 2, "both admissions without a lease are charged");
        assert_eq!(op.want, 2, "the lease asked is what was spent");
        assert_eq!((op.rate, op.burst), (10.0, 20));
    }

    #[test]
    fn a_lease_is_spent_locally_and_renewed_at_half() {
        let (l, _) = limiter(&rule(10.0, 20, 5, None), true);
        let now = Instant::now();
        // No lease yet: the first request is admitted on credit, not by the own bucket.
        assert!(allowed(l.check("", now)));
        assert_eq!(l.take_local_decisions(), 0);
        let claim = ops(&l, now);
        assert_eq!(
            claim[0].want, 2,
            "the lease ran out (there was none): twice the last"
        );
        settle(&claim[0], 0, Outcome::Done(2, 0, 17));
        // Two tokens leased: the first spends one (1 left, not below half of 2)...
        assert!(allowed(l.check("", now)));
        assert!(ops(&l, now).is_empty());
        // ...the second spends the other, and the next lease is wanted.
        assert!(allowed(l.check("", now)));
        let next = ops(&l, now);
        assert_eq!(next.len(), 1);
        assert_eq!((next[0].want, next[0].charge), (2, 0));
        assert_eq!(l.take_local_decisions(), 0);
    }

    #[test]
    fn credit_is_one_lease_then_the_own_bucket_decides() {
        let (l, _) = limiter(&rule(10.0, 20, 1, None), true);
        let now = Instant::now();
        assert!(allowed(l.check("", now)), "on credit");
        assert!(allowed(l.check("", now)), "by the own bucket (burst 1)");
        assert!(
            !allowed(l.check("", now)),
            "own bucket empty, claim not back yet"
        );
        assert_eq!(l.take_local_decisions(), 2);
        let claim = ops(&l, now);
        assert_eq!(claim[0].charge, 2, "both admissions are owed");
    }

    #[test]
    fn a_dry_shared_bucket_refuses_until_it_refills() {
        let (l, hub) = limiter(&rule(10.0, 20, 5, None), true);
        let start = Instant::now();
        assert!(allowed(l.check("", start)));
        let claim = ops(&l, start);
        // Redis had no token for us: one comes in 100 ms.
        settle(&claim[0], hub.millis(start), Outcome::Done(0, 100_000, 0));
        match l.check("", start) {
            Decision::Limited { retry_after } => {
                assert_eq!(retry_after, Duration::from_millis(100));
            }
            other => panic!("{other:?}"),
        }
        assert!(ops(&l, start).is_empty(), "no claim before the refill");
        // Refilled: admitted on credit again, and a claim is wanted.
        let later = start + Duration::from_millis(150);
        assert!(allowed(l.check("", later)));
        let claim = ops(&l, later);
        assert_eq!(claim.len(), 1);
        assert_eq!(claim[0].charge, 1);
        settle(
            &claim[0],
            hub.millis(later),
            Outcome::Done(claim[0].want, 0, 3),
        );
        assert!(allowed(l.check("", later)));
    }

    #[test]
    fn taking_the_last_tokens_makes_the_share_dry_and_a_dry_share_probes() {
        let (l, hub) = limiter(&rule(0.1, 20, 5, None), true);
        let start = Instant::now();
        let stamp = hub.millis(start);
        assert!(allowed(l.check("", start)));
        let claim = ops(&l, start);
        // Granted in full, but the bucket is left with less than a token (10 s away).
        settle(
            &claim[0],
            stamp,
            Outcome::Done(claim[0].want, 10_000_000, 0),
        );
        for _ in 0..claim[0].want {
            assert!(allowed(l.check("", start)), "the lease is spent first");
        }
        assert!(!allowed(l.check("", start)), "then the dry bucket refuses");
        ops(&l, start);
        // Before PROBE_EVERY nobody asks; after it the next request asks again
        // (another replica may have given tokens back), still refused meanwhile.
        let soon = start + Duration::from_millis(500);
        assert!(!allowed(l.check("", soon)));
        assert!(ops(&l, soon).is_empty());
        let probe = start + PROBE_EVERY;
        match l.check("", probe) {
            Decision::Limited { retry_after } => assert_eq!(retry_after, Duration::from_secs(9)),
            other => panic!("{other:?}"),
        }
        assert_eq!(ops(&l, probe).len(), 1);
    }

    #[test]
    fn an_idle_lease_goes_back_and_an_unknown_outcome_is_never_replayed() {
        let (l, _) = limiter(&rule(10.0, 20, 5, None), true);
        let now = Instant::now();
        for _ in 0..4 {
            l.check("", now);
        }
        let claim = ops(&l, now);
        settle(&claim[0], 0, Outcome::Done(4, 0, 10));
        let leased = || match &*l.shares {
            Shares::Single(share) => share.leased(),
            Shares::PerKey { .. } => unreachable!(),
        };
        assert_eq!(leased(), 4);
        let idle = now + IDLE_RETURN;
        let back = ops(&l, idle);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].want, -4);
        // Redis refused the script: the tokens are still ours...
        settle(&back[0], 0, Outcome::Refused);
        assert_eq!(leased(), 4);
        // ...but when nobody knows whether Redis took them, they are dropped (never
        // counted twice).
        let back = ops(&l, idle);
        settle(&back[0], 0, Outcome::Unknown);
        assert_eq!(leased(), 0);
        assert!(ops(&l, idle).is_empty());
    }

    #[test]
    fn a_changed_rule_keeps_the_lease_when_the_bucket_is_the_same() {
        let (l, hub) = limiter(&rule(10.0, 20, 5, None), true);
        let now = Instant::now();
        l.check("", now);
        let claim = ops(&l, now);
        settle(&claim[0], 0, Outcome::Done(2, 0, 10));
        let faster = rule(50.0, 20, 9, None);
        let next = GlobalLimiter::new(
            &faster,
            None,
            "shop",
            "checkout",
            Arc::clone(&hub),
            Some(&l),
        );
        assert!(Arc::ptr_eq(&l.shares, &next.shares));
        let elsewhere =
            GlobalLimiter::new(&faster, Some("team-b"), "shop", "checkout", hub, Some(&l));
        assert!(!Arc::ptr_eq(&l.shares, &elsewhere.shares));
        elsewhere.check("", now);
        assert_eq!(
            ops(&elsewhere, now)[0].redis_key,
            "sluice:rl:team-b/shop:checkout"
        );
    }

    #[test]
    fn keys_beyond_the_cap_share_the_overflow_bucket() {
        let keyed = KeyedLimit {
            key: Key::Header("x-tenant".into()),
            max_keys: 2,
        };
        let (l, _) = limiter(&rule(10.0, 20, 5, Some(keyed)), true);
        let now = Instant::now();
        for tenant in ["a", "b", "c", "d"] {
            assert!(allowed(l.check(tenant, now)));
        }
        assert_eq!(l.tracked_keys(), 2);
        let mut keys: Vec<String> = ops(&l, now).into_iter().map(|o| o.redis_key).collect();
        keys.sort();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys.contains(&"sluice:rl:shop:checkout:overflow".to_owned()));
        assert!(keys
            .iter()
            .any(|k| k == &format!("sluice:rl:shop:checkout:{:016x}", fnv64(b"a"))));
    }

    #[test]
    fn a_keyed_share_whose_claim_failed_claims_again() {
        let keyed = KeyedLimit {
            key: Key::Header("x-tenant".into()),
            max_keys: 10,
        };
        let (l, _) = limiter(&rule(10.0, 20, 5, Some(keyed)), true);
        let now = Instant::now();
        assert!(allowed(l.check("acme", now)));
        let claim = ops(&l, now);
        assert_eq!(claim[0].charge, 1);
        // Refused: nothing happened in Redis; queued again, still owing.
        settle(&claim[0], 0, Outcome::Refused);
        let claim = ops(&l, now);
        assert_eq!((claim.len(), claim[0].charge), (1, 1));
        // Unknown: queued again, the charge dropped (it may have been paid).
        settle(&claim[0], 0, Outcome::Unknown);
        let claim = ops(&l, now);
        assert_eq!((claim.len(), claim[0].charge), (1, 0));
        settle(&claim[0], 0, Outcome::Done(claim[0].want, 0, 10));
        assert!(ops(&l, now).is_empty());
    }

    #[test]
    fn without_redis_the_own_bucket_decides_and_no_key_is_tracked() {
        let keyed = KeyedLimit {
            key: Key::ClientIp,
            max_keys: 10,
        };
        let hub = GlobalLimits::new(false);
        let l = GlobalLimiter::new(
            &rule(10.0, 20, 2, Some(keyed)),
            None,
            "shop",
            "checkout",
            hub,
            None,
        );
        let now = Instant::now();
        assert!(allowed(l.check("10.0.0.1", now)));
        assert!(allowed(l.check("10.0.0.1", now)));
        assert!(
            !allowed(l.check("10.0.0.1", now)),
            "the own bucket's burst is 2"
        );
        assert_eq!(l.take_local_decisions(), 3);
        assert_eq!(l.tracked_keys(), 0);
        assert!(ops(&l, now).is_empty());
    }

    #[test]
    fn idle_keys_holding_nothing_are_forgotten() {
        let keyed = KeyedLimit {
            key: Key::ClientIp,
            max_keys: 10,
        };
        let (l, _) = limiter(&rule(10.0, 20, 5, Some(keyed)), false);
        let now = Instant::now();
        l.check("10.0.0.1", now);
        l.check("10.0.0.2", now);
        assert_eq!(l.tracked_keys(), 2);
        ops(&l, now + IDLE_FORGET);
        assert_eq!(l.tracked_keys(), 0);
    }
}
