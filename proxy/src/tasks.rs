//! The proxy's background work, each on a pingora background service of its own
//! (one stuck job cannot delay the others), all ending at shutdown: gauges, key
//! sweeps and the expiry of idle routes' series every second, active health checks, the re-resolution of backend
//! names, the Redis sync of the global rate limits, and the control-plane stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::control_plane::ControlPlaneSource;
use crate::endpoints::{literal, Endpoints};
use crate::globallimit;
use crate::metrics::Metrics;
use crate::resolve::{DnsResolver, Names, Outcome, Resolve, ResolveError, LOOKUP_TIMEOUT};
use crate::runtime::{RouteRuntime, Runtime};
use crate::services::ServiceSets;
use crate::shared::{apply_resolved, Shared};

/// A job run every `period` (the first run at once) until shutdown, on a background
/// service of its own: one job blocked (a stdout write stuck on a full pipe) cannot
/// delay the others.
pub struct Every<F> {
    pub period: Duration,
    pub job: F,
}

#[async_trait]
impl<F: Fn() + Send + Sync + 'static> BackgroundService for Every<F> {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.period);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => (self.job)(),
            }
        }
    }
}

/// Every second (`n` counts the runs, `now` is the run's time): publish the gauges
/// of the routes and policies that have series (breaker state, concurrency limit and
/// in-flight, keyed-limiter sizes and overflow, backend endpoints and health), remove
/// the series of those idle too long (see `series`); every 10 s forget refilled
/// rate-limit keys.
pub fn housekeeping(shared: &Shared, n: u64, now: Instant) {
    let runtime = shared.runtime.load_full();
    let metrics = &shared.metrics;
    // Read here rather than set by each source that installs an identity (files,
    // the control plane): one place, at most a second late.
    let expiry = shared.identity.current().map_or(0, |active| {
        active
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    });
    metrics.identity_expiry.set(expiry);
    for (policy, endpoints) in runtime
        .policies
        .iter()
        .flat_map(|p| p.all_endpoints().map(move |e| (p, e)))
    {
        endpoints.refresh(now);
        // A policy without traffic has no backend series (see `series`).
        if !policy.series.is_live() {
            continue;
        }
        let checked =
            endpoints.rule().health_check.is_some() || endpoints.rule().outlier_detection.is_some();
        for (b, (label, addrs)) in endpoints.backends().enumerate() {
            let labels = [policy.name.as_str(), label];
            // Ready ones: what takes new requests (every address, for DNS).
            let ready = endpoints.ready_count(b).min(addrs.len());
            metrics
                .backend_endpoints
                .with_label_values(&labels)
                .set(ready as i64);
            if checked {
                metrics
                    .backend_healthy
                    .with_label_values(&labels)
                    .set(i64::from(backend_up(endpoints, b, now)));
            }
        }
    }
    for policy in &runtime.policies {
        for route in policy.routes.iter() {
            // The key sweeps run whether or not the route has series: they bound
            // the limiters' memory.
            if n.is_multiple_of(10) {
                if let Some(global) = &route.global {
                    global.sweep_local();
                }
                if let Some(limiter) = route.limiter.as_ref().filter(|l| l.key().is_some()) {
                    limiter.sweep();
                }
            }
            // A request holding a slot is use, however long it runs: its route's
            // series (the in-flight gauge among them) stay until it is done.
            if route.concurrency.as_ref().is_some_and(|c| c.inflight() > 0) {
                route.series.mark_used();
                policy.series.mark_used();
            }
            if route.series.is_live() {
                route.series.relayout(route.slo_threshold);
                publish_route_gauges(metrics, route);
            }
        }
    }
    let gone = shared.series.expire(
        metrics,
        || runtime.routes().map(|r| &r.series),
        || runtime.policies.iter().map(|p| &p.series),
        now,
    );
    // The series are removed: the backends' cached handles now count into nothing.
    for policy in &runtime.policies {
        if gone.iter().any(|g| Arc::ptr_eq(g, &policy.series)) {
            for endpoints in policy.all_endpoints() {
                for target in &endpoints.targets {
                    target.upstream.clear();
                }
            }
        }
    }
}

/// The gauges (and the counters its components keep for us) of a route that has
/// series.
fn publish_route_gauges(metrics: &Metrics, route: &RouteRuntime) {
    let labels = [route.policy.as_str(), route.name.as_str()];
    if let Some(global) = &route.global {
        // Made at 0 with the route's series: rate() cannot see increments made
        // before a counter's first scrape.
        metrics
            .global_local
            .with_label_values(&labels)
            .inc_by(global.take_local_decisions());
    }
    if let Some(breaker) = &route.breaker {
        metrics
            .breaker_state
            .with_label_values(&labels)
            .set(breaker.state().gauge());
    }
    if let Some(limiter) = &route.concurrency {
        metrics
            .concurrency_limit
            .with_label_values(&labels)
            .set(i64::from(limiter.limit()));
        metrics
            .route_inflight
            .with_label_values(&labels)
            .set(i64::from(limiter.inflight()));
    }
    let Some(limiter) = route.limiter.as_ref().filter(|l| l.key().is_some()) else {
        return;
    };
    metrics
        .rate_limit_keys
        .with_label_values(&labels)
        .set(limiter.tracked_keys() as i64);
    let overflowed = limiter.take_overflowed();
    if overflowed > 0 {
        metrics
            .rate_limit_overflow
            .with_label_values(&labels)
            .inc_by(overflowed);
    }
}

/// Whether some endpoint of backend `backend` is healthy and not ejected: the
/// backend's `sluice_backend_healthy` (per backend, not per address, to keep the
/// series bounded by configuration).
fn backend_up(endpoints: &Endpoints, backend: usize, now: std::time::Instant) -> bool {
    endpoints.targets.iter().enumerate().any(|(i, t)| {
        t.backend == backend && endpoints.is_healthy(i) && !endpoints.is_ejected(i, now)
    })
}

/// Active health checks, every 100 ms: start the rounds that are due; each check
/// is a GET of the policy's `healthCheck.path` (HTTP/1.1, or HTTP/2 to an h2c
/// backend) or a gRPC health check (`healthCheck.grpc`), bounded by its timeout.
pub fn health_checks(shared: &Arc<Shared>) {
    let runtime = shared.runtime.load_full();
    let now = std::time::Instant::now();
    let sets = runtime
        .policies
        .iter()
        .enumerate()
        .flat_map(|(p, policy)| policy.endpoint_sets().map(move |(set, e)| (p, set, e)));
    for (p, set, endpoints) in sets {
        let Some(rule) = endpoints.health_check_due(now).cloned() else {
            continue;
        };
        for (i, target) in endpoints.targets.iter().enumerate() {
            let (addr, backend) = (target.addr, target.backend);
            let (runtime, shared, rule) = (Arc::clone(&runtime), Arc::clone(shared), rule.clone());
            let host = target.label.clone();
            let h2c = target.protocol == sluice_policy::Protocol::H2c;
            let to = crate::health::probe::Dial {
                addr,
                tls: target
                    .identity
                    .clone()
                    .map(|id| (id, Arc::clone(&shared.identity))),
            };
            tokio::spawn(async move {
                use crate::health::probe::{probe, probe_h2};
                let ok = match (&rule.grpc, h2c) {
                    (Some(service), _) => {
                        probe_h2(to, &host, "", Some(service), rule.timeout).await
                    }
                    (None, true) => probe_h2(to, &host, &rule.path, None, rule.timeout).await,
                    (None, false) => probe(to, &host, &rule.path, rule.timeout).await,
                };
                let Some(policy) = runtime.policies.get(p) else {
                    return;
                };
                let Some(endpoints) = policy.endpoint_set(set) else {
                    return;
                };
                if let Some(health) = endpoints.record_check(i, ok, std::time::Instant::now()) {
                    let healthy = health == crate::health::Health::Healthy;
                    let up = backend_up(endpoints, backend, std::time::Instant::now());
                    // At once rather than at the next housekeeping run, for a
                    // policy that has series (a policy without traffic has none).
                    if policy.series.is_live() {
                        shared
                            .metrics
                            .backend_healthy
                            .with_label_values(&[policy.name.as_str(), host.as_str()])
                            .set(i64::from(up));
                    }
                    let (policy, backend, addr) =
                        (policy.name.as_str(), host.as_str(), addr.to_string());
                    if healthy {
                        tracing::info!(policy, backend, addr, healthy, "backend health changed");
                    } else {
                        tracing::warn!(policy, backend, addr, healthy, "backend health changed");
                    }
                }
            });
        }
    }
}

/// How often the resolver job looks for names that are due and for policies whose
/// endpoints disagree with the last answers (a snapshot built by a reload while
/// the job swapped in new addresses is corrected here within a second).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(1);

/// Keeps the live snapshot's endpoints on the current addresses of its backends'
/// names (see `resolve` for the schedule, `endpoints` for what a rebuild keeps).
///
/// Design: the job alone owns the answers ([`Names`]); the snapshot's `Endpoints`
/// hold the addresses they were built from, and reloads carry those over
/// (`Endpoints::new` takes a remaining backend's addresses from the previous
/// snapshot), so a reload never waits for DNS. When an answer changes a policy's
/// addresses, the job stores a copy of the live snapshot in which only that policy's
/// `Endpoints` is rebuilt ([`Runtime::with_endpoints`]: every other component is the
/// same `Arc`): not a reload, and requests in flight keep the snapshot they pinned.
/// The swap is a compare-and-swap, so it never overwrites a reload; losing that race
/// costs one tick, since every tick compares the live snapshot with the answers.
/// The same comparison covers the Service sets the control plane pushed
/// (`Shared::services`, see `discovery`): a Service backend with a set takes it and
/// its name is not looked up.
pub struct ResolveBackends {
    pub shared: Arc<Shared>,
    /// `--dns-server`; else the system configuration.
    pub dns_server: Option<SocketAddr>,
}

#[async_trait]
impl BackgroundService for ResolveBackends {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Built here, on the service's own runtime, which runs its lookups.
        let resolver = match self.dns_server {
            Some(server) => DnsResolver::at(server),
            None => DnsResolver::system(),
        };
        let resolver = match resolver {
            Ok(resolver) => resolver,
            Err(error) => {
                tracing::warn!(%error, "backend names will not be re-resolved");
                return;
            }
        };
        let mut names = Names::default();
        let mut tick = tokio::time::interval(RESOLVE_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = async {
                    tick.tick().await;
                    resolve_backends(&self.shared, &resolver, &mut names, Instant::now()).await;
                } => {}
            }
        }
    }
}

/// The names (not IP literals) of every backend of `runtime` that DNS serves: not
/// a Service whose endpoints the control plane pushed (nor one on a named port).
fn backend_names<'a>(
    runtime: &'a Runtime,
    services: &'a ServiceSets,
) -> impl Iterator<Item = (String, u16)> + 'a {
    runtime
        .policies
        .iter()
        .flat_map(|p| p.all_endpoints())
        .flat_map(move |e| {
            let namespace = e.rule().namespace.as_deref();
            e.rule()
                .backends
                .iter()
                .filter(move |b| services.members(b, namespace).is_none())
        })
        .filter_map(|b| b.dialable_address())
        .filter(|a| literal(&a.host, a.port).is_none())
        .map(|a| (a.host.clone(), a.port))
}

/// One round of the resolver job at `now`: looks up the names that are due (at
/// once, each bounded by [`LOOKUP_TIMEOUT`]), counts and logs the results, then
/// brings the live snapshot's endpoints in line with the answers.
pub async fn resolve_backends(
    shared: &Shared,
    resolver: &dyn Resolve,
    names: &mut Names,
    now: Instant,
) {
    names.track(
        backend_names(&shared.runtime.load(), &shared.services.load()),
        now,
    );
    let due = names.due(now);
    let lookups = due.iter().map(|(host, port)| async move {
        tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup(host, *port))
            .await
            .unwrap_or_else(|_| {
                Err(ResolveError::Timeout {
                    host: host.clone(),
                    timeout: LOOKUP_TIMEOUT,
                })
            })
    });
    let results = futures::future::join_all(lookups).await;
    for ((host, port), result) in due.iter().zip(results) {
        let backend = format!("{host}:{port}");
        let error = result.as_ref().err().map(ToString::to_string);
        let label = if error.is_some() { "error" } else { "ok" };
        shared
            .metrics
            .dns_lookups
            .with_label_values(&[backend.as_str(), label])
            .inc();
        let backend = backend.as_str();
        match names.record(host, *port, result, now) {
            Outcome::Failed { first: true } => {
                let error = error.unwrap_or_default();
                tracing::warn!(
                    backend,
                    error,
                    "backend name lookup failed; keeping its last addresses"
                );
            }
            Outcome::Failed { first: false } => {}
            Outcome::Resolved { changed, recovered } => {
                if recovered {
                    tracing::info!(backend, "backend name lookup works again");
                }
                if changed {
                    let addrs: Vec<String> = names
                        .addresses(host, *port)
                        .unwrap_or_default()
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    tracing::info!(
                        backend,
                        addrs = addrs.join(","),
                        "backend addresses changed"
                    );
                }
            }
        }
    }
    apply_resolved(shared, names, now);
}

/// Keeps the global rate limits supplied from Redis, on a background service's runtime.
pub struct SyncGlobalLimits {
    pub shared: Arc<Shared>,
    pub redis: String,
    pub timeout: Duration,
}

#[async_trait]
impl BackgroundService for SyncGlobalLimits {
    async fn start(&self, shutdown: ShutdownWatch) {
        let runtime = Arc::clone(&self.shared.runtime);
        let limiters = move || {
            runtime
                .load()
                .routes()
                .filter_map(|r| r.global.clone())
                .collect()
        };
        let metrics = globallimit::SyncMetrics {
            redis_up: self.shared.metrics.global_redis_up.clone(),
            syncs: self.shared.metrics.global_syncs.clone(),
        };
        globallimit::sync(
            Arc::clone(&self.shared.globals),
            limiters,
            metrics,
            self.redis.clone(),
            self.timeout,
            shutdown,
        )
        .await;
    }
}

/// Runs the control-plane stream on a background service's runtime, with the hosts
/// requests ask for on demand (`None`: every policy is held).
#[allow(clippy::type_complexity)]
pub struct FollowControlPlane(
    pub  std::sync::Mutex<
        Option<(
            ControlPlaneSource,
            Option<tokio::sync::mpsc::Receiver<String>>,
        )>,
    >,
);

#[async_trait]
impl BackgroundService for FollowControlPlane {
    async fn start(&self, shutdown: ShutdownWatch) {
        let source = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((source, asks)) = source {
            source.run(asks, shutdown).await;
        }
    }
}

#[cfg(test)]
mod tests;
