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
//! Concurrency: the Closed path, which every request of a healthy route takes,
//! writes nothing every worker thread writes: outcomes are counted in a window per
//! thread (each on its own cache line; a trip decision sums them), the state is read
//! from an atomic, and a success clears the consecutive-failure count only when it
//! is not already 0. The windows are summed for a decision only when the window can
//! trip: after a failure or a slow call, and after a success while one of those is
//! still in the window and the window may still be short of `minRequests` (a
//! success lowers both ratios otherwise: at most one sum per slice of the window
//! for a route with a steady trickle of failures). A decision is taken for the
//! window it summed: one that a reset overtook (the breaker tripped and closed
//! again meanwhile) is dropped. A request recorded in the instant a trip resets
//! the windows may land in the fresh window, as one admitted before a trip and
//! finishing after the breaker closed again does.
//!
//! The caller must end every `Allowed` or `Probe` admission with exactly one
//! [`CircuitBreaker::record`] or [`CircuitBreaker::cancel`]; a probe that is never
//! ended holds its slot for good (use a drop guard on the request path).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::shard::{per_core, PerThread};

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

/// One thread's share of the sliding window.
type Window = [Bucket; BUCKETS];

/// What a sum of the window found.
enum Reading {
    /// A trigger is reached.
    Trip,
    /// `minRequests` reached, no trigger: no success in this slice can trip it.
    Full,
    /// Short of `minRequests` (or no ratio trigger): a later outcome may trip it.
    Short,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// When the breaker last opened; meaningful while Open.
    opened_at: Instant,
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
    /// Failures in a row, across threads.
    consecutive: AtomicU32,
    /// One more than the window slice of the latest failure or slow call (0: none
    /// since the window was last reset).
    last_bad: AtomicU64,
    /// One more than the slice in which a sum found `minRequests` reached without
    /// tripping (0: none since the last reset): successes in that slice need no sum.
    checked: AtomicU64,
    /// Resets of the window so far: a decision stands only for the window it summed.
    generation: AtomicU64,
    /// The window, a share per thread.
    windows: PerThread<Mutex<Window>>,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(rule: &sluice_policy::CircuitBreaker, now: Instant) -> Self {
        Self::with_windows(rule, now, per_core())
    }

    /// A breaker whose window is kept in `windows` shares (rounded up to a power
    /// of two; tests choose it, the proxy has one per core).
    fn with_windows(rule: &sluice_policy::CircuitBreaker, now: Instant, windows: usize) -> Self {
        let width_nanos = (rule.window.as_nanos() / BUCKETS as u128).max(1);
        CircuitBreaker {
            rule: rule.clone(),
            origin: now,
            width_nanos,
            state: AtomicU8::new(BreakerState::Closed as u8),
            consecutive: AtomicU32::new(0),
            last_bad: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            windows: PerThread::new(windows, |_| Mutex::new([Bucket::default(); BUCKETS])),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                opened_at: now,
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
                self.record_closed(now, failed, latency)
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
                                self.reset_window();
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

    fn record_closed(&self, now: Instant, failed: bool, latency: Duration) -> Option<Transition> {
        let slow = self.is_slow(latency);
        let current = self.bucket_index(now);
        {
            let mut window = lock(self.windows.mine());
            let bucket = &mut window[(current % BUCKETS as u64) as usize];
            if bucket.index != current {
                *bucket = Bucket {
                    index: current,
                    ..Bucket::default()
                };
            }
            bucket.total = bucket.total.saturating_add(1);
            bucket.failures = bucket.failures.saturating_add(u32::from(failed));
            bucket.slow = bucket.slow.saturating_add(u32::from(slow));
        }
        let consecutive = if failed {
            self.consecutive
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1)
        } else {
            // Read first: on a healthy route the count is 0 and stays unwritten.
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            0
        };
        if failed || slow {
            self.last_bad
                .fetch_max(current.saturating_add(1), Ordering::Relaxed);
        } else {
            // A success trips nothing unless a failure or slow call is in the window
            // for it to bring to `minRequests`.
            let last_bad = self.last_bad.load(Ordering::Relaxed);
            if last_bad == 0 || current.saturating_sub(last_bad - 1) >= BUCKETS as u64 {
                return None;
            }
            if self.checked.load(Ordering::Relaxed) == current.saturating_add(1) {
                return None;
            }
        }
        let generation = self.generation.load(Ordering::Acquire);
        match self.should_trip(consecutive, current) {
            Reading::Trip => {}
            Reading::Full => {
                if self.checked.load(Ordering::Relaxed) != current.saturating_add(1) {
                    self.checked
                        .store(current.saturating_add(1), Ordering::Relaxed);
                }
                return None;
            }
            Reading::Short => return None,
        }
        let mut inner = self.lock();
        // Another thread tripped it meanwhile (one transition), or the window
        // summed is gone (tripped and closed again since): no decision.
        if inner.state != BreakerState::Closed
            || self.generation.load(Ordering::Acquire) != generation
        {
            return None;
        }
        inner.opened_at = now;
        self.reset_window();
        self.set_state(&mut inner, BreakerState::Open)
    }

    fn should_trip(&self, consecutive: u32, current: u64) -> Reading {
        if let Some(n) = self.rule.consecutive_failures {
            if consecutive >= n {
                return Reading::Trip;
            }
        }
        if self.rule.error_ratio.is_none() && self.rule.slow_call.is_none() {
            return Reading::Short;
        }
        let (mut total, mut failures, mut slow) = (0u64, 0u64, 0u64);
        // A bucket is in the window if it counts one of the last BUCKETS slices;
        // anything older is stale, whatever its slot still holds.
        let live = |b: &&Bucket| b.index <= current && current - b.index < BUCKETS as u64;
        for window in self.windows.iter() {
            for b in lock(window).iter().filter(live) {
                total += u64::from(b.total);
                failures += u64::from(b.failures);
                slow += u64::from(b.slow);
            }
        }
        if total == 0 || total < u64::from(self.rule.min_requests) {
            return Reading::Short;
        }
        let ratio_reached =
            |count: u64, ratio: f64| count > 0 && count as f64 / total as f64 >= ratio;
        let trip = self
            .rule
            .error_ratio
            .is_some_and(|r| ratio_reached(failures, r))
            || self
                .rule
                .slow_call
                .as_ref()
                .is_some_and(|s| ratio_reached(slow, s.ratio));
        if trip {
            Reading::Trip
        } else {
            Reading::Full
        }
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

    /// Empties every thread's window (called with `inner` locked: the lock order is
    /// `inner`, then a window; no window lock is held while taking `inner`).
    fn reset_window(&self) {
        for window in self.windows.iter() {
            *lock(window) = [Bucket::default(); BUCKETS];
        }
        self.consecutive.store(0, Ordering::Relaxed);
        self.last_bad.store(0, Ordering::Relaxed);
        self.checked.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn set_state(&self, inner: &mut Inner, to: BreakerState) -> Option<Transition> {
        let from = inner.state;
        inner.state = to;
        self.state.store(to as u8, Ordering::Release);
        (from != to).then_some(Transition { from, to })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No method panics while holding a lock, so a poisoned state is still
    // consistent; keep serving rather than take the route down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
