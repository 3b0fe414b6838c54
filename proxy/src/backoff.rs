//! Reconnection backoff, one for every background client (the control-plane
//! stream, Redis): exponential steps from `min` to `max`, each wait a random part
//! of its step ("full jitter"), so a fleet of proxies that lost the same server at
//! the same moment does not come back at the same moment either.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The shortest wait ever returned: a random part of a step can be near zero,
/// which would turn a refused connection into a busy loop.
const FLOOR: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    /// xorshift64 state: the jitter needs spread, not secrecy.
    rng: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        // RandomState is seeded per process (and per instance): no shared state.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Backoff {
            min,
            max: max.max(min),
            step: min,
            rng: h.finish() | 1,
        }
    }

    /// After a success: the next failure waits little again.
    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// The current step, before jitter (for logs).
    pub fn step(&self) -> Duration {
        self.step
    }

    /// The wait before the next attempt, then the step doubles (up to `max`).
    pub fn next_wait(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        let wait = self.step.mul_f64(fraction).max(FLOOR.min(self.step));
        self.step = (self.step * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_max_and_waits_stay_within_the_step() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let mut step = min;
        for _ in 0..20 {
            assert_eq!(b.step(), step);
            let wait = b.next_wait();
            assert!(wait <= step && wait >= FLOOR, "{wait:?} outside {step:?}");
            step = (step * 2).min(max);
        }
        b.reset();
        assert_eq!(b.step(), min);
    }

    #[test]
    fn two_backoffs_do_not_wait_alike() {
        let max = Duration::from_secs(5);
        let mut a = Backoff::new(max, max);
        let mut b = Backoff::new(max, max);
        let same = (0..16).filter(|_| a.next_wait() == b.next_wait()).count();
        assert!(same < 16, "two instances drew the same 16 waits");
    }
}
