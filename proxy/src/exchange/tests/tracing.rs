//! Spans: which requests export them, their parents, attributes and status, and
//! the `traceparent` each attempt carries upstream.

use super::*;
use crate::trace::{self, SpanData, SpanKind, Value};

const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CALLER_UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

fn with_traceparent(mut req: Req, tp: &'static str) -> Req {
    req.headers.push(("traceparent", tp));
    req
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn text(span: &SpanData, key: &str) -> Option<String> {
    match attr(span, key) {
        Some(Value::Str(s)) => Some(s.clone()),
        Some(Value::Int(i)) => Some(i.to_string()),
        None => None,
    }
}

#[test]
fn without_tracing_the_callers_traceparent_goes_upstream_unchanged_and_nothing_is_exported() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let req = with_traceparent(Req::get("/"), CALLER);
    let (ex, action) = h.arrive(&req, 0);
    assert!(matches!(action, Action::Connect(_)));
    assert_eq!(ex.generated_traceparent(), None);
    drop(ex);
    let s = h.request(&req, 1, ok);
    assert!(s.spans.is_empty());
    assert_eq!(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[test]
fn a_sampled_callers_request_is_a_child_of_its_span_and_each_attempt_names_itself_upstream() {
    let h = Harness::traced(runtime("", "    - name: all\n"), 0.0);
    let req = with_traceparent(Req::get("/x"), CALLER);
    let (mut ex, action) = h.arrive(&req, 0);
    assert!(matches!(action, Action::Connect(_)));
    let upstream = ex
        .generated_traceparent()
        .expect("ours replaces the caller's");
    let sent = trace::parse(upstream.as_bytes()).unwrap();
    assert_eq!(sent.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert!(sent.sampled, "the caller's decision travels on");
    assert_ne!(sent.span_id, 0x00f067aa0ba902b7);
    ex.on(&req, h.at(1), ok(0));
    let finished = Event::Finished {
        status: 200,
        failed: false,
        grpc_status: None,
    };
    ex.on(&req, h.at(3), finished);
    drop(ex);
    let s = h.rec.settled().pop().unwrap();
    let [request, attempt] = s.spans.as_slice() else {
        panic!("{:?}", s.spans)
    };
    assert_eq!(request.parent_span_id, 0x00f067aa0ba902b7);
    assert_eq!(request.kind, SpanKind::Client, "outbound: the client side");
    assert_eq!(request.name, "GET all");
    assert_eq!(request.error, None);
    assert_eq!(
        request.end_unix_nanos - request.start_unix_nanos,
        3_000_000,
        "the request's time on the exchange's clock"
    );
    for (key, value) in [
        ("http.request.method", "GET"),
        ("http.route", "all"),
        ("url.path", "/x"),
        ("sluice.policy", "p"),
        ("sluice.decision", "allowed"),
        ("http.response.status_code", "200"),
        ("sluice.attempts", "1"),
    ] {
        assert_eq!(text(request, key).as_deref(), Some(value), "{key}");
    }
    assert!(text(request, "sluice.backend").is_some());
    assert!(text(request, "sluice.policy_version").is_some());
    assert_eq!(attempt.parent_span_id, request.span_id);
    assert_eq!(
        attempt.span_id, sent.span_id,
        "the upstream's parent is the attempt"
    );
    assert_eq!(attempt.trace_id, request.trace_id);
    assert_eq!(text(attempt, "sluice.outcome").as_deref(), Some("success"));
    assert_eq!(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[test]
fn an_unsampled_allowed_request_exports_nothing_and_says_so_upstream() {
    let h = Harness::traced(runtime("", "    - name: all\n"), 0.0);
    for req in [
        with_traceparent(Req::get("/"), CALLER_UNSAMPLED),
        Req::get("/"),
    ] {
        let (ex, _) = h.arrive(&req, 0);
        let upstream = ex.generated_traceparent().unwrap().to_owned();
        assert!(upstream.ends_with("-00"), "{upstream}");
        drop(ex);
        let s = h.request(&req, 1, ok);
        assert_eq!(s.status, 200);
        assert!(s.spans.is_empty(), "{:?}", s.spans);
    }
    // Ratio 1: every trace started here is sampled, and says so.
    let all = Harness::traced(runtime("", "    - name: all\n"), 1.0);
    let (ex, _) = all.arrive(&Req::get("/"), 0);
    assert!(ex.generated_traceparent().unwrap().ends_with("-01"));
    drop(ex);
    let s = all.request(&Req::get("/"), 1, ok);
    assert_eq!(s.spans.len(), 2);
    assert_eq!(s.spans[0].parent_span_id, 0, "a root span");
}

#[test]
fn refused_retried_failed_and_fallback_requests_are_exported_whatever_the_head_said() {
    let h = Harness::traced(
        runtime(
            "",
            "    - name: limited\n      match: {pathPrefix: /limited}\n      rateLimit: {requestsPerSecond: 0.001, burst: 1}\n    - name: kept\n      match: {pathPrefix: /kept}\n      fallback: {status: 200, body: cached, on: [upstream-error]}\n    - name: all\n      retries: {attempts: 2, on: [gateway-error], budget: {ratio: 1.0, minPerSecond: 100}}\n",
        ),
        0.0,
    );
    let unsampled = |path| with_traceparent(Req::get(path), CALLER_UNSAMPLED);
    // Rate limited: the burst of one spent, the second refused.
    h.request(&unsampled("/limited"), 0, ok);
    let limited = h.request(&unsampled("/limited"), 10, ok);
    assert_eq!(limited.status, 429);
    let [span] = limited.spans.as_slice() else {
        panic!("{:?}", limited.spans)
    };
    assert_eq!(
        text(span, "sluice.decision").as_deref(),
        Some("rate_limited")
    );
    assert_eq!(text(span, "sluice.attempts").as_deref(), Some("0"));
    // A client span: a 429 is its error.
    assert_eq!(span.error.as_deref(), Some("rate_limited"));

    // Retried: a 502, then a 200.
    let retried = h.request(&unsampled("/r"), 20, |n| {
        if n == 0 {
            status(502)(n)
        } else {
            ok(n)
        }
    });
    assert_eq!(retried.status, 200);
    let [request, first, second] = retried.spans.as_slice() else {
        panic!("{:?}", retried.spans)
    };
    assert_eq!(request.error, None);
    assert_eq!(first.name, "attempt 1");
    assert_eq!(first.error.as_deref(), Some("http_5xx"));
    assert_eq!(
        text(first, "http.response.status_code").as_deref(),
        Some("502")
    );
    assert_eq!(second.name, "attempt 2");
    assert_eq!(second.error, None);
    assert!(first.end_unix_nanos <= second.start_unix_nanos);
    assert!([first, second]
        .iter()
        .all(|a| a.parent_span_id == request.span_id));

    // Failed: the connection refused (not retried: `on` has no connect-failure).
    let failed = h.request(&unsampled("/f"), 30, refused);
    assert_eq!(failed.status, 502);
    assert!(failed.spans[0].error.is_some());
    assert_eq!(failed.spans.len(), 2, "the request and its attempt");
    assert_eq!(failed.spans[1].error.as_deref(), Some("connect_error"));

    // A fallback served for an upstream error.
    let kept = h.request(&unsampled("/kept"), 40, status(503));
    assert_eq!(kept.fallback, Some(FallbackCause::UpstreamError));
    assert_eq!(
        text(&kept.spans[0], "sluice.fallback_cause").as_deref(),
        Some("upstream-error")
    );
}

#[test]
fn an_inbound_request_is_the_server_side_span() {
    let mut h = Harness::traced(runtime("", "    - name: all\n"), 1.0);
    h.side = Side {
        direction: Direction::Inbound,
        inbound_policy: Some("p".into()),
        inbound_app: Some("127.0.0.1:3000".parse().unwrap()),
        ..outbound()
    };
    let s = h.request(&Req::get("/"), 0, status(404));
    assert_eq!(s.spans[0].kind, SpanKind::Server);
    assert_eq!(
        s.spans[0].error, None,
        "a server span's 4xx is the caller's"
    );
    assert_eq!(text(&s.spans[1], "server.port").as_deref(), Some("3000"));
    let failed = h.request(&Req::get("/"), 10, status(500));
    assert_eq!(failed.spans[0].error.as_deref(), Some("HTTP 500"));
}
