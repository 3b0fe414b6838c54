//! Power of two choices over peak-EWMA latency: Linkerd's default balancer
//! (Finagle's "P2C + peak EWMA", as in tower's `p2c` + `PeakEwma`), with weights.
//!
//! Why: round robin keeps sending a slow or overloaded backend its full share. Here
//! each pick draws two distinct candidates at random and takes the less loaded one,
//! where load = `rtt_estimate * (pending + 1) / weight`. Comparing two random
//! candidates (not all of them) avoids herding: every proxy that saw the same "best"
//! backend would otherwise pile onto it at once.
//!
//! The latency estimate is a *peak* EWMA, per backend:
//! - a sample above the current estimate replaces it at once, so a backend that turns
//!   slow is avoided from its very next response;
//! - a sample below it pulls the estimate down with weight `1 - exp(-elapsed / decay)`,
//!   where `elapsed` is the time since the previous update, so recovery is gradual and
//!   depends on time, not on how many responses arrive;
//! - between samples the estimate decays toward zero on the same time constant. A
//!   backend that was slow once and then got no traffic therefore looks cheaper as time
//!   passes and is tried again, instead of being shunned forever on stale data.
//!
//! Constants: `decay` defaults to [`DEFAULT_DECAY`] (10 s, Linkerd's `EWMA_DECAY`); a
//! backend with no samples yet starts at [`DEFAULT_RTT`] (30 ms, Linkerd's default
//! RTT), so a new backend is preferred over any backend measured slower than that and
//! is sampled soon, but does not win every pick against fast, measured backends.
//!
//! Weights: candidates are drawn with probability proportional to weight (zero weight
//! is never drawn), and the load is divided by the weight, so at equal latency the
//! in-flight requests settle in proportion to the weights. Weights can be changed in
//! place with [`P2c::set_weight`] (slow start) without losing the latency state.
//!
//! Invariants: `pick` returns only an index with weight > 0 that `skip` does not
//! exclude; it is `None` only when no such index exists. `pending` never underflows
//! (an `end` without a `start` is ignored).
//!
//! Thread safety: `pending` and the weights are atomics. Each backend's estimate (an
//! `f64` and the `Instant` it was taken at, which must change together) sits in its own
//! `Mutex`, held for a few float operations; a pick takes two of them, one at a time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Estimate for a backend that has not answered yet (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the exponential decay (Linkerd's `EWMA_DECAY`).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Estimate {
    rtt_ns: f64,
    at: Instant,
}

/// One backend's peak-EWMA latency estimate and in-flight request count.
#[derive(Debug)]
pub struct PeakEwma {
    estimate: Mutex<Estimate>,
    pending: AtomicU32,
}

/// `exp(-elapsed / decay)`: how much of the old estimate survives `elapsed`.
fn survival(elapsed: Duration, decay: Duration) -> f64 {
    // A zero decay means "no memory"; the max() avoids 0/0.
    let decay_ns = (decay.as_nanos() as f64).max(1.0);
    (-(elapsed.as_nanos() as f64) / decay_ns).exp()
}

impl PeakEwma {
    /// A backend with no samples, estimated at [`DEFAULT_RTT`] as of `now`.
    pub fn new(now: Instant) -> Self {
        PeakEwma {
            estimate: Mutex::new(Estimate {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                at: now,
            }),
            pending: AtomicU32::new(0),
        }
    }

    fn estimate(&self) -> MutexGuard<'_, Estimate> {
        // Always a valid (value, instant) pair: a poisoned lock is simply taken over.
        self.estimate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests started and not yet ended.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The latency estimate at `now` in nanoseconds, decayed toward zero since the
    /// last sample.
    pub fn rtt_ns(&self, now: Instant, decay: Duration) -> f64 {
        let e = *self.estimate();
        e.rtt_ns * survival(now.saturating_duration_since(e.at), decay)
    }

    fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self, now: Instant, rtt: Duration, decay: Duration) {
        // Saturating: an unmatched end() must not wrap to u32::MAX and shun the backend.
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| p.checked_sub(1));
        let sample = rtt.as_nanos() as f64;
        let mut e = self.estimate();
        let w = survival(now.saturating_duration_since(e.at), decay);
        e.rtt_ns = if sample > e.rtt_ns {
            sample
        } else {
            e.rtt_ns * w + sample * (1.0 - w)
        };
        // Another thread may have updated with a later clock reading.
        e.at = e.at.max(now);
    }
}

#[derive(Debug)]
pub struct P2c {
    backends: Vec<PeakEwma>,
    weights: Vec<AtomicU32>,
    decay: Duration,
}

impl P2c {
    /// One backend per weight, none sampled yet, decaying over [`DEFAULT_DECAY`].
    pub fn new(weights: &[u32], now: Instant) -> Self {
        Self::with_decay(weights, now, DEFAULT_DECAY)
    }

    pub fn with_decay(weights: &[u32], now: Instant, decay: Duration) -> Self {
        P2c {
            backends: weights.iter().map(|_| PeakEwma::new(now)).collect(),
            weights: weights.iter().map(|w| AtomicU32::new(*w)).collect(),
            decay,
        }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn decay(&self) -> Duration {
        self.decay
    }

    fn weight(&self, index: usize) -> u32 {
        self.weights
            .get(index)
            .map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Changes a weight in place, keeping the latency state (for slow start: set
    /// `slowstart::effective_weight(..)` as it ramps). Out-of-range indexes are ignored.
    pub fn set_weight(&self, index: usize, weight: u32) {
        if let Some(w) = self.weights.get(index) {
            w.store(weight, Ordering::Relaxed);
        }
    }

    /// Picks two distinct candidates (weighted random by weight, zero weight never
    /// picked, `skip(i)` excludes `i`) and returns the one with the lower load
    /// (see [`P2c::cost`]); with one eligible backend, that one. `None` when none is
    /// eligible. Calls `random` at most twice.
    pub fn pick(
        &self,
        now: Instant,
        random: &mut impl FnMut() -> u64,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let eligible = |i: usize| self.weight(i) > 0 && !skip(i);
        let total: u64 = (0..self.len())
            .filter(|i| eligible(*i))
            .map(|i| u64::from(self.weight(i)))
            .sum();
        if total == 0 {
            return None;
        }
        // `skip` or a weight may change between passes (another thread); fall back to
        // any eligible backend rather than fail the pick.
        let first = self
            .draw(random() % total, eligible)
            .or_else(|| (0..self.len()).find(|i| eligible(*i)))?;
        let rest = total.saturating_sub(u64::from(self.weight(first)));
        if rest == 0 {
            return Some(first);
        }
        let Some(second) = self.draw(random() % rest, |i| i != first && eligible(i)) else {
            return Some(first);
        };
        if self.cost(second, now) < self.cost(first, now) {
            Some(second)
        } else {
            Some(first)
        }
    }

    /// The eligible backend whose cumulative-weight interval contains `target`.
    fn draw(&self, mut target: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        for i in (0..self.len()).filter(|i| eligible(*i)) {
            let w = u64::from(self.weight(i));
            if target < w {
                return Some(i);
            }
            target -= w;
        }
        None
    }

    /// A request to `index` begins.
    pub fn start(&self, index: usize) {
        if let Some(b) = self.backends.get(index) {
            b.start();
        }
    }

    /// A request to `index` that took `rtt` ended (successfully or not: a timeout's
    /// `rtt` is a useful peak too). Ignored for an index out of range.
    pub fn end(&self, index: usize, now: Instant, rtt: Duration) {
        if let Some(b) = self.backends.get(index) {
            b.end(now, rtt, self.decay);
        }
    }

    /// Requests to `index` in flight.
    pub fn pending(&self, index: usize) -> u32 {
        self.backends.get(index).map_or(0, PeakEwma::pending)
    }

    /// The load `pick` compares: estimated latency in nanoseconds times
    /// `(pending + 1)`, divided by the weight. Infinite for a zero weight or an index
    /// out of range.
    pub fn cost(&self, index: usize, now: Instant) -> f64 {
        let (Some(b), weight) = (self.backends.get(index), self.weight(index)) else {
            return f64::INFINITY;
        };
        if weight == 0 {
            return f64::INFINITY;
        }
        b.rtt_ns(now, self.decay) * f64::from(b.pending().saturating_add(1)) / f64::from(weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// splitmix64: a deterministic stand-in for the proxy's random source.
    fn rng(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Runs `ticks` 1 ms ticks, one request per tick; a request to `i` is in flight
    /// for `rtts[i]` and then reports it. Returns picks per backend.
    fn simulate(p2c: &P2c, t0: Instant, rtts: &[Duration], ticks: u64) -> Vec<usize> {
        let mut random = rng(7);
        let mut in_flight: Vec<(Instant, usize)> = Vec::new();
        let mut picks = vec![0; rtts.len()];
        for tick in 0..ticks {
            let now = t0 + MS * tick as u32;
            in_flight.retain(|(done, i)| {
                if *done <= now {
                    p2c.end(*i, now, rtts[*i]);
                    false
                } else {
                    true
                }
            });
            if let Some(i) = p2c.pick(now, &mut random, |_| false) {
                p2c.start(i);
                picks[i] += 1;
                in_flight.push((now + rtts[i], i));
            }
        }
        picks
    }

    #[test]
    fn the_fast_backend_gets_the_large_majority() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[1, 1], t0);
        let picks = simulate(&p2c, t0, &[MS, MS * 50], 5_000);
        assert!(picks[0] > 9 * picks[1], "picks: {picks:?}");
    }

    #[test]
    fn weights_bias_the_split_at_equal_latency() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[3, 1], t0);
        let picks = simulate(&p2c, t0, &[MS * 20, MS * 20], 5_000);
        let heavy = picks[0] as f64 / 5_000.0;
        // In-flight counts settle where (p0 + 1) / 3 == (p1 + 1) / 1, about 0.79.
        assert!((0.65..0.9).contains(&heavy), "picks: {picks:?}");
    }

    #[test]
    fn a_slow_sample_shows_at_once_and_recovery_is_gradual() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[1], t0);
        let mut now = t0;
        for _ in 0..1_200 {
            now += MS * 100;
            p2c.end(0, now, MS);
        }
        assert!((p2c.cost(0, now) / 1e6 - 1.0).abs() < 0.01);
        p2c.end(0, now, MS * 100);
        assert_eq!(p2c.cost(0, now), 100e6);
        for _ in 0..10 {
            now += MS * 100;
            p2c.end(0, now, MS);
        }
        // One second of fast answers: exp(-1/10) ≈ 0.9 of the peak is still there.
        assert!(p2c.cost(0, now) > 80e6, "{}", p2c.cost(0, now));
        for _ in 0..1_000 {
            now += MS * 100;
            p2c.end(0, now, MS);
        }
        assert!(p2c.cost(0, now) < 1.1e6, "{}", p2c.cost(0, now));
    }

    #[test]
    fn pending_requests_raise_the_cost() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[1, 2], t0);
        assert_eq!(p2c.cost(0, t0), DEFAULT_RTT.as_nanos() as f64);
        assert_eq!(p2c.cost(1, t0), DEFAULT_RTT.as_nanos() as f64 / 2.0);
        p2c.start(0);
        p2c.start(0);
        assert_eq!(p2c.pending(0), 2);
        assert_eq!(p2c.cost(0, t0), 3.0 * DEFAULT_RTT.as_nanos() as f64);
        p2c.end(0, t0, DEFAULT_RTT);
        p2c.end(0, t0, DEFAULT_RTT);
        p2c.end(0, t0, DEFAULT_RTT);
        assert_eq!(p2c.pending(0), 0);
    }

    #[test]
    fn an_unsampled_backend_is_tried() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[1, 1], t0);
        p2c.end(0, t0, MS * 50);
        let mut random = rng(1);
        assert_eq!(p2c.pick(t0, &mut random, |_| false), Some(1));
    }

    #[test]
    fn an_idle_slow_backend_is_retried_as_its_estimate_decays() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[1, 1], t0);
        p2c.end(0, t0, MS * 500);
        p2c.end(1, t0, MS * 5);
        let mut random = rng(1);
        let later = t0 + Duration::from_secs(5);
        p2c.end(1, later, MS * 5);
        assert_eq!(p2c.pick(later, &mut random, |_| false), Some(1));
        // 500 ms * exp(-50 s / 10 s) ≈ 3.4 ms, below the fast backend's 5 ms.
        let much_later = later + Duration::from_secs(45);
        p2c.end(1, much_later, MS * 5);
        assert_eq!(p2c.pick(much_later, &mut random, |_| false), Some(0));
    }

    #[test]
    fn zero_weights_and_skipped_backends_are_never_picked() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[0, 2, 1], t0);
        let mut random = rng(3);
        for _ in 0..200 {
            assert_ne!(p2c.pick(t0, &mut random, |_| false), Some(0));
            assert_eq!(p2c.pick(t0, &mut random, |i| i == 1), Some(2));
        }
        assert_eq!(p2c.pick(t0, &mut random, |i| i != 0), None);
        assert_eq!(P2c::new(&[], t0).pick(t0, &mut random, |_| false), None);
        p2c.set_weight(0, 5);
        p2c.set_weight(9, 5);
        assert_eq!(p2c.pick(t0, &mut random, |i| i != 0), Some(0));
    }

    #[test]
    fn unmatched_end_does_not_underflow() {
        let t0 = Instant::now();
        let p2c = P2c::new(&[1], t0);
        p2c.end(0, t0, MS);
        p2c.end(4, t0, MS);
        p2c.start(4);
        assert_eq!(p2c.pending(0), 0);
        assert_eq!(p2c.cost(4, t0), f64::INFINITY);
    }

    #[test]
    fn is_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<P2c>();
    }

    proptest::proptest! {
        #[test]
        fn picks_only_eligible_backends_and_none_only_when_there_are_none(
            weights in proptest::collection::vec(0u32..5, 0..8),
            skipped in proptest::collection::vec(proptest::bool::ANY, 8),
            seed in proptest::num::u64::ANY,
        ) {
            let t0 = Instant::now();
            let p2c = P2c::new(&weights, t0);
            let mut random = rng(seed);
            let any_eligible = weights.iter().zip(&skipped).any(|(w, s)| *w > 0 && !s);
            for _ in 0..20 {
                match p2c.pick(t0, &mut random, |i| skipped[i]) {
                    Some(i) => {
                        proptest::prop_assert!(weights[i] > 0 && !skipped[i]);
                    }
                    None => proptest::prop_assert!(!any_eligible),
                }
            }
        }
    }
}
