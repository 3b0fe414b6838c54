//! gRPC calls: outcomes by grpc-status, retries on gRPC codes, refusals as gRPC
//! statuses, deadlines from grpc-timeout, routes by service and method.

use super::*;

fn call(path: &'static str) -> Req {
    Req {
        method: "POST",
        headers: vec![("content-type", "application/grpc")],
        ..Req::get(path)
    }
}

fn grpc(code: u32) -> Event<'static> {
    Event::Response {
        status: 200,
        grpc_status: Some(code),
    }
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A gRPC call relayed, its status arriving in the trailers.
fn relayed(h: &Harness, req: &Req, ms: u64, code: u32) -> Settled {
    let (mut ex, action) = h.arrive(req, ms);
    assert!(matches!(action, Action::Connect(_)), "{action:?}");
    let event = Event::Response {
        status: 200,
        grpc_status: None,
    };
    assert!(matches!(ex.on(req, h.at(ms + 1), event), Action::Relay));
    let finished = Event::Finished {
        status: 200,
        failed: false,
        grpc_status: Some(code),
    };
    ex.on(req, h.at(ms + 2), finished);
    drop(ex);
    h.rec.settled().pop().expect("settled")
}

#[test]
fn unavailable_in_a_trailers_only_answer_is_a_failure_retried_on_another_backend() {
    let h = Harness::new(runtime(
        "",
        "    - name: get\n      retries: {attempts: 1, on: [unavailable], budget: {ratio: 1.0, minPerSecond: 100}}\n",
    ));
    let req = call("/shop.Orders/Get");
    let (mut ex, first) = h.arrive(&req, 0);
    let Action::Connect(first) = first else {
        panic!("{first:?}")
    };
    let Action::Connect(second) = ex.on(&req, h.at(1), grpc(14)) else {
        panic!("UNAVAILABLE is retried")
    };
    assert_ne!(first.addr, second.addr, "the retry goes to another backend");
    assert!(matches!(ex.on(&req, h.at(2), grpc(0)), Action::Relay));
    ex.on(
        &req,
        h.at(3),
        Event::Finished {
            status: 200,
            failed: false,
            grpc_status: Some(0),
        },
    );
    let notes = h.rec.notes();
    assert!(notes.iter().any(|n| n.ends_with("grpc_error")), "{notes:?}");
    assert!(notes.iter().any(|n| n == "retry get true"), "{notes:?}");
    let settled = h.rec.settled().pop().expect("settled");
    assert_eq!((settled.status, settled.class_status), (200, 200));
    assert_eq!(settled.grpc_status, Some(0));
    assert_eq!(settled.attempts, 2);

    // NOT_FOUND is the caller's: neither retried nor a failure (a 4xx class).
    let (mut ex, _) = h.arrive(&req, 10);
    assert!(matches!(ex.on(&req, h.at(11), grpc(5)), Action::Relay));
}

#[test]
fn a_grpc_status_in_the_trailers_opens_the_breaker_and_the_call_then_gets_unavailable() {
    let h = Harness::new(runtime(
        "",
        "    - name: orders\n      circuitBreaker: {consecutiveFailures: 2, openFor: 10s}\n",
    ));
    let req = call("/shop.Orders/Get");
    // A failure the route does not count (NOT_FOUND) is a 4xx and opens nothing.
    let settled = relayed(&h, &req, 0, 5);
    assert_eq!((settled.class_status, settled.grpc_status), (400, Some(5)));
    for ms in [10, 20] {
        let settled = relayed(&h, &req, ms, 14);
        assert_eq!(settled.class_status, 503);
    }
    assert!(h.rec.notes().iter().any(|n| n == "breaker orders open"));
    let (mut ex, action) = h.arrive(&req, 30);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 200);
    assert_eq!(reply.content_type, Some("application/grpc"));
    assert!(reply.body.is_empty());
    assert!(reply.is_grpc());
    assert_eq!(header(&reply, "grpc-status"), Some("14"));
    let message = header(&reply, "grpc-message").expect("a message");
    assert!(message.contains("circuit breaker"), "{message}");
    ex.on(
        &req,
        h.at(31),
        Event::Finished {
            status: 200,
            failed: false,
            grpc_status: None,
        },
    );
    drop(ex);
    let settled = h.rec.settled().pop().expect("settled");
    // The refusal keeps the class of the 503 it stands for.
    assert_eq!((settled.class_status, settled.grpc_status), (503, Some(14)));
}

#[test]
fn a_call_whose_status_never_came_counts_as_unknown() {
    let h = Harness::new(runtime("", "    - name: all\n"));
    let req = call("/shop.Orders/Get");
    let (mut ex, _) = h.arrive(&req, 0);
    let event = Event::Response {
        status: 200,
        grpc_status: None,
    };
    ex.on(&req, h.at(1), event);
    let finished = Event::Finished {
        status: 200,
        failed: false,
        grpc_status: None,
    };
    ex.on(&req, h.at(2), finished);
    drop(ex);
    let settled = h.rec.settled().pop().expect("settled");
    assert_eq!((settled.class_status, settled.grpc_status), (500, Some(2)));
}

#[test]
fn limits_and_overload_answer_resource_exhausted() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      rateLimit: {requestsPerSecond: 0.001, burst: 1}\n",
    ));
    let req = call("/shop.Orders/Get");
    assert_eq!(h.request(&req, 0, ok).status, 200);
    let (_, action) = h.arrive(&req, 1);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(
        (reply.status, reply.grpc),
        (200, GrpcCode::ResourceExhausted)
    );
    assert_eq!(header(&reply, "grpc-status"), Some("8"));
    assert!(header(&reply, "retry-after").is_some());
    // A plain HTTP request on the same route still gets its 429.
    let (_, action) = h.arrive(&Req::get("/x"), 2);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 429);
    assert!(!reply.is_grpc());
}

#[test]
fn grpc_timeout_shortens_the_route_timeout_and_what_is_left_goes_upstream() {
    let h = Harness::new(runtime("", "    - name: all\n      timeout: 2s\n"));
    let mut req = call("/shop.Orders/Get");
    req.headers.push(("grpc-timeout", "100m"));
    let (ex, action) = h.arrive(&req, 0);
    let Action::Connect(peer) = action else {
        panic!("{action:?}")
    };
    assert_eq!(peer.io_timeout, Some(Duration::from_millis(100)));
    assert_eq!(
        ex.upstream_grpc_timeout(h.at(10)).as_deref(),
        Some("90000000n")
    );
    // The route's timeout when it is the shorter; a malformed value is ignored.
    req.headers[1] = ("grpc-timeout", "5S");
    let (ex, action) = h.arrive(&req, 0);
    let Action::Connect(peer) = action else {
        panic!("{action:?}")
    };
    assert_eq!(peer.io_timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        ex.upstream_grpc_timeout(h.at(0)).as_deref(),
        Some("2000000u")
    );
    req.headers[1] = ("grpc-timeout", "soon");
    let (_, action) = h.arrive(&req, 0);
    let Action::Connect(peer) = action else {
        panic!("{action:?}")
    };
    assert_eq!(peer.io_timeout, Some(Duration::from_secs(2)));
    // A timeout answers DEADLINE_EXCEEDED.
    let (mut ex, _) = h.arrive(&call("/shop.Orders/Get"), 0);
    let Action::Answer(reply) = ex.on(&call("/shop.Orders/Get"), h.at(2_000), timed_out(0)) else {
        panic!()
    };
    assert_eq!(header(&reply, "grpc-status"), Some("4"));
    // Other requests have no grpc-timeout to forward.
    let (ex, _) = h.arrive(&Req::get("/"), 0);
    assert_eq!(ex.upstream_grpc_timeout(h.at(0)), None);
}

#[test]
fn routes_match_grpc_calls_by_service_and_method() {
    let h = Harness::new(runtime(
        "",
        "    - name: get\n      match: {grpc: {service: shop.Orders, method: Get}}\n    - name: orders\n      match: {grpc: {service: shop.Orders}}\n",
    ));
    let routed = |req: &Req| h.request(req, 0, ok).route;
    assert_eq!(routed(&call("/shop.Orders/Get")).as_deref(), Some("get"));
    assert_eq!(
        routed(&call("/shop.Orders/List")).as_deref(),
        Some("orders")
    );
    // Not a gRPC call, or another service: no route (a gRPC call learns it as
    // UNIMPLEMENTED).
    let (_, action) = h.arrive(&Req::post("/shop.Orders/Get"), 0);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 404);
    let (_, action) = h.arrive(&call("/shop.Users/Get"), 0);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(header(&reply, "grpc-status"), Some("12"));
}

#[test]
fn a_fallback_declares_the_status_grpc_calls_get() {
    let h = Harness::new(runtime(
        "",
        "    - name: all\n      rateLimit: {requestsPerSecond: 0.001, burst: 1}\n      fallback: {status: 200, body: cached, on: [rate-limited], grpcStatus: unavailable, grpcMessage: degraded}\n",
    ));
    let req = call("/shop.Orders/Get");
    h.request(&req, 0, ok);
    let (_, action) = h.arrive(&req, 1);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(header(&reply, "grpc-status"), Some("14"));
    assert_eq!(header(&reply, "grpc-message"), Some("degraded"));
    assert_eq!(header(&reply, "x-sluice-fallback"), Some("rate-limited"));
    // HTTP clients get the static response.
    let (_, action) = h.arrive(&Req::get("/"), 2);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!((reply.status, &reply.body[..]), (200, &b"cached"[..]));
}
