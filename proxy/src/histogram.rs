//! A route's duration histogram whose observations do not share cache lines
//! between worker threads: each thread counts into a shard of its own, and a scrape
//! adds the shards up.
//!
//! Why: every request observes its route's histogram, and the Prometheus crate's
//! histogram writes four shared atomics per observation (its hot/cold shard switch,
//! the bucket, the sum, the count). With one route busy on every thread, those lines
//! bounce between cores on each request: criterion's `contention/request metrics`
//! row (proxy/benches/contention.rs, bench/RESULTS.md) grew from 41 to 128-191 ns per
//! request at two threads. A shard here is two relaxed adds on lines only its
//! thread writes.
//!
//! What a scrape reads is what the Prometheus histogram exported (same name, help,
//! labels, bucket bounds; the `+Inf` bucket is the count, as there), with one
//! difference in consistency: `_count` is the sum of the bucket counts read in the
//! same pass, so it always equals the `+Inf` bucket; `_sum` is read beside them and
//! may include an observation or two that the buckets read just before did not
//! (the Prometheus histogram paid a lock and a wait per scrape for exact agreement;
//! `rate(_sum)/rate(_count)` is unaffected over any real window).
//!
//! Invariants: bounds are ascending and finite; a value counts in the first bucket
//! whose bound is >= it (Prometheus' `le`), above them all only in the count; the
//! sum is kept in whole nanoseconds (exact; it wraps after 584 years of request
//! time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};

use crate::shard::{thread_ordinal, CacheLine};

/// Cells per cache line pair (128 bytes: a line and the one the hardware
/// prefetches beside it).
const CELLS: usize = 16;

/// 128 bytes of counters, aligned so no two shards ever share a line.
type Line = CacheLine<[AtomicU64; CELLS]>;

pub struct ShardedHistogram {
    name: String,
    help: String,
    labels: Vec<(String, String)>,
    /// Upper bounds, ascending, finite.
    bounds: Box<[f64]>,
    /// Shard after shard, `lines` each: a shard's cells are its buckets' counts
    /// (`bounds.len()` of them), the count above every bound, then the sum in
    /// nanoseconds.
    cells: Box<[Line]>,
    lines: usize,
    shards: usize,
    /// `shards - 1`: shards are a power of two, so a thread's is a mask away (a
    /// division by a count known only at run time cost more than the adds).
    mask: usize,
}

impl ShardedHistogram {
    /// A histogram of `shards` shards (at least one, rounded up to a power of two) with these bounds; `labels`
    /// are exported as given (sorted by name, as Prometheus' const labels are).
    pub fn new(
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        bounds: Vec<f64>,
        shards: usize,
    ) -> Self {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        let shards = shards.max(1).next_power_of_two();
        let lines = (bounds.len() + 2).div_ceil(CELLS);
        ShardedHistogram {
            name: name.to_owned(),
            help: help.to_owned(),
            labels,
            bounds: bounds.into_boxed_slice(),
            cells: (0..shards * lines).map(|_| Line::default()).collect(),
            lines,
            shards,
            mask: shards - 1,
        }
    }

    fn cell(&self, shard: usize, i: usize) -> &AtomicU64 {
        &self.cells[shard * self.lines + i / CELLS][i % CELLS]
    }

    /// How many shards it has (a power of two).
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Counts one observation of `elapsed`, in the calling thread's shard.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        // A scan from the smallest bound, as the Prometheus histogram does: most
        // requests land in the first few buckets, found sooner than by bisection,
        // whose chain of dependent compares cost ~10 ns per observation.
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        let shard = thread_ordinal() & self.mask;
        self.cell(shard, bucket).fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.cell(shard, self.bounds.len() + 1)
            .fetch_add(nanos, Ordering::Relaxed);
    }

    /// The family as the Prometheus crate's histogram collects it.
    pub fn collect(&self) -> Vec<MetricFamily> {
        let n = self.bounds.len();
        let total = |i: usize| -> u64 {
            (0..self.shards)
                .map(|s| self.cell(s, i).load(Ordering::Relaxed))
                .fold(0, u64::wrapping_add)
        };
        let mut cumulative = 0u64;
        let buckets = self
            .bounds
            .iter()
            .enumerate()
            .map(|(i, &bound)| {
                cumulative = cumulative.wrapping_add(total(i));
                let mut b = Bucket::default();
                b.set_cumulative_count(cumulative);
                b.set_upper_bound(bound);
                b
            })
            .collect();
        let mut h = Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(cumulative.wrapping_add(total(n)));
        h.set_sample_sum(total(n + 1) as f64 / 1e9);
        let labels = self
            .labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.clone());
                pair.set_value(value.clone());
                pair
            })
            .collect();
        let mut metric = Metric::from_label(labels);
        metric.set_histogram(h);
        let mut family = MetricFamily::default();
        family.set_name(self.name.clone());
        family.set_help(self.help.clone());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(vec![metric]);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 5] = [0.001, 0.005, 0.05, 0.25, 1.0];

    fn prometheus_histogram() -> prometheus::Histogram {
        let opts = prometheus::HistogramOpts::new("d_seconds", "help")
            .const_label("route", "r")
            .const_label("policy", "p")
            .buckets(BOUNDS.to_vec());
        prometheus::Histogram::with_opts(opts).expect("a valid histogram")
    }

    fn sharded(shards: usize) -> ShardedHistogram {
        ShardedHistogram::new(
            "d_seconds",
            "help",
            &[("route", "r"), ("policy", "p")],
            BOUNDS.to_vec(),
            shards,
        )
    }

    /// The families with the sum rounded to the nanosecond (the sharded one keeps
    /// nanoseconds; the crate's adds floats).
    fn rounded(mut families: Vec<MetricFamily>) -> Vec<MetricFamily> {
        for family in &mut families {
            for metric in family.mut_metric() {
                let mut h = metric.get_histogram().clone();
                h.set_sample_sum((h.get_sample_sum() * 1e9).round() / 1e9);
                metric.set_histogram(h);
            }
        }
        families
    }

    #[test]
    fn collects_what_the_prometheus_histogram_collects() {
        use prometheus::core::Collector;
        // On the bounds, between them, above them all, and zero.
        let observations: Vec<Duration> = [
            0,
            1_000_000,
            1_000_001,
            4_999_999,
            250_000_000,
            2_000_000_000,
            7_300,
        ]
        .iter()
        .map(|&n| Duration::from_nanos(n))
        .collect();
        for shards in [1, 3] {
            let (ours, theirs) = (sharded(shards), prometheus_histogram());
            for d in &observations {
                ours.observe(*d);
                theirs.observe(d.as_secs_f64());
            }
            assert_eq!(
                rounded(ours.collect()),
                rounded(theirs.collect()),
                "{shards} shards"
            );
        }
    }

    #[test]
    fn threads_counting_at_once_lose_nothing() {
        let h = sharded(2);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let h = &h;
                scope.spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(Duration::from_micros((i * 7 + t) % 2_000_000));
                    }
                });
            }
        });
        let family = &h.collect()[0];
        let histogram = family.get_metric()[0].get_histogram();
        assert_eq!(histogram.get_sample_count(), 40_000);
        let expected: u64 = (0..4u64)
            .flat_map(|t| (0..10_000u64).map(move |i| (i * 7 + t) % 2_000_000))
            .sum();
        assert!((histogram.get_sample_sum() - expected as f64 / 1e6).abs() < 1e-6);
        let buckets = histogram.get_bucket();
        assert!(buckets
            .windows(2)
            .all(|w| w[0].cumulative_count() <= w[1].cumulative_count()));
    }
}
