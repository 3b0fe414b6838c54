//! The data plane end to end: the real `sluice-proxy` binary on loopback, in front of
//! in-process fake backends, driven by a real HTTP client.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    get, h2c_backend, log_lines, metrics, metrics_once, replace, sample, send_raw, start,
    start_with, upstream, version, wait_new_version, HttpClient, ProxyProcess, TempDir,
};

/// One policy named `shop` for host `shop`, with `backends` and the `routes` YAML.
fn policy(backends: &[(SocketAddr, u32)], routes: &str) -> String {
    let mut yaml = String::from(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec:\n  hosts: [shop]\n  backends:\n",
    );
    for (addr, weight) in backends {
        yaml.push_str(&format!(
            "    - {{address: \"{addr}\", weight: {weight}}}\n"
        ));
    }
    yaml.push_str("  routes:\n");
    yaml.push_str(routes);
    yaml
}

#[tokio::test]
async fn routes_by_host_path_method_and_header_and_answers_404_otherwise() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - {name: canary, match: {pathPrefix: /orders, headers: {x-canary: \"yes\"}}}\n    - {name: orders, match: {pathPrefix: /orders, methods: [GET]}}\n    - {name: health, match: {path: /healthz}}\n";
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");

    let ok = client
        .request("GET", "shop:8080", "/orders/1", &[], b"")
        .await
        .expect("orders");
    assert_eq!(
        (ok.status, ok.text()),
        (200, "a GET /orders/1\n".to_owned())
    );
    let canary = client
        .request("POST", "SHOP", "/orders", &[("x-canary", "yes")], b"{}")
        .await
        .expect("canary");
    assert_eq!(canary.status, 200);

    let wrong_method = client
        .request("POST", "shop", "/orders", &[], b"x")
        .await
        .expect("post");
    assert_eq!(wrong_method.status, 404);
    assert_eq!(
        wrong_method.text(),
        "sluice: policy \"shop\" has no route for POST /orders\n"
    );
    let exact_only = client
        .request("GET", "shop", "/healthz/deep", &[], b"")
        .await
        .expect("deep");
    assert_eq!(exact_only.status, 404);
    let unknown_host = client
        .request("GET", "elsewhere", "/orders", &[], b"")
        .await
        .expect("host");
    assert_eq!(unknown_host.status, 404);
    assert_eq!(
        unknown_host.text(),
        "sluice: no policy governs host \"elsewhere\"\n"
    );

    let log = log_lines(&proxy, 5).await;
    let routes: Vec<&str> = log
        .iter()
        .map(|l| l["route"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(routes, vec!["orders", "canary", "-", "-", "-"]);
    let decisions: Vec<&str> = log
        .iter()
        .map(|l| l["decision"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        decisions,
        vec!["allowed", "allowed", "no_route", "no_route", "no_policy"]
    );
}

#[tokio::test]
async fn a_policy_without_routes_sends_every_request_to_its_backends() {
    // The shipped example, only its backends' addresses replaced by local ones.
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        h2c_backend("c").await,
    );
    let (d, e) = (upstream("d").await, upstream("e").await);
    let mut yaml = include_str!("../../policies/load-balancing.yaml").to_owned();
    for (shipped, local) in [
        ("10.0.1.1:8080", a.addr()),
        ("10.0.1.2:8080", b.addr()),
        ("10.0.1.3:8080", c),
        ("10.0.2.1:8080", d.addr()),
        ("10.0.2.2:8080", e.addr()),
    ] {
        assert!(
            yaml.contains(shipped),
            "load-balancing.yaml has no {shipped}"
        );
        yaml = yaml.replace(shipped, &local.to_string());
    }
    assert!(
        !yaml.contains("routes"),
        "the example is meant to have no routes"
    );
    let dir = TempDir::new();
    let proxy = start(&dir, &yaml).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");

    let mut sessions = HashSet::new();
    for user in 0..40 {
        let user = format!("user-{user}");
        let r = client
            .request(
                "GET",
                "sessions.shop.svc.cluster.local",
                &format!("/sessions/{user}"),
                &[("x-user-id", &user)],
                b"",
            )
            .await
            .expect("sessions");
        assert_eq!(r.status, 200, "{}", r.text());
        sessions.insert(r.header("x-upstream").unwrap_or("?").to_owned());
    }
    // Weights 2:1:1 over 40 keys: each backend, the h2c one too, gets some.
    assert_eq!(sessions, HashSet::from(["a", "b", "c"].map(String::from)));
    for path in ["/", "/search?q=x", "/anything/at/all"] {
        let r = client
            .request("GET", "search.shop.svc.cluster.local", path, &[], b"")
            .await
            .expect("search");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(matches!(r.header("x-upstream"), Some("d" | "e")), "{r:?}");
    }

    let log = log_lines(&proxy, 43).await;
    assert_eq!(log.len(), 43);
    for line in &log {
        assert_eq!(
            (line["route"].as_str(), line["decision"].as_str()),
            (Some("default"), Some("allowed")),
            "{line}"
        );
    }
}

#[tokio::test]
async fn serves_a_route_that_can_never_match_as_written_and_logs_a_warning() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - name: all\n    - {name: orders, match: {pathPrefix: /orders}}\n";
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], routes)).await;
    let r = get(proxy.listen_addr(), "shop", "/orders/1")
        .await
        .expect("orders");
    assert_eq!(r.status, 200);
    let log = log_lines(&proxy, 1).await;
    assert_eq!(log[0]["route"], "all");

    let stderr = proxy.stderr();
    let warned: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["msg"] == "policy applied with warnings")
        .collect();
    assert_eq!(warned.len(), 1, "{stderr}");
    assert_eq!(warned[0]["level"], "warn");
    let warning = format!(
        "{}:10:7: warning: spec.routes[1]: route \"orders\" can never match: route \"all\" (spec.routes[0]) matches every request it would",
        dir.path().join("policy.yaml").display()
    );
    // Several warnings are one field, joined by "; ".
    assert_eq!(warned[0]["warnings"], serde_json::json!(warning));
}

#[tokio::test]
async fn splits_every_hundred_requests_exactly_ninety_ten() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = TempDir::new();
    let proxy = start(
        &dir,
        &policy(&[(a.addr(), 90), (b.addr(), 10)], "    - name: all\n"),
    )
    .await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let mut picks = Vec::new();
    for _ in 0..300 {
        let r = client
            .request("GET", "shop", "/", &[], b"")
            .await
            .expect("request");
        picks.push(r.header("x-upstream").unwrap_or("?").to_owned());
    }
    for window in picks.windows(100) {
        assert_eq!(window.iter().filter(|p| *p == "a").count(), 90);
        assert_eq!(window.iter().filter(|p| *p == "b").count(), 10);
    }
    // The split is smooth, not 90 a's then 10 b's.
    assert!(picks[..20].iter().any(|p| p == "b"), "{:?}", &picks[..20]);
}

#[tokio::test]
async fn skips_a_refusing_backend_and_answers_502_when_none_is_reachable() {
    let a = upstream("a").await;
    // A privileged port nothing in these tests binds: a port probed free and
    // released could be given to another test's listener meanwhile, and answer.
    let dead: SocketAddr = ([127, 0, 0, 1], 1).into();
    let dir = TempDir::new();
    let proxy = start(
        &dir,
        &policy(&[(dead, 1), (a.addr(), 1)], "    - name: all\n"),
    )
    .await;
    for _ in 0..10 {
        let r = get(proxy.listen_addr(), "shop", "/x")
            .await
            .expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = metrics_once(&proxy, "sluice_requests_total{code_class=\"2xx\",decision=\"allowed\",direction=\"outbound\",policy=\"shop\",route=\"all\"}", 10.0).await;
    let refused = format!("sluice_upstream_requests_total{{backend=\"{dead}\",outcome=\"connect_error\",policy=\"shop\"}}");
    assert!(sample(&m, &refused) >= 5.0, "{m}");

    let dir2 = TempDir::new();
    let only_dead = start(&dir2, &policy(&[(dead, 1)], "    - name: all\n")).await;
    let r = get(only_dead.listen_addr(), "shop", "/x")
        .await
        .expect("request");
    assert_eq!(r.status, 502);
    assert_eq!(
        r.text(),
        format!(
            "sluice: no backend of policy \"shop\" accepted a connection (1 tried, last {dead}: ConnectRefused)\n"
        )
    );
}

#[tokio::test]
async fn rate_limited_requests_get_429_with_retry_after_and_ratelimit_headers() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - name: limited\n      rateLimit: {requestsPerSecond: 0.1, burst: 2}\n";
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let first = client
        .request("GET", "shop", "/", &[], b"")
        .await
        .expect("1");
    assert_eq!(first.status, 200);
    assert_eq!(first.header("ratelimit-limit"), Some("2"));
    assert_eq!(first.header("ratelimit-remaining"), Some("1"));
    assert_eq!(
        client
            .request("GET", "shop", "/", &[], b"")
            .await
            .expect("2")
            .status,
        200
    );
    let limited = client
        .request("GET", "shop", "/", &[], b"")
        .await
        .expect("3");
    assert_eq!(limited.status, 429);
    let retry: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((9..=10).contains(&retry), "retry-after {retry}");
    assert_eq!(limited.header("ratelimit-limit"), Some("2"));
    assert_eq!(limited.header("ratelimit-remaining"), Some("0"));
    assert_eq!(
        limited.header("ratelimit-reset"),
        Some(retry.to_string().as_str())
    );
    assert!(limited.text().contains("rate limit of route \"limited\""));
    assert_eq!(
        a.requests(),
        2,
        "the limited request never reached the backend"
    );
    let m = metrics_once(
        &proxy,
        "sluice_requests_total{code_class=\"4xx\",decision=\"rate_limited\",direction=\"outbound\",policy=\"shop\",route=\"limited\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &m,
            "sluice_rate_limited_total{mode=\"enforce\",policy=\"shop\",route=\"limited\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "sluice_requests_total{code_class=\"4xx\",decision=\"rate_limited\",direction=\"outbound\",policy=\"shop\",route=\"limited\"}"),
        1.0
    );
}

#[tokio::test]
async fn keyed_limits_track_at_most_max_keys_and_share_an_overflow_bucket() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - name: per-user\n      rateLimit: {requestsPerSecond: 0.01, burst: 1, key: header:x-user-id, maxKeys: 50}\n";
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let mut allowed = 0;
    for user in 0..2000 {
        let id = format!("user-{user}");
        let r = client
            .request("GET", "shop", "/", &[("x-user-id", id.as_str())], b"")
            .await
            .expect("request");
        allowed += usize::from(r.status == 200);
    }
    // 50 keys with their own bucket of 1, plus one shared overflow bucket of 1.
    assert_eq!(allowed, 51);
    let same_user = client
        .request("GET", "shop", "/", &[("x-user-id", "user-0")], b"")
        .await
        .expect("again");
    assert_eq!(
        same_user.status, 429,
        "a tracked key keeps its own empty bucket"
    );
    // Housekeeping publishes the gauges every second.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let m = metrics(&proxy).await;
    assert_eq!(
        sample(
            &m,
            "sluice_rate_limit_keys{policy=\"shop\",route=\"per-user\"}"
        ),
        50.0
    );
    assert_eq!(
        sample(
            &m,
            "sluice_rate_limit_overflow_total{policy=\"shop\",route=\"per-user\"}"
        ),
        1950.0
    );
}

#[tokio::test]
async fn shadow_mode_lets_limited_requests_through_and_records_them() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - name: trial\n      mode: shadow\n      rateLimit: {requestsPerSecond: 0.01, burst: 1}\n";
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for _ in 0..5 {
        assert_eq!(
            client
                .request("GET", "shop", "/", &[], b"")
                .await
                .expect("request")
                .status,
            200
        );
    }
    assert_eq!(a.requests(), 5);
    let m = metrics(&proxy).await;
    assert_eq!(
        sample(
            &m,
            "sluice_rate_limited_total{mode=\"shadow\",policy=\"shop\",route=\"trial\"}"
        ),
        4.0
    );
    let shadowed: Vec<_> = log_lines(&proxy, 5)
        .await
        .iter()
        .map(|l| {
            (
                l["decision"].as_str().map(str::to_owned),
                l["shadow_decision"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(shadowed[0], (Some("allowed".into()), None));
    for later in &shadowed[1..] {
        assert_eq!(
            later,
            &(Some("allowed".into()), Some("rate_limited".into()))
        );
    }
}

#[tokio::test]
async fn reload_applies_a_new_policy_and_an_invalid_policy_keeps_the_last_good_one() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = TempDir::new();
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], "    - name: all\n")).await;
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/")
            .await
            .expect("a")
            .header("x-upstream"),
        Some("a")
    );
    let v1 = version(&proxy).await;

    replace(&dir, &policy(&[(b.addr(), 1)], "    - name: all\n"));
    let v2 = wait_new_version(&proxy, &v1).await;
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/")
            .await
            .expect("b")
            .header("x-upstream"),
        Some("b")
    );

    replace(
        &dir,
        &policy(
            &[(a.addr(), 1)],
            "    - name: all\n      rateLimit: {burst: 0, requestsPerSecond: 1}\n",
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.stderr().contains("policy rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection logged: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        proxy.stderr().contains(
            "policy.yaml:10:26: spec.routes[0].rateLimit.burst: must be at least 1, got 0"
        ),
        "{}",
        proxy.stderr()
    );
    assert_eq!(version(&proxy).await, v2);
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/")
            .await
            .expect("still b")
            .header("x-upstream"),
        Some("b")
    );
    let m = metrics_once(
        &proxy,
        "sluice_policy_reloads_total{result=\"rejected\",source=\"file\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &m,
            "sluice_policy_reloads_total{result=\"rejected\",source=\"file\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&m, &format!("sluice_policy_info{{version=\"{v2}\"}}")),
        1.0
    );
    assert!(
        !m.contains(&format!("version=\"{v1}\"")),
        "old version still exported"
    );
}

#[tokio::test]
async fn a_reload_that_leaves_a_limit_unchanged_does_not_refill_its_bucket() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let limited = "    - name: limited\n      match: {pathPrefix: /limited}\n      rateLimit: {requestsPerSecond: 0.01, burst: 2}\n";
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], limited)).await;
    for expected in [200, 200, 429] {
        assert_eq!(
            get(proxy.listen_addr(), "shop", "/limited")
                .await
                .expect("r")
                .status,
            expected
        );
    }
    let v1 = version(&proxy).await;
    // Touching the file with the same content is no new version at all.
    replace(&dir, &policy(&[(a.addr(), 1)], limited));
    // Another route changes: new version, same bucket.
    let more = format!("{limited}    - name: other\n");
    replace(&dir, &policy(&[(a.addr(), 1)], &more));
    wait_new_version(&proxy, &v1).await;
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/limited")
            .await
            .expect("r")
            .status,
        429
    );
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/other")
            .await
            .expect("r")
            .status,
        200
    );
    // Changing the limit itself starts a fresh bucket.
    let v2 = version(&proxy).await;
    replace(
        &dir,
        &policy(&[(a.addr(), 1)], &more.replace("burst: 2", "burst: 3")),
    );
    wait_new_version(&proxy, &v2).await;
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/limited")
            .await
            .expect("r")
            .status,
        200
    );
}

#[tokio::test]
async fn follows_a_kubernetes_configmap_symlink_swap() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = TempDir::new();
    let root = dir.path();
    let data_a = root.join("..2026_11_26_a");
    std::fs::create_dir(&data_a).expect("mkdir");
    std::fs::write(
        data_a.join("policy.yaml"),
        policy(&[(a.addr(), 1)], "    - name: all\n"),
    )
    .expect("write");
    std::os::unix::fs::symlink("..2026_11_26_a", root.join("..data")).expect("..data");
    std::os::unix::fs::symlink("..data/policy.yaml", root.join("policy.yaml"))
        .expect("policy.yaml");

    let proxy = ProxyProcess::start(root, &[]);
    proxy.wait_ready().await;
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/")
            .await
            .expect("a")
            .header("x-upstream"),
        Some("a")
    );
    let v1 = version(&proxy).await;

    // What the kubelet does: new timestamped dir, new ..data_tmp link, rename over ..data.
    let data_b = root.join("..2026_11_26_b");
    std::fs::create_dir(&data_b).expect("mkdir");
    std::fs::write(
        data_b.join("policy.yaml"),
        policy(&[(b.addr(), 1)], "    - name: all\n"),
    )
    .expect("write");
    std::os::unix::fs::symlink("..2026_11_26_b", root.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    std::fs::remove_dir_all(&data_a).expect("old data");

    wait_new_version(&proxy, &v1).await;
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/")
            .await
            .expect("b")
            .header("x-upstream"),
        Some("b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reloads_under_load_fail_no_request_and_mix_no_versions() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = TempDir::new();
    let version_a = policy(&[(a.addr(), 1)], "    - name: all\n");
    let version_b = policy(&[(b.addr(), 1)], "    - name: all\n      timeout: 5s\n");
    let proxy = start(&dir, &version_a).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for worker in 0..4u32 {
        let (addr, stop) = (proxy.listen_addr(), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let mut client = HttpClient::connect(addr).await.expect("connect");
            let mut seen = Vec::new();
            // Bounded: stops when told, or after 100k requests whatever happens.
            for n in 0..100_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let trace = format!("{:08x}{n:024x}", worker + 1);
                let tp = format!("00-{trace}-00f067aa0ba902b7-01");
                let r = client
                    .request("GET", "shop", "/", &[("traceparent", tp.as_str())], b"")
                    .await
                    .unwrap_or_else(|e| panic!("request {n} of client {worker} failed: {e}"));
                assert_eq!(r.status, 200, "{}", r.text());
                seen.push((trace, r.header("x-upstream").unwrap_or("?").to_owned()));
            }
            seen
        }));
    }
    let mut current = version(&proxy).await;
    for i in 0..50 {
        replace(&dir, if i % 2 == 0 { &version_b } else { &version_a });
        current = wait_new_version(&proxy, &current).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut responses = Vec::new();
    for c in clients {
        responses.extend(c.await.expect("client task"));
    }
    let m = metrics_once(
        &proxy,
        "sluice_policy_reloads_total{result=\"accepted\",source=\"file\"}",
        51.0,
    )
    .await;
    assert_eq!(
        sample(
            &m,
            "sluice_policy_reloads_total{result=\"accepted\",source=\"file\"}"
        ),
        51.0
    );

    // Each request's pinned version (from the access log) must explain its backend.
    let log = log_lines(&proxy, responses.len()).await;
    let by_trace: HashMap<&str, (&str, &str)> = log
        .iter()
        .filter_map(|l| {
            Some((
                l["trace_id"].as_str()?,
                (l["policy_version"].as_str()?, l["backend"].as_str()?),
            ))
        })
        .collect();
    let mut backends_of: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (trace, upstream_name) in &responses {
        let (version, backend) = by_trace
            .get(trace.as_str())
            .expect("every request is logged");
        let expected = if *upstream_name == "a" {
            a.addr()
        } else {
            b.addr()
        };
        assert_eq!(*backend, expected.to_string());
        backends_of.entry(version).or_default().insert(backend);
    }
    assert!(
        responses.len() > 200,
        "too little load: {}",
        responses.len()
    );
    assert!(backends_of.len() >= 2, "load did not span reloads");
    for (version, backends) in backends_of {
        assert_eq!(
            backends.len(),
            1,
            "version {version} served by {backends:?}"
        );
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    // A drain timeout far beyond the wait for the exit below: exiting within that
    // wait means the proxy left once drained, not when the timeout ran out.
    let policy = policy(&[(a.addr(), 1)], "    - name: all\n");
    let proxy = start_with(&dir, &policy, &["--drain-timeout", "300s"]).await;
    let addr = proxy.listen_addr();
    let slow = tokio::spawn(async move {
        let mut client = HttpClient::connect(addr).await.expect("connect");
        client
            .request("GET", "shop", "/slow", &[("x-demo-delay-ms", "800")], b"")
            .await
    });
    // In flight: the backend has it (and answers after its delay).
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.sigterm();
    let response = slow
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(response.status, 200);
    let status = proxy
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("exits once drained");
    assert!(status.success(), "{status:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
    let drained = proxy
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["msg"] == "drained, exiting")
        .unwrap_or_else(|| panic!("no drained line: {}", proxy.stderr()));
    assert_eq!(drained["inflight_dropped"], 0, "{drained}");
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_proxy_keeps_serving() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], "    - name: all\n")).await;
    for garbage in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost shop\r\n\r\n",
    ] {
        let reply = send_raw(proxy.listen_addr(), garbage).await.expect("raw");
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{text:?} for {:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/")
            .await
            .expect("ok")
            .status,
        200
    );
}

#[tokio::test]
async fn propagates_a_valid_traceparent_and_starts_one_when_absent() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start(&dir, &policy(&[(a.addr(), 1)], "    - name: all\n")).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = client
        .request("GET", "shop", "/", &[("traceparent", tp)], b"")
        .await
        .expect("with");
    assert_eq!(r.header("x-seen-traceparent"), Some(tp));
    let r = client
        .request("GET", "shop", "/", &[], b"")
        .await
        .expect("without");
    let started = r
        .header("x-seen-traceparent")
        .expect("generated")
        .to_owned();
    let log = log_lines(&proxy, 2).await;
    assert_eq!(log[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        Some(log[1]["trace_id"].as_str().unwrap_or("")),
        started.split('-').nth(1)
    );
    for field in [
        "ts",
        "method",
        "host",
        "path",
        "policy",
        "route",
        "backend",
        "status",
        "duration_ms",
        "decision",
        "policy_version",
    ] {
        assert!(
            !log[1][field].is_null(),
            "access log lacks {field}: {}",
            log[1]
        );
    }
}

#[tokio::test]
async fn admin_reports_readiness_metrics_and_the_active_policy() {
    let dir = TempDir::new();
    let invalid = dir.write("policy.yaml", "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: x}\nspec: {hosts: [a], colour: red}\n");
    let proxy = ProxyProcess::start(&invalid, &[]);
    // Not ready while no valid policy was ever loaded; ready once one is written.
    let deadline = Instant::now() + Duration::from_secs(10);
    let not_ready = loop {
        match get(proxy.admin_addr(), "admin", "/ready").await {
            Ok(r) => break r,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("admin never came up: {e}: {}", proxy.stderr()),
        }
    };
    assert_eq!(not_ready.status, 503);
    assert_eq!(
        get(proxy.listen_addr(), "a", "/")
            .await
            .expect("req")
            .status,
        503
    );
    let a = upstream("a").await;
    replace(&dir, &policy(&[(a.addr(), 1)], "    - name: all\n"));
    proxy.wait_ready().await;
    let ready = get(proxy.admin_addr(), "admin", "/ready")
        .await
        .expect("ready");
    assert!(
        ready.text().starts_with("ready: policy version "),
        "{}",
        ready.text()
    );
    assert_eq!(
        get(proxy.admin_addr(), "admin", "/live")
            .await
            .expect("live")
            .status,
        200
    );
    let dump: serde_json::Value = serde_json::from_slice(
        &get(proxy.admin_addr(), "admin", "/config_dump")
            .await
            .expect("dump")
            .body,
    )
    .expect("json");
    assert_eq!(dump["policies"][0]["metadata"]["name"], "shop");
    assert!(dump["source"].as_str().unwrap_or("").starts_with("file:"));
    get(proxy.listen_addr(), "shop", "/")
        .await
        .expect("traffic");
    // Recorded after the response is sent, and a route's series exist from its
    // first recorded request on.
    let m = metrics_once(&proxy, "sluice_request_duration_seconds_count", 1.0).await;
    for name in [
        "sluice_requests_total",
        "sluice_request_duration_seconds_bucket",
        "sluice_upstream_requests_total",
        "sluice_policy_reloads_total",
        "sluice_policy_info",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    assert!(m.contains("sluice_policy_reloads_total{result=\"rejected\",source=\"file\"} 1"));
}
