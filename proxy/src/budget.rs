//! A retry budget for one route, after tower's `TpsBudget` (and Linkerd's and
//! Finagle's before it): retries may add at most a fixed fraction of extra load.
//!
//! Why a budget and not a retry count: with "retry up to 3 times", a failing upstream
//! receives up to 4x its normal traffic exactly when it can least take it, and every
//! layer of retrying callers multiplies that again: a retry storm that keeps it down.
//! A budget ties retries to recent successful-or-not *original* traffic: each original
//! request deposits `ratio` of a retry, each retry withdraws a whole one. When
//! everything fails, retries are capped at `ratio` of the traffic (20% extra load by
//! default) instead of multiplying it, while isolated failures on a healthy route
//! still get retried. `minPerSecond` keeps a trickle of retries available so a
//! low-traffic route can retry at all.
//!
//! Over the last [`WINDOW`] the invariant is:
//! `withdrawn <= ratio * deposits + minPerSecond * WINDOW.as_secs()`.
//! Deposits and withdrawals are counted in [`BUCKETS`] one-second buckets, so memory
//! is constant and the window slides in one-second steps: a count is forgotten 9 to
//! 10 s after it was made, and the invariant holds at every withdrawal. The `minPerSecond`
//! allowance is spread over the window, as in tower: an idle route may spend all of it
//! in one burst.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long deposits and withdrawals count (tower's and Linkerd's default TTL).
pub const WINDOW: Duration = Duration::from_secs(10);
/// One bucket per second of the window.
pub const BUCKETS: usize = 10;
const BUCKET_NANOS: u128 = WINDOW.as_nanos() / BUCKETS as u128;
/// Absorbs float rounding in `ratio * deposits` (0.29 * 100 is 28.999...), so a
/// budget that is exactly met is not refused.
const EPSILON: f64 = 1e-9;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which second since `origin` this bucket counts.
    index: u64,
    deposits: u64,
    withdrawals: u64,
}

/// One route's retry budget. Reused across reloads while its rule is unchanged, so a
/// reload does not hand out a fresh allowance to a route that has spent it.
#[derive(Debug)]
pub struct RetryBudget {
    rule: sluice_policy::RetryBudget,
    origin: Instant,
    buckets: Mutex<[Bucket; BUCKETS]>,
}

impl RetryBudget {
    pub fn new(rule: &sluice_policy::RetryBudget, now: Instant) -> Self {
        RetryBudget {
            rule: rule.clone(),
            origin: now,
            buckets: Mutex::new([Bucket::default(); BUCKETS]),
        }
    }

    /// The rule this budget enforces, to decide whether a reload can keep it.
    pub fn rule(&self) -> &sluice_policy::RetryBudget {
        &self.rule
    }

    /// Records one original request (not a retry).
    pub fn deposit(&self, now: Instant) {
        let current = self.index(now);
        let mut buckets = self.lock();
        let b = Self::bucket(&mut buckets, current);
        b.deposits = b.deposits.saturating_add(1);
    }

    /// Takes one retry from the budget; false means the budget is spent and the
    /// request must not be retried.
    pub fn withdraw(&self, now: Instant) -> bool {
        let current = self.index(now);
        let mut buckets = self.lock();
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for b in buckets
            .iter()
            .filter(|b| b.index <= current && current - b.index < BUCKETS as u64)
        {
            deposits += b.deposits;
            withdrawals += b.withdrawals;
        }
        let allowance =
            self.rule.ratio * deposits as f64 + self.rule.min_per_second * WINDOW.as_secs_f64();
        if withdrawals as f64 + 1.0 > allowance + EPSILON {
            return false;
        }
        let b = Self::bucket(&mut buckets, current);
        b.withdrawals = b.withdrawals.saturating_add(1);
        true
    }

    fn index(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / BUCKET_NANOS).unwrap_or(u64::MAX)
    }

    /// The bucket for `current`, emptied first if it still holds an older second.
    fn bucket(buckets: &mut [Bucket; BUCKETS], current: u64) -> &mut Bucket {
        let b = &mut buckets[(current % BUCKETS as u64) as usize];
        if b.index != current {
            *b = Bucket {
                index: current,
                ..Bucket::default()
            };
        }
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Bucket; BUCKETS]> {
        // Nothing panics while the lock is held; a poisoned lock still guards
        // consistent counts.
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn budget(ratio: f64, min_per_second: f64, now: Instant) -> RetryBudget {
        RetryBudget::new(
            &sluice_policy::RetryBudget {
                ratio,
                min_per_second,
            },
            now,
        )
    }

    #[test]
    fn retries_stay_within_ratio_when_every_request_fails() {
        let t0 = Instant::now();
        let b = budget(0.2, 10.0, t0);
        let (mut requests, mut retries) = (0u32, 0u32);
        // 1000 requests/s for 60 s; every one fails and keeps retrying while allowed.
        for ms in 0..60_000u64 {
            let now = t0 + Duration::from_millis(ms);
            b.deposit(now);
            requests += 1;
            while b.withdraw(now) {
                retries += 1;
            }
        }
        // 20% of the traffic, plus at most 100 retries per 10 s of minPerSecond.
        let allowed = 0.2 * f64::from(requests) + 10.0 * 60.0;
        assert!(f64::from(retries) <= allowed, "{retries} > {allowed}");
        // And the budget is really usable, not just refusing everything.
        assert!(f64::from(retries) >= 0.2 * f64::from(requests));
    }

    #[test]
    fn a_retry_needs_enough_deposits() {
        let t0 = Instant::now();
        let b = budget(0.5, 0.0, t0);
        b.deposit(t0);
        assert!(!b.withdraw(t0), "half a retry is not a retry");
        b.deposit(t0);
        assert!(b.withdraw(t0));
        assert!(!b.withdraw(t0));
    }

    #[test]
    fn an_exactly_met_budget_is_not_refused_by_rounding() {
        let t0 = Instant::now();
        let b = budget(0.29, 0.0, t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        let granted = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(granted, 29);
    }

    #[test]
    fn deposits_expire_after_the_window() {
        let t0 = Instant::now();
        let b = budget(0.2, 0.0, t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        let later = t0 + WINDOW + Duration::from_secs(1);
        assert!(!b.withdraw(later));
        // Still there just inside the window.
        assert!(b.withdraw(t0 + WINDOW - Duration::from_millis(1)));
    }

    #[test]
    fn withdrawals_expire_after_the_window() {
        let t0 = Instant::now();
        let b = budget(0.0, 1.0, t0);
        let granted = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(granted, 10);
        assert!(!b.withdraw(t0 + Duration::from_secs(5)));
        assert!(b.withdraw(t0 + WINDOW));
    }

    #[test]
    fn min_per_second_lets_a_trickle_retry_without_traffic() {
        let t0 = Instant::now();
        let b = budget(0.2, 1.0, t0);
        // One retry every 2 s, no original traffic at all, for a minute.
        for s in (0..60).step_by(2) {
            assert!(b.withdraw(t0 + Duration::from_secs(s)), "refused at {s} s");
        }
    }

    #[test]
    fn zero_budget_never_retries() {
        let t0 = Instant::now();
        let b = budget(0.0, 0.0, t0);
        b.deposit(t0);
        assert!(!b.withdraw(t0));
    }

    proptest! {
        #[test]
        fn grants_exactly_what_the_windowed_allowance_permits(
            ratio in 0.0f64..=1.0,
            min_per_second in 0.0f64..5.0,
            steps in proptest::collection::vec((0u64..700, any::<bool>()), 1..1_000),
        ) {
            let t0 = Instant::now();
            let b = budget(ratio, min_per_second, t0);
            let mut now_ms = 0u64;
            // (second, was a deposit) of everything counted: a plain model of the
            // window as the last BUCKETS whole seconds.
            let mut log: Vec<(u64, bool)> = Vec::new();
            for (advance, is_deposit) in steps {
                now_ms += advance;
                let now = t0 + Duration::from_millis(now_ms);
                let second = now_ms / 1_000;
                if is_deposit {
                    b.deposit(now);
                    log.push((second, true));
                    continue;
                }
                let recent = log.iter().filter(|(s, _)| second - s < BUCKETS as u64);
                let (d, w) = recent.fold((0u64, 0u64), |(d, w), (_, dep)| {
                    if *dep { (d + 1, w) } else { (d, w + 1) }
                });
                let allowance = ratio * d as f64 + min_per_second * WINDOW.as_secs_f64();
                let granted = b.withdraw(now);
                prop_assert_eq!(granted, w as f64 + 1.0 <= allowance + EPSILON);
                if granted {
                    log.push((second, false));
                }
            }
        }
    }
}
