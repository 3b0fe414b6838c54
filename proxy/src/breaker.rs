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
mod tests;
