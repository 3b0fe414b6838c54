//! A circuit breaker for one route: stop sending traffic to an upstream that is
//! failing, give it `openFor` to recover, then let a few probes find out whether it
//! has.
//!
//! States are the standard three. **Closed** admits everything and watches outcomes;
//! it trips to **Open** on `consecutiveFailures` failures in a row, or when, over the
//! sliding `window` and once at least `minRequests` outcomes were seen in it, the
//! failure ratio reaches `errorRatio` or the ratio of calls slower than
//! `slowCall.threshold` reaches `slowCall.ratio`. **Open** rejects until `openFor`
//! has elapsed; the next [`CircuitBreaker::admit`] then moves to **HalfOpen**, which
//! admits exactly `halfOpenRequests` probes. All probes succeeding closes the breaker
//! with a fresh window; any probe failing (or being slower than the slow-call
//! threshold) opens it again for another `openFor`.
//!
//! Invariants:
//! - Probes outstanding plus probes succeeded in the current half-open period never
//!   exceed `halfOpenRequests`. Probes still in flight when a half-open period ends
//!   keep their slot in the next period: they are real requests against a struggling
//!   upstream, and the [`Admission`] carries no period to tell them apart anyway.
//!   [`CircuitBreaker::cancel`] gives a slot back.
//! - Only probes decide a half-open period. Outcomes of requests admitted while
//!   Closed ([`Admission::Allowed`]) that arrive after the trip are ignored, so the
//!   tail of pre-trip traffic can neither close nor re-open the breaker.
//! - Memory is constant: the window is [`BUCKETS`] time buckets, each
//!   `window / BUCKETS` wide, so it slides in steps of a tenth of the window.
//! - A ratio trigger needs at least one failing (or slow) call, so `errorRatio: 0`
//!   means "any failure once `minRequests` is reached", never "trip on a healthy
//!   window".
//!
//! The caller must end every `Allowed` or `Probe` admission with exactly one
//! [`CircuitBreaker::record`] or [`CircuitBreaker::cancel`]; a probe that is never
//! ended holds its slot for good (use a drop guard on the request path).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Time buckets per window: a tenth-of-a-window resolution is plenty for a breaker,
/// and keeps memory fixed whatever the traffic.
pub const BUCKETS: usize = 10;

/// Where the breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The metric label / log value.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of a state gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    fn from_u8(v: u8) -> BreakerState {
        match v {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }
}

/// A state change, returned so the caller can count it and log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

/// The breaker's answer for one request; hand it back to `record` or `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send it.
    Allowed,
    /// HalfOpen: send it as one of the probes that decide whether to close.
    Probe,
    /// Open, or HalfOpen with every probe slot taken: do not send it.
    Rejected,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which `width`-sized slice of time since `origin` this bucket counts.
    index: u64,
    total: u32,
    failures: u32,
    slow: u32,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// When the breaker last opened; meaningful while Open.
    opened_at: Instant,
    consecutive: u32,
    buckets: [Bucket; BUCKETS],
    /// Probes admitted and not yet recorded or cancelled, from any period.
    probes_in_flight: u32,
    /// Probes that succeeded in the current half-open period.
    probes_succeeded: u32,
}

/// One route's breaker. Built from its rule and reused across reloads while the rule
/// is unchanged, so a reload neither resets an open breaker nor forgets the window.
#[derive(Debug)]
pub struct CircuitBreaker {
    rule: sluice_policy::CircuitBreaker,
    origin: Instant,
    /// `window / BUCKETS` in nanoseconds, at least 1.
    width_nanos: u128,
    /// Mirrors `inner.state` so the Closed fast path of `admit` takes no lock.
    state: AtomicU8,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(rule: &sluice_policy::CircuitBreaker, now: Instant) -> Self {
        let width_nanos = (rule.window.as_nanos() / BUCKETS as u128).max(1);
        CircuitBreaker {
            rule: rule.clone(),
            origin: now,
            width_nanos,
            state: AtomicU8::new(BreakerState::Closed as u8),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                opened_at: now,
                consecutive: 0,
                buckets: [Bucket::default(); BUCKETS],
                probes_in_flight: 0,
                probes_succeeded: 0,
            }),
        }
    }

    /// The rule this breaker enforces, to decide whether a reload can keep it.
    pub fn rule(&self) -> &sluice_policy::CircuitBreaker {
        &self.rule
    }

    /// Asks whether a request may go upstream. Moves Open to HalfOpen once `openFor`
    /// has elapsed, and reports that transition.
    pub fn admit(&self, now: Instant) -> (Admission, Option<Transition>) {
        if self.state() == BreakerState::Closed {
            return (Admission::Allowed, None);
        }
        let mut inner = self.lock();
        let mut transition = None;
        match inner.state {
            // Closed again between the atomic read and the lock.
            BreakerState::Closed => return (Admission::Allowed, None),
            BreakerState::Open => {
                if now.saturating_duration_since(inner.opened_at) < self.rule.open_for {
                    return (Admission::Rejected, None);
                }
                inner.probes_succeeded = 0;
                transition = self.set_state(&mut inner, BreakerState::HalfOpen);
            }
            BreakerState::HalfOpen => {}
        }
        if inner.probes_in_flight + inner.probes_succeeded < self.rule.half_open_requests {
            inner.probes_in_flight += 1;
            (Admission::Probe, transition)
        } else {
            (Admission::Rejected, transition)
        }
    }

    /// Records how an admitted request ended. `failed` is the caller's verdict
    /// (connect error, 5xx, timeout); `latency` feeds the slow-call trigger.
    pub fn record(
        &self,
        now: Instant,
        admission: Admission,
        failed: bool,
        latency: Duration,
    ) -> Option<Transition> {
        match admission {
            Admission::Rejected => None,
            Admission::Allowed => {
                // Pre-trip traffic finishing after the trip has no say (see the
                // module doc); skip the lock for it.
                if self.state() != BreakerState::Closed {
                    return None;
                }
                let mut inner = self.lock();
                self.record_closed(&mut inner, now, failed, latency)
            }
            Admission::Probe => {
                let mut inner = self.lock();
                if inner.probes_in_flight == 0 {
                    // Not a probe we handed out: a caller bug, and no evidence.
                    return None;
                }
                inner.probes_in_flight -= 1;
                match inner.state {
                    BreakerState::HalfOpen => {
                        if failed || self.is_slow(latency) {
                            inner.opened_at = now;
                            self.set_state(&mut inner, BreakerState::Open)
                        } else {
                            inner.probes_succeeded += 1;
                            if inner.probes_succeeded >= self.rule.half_open_requests {
                                Self::reset_window(&mut inner);
                                self.set_state(&mut inner, BreakerState::Closed)
                            } else {
                                None
                            }
                        }
                    }
                    // A probe from an earlier half-open period ending while Open:
                    // it only frees its slot, the period it belonged to is decided.
                    BreakerState::Open | BreakerState::Closed => None,
                }
            }
        }
    }

    /// An admitted request ended without an outcome (the client went away): a probe
    /// gives its slot back so another request can probe.
    pub fn cancel(&self, admission: Admission) {
        if admission == Admission::Probe {
            let mut inner = self.lock();
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Time left until an Open breaker lets a probe through; zero in other states.
    pub fn retry_in(&self, now: Instant) -> Duration {
        let inner = self.lock();
        match inner.state {
            BreakerState::Open => {
                (inner.opened_at + self.rule.open_for).saturating_duration_since(now)
            }
            BreakerState::Closed | BreakerState::HalfOpen => Duration::ZERO,
        }
    }

    fn record_closed(
        &self,
        inner: &mut Inner,
        now: Instant,
        failed: bool,
        latency: Duration,
    ) -> Option<Transition> {
        if inner.state != BreakerState::Closed {
            return None;
        }
        let slow = self.is_slow(latency);
        let current = self.bucket_index(now);
        let bucket = &mut inner.buckets[(current % BUCKETS as u64) as usize];
        if bucket.index != current {
            *bucket = Bucket {
                index: current,
                ..Bucket::default()
            };
        }
        bucket.total = bucket.total.saturating_add(1);
        bucket.failures = bucket.failures.saturating_add(u32::from(failed));
        bucket.slow = bucket.slow.saturating_add(u32::from(slow));
        inner.consecutive = if failed {
            inner.consecutive.saturating_add(1)
        } else {
            0
        };

        if self.should_trip(inner, current) {
            inner.opened_at = now;
            Self::reset_window(inner);
            self.set_state(inner, BreakerState::Open)
        } else {
            None
        }
    }

    fn should_trip(&self, inner: &Inner, current: u64) -> bool {
        if let Some(n) = self.rule.consecutive_failures {
            if inner.consecutive >= n {
                return true;
            }
        }
        let (mut total, mut failures, mut slow) = (0u64, 0u64, 0u64);
        // A bucket is in the window if it counts one of the last BUCKETS slices;
        // anything older is stale, whatever its slot still holds.
        let live = |b: &&Bucket| b.index <= current && current - b.index < BUCKETS as u64;
        for b in inner.buckets.iter().filter(live) {
            total += u64::from(b.total);
            failures += u64::from(b.failures);
            slow += u64::from(b.slow);
        }
        if total == 0 || total < u64::from(self.rule.min_requests) {
            return false;
        }
        let ratio_reached =
            |count: u64, ratio: f64| count > 0 && count as f64 / total as f64 >= ratio;
        self.rule
            .error_ratio
            .is_some_and(|r| ratio_reached(failures, r))
            || self
                .rule
                .slow_call
                .as_ref()
                .is_some_and(|s| ratio_reached(slow, s.ratio))
    }

    fn is_slow(&self, latency: Duration) -> bool {
        self.rule
            .slow_call
            .as_ref()
            .is_some_and(|s| latency > s.threshold)
    }

    fn bucket_index(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        // u64 of window tenths outlasts any process; saturate rather than wrap.
        u64::try_from(elapsed / self.width_nanos).unwrap_or(u64::MAX)
    }

    fn reset_window(inner: &mut Inner) {
        inner.consecutive = 0;
        inner.buckets = [Bucket::default(); BUCKETS];
    }

    fn set_state(&self, inner: &mut Inner, to: BreakerState) -> Option<Transition> {
        let from = inner.state;
        inner.state = to;
        self.state.store(to as u8, Ordering::Release);
        (from != to).then_some(Transition { from, to })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No method panics while holding the lock, so a poisoned state is still
        // consistent; keep serving rather than take the route down.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sluice_policy::SlowCall;

    const MS: Duration = Duration::from_millis(1);

    fn rule() -> sluice_policy::CircuitBreaker {
        sluice_policy::CircuitBreaker {
            consecutive_failures: None,
            error_ratio: None,
            slow_call: None,
            window: Duration::from_secs(10),
            min_requests: 10,
            open_for: Duration::from_secs(30),
            half_open_requests: 1,
        }
    }

    fn consecutive(n: u32) -> sluice_policy::CircuitBreaker {
        sluice_policy::CircuitBreaker {
            consecutive_failures: Some(n),
            ..rule()
        }
    }

    /// Admits and records one request; returns the transition it caused, if any.
    fn call(b: &CircuitBreaker, now: Instant, failed: bool) -> Option<Transition> {
        let (admission, _) = b.admit(now);
        assert_eq!(admission, Admission::Allowed);
        b.record(now, admission, failed, MS)
    }

    /// Trips a `consecutive(1)`-style breaker and waits out `openFor`.
    fn open_and_wait(b: &CircuitBreaker, t0: Instant) -> Instant {
        assert!(call(b, t0, true).is_some());
        assert_eq!(b.state(), BreakerState::Open);
        t0 + b.rule().open_for
    }

    const TO_OPEN: Option<Transition> = Some(Transition {
        from: BreakerState::Closed,
        to: BreakerState::Open,
    });

    #[test]
    fn opens_after_five_consecutive_failures() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(&consecutive(5), t0);
        for _ in 0..4 {
            assert_eq!(call(&b, t0, true), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(call(&b, t0, true), TO_OPEN);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(&consecutive(3), t0);
        for _ in 0..5 {
            call(&b, t0, true);
            call(&b, t0, true);
            call(&b, t0, false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn opens_on_error_ratio_only_once_min_requests_were_seen() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                error_ratio: Some(0.5),
                ..rule()
            },
            t0,
        );
        // 9 failures of 9: ratio 100%, but below minRequests (10).
        for _ in 0..9 {
            assert_eq!(call(&b, t0, true), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(call(&b, t0, false), TO_OPEN);
    }

    #[test]
    fn stays_closed_while_error_ratio_is_below_the_threshold() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                error_ratio: Some(0.5),
                ..rule()
            },
            t0,
        );
        for i in 0..100 {
            // 1 failure in 3: 33%.
            call(&b, t0 + i * MS, i % 3 == 0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn error_ratio_zero_never_trips_a_healthy_window() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                error_ratio: Some(0.0),
                ..rule()
            },
            t0,
        );
        for _ in 0..50 {
            call(&b, t0, false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(call(&b, t0, true), TO_OPEN);
    }

    #[test]
    fn opens_on_slow_call_ratio() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                slow_call: Some(SlowCall {
                    threshold: Duration::from_millis(100),
                    ratio: 0.5,
                }),
                ..rule()
            },
            t0,
        );
        for i in 0..9 {
            // Exactly at the threshold is not slower than it.
            let latency = if i % 2 == 0 { 101 * MS } else { 100 * MS };
            let (a, _) = b.admit(t0);
            assert_eq!(b.record(t0, a, false, latency), None);
        }
        // 5 slow of 10.
        let (a, _) = b.admit(t0);
        assert_eq!(b.record(t0, a, false, 500 * MS), TO_OPEN);
    }

    #[test]
    fn sliding_window_forgets_old_failures() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                error_ratio: Some(0.5),
                ..rule()
            },
            t0,
        );
        for _ in 0..9 {
            call(&b, t0, true);
        }
        // A whole window later those 9 failures are gone: 9 successes and one
        // failure is 10%, not 55%.
        let later = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            call(&b, later, false);
        }
        assert_eq!(call(&b, later, true), None);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn open_rejects_until_open_for_has_elapsed() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(&consecutive(1), t0);
        call(&b, t0, true);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), (Admission::Rejected, None));
        assert_eq!(b.retry_in(t1), Duration::from_secs(20));
        let t2 = t0 + Duration::from_secs(30) - MS;
        assert_eq!(b.admit(t2), (Admission::Rejected, None));
        assert_eq!(b.state(), BreakerState::Open);
        let t3 = t0 + Duration::from_secs(30);
        assert_eq!(
            b.admit(t3),
            (
                Admission::Probe,
                Some(Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen
                })
            )
        );
        assert_eq!(b.retry_in(t3), Duration::ZERO);
    }

    #[test]
    fn half_open_admits_exactly_the_configured_probes() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                half_open_requests: 3,
                ..consecutive(1)
            },
            t0,
        );
        let t1 = open_and_wait(&b, t0);
        let answers: Vec<Admission> = (0..10).map(|_| b.admit(t1).0).collect();
        assert_eq!(&answers[..3], &[Admission::Probe; 3]);
        assert_eq!(&answers[3..], &[Admission::Rejected; 7]);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn closes_with_a_fresh_window_when_all_probes_succeed() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                half_open_requests: 2,
                ..consecutive(2)
            },
            t0,
        );
        call(&b, t0, true);
        assert!(call(&b, t0, true).is_some());
        let t1 = t0 + b.rule().open_for;
        let (p1, _) = b.admit(t1);
        let (p2, _) = b.admit(t1);
        assert_eq!(b.record(t1, p1, false, MS), None);
        assert_eq!(
            b.record(t1, p2, false, MS),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        assert_eq!(b.admit(t1), (Admission::Allowed, None));
        // The failures before the trip are forgotten: one more does not re-open.
        assert_eq!(call(&b, t1, true), None);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn one_probe_failure_reopens_for_open_for() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                half_open_requests: 2,
                ..consecutive(1)
            },
            t0,
        );
        let t1 = open_and_wait(&b, t0);
        let (p1, _) = b.admit(t1);
        let (p2, _) = b.admit(t1);
        assert_eq!(b.record(t1, p1, false, MS), None);
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            b.record(t2, p2, true, MS),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Open
            })
        );
        assert_eq!(b.retry_in(t2), Duration::from_secs(30));
        assert_eq!(b.admit(t2 + Duration::from_secs(29)).0, Admission::Rejected);
    }

    #[test]
    fn a_slow_probe_counts_as_a_failure() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                slow_call: Some(SlowCall {
                    threshold: Duration::from_millis(100),
                    ratio: 1.0,
                }),
                ..consecutive(1)
            },
            t0,
        );
        let t1 = open_and_wait(&b, t0);
        let (p, _) = b.admit(t1);
        b.record(t1, p, false, Duration::from_secs(1));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn cancel_frees_a_probe_slot() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(&consecutive(1), t0);
        let t1 = open_and_wait(&b, t0);
        let (p, _) = b.admit(t1);
        assert_eq!(p, Admission::Probe);
        assert_eq!(b.admit(t1).0, Admission::Rejected);
        b.cancel(p);
        assert_eq!(b.admit(t1).0, Admission::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn late_outcomes_of_requests_admitted_before_the_trip_are_ignored() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(&consecutive(1), t0);
        let (early, _) = b.admit(t0);
        let (also_early, _) = b.admit(t0);
        call(&b, t0, true);
        // Successes cannot close an open breaker...
        assert_eq!(b.record(t0, early, false, MS), None);
        assert_eq!(b.state(), BreakerState::Open);
        // ...nor a half-open one, nor use up its probe.
        let t1 = t0 + b.rule().open_for;
        let (probe, _) = b.admit(t1);
        assert_eq!(b.record(t1, also_early, true, MS), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(
            b.record(t1, probe, false, MS).map(|t| t.to),
            Some(BreakerState::Closed)
        );
    }

    #[test]
    fn a_probe_outlasting_its_period_keeps_its_slot() {
        let t0 = Instant::now();
        let b = CircuitBreaker::new(
            &sluice_policy::CircuitBreaker {
                half_open_requests: 2,
                ..consecutive(1)
            },
            t0,
        );
        let t1 = open_and_wait(&b, t0);
        let (slow_probe, _) = b.admit(t1);
        let (failing, _) = b.admit(t1);
        b.record(t1, failing, true, MS);
        let t2 = t1 + b.rule().open_for;
        // The slow probe is still out, so the new period has one slot.
        assert_eq!(b.admit(t2).0, Admission::Probe);
        assert_eq!(b.admit(t2).0, Admission::Rejected);
        b.cancel(slow_probe);
        assert_eq!(b.admit(t2).0, Admission::Probe);
    }

    #[test]
    fn states_have_stable_labels_and_gauge_values() {
        let all = [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ];
        let labels: Vec<_> = all.iter().map(|s| s.as_str()).collect();
        let gauges: Vec<_> = all.iter().map(|s| s.gauge()).collect();
        assert_eq!(labels, ["closed", "open", "half_open"]);
        assert_eq!(gauges, [0, 1, 2]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit,
        Record {
            pick: usize,
            failed: bool,
            slow: bool,
        },
        Cancel {
            pick: usize,
        },
        Advance {
            ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Admit),
            3 => (any::<usize>(), any::<bool>(), any::<bool>())
                .prop_map(|(pick, failed, slow)| Op::Record { pick, failed, slow }),
            1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
            2 => (0u64..300).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    proptest! {
        #[test]
        fn never_has_more_probes_out_than_half_open_requests(
            slots in 1u32..4,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let rule = sluice_policy::CircuitBreaker {
                consecutive_failures: Some(3),
                error_ratio: Some(0.5),
                slow_call: Some(SlowCall { threshold: 50 * MS, ratio: 0.5 }),
                window: Duration::from_secs(1),
                min_requests: 4,
                open_for: Duration::from_millis(100),
                half_open_requests: slots,
            };
            let t0 = Instant::now();
            let mut now = t0;
            let b = CircuitBreaker::new(&rule, t0);
            let mut outstanding: Vec<Admission> = Vec::new();
            // Probes handed out in the current half-open period, less cancels in it.
            let mut period_probes: i64 = 0;
            for op in ops {
                let before = b.state();
                let transition = match op {
                    Op::Admit => {
                        let (a, t) = b.admit(now);
                        if t.is_some_and(|t| t.to == BreakerState::HalfOpen) {
                            period_probes = 0;
                        }
                        match a {
                            Admission::Allowed => prop_assert_eq!(b.state(), BreakerState::Closed),
                            Admission::Probe => {
                                prop_assert_eq!(b.state(), BreakerState::HalfOpen);
                                period_probes += 1;
                            }
                            Admission::Rejected => prop_assert_ne!(b.state(), BreakerState::Closed),
                        }
                        if a != Admission::Rejected {
                            outstanding.push(a);
                        }
                        t
                    }
                    Op::Record { pick, failed, slow } if !outstanding.is_empty() => {
                        let a = outstanding.swap_remove(pick % outstanding.len());
                        let latency = if slow { 100 * MS } else { MS };
                        b.record(now, a, failed, latency)
                    }
                    Op::Cancel { pick } if !outstanding.is_empty() => {
                        let a = outstanding.swap_remove(pick % outstanding.len());
                        if a == Admission::Probe && b.state() == BreakerState::HalfOpen {
                            period_probes -= 1;
                        }
                        b.cancel(a);
                        None
                    }
                    Op::Advance { ms } => {
                        now += Duration::from_millis(ms);
                        None
                    }
                    Op::Record { .. } | Op::Cancel { .. } => None,
                };
                if let Some(t) = transition {
                    prop_assert_eq!(t.from, before);
                    prop_assert_eq!(t.to, b.state());
                }
                let probes_out = outstanding.iter().filter(|a| **a == Admission::Probe).count();
                prop_assert!(probes_out <= slots as usize);
                prop_assert!(period_probes <= i64::from(slots));
            }
        }
    }
}
