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
    use BreakerState::{Closed, HalfOpen, Open};

    const MS: Duration = Duration::from_millis(1);

    /// A breaker with only the triggers `tune` sets: window 10 s, minRequests 10,
    /// openFor 30 s, one probe.
    fn breaker(tune: impl FnOnce(&mut sluice_policy::CircuitBreaker)) -> (CircuitBreaker, Instant) {
        let mut rule = sluice_policy::CircuitBreaker {
            consecutive_failures: None,
            error_ratio: None,
            slow_call: None,
            window: Duration::from_secs(10),
            min_requests: 10,
            open_for: Duration::from_secs(30),
            half_open_requests: 1,
        };
        tune(&mut rule);
        let t0 = Instant::now();
        (CircuitBreaker::new(&rule, t0), t0)
    }

    fn slow_call(threshold_ms: u64, ratio: f64) -> Option<SlowCall> {
        let threshold = Duration::from_millis(threshold_ms);
        Some(SlowCall { threshold, ratio })
    }

    fn moved(from: BreakerState, to: BreakerState) -> Option<Transition> {
        Some(Transition { from, to })
    }

    /// Admits and records one request while Closed.
    fn call(
        b: &CircuitBreaker,
        now: Instant,
        failed: bool,
        latency: Duration,
    ) -> Option<Transition> {
        let (admission, _) = b.admit(now);
        assert_eq!(admission, Admission::Allowed);
        b.record(now, admission, failed, latency)
    }

    /// Trips a breaker that opens on one failure; returns when it may probe.
    fn trip(b: &CircuitBreaker, t0: Instant) -> Instant {
        assert_eq!(call(b, t0, true, MS), moved(Closed, Open));
        t0 + b.rule().open_for
    }

    #[test]
    fn opens_after_five_consecutive_failures() {
        let (b, t0) = breaker(|r| r.consecutive_failures = Some(5));
        for _ in 0..4 {
            assert_eq!(call(&b, t0, true, MS), None);
        }
        assert_eq!(call(&b, t0, true, MS), moved(Closed, Open));
        assert_eq!(b.state(), Open);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let (b, t0) = breaker(|r| r.consecutive_failures = Some(3));
        for i in 0..30 {
            call(&b, t0, i % 3 != 2, MS);
        }
        assert_eq!(b.state(), Closed);
    }

    #[test]
    fn opens_on_error_ratio_only_once_min_requests_were_seen() {
        let (b, t0) = breaker(|r| r.error_ratio = Some(0.5));
        // 9 failures of 9 is 100%, but below minRequests (10).
        for _ in 0..9 {
            assert_eq!(call(&b, t0, true, MS), None);
        }
        assert_eq!(call(&b, t0, false, MS), moved(Closed, Open));
    }

    #[test]
    fn error_ratio_zero_never_trips_a_healthy_window() {
        let (b, t0) = breaker(|r| r.error_ratio = Some(0.0));
        for _ in 0..50 {
            call(&b, t0, false, MS);
        }
        assert_eq!(b.state(), Closed);
        assert_eq!(call(&b, t0, true, MS), moved(Closed, Open));
    }

    #[test]
    fn opens_on_slow_call_ratio() {
        let (b, t0) = breaker(|r| r.slow_call = slow_call(100, 0.5));
        for i in 0..9 {
            // Exactly at the threshold is not slower than it.
            let latency = if i % 2 == 0 { 101 * MS } else { 100 * MS };
            assert_eq!(call(&b, t0, false, latency), None);
        }
        // 5 slow calls of 10.
        assert_eq!(call(&b, t0, false, 500 * MS), moved(Closed, Open));
    }

    #[test]
    fn sliding_window_forgets_old_failures() {
        let (b, t0) = breaker(|r| r.error_ratio = Some(0.5));
        for _ in 0..9 {
            call(&b, t0, true, MS);
        }
        // A window later those failures are gone: 1 failure in 10, not 10 in 19.
        let later = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            call(&b, later, false, MS);
        }
        assert_eq!(call(&b, later, true, MS), None);
        assert_eq!(b.state(), Closed);
    }

    #[test]
    fn open_rejects_until_open_for_has_elapsed() {
        let (b, t0) = breaker(|r| r.consecutive_failures = Some(1));
        let t3 = trip(&b, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), (Admission::Rejected, None));
        assert_eq!(b.retry_in(t1), Duration::from_secs(20));
        assert_eq!(b.admit(t3 - MS), (Admission::Rejected, None));
        assert_eq!(b.admit(t3), (Admission::Probe, moved(Open, HalfOpen)));
        assert_eq!(b.retry_in(t3), Duration::ZERO);
    }

    #[test]
    fn half_open_admits_exactly_the_configured_probes() {
        let (b, t0) = breaker(|r| {
            r.consecutive_failures = Some(1);
            r.half_open_requests = 3;
        });
        let t1 = trip(&b, t0);
        let answers: Vec<Admission> = (0..10).map(|_| b.admit(t1).0).collect();
        assert_eq!(&answers[..3], &[Admission::Probe; 3]);
        assert_eq!(&answers[3..], &[Admission::Rejected; 7]);
        assert_eq!(b.state(), HalfOpen);
    }

    #[test]
    fn closes_with_a_fresh_window_when_all_probes_succeed() {
        let (b, t0) = breaker(|r| {
            r.consecutive_failures = Some(2);
            r.half_open_requests = 2;
        });
        call(&b, t0, true, MS);
        let t1 = trip(&b, t0);
        let (p1, _) = b.admit(t1);
        let (p2, _) = b.admit(t1);
        assert_eq!(b.record(t1, p1, false, MS), None);
        assert_eq!(b.record(t1, p2, false, MS), moved(HalfOpen, Closed));
        // The failures before the trip are forgotten: one more does not re-open.
        assert_eq!(call(&b, t1, true, MS), None);
        assert_eq!(b.state(), Closed);
    }

    #[test]
    fn one_probe_failure_reopens_for_open_for() {
        let (b, t0) = breaker(|r| {
            r.consecutive_failures = Some(1);
            r.half_open_requests = 2;
        });
        let t1 = trip(&b, t0);
        let (p1, _) = b.admit(t1);
        let (p2, _) = b.admit(t1);
        assert_eq!(b.record(t1, p1, false, MS), None);
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(b.record(t2, p2, true, MS), moved(HalfOpen, Open));
        assert_eq!(b.retry_in(t2), Duration::from_secs(30));
        assert_eq!(b.admit(t2 + Duration::from_secs(29)).0, Admission::Rejected);
    }

    #[test]
    fn a_slow_probe_counts_as_a_failure() {
        let (b, t0) = breaker(|r| {
            r.consecutive_failures = Some(1);
            r.slow_call = slow_call(100, 1.0);
        });
        let t1 = trip(&b, t0);
        let (p, _) = b.admit(t1);
        assert_eq!(b.record(t1, p, false, 101 * MS), moved(HalfOpen, Open));
    }

    #[test]
    fn cancel_frees_a_probe_slot() {
        let (b, t0) = breaker(|r| r.consecutive_failures = Some(1));
        let t1 = trip(&b, t0);
        let (p, _) = b.admit(t1);
        assert_eq!(p, Admission::Probe);
        assert_eq!(b.admit(t1).0, Admission::Rejected);
        b.cancel(p);
        assert_eq!(b.admit(t1).0, Admission::Probe);
        assert_eq!(b.state(), HalfOpen);
    }

    #[test]
    fn late_outcomes_of_requests_admitted_before_the_trip_are_ignored() {
        let (b, t0) = breaker(|r| r.consecutive_failures = Some(1));
        let (early, _) = b.admit(t0);
        let (also_early, _) = b.admit(t0);
        let t1 = trip(&b, t0);
        // A success cannot close an open breaker...
        assert_eq!(b.record(t0, early, false, MS), None);
        assert_eq!(b.state(), Open);
        // ...nor can a failure re-open a half-open one or use up its probe.
        let (probe, _) = b.admit(t1);
        assert_eq!(b.record(t1, also_early, true, MS), None);
        assert_eq!(b.record(t1, probe, false, MS), moved(HalfOpen, Closed));
    }

    #[test]
    fn a_probe_outlasting_its_period_keeps_its_slot() {
        let (b, t0) = breaker(|r| {
            r.consecutive_failures = Some(1);
            r.half_open_requests = 2;
        });
        let t1 = trip(&b, t0);
        let (slow_probe, _) = b.admit(t1);
        let (failing, _) = b.admit(t1);
        b.record(t1, failing, true, MS);
        let t2 = t1 + b.rule().open_for;
        // The slow probe is still out, so the new period has one slot left.
        assert_eq!(b.admit(t2).0, Admission::Probe);
        assert_eq!(b.admit(t2).0, Admission::Rejected);
        b.cancel(slow_probe);
        assert_eq!(b.admit(t2).0, Admission::Probe);
    }

    #[test]
    fn states_have_stable_labels_and_gauge_values() {
        let labels = [Closed, Open, HalfOpen].map(|s| (s.as_str(), s.gauge()));
        assert_eq!(labels, [("closed", 0), ("open", 1), ("half_open", 2)]);
    }

    proptest! {
        #[test]
        fn never_has_more_probes_out_than_half_open_requests(
            slots in 1u32..4,
            // (0 admit | 1 record | 2 cancel | 3 let time pass, which, failed, slow, ms)
            ops in proptest::collection::vec(
                (0u8..4, any::<usize>(), any::<bool>(), any::<bool>(), 0u64..300),
                1..300,
            ),
        ) {
            let (b, mut now) = breaker(|r| {
                r.consecutive_failures = Some(3);
                r.error_ratio = Some(0.5);
                r.slow_call = slow_call(50, 0.5);
                r.window = Duration::from_secs(1);
                r.min_requests = 4;
                r.open_for = Duration::from_millis(100);
                r.half_open_requests = slots;
            });
            let mut outstanding: Vec<Admission> = Vec::new();
            // Probes handed out in the current half-open period, less cancels in it.
            let mut period_probes: i64 = 0;
            for (kind, pick, failed, slow, ms) in ops {
                let before = b.state();
                let transition = match kind {
                    0 => {
                        let (a, t) = b.admit(now);
                        if t.is_some_and(|t| t.to == HalfOpen) {
                            period_probes = 0;
                        }
                        let expected = match a {
                            Admission::Allowed => b.state() == Closed,
                            Admission::Probe => b.state() == HalfOpen,
                            Admission::Rejected => b.state() != Closed,
                        };
                        prop_assert!(expected, "{:?} while {:?}", a, b.state());
                        period_probes += i64::from(a == Admission::Probe);
                        if a != Admission::Rejected {
                            outstanding.push(a);
                        }
                        t
                    }
                    1 | 2 if !outstanding.is_empty() => {
                        let a = outstanding.swap_remove(pick % outstanding.len());
                        if kind == 1 {
                            b.record(now, a, failed, if slow { 100 * MS } else { MS })
                        } else {
                            if a == Admission::Probe && b.state() == HalfOpen {
                                period_probes -= 1;
                            }
                            b.cancel(a);
                            None
                        }
                    }
                    3 => {
                        now += Duration::from_millis(ms);
                        None
                    }
                    _ => None,
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
