//! Balancing, health and protocols end to end: P2C under latency skew, consistent
//! hashing across a reload, active health checks, outlier ejection with its cap,
//! h2c on both sides, the inbound listener, balancer state across a reload, and a
//! canary route (by header) with backends of its own.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_demo::upstream::Behaviour;
use support::{
    get, h2c_backend, metrics, replace, sample, start_with, upstream_with_latency, version,
    wait_new_version, HttpClient, ProxyProcess, TempDir,
};

fn policy(name: &str, backends: &[(SocketAddr, u32)], spec_extra: &str, routes: &str) -> String {
    let mut yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}]\n{spec_extra}  backends:\n"
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

async fn upstream_of(client: &mut HttpClient, host: &str, headers: &[(&str, &str)]) -> String {
    let r = client
        .request("GET", host, "/", headers, b"")
        .await
        .expect("request");
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-upstream").unwrap_or("?").to_owned()
}

#[tokio::test]
async fn p2c_prefers_the_faster_of_two_backends() {
    let fast = upstream_with_latency("fast", Duration::ZERO).await;
    let slow = upstream_with_latency("slow", Duration::from_millis(40)).await;
    let dir = TempDir::new();
    let yaml = policy(
        "shop",
        &[(fast.addr(), 1), (slow.addr(), 1)],
        "  loadBalancer: {algorithm: p2c-ewma}\n",
        "    - name: all\n",
    );
    let proxy = start_with(&dir, &yaml, &[]).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let mut fast_hits = 0;
    for _ in 0..100 {
        fast_hits += usize::from(upstream_of(&mut client, "shop", &[]).await == "fast");
    }
    assert!(fast_hits >= 85, "fast got {fast_hits}/100");
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_and_moves_few_when_a_backend_leaves() {
    let mut ups = Vec::new();
    for name in ["a", "b", "c", "d"] {
        ups.push(upstream_with_latency(name, Duration::ZERO).await);
    }
    let backends: Vec<(SocketAddr, u32)> = ups.iter().map(|u| (u.addr(), 1)).collect();
    let lb = "  loadBalancer: {algorithm: consistent-hash, hashOn: header:x-user-id}\n";
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", &backends, lb, "    - name: all\n"),
        &[],
    )
    .await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let users: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
    let mut before = HashMap::new();
    for user in &users {
        let first = upstream_of(&mut client, "shop", &[("x-user-id", user)]).await;
        let again = upstream_of(&mut client, "shop", &[("x-user-id", user)]).await;
        assert_eq!(first, again, "{user} moved without a change");
        before.insert(user.clone(), first);
    }
    let v1 = version(&proxy).await;
    replace(
        &dir,
        &policy("shop", &backends[..3], lb, "    - name: all\n"),
    );
    wait_new_version(&proxy, &v1).await;
    let mut moved_elsewhere = 0;
    for user in &users {
        let now = upstream_of(&mut client, "shop", &[("x-user-id", user)]).await;
        let was = &before[user];
        if was != "d" && *was != now {
            moved_elsewhere += 1;
        }
    }
    let on_d = before.values().filter(|b| *b == "d").count();
    assert!((50..=150).contains(&on_d), "d had {on_d} of 400 keys");
    // Only d's keys should move; Maglev moves a few others (well under 1/N).
    assert!(
        moved_elsewhere <= 12,
        "{moved_elsewhere} keys of the remaining backends moved"
    );
}

#[tokio::test]
async fn health_checks_evict_a_failing_backend_and_bring_it_back() {
    let (a, b) = (
        upstream_with_latency("a", Duration::ZERO).await,
        upstream_with_latency("b", Duration::ZERO).await,
    );
    let dir = TempDir::new();
    let hc = "  healthCheck: {path: /healthz, interval: 100ms, timeout: 100ms, unhealthyAfter: 1, healthyAfter: 1}\n";
    let proxy = start_with(
        &dir,
        &policy(
            "shop",
            &[(a.addr(), 1), (b.addr(), 1)],
            hc,
            "    - name: all\n",
        ),
        &[],
    )
    .await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    b.set_behaviour(Behaviour::Fail(500));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..20 {
        assert_eq!(upstream_of(&mut client, "shop", &[]).await, "a");
    }
    // The series itself, at 0 (an absent one would read as 0 too): a used
    // policy's backend gauges are published within a second or so.
    let line = format!(
        "sluice_backend_healthy{{backend=\"{}\",policy=\"shop\"}} 0\n",
        b.addr()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&proxy).await;
        if m.contains(&line) {
            break;
        }
        assert!(Instant::now() < deadline, "no {line:?} in\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.set_behaviour(Behaviour::Normal);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut seen_b = 0;
    for _ in 0..20 {
        seen_b += usize::from(upstream_of(&mut client, "shop", &[]).await == "b");
    }
    assert_eq!(seen_b, 10, "b is back in the rotation");
}

#[tokio::test]
async fn outlier_detection_ejects_failing_backends_up_to_the_cap() {
    let a = upstream_with_latency("a", Duration::ZERO).await;
    let (b, c) = (
        upstream_with_latency("b", Duration::ZERO).await,
        upstream_with_latency("c", Duration::ZERO).await,
    );
    b.set_behaviour(Behaviour::Fail(500));
    c.set_behaviour(Behaviour::Fail(500));
    let dir = TempDir::new();
    let od = "  outlierDetection: {consecutiveFailures: 2, ejectFor: 30s, maxEjectedPercent: 34}\n";
    let backends = [(a.addr(), 1), (b.addr(), 1), (c.addr(), 1)];
    let proxy = start_with(
        &dir,
        &policy("shop", &backends, od, "    - name: all\n"),
        &[],
    )
    .await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for _ in 0..30 {
        client
            .request("GET", "shop", "/", &[], b"")
            .await
            .expect("request");
    }
    let m = metrics(&proxy).await;
    let ejections: f64 = [b.addr(), c.addr()]
        .iter()
        .map(|addr| {
            sample(
                &m,
                &format!("sluice_backend_ejections_total{{backend=\"{addr}\",policy=\"shop\"}}"),
            )
        })
        .sum();
    assert_eq!(
        ejections, 1.0,
        "at most 34% of 3 backends may be ejected at once"
    );
    // One of b, c is out: the other two now share all traffic.
    let (b_before, c_before) = (b.requests(), c.requests());
    for _ in 0..20 {
        client
            .request("GET", "shop", "/", &[], b"")
            .await
            .expect("request");
    }
    let (b_got, c_got) = (b.requests() - b_before, c.requests() - c_before);
    assert!(
        b_got == 0 || c_got == 0,
        "one failing backend is ejected: b {b_got}, c {c_got}"
    );
}

#[tokio::test]
async fn h2c_clients_and_h2c_backends_go_through_the_proxy() {
    let backend = h2c_backend("h2").await;
    let dir = TempDir::new();
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: grpc}}\nspec:\n  hosts: [grpc]\n  backends:\n    - {{address: \"{backend}\", protocol: h2c}}\n  routes:\n    - name: all\n"
    );
    let proxy = start_with(&dir, &yaml, &["--h2c"]).await;
    let tcp = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::builder()
        .method("GET")
        .uri("http://grpc/hello")
        .body(())
        .expect("request");
    let (response, _) = client.send_request(req, true).expect("send");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-upstream")
            .and_then(|v| v.to_str().ok()),
        Some("h2")
    );
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        text.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(text, b"h2c backend\n");
    // HTTP/1.1 still works on the same listener.
    let h1 = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect")
        .request("GET", "grpc", "/", &[], b"")
        .await;
    assert_eq!(h1.expect("h1").status, 200);
}

#[tokio::test]
async fn the_inbound_listener_rate_limits_traffic_into_the_local_app() {
    let app = upstream_with_latency("app", Duration::ZERO).await;
    let other = upstream_with_latency("other", Duration::ZERO).await;
    let dir = TempDir::new();
    let inbound_policy = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: me}\nspec:\n  routes:\n    - name: api\n      rateLimit: {requestsPerSecond: 0.01, burst: 2}\n";
    let outbound = policy("shop", &[(other.addr(), 1)], "", "    - name: all\n");
    let path = dir.write("policy.yaml", &format!("{outbound}---\n{inbound_policy}"));
    let app_arg = app.addr().to_string();
    let proxy = ProxyProcess::start(
        &path,
        &[
            "--inbound",
            "127.0.0.1:0",
            "--app",
            &app_arg,
            "--inbound-policy",
            "me",
        ],
    );
    proxy.wait_ready().await;
    let inbound_addr = proxy.addr("inbound");
    let mut client = HttpClient::connect(inbound_addr)
        .await
        .expect("connect inbound");
    for expected in [200, 200, 429] {
        let r = client
            .request("GET", "whatever.example", "/orders", &[], b"")
            .await
            .expect("inbound");
        assert_eq!(r.status, expected);
        if expected == 200 {
            assert_eq!(r.header("x-upstream"), Some("app"));
        }
    }
    // The outbound listener is independent.
    assert_eq!(
        get(proxy.listen_addr(), "shop", "/")
            .await
            .expect("outbound")
            .header("x-upstream"),
        Some("other")
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = metrics(&proxy).await;
        let inbound = sample(&m, "sluice_requests_total{code_class=\"2xx\",decision=\"allowed\",direction=\"inbound\",policy=\"me\",route=\"api\"}");
        let outbound = sample(&m, "sluice_requests_total{code_class=\"2xx\",decision=\"allowed\",direction=\"outbound\",policy=\"shop\",route=\"all\"}");
        if (inbound, outbound) == (2.0, 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "inbound {inbound}, outbound {outbound}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn balancer_position_survives_an_unrelated_reload() {
    let (a, b) = (
        upstream_with_latency("a", Duration::ZERO).await,
        upstream_with_latency("b", Duration::ZERO).await,
    );
    let dir = TempDir::new();
    let backends = [(a.addr(), 9), (b.addr(), 1)];
    let proxy = start_with(
        &dir,
        &policy("shop", &backends, "", "    - name: all\n"),
        &[],
    )
    .await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let mut picks = Vec::new();
    for _ in 0..5 {
        picks.push(upstream_of(&mut client, "shop", &[]).await);
    }
    let v1 = version(&proxy).await;
    replace(
        &dir,
        &policy(
            "shop",
            &backends,
            "",
            "    - name: all\n      timeout: 3s\n",
        ),
    );
    wait_new_version(&proxy, &v1).await;
    for _ in 0..15 {
        picks.push(upstream_of(&mut client, "shop", &[]).await);
    }
    // A fresh balancer would restart its sequence; a carried one keeps the exact split.
    for window in picks.windows(10) {
        assert_eq!(window.iter().filter(|p| *p == "b").count(), 1, "{picks:?}");
    }
}

#[tokio::test]
async fn a_canary_route_by_header_splits_over_its_own_backends() {
    let mut ups = Vec::new();
    for name in ["a", "b", "c1", "c2"] {
        ups.push(upstream_with_latency(name, Duration::ZERO).await);
    }
    let (c1, c2) = (ups[2].addr(), ups[3].addr());
    let routes = format!(
        "    - name: canary\n      match: {{headers: {{x-canary: \"true\"}}}}\n      backends:\n        - {{address: \"{c1}\", weight: 3}}\n        - {{address: \"{c2}\", weight: 1}}\n    - name: default\n"
    );
    let dir = TempDir::new();
    let backends = [(ups[0].addr(), 1), (ups[1].addr(), 1)];
    let proxy = start_with(&dir, &policy("shop", &backends, "", &routes), &[]).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let mut hits: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let upstream = upstream_of(&mut client, "shop", &[("x-canary", "true")]).await;
        *hits.entry(format!("canary->{upstream}")).or_default() += 1;
        let upstream = upstream_of(&mut client, "shop", &[("x-canary", "no")]).await;
        *hits.entry(format!("default->{upstream}")).or_default() += 1;
    }
    // Smooth weighted round robin: the exact split over each set, and no request
    // of one route at the other's backends.
    let expected: HashMap<String, usize> = [
        ("canary->c1", 30),
        ("canary->c2", 10),
        ("default->a", 20),
        ("default->b", 20),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(hits, expected);
    let m = metrics(&proxy).await;
    let series = format!(
        "sluice_upstream_requests_total{{backend=\"{c2}\",outcome=\"success\",policy=\"shop\"}}"
    );
    assert_eq!(sample(&m, &series), 10.0, "{series} in\n{m}");
}
