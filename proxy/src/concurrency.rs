//! A concurrency limit for one route, fixed or adaptive, with priority shedding.
//!
//! A rate limit caps arrivals; a concurrency limit caps work in progress, which is what
//! actually exhausts an upstream (Little's law: in-flight = rate x latency, so when the
//! upstream slows down the same rate needs more in flight). A request over the limit
//! is shed at once, never queued: a queue in front of an overloaded upstream only
//! adds latency to requests that will time out anyway.
//!
//! **Fixed** (`max`): at most `max` requests in flight.
//!
//! **Adaptive** (`min`, `max`): the limit follows latency, after Netflix
//! concurrency-limits' *Gradient2*. Gradient2 was chosen over AIMD because it reacts
//! to latency (the first sign of queueing upstream) rather than to errors (the last),
//! and its decrease is proportional to how much latency grew, not a fixed cut.
//! Latencies are averaged over sample windows (at least [`WINDOW_MIN_SAMPLES`] samples
//! and [`WINDOW_MIN_TIME`]); per window:
//! - `long` — the observed no-load latency: an exponential average of window means
//!   over about [`LONG_WINDOWS`] windows, snapped down quickly when latency falls
//!   well below it (recovery after a prolonged overload);
//! - `gradient = clamp(TOLERANCE * long / short, 0.5, 1.0)`, `short` the window mean:
//!   1 while latency is within [`TOLERANCE`] of normal, down to 0.5 as it grows;
//! - `new = limit * gradient + sqrt(limit)` (the square root is headroom that lets the
//!   limit probe upward), smoothed: `limit += (new - limit) * SMOOTHING`.
//!
//! The limit only grows while traffic actually uses it (in-flight at least half the
//! limit), so an idle route does not inflate it. Failed calls count toward the window
//! mean (a timeout is the slowest call there is) but never toward `long`, so fast
//! errors cannot fake a low no-load latency; errors themselves are the breaker's job.
//! Like Gradient2, `long` drifts up under a sustained latency rise, so a permanently
//! slower upstream is accepted as the new normal after a few dozen windows.
//! The limit starts at `min` (the safe end) and never leaves `[min, max]`.
//!
//! **Priority shedding**: a request in a `shedFirst` class is admitted only while
//! in-flight is below [`SHED_FIRST_FRACTION`] of the limit, so under overload those
//! requests are shed first and the last quarter of the capacity is kept for the
//! rest. The reserve is rounded down, never to zero requests: at a limit of 1 there is
//! no room for a reserve, and starving a class outright is worse than not having one.
//!
//! `try_acquire` is lock-free (one CAS loop on the in-flight count). `release` takes a
//! small mutex only when the limit is adaptive.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The share of the limit that `shedFirst` requests may use.
pub const SHED_FIRST_FRACTION: f64 = 0.75;
/// A sample window closes once it has this many samples...
pub const WINDOW_MIN_SAMPLES: u32 = 10;
/// ...and has lasted this long, so a busy route does not re-tune every millisecond.
pub const WINDOW_MIN_TIME: Duration = Duration::from_millis(100);
/// How much slower than normal a window may be before the limit falls (Gradient2's
/// default `rttTolerance`).
pub const TOLERANCE: f64 = 1.5;
/// The no-load latency averages over about this many windows.
pub const LONG_WINDOWS: f64 = 100.0;
/// How far each window moves the limit towards its new estimate.
pub const SMOOTHING: f64 = 0.2;

/// Whether the caller should shed a request; for metric labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    No,
    Yes,
}

#[derive(Debug)]
struct Adaptive {
    min: u32,
    max: u32,
    /// The unrounded limit; `ConcurrencyLimiter::limit` is its floor.
    estimate: f64,
    /// The no-load latency in seconds; `None` until the first window closes.
    long: Option<f64>,
    window_start: Instant,
    samples: u32,
    /// Every call, failed ones included: a timeout is the slowest call there is.
    latency_sum: f64,
    /// Successful calls only, for `long`: fast errors must not fake a fast upstream.
    successes: u32,
    success_latency_sum: f64,
    /// The most requests in flight seen during the window, to tell whether
    /// traffic is using the limit.
    peak_inflight: u32,
}

/// One route's limiter. Reused across reloads while its rule is unchanged, so a
/// reload keeps both the in-flight count and the learned limit.
#[derive(Debug)]
pub struct ConcurrencyLimiter {
    rule: sluice_policy::Concurrency,
    inflight: AtomicU32,
    limit: AtomicU32,
    adaptive: Option<Mutex<Adaptive>>,
}

impl ConcurrencyLimiter {
    pub fn new(rule: &sluice_policy::Concurrency, now: Instant) -> Self {
        let (limit, adaptive) = match *rule {
            sluice_policy::Concurrency::Fixed { max } => (max, None),
            sluice_policy::Concurrency::Adaptive { min, max } => (
                min,
                Some(Mutex::new(Adaptive {
                    min,
                    max,
                    estimate: f64::from(min),
                    long: None,
                    window_start: now,
                    samples: 0,
                    latency_sum: 0.0,
                    successes: 0,
                    success_latency_sum: 0.0,
                    peak_inflight: 0,
                })),
            ),
        };
        ConcurrencyLimiter {
            rule: rule.clone(),
            inflight: AtomicU32::new(0),
            limit: AtomicU32::new(limit),
            adaptive,
        }
    }

    /// The rule this limiter enforces, to decide whether a reload can keep it.
    pub fn rule(&self) -> &sluice_policy::Concurrency {
        &self.rule
    }

    /// Takes an in-flight slot, or returns false if the request must be shed now.
    /// `shed_first`: the request is in a class listed in the route's
    /// `priority.shedFirst`.
    pub fn try_acquire(&self, shed_first: bool) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let cap = if shed_first {
            shed_first_cap(limit)
        } else {
            limit
        };
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// [`try_acquire`](Self::try_acquire) as a [`Shed`] decision.
    pub fn decide(&self, shed_first: bool) -> Shed {
        if self.try_acquire(shed_first) {
            Shed::No
        } else {
            Shed::Yes
        }
    }

    /// Gives back the slot of a request that ended; `latency` and `failed` tune the
    /// adaptive limit. Every successful `try_acquire` is followed by exactly one
    /// `release`.
    pub fn release(&self, now: Instant, latency: Duration, failed: bool) {
        // Read before the decrement: the request being released was in flight.
        let inflight = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        let mut a = adaptive.lock().unwrap_or_else(PoisonError::into_inner);
        a.samples = a.samples.saturating_add(1);
        a.latency_sum += latency.as_secs_f64();
        if !failed {
            a.successes = a.successes.saturating_add(1);
            a.success_latency_sum += latency.as_secs_f64();
        }
        a.peak_inflight = a.peak_inflight.max(inflight);
        if a.samples >= WINDOW_MIN_SAMPLES
            && now.saturating_duration_since(a.window_start) >= WINDOW_MIN_TIME
        {
            let limit = a.close_window(now);
            self.limit.store(limit, Ordering::Relaxed);
        }
    }

    /// The current limit (for metrics).
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Requests in flight now (for metrics).
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// The in-flight count below which a `shedFirst` request is still admitted.
fn shed_first_cap(limit: u32) -> u32 {
    // Rounded down, but at least 1 (see the module doc). f64 holds any u32 exactly.
    ((f64::from(limit) * SHED_FIRST_FRACTION) as u32).max(1)
}

impl Adaptive {
    /// Folds the finished window into the estimate, starts a new window, and returns
    /// the new limit.
    fn close_window(&mut self, now: Instant) -> u32 {
        let short = self.latency_sum / f64::from(self.samples);
        if self.successes > 0 {
            let ok_mean = self.success_latency_sum / f64::from(self.successes);
            let mut long = match self.long {
                None => ok_mean,
                Some(long) => long + (ok_mean - long) * 2.0 / (LONG_WINDOWS + 1.0),
            };
            // Latency is back well below the long average after a prolonged
            // overload: catch up faster than the average would.
            if long > 2.0 * ok_mean {
                long *= 0.95;
            }
            self.long = Some(long);
        }

        // Until a call has succeeded there is no no-load latency to compare with.
        if let Some(long) = self.long.filter(|l| *l > 0.0) {
            let gradient = if short > 0.0 {
                (TOLERANCE * long / short).clamp(0.5, 1.0)
            } else {
                1.0
            };
            let target = self.estimate * gradient + self.estimate.sqrt();
            let mut next = self.estimate + (target - self.estimate) * SMOOTHING;
            // Growth needs evidence that the limit is the constraint: an idle route
            // would otherwise drift up to `max` and protect nothing when load arrives.
            let app_limited = f64::from(self.peak_inflight) < self.estimate / 2.0;
            if app_limited && next > self.estimate {
                next = self.estimate;
            }
            self.estimate = next.clamp(f64::from(self.min), f64::from(self.max));
        }

        self.window_start = now;
        self.samples = 0;
        self.latency_sum = 0.0;
        self.successes = 0;
        self.success_latency_sum = 0.0;
        self.peak_inflight = 0;
        // Within [min, max] of u32 by the clamp above.
        self.estimate as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sluice_policy::Concurrency;
    use std::sync::atomic::AtomicBool;

    const MS: Duration = Duration::from_millis(1);

    /// Saturates the limiter, then releases everything at `now` with `latency`.
    /// Returns how many requests got in.
    fn saturate(l: &ConcurrencyLimiter, now: Instant, latency: Duration) -> u32 {
        let mut held = 0;
        while l.try_acquire(false) {
            held += 1;
        }
        for _ in 0..held {
            l.release(now, latency, false);
        }
        held
    }

    /// One full sample window of saturating traffic at `latency`.
    fn window(l: &ConcurrencyLimiter, now: &mut Instant, latency: Duration) {
        *now += WINDOW_MIN_TIME;
        let mut samples = 0;
        while samples < WINDOW_MIN_SAMPLES {
            samples += saturate(l, *now, latency);
        }
    }

    #[test]
    fn fixed_limit_is_exact_under_concurrent_threads() {
        let l = ConcurrencyLimiter::new(&Concurrency::Fixed { max: 3 }, Instant::now());
        let inside = AtomicU32::new(0);
        let over = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..8 {
                let (l, inside, over) = (&l, &inside, &over);
                s.spawn(move || {
                    for i in 0..20_000 {
                        if l.try_acquire(false) {
                            if inside.fetch_add(1, Ordering::SeqCst) >= 3 {
                                over.store(true, Ordering::SeqCst);
                            }
                            if (i + t) % 7 == 0 {
                                std::thread::yield_now();
                            }
                            inside.fetch_sub(1, Ordering::SeqCst);
                            l.release(Instant::now(), MS, false);
                        }
                    }
                });
            }
        });
        assert!(!over.load(Ordering::SeqCst));
        assert_eq!(l.inflight(), 0);
    }

    #[test]
    fn fixed_limit_sheds_the_request_over_max() {
        let l = ConcurrencyLimiter::new(&Concurrency::Fixed { max: 2 }, Instant::now());
        assert!(l.try_acquire(false));
        assert!(l.try_acquire(false));
        assert_eq!(l.decide(false), Shed::Yes);
        l.release(Instant::now(), MS, false);
        assert_eq!(l.decide(false), Shed::No);
        assert_eq!((l.limit(), l.inflight()), (2, 2));
    }

    #[test]
    fn sheds_shed_first_requests_at_the_reserve_while_others_are_admitted() {
        let l = ConcurrencyLimiter::new(&Concurrency::Fixed { max: 8 }, Instant::now());
        for _ in 0..6 {
            assert!(l.try_acquire(true));
        }
        // 75% of 8 is 6: the last two slots are for everyone else.
        assert!(!l.try_acquire(true));
        assert!(l.try_acquire(false));
        assert!(l.try_acquire(false));
        assert!(!l.try_acquire(false));
    }

    #[test]
    fn a_limit_of_one_does_not_starve_shed_first_requests() {
        let l = ConcurrencyLimiter::new(&Concurrency::Fixed { max: 1 }, Instant::now());
        assert!(l.try_acquire(true));
        assert!(!l.try_acquire(false));
    }

    #[test]
    fn a_release_without_acquire_does_not_underflow() {
        let l = ConcurrencyLimiter::new(&Concurrency::Fixed { max: 1 }, Instant::now());
        l.release(Instant::now(), MS, false);
        assert_eq!(l.inflight(), 0);
        assert!(l.try_acquire(false));
        assert!(!l.try_acquire(false));
    }

    #[test]
    fn adaptive_limit_starts_at_min() {
        let l = ConcurrencyLimiter::new(&Concurrency::Adaptive { min: 5, max: 50 }, Instant::now());
        assert_eq!(l.limit(), 5);
    }

    #[test]
    fn adaptive_limit_falls_when_latency_rises_and_recovers_after() {
        let mut now = Instant::now();
        let l = ConcurrencyLimiter::new(&Concurrency::Adaptive { min: 5, max: 100 }, now);
        for _ in 0..200 {
            window(&l, &mut now, 10 * MS);
        }
        assert_eq!(l.limit(), 100, "grows to max while latency is normal");

        for _ in 0..30 {
            window(&l, &mut now, 50 * MS);
        }
        let overloaded = l.limit();
        assert!(overloaded < 30, "falls under 5x latency, got {overloaded}");

        for _ in 0..200 {
            window(&l, &mut now, 10 * MS);
        }
        assert_eq!(l.limit(), 100, "recovers once latency is normal again");
    }

    #[test]
    fn adaptive_limit_does_not_grow_on_an_idle_route() {
        let mut now = Instant::now();
        let l = ConcurrencyLimiter::new(&Concurrency::Adaptive { min: 10, max: 100 }, now);
        for _ in 0..1000 {
            now += 20 * MS;
            // One request at a time: never near the limit.
            assert!(l.try_acquire(false));
            l.release(now, MS, false);
        }
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn fast_failures_do_not_lower_the_no_load_latency() {
        let mut now = Instant::now();
        let l = ConcurrencyLimiter::new(&Concurrency::Adaptive { min: 5, max: 100 }, now);
        for _ in 0..100 {
            window(&l, &mut now, 10 * MS);
        }
        let before = l.limit();
        // A burst of instant errors, then normal latency again.
        for _ in 0..50 {
            now += WINDOW_MIN_TIME;
            for _ in 0..WINDOW_MIN_SAMPLES {
                assert!(l.try_acquire(false));
                l.release(now, Duration::ZERO, true);
            }
        }
        window(&l, &mut now, 10 * MS);
        assert!(l.limit() >= before, "{} < {before}", l.limit());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire { shed_first: bool },
        Release { latency_ms: u64, failed: bool },
        Advance { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<bool>().prop_map(|shed_first| Op::Acquire { shed_first }),
            4 => (0u64..2_000, any::<bool>())
                .prop_map(|(latency_ms, failed)| Op::Release { latency_ms, failed }),
            1 => (0u64..500).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    proptest! {
        #[test]
        fn adaptive_limit_stays_within_min_and_max(
            min in 1u32..40,
            extra in 0u32..200,
            ops in proptest::collection::vec(op(), 1..2_000),
        ) {
            let max = min + extra;
            let mut now = Instant::now();
            let l = ConcurrencyLimiter::new(&Concurrency::Adaptive { min, max }, now);
            let mut held = 0u32;
            for op in ops {
                match op {
                    Op::Acquire { shed_first } => held += u32::from(l.try_acquire(shed_first)),
                    Op::Release { latency_ms, failed } if held > 0 => {
                        held -= 1;
                        l.release(now, Duration::from_millis(latency_ms), failed);
                    }
                    Op::Release { .. } => {}
                    Op::Advance { ms } => now += Duration::from_millis(ms),
                }
                prop_assert!((min..=max).contains(&l.limit()), "{} not in [{min}, {max}]", l.limit());
                prop_assert_eq!(l.inflight(), held);
                prop_assert!(held <= max);
            }
        }

        #[test]
        fn fixed_limit_never_admits_more_than_max(
            max in 1u32..20,
            ops in proptest::collection::vec(op(), 1..500),
        ) {
            let now = Instant::now();
            let l = ConcurrencyLimiter::new(&Concurrency::Fixed { max }, now);
            let mut held = 0u32;
            for op in ops {
                match op {
                    Op::Acquire { shed_first } => {
                        let cap = if shed_first { shed_first_cap(max) } else { max };
                        prop_assert_eq!(l.try_acquire(shed_first), held < cap);
                        held = l.inflight();
                    }
                    Op::Release { .. } if held > 0 => {
                        held -= 1;
                        l.release(now, MS, false);
                    }
                    Op::Release { .. } | Op::Advance { .. } => {}
                }
                prop_assert!(l.inflight() <= max);
                prop_assert_eq!(l.limit(), max);
            }
        }
    }
}
