//! Attempts: failover, retries and their budget, resends, timeouts, fallbacks,
//! hand-offs, and any order of events (proptest).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sluice_policy::FallbackCause;

use super::*;
use crate::breaker::BreakerState;
use crate::globallimit::GlobalLimits;

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
    let action = ex.on(
        &Req::get("/"),
        h.at(1_500),
        Event::Response {
            status: 503,
            grpc_status: None,
        },
    );
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
    let Action::Answer(reply) = ex.on(
        &Req::get("/s"),
        h.at(1),
        Event::Response {
            status: 500,
            grpc_status: None,
        },
    ) else {
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
    let Action::Connect(peer) = ex.on(
        &Req::get("/b"),
        h.at(1),
        Event::Response {
            status: 500,
            grpc_status: None,
        },
    ) else {
        panic!()
    };
    assert_eq!(peer.addr, SocketAddr::from(([127, 0, 0, 1], 2000)));
    // The fallback backend's answer is relayed whatever it is.
    assert!(matches!(
        ex.on(
            &Req::get("/b"),
            h.at(2),
            Event::Response {
                status: 500,
                grpc_status: None
            }
        ),
        Action::Relay
    ));
    ex.on(
        &Req::get("/b"),
        h.at(3),
        Event::Finished {
            status: 500,
            failed: false,
            grpc_status: None,
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
        ex.on(
            &Req::get("/"),
            h.at(1),
            Event::Response {
                status: 200,
                grpc_status: None
            }
        ),
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
            grpc_status: None,
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
        runtime: Handle::new(Arc::clone(&h.rt)),
        side: &h.side,
        original_dst: None,
        h2c: false,
        undiscovered: false,
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
        mtls_default: MtlsMode::Permissive,
    };
    let (_ex, action) = h.arrive(&Req::get("/"), 0);
    let Action::Connect(peer) = action else {
        panic!()
    };
    assert_eq!(peer.addr.port(), 8080);
    // Redirected from one of the proxy's own ports: nowhere to deliver.
    let mut ex = Exchange::new(Arc::clone(&h.rec), h.at(0));
    let event = Event::Arrived {
        runtime: Handle::new(Arc::clone(&h.rt)),
        side: &h.side,
        original_dst: Some(SocketAddr::from(([10, 0, 0, 1], 15001))),
        h2c: true,
        undiscovered: false,
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
        runtime: Handle::new(Arc::clone(&h.rt)),
        side: &h.side,
        original_dst: Some(dst),
        h2c: true,
        undiscovered: false,
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
        ex.on(
            &Req::get("/"),
            h.at(0),
            Event::Response {
                status: 200,
                grpc_status: None
            }
        ),
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
            grpc_status: None,
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
            Ev::Response(status) => Event::Response {
                status,
                grpc_status: None,
            },
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
            ex.on(&req, h.at(100), Event::Finished { status: 200, failed: false, grpc_status: None });
        }
        drop(ex);
        prop_assert!(h.rec.settled().len() <= 1);
        prop_assert_eq!(h.rec.inflight.count(), 0);
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
