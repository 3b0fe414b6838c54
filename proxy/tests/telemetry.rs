//! The telemetry listener: probes and Prometheus on an address of their own (the
//! pod IP in Kubernetes), while everything that reveals the proxy's state stays on
//! the loopback admin listener; and what /metrics holds: series of the routes in
//! use, not of every policy loaded, and, for a scrape that asks for OpenMetrics,
//! the exemplars of sampled traces on the duration buckets.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::{get, metrics, start_with, upstream, HttpClient, ProxyProcess, TempDir};

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  hosts: [t]\n  backends: [{address: \"127.0.0.1:9\"}]\n";

#[tokio::test]
async fn the_telemetry_listener_serves_health_and_metrics_and_nothing_else() {
    let dir = TempDir::new();
    let proxy = start_with(&dir, POLICY, &["--telemetry", "127.0.0.1:0"]).await;
    let telemetry = proxy.addr("telemetry");
    for path in ["/live", "/ready", "/metrics"] {
        let response = get(telemetry, "127.0.0.1", path).await.expect("answer");
        assert_eq!(response.status, 200, "{path}");
    }
    let metrics = get(telemetry, "127.0.0.1", "/metrics")
        .await
        .expect("metrics");
    assert!(String::from_utf8_lossy(&metrics.body).contains("sluice_policy_info"));
    let dump = get(telemetry, "127.0.0.1", "/config_dump")
        .await
        .expect("answer");
    assert_eq!(dump.status, 404);
    assert!(String::from_utf8_lossy(&dump.body).contains("admin listener"));
    // The admin listener still has it.
    let dump = get(proxy.admin_addr(), "127.0.0.1", "/config_dump")
        .await
        .expect("dump");
    assert_eq!(dump.status, 200);
}

/// Policies `p0`..`p199`, each with host `hN` and three routes (`a`, `b`, `rest`),
/// one file each, all to `backend`.
fn many_policies(dir: &TempDir, backend: std::net::SocketAddr) {
    for i in 0..200 {
        dir.write(
            &format!("p{i}.yaml"),
            &format!(
                "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p{i}}}\nspec:\n  hosts: [h{i}]\n  backends: [{{address: \"{backend}\"}}]\n  routes:\n    - name: a\n      match: {{pathPrefix: /a}}\n    - name: b\n      match: {{pathPrefix: /b}}\n    - name: rest\n"
            ),
        );
    }
}

/// What a scrape holds of the policies' series.
struct Scrape {
    /// `sluice_request_duration_seconds_bucket` lines.
    buckets: usize,
    /// Every `policy` label value but "" (requests no policy claimed).
    policies: BTreeSet<String>,
    text: String,
}

async fn scrape(proxy: &ProxyProcess) -> Scrape {
    let text = metrics(proxy).await;
    let buckets = text
        .lines()
        .filter(|l| l.starts_with("sluice_request_duration_seconds_bucket{"))
        .count();
    let policies = text
        .lines()
        .filter(|l| l.starts_with("sluice_"))
        .filter_map(|l| l.split("policy=\"").nth(1)?.split('"').next())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    Scrape {
        buckets,
        policies,
        text,
    }
}

/// Scrapes until `done` holds (after `before` each time), checking `always` on
/// every scrape; bounded: 60 s.
async fn scrape_until(
    proxy: &ProxyProcess,
    what: &str,
    before: impl AsyncFn(),
    always: impl Fn(&Scrape),
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        before().await;
        let s = scrape(proxy).await;
        always(&s);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 17 bucket lines per route with series: the 16 base buckets and +Inf.
const BUCKETS: usize = 17;

#[tokio::test]
async fn metrics_have_series_only_for_routes_with_traffic_and_lose_them_when_idle() {
    let backend = upstream("a").await;
    let dir = TempDir::new();
    many_policies(&dir, backend.addr());
    let proxy = ProxyProcess::start(dir.path(), &["--metrics-idle", "2s"]);
    proxy.wait_ready().await;
    let before = scrape(&proxy).await;
    assert_eq!(before.buckets, 0, "{}", before.text);
    assert!(before.policies.is_empty(), "{:?}", before.policies);

    let used: BTreeSet<String> = ["p7".to_owned(), "p42".to_owned()].into();
    let traffic = async || {
        for (host, path) in [("h7", "/a/x"), ("h42", "/b")] {
            let r = get(proxy.listen_addr(), host, path).await.expect("answer");
            assert_eq!(r.status, 200, "{host}{path}");
        }
    };
    // Traffic is sent before each scrape: a scrape late by the idle period (a slow
    // machine) sees fewer series, never others, and the next one sees them again.
    let only_used = |s: &Scrape| {
        assert!(s.policies.is_subset(&used), "{:?}\n{}", s.policies, s.text);
        assert!(s.buckets <= 2 * BUCKETS, "{}", s.text);
    };
    let s = scrape_until(
        &proxy,
        "the two routes in use get their series",
        traffic,
        only_used,
        |s| {
            s.buckets == 2 * BUCKETS
                && s.text.contains("policy=\"p7\",route=\"a\",le=\"+Inf\"")
                && s.text.contains("policy=\"p42\",route=\"b\",le=\"+Inf\"")
                // Published by the housekeeping job within a second of first use.
                && s.text.contains("sluice_backend_endpoints{")
                && s.policies == used
        },
    )
    .await;
    assert!(
        s.text.contains("sluice_upstream_requests_total{backend="),
        "{}",
        s.text
    );

    // No traffic: after the idle period every series of the policies goes.
    scrape_until(
        &proxy,
        "series idle for 2 s are removed",
        async || {},
        only_used,
        |s| s.buckets == 0 && s.policies.is_empty(),
    )
    .await;

    // Traffic again: the route's series come back, from 0.
    let p7 = async || {
        get(proxy.listen_addr(), "h7", "/a").await.expect("answer");
    };
    let s = scrape_until(
        &proxy,
        "a route used again gets its series back",
        p7,
        |s| assert!(s.buckets <= BUCKETS, "{}", s.text),
        |s| s.buckets == BUCKETS,
    )
    .await;
    assert!(
        s.text
            .contains("sluice_request_duration_seconds_count{policy=\"p7\",route=\"a\"}"),
        "{}",
        s.text
    );
}

/// What Prometheus 2.x sends with every scrape: OpenMetrics first.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `/metrics` of `addr` as a client sending `accept` gets it: content type, body.
async fn scrape_as(addr: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let response = HttpClient::connect(addr)
        .await
        .expect("connect")
        .request("GET", "127.0.0.1", "/metrics", &headers, b"")
        .await
        .expect("scrape");
    assert_eq!(response.status, 200);
    let content_type = response.header("content-type").unwrap_or("").to_owned();
    (content_type, response.text())
}

/// The `le` bound and the exemplar (trace id, value) of each bucket line that has
/// one.
fn exemplars(body: &str) -> Vec<(String, String, f64)> {
    body.lines()
        .filter_map(|l| l.split_once(" # {trace_id=\""))
        .map(|(sample, exemplar)| {
            let le = sample
                .split("le=\"")
                .nth(1)
                .and_then(|v| v.split('"').next());
            let (id, rest) = exemplar.split_once("\"} ").expect("exemplar labels");
            let value = rest.split(' ').next().and_then(|v| v.parse().ok());
            (
                le.expect("a bucket").to_owned(),
                id.to_owned(),
                value.expect("a value"),
            )
        })
        .collect()
}

#[tokio::test]
async fn sampled_callers_leave_exemplars_that_openmetrics_scrapes_show() {
    let backend = upstream("a").await;
    let dir = TempDir::new();
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t}}\nspec:\n  hosts: [t]\n  backends: [{{address: \"{}\"}}]\n",
        backend.addr()
    );
    let proxy = start_with(&dir, &policy, &["--telemetry", "127.0.0.1:0"]).await;
    let sampled = "4bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    // The sampled call first: had the others left an exemplar, there would be two,
    // or theirs would have replaced it.
    for traceparent in [
        Some(format!("00-{sampled}-00f067aa0ba902b7-01")),
        Some(format!("00-{unsampled}-00f067aa0ba902b7-00")),
        // The proxy starts a trace of its own for this one: no span recorded.
        None,
    ] {
        let headers: Vec<(&str, &str)> = traceparent
            .as_deref()
            .map(|t| ("traceparent", t))
            .into_iter()
            .collect();
        let response = HttpClient::connect(proxy.listen_addr())
            .await
            .expect("connect")
            .request("GET", "t", "/", &headers, b"")
            .await
            .expect("answer");
        assert_eq!(response.status, 200);
    }
    // A request is recorded as it settles, which may be just after its answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    let settled = |body: &str| {
        body.lines()
            .filter(|l| l.starts_with("sluice_request_duration_seconds_count{policy=\"t\""))
            .any(|l| l.ends_with(" 3"))
    };
    while !settled(
        &scrape_as(proxy.admin_addr(), Some(PROMETHEUS_ACCEPT))
            .await
            .1,
    ) {
        assert!(Instant::now() < deadline, "three requests settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for addr in [proxy.admin_addr(), proxy.addr("telemetry")] {
        let (content_type, body) = scrape_as(addr, Some(PROMETHEUS_ACCEPT)).await;
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(body.ends_with("\n# EOF\n"), "{body}");
        let found = exemplars(&body);
        assert_eq!(found.len(), 1, "{body}");
        let (le, id, value) = &found[0];
        assert_eq!(id, sampled);
        // On the bucket that counted it: the first whose bound is at least it.
        let first_fit = body
            .lines()
            .filter(|l| l.starts_with("sluice_request_duration_seconds_bucket{policy=\"t\""))
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
            .find(|b| *b == "+Inf" || b.parse::<f64>().is_ok_and(|b| *value <= b));
        assert_eq!(first_fit, Some(le.as_str()), "{body}");

        let (content_type, text) = scrape_as(addr, None).await;
        assert_eq!(content_type, "text/plain; version=0.0.4");
        assert!(
            !text.contains("# EOF") && exemplars(&text).is_empty(),
            "{text}"
        );
    }
}
