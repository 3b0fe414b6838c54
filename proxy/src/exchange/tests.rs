//! The request flow on a fake clock, with no sockets: each test builds a snapshot
//! from policy YAML, feeds an exchange the events an engine would, and checks the
//! actions, the record it settles with, and what it held (breaker admissions,
//! concurrency slots, open attempts) going back.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sluice_policy::{FallbackCause, Mode};

use super::*;
use crate::breaker::{BreakerState, Transition};
use crate::globallimit::GlobalLimits;

/// What an exchange told its observer, in order.
#[derive(Default)]
struct Recorder {
    notes: Mutex<Vec<String>>,
    finished: Mutex<Vec<Settled>>,
    inflight: Mutex<i64>,
}

/// A settled request, owned.
#[derive(Debug, Clone, PartialEq)]
struct Settled {
    route: Option<String>,
    status: u16,
    verdict: Verdict,
    shadow: Option<Verdict>,
    fallback: Option<FallbackCause>,
    backend: Option<String>,
    attempts: u32,
    elapsed: Duration,
}

impl Recorder {
    fn note(&self, note: String) {
        self.notes.lock().unwrap().push(note);
    }

    fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap().clone()
    }

    fn settled(&self) -> Vec<Settled> {
        self.finished.lock().unwrap().clone()
    }
}

impl Observe for Arc<Recorder> {
    fn begin(&self) {
        *self.inflight.lock().unwrap() += 1;
    }
    fn end(&self) {
        *self.inflight.lock().unwrap() -= 1;
    }
    fn new_traceparent(&self) -> String {
        "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01".into()
    }
    fn rate_limited(&self, route: &RouteRuntime) {
        self.note(format!(
            "rate_limited {} {}",
            route.name,
            route.mode.as_str()
        ));
    }
    fn breaker_rejected(&self, route: &RouteRuntime) {
        self.note(format!("breaker_rejected {}", route.name));
    }
    fn breaker_changed(&self, route: &RouteRuntime, t: Transition) {
        self.note(format!("breaker {} {}", route.name, t.to.as_str()));
    }
    fn shed(&self, route: &RouteRuntime, class: &str) {
        self.note(format!("shed {} {class}", route.name));
    }
    fn fallback(&self, route: &RouteRuntime, cause: FallbackCause, mode: Mode) {
        self.note(format!(
            "fallback {} {} {}",
            route.name,
            cause.as_str(),
            mode.as_str()
        ));
    }
    fn retry(&self, route: &RouteRuntime, granted: bool) {
        self.note(format!("retry {} {granted}", route.name));
    }
    fn upstream(&self, policy: &PolicyRuntime, backend: usize, outcome: Outcome) {
        let label = observe_label(policy, backend);
        self.note(format!("upstream {label} {}", outcome.as_str()));
    }
    fn ejected(&self, policy: &PolicyRuntime, backend: usize) {
        self.note(format!("ejected {}", observe_label(policy, backend)));
    }
    fn passthrough(&self, direction: Direction) {
        self.note(format!("passthrough {}", direction.as_str()));
    }
    fn finished<R: Request + ?Sized>(&self, r: &Record<'_, R>) {
        self.finished.lock().unwrap().push(Settled {
            route: r.route.map(|r| r.name.clone()),
            status: r.status,
            verdict: r.verdict,
            shadow: r.shadow,
            fallback: r.fallback,
            backend: r.backend.map(str::to_owned),
            attempts: r.attempts,
            elapsed: r.elapsed,
        });
    }
}

fn observe_label(policy: &PolicyRuntime, backend: usize) -> String {
    match backend {
        APP => "app".into(),
        i => policy.endpoints.targets[i].label.clone(),
    }
}

/// A request as an engine would parse it.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

impl Req {
    fn get(path: &'static str) -> Req {
        Req {
            method: "GET",
            host: "svc",
            path,
            headers: Vec::new(),
        }
    }

    fn post(path: &'static str) -> Req {
        Req {
            method: "POST",
            ..Req::get(path)
        }
    }
}

impl Request for Req {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn host(&self) -> &str {
        self.host
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
    }
    fn client_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, 1]))
    }
    fn body_truncated(&self) -> bool {
        false
    }
}

/// A snapshot of one policy for host `svc` with `backends` (IP literals: no DNS)
/// and `routes` (YAML list items, indented by six).
fn runtime(extra_spec: &str, routes: &str) -> Arc<Runtime> {
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: p\nspec:\n  hosts: [svc]\n  backends:\n    - address: 127.0.0.1:1001\n    - address: 127.0.0.1:1002\n    - address: 127.0.0.1:1003\n{extra_spec}  routes:\n{routes}"
    );
    let set = sluice_policy::load::parse_str(Path::new("test.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let globals = GlobalLimits::new(false);
    Arc::new(Runtime::build(set, "test".into(), None, &globals).unwrap())
}

fn outbound() -> Side {
    Side {
        direction: Direction::Outbound,
        inbound_policy: None,
        inbound_app: None,
        own_ports: Vec::new(),
    }
}

struct Harness {
    rec: Arc<Recorder>,
    rt: Arc<Runtime>,
    side: Side,
    t0: Instant,
}

impl Harness {
    fn new(rt: Arc<Runtime>) -> Harness {
        Harness {
            rec: Arc::new(Recorder::default()),
            rt,
            side: outbound(),
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// A new exchange at `ms` and its first action.
    fn arrive(&self, req: &Req, ms: u64) -> (Exchange<Arc<Recorder>>, Action) {
        let mut ex = Exchange::new(Arc::clone(&self.rec), self.at(ms));
        let event = Event::Arrived {
            runtime: Some(Arc::clone(&self.rt)),
            side: &self.side,
            original_dst: None,
            h2c: true,
        };
        let action = ex.on(req, self.at(ms), event);
        (ex, action)
    }

    /// One whole request: arrives, every attempt answered by `outcome(n)`, then
    /// finished. The settled record.
    fn request(
        &self,
        req: &Req,
        ms: u64,
        mut outcome: impl FnMut(usize) -> Event<'static>,
    ) -> Settled {
        let (mut ex, mut action) = self.arrive(req, ms);
        let mut n = 0;
        let status = loop {
            match action {
                Action::Connect(_) => {
                    action = ex.on(req, self.at(ms + 1), outcome(n));
                    n += 1;
                    assert!(n <= MAX_ATTEMPTS + 1, "unbounded attempts");
                }
                Action::Relay => break 200,
                Action::Answer(reply) => break reply.status,
                other => panic!("unexpected {other:?}"),
            }
        };
        let status = match (&ex.upstream_status, status) {
            (Some(s), 200) => *s,
            (_, s) => s,
        };
        ex.on(
            req,
            self.at(ms + 2),
            Event::Finished {
                status,
                failed: false,
            },
        );
        drop(ex);
        self.rec.settled().pop().expect("settled")
    }
}

fn ok(_: usize) -> Event<'static> {
    Event::Response { status: 200 }
}

fn status(s: u16) -> impl FnMut(usize) -> Event<'static> {
    move |_| Event::Response { status: s }
}

fn refused(_: usize) -> Event<'static> {
    Event::ConnectFailed {
        error: "ConnectRefused",
    }
}

fn reset(_: usize) -> Event<'static> {
    Event::Broken {
        timed_out: false,
        stale: false,
        responding: false,
        error: "ConnectionClosed",
    }
}

fn timed_out(_: usize) -> Event<'static> {
    Event::Broken {
        timed_out: true,
        stale: false,
        responding: false,
        error: "ReadTimedout",
    }
}

#[test]
fn an_admitted_request_goes_to_a_backend_and_settles_once() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let (mut ex, action) = h.arrive(&Req::get("/x"), 0);
    let Action::Connect(peer) = action else {
        panic!("{action:?}")
    };
    assert_eq!(peer.addr.ip(), IpAddr::from([127, 0, 0, 1]));
    assert!(!peer.fresh && !peer.h2c);
    assert!(matches!(
        ex.on(&Req::get("/x"), h.at(5), Event::Response { status: 204 }),
        Action::Relay
    ));
    ex.on(
        &Req::get("/x"),
        h.at(7),
        Event::Finished {
            status: 204,
            failed: false,
        },
    );
    // A second Finished (an engine calling twice) settles nothing more.
    assert!(matches!(
        ex.on(
            &Req::get("/x"),
            h.at(8),
            Event::Finished {
                status: 204,
                failed: false
            }
        ),
        Action::Done
    ));
    let settled = h.rec.settled();
    assert_eq!(settled.len(), 1);
    let s = &settled[0];
    assert_eq!(
        (s.status, s.verdict, s.attempts),
        (204, Verdict::Allowed, 1)
    );
    assert_eq!(s.elapsed, Duration::from_millis(7));
    assert_eq!(h.rec.notes().len(), 1, "{:?}", h.rec.notes());
    assert!(h.rec.notes()[0].ends_with("success"));
    assert_eq!(*h.rec.inflight.lock().unwrap(), 1);
    drop(ex);
    assert_eq!(*h.rec.inflight.lock().unwrap(), 0);
}

#[test]
fn interim_responses_pass_on_and_the_final_one_settles() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let (mut ex, _) = h.arrive(&Req::post("/"), 0);
    for status in [100, 103, 200] {
        let action = ex.on(&Req::post("/"), h.at(1), Event::Response { status });
        assert!(matches!(action, Action::Relay), "{status}: {action:?}");
    }
    ex.on(
        &Req::post("/"),
        h.at(2),
        Event::Finished {
            status: 200,
            failed: false,
        },
    );
    let upstream: Vec<_> = h
        .rec
        .notes()
        .into_iter()
        .filter(|n| n.starts_with("upstream"))
        .collect();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
}

#[test]
fn no_policy_no_route_and_not_ready_are_answered_here() {
    let h = Harness::new(runtime(
        "",
        "    - name: only\n      match: {pathPrefix: /only}\n",
    ));
    let mut other_host = Req::get("/x");
    other_host.host = "elsewhere";
    let (_ex, action) = h.arrive(&other_host, 0);
    let Action::Answer(reply) = action else {
        panic!()
    };
    assert_eq!(reply.status, 404);
    assert!(String::from_utf8_lossy(&reply.body).contains("no policy governs host \"elsewhere\""));

    let (_ex, action) = h.arrive(&Req::get("/x"), 0);
    let Action::Answer(reply) = action else {
        panic!()
    };
    assert_eq!(reply.status, 404);
    assert!(String::from_utf8_lossy(&reply.body).contains("has no route for GET /x"));

    let mut ex = Exchange::new(Arc::clone(&h.rec), h.at(0));
    let event = Event::Arrived {
        runtime: None,
        side: &h.side,
        original_dst: None,
        h2c: true,
    };
    let Action::Answer(reply) = ex.on(&Req::get("/x"), h.at(0), event) else {
        panic!()
    };
    assert_eq!(reply.status, 503);
    ex.on(
        &Req::get("/x"),
        h.at(1),
        Event::Finished {
            status: 503,
            failed: false,
        },
    );
    assert_eq!(h.rec.settled().last().unwrap().verdict, Verdict::NotReady);
}

#[test]
fn rate_limited_requests_get_429_with_retry_after_or_the_fallback() {
    let rt = runtime(
        "",
        "    - name: plain\n      match: {pathPrefix: /plain}\n      rateLimit: {requestsPerSecond: 1, burst: 1}\n    - name: kept\n      rateLimit: {requestsPerSecond: 1, burst: 1}\n      fallback: {status: 200, body: cached, on: [rate-limited]}\n",
    );
    let h = Harness::new(rt);
    let first = h.request(&Req::get("/plain"), 0, ok);
    assert_eq!((first.status, first.verdict), (200, Verdict::Allowed));
    let (_ex, action) = h.arrive(&Req::get("/plain"), 1);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 429);
    assert!(reply
        .headers
        .iter()
        .any(|(k, v)| k == "retry-after" && v == "1"));
    assert!(!reply.close, "a refusal is a complete answer");

    h.request(&Req::get("/kept"), 0, ok);
    let s = h.request(&Req::get("/kept"), 1, ok);
    assert_eq!(
        (s.status, s.verdict, s.fallback),
        (200, Verdict::Fallback, Some(FallbackCause::RateLimited))
    );
    assert_eq!(s.attempts, 0);
    assert!(h
        .rec
        .notes()
        .contains(&"fallback kept rate-limited enforce".to_owned()));
}

#[test]
fn rate_headers_advertise_what_is_left() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      rateLimit: {requestsPerSecond: 1, burst: 5}\n",
    ));
    let (ex, _) = h.arrive(&Req::get("/"), 0);
    let (rate, fallback) = ex.response_headers();
    assert_eq!(
        rate,
        Some(RateHeaders {
            limit: 5,
            remaining: 4,
            reset: 1
        })
    );
    assert_eq!(fallback, None);
}

#[test]
fn an_open_breaker_refuses_with_503_then_lets_a_probe_through() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      circuitBreaker: {consecutiveFailures: 2, openFor: 10s, halfOpenRequests: 1}\n",
    ));
    for i in 0..2 {
        let s = h.request(&Req::get("/"), i, status(500));
        assert_eq!(s.status, 500);
    }
    let (_ex, action) = h.arrive(&Req::get("/"), 3);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 503);
    assert!(reply
        .headers
        .iter()
        .any(|(k, v)| k == "retry-after" && v == "10"));
    let notes = h.rec.notes();
    assert!(notes.contains(&"breaker all open".to_owned()), "{notes:?}");
    assert!(
        notes.contains(&"breaker_rejected all".to_owned()),
        "{notes:?}"
    );
    // After openFor, one probe; its success closes the breaker.
    let s = h.request(&Req::get("/"), 10_003, ok);
    assert_eq!(s.verdict, Verdict::Allowed);
    let breaker = h.rt.policies[0].routes[0].breaker.as_ref().unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[test]
fn a_breaker_probe_the_client_abandons_is_given_back() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      circuitBreaker: {consecutiveFailures: 1, openFor: 1s, halfOpenRequests: 1}\n",
    ));
    h.request(&Req::get("/"), 0, status(503));
    let breaker = Arc::clone(h.rt.policies[0].routes[0].breaker.as_ref().unwrap());
    assert_eq!(breaker.state(), BreakerState::Open);
    // The probe's client leaves before the answer: neither success nor failure.
    let (mut ex, action) = h.arrive(&Req::get("/"), 1_500);
    assert!(matches!(action, Action::Connect(_)));
    ex.on(&Req::get("/"), h.at(1_501), Event::ClientGone);
    drop(ex);
    // The probe slot is free again: the next request is the probe.
    let s = h.request(&Req::get("/"), 1_502, ok);
    assert_eq!(s.verdict, Verdict::Allowed);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[test]
fn overload_sheds_with_503_and_the_slot_comes_back() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      concurrency: {max: 1}\n",
    ));
    let (held, action) = h.arrive(&Req::get("/"), 0);
    assert!(matches!(action, Action::Connect(_)));
    let (_ex, action) = h.arrive(&Req::get("/"), 1);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 503);
    assert!(h.rec.notes().contains(&"shed all default".to_owned()));
    let limiter = Arc::clone(h.rt.policies[0].routes[0].concurrency.as_ref().unwrap());
    assert_eq!(limiter.inflight(), 1);
    // Dropped without Finished (a handed-off or torn-down request): released.
    drop(held);
    assert_eq!(limiter.inflight(), 0);
    let s = h.request(&Req::get("/"), 2, ok);
    assert_eq!(s.verdict, Verdict::Allowed);
    assert_eq!(limiter.inflight(), 0);
}

#[test]
fn shadow_mode_refuses_nothing_and_records_what_it_would_have_done() {
    let h = Harness::new(runtime(
        "  mode: shadow\n",
        "    - name: all\n      rateLimit: {requestsPerSecond: 1, burst: 1}\n      fallback: {status: 200, body: x, on: [rate-limited]}\n",
    ));
    h.request(&Req::get("/"), 0, ok);
    let s = h.request(&Req::get("/"), 1, ok);
    assert_eq!((s.status, s.verdict), (200, Verdict::Allowed));
    assert_eq!(s.shadow, Some(Verdict::RateLimited));
    let notes = h.rec.notes();
    assert!(
        notes.contains(&"rate_limited all shadow".to_owned()),
        "{notes:?}"
    );
    assert!(
        notes.contains(&"fallback all rate-limited shadow".to_owned()),
        "{notes:?}"
    );
}

#[test]
fn a_refused_connection_fails_over_to_an_untried_backend_without_a_retry_policy() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let s = h.request(
        &Req::post("/"),
        0,
        |n| if n == 0 { refused(n) } else { ok(n) },
    );
    assert_eq!((s.status, s.attempts), (200, 2));
    // Every backend refuses: 502 naming the policy, after trying each once.
    let (mut ex, mut action) = h.arrive(&Req::post("/"), 10);
    let mut tried = Vec::new();
    while let Action::Connect(peer) = action {
        tried.push(peer.addr.port());
        action = ex.on(&Req::post("/"), h.at(11), refused(0));
    }
    tried.sort_unstable();
    assert_eq!(tried, [1001, 1002, 1003]);
    let Action::Answer(reply) = action else {
        panic!()
    };
    assert_eq!(reply.status, 502);
    assert!(reply.close);
    let body = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(
        body.contains("no backend of policy \"p\" accepted a connection (3 tried"),
        "{body}"
    );
}

#[test]
fn retries_are_bounded_by_attempts_and_by_the_budget() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      retries: {attempts: 2, on: [gateway-error, reset], budget: {ratio: 0.0, minPerSecond: 1}}\n",
    ));
    // Every answer a 502: retried while the budget (no ratio, a floor of one a
    // second) grants it, never more than twice per request.
    for i in 0..10 {
        let s = h.request(&Req::get("/"), i, status(502));
        assert_eq!(s.status, 502);
        assert!((1..=3).contains(&s.attempts), "{s:?}");
        if h.rec.notes().contains(&"retry all false".to_owned()) {
            break;
        }
    }
    let notes = h.rec.notes();
    assert!(notes.contains(&"retry all true".to_owned()), "{notes:?}");
    assert!(notes.contains(&"retry all false".to_owned()), "{notes:?}");
    // A POST whose exchange broke is not retried (not idempotent).
    let (mut ex, _) = h.arrive(&Req::post("/"), 5_000);
    let Action::Answer(reply) = ex.on(&Req::post("/"), h.at(5_001), reset(0)) else {
        panic!()
    };
    assert_eq!(reply.status, 502);
}

#[test]
fn retries_resend_gets_on_reset_and_stop_at_attempts() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      retries: {attempts: 2, on: [reset], budget: {ratio: 1.0, minPerSecond: 100}}\n",
    ));
    let s = h.request(&Req::get("/"), 0, reset);
    assert_eq!(s.status, 502);
    assert_eq!(s.attempts, 3, "the first try and two retries");
    let s = h.request(&Req::get("/"), 10, |n| if n < 2 { reset(n) } else { ok(n) });
    assert_eq!((s.status, s.attempts), (200, 3));
}

#[test]
fn a_stale_pooled_connection_is_resent_on_a_fresh_one_without_counting_a_retry() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let (mut ex, _) = h.arrive(&Req::get("/"), 0);
    let stale = Event::Broken {
        timed_out: false,
        stale: true,
        responding: false,
        error: "ConnectionClosed",
    };
    let Action::Connect(peer) = ex.on(&Req::get("/"), h.at(1), stale) else {
        panic!()
    };
    assert!(peer.fresh);
    assert!(!h.rec.notes().iter().any(|n| n.starts_with("retry")));
}

#[test]
fn a_timeout_answers_504_and_the_route_timeout_bounds_each_attempt() {
    let h = Harness::new(runtime("", "    - name: all\n      timeout: 2s\n"));
    let (mut ex, action) = h.arrive(&Req::get("/"), 0);
    let Action::Connect(peer) = action else {
        panic!()
    };
    assert_eq!(peer.io_timeout, Some(Duration::from_secs(2)));
    assert_eq!(peer.connect_timeout, CONNECT_TIMEOUT);
    let Action::Answer(reply) = ex.on(&Req::get("/"), h.at(2_000), timed_out(0)) else {
        panic!()
    };
    assert_eq!(reply.status, 504);
    assert!(h.rec.notes().iter().any(|n| n.ends_with("timeout")));
    // A later attempt gets only what is left of the timeout.
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      timeout: 2s\n      retries: {attempts: 1, on: [gateway-error], budget: {ratio: 1.0, minPerSecond: 100}}\n",
    ));
    let (mut ex, _) = h.arrive(&Req::get("/"), 0);
    let action = ex.on(&Req::get("/"), h.at(1_500), Event::Response { status: 503 });
    let Action::Connect(peer) = action else {
        panic!("{action:?}")
    };
    assert_eq!(peer.io_timeout, Some(Duration::from_millis(500)));
    assert_eq!(peer.connect_timeout, Duration::from_millis(500));
}

#[test]
fn upstream_errors_go_to_the_static_fallback_or_the_fallback_backend() {
    let h = Harness::new(runtime(
        "",
        "    - name: static\n      match: {pathPrefix: /s}\n      fallback: {status: 200, headers: {content-type: application/json}, body: '{}', on: [upstream-error]}\n    - name: backend\n      fallback: {backend: 127.0.0.1:2000, on: [upstream-error]}\n",
    ));
    let (mut ex, _) = h.arrive(&Req::get("/s"), 0);
    let Action::Answer(reply) = ex.on(&Req::get("/s"), h.at(1), Event::Response { status: 500 })
    else {
        panic!()
    };
    assert_eq!(reply.status, 200);
    assert_eq!(reply.content_type, None);
    assert!(reply
        .headers
        .iter()
        .any(|(k, v)| k == "x-sluice-fallback" && v == "upstream-error"));
    assert!(!reply.close);

    let (mut ex, _) = h.arrive(&Req::get("/b"), 0);
    let Action::Connect(peer) = ex.on(&Req::get("/b"), h.at(1), Event::Response { status: 500 })
    else {
        panic!()
    };
    assert_eq!(peer.addr, SocketAddr::from(([127, 0, 0, 1], 2000)));
    // The fallback backend's answer is relayed whatever it is.
    assert!(matches!(
        ex.on(&Req::get("/b"), h.at(2), Event::Response { status: 500 }),
        Action::Relay
    ));
    ex.on(
        &Req::get("/b"),
        h.at(3),
        Event::Finished {
            status: 500,
            failed: false,
        },
    );
    let s = h.rec.settled().pop().unwrap();
    assert_eq!(
        (s.verdict, s.fallback, s.backend.as_deref(), s.attempts),
        (
            Verdict::Fallback,
            Some(FallbackCause::UpstreamError),
            Some("fallback"),
            2
        )
    );
}

#[test]
fn a_response_cut_short_aborts_and_is_settled_as_a_failure() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      circuitBreaker: {consecutiveFailures: 1, openFor: 10s}\n",
    ));
    let (mut ex, _) = h.arrive(&Req::get("/"), 0);
    assert!(matches!(
        ex.on(&Req::get("/"), h.at(1), Event::Response { status: 200 }),
        Action::Relay
    ));
    let broken = Event::Broken {
        timed_out: false,
        stale: false,
        responding: true,
        error: "ConnectionClosed",
    };
    assert!(matches!(
        ex.on(&Req::get("/"), h.at(2), broken),
        Action::Abort
    ));
    ex.on(
        &Req::get("/"),
        h.at(3),
        Event::Finished {
            status: 200,
            failed: true,
        },
    );
    let breaker = h.rt.policies[0].routes[0].breaker.as_ref().unwrap();
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "the broken body is the backend's failure"
    );
}

#[test]
fn a_client_gone_mid_attempt_neither_blames_nor_credits_the_backend() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      circuitBreaker: {consecutiveFailures: 1, openFor: 10s}\n",
    ));
    let (mut ex, _) = h.arrive(&Req::get("/"), 0);
    ex.on(&Req::get("/"), h.at(1), Event::ClientGone);
    let s = h.rec.settled().pop().unwrap();
    assert_eq!(s.status, 0);
    assert!(!h.rec.notes().iter().any(|n| n.starts_with("upstream")));
    let breaker = h.rt.policies[0].routes[0].breaker.as_ref().unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[test]
fn policies_with_h2c_backends_are_handed_off_before_governance() {
    let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: p\nspec:\n  hosts: [svc]\n  backends:\n    - {address: 127.0.0.1:1001, protocol: h2c}\n  routes:\n    - name: all\n      rateLimit: {requestsPerSecond: 1, burst: 2}\n";
    let set = sluice_policy::load::parse_str(Path::new("t.yaml"), yaml).unwrap();
    let rt = Arc::new(Runtime::build(set, "t".into(), None, &GlobalLimits::new(false)).unwrap());
    let h = Harness::new(rt);
    let mut ex = Exchange::new(Arc::clone(&h.rec), h.at(0));
    let event = Event::Arrived {
        runtime: Some(Arc::clone(&h.rt)),
        side: &h.side,
        original_dst: None,
        h2c: false,
    };
    assert!(matches!(
        ex.on(&Req::get("/"), h.at(0), event),
        Action::HandOff
    ));
    let limiter = h.rt.policies[0].routes[0].limiter.as_ref().unwrap();
    assert!(
        matches!(
            limiter.check(""),
            crate::ratelimit::Decision::Allowed { .. }
        ),
        "no token spent before the hand-off"
    );
    let Action::Connect(peer) = ex.on(&Req::get("/"), h.at(1), Event::Resume) else {
        panic!()
    };
    assert!(peer.h2c);
}

#[test]
fn inbound_requests_go_to_the_app_and_never_back_to_the_proxy() {
    let mut h = Harness::new(runtime("", "    - name: all\n"));
    h.side = Side {
        direction: Direction::Inbound,
        inbound_policy: Some("p".into()),
        inbound_app: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
        own_ports: vec![15001],
    };
    let (_ex, action) = h.arrive(&Req::get("/"), 0);
    let Action::Connect(peer) = action else {
        panic!()
    };
    assert_eq!(peer.addr.port(), 8080);
    // Redirected from one of the proxy's own ports: nowhere to deliver.
    let mut ex = Exchange::new(Arc::clone(&h.rec), h.at(0));
    let event = Event::Arrived {
        runtime: Some(Arc::clone(&h.rt)),
        side: &h.side,
        original_dst: Some(SocketAddr::from(([10, 0, 0, 1], 15001))),
        h2c: true,
    };
    let Action::Answer(reply) = ex.on(&Req::get("/"), h.at(0), event) else {
        panic!()
    };
    assert_eq!(reply.status, 502);
}

#[test]
fn unclaimed_transparent_traffic_passes_through_untouched() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let mut req = Req::get("/");
    req.host = "not-governed";
    let dst = SocketAddr::from(([10, 1, 2, 3], 80));
    let mut ex = Exchange::new(Arc::clone(&h.rec), h.at(0));
    let event = Event::Arrived {
        runtime: Some(Arc::clone(&h.rt)),
        side: &h.side,
        original_dst: Some(dst),
        h2c: true,
    };
    let Action::Connect(peer) = ex.on(&req, h.at(0), event) else {
        panic!()
    };
    assert_eq!((peer.addr, peer.io_timeout), (dst, None));
    assert_eq!(ex.verdict(), Verdict::Passthrough);
    assert!(h.rec.notes().contains(&"passthrough outbound".to_owned()));
}

#[test]
fn events_out_of_order_abort_instead_of_acting() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let mut ex = Exchange::new(Arc::clone(&h.rec), h.at(0));
    assert!(matches!(
        ex.on(&Req::get("/"), h.at(0), Event::Response { status: 200 }),
        Action::Abort
    ));
    assert!(matches!(
        ex.on(&Req::get("/"), h.at(0), Event::Resume),
        Action::Abort
    ));
    // Finished without a head: nothing to settle, nothing recorded.
    ex.on(
        &Req::get("/"),
        h.at(0),
        Event::Finished {
            status: 400,
            failed: true,
        },
    );
    assert!(h.rec.settled().is_empty());
}

/// Events an engine could report after the head, in any order (owned, for proptest).
#[derive(Debug, Clone)]
enum Ev {
    Response(u16),
    ConnectFailed,
    Broken(bool, bool, bool),
    Failed,
    ClientGone,
    Resume,
}

impl Ev {
    fn event(&self) -> Event<'static> {
        match *self {
            Ev::Response(status) => Event::Response { status },
            Ev::ConnectFailed => Event::ConnectFailed {
                error: "ConnectRefused",
            },
            Ev::Broken(timed_out, stale, responding) => Event::Broken {
                timed_out,
                stale,
                responding,
                error: "x",
            },
            Ev::Failed => Event::Failed {
                status: 502,
                error: "x",
            },
            Ev::ClientGone => Event::ClientGone,
            Ev::Resume => Event::Resume,
        }
    }
}

fn any_event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (200u16..600).prop_map(Ev::Response),
        Just(Ev::ConnectFailed),
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(t, s, r)| Ev::Broken(t, s, r)),
        Just(Ev::Failed),
        Just(Ev::ClientGone),
        Just(Ev::Resume),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the engine reports and in whatever order, an exchange makes at
    /// most MAX_ATTEMPTS attempts, settles exactly once, and gives back all it
    /// held: the concurrency slot, the breaker's probe, P2C's pending counts.
    #[test]
    fn every_sequence_settles_once_and_gives_everything_back(
        events in proptest::collection::vec(any_event(), 0..40),
        method_get in any::<bool>(),
        finish_at_end in any::<bool>(),
    ) {
        let rt = runtime(
            "  loadBalancer: {algorithm: p2c-ewma}\n",
            "    - name: all\n      concurrency: {max: 1}\n      circuitBreaker: {consecutiveFailures: 1, openFor: 1s, halfOpenRequests: 1}\n      retries: {attempts: 3, on: [connect-failure, gateway-error, reset], budget: {ratio: 1.0, minPerSecond: 1000}}\n      fallback: {backend: 127.0.0.1:2000, on: [upstream-error, breaker-open]}\n",
        );
        let h = Harness::new(rt);
        let req = if method_get { Req::get("/") } else { Req::post("/") };
        let (mut ex, mut action) = h.arrive(&req, 0);
        let mut connects = usize::from(matches!(action, Action::Connect(_)));
        for (i, event) in events.into_iter().enumerate() {
            action = ex.on(&req, h.at(1 + i as u64), event.event());
            connects += usize::from(matches!(action, Action::Connect(_)));
        }
        prop_assert!(connects <= MAX_ATTEMPTS);
        if finish_at_end {
            ex.on(&req, h.at(100), Event::Finished { status: 200, failed: false });
        }
        drop(ex);
        prop_assert!(h.rec.settled().len() <= 1);
        prop_assert_eq!(*h.rec.inflight.lock().unwrap(), 0);
        let route = &h.rt.policies[0].routes[0];
        prop_assert_eq!(route.concurrency.as_ref().unwrap().inflight(), 0);
        // The breaker admits the next request, or is open with its probe free.
        let breaker = route.breaker.as_ref().unwrap();
        let later = h.at(10_000);
        let (admission, _) = breaker.admit(later);
        prop_assert!(admission != crate::breaker::Admission::Rejected, "breaker {:?}", breaker.state());
        prop_assert!(h.rt.policies[0].endpoints.pending_total() == 0);
    }
}
