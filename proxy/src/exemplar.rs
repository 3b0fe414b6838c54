//! Exemplars of a histogram: per bucket, the latest traced observation that fell in
//! it (its trace id, its value, when).
//!
//! Why: a latency panel shows that p99 rose; an exemplar on the bucket links it to
//! one trace of a request that took that long. The prometheus crate keeps no
//! exemplars, so each route's duration histogram keeps an [`Exemplars`] beside it
//! (`series::RouteLive`), and the OpenMetrics exposition (`openmetrics`) writes them.
//!
//! Cost and bounds:
//! - only observations that carry a trace id (sampled traces: a small fraction of
//!   requests) touch the store; the others pay nothing, not even a load;
//! - a store holds at most one exemplar per bucket, each replacing the last: its
//!   size is fixed by the histogram's buckets, whatever the traffic;
//! - the slots are allocated at the first exemplar, so a histogram that never sees
//!   a sampled request costs its bounds and a pointer;
//! - a writer never waits: it takes its bucket's slot with `try_lock`, and when
//!   another request or a scrape holds it at that instant, its exemplar is dropped
//!   (the next one takes the slot: "latest" is within a few requests, which is all
//!   an exemplar promises);
//! - a store lives and dies with its histogram: series that expire lose their
//!   exemplars with them, and a remade histogram (new buckets) starts with none.

use std::sync::{Mutex, OnceLock, PoisonError, TryLockError};
use std::time::{SystemTime, UNIX_EPOCH};

/// One exemplar: the trace of an observation, its value and when it was made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    /// The W3C trace id. Never 0: an all-zero trace id is invalid, so 0 marks an
    /// empty slot.
    pub trace_id: u128,
    /// The observed value (seconds, for the duration histograms).
    pub value: f64,
    /// When it was observed, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// An empty slot.
const NONE: Exemplar = Exemplar {
    trace_id: 0,
    value: 0.0,
    timestamp_ms: 0,
};

impl Exemplar {
    /// The exemplar of `value` observed at `at` in trace `trace_id`, spelled as in a
    /// `traceparent` (32 lower-case hex digits, not all zero); `None` for anything
    /// else, so the exposition only ever writes a valid trace id.
    pub fn new(trace_id: &str, value: f64, at: SystemTime) -> Option<Self> {
        let hex = trace_id.len() == 32
            && trace_id
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex {
            return None;
        }
        let trace_id = u128::from_str_radix(trace_id, 16)
            .ok()
            .filter(|&id| id != 0)?;
        let timestamp_ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Some(Exemplar {
            trace_id,
            value,
            timestamp_ms,
        })
    }
}

/// The latest exemplar of each bucket of one histogram.
pub struct Exemplars {
    /// The histogram's upper bounds, ascending, without +Inf (the bucket past the
    /// last bound).
    bounds: Box<[f64]>,
    /// One per bucket, +Inf last; made at the first exemplar.
    slots: OnceLock<Box<[Mutex<Exemplar>]>>,
}

impl Exemplars {
    /// A store for a histogram with upper bounds `bounds` (ascending, as the
    /// histogram was made with; +Inf is implied).
    pub fn new(bounds: &[f64]) -> Self {
        Exemplars {
            bounds: bounds.into(),
            slots: OnceLock::new(),
        }
    }

    /// The bucket `value` is counted in, as the histogram counts it: the first whose
    /// bound is at least `value`, else +Inf.
    pub fn bucket(&self, value: f64) -> usize {
        self.bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len())
    }

    /// Makes the observation of `value` at `at` in trace `trace_id` the exemplar of
    /// its bucket; nothing when the trace id is not one (see [`Exemplar::new`]) or
    /// the slot is busy this instant.
    pub fn record(&self, trace_id: &str, value: f64, at: SystemTime) {
        let Some(exemplar) = Exemplar::new(trace_id, value, at) else {
            return;
        };
        // Racing first exemplars wait for one allocation, once per histogram.
        let slots = self
            .slots
            .get_or_init(|| (0..=self.bounds.len()).map(|_| Mutex::new(NONE)).collect());
        let Some(slot) = slots.get(self.bucket(value)) else {
            return;
        };
        match slot.try_lock() {
            Ok(mut held) => *held = exemplar,
            // Nothing panics while holding a slot; a copy cannot be torn anyway.
            Err(TryLockError::Poisoned(poisoned)) => *poisoned.into_inner() = exemplar,
            Err(TryLockError::WouldBlock) => {}
        }
    }

    /// The latest exemplar of every bucket that has one, in bucket order.
    pub fn latest(&self) -> Vec<Exemplar> {
        let Some(slots) = self.slots.get() else {
            return Vec::new();
        };
        slots
            .iter()
            .map(|slot| *slot.lock().unwrap_or_else(PoisonError::into_inner))
            .filter(|e| e.trace_id != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    const ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn takes_only_trace_ids_spelled_as_in_a_traceparent() {
        let e = Exemplar::new(ID, 0.25, at(1_733_390_000_123)).expect("valid");
        assert_eq!(e.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(e.timestamp_ms, 1_733_390_000_123);
        for bad in [
            "4BF92F3577B34DA6A3CE929D0E0E4736",
            "00000000000000000000000000000000",
            "4bf92f3577b34da6a3ce929d0e0e473",
            "4bf92f3577b34da6a3ce929d0e0e47360",
            "+bf92f3577b34da6a3ce929d0e0e4736",
            "",
        ] {
            assert_eq!(Exemplar::new(bad, 0.25, at(0)), None, "{bad:?}");
        }
    }

    #[test]
    fn places_a_value_in_the_first_bucket_whose_bound_is_at_least_it() {
        let store = Exemplars::new(&[0.1, 0.25, 1.0]);
        assert_eq!(store.bucket(0.0), 0);
        assert_eq!(store.bucket(0.1), 0);
        assert_eq!(store.bucket(0.100_001), 1);
        assert_eq!(store.bucket(0.25), 1);
        assert_eq!(store.bucket(1.0), 2);
        assert_eq!(store.bucket(1.5), 3, "+Inf");
    }

    #[test]
    fn keeps_the_latest_exemplar_of_each_bucket() {
        let store = Exemplars::new(&[0.1, 1.0]);
        assert!(store.latest().is_empty());
        let other = "0af7651916cd43dd8448eb211c80319c";
        store.record(ID, 0.05, at(1));
        store.record(ID, 5.0, at(2));
        store.record(other, 0.07, at(3));
        assert_eq!(
            store.latest(),
            vec![
                Exemplar::new(other, 0.07, at(3)).expect("valid"),
                Exemplar::new(ID, 5.0, at(2)).expect("valid"),
            ]
        );
    }

    #[test]
    fn ignores_observations_without_a_valid_trace_id() {
        let store = Exemplars::new(&[0.1]);
        store.record("not-a-trace-id", 0.05, at(1));
        assert!(store.latest().is_empty());
        assert!(store.slots.get().is_none(), "nothing allocated");
    }

    #[test]
    fn concurrent_writers_leave_one_whole_exemplar_per_bucket() {
        let store = Arc::new(Exemplars::new(&[0.1, 1.0]));
        let ids: Vec<String> = (1..=4u128).map(|i| format!("{i:032x}")).collect();
        std::thread::scope(|s| {
            for (i, id) in ids.iter().enumerate() {
                let store = Arc::clone(&store);
                s.spawn(move || {
                    for n in 0..1000u64 {
                        store.record(id, 0.05, at(n * 10 + i as u64));
                    }
                });
            }
        });
        let latest = store.latest();
        assert_eq!(latest.len(), 1);
        // Whole: its trace id and its timestamp come from the same write.
        let e = latest[0];
        assert_eq!((e.timestamp_ms % 10) as u128 + 1, e.trace_id, "{e:?}");
    }
}
