//! Per-backend health from active checks: the state machine here, the HTTP check
//! in [`probe`].
//!
//! The binary's check loop runs a round of [`probe::probe`]s when a policy's
//! `healthCheck.interval` is due and reports each result through
//! `Endpoints::record_check` to [`HealthState::record_check`]; a pick asks
//! [`HealthState::is_healthy`] (through `Endpoints`) of every candidate. As in Envoy and
//! Kubernetes probes, one bad check is not enough: `unhealthy_after` failures in a row
//! mark a backend [`Health::Unhealthy`], and `healthy_after` successes in a row bring it
//! back. A result that agrees with the current status resets the opposite streak, so a
//! flapping backend (ok, fail, ok, fail) never changes status.
//!
//! Every backend starts [`Health::Healthy`]: on boot, or when it joins (a reload or a
//! DNS change; endpoints that remain under an unchanged check keep their state, see
//! [`HealthState::carried`]), the proxy has not probed it yet, and starting unhealthy would
//! black out all traffic until the first `healthy_after` rounds of checks complete.
//! Passive outlier ejection, where the policy configures it, covers the
//! dead-on-arrival backend in the meantime.
//!
//! Invariants:
//! - status changes only on a streak of exactly the configured length;
//! - `healthy_since` is `Some` only for a backend that is healthy *and* got there by a
//!   transition (so slow start applies to recovered backends, not to the initial set);
//! - an index out of range is "no such backend": not healthy, no transitions.
//!
//! Thread safety: `is_healthy` is a lock-free atomic load (it runs per request). The
//! streak counters and timestamps sit in one small `Mutex` per backend, held only for
//! the few assignments in `record_check` / `healthy_since`; the status atomic is
//! written while that lock is held so it always agrees with the counters.

pub mod probe;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use sluice_policy::HealthCheck;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
}

#[derive(Debug)]
struct Streaks {
    /// Consecutive results that disagree with the current status.
    against: u32,
    /// When the status last changed; `None` while it is the initial status.
    changed_at: Option<Instant>,
}

#[derive(Debug)]
struct Backend {
    healthy: AtomicBool,
    streaks: Mutex<Streaks>,
}

impl Backend {
    fn fresh() -> Self {
        Backend {
            healthy: AtomicBool::new(true),
            streaks: Mutex::new(Streaks {
                against: 0,
                changed_at: None,
            }),
        }
    }

    fn streaks(&self) -> MutexGuard<'_, Streaks> {
        // The guarded data is plain counters that are valid after any partial update,
        // so a panic elsewhere while holding the lock leaves nothing to repair.
        self.streaks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
pub struct HealthState {
    /// Shared with the state this one was [carried](HealthState::carried) from, so
    /// that checks still running against the old backend set land here too.
    backends: Vec<Arc<Backend>>,
    created_at: Instant,
}

impl HealthState {
    /// `n` backends, all healthy (see the module doc for why).
    pub fn new(n: usize, now: Instant) -> Self {
        HealthState {
            backends: (0..n).map(|_| Arc::new(Backend::fresh())).collect(),
            created_at: now,
        }
    }

    /// `n` backends, where backend `i` is `previous`'s backend `from[i]` when that is
    /// `Some` (its status, streak and "healthy since", shared); the others start
    /// healthy, as in [`HealthState::new`].
    pub fn carried(n: usize, previous: &HealthState, from: &[Option<usize>]) -> Self {
        HealthState {
            backends: (0..n)
                .map(|i| {
                    match from
                        .get(i)
                        .copied()
                        .flatten()
                        .and_then(|j| previous.backends.get(j))
                    {
                        Some(kept) => Arc::clone(kept),
                        None => Arc::new(Backend::fresh()),
                    }
                })
                .collect(),
            created_at: previous.created_at,
        }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// When this state was created (the baseline for "healthy since creation").
    pub fn created_at(&self) -> Instant {
        self.created_at
    }

    /// Result of one active check; returns `Some(new_health)` when it changed the status.
    pub fn record_check(
        &self,
        index: usize,
        ok: bool,
        rule: &HealthCheck,
        now: Instant,
    ) -> Option<Health> {
        let backend = self.backends.get(index)?;
        let mut streaks = backend.streaks();
        let healthy = backend.healthy.load(Ordering::Relaxed);
        if ok == healthy {
            streaks.against = 0;
            return None;
        }
        streaks.against = streaks.against.saturating_add(1);
        // Validation guarantees both thresholds are >= 1; `max(1)` keeps a hand-built
        // rule of 0 meaning "on the first result" rather than "never".
        let needed = if healthy {
            rule.unhealthy_after
        } else {
            rule.healthy_after
        }
        .max(1);
        if streaks.against < needed {
            return None;
        }
        streaks.against = 0;
        streaks.changed_at = Some(now);
        backend.healthy.store(ok, Ordering::Relaxed);
        Some(if ok {
            Health::Healthy
        } else {
            Health::Unhealthy
        })
    }

    pub fn health(&self, index: usize) -> Health {
        if self.is_healthy(index) {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }

    /// Lock-free; `false` for an index out of range.
    pub fn is_healthy(&self, index: usize) -> bool {
        self.backends
            .get(index)
            .is_some_and(|b| b.healthy.load(Ordering::Relaxed))
    }

    /// When the backend last became healthy, for slow start. `None` when it is
    /// unhealthy, or healthy since creation (the initial set gets no slow start: it
    /// was already serving before this state existed).
    pub fn healthy_since(&self, index: usize) -> Option<Instant> {
        let backend = self.backends.get(index)?;
        let streaks = backend.streaks();
        if backend.healthy.load(Ordering::Relaxed) {
            streaks.changed_at
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rule(unhealthy_after: u32, healthy_after: u32) -> HealthCheck {
        HealthCheck {
            path: "/healthz".into(),
            grpc: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_after,
            healthy_after,
        }
    }

    #[test]
    fn starts_healthy_without_slow_start() {
        let t0 = Instant::now();
        let state = HealthState::new(3, t0);
        assert!((0..3).all(|i| state.is_healthy(i)));
        assert_eq!(state.healthy_since(0), None);
        assert_eq!(state.created_at(), t0);
    }

    #[test]
    fn turns_unhealthy_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let state = HealthState::new(1, t0);
        let r = rule(3, 2);
        assert_eq!(state.record_check(0, false, &r, t0), None);
        assert_eq!(state.record_check(0, false, &r, t0), None);
        assert!(state.is_healthy(0));
        assert_eq!(
            state.record_check(0, false, &r, t0),
            Some(Health::Unhealthy)
        );
        assert!(!state.is_healthy(0));
        assert_eq!(state.health(0), Health::Unhealthy);
        // Further failures report no change.
        assert_eq!(state.record_check(0, false, &r, t0), None);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let t0 = Instant::now();
        let state = HealthState::new(1, t0);
        let r = rule(2, 2);
        for _ in 0..10 {
            assert_eq!(state.record_check(0, false, &r, t0), None);
            assert_eq!(state.record_check(0, true, &r, t0), None);
        }
        assert!(state.is_healthy(0));
    }

    #[test]
    fn recovers_after_consecutive_successes_and_reports_since() {
        let t0 = Instant::now();
        let state = HealthState::new(2, t0);
        let r = rule(1, 2);
        assert_eq!(
            state.record_check(1, false, &r, t0),
            Some(Health::Unhealthy)
        );
        assert_eq!(state.healthy_since(1), None);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(state.record_check(1, true, &r, t1), None);
        assert_eq!(state.record_check(1, false, &r, t1), None);
        assert_eq!(state.record_check(1, true, &r, t1), None);
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(state.record_check(1, true, &r, t2), Some(Health::Healthy));
        assert_eq!(state.healthy_since(1), Some(t2));
        // The other backend is untouched.
        assert!(state.is_healthy(0));
        assert_eq!(state.healthy_since(0), None);
    }

    #[test]
    fn unknown_index_is_not_healthy_and_never_changes() {
        let t0 = Instant::now();
        let state = HealthState::new(1, t0);
        assert!(!state.is_healthy(5));
        assert_eq!(state.record_check(5, false, &rule(1, 1), t0), None);
        assert_eq!(state.healthy_since(5), None);
    }

    #[test]
    fn is_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<HealthState>();
    }

    proptest::proptest! {
        /// Against a straightforward model: the status flips exactly when the last
        /// `k` results (k = threshold for the current status) all disagree with it.
        #[test]
        fn follows_the_streak_model(
            results in proptest::collection::vec(proptest::bool::ANY, 0..200),
            unhealthy_after in 1u32..5,
            healthy_after in 1u32..5,
        ) {
            let t0 = Instant::now();
            let state = HealthState::new(1, t0);
            let r = rule(unhealthy_after, healthy_after);
            let (mut healthy, mut streak) = (true, 0u32);
            for (step, ok) in results.into_iter().enumerate() {
                let now = t0 + Duration::from_secs(step as u64);
                let expected = if ok == healthy {
                    streak = 0;
                    None
                } else {
                    streak += 1;
                    let needed = if healthy { unhealthy_after } else { healthy_after };
                    if streak == needed {
                        streak = 0;
                        healthy = ok;
                        Some(if ok { Health::Healthy } else { Health::Unhealthy })
                    } else {
                        None
                    }
                };
                proptest::prop_assert_eq!(state.record_check(0, ok, &r, now), expected);
                proptest::prop_assert_eq!(state.is_healthy(0), healthy);
                if expected == Some(Health::Healthy) {
                    proptest::prop_assert_eq!(state.healthy_since(0), Some(now));
                }
            }
        }
    }
}
