//! Routing, admission and refusals: 404s, rate limits, breakers, load shedding,
//! shadow mode.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_policy::FallbackCause;

use super::*;
use crate::breaker::BreakerState;

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
        ex.on(
            &Req::get("/x"),
            h.at(5),
            Event::Response {
                status: 204,
                grpc_status: None
            }
        ),
        Action::Relay
    ));
    ex.on(
        &Req::get("/x"),
        h.at(7),
        Event::Finished {
            status: 204,
            failed: false,
            grpc_status: None,
        },
    );
    // A second Finished (an engine calling twice) settles nothing more.
    assert!(matches!(
        ex.on(
            &Req::get("/x"),
            h.at(8),
            Event::Finished {
                status: 204,
                failed: false,
                grpc_status: None
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
    assert_eq!(h.rec.inflight.count(), 1);
    drop(ex);
    assert_eq!(h.rec.inflight.count(), 0);
}

#[test]
fn interim_responses_pass_on_and_the_final_one_settles() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let (mut ex, _) = h.arrive(&Req::post("/"), 0);
    for status in [100, 103, 200] {
        let action = ex.on(
            &Req::post("/"),
            h.at(1),
            Event::Response {
                status,
                grpc_status: None,
            },
        );
        assert!(matches!(action, Action::Relay), "{status}: {action:?}");
    }
    ex.on(
        &Req::post("/"),
        h.at(2),
        Event::Finished {
            status: 200,
            failed: false,
            grpc_status: None,
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
        runtime: Handle::new(Arc::new(Runtime::empty())),
        side: &h.side,
        original_dst: None,
        h2c: true,
        undiscovered: false,
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
            grpc_status: None,
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
fn an_open_breaker_and_overload_are_answered_by_their_fallbacks() {
    let h = Harness::new(runtime(
        "",
        "    - name: breaker\n      match: {pathPrefix: /b}\n      circuitBreaker: {consecutiveFailures: 1, openFor: 10s}\n      fallback: {status: 200, body: cached, on: [breaker-open]}\n    - name: busy\n      concurrency: {max: 1}\n      fallback: {backend: 127.0.0.1:2000, on: [overloaded]}\n",
    ));
    // The breaker opens on one failure; the next request gets the static fallback.
    h.request(&Req::get("/b"), 0, status(500));
    let (_ex, action) = h.arrive(&Req::get("/b"), 1);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"cached");
    assert!(reply
        .headers
        .iter()
        .any(|(k, v)| k == "x-sluice-fallback" && v == "breaker-open"));
    assert!(h
        .rec
        .notes()
        .contains(&"fallback breaker breaker-open enforce".to_owned()));

    // One request holds the only slot; the next goes to the fallback backend.
    let (_held, _) = h.arrive(&Req::get("/x"), 2);
    let (mut ex, action) = h.arrive(&Req::get("/x"), 3);
    let Action::Connect(peer) = action else {
        panic!("{action:?}")
    };
    assert_eq!(
        peer.addr,
        std::net::SocketAddr::from(([127, 0, 0, 1], 2000))
    );
    assert!(matches!(
        ex.on(
            &Req::get("/x"),
            h.at(4),
            Event::Response {
                status: 200,
                grpc_status: None
            }
        ),
        Action::Relay
    ));
    ex.on(
        &Req::get("/x"),
        h.at(5),
        Event::Finished {
            status: 200,
            failed: false,
            grpc_status: None,
        },
    );
    let s = h.rec.settled().pop().unwrap();
    assert_eq!(
        (s.verdict, s.fallback, s.backend.as_deref()),
        (
            Verdict::Fallback,
            Some(FallbackCause::Overloaded),
            Some("fallback")
        )
    );
    assert_eq!(ex.response_headers().1, Some("overloaded"));
}
