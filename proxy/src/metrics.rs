//! The proxy's Prometheus metrics, on an explicit registry (no globals), so every
//! proxy instance and every test has its own.
//!
//! Labels are bounded by configuration: policy, route and backend names come from the
//! policy, outcomes and decisions from fixed sets; never raw paths or client IPs.
//! The request-duration histogram is a custom collector because each route's buckets
//! include that route's SLO latency threshold, which a single `HistogramVec` (one
//! bucket layout for all) cannot express.
//!
//! Per-route and per-backend series are not made for every route of every policy
//! loaded: they appear when a route or policy is used and are removed after
//! [`ROUTE_SERIES_IDLE`] without traffic (see `series`, which decides; this module
//! only knows how to remove a set of them: [`Metrics::remove_routes`],
//! [`Metrics::remove_policies`]).
//!
//! Two expositions of the same families: Prometheus' text format
//! ([`Metrics::render`]), and OpenMetrics for scrapes that ask for it
//! ([`Metrics::render_openmetrics`]), which alone can carry the exemplars kept
//! beside the duration histograms (see `exemplar`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::proto::LabelPair;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::exemplar::Exemplar;
use crate::openmetrics;
use crate::shard::PerThread;

/// How long a route or a policy keeps its series without traffic (`--metrics-idle`
/// overrides it). Longer than any scrape interval and than the windows dashboards
/// take `rate()` over (5m), so a route with sparse but steady traffic keeps its
/// counters; short enough that a proxy holding thousands of policies exports the
/// few it serves, not all of them.
pub const ROUTE_SERIES_IDLE: Duration = Duration::from_secs(10 * 60);

/// Bucket bounds (seconds) every route gets; a route's SLO threshold is added to them.
pub const BASE_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub rate_limited: IntCounterVec,
    /// Requests an inbound policy refused: mTLS required, or its authorization.
    pub authz_denied: IntCounterVec,
    pub rate_limit_keys: IntGaugeVec,
    pub rate_limit_overflow: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub policy_reloads: IntCounterVec,
    pub policy_info: IntGaugeVec,
    pub inflight: IntGauge,
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions: IntCounterVec,
    pub breaker_rejected: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub concurrency_limit: IntGaugeVec,
    pub route_inflight: IntGaugeVec,
    pub shed: IntCounterVec,
    pub retries: IntCounterVec,
    pub backend_healthy: IntGaugeVec,
    pub backend_endpoints: IntGaugeVec,
    pub dns_lookups: IntCounterVec,
    pub backend_ejections: IntCounterVec,
    pub control_plane_connected: IntGauge,
    /// When this proxy's workload certificate expires (0: it has none).
    pub identity_expiry: IntGauge,
    pub endpoints_stream_connected: IntGauge,
    pub endpoint_updates: IntCounterVec,
    pub passthrough: IntCounterVec,
    pub global_redis_up: IntGauge,
    pub global_syncs: IntCounterVec,
    pub global_local: IntCounterVec,
    /// Opaque TCP connections (see `opaque`): by policy ("" when none governs
    /// the destination), direction and outcome.
    pub tcp_connections: IntCounterVec,
    pub tcp_active: IntGaugeVec,
    pub tcp_bytes: IntCounterVec,
    /// What protocol detection found on the transparent listeners.
    pub protocol_detections: IntCounterVec,
    /// Access-log lines dropped because the flush task fell behind (`accesslog`).
    pub access_log_dropped: IntCounter,
    /// Spans not exported (`sluice_trace_spans_dropped_total{reason}`): the queue
    /// to the exporter was full, or the collector did not take a batch.
    pub trace_spans_dropped_queue_full: IntCounter,
    pub trace_spans_dropped_export_failed: IntCounter,
    /// Spans the collector accepted.
    pub trace_spans_exported: IntCounter,
    /// The request path's sharded counters, added into their series before every
    /// scrape ([`Tally`]).
    tallies: Tallies,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Registers every metric (the per-route duration histograms are the
    /// snapshot's: `runtime::DurationCollector`).
    pub fn register(registry: Registry) -> prometheus::Result<Self> {
        let r = &registry;
        // The process's own CPU, memory, threads and file descriptors (`process_*`,
        // as every Prometheus client library exports them): the fleet dashboard
        // reads them, so it works without cAdvisor (outside Kubernetes too).
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let inflight = IntGauge::new(
            "sluice_inflight_requests_current",
            "Requests being served right now, all routes.",
        )?;
        r.register(Box::new(inflight.clone()))?;
        let control_plane_connected = IntGauge::new(
            "sluice_control_plane_connected",
            "1 while the proxy holds a policy stream to the control plane.",
        )?;
        r.register(Box::new(control_plane_connected.clone()))?;
        let identity_expiry = IntGauge::new(
            "sluice_identity_expiry_timestamp_seconds",
            "When this proxy's workload (mTLS) certificate expires, in Unix seconds; 0 without one.",
        )?;
        r.register(Box::new(identity_expiry.clone()))?;
        let access_log_dropped = IntCounter::new(
            "sluice_access_log_dropped_lines_total",
            "Access-log lines dropped because stdout took them slower than they came.",
        )?;
        r.register(Box::new(access_log_dropped.clone()))?;
        let trace_dropped = counter(
            r,
            "sluice_trace_spans_dropped_total",
            "Spans not exported: the queue to the exporter was full (queue_full), or the collector did not take their batch (export_failed).",
            &["reason"],
        )?;
        let trace_spans_exported = IntCounter::new(
            "sluice_trace_spans_exported_total",
            "Spans the OTLP collector accepted.",
        )?;
        r.register(Box::new(trace_spans_exported.clone()))?;
        let endpoints_stream_connected = IntGauge::new(
            "sluice_endpoints_stream_connected",
            "1 while the proxy holds an endpoints stream to the control plane.",
        )?;
        r.register(Box::new(endpoints_stream_connected.clone()))?;
        let global_redis_up = IntGauge::new(
            "sluice_global_rate_limit_redis_up",
            "1 while Redis answers the global rate limits' claims (0 without --redis).",
        )?;
        r.register(Box::new(global_redis_up.clone()))?;
        Ok(Metrics {
            requests: counter(
                r,
                "sluice_requests_total",
                "Requests answered, by policy, route, status class, governance decision and listener direction.",
                &["policy", "route", "code_class", "decision", "direction"],
            )?,
            rate_limited: counter(
                r,
                "sluice_rate_limited_total",
                "Requests over a route's rate limit; mode=shadow ones were let through.",
                &["policy", "route", "mode"],
            )?,
            authz_denied: counter(
                r,
                "sluice_authz_denied_total",
                "Requests an inbound policy refused (a plaintext caller under mTLS strict, or its authorization); mode=shadow ones were let through.",
                &["policy", "route", "mode"],
            )?,
            rate_limit_keys: gauge(
                r,
                "sluice_rate_limit_keys",
                "Keys with a token bucket of their own on a keyed rate limit.",
                &["policy", "route"],
            )?,
            rate_limit_overflow: counter(
                r,
                "sluice_rate_limit_overflow_total",
                "Requests whose key found the maxKeys cap reached and shared the overflow bucket.",
                &["policy", "route"],
            )?,
            upstream_requests: counter(
                r,
                "sluice_upstream_requests_total",
                "Attempts to reach a backend, by outcome (success, http_5xx, connect_error, timeout, error).",
                &["policy", "backend", "outcome"],
            )?,
            policy_reloads: counter(
                r,
                "sluice_policy_reloads_total",
                "Policy loads, by result (accepted, rejected, unchanged) and source.",
                &["result", "source"],
            )?,
            policy_info: gauge(
                r,
                "sluice_policy_info",
                "1 for the policy version being served.",
                &["version"],
            )?,
            breaker_state: gauge(
                r,
                "sluice_circuit_breaker_state",
                "Circuit breaker state per route: 0 closed, 1 open, 2 half-open.",
                &["policy", "route"],
            )?,
            breaker_transitions: counter(
                r,
                "sluice_circuit_breaker_transitions_total",
                "Circuit breaker state changes, by the state entered.",
                &["policy", "route", "to"],
            )?,
            breaker_rejected: counter(
                r,
                "sluice_circuit_breaker_rejected_total",
                "Requests an open breaker refused; mode=shadow ones were let through.",
                &["policy", "route", "mode"],
            )?,
            fallbacks: counter(
                r,
                "sluice_fallbacks_total",
                "Responses served by a route's fallback, by cause; mode=shadow counts fallbacks that would have been served.",
                &["policy", "route", "cause", "mode"],
            )?,
            concurrency_limit: gauge(
                r,
                "sluice_concurrency_limit",
                "Current concurrency limit of a route (fixed, or the adaptive limit's value).",
                &["policy", "route"],
            )?,
            route_inflight: gauge(
                r,
                "sluice_inflight_requests",
                "Requests holding a concurrency slot of a route.",
                &["policy", "route"],
            )?,
            shed: counter(
                r,
                "sluice_shed_total",
                "Requests shed by a route's concurrency limit, by priority class; mode=shadow ones were let through.",
                &["policy", "route", "priority", "mode"],
            )?,
            retries: counter(
                r,
                "sluice_retries_total",
                "Retry decisions: retried, or budget_exhausted when the retry budget refused one.",
                &["policy", "route", "result"],
            )?,
            backend_healthy: gauge(
                r,
                "sluice_backend_healthy",
                "1 when some address of a backend passes its active health checks and is not ejected, else 0.",
                &["policy", "backend"],
            )?,
            backend_endpoints: gauge(
                r,
                "sluice_backend_endpoints",
                "Endpoints of a backend that take new requests (resolved addresses; ready pods of a Service).",
                &["policy", "backend"],
            )?,
            dns_lookups: counter(
                r,
                "sluice_dns_lookups_total",
                "DNS lookups of backend names by the resolver job, by result (ok, error).",
                &["backend", "result"],
            )?,
            backend_ejections: counter(
                r,
                "sluice_backend_ejections_total",
                "Times outlier detection ejected a backend.",
                &["policy", "backend"],
            )?,
            passthrough: {
                let c = counter(
                    r,
                    "sluice_passthrough_requests_total",
                    "Transparent requests no policy claimed, forwarded untouched to their original destination.",
                    &["direction"],
                )?;
                // Both series exist from the start (at 0): the label set is fixed, and
                // rate() over a counter that appears late misses its first increments.
                for direction in ["outbound", "inbound"] {
                    c.with_label_values(&[direction]);
                }
                c
            },
            global_syncs: {
                let c = counter(
                    r,
                    "sluice_global_rate_limit_syncs_total",
                    "Round trips to Redis claiming global rate-limit leases, by outcome (ok, error).",
                    &["outcome"],
                )?;
                for outcome in ["ok", "error"] {
                    c.with_label_values(&[outcome]);
                }
                c
            },
            global_local: counter(
                r,
                "sluice_global_rate_limit_local_decisions_total",
                "Requests of a global rate limit decided by the replica's own bucket (Redis unreachable, or a lease on its way).",
                &["policy", "route"],
            )?,
            endpoint_updates: {
                let c = counter(
                    r,
                    "sluice_endpoint_updates_total",
                    "Endpoint updates from the control plane, by result (ack, nack).",
                    &["result"],
                )?;
                // Both series from the start (at 0): rate() cannot see the first
                // increment of a series that did not exist, and a NACK is rare.
                for result in ["ack", "nack"] {
                    c.with_label_values(&[result]);
                }
                c
            },
            tcp_connections: counter(
                r,
                "sluice_tcp_connections_total",
                "Opaque TCP connections, by policy (\"\" when no policy governs the destination), direction and outcome (opened, refused_limit, refused_rate, connect_error, no_destination, not_ready; shadow_refused_* in shadow mode, let through).",
                &["policy", "direction", "outcome"],
            )?,
            tcp_active: {
                let g = gauge(
                    r,
                    "sluice_tcp_active_connections",
                    "Opaque TCP connections open now, by direction.",
                    &["direction"],
                )?;
                for direction in ["outbound", "inbound"] {
                    g.with_label_values(&[direction]);
                }
                g
            },
            tcp_bytes: counter(
                r,
                "sluice_tcp_bytes_total",
                "Bytes of opaque TCP connections, as the client sees them: side=received from the client (sent on to the destination), side=sent to the client (from the destination).",
                &["policy", "direction", "side"],
            )?,
            protocol_detections: {
                let c = counter(
                    r,
                    "sluice_protocol_detections_total",
                    "Connections on the transparent listeners by what protocol detection found: http1, http2, opaque (by the first bytes), timeout (the client said nothing: opaque, server speaks first), closed (left silently), opaque_port (a listed port, not looked at).",
                    &["direction", "result"],
                )?;
                // Fixed label sets, all from the start (at 0), so rate() sees the
                // first timeout.
                for direction in ["outbound", "inbound"] {
                    for result in crate::detect::Sniffed::RESULTS {
                        c.with_label_values(&[direction, result]);
                    }
                }
                c
            },
            global_redis_up,
            inflight,
            control_plane_connected,
            identity_expiry,
            access_log_dropped,
            trace_spans_dropped_queue_full: trace_dropped.with_label_values(&["queue_full"]),
            trace_spans_dropped_export_failed: trace_dropped.with_label_values(&["export_failed"]),
            trace_spans_exported,
            endpoints_stream_connected,
            registry,
            tallies: Tallies::default(),
        })
    }

    /// Prometheus text exposition (format 0.0.4) of everything registered.
    pub fn render(&self) -> Vec<u8> {
        self.tallies.fold();
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on malformed families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// OpenMetrics exposition of everything registered (see [`openmetrics`]), with
    /// `exemplars(policy, route)` on the buckets of each route's duration histogram.
    pub fn render_openmetrics<'e>(
        &self,
        exemplars: impl Fn(&str, &str) -> &'e [Exemplar],
    ) -> Vec<u8> {
        self.tallies.fold();
        openmetrics::encode(&self.registry.gather(), |family, metric| {
            if family != DURATION_NAME {
                return &[];
            }
            let labels = metric.get_label();
            exemplars(label(labels, "policy"), label(labels, "route"))
        })
    }

    /// Removes, from every per-route metric, the series of the routes for which
    /// `doomed(policy, route)` holds. A policy's requests that matched no route are
    /// counted under `route=""`, so `doomed(policy, "")` covers those.
    pub fn remove_routes(&self, doomed: impl Fn(&str, &str) -> bool) {
        let by_route =
            |labels: &[LabelPair]| doomed(label(labels, "policy"), label(labels, "route"));
        for counters in [
            &self.requests,
            &self.rate_limited,
            &self.authz_denied,
            &self.rate_limit_overflow,
            &self.breaker_transitions,
            &self.breaker_rejected,
            &self.fallbacks,
            &self.shed,
            &self.retries,
            &self.global_local,
        ] {
            remove_where(counters, by_route);
        }
        for gauges in [
            &self.rate_limit_keys,
            &self.breaker_state,
            &self.concurrency_limit,
            &self.route_inflight,
        ] {
            remove_where(gauges, by_route);
        }
    }

    /// Removes the per-backend series of the policies for which `doomed(policy)`
    /// holds, and their requests that matched no route.
    pub fn remove_policies(&self, doomed: impl Fn(&str) -> bool) {
        self.remove_backends(|policy, _| doomed(policy));
        let by_policy = |labels: &[LabelPair]| doomed(label(labels, "policy"));
        remove_where(&self.tcp_connections, by_policy);
        remove_where(&self.tcp_bytes, by_policy);
        self.remove_routes(|policy, route| route.is_empty() && doomed(policy));
    }

    /// Removes, from every per-backend metric, the series for which
    /// `doomed(policy, backend)` holds.
    pub fn remove_backends(&self, doomed: impl Fn(&str, &str) -> bool) {
        let by_backend =
            |labels: &[LabelPair]| doomed(label(labels, "policy"), label(labels, "backend"));
        for counters in [&self.upstream_requests, &self.backend_ejections] {
            remove_where(counters, by_backend);
        }
        for gauges in [&self.backend_healthy, &self.backend_endpoints] {
            remove_where(gauges, by_backend);
        }
    }
}

/// Removes the series of `vec` whose labels `doomed` picks. The vec is listed (its
/// collected family) rather than removed from by constructed label values, so every
/// series goes whatever label values it was made with (a shed class or a backend
/// that a reload has since removed from the policy).
fn remove_where<T: MetricVecBuilder>(vec: &MetricVec<T>, doomed: impl Fn(&[LabelPair]) -> bool) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels = metric.get_label();
            if doomed(labels) {
                let by_name: HashMap<&str, &str> =
                    labels.iter().map(|l| (l.name(), l.value())).collect();
                // Only fails for a series already gone, which is the aim.
                let _ = vec.remove(&by_name);
            }
        }
    }
}

/// The value of label `name` ("" without it).
fn label<'a>(labels: &'a [LabelPair], name: &str) -> &'a str {
    labels
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// The routes' duration histogram: base buckets plus the route's SLO threshold.
pub const DURATION_NAME: &str = "sluice_request_duration_seconds";
pub const DURATION_HELP: &str =
    "Time from request received to response finished, by policy and route.";

/// A route's bucket bounds: the base buckets plus its SLO threshold, ascending.
pub fn route_buckets(slo_threshold: Option<Duration>) -> Vec<f64> {
    let mut buckets = BASE_BUCKETS.to_vec();
    if let Some(t) = slo_threshold {
        let t = t.as_secs_f64();
        if !buckets.iter().any(|b| (b - t).abs() < 1e-9) {
            buckets.push(t);
            buckets.sort_by(f64::total_cmp);
        }
    }
    buckets
}

/// Label handles resolved once and kept: `with_label_values` hashes the labels and
/// takes a lock on every call, which the request path should not pay per request.
/// A cache belongs to one fixed label prefix (a route, a backend); the remaining
/// labels index into it. What it keeps for each is a [`Tally`]: the request path
/// counts on its own thread's line, and a scrape adds the lines into the series.
///
/// A cache can be emptied ([`CounterCache::clear`]): once its series are removed
/// from the registry (a policy idle too long), the handles it holds count into
/// series nobody exports, and the next use must resolve them again.
pub struct CounterCache {
    cells: Box<[ArcSwapOption<Tally>]>,
}

impl CounterCache {
    pub fn new(size: usize) -> Self {
        CounterCache {
            cells: (0..size).map(|_| ArcSwapOption::empty()).collect(),
        }
    }

    /// Adds one to the counter at `index`, made by `make` the first time (and the
    /// first time after a [`CounterCache::clear`]) and entered in `metrics`' tallies
    /// so that scrapes see its count. An index out of range is counted through
    /// `make` every time.
    pub fn inc(&self, index: usize, metrics: &Metrics, make: impl FnOnce() -> IntCounter) {
        let Some(cell) = self.cells.get(index) else {
            make().inc();
            return;
        };
        let cached = cell.load();
        match cached.as_ref() {
            Some(tally) => tally.inc(),
            None => {
                // Two requests may both make one: they resolve the same series,
                // and the tally not kept adds its count in as it is dropped.
                let tally = metrics.tallies.track(make());
                tally.inc();
                cell.store(Some(tally));
            }
        }
    }

    /// Forgets every handle (the series stay as they are in the registry). What
    /// they counted since the last scrape is added into the series they resolved:
    /// the proxy clears a cache after removing its series, so those counts go
    /// with the removed series, as its earlier counts do.
    pub fn clear(&self) {
        for cell in self.cells.iter() {
            cell.store(None);
        }
    }
}

/// One series of a counter that every worker thread adds to on every request
/// (`sluice_requests_total` of a busy route, `sluice_upstream_requests_total` of its
/// backend), counted on a line per thread and added into the series before each
/// scrape.
///
/// Why: the Prometheus counter is one atomic; with a route busy on every thread,
/// each request's add pulled that line from the core that added last (two of them
/// per request, the route's and the backend's).
///
/// Invariants: every count lands in the series exactly once: by a scrape's
/// [`Tallies::fold`] (each line is taken with a swap, so a count added meanwhile
/// stays for the next), or by the tally's drop. A scrape reads every count added
/// before it began; one added during it may show at the next.
///
/// Cost: a tally is [`per_core`](crate::shard::per_core) lines of 128 bytes (at most 1 KiB) where the
/// counter handle was one pointer: ~10 MiB for 10,000 series in use at once.
pub struct Tally {
    counter: IntCounter,
    /// A line per thread ([`per_core`](crate::shard::per_core) of them).
    lines: PerThread<AtomicU64>,
}

impl Tally {
    fn new(counter: IntCounter) -> Self {
        Tally {
            counter,
            lines: PerThread::per_core(|_| AtomicU64::new(0)),
        }
    }

    pub fn inc(&self) {
        self.lines.mine().fetch_add(1, Ordering::Relaxed);
    }

    /// Moves what the lines hold into the series.
    fn fold(&self) {
        let counted = self
            .lines
            .iter()
            .map(|line| line.swap(0, Ordering::Relaxed))
            .fold(0, u64::wrapping_add);
        if counted > 0 {
            self.counter.inc_by(counted);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.fold();
    }
}

/// The tallies alive, for the scrape to fold. Entries of dropped tallies are
/// pruned at each fold, and when entering one finds the list twice as long as at
/// the last pruning (so a proxy never scraped holds entries for at most twice its
/// live tallies, or 64).
#[derive(Default)]
struct Tallies {
    list: Mutex<TallyList>,
}

#[derive(Default)]
struct TallyList {
    tallies: Vec<Weak<Tally>>,
    /// Prune when the list reaches this length.
    prune_at: usize,
}

impl TallyList {
    fn prune(&mut self) {
        self.tallies.retain(|t| t.strong_count() > 0);
        self.prune_at = (self.tallies.len() * 2).max(64);
    }
}

impl Tallies {
    fn lock(&self) -> std::sync::MutexGuard<'_, TallyList> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn track(&self, counter: IntCounter) -> Arc<Tally> {
        let tally = Arc::new(Tally::new(counter));
        let mut list = self.lock();
        if list.tallies.len() >= list.prune_at {
            list.prune();
        }
        list.tallies.push(Arc::downgrade(&tally));
        tally
    }

    /// Adds every live tally's count into its series.
    fn fold(&self) {
        let mut list = self.lock();
        for tally in list.tallies.iter().filter_map(Weak::upgrade) {
            tally.fold();
        }
        list.prune();
    }
}

/// Status classes, in `code_class` order.
pub const CODE_CLASSES: usize = 6;

/// The index of a status code's class, for [`CounterCache`]s.
pub fn code_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

/// `2xx`-style class of a status code.
pub fn code_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::register(Registry::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `sluice_requests_total` of route `r` as a scrape exports it.
    fn scraped(metrics: &Metrics) -> Option<u64> {
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        text.lines().find_map(|l| {
            l.strip_prefix("sluice_requests_total{code_class=\"2xx\",decision=\"allowed\",direction=\"outbound\",policy=\"p\",route=\"r\"} ")
                .map(|v| v.parse().expect("a count"))
        })
    }

    fn make(metrics: &Metrics) -> IntCounter {
        metrics
            .requests
            .with_label_values(&["p", "r", "2xx", "allowed", "outbound"])
    }

    #[test]
    fn counts_on_every_thread_are_in_the_next_scrape() {
        let metrics = metrics();
        let cache = CounterCache::new(1);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        cache.inc(0, &metrics, || make(&metrics));
                    }
                });
            }
        });
        assert_eq!(scraped(&metrics), Some(4000));
        // Nothing is added twice by a second scrape.
        assert_eq!(scraped(&metrics), Some(4000));
        cache.inc(0, &metrics, || make(&metrics));
        assert_eq!(scraped(&metrics), Some(4001));
    }

    #[test]
    fn scrapes_while_threads_count_lose_and_double_nothing() {
        let metrics = metrics();
        let cache = CounterCache::new(1);
        let mut seen = Vec::new();
        std::thread::scope(|s| {
            let counting: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        for _ in 0..50_000 {
                            cache.inc(0, &metrics, || make(&metrics));
                        }
                    })
                })
                .collect();
            // Bounded: as many scrapes as it takes the counters to finish, at most 10,000.
            for _ in 0..10_000 {
                seen.push(scraped(&metrics).unwrap_or(0));
                if counting.iter().all(|t| t.is_finished()) {
                    break;
                }
            }
        });
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "a scrape went back");
        assert_eq!(scraped(&metrics), Some(100_000));
    }

    #[test]
    fn a_cleared_cache_adds_its_counts_in_and_counts_on_into_a_new_handle() {
        let metrics = metrics();
        let cache = CounterCache::new(1);
        for _ in 0..3 {
            cache.inc(0, &metrics, || make(&metrics));
        }
        // Dropped unscraped: its counts are not lost.
        cache.clear();
        assert_eq!(scraped(&metrics), Some(3));
        cache.inc(0, &metrics, || make(&metrics));
        assert_eq!(scraped(&metrics), Some(4));
    }

    #[test]
    fn entries_of_dropped_tallies_do_not_pile_up_without_scrapes() {
        let metrics = metrics();
        for _ in 0..1000 {
            let cache = CounterCache::new(1);
            cache.inc(0, &metrics, || make(&metrics));
        }
        let held = metrics.tallies.lock().tallies.len();
        assert!(held <= 128, "{held} entries for no live tally");
        assert_eq!(scraped(&metrics), Some(1000));
    }
}
