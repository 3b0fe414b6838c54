//! Slow start: a backend that just joined (or just became healthy again) gets a
//! reduced weight that ramps up to its full weight over a window.
//!
//! Why: a fresh JVM, cold cache or empty connection pool answers slowly for its first
//! seconds; sending it a full share of traffic at once turns that warm-up into a
//! latency spike (or into an immediate outlier ejection). This follows Envoy's
//! `slow_start_config` with `aggression = 1.0`: the factor grows *linearly* with the
//! time since the backend became available, from a floor of [`MIN_FACTOR`] (Envoy's
//! default `min_weight_percent` of 10%) so a new backend still gets some traffic and
//! can warm up at all.
//!
//! Invariants:
//! - [`factor`] is always in `[MIN_FACTOR, 1.0]`, non-decreasing in `now`, and exactly
//!   `1.0` once `window` has elapsed (or when `window` is zero).
//! - [`effective_weight`] never exceeds `weight`, is `0` only when `weight` is `0`, and is
//!   `weight` when slow start is off (`since` or `window` is `None`).
//!
//! Pure functions of injected instants: the caller supplies `since` (from
//! `HealthState::healthy_since` or the time the backend was added) and `now`.

use std::time::{Duration, Instant};

/// The share of its weight a backend gets at the very start of its window.
pub const MIN_FACTOR: f64 = 0.1;

/// The fraction of its full weight a backend that became available at `since` should
/// get at `now`: `elapsed / window`, linear, clamped to `[MIN_FACTOR, 1.0]`.
///
/// A `now` before `since` (instants taken on different threads) counts as no time
/// elapsed rather than panicking.
pub fn factor(since: Instant, now: Instant, window: Duration) -> f64 {
    if window.is_zero() {
        return 1.0;
    }
    let elapsed = now.saturating_duration_since(since);
    let linear = elapsed.as_secs_f64() / window.as_secs_f64();
    linear.clamp(MIN_FACTOR, 1.0)
}

/// `weight` scaled by [`factor`], rounded up so that any positive weight stays `>= 1`
/// (a backend in slow start must still get traffic to warm up) and the full weight is
/// reached exactly at the end of the window.
pub fn effective_weight(
    weight: u32,
    since: Option<Instant>,
    now: Instant,
    window: Option<Duration>,
) -> u32 {
    let (Some(since), Some(window)) = (since, window) else {
        return weight;
    };
    if weight == 0 {
        return 0;
    }
    let scaled = (f64::from(weight) * factor(since, now, window)).ceil();
    // `scaled` is in [1, weight] up to float error; clamp in integers to be exact.
    (scaled as u32).clamp(1, weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    #[test]
    fn starts_at_the_floor_so_a_new_backend_still_gets_traffic() {
        let t0 = Instant::now();
        assert_eq!(factor(t0, t0, WINDOW), MIN_FACTOR);
        assert_eq!(effective_weight(100, Some(t0), t0, Some(WINDOW)), 10);
        assert_eq!(effective_weight(1, Some(t0), t0, Some(WINDOW)), 1);
    }

    #[test]
    fn ramps_linearly_to_full_weight_over_the_window() {
        let t0 = Instant::now();
        let at = |secs: u64| factor(t0, t0 + Duration::from_secs(secs), WINDOW);
        assert!((at(15) - 0.5).abs() < 1e-9);
        assert!((at(27) - 0.9).abs() < 1e-9);
        assert_eq!(at(30), 1.0);
        assert_eq!(at(3_600), 1.0);
        let half = t0 + Duration::from_secs(15);
        assert_eq!(effective_weight(100, Some(t0), half, Some(WINDOW)), 50);
    }

    #[test]
    fn slow_start_off_or_zero_weight_keeps_the_weight() {
        let t0 = Instant::now();
        assert_eq!(effective_weight(7, None, t0, Some(WINDOW)), 7);
        assert_eq!(effective_weight(7, Some(t0), t0, None), 7);
        assert_eq!(effective_weight(0, Some(t0), t0, Some(WINDOW)), 0);
        assert_eq!(factor(t0, t0, Duration::ZERO), 1.0);
    }

    #[test]
    fn a_clock_reading_before_since_counts_as_just_started() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        assert_eq!(factor(later, t0, WINDOW), MIN_FACTOR);
    }

    proptest::proptest! {
        #[test]
        fn factor_is_bounded_and_never_decreases(
            window_ms in 0u64..100_000,
            a_ms in 0u64..200_000,
            b_ms in 0u64..200_000,
        ) {
            let t0 = Instant::now();
            let window = Duration::from_millis(window_ms);
            let (early, late) = (a_ms.min(b_ms), a_ms.max(b_ms));
            let f_early = factor(t0, t0 + Duration::from_millis(early), window);
            let f_late = factor(t0, t0 + Duration::from_millis(late), window);
            proptest::prop_assert!((MIN_FACTOR..=1.0).contains(&f_early));
            proptest::prop_assert!(f_early <= f_late);
        }

        #[test]
        fn effective_weight_stays_between_one_and_weight(
            weight in 1u32..=10_000,
            window_ms in 1u64..100_000,
            elapsed_ms in 0u64..200_000,
        ) {
            let t0 = Instant::now();
            let now = t0 + Duration::from_millis(elapsed_ms);
            let w = effective_weight(weight, Some(t0), now, Some(Duration::from_millis(window_ms)));
            proptest::prop_assert!(w >= 1 && w <= weight);
            if elapsed_ms >= window_ms {
                proptest::prop_assert_eq!(w, weight);
            }
        }
    }
}
