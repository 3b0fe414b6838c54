//! A route's global limit: the decision for each request (a leased token, the own
//! bucket, credit or a refusal) and the claims it leaves for the sync task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::DefaultClock;
use sluice_policy::{GlobalRateLimit, Key};
use tokio::sync::Notify;

use super::lease::{rearm, Op, Share, Shares};
use super::{IDLE_FORGET, IDLE_RETURN};
use crate::ratelimit::{Decision, RouteLimiter};

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

/// One route's global limit. Carried over a reload while its rule is unchanged; a
/// changed rule keeps the shares (leases, debts) while the bucket's name and keying
/// are the same.
pub struct GlobalLimiter {
    rule: GlobalRateLimit,
    hub: Arc<GlobalLimits>,
    /// `sluice:rl:[<namespace>/]<policy>:<route>`; keyed buckets append
    /// `:<hash of the key>`.
    prefix: String,
    pub(super) shares: Arc<Shares>,
    /// This replica's own bucket (`whenUnreachable`).
    local: Arc<RouteLimiter>,
    /// Requests the local bucket decided since the last report (a counter metric).
    local_decisions: AtomicU64,
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

/// A stable hash (the same on every replica and build) for keyed bucket names, so
/// a key's bytes never reach Redis and names stay short.
use sluice_policy::hash::fnv1a64 as fnv64;
