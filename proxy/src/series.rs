//! Metric series that follow traffic, not configuration.
//!
//! A route's series (its duration histogram and the exemplars kept beside it,
//! `sluice_requests_total` and every other per-route counter and gauge) and a
//! policy's own (its backends' gauges and counters, its requests that matched no
//! route) exist once the route or the policy has been used — a request settled on
//! it, or a governance event (rate limited, shed, breaker change, retry...)
//! happened on it — and are removed after a period without traffic
//! ([`ROUTE_SERIES_IDLE`](crate::metrics::ROUTE_SERIES_IDLE) unless `--metrics-idle` says otherwise). Why: a proxy is
//! handed every policy of its mesh but serves a few of them; exporting every route of
//! 2,000 policies made 116,048 lines (9 MB) per scrape, 102,000 of them histogram
//! buckets of routes that never saw a request.
//!
//! How:
//! - the request path marks its route and policy used: a relaxed load, and a store
//!   only when the mark was clear, so a busy route costs no contended write per
//!   request. The first use also makes the series and enters them in the
//!   [`Ledger`] (a lock, once per route per period of use);
//! - the housekeeping job (every second) clears the marks of what the ledger holds
//!   and removes the series of whatever stayed unmarked for the idle period, or is
//!   gone from the live snapshot (a reload removed the route or the policy: its series
//!   go at the first pass without a request still settling on an older snapshot);
//! - a route's and a policy's [`RouteSeries`] / [`PolicySeries`] travel across
//!   reloads with them (carried by name, like the limiters' state), so a reload
//!   resets nothing.
//!
//! Invariants:
//! - while a route gets a request at least once per idle period, its series stay and
//!   its counters never reset;
//! - a route that comes back after its series were removed starts them afresh, at 0:
//!   Prometheus' `rate()` and `increase()` read that as a counter reset (as after a
//!   restart) and count the new requests correctly;
//! - series are removed from the registry *before* the handles cached to them are
//!   dropped, so a handle to a removed series is never kept for later requests. A
//!   request settling in the very instant its route expires (the first after a whole
//!   idle period) may still go uncounted, or leave a series behind until the route's
//!   next expiry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use fnv::FnvHashSet;
use prometheus::proto::MetricFamily;

use crate::exemplar::{Exemplar, Exemplars};
use crate::histogram::ShardedHistogram;
use crate::metrics::{
    route_buckets, CounterCache, Metrics, CODE_CLASSES, DURATION_HELP, DURATION_NAME,
};
use crate::verdict::Verdict;

/// Sets `flag` without writing when it is already set: on a busy route every
/// request reads the same cache line, and none invalidates it for the others.
fn mark(flag: &AtomicBool) {
    if !flag.load(Ordering::Relaxed) {
        flag.store(true, Ordering::Relaxed);
    }
}

/// A route's series, from its first use until it has been idle too long.
pub struct RouteSeries {
    policy: String,
    route: String,
    /// Set by each use, cleared by each pass of the housekeeping job.
    used: AtomicBool,
    /// `None` while the route has no series.
    live: ArcSwapOption<RouteLive>,
}

/// The handles of a route's series, while it has them.
pub struct RouteLive {
    /// `sluice_request_duration_seconds{policy,route}`, a shard per worker thread.
    pub duration: ShardedHistogram,
    /// The latest exemplar of each of `duration`'s buckets: made and dropped with
    /// it, so expired or remade series never keep another's exemplars.
    pub exemplars: Exemplars,
    /// The SLO threshold its buckets include.
    layout: Option<Duration>,
    /// `sluice_requests_total` handles, by status class, verdict and direction.
    pub requests: CounterCache,
}

impl RouteLive {
    fn new(policy: &str, route: &str, layout: Option<Duration>, shards: usize) -> Self {
        let buckets = route_buckets(layout);
        RouteLive {
            exemplars: Exemplars::new(&buckets),
            duration: ShardedHistogram::new(
                DURATION_NAME,
                DURATION_HELP,
                &[("policy", policy), ("route", route)],
                buckets,
                shards,
            ),
            layout,
            requests: CounterCache::new(CODE_CLASSES * Verdict::COUNT * 2),
        }
    }

    /// Counts a request that took `seconds`; `exemplar` (a sampled trace's id and
    /// when the request settled) becomes its bucket's exemplar. The histogram is
    /// counted first, so a scrape that reads the exemplars before gathering the
    /// histograms never shows an exemplar its bucket has not counted.
    pub fn observe(&self, elapsed: Duration, exemplar: Option<(&str, SystemTime)>) {
        self.duration.observe(elapsed);
        if let Some((trace_id, at)) = exemplar {
            self.exemplars.record(trace_id, elapsed.as_secs_f64(), at);
        }
    }
}

impl RouteSeries {
    pub fn new(policy: &str, route: &str) -> Self {
        RouteSeries {
            policy: policy.to_owned(),
            route: route.to_owned(),
            used: AtomicBool::new(false),
            live: ArcSwapOption::empty(),
        }
    }

    pub fn policy(&self) -> &str {
        &self.policy
    }

    pub fn route(&self) -> &str {
        &self.route
    }

    /// Marks the route used and hands its series to `f`, making them first if it
    /// has none (with buckets for `layout`, the route's SLO threshold).
    pub fn record<R>(
        self: &Arc<Self>,
        ledger: &Ledger,
        layout: Option<Duration>,
        f: impl FnOnce(&RouteLive) -> R,
    ) -> R {
        mark(&self.used);
        let current = self.live.load();
        if let Some(live) = current.as_ref() {
            return f(live);
        }
        let made = Arc::new(RouteLive::new(
            &self.policy,
            &self.route,
            layout,
            ledger.histogram_shards,
        ));
        let before = self
            .live
            .compare_and_swap(&current, Some(Arc::clone(&made)));
        match before.as_ref() {
            // Another request made them meanwhile: one set of series.
            Some(theirs) => f(theirs),
            None => {
                ledger.track_route(Arc::clone(self));
                f(&made)
            }
        }
    }

    /// Marks the route used without making series: a request still in flight on it
    /// keeps the series it has.
    pub fn mark_used(&self) {
        mark(&self.used);
    }

    /// Whether the route has series now.
    pub fn is_live(&self) -> bool {
        self.live.load().is_some()
    }

    /// The duration histogram's family, empty while the route has no series.
    pub fn collect_duration(&self) -> Vec<MetricFamily> {
        self.live
            .load()
            .as_ref()
            .map(|live| live.duration.collect())
            .unwrap_or_default()
    }

    /// The latest exemplar of each bucket of the duration histogram, empty while
    /// the route has no series.
    pub fn exemplars(&self) -> Vec<Exemplar> {
        self.live
            .load()
            .as_ref()
            .map(|live| live.exemplars.latest())
            .unwrap_or_default()
    }

    /// Makes the histogram anew when the route's SLO threshold is no longer the one
    /// its buckets were made for (a reload changed it): the latency SLI needs a
    /// bucket at the threshold. Its counts start afresh, as on any layout change.
    pub fn relayout(&self, layout: Option<Duration>) {
        let current = self.live.load();
        let Some(live) = current.as_ref() else {
            return;
        };
        if live.layout == layout {
            return;
        }
        let fresh = RouteLive::new(&self.policy, &self.route, layout, live.duration.shards());
        self.live.compare_and_swap(&current, Some(Arc::new(fresh)));
    }

    /// Drops the handles; the next use makes new series.
    fn retire(&self) {
        self.live.store(None);
    }
}

/// A policy's own series (its backends', and its requests that matched no route),
/// from its first use until it has been idle too long.
pub struct PolicySeries {
    policy: String,
    /// Set by each use, cleared by each pass of the housekeeping job.
    used: AtomicBool,
    /// Whether the policy has series (and so an entry in the ledger).
    live: AtomicBool,
}

impl PolicySeries {
    pub fn new(policy: &str) -> Self {
        PolicySeries {
            policy: policy.to_owned(),
            used: AtomicBool::new(false),
            live: AtomicBool::new(false),
        }
    }

    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// Marks the policy used; the first use enters it in the ledger, and the
    /// housekeeping job publishes its backends' gauges from then on.
    pub fn record(self: &Arc<Self>, ledger: &Ledger) {
        mark(&self.used);
        if !self.live.load(Ordering::Relaxed) && !self.live.swap(true, Ordering::AcqRel) {
            ledger.track_policy(Arc::clone(self));
        }
    }

    /// Marks the policy used without making it live (a request in flight on it).
    pub fn mark_used(&self) {
        mark(&self.used);
    }

    /// Whether the policy has series now.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    fn retire(&self) {
        self.live.store(false, Ordering::Release);
    }
}

/// What the ledger needs of a route's or a policy's series.
trait Usage {
    /// Whether it was used since the last call, clearing the mark.
    fn take_used(&self) -> bool;
}

impl Usage for RouteSeries {
    fn take_used(&self) -> bool {
        self.used.swap(false, Ordering::Relaxed)
    }
}

impl Usage for PolicySeries {
    fn take_used(&self) -> bool {
        self.used.swap(false, Ordering::Relaxed)
    }
}

struct Entry<S> {
    series: Arc<S>,
    /// When a pass last found it used (`None`: entered since the last pass).
    last_used: Option<Instant>,
}

/// The routes and policies that have series now: entered at their first use, left
/// when the housekeeping job removes their series. It holds what is live rather
/// than walking the snapshot, so series of routes a reload removed are found too.
pub struct Ledger {
    idle: Duration,
    /// Shards of each route's duration histogram: one per core
    /// ([`crate::shard::per_core`]).
    histogram_shards: usize,
    routes: Mutex<Vec<Entry<RouteSeries>>>,
    policies: Mutex<Vec<Entry<PolicySeries>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ledger {
    /// Series without traffic for `idle` are removed.
    pub fn new(idle: Duration) -> Self {
        Ledger {
            idle,
            histogram_shards: crate::shard::per_core(),
            routes: Mutex::new(Vec::new()),
            policies: Mutex::new(Vec::new()),
        }
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }

    fn track_route(&self, series: Arc<RouteSeries>) {
        lock(&self.routes).push(Entry {
            series,
            last_used: None,
        });
    }

    fn track_policy(&self, series: Arc<PolicySeries>) {
        lock(&self.policies).push(Entry {
            series,
            last_used: None,
        });
    }

    /// The housekeeping job's pass at `now`: removes the series of the routes and
    /// policies unused for the idle period, and of those no longer in the live
    /// snapshot (whose `routes` and `policies` list) that were not used since the
    /// last pass. Returns the policies whose series went: their backends' cached
    /// handles (`sluice_upstream_requests_total`) count into nothing now, and the
    /// caller drops them.
    pub fn expire<'a, R, P>(
        &self,
        metrics: &Metrics,
        routes: impl Fn() -> R,
        policies: impl Fn() -> P,
        now: Instant,
    ) -> Vec<Arc<PolicySeries>>
    where
        R: Iterator<Item = &'a Arc<RouteSeries>>,
        P: Iterator<Item = &'a Arc<PolicySeries>>,
    {
        let gone = take_due(&self.routes, &routes, self.idle, now);
        if !gone.is_empty() {
            // A route a reload removed and a later one added back is a new
            // `RouteSeries` under the same labels: the series are the new one's.
            let named: FnvHashSet<(&str, &str)> =
                routes().map(|s| (s.policy(), s.route())).collect();
            let doomed: FnvHashSet<(&str, &str)> = gone
                .iter()
                .map(|(s, here)| ((s.policy(), s.route()), *here))
                .filter(|(key, here)| *here || !named.contains(key))
                .map(|(key, _)| key)
                .collect();
            metrics.remove_routes(|policy, route| doomed.contains(&(policy, route)));
            for (series, _) in &gone {
                series.retire();
            }
        }
        let gone = take_due(&self.policies, &policies, self.idle, now);
        if !gone.is_empty() {
            let named: FnvHashSet<&str> = policies().map(|s| s.policy()).collect();
            let doomed: FnvHashSet<&str> = gone
                .iter()
                .filter(|(s, here)| *here || !named.contains(s.policy()))
                .map(|(s, _)| s.policy())
                .collect();
            metrics.remove_policies(|policy| doomed.contains(policy));
            for (series, _) in &gone {
                series.retire();
            }
        }
        gone.into_iter().map(|(series, _)| series).collect()
    }
}

/// Takes out of `entries` those due for removal, each with whether it is in the live
/// snapshot (`present`): not used since the last pass, and idle for `idle` — or for
/// no time at all once gone from the snapshot, since only requests still settling on
/// an older one can use it.
fn take_due<'a, S: Usage + 'a, I: Iterator<Item = &'a Arc<S>>>(
    entries: &Mutex<Vec<Entry<S>>>,
    present: impl Fn() -> I,
    idle: Duration,
    now: Instant,
) -> Vec<(Arc<S>, bool)> {
    if lock(entries).is_empty() {
        return Vec::new();
    }
    // Built outside the lock: the request path takes it to enter a new route.
    let present: FnvHashSet<*const S> = present().map(Arc::as_ptr).collect();
    let mut due = Vec::new();
    lock(entries).retain_mut(|entry| {
        let used = entry.series.take_used();
        let last = match entry.last_used {
            Some(t) if !used => t,
            _ => now,
        };
        entry.last_used = Some(last);
        let here = present.contains(&Arc::as_ptr(&entry.series));
        let wait = if here { idle } else { Duration::ZERO };
        let expired = !used && now.saturating_duration_since(last) >= wait;
        if expired {
            due.push((Arc::clone(&entry.series), here));
        }
        !expired
    });
    due
}

#[cfg(test)]
mod tests;
