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

const GOVERNED: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [h]\n  backends: [{address: 127.0.0.1:1}]\n  routes:\n    - name: r\n      circuitBreaker: {consecutiveFailures: 1, openFor: 1s}\n      concurrency: {max: 7}\n      rateLimit: {requestsPerSecond: 1, burst: 1, key: client-ip, maxKeys: 10}\n";

/// What a request settling on route `route` of policy 0 marks: the route and its
/// policy (see `series`).
fn use_route(shared: &Shared, route: usize) {
    let runtime = shared.runtime.load_full();
    let policy = &runtime.policies[0];
    let route = &policy.routes[route];
    policy.series.record(&shared.series);
    route
        .series
        .record(&shared.series, route.slo_threshold, |_| ());
}

fn rendered(shared: &Shared) -> String {
    String::from_utf8(shared.metrics.render()).expect("utf-8")
}

#[test]
fn housekeeping_publishes_the_routes_gauges() {
    let shared = shared_with(GOVERNED);
    let m = &shared.metrics;
    let labels = ["p", "r"];
    let route = shared.runtime.load_full();
    let limiter = route.policies[0].routes[0].limiter.as_ref().unwrap();
    limiter.check("10.0.0.1");
    limiter.check("10.0.0.2");
    use_route(&shared, 0);
    housekeeping(&shared, 1, Instant::now());
    assert_eq!(m.concurrency_limit.with_label_values(&labels).get(), 7);
    assert_eq!(m.route_inflight.with_label_values(&labels).get(), 0);
    assert_eq!(m.breaker_state.with_label_values(&labels).get(), 0);
    assert_eq!(m.rate_limit_keys.with_label_values(&labels).get(), 2);
}

/// A resolver answering whatever the test last set, counting its lookups.
struct FakeResolver {
    answer: std::sync::Mutex<Result<crate::resolve::Answer, ResolveError>>,
    lookups: std::sync::atomic::AtomicU32,
}

impl FakeResolver {
    fn new() -> Self {
        FakeResolver {
            answer: std::sync::Mutex::new(Err(ResolveError::Config("unset".into()))),
            lookups: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn answer(&self, last_octets: &[u8], ttl: Option<Duration>) {
        *self.answer.lock().unwrap() = Ok(crate::resolve::Answer {
            addrs: addrs(last_octets),
            ttl,
        });
    }

    fn fail(&self) {
        *self.answer.lock().unwrap() = Err(ResolveError::Lookup {
            host: "localhost".into(),
            message: "SERVFAIL".into(),
        });
    }

    fn lookups(&self) -> u32 {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Resolve for FakeResolver {
    async fn lookup(&self, _: &str, _: u16) -> Result<crate::resolve::Answer, ResolveError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.answer.lock().unwrap().clone()
    }
}

fn addrs(last_octets: &[u8]) -> Vec<SocketAddr> {
    last_octets
        .iter()
        .map(|i| SocketAddr::from(([10, 0, 0, *i], 8080)))
        .collect()
}

/// `localhost` (from /etc/hosts at build, never from DNS) and an IP literal.
const NAMED: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [h]\n  backends: [{address: 'localhost:8080', weight: 90}, {address: '127.0.0.1:9', weight: 10}]\n  loadBalancer: {algorithm: p2c-ewma}\n  routes:\n    - name: r\n      rateLimit: {requestsPerSecond: 1, burst: 1}\n";

#[tokio::test]
async fn changed_records_change_the_endpoints_without_a_reload() {
    let shared = shared_with(NAMED);
    let before = shared.runtime.load_full();
    let (resolver, mut names, t0) = (FakeResolver::new(), Names::default(), Instant::now());
    resolver.answer(&[1, 2, 3], Some(Duration::from_secs(10)));
    resolve_backends(&shared, &resolver, &mut names, t0).await;
    let after = shared.runtime.load_full();
    let endpoints = &after.policies[0].endpoints;
    assert_eq!(endpoints.backend_addresses(0), addrs(&[1, 2, 3]).as_slice());
    assert_eq!(
        endpoints.targets.len(),
        4,
        "three addresses and the literal"
    );
    // Not a reload: the same version and load time, the same route components.
    assert_eq!(
        (after.version.as_str(), after.loaded_at),
        (before.version.as_str(), before.loaded_at)
    );
    let limiter = |rt: &Runtime| rt.policies[0].routes[0].limiter.clone().unwrap();
    assert!(Arc::ptr_eq(&limiter(&before), &limiter(&after)));
    // Not due yet: no lookup, no change.
    resolve_backends(&shared, &resolver, &mut names, t0 + Duration::from_secs(9)).await;
    assert_eq!(resolver.lookups(), 1);
    // At the TTL the new answer is picked up; the endpoint that stays keeps its state.
    endpoints.begin(1);
    resolver.answer(&[2, 4], Some(Duration::from_secs(10)));
    resolve_backends(&shared, &resolver, &mut names, t0 + Duration::from_secs(10)).await;
    let last = shared.runtime.load_full();
    assert_eq!(
        last.policies[0].endpoints.backend_addresses(0),
        addrs(&[2, 4]).as_slice()
    );
    assert_eq!(
        last.policies[0].endpoints.pending_total(),
        1,
        "10.0.0.2 kept its pending request"
    );
    assert_eq!(dns_lookups(&shared, "ok"), 2);
    // A reload carries the resolved addresses over; it does not resolve again.
    let set = last.set.clone();
    let reloaded = Runtime::build(set, "t".into(), Some(&last), &shared.globals).unwrap();
    assert_eq!(
        reloaded.policies[0].endpoints.backend_addresses(0),
        addrs(&[2, 4]).as_slice()
    );
}

#[tokio::test]
async fn a_routes_own_backends_are_resolved_and_swapped_too() {
    let shared = shared_with("apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [h]\n  backends: [{address: '127.0.0.1:9'}]\n  routes:\n    - name: canary\n      match: {headers: {x-canary: 'true'}}\n      backends: [{address: 'localhost:8080'}]\n    - name: rest\n");
    let (resolver, mut names, t0) = (FakeResolver::new(), Names::default(), Instant::now());
    resolver.answer(&[7, 8], Some(Duration::from_secs(10)));
    resolve_backends(&shared, &resolver, &mut names, t0).await;
    let after = shared.runtime.load_full();
    let policy = &after.policies[0];
    let canary = policy.endpoint_set(1).expect("the canary route's own set");
    assert_eq!(canary.backend_addresses(0), addrs(&[7, 8]).as_slice());
    assert!(Arc::ptr_eq(policy.endpoints_of(0), canary));
    // The policy's own set (an IP literal) is left as it was.
    assert_eq!(policy.endpoints.targets.len(), 1);
    assert!(
        policy.endpoint_set(2).is_none(),
        "the other route has no set of its own"
    );
}

fn dns_lookups(shared: &Shared, result: &str) -> u64 {
    shared
        .metrics
        .dns_lookups
        .with_label_values(&["localhost:8080", result])
        .get()
}

#[tokio::test]
async fn a_failing_lookup_keeps_the_last_good_addresses_and_is_counted() {
    let shared = shared_with(NAMED);
    let (resolver, mut names, t0) = (FakeResolver::new(), Names::default(), Instant::now());
    resolver.answer(&[1, 2], None);
    resolve_backends(&shared, &resolver, &mut names, t0).await;
    resolver.fail();
    let t1 = t0 + crate::resolve::DEFAULT_REFRESH;
    resolve_backends(&shared, &resolver, &mut names, t1).await;
    let runtime = shared.runtime.load_full();
    assert_eq!(
        runtime.policies[0].endpoints.backend_addresses(0),
        addrs(&[1, 2]).as_slice()
    );
    assert_eq!(
        (dns_lookups(&shared, "ok"), dns_lookups(&shared, "error")),
        (1, 1)
    );
    // Retried after the shortest wait, not at the TTL.
    assert_eq!(
        names.next_due("localhost", 8080),
        Some(t1 + crate::resolve::MIN_REFRESH)
    );
}

#[tokio::test]
async fn a_snapshot_a_reload_built_meanwhile_is_corrected_on_the_next_tick() {
    let shared = shared_with(NAMED);
    let (resolver, mut names, t0) = (FakeResolver::new(), Names::default(), Instant::now());
    resolver.answer(&[1, 2], Some(Duration::from_secs(60)));
    let stale = shared.runtime.load_full();
    resolve_backends(&shared, &resolver, &mut names, t0).await;
    // A reload built from the snapshot before the swap stores the old addresses.
    let reload =
        Runtime::build(stale.set.clone(), "t".into(), Some(&stale), &shared.globals).unwrap();
    shared.runtime.store(Arc::new(reload));
    resolve_backends(&shared, &resolver, &mut names, t0 + Duration::from_secs(1)).await;
    assert_eq!(resolver.lookups(), 1, "no new lookup was needed");
    let runtime = shared.runtime.load_full();
    assert_eq!(
        runtime.policies[0].endpoints.backend_addresses(0),
        addrs(&[1, 2]).as_slice()
    );
}

#[test]
fn housekeeping_publishes_each_backends_endpoint_count() {
    let shared = shared_with(NAMED);
    let runtime = shared.runtime.load_full();
    let resolved = vec![
        addrs(&[1, 2, 3]),
        vec![SocketAddr::from(([127, 0, 0, 1], 9))],
    ];
    let endpoints = runtime.policies[0]
        .endpoints
        .with_resolved(resolved, Instant::now())
        .unwrap();
    shared.runtime.store(Arc::new(
        runtime.with_endpoints(vec![vec![(0, Arc::new(endpoints))]]),
    ));
    use_route(&shared, 0);
    housekeeping(&shared, 1, Instant::now());
    let gauge = |backend: &str| {
        shared
            .metrics
            .backend_endpoints
            .with_label_values(&["p", backend])
            .get()
    };
    assert_eq!((gauge("localhost:8080"), gauge("127.0.0.1:9")), (3, 1));
}

#[test]
fn unused_routes_and_policies_have_no_series() {
    let shared = shared_with(GOVERNED);
    housekeeping(&shared, 1, Instant::now());
    let text = rendered(&shared);
    assert!(!text.contains("policy=\"p\""), "{text}");
    // Exported at all: with no series (not an empty family with a header only).
    assert!(!text.contains("sluice_request_duration_seconds"), "{text}");
}

#[test]
fn housekeeping_removes_the_series_of_an_idle_route_and_they_return_with_traffic() {
    let shared = shared_with(GOVERNED);
    let idle = shared.series.idle();
    let t0 = Instant::now();
    use_route(&shared, 0);
    shared
        .metrics
        .rate_limited
        .with_label_values(&["p", "r", "enforce"])
        .inc();
    housekeeping(&shared, 1, t0);
    let text = rendered(&shared);
    for series in [
        "sluice_request_duration_seconds_bucket{policy=\"p\",route=\"r\",le=\"0.001\"} 0",
        "sluice_circuit_breaker_state{policy=\"p\",route=\"r\"} 0",
        "sluice_concurrency_limit{policy=\"p\",route=\"r\"} 7",
        "sluice_rate_limit_keys{policy=\"p\",route=\"r\"} 0",
        "sluice_rate_limited_total{mode=\"enforce\",policy=\"p\",route=\"r\"} 1",
        "sluice_backend_endpoints{backend=\"127.0.0.1:1\",policy=\"p\"} 1",
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }

    housekeeping(&shared, 2, t0 + idle);
    let text = rendered(&shared);
    assert!(!text.contains("policy=\"p\""), "{text}");

    use_route(&shared, 0);
    housekeeping(&shared, 3, t0 + idle + Duration::from_secs(1));
    let text = rendered(&shared);
    assert!(
        text.contains("sluice_circuit_breaker_state{policy=\"p\",route=\"r\"} 0"),
        "{text}"
    );
    assert!(
        !text.contains("sluice_rate_limited_total"),
        "counters start afresh, made at their next event: {text}"
    );
}

#[test]
fn a_policys_upstream_counts_are_exported_again_after_its_series_expired() {
    use crate::exchange::{Observe, Outcome};
    let shared = shared_with(GOVERNED);
    let runtime = shared.runtime.load_full();
    let policy = &runtime.policies[0];
    let t0 = Instant::now();
    let series =
        "sluice_upstream_requests_total{backend=\"127.0.0.1:1\",outcome=\"success\",policy=\"p\"}";
    let observer = crate::shard::Handle::new(Arc::clone(&shared));
    observer.upstream(policy, &policy.endpoints, 0, Outcome::Success);
    assert!(rendered(&shared).contains(&format!("{series} 1")));
    housekeeping(&shared, 1, t0);
    housekeeping(&shared, 2, t0 + shared.series.idle());
    assert!(!rendered(&shared).contains(series));
    // The handle cached for the backend pointed at the removed series: it was
    // dropped with it, and the next attempt counts into a new one.
    observer.upstream(policy, &policy.endpoints, 0, Outcome::Success);
    assert!(
        rendered(&shared).contains(&format!("{series} 1")),
        "{}",
        rendered(&shared)
    );
}

#[test]
fn a_reload_that_removes_a_route_removes_its_series() {
    let two_routes = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [h]\n  backends: [{address: 127.0.0.1:1}]\n  routes:\n    - name: kept\n      concurrency: {max: 7}\n    - name: removed\n      concurrency: {max: 7}\n";
    let shared = shared_with(two_routes);
    let t0 = Instant::now();
    use_route(&shared, 0);
    use_route(&shared, 1);
    housekeeping(&shared, 1, t0);
    let before = shared.runtime.load_full();
    let kept = Arc::clone(&before.policies[0].routes[0].series);
    let yaml = two_routes.replace("    - name: removed\n      concurrency: {max: 7}\n", "");
    let set = sluice_policy::load::parse_str(Path::new("t.yaml"), &yaml).unwrap();
    let reloaded = Runtime::build(set, "t".into(), Some(&before), &shared.globals).unwrap();
    assert!(
        Arc::ptr_eq(&reloaded.policies[0].routes[0].series, &kept),
        "a route that stays keeps its series"
    );
    shared.install(reloaded);
    housekeeping(&shared, 2, t0 + Duration::from_secs(1));
    let text = rendered(&shared);
    assert!(!text.contains("route=\"removed\""), "{text}");
    assert!(
        text.contains("sluice_concurrency_limit{policy=\"p\",route=\"kept\"} 7"),
        "{text}"
    );
}

#[test]
fn a_reload_that_removes_a_backend_removes_its_series() {
    let two_backends = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [h]\n  backends: [{address: 127.0.0.1:1}, {address: 127.0.0.1:2}]\n  healthCheck: {path: /healthz, interval: 1s, timeout: 500ms, unhealthyAfter: 2, healthyAfter: 1}\n";
    let shared = shared_with(two_backends);
    use_route(&shared, 0);
    housekeeping(&shared, 1, Instant::now());
    let series =
        |backend: &str| format!("sluice_backend_healthy{{backend=\"{backend}\",policy=\"p\"}}");
    let text = rendered(&shared);
    assert!(text.contains(&series("127.0.0.1:2")), "{text}");

    let before = shared.runtime.load_full();
    let yaml = two_backends.replace(", {address: 127.0.0.1:2}", "");
    let set = sluice_policy::load::parse_str(Path::new("t.yaml"), &yaml).unwrap();
    shared.install(Runtime::build(set, "t".into(), Some(&before), &shared.globals).unwrap());
    let text = rendered(&shared);
    assert!(!text.contains("backend=\"127.0.0.1:2\""), "{text}");
    assert!(text.contains(&series("127.0.0.1:1")), "{text}");
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

/// Requests take the live snapshot from their thread's pin (`Shared::snapshot`);
/// both ways the snapshot is replaced (a reload's `install`, the endpoint swap of
/// `apply_resolved`) let go of every thread's pin, so no idle worker thread keeps
/// a replaced snapshot (of a whole mesh) alive.
#[tokio::test]
async fn a_replaced_snapshot_is_let_go_by_every_threads_pin() {
    let shared = shared_with(NAMED);
    let idle_thread_pins = |shared: &Arc<Shared>| {
        let pinned = std::thread::scope(|s| {
            s.spawn(|| Arc::downgrade(shared.snapshot().arc()))
                .join()
                .unwrap()
        });
        assert!(pinned.upgrade().is_some(), "held by the thread's pin");
        pinned
    };

    // The endpoint swap.
    let before_resolve = idle_thread_pins(&shared);
    let (resolver, mut names, t0) = (FakeResolver::new(), Names::default(), Instant::now());
    resolver.answer(&[1, 2, 3], Some(Duration::from_secs(10)));
    resolve_backends(&shared, &resolver, &mut names, t0).await;
    assert!(
        before_resolve.upgrade().is_none(),
        "let go at the endpoint swap"
    );
    let now = shared.snapshot();
    assert!(Arc::ptr_eq(now.arc(), &shared.runtime.load_full()));
    assert_eq!(now.policies[0].endpoints.targets.len(), 4);
    drop(now);

    // A reload.
    let before_reload = idle_thread_pins(&shared);
    let set = sluice_policy::load::parse_str(Path::new("t.yaml"), GOVERNED).unwrap();
    shared.install(Runtime::build(set, "t2".into(), None, &shared.globals).unwrap());
    assert!(before_reload.upgrade().is_none(), "let go at the reload");
    let now = shared.snapshot();
    assert!(Arc::ptr_eq(now.arc(), &shared.runtime.load_full()));
    assert_eq!(now.policies[0].routes[0].route.name, "r");
}
