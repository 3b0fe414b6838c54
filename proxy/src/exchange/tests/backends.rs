//! Per-route backends: a route with backends of its own picks, fails over and
//! reports among them only; the other routes use the policy's.

use super::*;

/// The policy's backends are 127.0.0.1:1001..=1003; route `canary` (by header) has
/// two of its own, route `rest` none.
fn canary() -> Harness {
    Harness::new(runtime(
        "",
        "    - name: canary\n      match: {headers: {x-canary: \"true\"}}\n      backends:\n        - {address: 127.0.0.1:2001}\n        - {address: 127.0.0.1:2002}\n    - name: rest\n",
    ))
}

fn canary_request() -> Req {
    Req {
        headers: vec![("x-canary", "true")],
        ..Req::get("/")
    }
}

/// The ports of the peers a request is sent to when every attempt is refused.
fn ports_tried(h: &Harness, req: &Req) -> Vec<u16> {
    let (mut ex, mut action) = h.arrive(req, 0);
    let mut ports = Vec::new();
    while let Action::Connect(peer) = action {
        ports.push(peer.addr.port());
        action = ex.on(req, h.at(1), refused(0));
    }
    ports.sort_unstable();
    ports
}

#[test]
fn a_header_matched_route_goes_to_its_own_backends_and_another_route_to_the_policys() {
    let h = canary();
    for i in 0..6 {
        let s = h.request(&canary_request(), i, ok);
        assert_eq!(s.route.as_deref(), Some("canary"));
        let backend = s.backend.unwrap_or_default();
        assert!(backend.starts_with("127.0.0.1:200"), "{backend}");
        let s = h.request(&Req::get("/"), i, ok);
        assert_eq!(s.route.as_deref(), Some("rest"));
        let backend = s.backend.unwrap_or_default();
        assert!(backend.starts_with("127.0.0.1:100"), "{backend}");
    }
    // Balanced apart: the canary's round robin alternates over its own two.
    let canary_backends: Vec<String> = (0..4)
        .filter_map(|i| h.request(&canary_request(), 10 + i, ok).backend)
        .collect();
    assert_eq!(canary_backends[0], canary_backends[2]);
    assert_ne!(canary_backends[0], canary_backends[1]);
}

#[test]
fn failover_stays_among_the_routes_own_backends() {
    let h = canary();
    assert_eq!(ports_tried(&h, &canary_request()), [2001, 2002]);
    assert_eq!(ports_tried(&h, &Req::get("/")), [1001, 1002, 1003]);
    // Outcomes are reported against the backend they happened at.
    assert!(h
        .rec
        .notes()
        .contains(&"upstream 127.0.0.1:2001 connect_error".to_owned()));
}

#[test]
fn a_service_on_a_named_port_is_never_dialled() {
    let h = Harness::new(runtime(
        "",
        "    - name: named\n      backends: [{service: reviews, port: http}]\n",
    ));
    let (_, action) = h.arrive(&Req::get("/"), 0);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 502);
}

#[test]
fn route_backends_carry_over_a_reload_that_leaves_them_unchanged() {
    let first = canary();
    let yaml_routes = "    - name: canary\n      match: {headers: {x-canary: \"true\"}}\n      backends:\n        - {address: 127.0.0.1:2001}\n        - {address: 127.0.0.1:2002}\n    - name: rest\n      timeout: 1s\n";
    let set = sluice_policy::load::parse_str(
        Path::new("test.yaml"),
        &format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: p\nspec:\n  hosts: [svc]\n  backends:\n    - address: 127.0.0.1:1001\n  routes:\n{yaml_routes}"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let second = Runtime::build(
        set,
        "test".into(),
        Some(&first.rt),
        &GlobalLimits::new(false),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let own = |rt: &Runtime| rt.policies[0].route_endpoints[0].clone();
    let (Some(before), Some(after)) = (own(&first.rt), own(&second)) else {
        panic!("the canary route has backends of its own")
    };
    assert!(Arc::ptr_eq(&before, &after));
    assert!(second.policies[0].route_endpoints[1].is_none());
    assert!(Arc::ptr_eq(
        second.policies[0].endpoints_of(1),
        &second.policies[0].endpoints
    ));
    // Transparent mode finds the policy by a route's backend too.
    let addr = "127.0.0.1:2002".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.policy_by_backend(addr), Some(0));
}
