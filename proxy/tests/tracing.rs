//! Spans end to end: the real proxy binary exports to a real OTLP/gRPC receiver (a
//! tonic server of `opentelemetry.proto.collector.trace.v1.TraceService`, built
//! from the official definitions in proxy/proto/), and the spans of an allowed, a
//! rate-limited, a retried and a fallback request arrive with the right parent,
//! attributes and status; the upstream sees a `traceparent` naming the attempt's
//! span. With the receiver gone, requests are unaffected and the lost spans are
//! counted.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_demo::upstream::{Upstream, UpstreamConfig};
use sluice_proxy::otlp::proto::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use sluice_proxy::otlp::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use sluice_proxy::otlp::proto::common::v1::any_value;
use sluice_proxy::otlp::proto::trace::v1::{span, status, Span};
use support::{metrics, metrics_once, sample, upstream, HttpClient, ProxyProcess, TempDir};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Every span received so far, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let got = self.got.lock().unwrap();
        let mut out = Vec::new();
        for req in got.iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .map(|kv| value(kv.value.as_ref()))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((service.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }
}

/// A receiver on 127.0.0.1, port 0; stopped when the sender is dropped or sent to.
async fn receiver() -> (SocketAddr, Receiver, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let r = Receiver::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = TraceServiceServer::new(r.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
    });
    (addr, r, stop)
}

fn value(v: Option<&sluice_proxy::otlp::proto::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| value(kv.value.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The request span (kind CLIENT on the outbound listener, parent outside the
/// proxy) whose trace is `trace` and whose decision is `decision`, waited for.
async fn request_span(r: &Receiver, pick: impl Fn(&Span) -> bool) -> (Span, Vec<Span>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<Span> = r.spans().into_iter().map(|(_, s)| s).collect();
        if let Some(request) = spans
            .iter()
            .find(|s| !s.name.starts_with("attempt") && pick(s))
        {
            let mut attempts: Vec<Span> = spans
                .iter()
                .filter(|s| s.parent_span_id == request.span_id)
                .cloned()
                .collect();
            let want = attr(request, "sluice.attempts")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
            if attempts.len() >= want {
                attempts.sort_by_key(|s| s.start_time_unix_nano);
                return (request.clone(), attempts);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no such span among {:#?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn policies(dir: &TempDir, shop: SocketAddr, flaky: SocketAddr) {
    dir.write(
        "shop.yaml",
        &format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shop}}\n\
             spec:\n  hosts: [shop]\n  backends: [{{address: \"{shop}\"}}]\n  routes:\n\
             \x20   - name: limited\n      match: {{pathPrefix: /limited}}\n      rateLimit: {{requestsPerSecond: 0.001, burst: 1}}\n\
             \x20   - name: kept\n      match: {{pathPrefix: /kept}}\n      fallback: {{status: 200, body: cached, on: [upstream-error]}}\n\
             \x20   - name: all\n"
        ),
    );
    dir.write(
        "flaky.yaml",
        &format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: flaky}}\n\
             spec:\n  hosts: [flaky]\n  backends: [{{address: \"{flaky}\"}}]\n  routes:\n\
             \x20   - name: retried\n      retries: {{attempts: 2, on: [gateway-error], budget: {{ratio: 1.0, minPerSecond: 100}}}}\n"
        ),
    );
}

#[tokio::test]
async fn spans_of_allowed_limited_retried_and_fallback_requests_reach_the_collector() {
    let (otlp, r, stop) = receiver().await;
    let shop = upstream("shop").await;
    // Every second request answered 503 (exactly: the 2nd, 4th...).
    let flaky = Upstream::start(
        "127.0.0.1:0".parse().unwrap(),
        UpstreamConfig {
            fail_ratio: 0.5,
            ..UpstreamConfig::new("flaky")
        },
    )
    .await
    .expect("flaky upstream");
    let dir = TempDir::new();
    policies(&dir, shop.addr(), flaky.addr());
    let endpoint = format!("http://{otlp}");
    let proxy = ProxyProcess::start(
        dir.path(),
        &[
            "--otlp-endpoint",
            &endpoint,
            // Only the caller's sampled flag and the tail's reasons export spans.
            "--trace-sample-ratio",
            "0",
        ],
    );
    proxy.wait_ready().await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let sampled = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let unsampled = |n: u32| format!("00-{n:032x}-{CALLER_SPAN}-00");

    // Allowed, sampled by the caller.
    let ok = client
        .request("GET", "shop", "/ok", &[("traceparent", &sampled)], b"")
        .await
        .expect("request");
    assert_eq!(ok.status, 200);
    let seen = ok
        .header("x-seen-traceparent")
        .expect("a traceparent upstream");
    assert!(seen.starts_with(&format!("00-{CALLER_TRACE}-")), "{seen}");
    assert!(seen.ends_with("-01"), "{seen}");
    assert!(
        !seen.contains(CALLER_SPAN),
        "the proxy's span is the upstream's parent: {seen}"
    );

    // An unsampled caller, allowed: nothing exported for it.
    let quiet = client
        .request(
            "GET",
            "shop",
            "/quiet",
            &[("traceparent", &unsampled(1))],
            b"",
        )
        .await
        .expect("request");
    assert_eq!(quiet.status, 200);
    assert!(quiet.header("x-seen-traceparent").unwrap().ends_with("-00"));

    // Rate limited: the burst of one spent, the next refused.
    for (n, want) in [(2, 200), (3, 429)] {
        let res = client
            .request(
                "GET",
                "shop",
                "/limited",
                &[("traceparent", &unsampled(n))],
                b"",
            )
            .await
            .expect("request");
        assert_eq!(res.status, want);
    }
    // A fallback for an upstream error.
    let kept = client
        .request(
            "GET",
            "shop",
            "/kept",
            &[("traceparent", &unsampled(4)), ("x-demo-status", "503")],
            b"",
        )
        .await
        .expect("request");
    assert_eq!((kept.status, kept.text().as_str()), (200, "cached"));
    if kept.header("connection") == Some("close") {
        // pingora's engine closes the connection after a failed attempt, and says so.
        client = HttpClient::connect(proxy.listen_addr())
            .await
            .expect("connect");
    }
    // Retried: the flaky upstream's 2nd request fails, its 3rd is the retry.
    for n in [5, 6] {
        let res = client
            .request("GET", "flaky", "/", &[("traceparent", &unsampled(n))], b"")
            .await
            .expect("request");
        assert_eq!(res.status, 200);
    }

    let (allowed, attempts) = request_span(&r, |s| hex(&s.trace_id) == CALLER_TRACE).await;
    assert_eq!(hex(&allowed.parent_span_id), CALLER_SPAN);
    assert_eq!(allowed.kind, span::SpanKind::Client as i32);
    assert_eq!(allowed.name, "GET all");
    for (key, want) in [
        ("http.request.method", "GET"),
        ("http.route", "all"),
        ("url.path", "/ok"),
        ("http.response.status_code", "200"),
        ("sluice.policy", "shop"),
        ("sluice.decision", "allowed"),
        ("sluice.attempts", "1"),
    ] {
        assert_eq!(attr(&allowed, key).as_deref(), Some(want), "{key}");
    }
    assert!(attr(&allowed, "sluice.policy_version").is_some());
    assert!(attr(&allowed, "sluice.backend").is_some());
    let status = allowed.status.clone().unwrap_or_default();
    assert_eq!(status.code, status::StatusCode::Unset as i32);
    let [attempt] = attempts.as_slice() else {
        panic!("{attempts:#?}")
    };
    assert!(
        seen.contains(&hex(&attempt.span_id)),
        "upstream's parent is the attempt"
    );
    assert_eq!(
        attr(attempt, "server.port").as_deref(),
        Some(shop.addr().port().to_string().as_str())
    );
    assert!(allowed.start_time_unix_nano <= attempt.start_time_unix_nano);
    assert!(attempt.end_time_unix_nano <= allowed.end_time_unix_nano);

    let trace_of = |n: u32| format!("{n:032x}");
    let (limited, none) = request_span(&r, |s| hex(&s.trace_id) == trace_of(3)).await;
    assert!(none.is_empty());
    assert_eq!(
        attr(&limited, "sluice.decision").as_deref(),
        Some("rate_limited")
    );
    assert_eq!(
        attr(&limited, "http.response.status_code").as_deref(),
        Some("429")
    );
    let status = limited.status.clone().unwrap_or_default();
    assert_eq!(
        status.code,
        status::StatusCode::Error as i32,
        "a client span's 4xx"
    );

    let (fallback, _) = request_span(&r, |s| hex(&s.trace_id) == trace_of(4)).await;
    assert_eq!(
        attr(&fallback, "sluice.fallback_cause").as_deref(),
        Some("upstream-error")
    );
    assert_eq!(
        attr(&fallback, "sluice.decision").as_deref(),
        Some("fallback")
    );

    let (retried, attempts) = request_span(&r, |s| hex(&s.trace_id) == trace_of(6)).await;
    assert_eq!(attr(&retried, "sluice.attempts").as_deref(), Some("2"));
    let [first, second] = attempts.as_slice() else {
        panic!("{attempts:#?}")
    };
    assert_eq!(
        attr(first, "http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(
        first.status.clone().unwrap_or_default().code,
        status::StatusCode::Error as i32
    );
    assert_eq!(attr(second, "sluice.outcome").as_deref(), Some("success"));

    // Unsampled and uneventful: never exported.
    let exported: Vec<String> = r.spans().iter().map(|(_, s)| hex(&s.trace_id)).collect();
    for n in [1, 2, 5] {
        assert!(!exported.contains(&trace_of(n)), "trace {n} was exported");
    }
    assert!(r
        .spans()
        .iter()
        .all(|(service, _)| service == "sluice-proxy"));
    // Counted when the collector's answer is back (after it has the spans).
    let m = metrics_once(&proxy, "sluice_trace_spans_exported_total", 8.0).await;
    assert!(
        sample(&m, "sluice_trace_spans_exported_total") >= 8.0,
        "{m}"
    );

    // Exemplars on the duration histogram name exported traces only (the latest
    // per bucket): never an unsampled, uneventful one.
    let mut admin = HttpClient::connect(proxy.admin_addr())
        .await
        .expect("connect");
    let om = admin
        .request(
            "GET",
            "admin",
            "/metrics",
            &[("accept", "application/openmetrics-text; version=1.0.0")],
            b"",
        )
        .await
        .expect("scrape")
        .text();
    let exemplars: Vec<&str> = om
        .split("trace_id=\"")
        .skip(1)
        .filter_map(|rest| rest.get(..32))
        .collect();
    assert!(!exemplars.is_empty(), "{om}");
    for id in &exemplars {
        assert!(
            exported.iter().any(|e| e == id),
            "exemplar of an unexported trace {id}"
        );
    }

    // The collector goes away: requests go on, spans are counted lost.
    stop.send(()).expect("stop the receiver");
    let deadline = Instant::now() + Duration::from_secs(30);
    let dropped = r#"sluice_trace_spans_dropped_total{reason="export_failed"}"#;
    loop {
        let res = client
            .request("GET", "shop", "/ok", &[("traceparent", &sampled)], b"")
            .await
            .expect("request");
        assert_eq!(res.status, 200);
        if sample(&metrics(&proxy).await, dropped) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no export failure counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn without_an_endpoint_the_callers_traceparent_goes_upstream_unchanged() {
    let shop = upstream("shop").await;
    let dir = TempDir::new();
    policies(&dir, shop.addr(), shop.addr());
    let proxy = ProxyProcess::start(dir.path(), &[]);
    proxy.wait_ready().await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let res = client
        .request("GET", "shop", "/", &[("traceparent", &caller)], b"")
        .await
        .expect("request");
    assert_eq!(res.header("x-seen-traceparent"), Some(caller.as_str()));
    let m = metrics(&proxy).await;
    assert_eq!(sample(&m, "sluice_trace_spans_exported_total"), 0.0);
}

/// Over HTTP/2 (to an HTTP/1 backend) the proxy's `traceparent` replaces the
/// caller's too: one field upstream, naming the attempt's span.
#[tokio::test]
async fn an_h2_request_sends_one_traceparent_upstream_naming_the_attempt() {
    let (otlp, r, _stop) = receiver().await;
    let shop = upstream("shop").await;
    let dir = TempDir::new();
    policies(&dir, shop.addr(), shop.addr());
    let endpoint = format!("http://{otlp}");
    let proxy = ProxyProcess::start(
        dir.path(),
        &[
            "--h2c",
            "--otlp-endpoint",
            &endpoint,
            "--trace-sample-ratio",
            "0",
        ],
    );
    proxy.wait_ready().await;
    let client = support::http2::connect(proxy.listen_addr()).await;
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let req = support::http2::request("GET", "shop", "/h2")
        .header("traceparent", caller.as_str())
        .body(())
        .expect("request");
    let got = support::http2::send(&client, req, None, None)
        .await
        .expect("exchange");
    assert_eq!(got.status, 200);
    let seen = support::http2::header(&got.headers, "x-seen-traceparent").to_owned();
    assert!(seen.starts_with(&format!("00-{CALLER_TRACE}-")), "{seen}");
    assert!(!seen.contains(CALLER_SPAN), "{seen}");
    let (request, attempts) =
        request_span(&r, |s| attr(s, "url.path").as_deref() == Some("/h2")).await;
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN);
    assert!(seen.contains(&hex(&attempts[0].span_id)), "{seen}");
}
