//! Resilience end to end: breakers, fallbacks, shedding, timeouts and retry budgets,
//! through the real `sluice-proxy` binary against fake backends told to fail, hang or
//! slow down. (State-machine details with an injected clock are unit-tested beside
//! each component; these tests prove the wiring.)

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_demo::upstream::Behaviour;
use support::{
    get, metrics, metrics_once, refusing_addr, sample, start, upstream, HttpClient, ProxyProcess,
    TempDir,
};
use tokio::io::AsyncWriteExt;

fn policy(backends: &[SocketAddr], routes: &str) -> String {
    let mut yaml = String::from(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec:\n  hosts: [shop]\n  backends:\n",
    );
    for addr in backends {
        yaml.push_str(&format!("    - address: \"{addr}\"\n"));
    }
    yaml.push_str("  routes:\n");
    yaml.push_str(routes);
    yaml
}

async fn send(
    client: &mut HttpClient,
    path: &str,
    headers: &[(&str, &str)],
) -> sluice_demo::client::Response {
    client
        .request("GET", "shop", path, headers, b"")
        .await
        .expect("request")
}

const JSON_FALLBACK: &str = "      fallback:\n        status: 200\n        headers: {content-type: application/json, x-degraded: \"1\"}\n        body: '{\"degraded\":true}'\n";

#[tokio::test]
async fn consecutive_failures_open_the_breaker_and_the_fallback_is_served_without_the_backend() {
    let a = upstream("a").await;
    a.set_behaviour(Behaviour::Fail(500));
    let dir = TempDir::new();
    let routes = format!(
        "    - name: pay\n      circuitBreaker: {{consecutiveFailures: 3, openFor: 60s}}\n{JSON_FALLBACK}        on: [breaker-open]\n"
    );
    let proxy = start(&dir, &policy(&[a.addr()], &routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for _ in 0..3 {
        // upstream-error is not in `on`: the backend's 500 passes through.
        assert_eq!(send(&mut client, "/", &[]).await.status, 500);
    }
    for _ in 0..5 {
        let r = send(&mut client, "/", &[]).await;
        assert_eq!(
            (r.status, r.text()),
            (200, "{\"degraded\":true}".to_owned())
        );
        assert_eq!(r.header("x-sluice-fallback"), Some("breaker-open"));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(a.requests(), 3, "an open breaker sends nothing upstream");
    let m = metrics_once(&proxy, "sluice_requests_total{code_class=\"2xx\",decision=\"fallback\",direction=\"outbound\",policy=\"shop\",route=\"pay\"}", 5.0).await;
    assert_eq!(
        sample(
            &m,
            "sluice_circuit_breaker_state{policy=\"shop\",route=\"pay\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "sluice_circuit_breaker_transitions_total{policy=\"shop\",route=\"pay\",to=\"open\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "sluice_fallbacks_total{cause=\"breaker-open\",mode=\"enforce\",policy=\"shop\",route=\"pay\"}"),
        5.0
    );
}

#[tokio::test]
async fn an_open_breaker_answers_503_then_half_open_probes_close_it() {
    let a = upstream("a").await;
    a.set_behaviour(Behaviour::Fail(503));
    let dir = TempDir::new();
    let routes = "    - name: pay\n      circuitBreaker: {consecutiveFailures: 2, openFor: 500ms, halfOpenRequests: 2}\n";
    let proxy = start(&dir, &policy(&[a.addr()], routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    assert_eq!(send(&mut client, "/", &[]).await.status, 503);
    assert_eq!(send(&mut client, "/", &[]).await.status, 503);
    let open = send(&mut client, "/", &[]).await;
    assert_eq!(open.status, 503);
    assert_eq!(open.header("retry-after"), Some("1"));
    assert!(
        open.text()
            .contains("circuit breaker of route \"pay\" (policy \"shop\") is open"),
        "{}",
        open.text()
    );
    assert_eq!(a.requests(), 2);

    a.set_behaviour(Behaviour::Normal);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Two probes succeed: closed again, everything flows.
    for _ in 0..5 {
        assert_eq!(send(&mut client, "/", &[]).await.status, 200);
    }
    let m = metrics_once(
        &proxy,
        "sluice_circuit_breaker_transitions_total{policy=\"shop\",route=\"pay\",to=\"closed\"}",
        1.0,
    )
    .await;
    assert_eq!(sample(&m, "sluice_circuit_breaker_transitions_total{policy=\"shop\",route=\"pay\",to=\"half_open\"}"), 1.0);
    assert_eq!(
        sample(
            &m,
            "sluice_circuit_breaker_state{policy=\"shop\",route=\"pay\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn the_static_fallback_is_exact_for_upstream_errors() {
    let a = upstream("a").await;
    a.set_behaviour(Behaviour::Fail(502));
    let dir = TempDir::new();
    let routes = format!("    - name: recs\n{JSON_FALLBACK}        on: [upstream-error]\n");
    let proxy = start(&dir, &policy(&[a.addr()], &routes)).await;
    let r = get(proxy.listen_addr(), "shop", "/recs")
        .await
        .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "{\"degraded\":true}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-degraded"), Some("1"));
    assert_eq!(r.header("x-sluice-fallback"), Some("upstream-error"));
    assert_eq!(r.header("content-length"), Some("17"));
}

#[tokio::test]
async fn an_alternate_backend_serves_upstream_errors_and_rate_limited_requests() {
    let cache = upstream("cache").await;
    let (_dead_socket, dead) = refusing_addr();
    let dir = TempDir::new();
    let routes = format!(
        "    - name: products\n      rateLimit: {{requestsPerSecond: 0.01, burst: 1}}\n      fallback:\n        backend: \"{}\"\n        on: [upstream-error, rate-limited]\n",
        cache.addr()
    );
    let proxy = start(&dir, &policy(&[dead], &routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let first = send(&mut client, "/p/1", &[]).await;
    assert_eq!(
        (first.status, first.header("x-upstream")),
        (200, Some("cache"))
    );
    assert_eq!(first.header("x-sluice-fallback"), Some("upstream-error"));
    let second = send(&mut client, "/p/2", &[]).await;
    assert_eq!(
        (second.status, second.header("x-upstream")),
        (200, Some("cache"))
    );
    assert_eq!(second.header("x-sluice-fallback"), Some("rate-limited"));
    assert_eq!(cache.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_shedding_drops_only_low_while_capacity_lasts_for_the_rest() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - name: stock\n      concurrency: {max: 4}\n      priority: {header: x-priority, shedFirst: [low]}\n";
    let proxy = start(&dir, &policy(&[a.addr()], routes)).await;
    let addr = proxy.listen_addr();
    // Three slow requests hold 3 of 4 slots: the low class's share (75%) is used up.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::spawn(async move {
            let mut c = HttpClient::connect(addr).await.expect("connect");
            c.request("GET", "shop", "/slow", &[("x-demo-delay-ms", "1500")], b"")
                .await
                .expect("slow")
                .status
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.requests() < 3 {
        assert!(Instant::now() < deadline, "slow requests did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut client = HttpClient::connect(addr).await.expect("connect");
    let low = send(&mut client, "/", &[("x-priority", "low")]).await;
    assert_eq!(low.status, 503, "low is shed first");
    assert!(low.text().contains("overloaded"), "{}", low.text());
    let normal = send(&mut client, "/", &[("x-priority", "high")]).await;
    assert_eq!(normal.status, 200, "the rest still has capacity");
    for h in held {
        assert_eq!(h.await.expect("task"), 200);
    }
    let m = metrics_once(
        &proxy,
        "sluice_shed_total{mode=\"enforce\",policy=\"shop\",priority=\"low\",route=\"stock\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &m,
            "sluice_shed_total{mode=\"enforce\",policy=\"shop\",priority=\"low\",route=\"stock\"}"
        ),
        1.0
    );
    assert_eq!(sample(&m, "sluice_shed_total{mode=\"enforce\",policy=\"shop\",priority=\"default\",route=\"stock\"}"), 0.0);
}

#[tokio::test]
async fn the_retry_budget_caps_retries_under_a_failing_backend() {
    let a = upstream("a").await;
    a.set_behaviour(Behaviour::Fail(503));
    let dir = TempDir::new();
    let routes = "    - name: all\n      retries: {attempts: 3, on: [gateway-error], budget: {ratio: 0.2, minPerSecond: 0}}\n";
    let proxy = start(&dir, &policy(&[a.addr()], routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for _ in 0..100 {
        assert_eq!(send(&mut client, "/", &[]).await.status, 503);
    }
    // 100 requests may add at most 20% retries: no storm, however failing the backend.
    let upstream_total = a.requests();
    assert!(
        (110..=121).contains(&upstream_total),
        "backend saw {upstream_total} requests"
    );
    let m = metrics(&proxy).await;
    let retried = sample(
        &m,
        "sluice_retries_total{policy=\"shop\",result=\"retried\",route=\"all\"}",
    );
    assert_eq!(retried as u64, upstream_total - 100);
    assert!(
        sample(
            &m,
            "sluice_retries_total{policy=\"shop\",result=\"budget_exhausted\",route=\"all\"}"
        ) >= 80.0
    );
}

#[tokio::test]
async fn gateway_errors_are_retried_on_another_backend() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    a.set_behaviour(Behaviour::Fail(503));
    let dir = TempDir::new();
    let routes = "    - name: all\n      retries: {attempts: 1, on: [gateway-error]}\n";
    let proxy = start(&dir, &policy(&[a.addr(), b.addr()], routes)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for _ in 0..10 {
        let r = send(&mut client, "/", &[]).await;
        assert_eq!((r.status, r.header("x-upstream")), (200, Some("b")));
    }
    // POST is not idempotent: its 503 is not retried.
    let post = client
        .request("POST", "shop", "/", &[], b"x")
        .await
        .expect("post");
    assert!(post.status == 503 || post.header("x-upstream") == Some("b"));
}

#[tokio::test]
async fn a_hung_backend_is_cut_at_the_route_timeout() {
    let a = upstream("a").await;
    a.set_behaviour(Behaviour::Hang);
    let dir = TempDir::new();
    let proxy = start(
        &dir,
        &policy(&[a.addr()], "    - name: all\n      timeout: 300ms\n"),
    )
    .await;
    // The backend never answers: whatever answers is the route's timeout (the
    // client's own bound, 10 s, is far beyond it).
    let r = get(proxy.listen_addr(), "shop", "/")
        .await
        .expect("request");
    assert_eq!(r.status, 504);
    assert_eq!(
        r.text(),
        "sluice: the backend did not answer within the route's timeout\n"
    );
    assert_eq!(a.requests(), 1, "the request reached the hung backend");
}

/// On both engines (scripts/test runs this file on each): the h1 engine peeks at the
/// client after 100 ms of waiting; pingora reads the client's side while it waits.
#[tokio::test]
async fn a_client_that_leaves_ends_its_request_long_before_the_route_timeout() {
    let a = upstream("a").await;
    a.set_behaviour(Behaviour::Hang);
    let dir = TempDir::new();
    let proxy = start(
        &dir,
        &policy(&[a.addr()], "    - name: all\n      timeout: 300s\n"),
    )
    .await;
    let mut client = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    client
        .write_all(b"GET /leaving HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .expect("write");
    // In flight: the hung backend has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    // Settled with no status (nobody was left to answer). The wait is bounded far
    // below the route's 300 s timeout, so only the client's leaving can end it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let log = proxy.access_log();
        if let Some(line) = log.iter().find(|l| l["path"] == "/leaving") {
            break line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the request was not settled after its client left: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(line["status"], 0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_changes_no_response_but_counts_every_would_be_decision() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - name: trial\n      mode: shadow\n      rateLimit: {requestsPerSecond: 0.01, burst: 1}\n      circuitBreaker: {consecutiveFailures: 1, openFor: 60s}\n      concurrency: {max: 1}\n      fallback: {status: 200, body: degraded, on: [rate-limited]}\n";
    let proxy = start(&dir, &policy(&[a.addr()], routes)).await;
    let addr = proxy.listen_addr();
    let mut client = HttpClient::connect(addr).await.expect("connect");
    // A failure opens the (shadow) breaker; then every request would be refused twice over.
    assert_eq!(
        send(&mut client, "/", &[("x-demo-status", "500")])
            .await
            .status,
        500
    );
    for _ in 0..4 {
        assert_eq!(send(&mut client, "/", &[]).await.status, 200);
    }
    // Two at once: one would have been shed by the concurrency limit of 1.
    let slow = tokio::spawn(async move {
        let mut c = HttpClient::connect(addr).await.expect("connect");
        c.request("GET", "shop", "/", &[("x-demo-delay-ms", "500")], b"")
            .await
            .expect("slow")
            .status
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(send(&mut client, "/", &[]).await.status, 200);
    assert_eq!(slow.await.expect("task"), 200);
    assert_eq!(a.requests(), 7, "shadow mode refuses nothing");

    let m = metrics_once(&proxy, "sluice_requests_total{code_class=\"2xx\",decision=\"allowed\",direction=\"outbound\",policy=\"shop\",route=\"trial\"}", 6.0).await;
    assert_eq!(
        sample(
            &m,
            "sluice_rate_limited_total{mode=\"shadow\",policy=\"shop\",route=\"trial\"}"
        ),
        6.0
    );
    assert_eq!(sample(&m, "sluice_circuit_breaker_rejected_total{mode=\"shadow\",policy=\"shop\",route=\"trial\"}"), 6.0);
    assert!(sample(&m, "sluice_shed_total{mode=\"shadow\",policy=\"shop\",priority=\"default\",route=\"trial\"}") >= 1.0);
    assert_eq!(
        sample(
            &m,
            "sluice_rate_limited_total{mode=\"enforce\",policy=\"shop\",route=\"trial\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(&m, "sluice_fallbacks_total{cause=\"rate-limited\",mode=\"shadow\",policy=\"shop\",route=\"trial\"}"),
        6.0,
        "the fallback that would have answered is counted, not served"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let log = loop {
        let log = proxy.access_log();
        if log.len() >= 7 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(log[1..]
        .iter()
        .all(|l| l["decision"] == "allowed" && l["shadow_decision"] == "rate_limited"));
}

#[tokio::test]
async fn a_reload_of_an_unrelated_route_keeps_an_open_breaker_open() {
    let a = upstream("a").await;
    a.set_behaviour(Behaviour::Fail(500));
    let dir = TempDir::new();
    let guarded = "    - name: pay\n      match: {pathPrefix: /pay}\n      circuitBreaker: {consecutiveFailures: 2, openFor: 60s}\n";
    let proxy = start(&dir, &policy(&[a.addr()], guarded)).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    assert_eq!(send(&mut client, "/pay", &[]).await.status, 500);
    assert_eq!(send(&mut client, "/pay", &[]).await.status, 500);
    assert_eq!(send(&mut client, "/pay", &[]).await.status, 503);
    a.set_behaviour(Behaviour::Normal);

    let dump = |p: &ProxyProcess| {
        let admin = p.admin_addr();
        async move {
            let body = get(admin, "admin", "/config_dump")
                .await
                .expect("dump")
                .body;
            serde_json::from_slice::<serde_json::Value>(&body).expect("json")["version"].clone()
        }
    };
    let before = dump(&proxy).await;
    let tmp = dir.write(
        ".policy.yaml.tmp",
        &policy(&[a.addr()], &format!("{guarded}    - name: other\n")),
    );
    std::fs::rename(tmp, dir.path().join("policy.yaml")).expect("replace");
    let deadline = Instant::now() + Duration::from_secs(3);
    while dump(&proxy).await == before {
        assert!(Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(send(&mut client, "/other", &[]).await.status, 200);
    assert_eq!(
        send(&mut client, "/pay", &[]).await.status,
        503,
        "the breaker stayed open"
    );
    assert_eq!(a.requests(), 3);
}

/// A fallback answered for an upstream error leaves the client connection usable,
/// or says `Connection: close` (pingora's engine closes it after a failed attempt):
/// never a keep-alive answer on a connection that then resets the next request.
#[tokio::test]
async fn a_fallback_for_an_upstream_error_keeps_its_word_about_the_connection() {
    let shop = upstream("shop").await;
    let dir = TempDir::new();
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shop}}\n\
         spec:\n  hosts: [shop]\n  backends: [{{address: \"{}\"}}]\n  routes:\n\
         \x20   - name: kept\n      match: {{pathPrefix: /kept}}\n      fallback: {{status: 200, body: cached, on: [upstream-error]}}\n\
         \x20   - name: all\n",
        shop.addr()
    );
    let proxy = start(&dir, &yaml).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for _ in 0..3 {
        let kept = client
            .request("GET", "shop", "/kept", &[("x-demo-status", "503")], b"")
            .await
            .expect("fallback");
        assert_eq!((kept.status, kept.text().as_str()), (200, "cached"));
        if kept.header("connection") == Some("close") {
            client = HttpClient::connect(proxy.listen_addr())
                .await
                .expect("connect");
        }
        let next = client
            .request("GET", "shop", "/", &[], b"")
            .await
            .expect("the connection the fallback left open serves the next request");
        assert_eq!(next.status, 200);
    }
}
