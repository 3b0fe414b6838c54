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

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use sluice_policy::{Key, RateLimit};

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
}

impl<C: Clock + Clone> RouteLimiter<C>
where
    C::Instant: governor::clock::Reference,
{
    pub fn new(rule: &RateLimit, clock: C) -> Self {
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
        RouteLimiter {
            rule: rule.clone(),
            buckets,
            clock,
            period,
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
            Buckets::Single(limiter) => self.decision(limiter.check()),
            Buckets::PerKey(..) => self.check_owned(&key.to_owned()),
        }
    }

    /// [`RouteLimiter::check`] with a key the caller already owns (the request
    /// path's), saving a copy: governor's keyed store looks keys up as `&String`.
    pub fn check_owned(&self, key: &String) -> Decision {
        match &self.buckets {
            Buckets::Single(limiter) => self.decision(limiter.check()),
            Buckets::PerKey(limiter, _) => self.decision(limiter.check_key(key)),
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

    proptest::proptest! {
        /// Over any schedule, no more than burst + elapsed * rate requests pass.
        #[test]
        fn never_admits_more_than_burst_plus_refill(
            rps in 1u32..1000,
            burst in 1u32..100,
            steps in proptest::collection::vec((0u64..50, 1u32..20), 1..50),
        ) {
            let clock = FakeRelativeClock::default();
            let limiter = RouteLimiter::new(&rule(f64::from(rps), burst, None), clock.clone());
            let mut admitted = 0u64;
            let mut elapsed_ms = 0u64;
            for (advance_ms, tries) in steps {
                clock.advance(Duration::from_millis(advance_ms));
                elapsed_ms += advance_ms;
                for _ in 0..tries {
                    if allowed(limiter.check("")) {
                        admitted += 1;
                    }
                }
                let bound = u64::from(burst) + elapsed_ms * u64::from(rps) / 1000 + 1;
                proptest::prop_assert!(admitted <= bound, "{admitted} > {bound}");
            }
        }
    }
}
