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
fn call(b: &CircuitBreaker, now: Instant, failed: bool, latency: Duration) -> Option<Transition> {
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

/// [`breaker`] with its window in 4 shares, whatever the machine's cores (threads
/// spawned one after another use different shares).
fn sharded(tune: impl FnOnce(&mut sluice_policy::CircuitBreaker)) -> (CircuitBreaker, Instant) {
    let (b, t0) = breaker(tune);
    (CircuitBreaker::with_windows(b.rule(), t0, 4), t0)
}

#[test]
fn outcomes_counted_on_other_threads_are_in_the_window_a_decision_sums() {
    let (b, t0) = sharded(|r| {
        r.error_ratio = Some(0.5);
        r.min_requests = 20;
    });
    // 4 threads (each counting in its own share of the window): 20 outcomes, 8
    // of them failures: 40%, below the ratio.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for failed in [true, false, true, false, false] {
                    assert_eq!(call(&b, t0, failed, MS), None);
                }
            });
        }
    });
    assert_eq!(b.state(), Closed);
    // Here: 10 failures of 22 (45%), then 12 of 24: the ratio is reached only
    // counting the other threads' outcomes too.
    for _ in 0..3 {
        assert_eq!(call(&b, t0, true, MS), None);
    }
    assert_eq!(call(&b, t0, true, MS), moved(Closed, Open));
}

#[test]
fn a_trip_empties_every_threads_share_of_the_window() {
    let (b, t0) = sharded(|r| {
        r.error_ratio = Some(0.5);
        r.min_requests = 4;
        r.open_for = Duration::from_secs(1);
    });
    // Other threads' failures (3 of 3: below minRequests), one thread after
    // another: consecutive threads count in different shares of the window.
    for _ in 0..3 {
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(call(&b, t0, true, MS), None));
        });
    }
    assert_eq!(call(&b, t0, true, MS), moved(Closed, Open));
    let probe_at = t0 + Duration::from_secs(1);
    let (probe, _) = b.admit(probe_at);
    assert_eq!(probe, Admission::Probe);
    assert_eq!(
        b.record(probe_at, probe, false, MS),
        moved(HalfOpen, Closed)
    );
    // A fresh window, the other threads' shares too: with any of their old
    // failures still counted, these 3 would reach minRequests and trip.
    for _ in 0..3 {
        assert_eq!(call(&b, probe_at, true, MS), None);
    }
    assert_eq!(b.state(), Closed);
}

#[test]
fn a_success_trips_when_older_successes_age_out_of_the_window() {
    let (b, t0) = breaker(|r| r.error_ratio = Some(0.5));
    for _ in 0..10 {
        assert_eq!(call(&b, t0, false, MS), None);
    }
    // A slice later: 9 failures of 19, and successes in this slice (already at
    // minRequests) change nothing.
    let t1 = t0 + Duration::from_secs(1);
    for _ in 0..9 {
        assert_eq!(call(&b, t1, true, MS), None);
    }
    assert_eq!(call(&b, t1, false, MS), None);
    assert_eq!(b.state(), Closed);
    // The first slice leaves the window: 9 failures of 11 with this success.
    let t10 = t0 + Duration::from_secs(10);
    assert_eq!(call(&b, t10, false, MS), moved(Closed, Open));
}
