//! Passive outlier ejection: take a backend out of rotation after consecutive failed
//! real requests, and put it back by itself after a while.
//!
//! Active health checks probe one path every few seconds; a backend that passes them
//! but fails real traffic (a broken dependency, a full disk) is only caught here. This
//! follows Envoy's `consecutive_5xx` detector:
//!
//! - `consecutive_failures` failures in a row (connect error, timeout or 5xx, as the
//!   caller decides) eject the backend; any success resets the streak.
//! - The ejection lasts `eject_for * (times ejected before + 1)`, so a backend that
//!   keeps failing as soon as it returns stays out longer each time. The multiplier is
//!   capped at [`MAX_EJECTION_MULTIPLIER`] (Envoy's defaults, 30 s base and 300 s
//!   `max_ejection_time`, are the same factor of 10), so a backend is never gone for
//!   more than ten base periods. Like Envoy, which decrements the multiplier for
//!   every interval a host stays un-ejected, the count of past ejections drops by one
//!   for every `eject_for` the backend has been back without being ejected again.
//! - An ejected backend returns when its time is up; there is no timer, `is_ejected`
//!   compares against the injected `now`. The first look at a `now` past the end
//!   ends the ejection for every caller (callers pass the current time, so a later
//!   look with an earlier `now` differs from it by a moment at most).
//! - Results of requests that finish while their backend is ejected (sent before the
//!   ejection) are ignored: they say nothing about the backend after its break.
//!
//! Cap: at most [`OutlierDetector::max_ejected`] backends are ejected at once:
//! `floor(n * max_ejected_percent / 100)`, but at least one when the percentage is
//! above zero. The floor keeps the percentage a true upper bound for large sets;
//! "at least one" is Envoy's rule, so that 10% of a three-backend service still
//! ejects a failing backend instead of never ejecting anything. A percentage of 0
//! turns ejection off. With one backend and a percentage above zero that backend can
//! be ejected; the caller then has no candidate and should fall back to ignoring
//! ejection (Envoy's panic mode) rather than fail every request.
//!
//! Thread safety: what every request does (a pick asking whether a backend is
//! ejected, a success resetting a streak that is already zero) reads two atomics of
//! the backend's and writes nothing, takes no lock: each backend's cell is on a
//! cache line of its own, shared by every worker thread, and a lock or a write per
//! request there would bounce it between them (issue 23). A failure counts its
//! streak with a compare-and-swap (saturating). The ejection state sits in the backend's `Mutex`,
//! taken when a streak reaches the threshold and while the backend is (or may be)
//! ejected. Ejecting additionally takes one detector-wide lock so that checking the
//! cap and ejecting are one step: two backends failing at the same moment cannot
//! both squeeze under the cap. Lock order is always detector lock, then backend lock.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sluice_policy::OutlierDetection;

/// Longest ejection, in multiples of `eject_for`.
pub const MAX_EJECTION_MULTIPLIER: u32 = 10;

/// One backend's state, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Cell {
    /// Failures in a row (the streak), outside the lock: a success writes it only
    /// when it is not zero already.
    streak: AtomicU32,
    /// Set (under `slot`'s lock) when the backend is ejected; cleared under it by
    /// the first look after the ejection ended. While clear, the backend is not
    /// ejected and nobody takes the lock to ask.
    ejected: AtomicBool,
    slot: Mutex<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    ejected_until: Option<Instant>,
    /// Past ejections, before the decay for the clean time since `ejected_until`.
    times_ejected: u32,
}

impl Slot {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }
}

#[derive(Debug)]
pub struct OutlierDetector {
    rule: OutlierDetection,
    /// Shared with the detector this one was [carried](OutlierDetector::carried)
    /// from, so outcomes of requests in flight on the old backend set still count.
    slots: Vec<Arc<Cell>>,
    /// Serialises "count ejected, then eject" so the cap holds under concurrency.
    ejecting: Mutex<()>,
}

/// The guarded data is counters and instants that are valid after any partial
/// update, so a poisoned lock is simply taken over.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl OutlierDetector {
    pub fn new(rule: &OutlierDetection, n: usize) -> Self {
        OutlierDetector {
            rule: rule.clone(),
            slots: (0..n).map(|_| Arc::default()).collect(),
            ejecting: Mutex::new(()),
        }
    }

    /// A detector for `n` backends, where backend `i` is `previous`'s backend
    /// `from[i]` when that is `Some` (its streak, ejection and ejection count,
    /// shared); the others start clean. The cap is recomputed for `n`.
    pub fn carried(previous: &OutlierDetector, n: usize, from: &[Option<usize>]) -> Self {
        OutlierDetector {
            rule: previous.rule.clone(),
            slots: (0..n)
                .map(|i| {
                    match from
                        .get(i)
                        .copied()
                        .flatten()
                        .and_then(|j| previous.slots.get(j))
                    {
                        Some(kept) => Arc::clone(kept),
                        None => Arc::default(),
                    }
                })
                .collect(),
            ejecting: Mutex::new(()),
        }
    }

    pub fn rule(&self) -> &OutlierDetection {
        &self.rule
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// How many backends may be ejected at once (see the module doc for the rounding).
    pub fn max_ejected(&self) -> usize {
        let n = self.slots.len();
        let percent = usize::from(self.rule.max_ejected_percent.min(100));
        if percent == 0 || n == 0 {
            0
        } else {
            (n * percent / 100).max(1)
        }
    }

    /// An outcome of a real request to `index` (failure = connect error, timeout or
    /// 5xx). Returns `true` when this call ejected the backend.
    pub fn record(&self, index: usize, failed: bool, now: Instant) -> bool {
        let Some(cell) = self.slots.get(index) else {
            return false;
        };
        if ejected(cell, now) {
            return false;
        }
        let threshold = self.rule.consecutive_failures.max(1);
        if !failed {
            if cell.streak.load(Ordering::Relaxed) != 0 {
                cell.streak.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let streak = cell
            .streak
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .map_or(u32::MAX, |n| n.saturating_add(1));
        if streak < threshold {
            return false;
        }
        let _ejecting = lock(&self.ejecting);
        if self.ejected_count(now) >= self.max_ejected() {
            // The streak is kept: the next failure tries again, and ejects as soon
            // as another backend has returned.
            return false;
        }
        let mut slot = lock(&cell.slot);
        // Another thread may have ejected it, or a success reset the streak, while
        // no lock was held.
        if slot.is_ejected(now) || cell.streak.load(Ordering::Relaxed) < threshold {
            return false;
        }
        let before = self.decayed_times_ejected(&slot, now);
        let length = ejection_length(self.rule.eject_for, before.saturating_add(1));
        let Some(until) = now.checked_add(length) else {
            return false;
        };
        slot.ejected_until = Some(until);
        slot.times_ejected = before.saturating_add(1);
        cell.streak.store(0, Ordering::Relaxed);
        cell.ejected.store(true, Ordering::Release);
        true
    }

    /// Past ejections minus one per `eject_for` the backend has been back since the last.
    fn decayed_times_ejected(&self, slot: &Slot, now: Instant) -> u32 {
        let (Some(returned_at), false) = (slot.ejected_until, self.rule.eject_for.is_zero()) else {
            return slot.times_ejected;
        };
        let clean = now.saturating_duration_since(returned_at);
        let periods = clean.as_nanos() / self.rule.eject_for.as_nanos();
        let periods = u32::try_from(periods).unwrap_or(u32::MAX);
        slot.times_ejected.saturating_sub(periods)
    }

    /// An ejected backend returns by itself once its time is up.
    pub fn is_ejected(&self, index: usize, now: Instant) -> bool {
        self.slots.get(index).is_some_and(|cell| ejected(cell, now))
    }

    /// When an ejected backend returns; `None` when it is not ejected at `now`.
    pub fn ejected_until(&self, index: usize, now: Instant) -> Option<Instant> {
        let slot = lock(&self.slots.get(index)?.slot);
        slot.ejected_until.filter(|until| *until > now)
    }

    pub fn ejected_count(&self, now: Instant) -> usize {
        self.slots.iter().filter(|cell| ejected(cell, now)).count()
    }
}

/// Whether the backend is ejected at `now`: one load while it is not (the usual
/// case); under its lock while it is, clearing the flag once the ejection ended.
fn ejected(cell: &Cell, now: Instant) -> bool {
    if !cell.ejected.load(Ordering::Acquire) {
        return false;
    }
    let slot = lock(&cell.slot);
    let ejected = slot.is_ejected(now);
    if !ejected {
        // The backend starts its next streak from zero: a failure that saw the
        // flag clear just before the ejection may have counted into the streak the
        // ejection had reset, and would otherwise be carried into the next one.
        // Before the flag: a failure that sees it clear counts after the reset.
        cell.streak.store(0, Ordering::Relaxed);
        cell.ejected.store(false, Ordering::Release);
    }
    ejected
}

/// How long the `times`-th ejection (1-based, after decay) lasts:
/// `eject_for * min(times, MAX_EJECTION_MULTIPLIER)`.
pub fn ejection_length(eject_for: Duration, times: u32) -> Duration {
    eject_for.saturating_mul(times.clamp(1, MAX_EJECTION_MULTIPLIER))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(30);

    fn detector(consecutive_failures: u32, max_ejected_percent: u8, n: usize) -> OutlierDetector {
        OutlierDetector::new(
            &OutlierDetection {
                consecutive_failures,
                eject_for: BASE,
                max_ejected_percent,
            },
            n,
        )
    }

    /// Fails `index` until it is ejected; returns how many failures it took.
    fn fail_until_ejected(d: &OutlierDetector, index: usize, now: Instant) -> usize {
        (1..=1_000)
            .find(|_| d.record(index, true, now))
            .unwrap_or(0)
    }

    #[test]
    fn ejects_after_consecutive_failures() {
        let t0 = Instant::now();
        let d = detector(5, 100, 4);
        for _ in 0..4 {
            assert!(!d.record(0, true, t0));
        }
        assert!(!d.is_ejected(0, t0));
        assert!(d.record(0, true, t0));
        assert!(d.is_ejected(0, t0));
        assert_eq!(d.ejected_count(t0), 1);
        assert_eq!(d.ejected_until(0, t0), Some(t0 + BASE));
    }

    #[test]
    fn a_success_resets_the_streak() {
        let t0 = Instant::now();
        let d = detector(3, 100, 1);
        for _ in 0..20 {
            assert!(!d.record(0, true, t0));
            assert!(!d.record(0, true, t0));
            assert!(!d.record(0, false, t0));
        }
        assert!(!d.is_ejected(0, t0));
    }

    #[test]
    fn returns_by_itself_after_its_time() {
        let t0 = Instant::now();
        let d = detector(1, 100, 2);
        assert!(d.record(1, true, t0));
        assert!(d.is_ejected(1, t0 + BASE - Duration::from_millis(1)));
        assert!(!d.is_ejected(1, t0 + BASE));
        assert_eq!(d.ejected_count(t0 + BASE), 0);
    }

    #[test]
    fn outcomes_while_ejected_are_ignored() {
        let t0 = Instant::now();
        let d = detector(2, 100, 1);
        assert_eq!(fail_until_ejected(&d, 0, t0), 2);
        for _ in 0..10 {
            assert!(!d.record(0, true, t0 + Duration::from_secs(1)));
        }
        // Back with a clean streak: one failure is not enough.
        let back = t0 + BASE;
        assert!(!d.record(0, true, back));
        assert!(!d.is_ejected(0, back));
    }

    #[test]
    fn repeated_ejections_grow_up_to_the_cap() {
        let t0 = Instant::now();
        let d = detector(1, 100, 1);
        let mut now = t0;
        for times in 1..=12u32 {
            assert!(d.record(0, true, now));
            let expected = BASE * times.min(MAX_EJECTION_MULTIPLIER);
            assert_eq!(d.ejected_until(0, now), Some(now + expected));
            assert_eq!(expected, ejection_length(BASE, times));
            // Fails again the moment it returns.
            now += expected;
        }
    }

    #[test]
    fn time_back_in_rotation_shrinks_the_next_ejection() {
        let t0 = Instant::now();
        let d = detector(1, 100, 1);
        assert!(d.record(0, true, t0));
        let back = t0 + BASE;
        assert!(d.record(0, true, back));
        let back = back + BASE * 2;
        assert!(d.record(0, true, back));
        let back = back + BASE * 3;
        // Three past ejections; two clean periods leave one, so the next lasts 2x.
        let later = back + BASE * 2;
        assert!(d.record(0, true, later));
        assert_eq!(d.ejected_until(0, later), Some(later + BASE * 2));
    }

    #[test]
    fn never_ejects_more_than_the_percentage() {
        let t0 = Instant::now();
        let d = detector(1, 50, 5);
        assert_eq!(d.max_ejected(), 2);
        assert!(d.record(0, true, t0));
        assert!(d.record(1, true, t0));
        assert!(!d.record(2, true, t0));
        assert!(!d.is_ejected(2, t0));
        assert_eq!(d.ejected_count(t0), 2);
        // Once one returns, the still-failing backend is ejected on its next failure.
        let back = t0 + BASE;
        assert!(d.record(2, true, back));
    }

    #[test]
    fn rounds_down_but_allows_one_ejection_unless_zero_percent() {
        assert_eq!(detector(1, 10, 3).max_ejected(), 1);
        assert_eq!(detector(1, 10, 25).max_ejected(), 2);
        assert_eq!(detector(1, 100, 4).max_ejected(), 4);
        assert_eq!(detector(1, 0, 10).max_ejected(), 0);
        assert_eq!(detector(1, 50, 0).max_ejected(), 0);
        let t0 = Instant::now();
        let off = detector(1, 0, 3);
        assert!(!off.record(0, true, t0));
        assert_eq!(off.ejected_count(t0), 0);
    }

    #[test]
    fn unknown_index_is_ignored() {
        let t0 = Instant::now();
        let d = detector(1, 100, 1);
        assert!(!d.record(3, true, t0));
        assert!(!d.is_ejected(3, t0));
        assert_eq!(d.ejected_until(3, t0), None);
    }

    #[test]
    fn the_cap_holds_under_concurrent_failures() {
        let t0 = Instant::now();
        let d = detector(3, 30, 10);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for round in 0..50 {
                        for index in 0..10 {
                            d.record(index, round % 7 != 6, t0);
                        }
                    }
                });
            }
        });
        assert_eq!(d.ejected_count(t0), 3);
    }

    /// A failure that raced the ejection (it saw the backend not yet ejected and
    /// counted after the ejection reset the streak) does not count toward the next
    /// streak: the backend's return starts it from zero.
    #[test]
    fn a_failure_racing_the_ejection_is_not_carried_into_the_next_streak() {
        let t0 = Instant::now();
        let d = detector(3, 100, 2);
        assert_eq!(fail_until_ejected(&d, 0, t0), 3);
        // Two failures that read the flag before it was set, landing after the reset.
        d.slots[0].streak.fetch_add(2, Ordering::Relaxed);
        let back = t0 + BASE;
        assert!(!d.is_ejected(0, back));
        assert!(!d.record(0, true, back));
        assert!(!d.record(0, true, back), "two failures of three");
        assert!(d.record(0, true, back), "the third ejects");
    }

    /// What every request does on a backend that is not failing (ask whether it is
    /// ejected, report a success) takes no lock: it goes on while another thread
    /// holds the backend's lock. (Waits for that with a generous deadline: a
    /// version that locks blocks until the deadline and fails.)
    #[test]
    fn the_healthy_path_takes_no_lock() {
        let t0 = Instant::now();
        let d = detector(3, 100, 2);
        // A short streak, then a success: the reset is a plain store.
        assert!(!d.record(0, true, t0));
        let held = lock(&d.slots[0].slot);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let ejected = d.is_ejected(0, t0);
                let ejecting = d.record(0, false, t0);
                let again = d.record(0, false, t0);
                let failed = d.record(0, true, t0);
                let _ = done.send((ejected, ejecting, again, failed));
            });
            let outcome = finished.recv_timeout(Duration::from_secs(30));
            drop(held);
            assert_eq!(outcome, Ok((false, false, false, false)));
        });
        assert_eq!(
            d.slots[0].streak.load(Ordering::Relaxed),
            1,
            "reset, then one failure"
        );
    }

    proptest::proptest! {
        #[test]
        fn ejected_count_never_exceeds_the_cap(
            n in 1usize..12,
            percent in 0u8..=100,
            threshold in 1u32..4,
            ops in proptest::collection::vec(
                (0usize..12, proptest::bool::weighted(0.8), 0u64..20),
                0..300,
            ),
        ) {
            let d = detector(threshold, percent, n);
            let cap = if percent == 0 { 0 } else { (n * usize::from(percent) / 100).max(1) };
            proptest::prop_assert_eq!(d.max_ejected(), cap);
            let mut now = Instant::now();
            for (index, failed, advance_s) in ops {
                now += Duration::from_secs(advance_s);
                let ejected = d.record(index % n, failed, now);
                if ejected {
                    proptest::prop_assert!(d.is_ejected(index % n, now));
                }
                proptest::prop_assert!(d.ejected_count(now) <= cap);
            }
        }
    }
}
