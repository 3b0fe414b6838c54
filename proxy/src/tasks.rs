//! The proxy's background work, each on a pingora background service of its own
//! (one stuck job cannot delay the others), all ending at shutdown: gauges and
//! key sweeps every second, active health checks, the Redis sync of the global
//! rate limits, and the control-plane stream.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::control_plane::ControlPlaneSource;
use crate::endpoints::Endpoints;
use crate::globallimit;
use crate::shared::Shared;

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

/// Every second: publish route gauges (breaker state, concurrency limit and
/// in-flight, keyed-limiter sizes and overflow); every 10 s forget refilled
/// rate-limit keys.
pub fn housekeeping(shared: &Shared, n: u64) {
    let runtime = shared.runtime.load_full();
    let metrics = &shared.metrics;
    let now = std::time::Instant::now();
    for policy in &runtime.policies {
        let endpoints = &policy.endpoints;
        endpoints.refresh(now);
        let checked =
            endpoints.rule().health_check.is_some() || endpoints.rule().outlier_detection.is_some();
        for (b, (label, addrs)) in endpoints.backends().enumerate() {
            let labels = [policy.name.as_str(), label];
            metrics
                .backend_endpoints
                .with_label_values(&labels)
                .set(addrs.len() as i64);
            if checked {
                metrics
                    .backend_healthy
                    .with_label_values(&labels)
                    .set(i64::from(backend_up(endpoints, b, now)));
            }
        }
    }
    for route in runtime.routes() {
        let labels = [route.policy.as_str(), route.name.as_str()];
        if let Some(global) = &route.global {
            // The series exists from the route's first second (at 0): rate() cannot
            // see increments made before a counter's first scrape.
            metrics
                .global_local
                .with_label_values(&labels)
                .inc_by(global.take_local_decisions());
            if n.is_multiple_of(10) {
                global.sweep_local();
            }
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
        let Some(limiter) = &route.limiter else {
            continue;
        };
        if limiter.key().is_none() {
            continue;
        }
        if n.is_multiple_of(10) {
            limiter.sweep();
        }
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
/// is an HTTP/1.1 GET of the policy's `healthCheck.path`, bounded by its timeout.
pub fn health_checks(shared: &Arc<Shared>) {
    let runtime = shared.runtime.load_full();
    let now = std::time::Instant::now();
    for (p, policy) in runtime.policies.iter().enumerate() {
        let Some(rule) = policy.endpoints.health_check_due(now).cloned() else {
            continue;
        };
        for (i, target) in policy.endpoints.targets.iter().enumerate() {
            let (addr, backend) = (target.addr, target.backend);
            let (runtime, shared, rule) = (Arc::clone(&runtime), Arc::clone(shared), rule.clone());
            let host = target.label.clone();
            tokio::spawn(async move {
                let ok = crate::health::probe::probe(addr, &host, &rule.path, rule.timeout).await;
                let Some(policy) = runtime.policies.get(p) else {
                    return;
                };
                if let Some(health) =
                    policy
                        .endpoints
                        .record_check(i, ok, std::time::Instant::now())
                {
                    let healthy = health == crate::health::Health::Healthy;
                    let up = backend_up(&policy.endpoints, backend, std::time::Instant::now());
                    shared
                        .metrics
                        .backend_healthy
                        .with_label_values(&[policy.name.as_str(), host.as_str()])
                        .set(i64::from(up));
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

/// Runs the control-plane stream on a background service's runtime.
pub struct FollowControlPlane(pub std::sync::Mutex<Option<ControlPlaneSource>>);

#[async_trait]
impl BackgroundService for FollowControlPlane {
    async fn start(&self, shutdown: ShutdownWatch) {
        let source = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(source) = source {
            source.run(shutdown).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::runtime::Runtime;

    fn shared_with(yaml: &str) -> Arc<Shared> {
        let shared = Arc::new(Shared::new(false, false).unwrap());
        let set = sluice_policy::load::parse_str(Path::new("t.yaml"), yaml).unwrap();
        let runtime = Runtime::build(set, "t".into(), None, &shared.globals).unwrap();
        shared.runtime.store(Arc::new(runtime));
        shared
    }

    #[test]
    fn housekeeping_publishes_the_routes_gauges() {
        let shared = shared_with(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [h]\n  backends: [{address: 127.0.0.1:1}]\n  routes:\n    - name: r\n      circuitBreaker: {consecutiveFailures: 1, openFor: 1s}\n      concurrency: {max: 7}\n      rateLimit: {requestsPerSecond: 1, burst: 1, key: client-ip, maxKeys: 10}\n",
        );
        let m = &shared.metrics;
        let labels = ["p", "r"];
        assert_eq!(m.concurrency_limit.with_label_values(&labels).get(), 0);
        let route = shared.runtime.load_full();
        let limiter = route.policies[0].routes[0].limiter.as_ref().unwrap();
        limiter.check("10.0.0.1");
        limiter.check("10.0.0.2");
        housekeeping(&shared, 1);
        assert_eq!(m.concurrency_limit.with_label_values(&labels).get(), 7);
        assert_eq!(m.route_inflight.with_label_values(&labels).get(), 0);
        assert_eq!(m.breaker_state.with_label_values(&labels).get(), 0);
        assert_eq!(m.rate_limit_keys.with_label_values(&labels).get(), 2);
    }

    #[tokio::test]
    async fn a_job_runs_at_once_then_every_period_until_shutdown() {
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let every = Every {
            period: Duration::from_millis(10),
            job: move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
        };
        let (stop, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move { every.start(watch).await });
        // Generous: waits for three runs, not for a duration.
        for _ in 0..3000 {
            if runs.load(std::sync::atomic::Ordering::SeqCst) >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(runs.load(std::sync::atomic::Ordering::SeqCst) >= 3);
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the job ends at shutdown")
            .unwrap();
    }
}
