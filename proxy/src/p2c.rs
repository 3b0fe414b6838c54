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
//! Thread safety, without locks: `pending` and the weights are atomics, and each
//! backend's estimate and the time it was taken (which must change together) are
//! packed into one `AtomicU64` (see [`Estimate`]), updated by compare-and-swap. A pick
//! is a few atomic loads (the criterion benchmark in `proxy/benches` times it).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::trace::IdGenerator;

/// Estimate for a backend that has not answered yet (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the exponential decay (Linkerd's `EWMA_DECAY`).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// A uniform draw in `0..n` from 64 random bits, by multiply-shift (Lemire): no
/// division on the request path. Also returns the product's low half, 64 bits that
/// are again uniform and independent of the draw, for a second draw.
fn below(random: u64, n: u64) -> (u64, u64) {
    let wide = u128::from(random) * u128::from(n);
    ((wide >> 64) as u64, wide as u64)
}

/// Draws per candidate before a pick falls back to scanning every backend.
const TRIES: usize = 4;

/// A latency estimate and when it was taken, packed into one `u64` so that both
/// change together in one atomic operation: the high half is the estimate in
/// nanoseconds as an `f32` (24 bits of precision, plenty to compare loads), the low
/// half the time in milliseconds since the balancer's epoch. That clock wraps every
/// ~49.7 days; time differences are taken wrapping, so only an estimate left
/// untouched for that long would be misread (and P2C samples every backend far more
/// often, since an idle backend's estimate decays toward zero and wins picks).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Estimate {
    rtt_ns: f32,
    at_ms: u32,
}

impl Estimate {
    fn pack(self) -> u64 {
        (u64::from(self.rtt_ns.to_bits()) << 32) | u64::from(self.at_ms)
    }

    fn unpack(word: u64) -> Self {
        Estimate {
            rtt_ns: f32::from_bits((word >> 32) as u32),
            at_ms: word as u32,
        }
    }

    /// Milliseconds from `at_ms` to `now_ms`; 0 when `now_ms` is earlier (a clock
    /// reading taken on another thread just before this one's update).
    fn elapsed_ms(self, now_ms: u32) -> u32 {
        let d = now_ms.wrapping_sub(self.at_ms);
        if d > u32::MAX / 2 {
            0
        } else {
            d
        }
    }
}

/// One backend's peak-EWMA latency estimate and in-flight request count, on a
/// cache line of its own: every request writes it twice (start, end), and backends
/// allocated side by side would otherwise share a line, so threads busy with
/// different backends would bounce it between them.
#[derive(Debug)]
#[repr(align(128))]
struct PeakEwma {
    estimate: AtomicU64,
    pending: AtomicU32,
}

/// `exp(x)`, by its Taylor series to the cube when `|x| < 1/64` (the case of two
/// estimates taken within 156 ms of each other at the default decay: nearly every
/// pick under traffic). The series is off by less than `x^4 / 24 < 2.5e-9` there,
/// below the `f32` precision of the estimates it scales, and costs a few
/// multiplications where `exp` is a libm call; `x = 0` gives exactly 1.
#[inline]
fn grow(x: f64) -> f64 {
    if x.abs() < 1.0 / 64.0 {
        // Horner's form, constants folded: no division.
        1.0 + x * (1.0 + x * (0.5 + x * (1.0 / 6.0)))
    } else {
        x.exp()
    }
}

/// `exp(-elapsed / decay)`: how much of the old estimate survives `elapsed_ms`.
fn survival(elapsed_ms: u32, per_decay_ms: f64) -> f64 {
    (-f64::from(elapsed_ms) * per_decay_ms).exp()
}

impl PeakEwma {
    /// A backend with no samples, estimated at [`DEFAULT_RTT`] as of `at_ms`.
    fn new(at_ms: u32) -> Self {
        let initial = Estimate {
            rtt_ns: DEFAULT_RTT.as_nanos() as f32,
            at_ms,
        };
        PeakEwma {
            estimate: AtomicU64::new(initial.pack()),
            pending: AtomicU32::new(0),
        }
    }

    fn estimate(&self) -> Estimate {
        Estimate::unpack(self.estimate.load(Ordering::Relaxed))
    }

    /// Requests started and not yet ended.
    fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The latency estimate at `now_ms` in nanoseconds, decayed toward zero since the
    /// last sample.
    fn rtt_ns(&self, now_ms: u32, per_decay_ms: f64) -> f64 {
        let e = self.estimate();
        f64::from(e.rtt_ns) * survival(e.elapsed_ms(now_ms), per_decay_ms)
    }

    fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self, now_ms: u32, rtt: Duration, per_decay_ms: f64) {
        // Saturating: an unmatched end() must not wrap to u32::MAX and shun the backend.
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| p.checked_sub(1));
        let sample = rtt.as_nanos() as f64;
        // A CAS loop: a concurrent update is folded in, never lost. Each closure call
        // returns Some, so the update always lands.
        let _ = self
            .estimate
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let e = Estimate::unpack(word);
                let elapsed = e.elapsed_ms(now_ms);
                let old = f64::from(e.rtt_ns);
                let rtt_ns = if sample > old {
                    sample
                } else {
                    let w = survival(elapsed, per_decay_ms);
                    old * w + sample * (1.0 - w)
                };
                let at_ms = if elapsed == 0 { e.at_ms } else { now_ms };
                Some(
                    Estimate {
                        rtt_ns: rtt_ns as f32,
                        at_ms,
                    }
                    .pack(),
                )
            });
    }
}

#[derive(Debug)]
pub struct P2c {
    /// Shared with the balancer this one was [carried](P2c::carried) from, so that
    /// requests still in flight on the old one settle into the same state.
    backends: Vec<Arc<PeakEwma>>,
    weights: Vec<AtomicU32>,
    /// The sum of `weights`, kept by `set_weight` (wrapping adds of differences).
    total: AtomicU64,
    decay: Duration,
    /// `1 / decay` in 1/ms (decay floored at 1 ms: a zero decay means "no memory"
    /// and must not divide by zero); a multiplication on the request path instead of
    /// a division.
    per_decay_ms: f64,
    /// Time zero of the estimates' millisecond clock.
    epoch: Instant,
    /// The candidates' random draws ([`P2c::random_bits`]): the per-thread
    /// splitmix64 streams trace ids come from (each on its own line), so a pick
    /// writes nothing another thread writes (one counter for the whole balancer was
    /// a store per pick to a line every picking thread read).
    random: Box<IdGenerator>,
}

impl P2c {
    /// One backend per weight, none sampled yet, decaying over [`DEFAULT_DECAY`].
    pub fn new(weights: &[u32], now: Instant) -> Self {
        Self::with_decay(weights, now, DEFAULT_DECAY)
    }

    pub fn with_decay(weights: &[u32], now: Instant, decay: Duration) -> Self {
        P2c {
            backends: weights.iter().map(|_| Arc::new(PeakEwma::new(0))).collect(),
            weights: weights.iter().map(|w| AtomicU32::new(*w)).collect(),
            total: AtomicU64::new(weights.iter().map(|w| u64::from(*w)).sum()),
            decay,
            per_decay_ms: 1.0 / (decay.as_secs_f64() * 1e3).max(1.0),
            epoch: now,
            random: Box::default(),
        }
    }

    /// A balancer over a new backend set in which backend `i` is `previous`'s
    /// backend `from[i]` where that is `Some`: it keeps its latency estimate and
    /// pending count (the very same state, shared: requests in flight on `previous`
    /// still settle into it). The others start fresh, as in [`P2c::new`]. The clock
    /// (epoch) and decay are `previous`'s, so carried estimates keep their ages.
    pub fn carried(weights: &[u32], now: Instant, previous: &P2c, from: &[Option<usize>]) -> Self {
        let at_ms = previous.ms(now);
        let backends = (0..weights.len())
            .map(|i| {
                match from
                    .get(i)
                    .copied()
                    .flatten()
                    .and_then(|j| previous.backends.get(j))
                {
                    Some(kept) => Arc::clone(kept),
                    None => Arc::new(PeakEwma::new(at_ms)),
                }
            })
            .collect();
        P2c {
            backends,
            weights: weights.iter().map(|w| AtomicU32::new(*w)).collect(),
            total: AtomicU64::new(weights.iter().map(|w| u64::from(*w)).sum()),
            decay: previous.decay,
            per_decay_ms: previous.per_decay_ms,
            epoch: previous.epoch,
            random: Box::default(),
        }
    }

    /// 64 random bits for a pick's candidates, from the calling thread's stream.
    pub fn random_bits(&self) -> u64 {
        self.random.next()
    }

    /// `now` on the estimates' millisecond clock (wrapping, see [`Estimate`]).
    fn ms(&self, now: Instant) -> u32 {
        let d = now.saturating_duration_since(self.epoch);
        // u64 arithmetic (`as_millis` goes through u128); truncation wraps on purpose.
        d.as_secs()
            .wrapping_mul(1_000)
            .wrapping_add(u64::from(d.subsec_millis())) as u32
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
            let old = w.swap(weight, Ordering::Relaxed);
            self.total.fetch_add(
                u64::from(weight).wrapping_sub(u64::from(old)),
                Ordering::Relaxed,
            );
        }
    }

    /// Picks two distinct candidates (weighted random by weight, zero weight never
    /// picked, `skip(i)` excludes `i`) and returns the one with the lower load
    /// (see [`P2c::cost`]); with one eligible backend, that one. `None` when none is
    /// eligible.
    pub fn pick(
        &self,
        random: &mut impl FnMut() -> u64,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let (first, second) = self.candidates(random, &skip)?;
        let Some(second) = second else {
            return Some(first);
        };
        // Which of two random candidates is cheaper is a coin flip to the branch
        // predictor: select by a mask, not by a branch mispredicted half the time
        // (`std::hint::select_unpredictable` still compiled to a branch here).
        let mask = usize::from(self.cheaper(second, first, |i| self.weight(i))).wrapping_neg();
        Some(first ^ ((first ^ second) & mask))
    }

    /// The two candidates of a pick: the first drawn by weight among the eligible
    /// backends, the second among the others.
    ///
    /// The first is drawn over every backend by weight (the running total: no pass
    /// over the backends' eligibility) and redrawn while it lands on an excluded one;
    /// accepting the first eligible draw is exactly a draw by weight among the
    /// eligible. The second is drawn the same way over the backends other than the
    /// first (their total is the total less the first's weight), so it never has to
    /// be redrawn for landing on the first. After [`TRIES`] misses (most weight
    /// excluded, e.g. on a retry) a candidate is drawn by scanning instead.
    fn candidates(
        &self,
        random: &mut impl FnMut() -> u64,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<(usize, Option<usize>)> {
        let total = self.total.load(Ordering::Relaxed);
        if total == 0 {
            return None;
        }
        // One random word serves two draws (`below` returns fresh low bits).
        let mut bits = random();
        let first = match self.draw_eligible(total, usize::MAX, &mut bits, random, skip) {
            Some(first) => first,
            None => return self.candidates_by_scan(random, skip),
        };
        let others = total.saturating_sub(u64::from(self.weight(first)));
        let second = match others {
            0 => None,
            _ => match self.draw_eligible(others, first, &mut bits, random, skip) {
                Some(second) => Some(second),
                // The first stands (it was drawn exactly); only the second is scanned for.
                None => self.second_by_scan(random(), first, skip),
            },
        };
        Some((first, second))
    }

    /// A draw by weight among the backends other than `exclude` (`of` is their
    /// total), redrawn while it lands on one `skip` excludes; `None` after
    /// [`TRIES`] misses, or when the weights shrank under us (slow start).
    #[inline(always)]
    fn draw_eligible(
        &self,
        of: u64,
        exclude: usize,
        bits: &mut u64,
        random: &mut impl FnMut() -> u64,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        for attempt in 0..TRIES {
            if attempt > 0 && attempt % 2 == 0 {
                *bits = random();
            }
            let (target, rest) = below(*bits, of);
            *bits = rest;
            let i = self.draw_flat(target, exclude);
            if i >= self.len() {
                return None;
            }
            if !skip(i) {
                return Some(i);
            }
        }
        None
    }

    /// The backend whose cumulative-weight interval holds `target`, `exclude`
    /// counting as weight 0; `len()` when `target` is past the sum.
    ///
    /// Why not [`Self::draw`]: its early return is a branch on a random number, and
    /// mispredicting it (about once per draw) was most of a pick's cost. Here every
    /// backend is visited and the index is a count: the number of cumulative sums
    /// at or below `target` is the index of the first one above it (zero weights
    /// leave the sum unchanged and are counted past).
    #[inline]
    fn draw_flat(&self, target: u64, exclude: usize) -> usize {
        let mut sum = 0u64;
        let mut index = 0usize;
        for (i, w) in self.weights.iter().enumerate() {
            let w = u64::from(w.load(Ordering::Relaxed));
            sum += if i == exclude { 0 } else { w };
            index += usize::from(sum <= target);
        }
        index
    }

    /// [`Self::candidates`] by scanning every backend's weight and eligibility.
    fn candidates_by_scan(
        &self,
        random: &mut impl FnMut() -> u64,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<(usize, Option<usize>)> {
        let weight = |i: usize| if skip(i) { 0 } else { self.weight(i) };
        let total: u64 = (0..self.len()).map(|i| u64::from(weight(i))).sum();
        if total == 0 {
            return None;
        }
        let (target, leftover) = below(random(), total);
        // A weight may change between the sum and the draw (another thread): fall
        // back to any eligible backend rather than fail the pick.
        let first = self
            .draw(target, weight)
            .or_else(|| (0..self.len()).find(|i| weight(*i) > 0))?;
        Some((first, self.second_by_scan(leftover, first, skip)))
    }

    /// A second candidate by weight among the eligible backends other than `first`.
    fn second_by_scan(
        &self,
        random: u64,
        first: usize,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let others = |i: usize| {
            if i == first || skip(i) {
                0
            } else {
                self.weight(i)
            }
        };
        let rest: u64 = (0..self.len()).map(|i| u64::from(others(i))).sum();
        if rest == 0 {
            return None;
        }
        self.draw(below(random, rest).0, others)
    }

    /// Whether `a`'s load is below `b`'s. The same comparison as [`P2c::cost`] with one
    /// `exp` instead of two: both estimates decay at the same rate, so only the
    /// difference of their ages matters.
    ///
    /// Without divisions or a clock: with `l = rtt * (pending + 1)`, `w` the weight and
    /// `t` when the estimate was taken,
    ///   `l_a / w_a * exp(-(now - t_a) / d)  <  l_b / w_b * exp(-(now - t_b) / d)`
    /// holds exactly when `l_a * w_b * exp((t_a - t_b) / d)  <  l_b * w_a`: `now`
    /// cancels out. (`cost` counts an estimate stamped after `now`, by another thread,
    /// as 0 ms old; here it counts as its true age, a difference of microseconds.)
    fn cheaper(&self, a: usize, b: usize, weight: impl Fn(usize) -> u32) -> bool {
        let (Some(ea), Some(eb)) = (self.backends.get(a), self.backends.get(b)) else {
            return false;
        };
        let (wa, wb) = (weight(a), weight(b));
        if wa == 0 || wb == 0 {
            return wb == 0 && wa > 0;
        }
        let (sa, sb) = (ea.estimate(), eb.estimate());
        let load = |e: &PeakEwma, s: Estimate| {
            f64::from(s.rtt_ns) * f64::from(e.pending().saturating_add(1))
        };
        let la = load(ea, sa) * f64::from(wb);
        let lb = load(eb, sb) * f64::from(wa);
        // The wrapping difference of the two stamps, as a signed number of ms.
        let shift = sa.at_ms.wrapping_sub(sb.at_ms) as i32;
        la * grow(f64::from(shift) * self.per_decay_ms) < lb
    }

    /// The backend whose cumulative-weight interval contains `target`.
    fn draw(&self, mut target: u64, weight: impl Fn(usize) -> u32) -> Option<usize> {
        for i in 0..self.len() {
            let w = u64::from(weight(i));
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
            b.end(self.ms(now), rtt, self.per_decay_ms);
        }
    }

    /// Requests to `index` in flight.
    pub fn pending(&self, index: usize) -> u32 {
        self.backends.get(index).map_or(0, |b| b.pending())
    }

    /// The load `pick` compares: estimated latency in nanoseconds times
    /// `(pending + 1)`, divided by the weight. Infinite for a zero weight or an index
    /// out of range.
    pub fn cost(&self, index: usize, now: Instant) -> f64 {
        self.load(index, self.ms(now), self.weight(index))
    }

    fn load(&self, index: usize, now_ms: u32, weight: u32) -> f64 {
        let Some(b) = self.backends.get(index) else {
            return f64::INFINITY;
        };
        if weight == 0 {
            return f64::INFINITY;
        }
        b.rtt_ns(now_ms, self.per_decay_ms) * f64::from(b.pending().saturating_add(1))
            / f64::from(weight)
    }
}

#[cfg(test)]
mod tests;
