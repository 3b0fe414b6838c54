//! Token-bucket rate limiting for one route (governor's GCRA), optionally one bucket
//! per key with a hard cap on how many keys are tracked.
//!
//! Memory stays bounded whatever the key cardinality: at most `maxKeys` keys get a
//! bucket of their own; every key beyond the cap shares one *overflow* bucket with the
//! same rate (so an attacker rotating keys is limited as one client, never let through
//! unlimited), and each such request is counted. A periodic sweep
//! ([`RouteLimiter::sweep`]) forgets keys whose bucket has refilled, which is
//! indistinguishable from never having seen them, so the cap is reached only by keys
//! that are actually active.
//!
//! Requests without the key (no such header) share one bucket of their own, keyed by
//! the empty string: a missing header is not a way around the limit.
//!
//! A route-wide (unkeyed) limit of a high rate is drawn from in leases: a worker
//! thread takes several tokens from the shared bucket at once and admits its next
//! requests from them, so the bucket's one atomic word (a compare-and-swap per
//! request, on a line every worker writes) is written once per lease. Only where
//! the approximation is small: a lease is at most [`MAX_LEASE`] tokens, at most a
//! millisecond of the rate, and at most 1/8 of the burst shared over the threads'
//! leases, so limits under 2,000 requests per second (or with small bursts) stay
//! exact. The approximation: tokens a thread leased and has not used yet are
//! admitted whenever its next requests come, so at most `burst / 8` more requests
//! than the burst can pass at once; over time the rate is exact (every admitted
//! request took a token from the bucket), and a lease is never wasted. When the
//! bucket has fewer tokens than a lease, requests draw one token each, exactly.
//! The `RateLimit-Remaining` of a leased request is the bucket's at the lease plus
//! what the lease has left. Tokens a thread holds are not in the bucket for the
//! others: while one thread is idle, the rest can pass up to its lease (at most
//! burst/8 over all threads) fewer at once, as many more later. At the limit,
//! where the bucket rarely holds a lease's worth, a request tries a lease (a read
//! of the bucket's word, no write) and then takes its one token. Connection rates
//! of opaque TCP (`tcplimit`) take no leases ([`RouteLimiter::exact`]): a check per
//! connection is not worth an approximation.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use sluice_policy::{Key, RateLimit};

use crate::shard::{per_core, PerThread};

/// Most tokens a thread takes from a route's bucket at once.
pub const MAX_LEASE: u32 = 32;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        /// Requests that could still pass right now.
        remaining: u32,
        /// Until the bucket is full again.
        reset: Duration,
    },
    Limited {
        /// Until the next request can pass.
        retry_after: Duration,
    },
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;
type Keyed<C> = RateLimiter<String, CappedKeyStore, C, StateInformationMiddleware>;

enum Buckets<C: Clock> {
    Single(Direct<C>),
    PerKey(Keyed<C>, Arc<KeyCounters>),
}

/// One route's limiter. Built from its rule; reused across reloads while the rule is
/// unchanged, so a reload never refills a bucket.
pub struct RouteLimiter<C: Clock = DefaultClock> {
    rule: RateLimit,
    buckets: Buckets<C>,
    clock: C,
    period: Duration,
    /// The threads' leases of an unkeyed bucket, when its rate allows them.
    leases: Option<Leases>,
}

/// What a thread has leased of a route's bucket.
#[derive(Debug, Default)]
struct Lease {
    /// Tokens left.
    left: u32,
    /// The bucket's remaining capacity when they were taken.
    remaining: u32,
}

struct Leases {
    /// Tokens per lease (at least 2).
    size: NonZeroU32,
    /// A lease per thread.
    lines: PerThread<Mutex<Lease>>,
}

impl Leases {
    /// Leases for a bucket of `rule`, or `None` where a lease would be more than a
    /// millisecond of the rate or the threads' leases more than 1/8 of the burst.
    fn for_rule(rule: &RateLimit) -> Option<Self> {
        let threads = per_core().next_power_of_two();
        let of_rate = (rule.requests_per_second / 1000.0).floor();
        let of_burst = rule.burst / (8 * threads as u32);
        let size = (of_rate.min(f64::from(MAX_LEASE)) as u32).min(of_burst);
        let size = NonZeroU32::new(size).filter(|n| n.get() >= 2)?;
        Some(Leases {
            size,
            lines: PerThread::new(threads, |_| Mutex::new(Lease::default())),
        })
    }
}

impl<C: Clock + Clone> RouteLimiter<C>
where
    C::Instant: governor::clock::Reference,
{
    /// A limiter for `rule`, drawn in leases where the rate allows them.
    pub fn new(rule: &RateLimit, clock: C) -> Self {
        Self::build(rule, clock, true)
    }

    /// A limiter for `rule` that takes every token from the bucket, one per check.
    pub fn exact(rule: &RateLimit, clock: C) -> Self {
        Self::build(rule, clock, false)
    }

    fn build(rule: &RateLimit, clock: C, leased: bool) -> Self {
        // The model guarantees rps > 0 and finite and burst >= 1.
        let period =
            Duration::from_secs_f64(1.0 / rule.requests_per_second).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(rule.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let buckets = match &rule.key {
            None => Buckets::Single(
                RateLimiter::direct_with_clock(quota, clock.clone()).with_middleware(),
            ),
            Some(keyed) => {
                let store = CappedKeyStore::new(keyed.max_keys as usize);
                let counters = Arc::clone(&store.counters);
                Buckets::PerKey(
                    RateLimiter::<String, _, C, NoOpMiddleware<C::Instant>>::new(
                        quota,
                        store,
                        clock.clone(),
                    )
                    .with_middleware(),
                    counters,
                )
            }
        };
        let leases = match &buckets {
            Buckets::Single(_) if leased => Leases::for_rule(rule),
            _ => None,
        };
        RouteLimiter {
            rule: rule.clone(),
            buckets,
            clock,
            period,
            leases,
        }
    }

    /// The rule this limiter enforces (the carry-over test on reload).
    pub fn rule(&self) -> &RateLimit {
        &self.rule
    }

    /// What the request is keyed by, when the limit is per key.
    pub fn key(&self) -> Option<&Key> {
        self.rule.key.as_ref().map(|k| &k.key)
    }

    /// Takes one token for `key` (ignored when the limit is not keyed).
    pub fn check(&self, key: &str) -> Decision {
        match &self.buckets {
            Buckets::Single(limiter) => self.check_single(limiter),
            Buckets::PerKey(..) => self.check_owned(&key.to_owned()),
        }
    }

    /// [`RouteLimiter::check`] with a key the caller already owns (the request
    /// path's), saving a copy: governor's keyed store looks keys up as `&String`.
    pub fn check_owned(&self, key: &String) -> Decision {
        match &self.buckets {
            Buckets::Single(limiter) => self.check_single(limiter),
            Buckets::PerKey(limiter, _) => self.decision(limiter.check_key(key)),
        }
    }

    /// One token of the route's bucket: from the thread's lease when it has one
    /// (see the module doc), else a new lease, else (fewer tokens left than a
    /// lease) one token, exactly.
    fn check_single(&self, limiter: &Direct<C>) -> Decision {
        let Some(leases) = &self.leases else {
            return self.decision(limiter.check());
        };
        let mut lease = leases
            .lines
            .mine()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if lease.left == 0 {
            match limiter.check_n(leases.size) {
                Ok(Ok(snapshot)) => {
                    *lease = Lease {
                        left: leases.size.get(),
                        remaining: snapshot.remaining_burst_capacity(),
                    };
                }
                _ => {
                    drop(lease);
                    return self.decision(limiter.check());
                }
            }
        }
        lease.left -= 1;
        let remaining = lease.remaining.saturating_add(lease.left);
        Decision::Allowed {
            remaining,
            reset: self.period * self.rule.burst.saturating_sub(remaining),
        }
    }

    fn decision(
        &self,
        outcome: Result<governor::middleware::StateSnapshot, governor::NotUntil<C::Instant>>,
    ) -> Decision {
        match outcome {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision::Allowed {
                    remaining,
                    reset: self.period * (self.rule.burst.saturating_sub(remaining)),
                }
            }
            Err(not_until) => Decision::Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    /// The bucket size, as advertised in `RateLimit-Limit`.
    pub fn limit(&self) -> u32 {
        self.rule.burst
    }

    /// Keys with a bucket of their own right now.
    pub fn tracked_keys(&self) -> usize {
        match &self.buckets {
            Buckets::Single(_) => 0,
            Buckets::PerKey(_, counters) => counters.len.load(Ordering::Relaxed),
        }
    }

    /// Requests that fell into the overflow bucket because the key cap was reached.
    pub fn overflowed(&self) -> u64 {
        match &self.buckets {
            Buckets::Single(_) => 0,
            Buckets::PerKey(_, counters) => counters.overflowed.load(Ordering::Relaxed),
        }
    }

    /// Overflowed requests since the last call (for a counter metric).
    pub fn take_overflowed(&self) -> u64 {
        match &self.buckets {
            Buckets::Single(_) => 0,
            Buckets::PerKey(_, counters) => counters.unreported.swap(0, Ordering::Relaxed),
        }
    }

    /// Forgets keys whose bucket is full again, freeing room under the cap.
    pub fn sweep(&self) {
        if let Buckets::PerKey(limiter, _) = &self.buckets {
            limiter.retain_recent();
        }
    }
}

/// Counters of a keyed store, shared with the limiter that owns it (governor does
/// not hand the store of a live limiter back).
#[derive(Default)]
pub struct KeyCounters {
    len: AtomicUsize,
    overflowed: AtomicU64,
    /// Overflowed requests not yet published as a metric.
    unreported: AtomicU64,
}

/// Per-key GCRA state with a hard cap on the number of keys.
pub struct CappedKeyStore {
    keys: DashMap<String, AtomicU64>,
    /// Shared by every key that arrives once the cap is reached.
    overflow: AtomicU64,
    max_keys: usize,
    counters: Arc<KeyCounters>,
}

impl CappedKeyStore {
    fn new(max_keys: usize) -> Self {
        CappedKeyStore {
            keys: DashMap::new(),
            overflow: AtomicU64::new(0),
            max_keys,
            counters: Arc::default(),
        }
    }
}

/// governor's compare-and-swap update of one GCRA state word (0 = never seen).
fn measure<T, F, E>(cell: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let as_nanos = |raw: u64| (raw != 0).then(|| Nanos::from(raw));
    let mut prev = cell.load(Ordering::Acquire);
    let mut decision = f(as_nanos(prev));
    while let Ok((result, new)) = decision {
        match cell.compare_exchange_weak(prev, new.as_u64(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(actual) => prev = actual,
        }
        decision = f(as_nanos(prev));
    }
    decision.map(|(result, _)| result)
}

impl StateStore for CappedKeyStore {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(cell) = self.keys.get(key) {
            return measure(&cell, f);
        }
        // Reserve a slot before inserting, so concurrent new keys can never push the
        // map past the cap.
        let reserved = self
            .counters
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            self.counters.overflowed.fetch_add(1, Ordering::Relaxed);
            self.counters.unreported.fetch_add(1, Ordering::Relaxed);
            return measure(&self.overflow, f);
        }
        let entry = self.keys.entry(key.clone());
        if let dashmap::Entry::Occupied(_) = entry {
            // Another request inserted this key meanwhile: give the slot back.
            self.counters.len.fetch_sub(1, Ordering::AcqRel);
        }
        let cell = entry.or_insert_with(|| AtomicU64::new(0));
        measure(&cell, f)
    }
}

impl ShrinkableKeyedStateStore<String> for CappedKeyStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        self.keys.retain(|_, cell| {
            let keep = cell.load(Ordering::Relaxed) > drop_below;
            if !keep {
                self.counters.len.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        self.keys.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.counters.len.load(Ordering::Acquire)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use sluice_policy::KeyedLimit;

    fn rule(rps: f64, burst: u32, max_keys: Option<u32>) -> RateLimit {
        RateLimit {
            requests_per_second: rps,
            burst,
            key: max_keys.map(|max_keys| KeyedLimit {
                key: Key::Header("x-user".into()),
                max_keys,
            }),
        }
    }

    fn allowed(d: Decision) -> bool {
        matches!(d, Decision::Allowed { .. })
    }

    #[test]
    fn allows_the_burst_then_limits_until_a_token_refills() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(10.0, 3, None), clock.clone());
        assert_eq!(
            limiter.check(""),
            Decision::Allowed {
                remaining: 2,
                reset: Duration::from_millis(100)
            }
        );
        assert!(allowed(limiter.check("")));
        assert!(allowed(limiter.check("")));
        assert_eq!(
            limiter.check(""),
            Decision::Limited {
                retry_after: Duration::from_millis(100)
            }
        );
        clock.advance(Duration::from_millis(100));
        assert!(allowed(limiter.check("")));
        assert!(!allowed(limiter.check("")));
    }

    #[test]
    fn fractional_rates_refill_slowly() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(0.5, 1, None), clock.clone());
        assert!(allowed(limiter.check("")));
        assert_eq!(
            limiter.check(""),
            Decision::Limited {
                retry_after: Duration::from_secs(2)
            }
        );
        clock.advance(Duration::from_millis(1999));
        assert!(!allowed(limiter.check("")));
        clock.advance(Duration::from_millis(1));
        assert!(allowed(limiter.check("")));
    }

    #[test]
    fn keys_have_separate_buckets() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(1.0, 1, Some(10)), clock);
        assert!(allowed(limiter.check("alice")));
        assert!(!allowed(limiter.check("alice")));
        assert!(allowed(limiter.check("bob")));
        assert_eq!(limiter.tracked_keys(), 2);
    }

    #[test]
    fn keys_beyond_the_cap_share_the_overflow_bucket() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(1.0, 1, Some(2)), clock);
        assert!(allowed(limiter.check("a")));
        assert!(allowed(limiter.check("b")));
        // Two new keys over the cap: one overflow bucket of burst 1 between them.
        assert!(allowed(limiter.check("c")));
        assert!(!allowed(limiter.check("d")));
        assert_eq!(limiter.tracked_keys(), 2);
        assert_eq!(limiter.overflowed(), 2);
    }

    #[test]
    fn sweep_forgets_refilled_keys_and_frees_the_cap() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(10.0, 1, Some(1)), clock.clone());
        assert!(allowed(limiter.check("a")));
        limiter.sweep();
        assert_eq!(limiter.tracked_keys(), 1, "a is still draining");
        clock.advance(Duration::from_secs(1));
        limiter.sweep();
        assert_eq!(limiter.tracked_keys(), 0);
        assert!(allowed(limiter.check("b")));
        assert_eq!(limiter.overflowed(), 0);
    }

    #[test]
    fn a_million_distinct_keys_stay_under_the_cap() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(1.0, 1, Some(1000)), clock);
        for i in 0..1_000_000u32 {
            limiter.check(&i.to_string());
        }
        assert_eq!(limiter.tracked_keys(), 1000);
        assert_eq!(limiter.overflowed(), 999_000);
    }

    #[test]
    fn limits_under_two_thousand_per_second_or_with_small_bursts_take_no_leases() {
        assert!(Leases::for_rule(&rule(1999.0, 100_000, None)).is_none());
        assert!(Leases::for_rule(&rule(1e6, 15, None)).is_none());
        let leases = Leases::for_rule(&rule(1e9, 1_000_000, None)).expect("a lease");
        assert_eq!(leases.size.get(), MAX_LEASE);
        // A millisecond of the rate.
        let leases = Leases::for_rule(&rule(5000.0, 1_000_000, None)).expect("a lease");
        assert_eq!(leases.size.get(), 5);
    }

    #[test]
    fn an_exact_limiter_takes_no_leases_whatever_its_rate() {
        let limiter =
            RouteLimiter::exact(&rule(1e9, 1_000_000, None), FakeRelativeClock::default());
        assert!(limiter.leases.is_none());
    }

    #[test]
    fn leased_decisions_count_down_from_the_burst_as_exact_ones_do() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(1e6, 1000, None), clock);
        assert!(limiter.leases.is_some());
        for expected in (990..1000).rev() {
            match limiter.check("") {
                Decision::Allowed { remaining, .. } => assert_eq!(remaining, expected),
                limited => panic!("{limited:?}"),
            }
        }
    }

    #[test]
    fn threads_drawing_leases_admit_exactly_the_burst_of_a_frozen_bucket() {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(1e6, 1000, None), clock);
        let admitted: usize = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).filter(|_| allowed(limiter.check(""))).count()))
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("a checking thread"))
                .sum()
        });
        // Every thread drew until limited: no token is left in a lease, none
        // was admitted twice.
        assert_eq!(admitted, 1000);
    }

    #[test]
    fn a_lease_left_over_passes_at_most_an_eighth_of_the_burst_more() {
        let clock = FakeRelativeClock::default();
        let burst = 1000;
        let limiter = RouteLimiter::new(&rule(1e6, burst, None), clock.clone());
        // Another thread leases and uses one token, waits while the bucket fills
        // again and this thread draws it empty, then passes what its lease has left.
        let (leased, drawn) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let (here, there) = std::thread::scope(|s| {
            let other = s.spawn(|| {
                assert!(allowed(limiter.check("")));
                leased.wait();
                drawn.wait();
                (0..burst).filter(|_| allowed(limiter.check(""))).count()
            });
            leased.wait();
            clock.advance(Duration::from_secs(1));
            let here = (0..2 * burst)
                .filter(|_| allowed(limiter.check("")))
                .count();
            drawn.wait();
            (here, other.join().expect("a checking thread"))
        });
        // (Two threads may share a lease slot: then this thread drew the other's
        // lease too, and the sum is the same.)
        let extra = (here + there) as u32 - burst;
        assert!(extra >= 1, "the lease left over is not lost");
        assert!(extra <= burst / 8, "{extra} beyond a burst of {burst}");
    }

    /// Runs `steps` (advance the clock so many ms, then try so many requests) on a
    /// limiter of `rps` and `burst`; the first time more than burst + elapsed *
    /// rate (+1 for rounding) have passed, what passed and the bound.
    fn exceeds_burst_plus_refill(rps: u32, burst: u32, steps: &[(u64, u32)]) -> Option<(u64, u64)> {
        let clock = FakeRelativeClock::default();
        let limiter = RouteLimiter::new(&rule(f64::from(rps), burst, None), clock.clone());
        let mut admitted = 0u64;
        let mut elapsed_ms = 0u64;
        for &(advance_ms, tries) in steps {
            clock.advance(Duration::from_millis(advance_ms));
            elapsed_ms += advance_ms;
            admitted += (0..tries).filter(|_| allowed(limiter.check(""))).count() as u64;
            let bound = u64::from(burst) + elapsed_ms * u64::from(rps) / 1000 + 1;
            if admitted > bound {
                return Some((admitted, bound));
            }
        }
        None
    }

    proptest::proptest! {
        /// Over any schedule, no more than burst + elapsed * rate requests pass.
        #[test]
        fn never_admits_more_than_burst_plus_refill(
            rps in 1u32..1000,
            burst in 1u32..100,
            steps in proptest::collection::vec((0u64..50, 1u32..20), 1..50),
        ) {
            let exceeded = exceeds_burst_plus_refill(rps, burst, &steps);
            proptest::prop_assert!(exceeded.is_none(), "{exceeded:?}");
        }

        /// The same bound for rates high enough to be leased: one thread's leases
        /// are tokens it took from the bucket, each admitted once.
        #[test]
        fn leased_limits_never_admit_more_than_burst_plus_refill(
            rps in 2000u32..1_000_000,
            burst in 16u32..5000,
            steps in proptest::collection::vec((0u64..5, 1u32..200), 1..50),
        ) {
            let exceeded = exceeds_burst_plus_refill(rps, burst, &steps);
            proptest::prop_assert!(exceeded.is_none(), "{exceeded:?}");
        }
    }
}
