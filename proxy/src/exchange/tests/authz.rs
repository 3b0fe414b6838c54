//! An inbound policy's mTLS mode and authorization: who reaches the app, who is
//! answered 403 (gRPC: PERMISSION_DENIED), shadow mode, and a reload of the rules.

use std::net::SocketAddr;

use super::*;
use crate::identity::PeerIdentity;

const ROUTES: &str = "    - name: orders\n      match: {pathPrefix: /orders}\n    - name: health\n      match: {path: /healthz}\n";

/// An inbound listener for policy `p` (spec `extra`), delivering to the app.
fn inbound(extra: &str, mtls_default: MtlsMode) -> Harness {
    let mut h = Harness::new(runtime(extra, ROUTES));
    h.side = Side {
        direction: Direction::Inbound,
        inbound_policy: Some("p".into()),
        inbound_app: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
        own_ports: Vec::new(),
        mtls_default,
    };
    h
}

/// `GET path` from the workload `namespace/sa` (over mTLS), or plaintext.
fn from(caller: Option<(&str, &str)>, path: &'static str) -> Req {
    Req {
        peer: caller.map(|(ns, sa)| {
            PeerIdentity::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"))
                .unwrap_or_else(|e| panic!("{e}"))
        }),
        ..Req::get(path)
    }
}

const RULES: &str = "  authorization:\n    rules:\n      - from: {serviceAccounts: [shop/frontend]}\n        routes: [orders]\n      - from: {namespaces: [monitoring]}\n";

fn body(action: &Action) -> String {
    match action {
        Action::Answer(reply) => String::from_utf8_lossy(&reply.body).into_owned(),
        other => panic!("not an answer: {other:?}"),
    }
}

#[test]
fn an_allowed_service_account_reaches_the_app() {
    let h = inbound(RULES, MtlsMode::Permissive);
    let settled = h.request(&from(Some(("shop", "frontend")), "/orders/1"), 0, ok);
    assert_eq!(settled.status, 200);
    assert_eq!(settled.verdict, Verdict::Allowed);
    assert_eq!(settled.backend.as_deref(), Some("app"));
    assert!(h.rec.notes().iter().all(|n| !n.starts_with("unauthorized")));
}

#[test]
fn another_service_account_is_refused_with_403_and_counted() {
    let h = inbound(RULES, MtlsMode::Permissive);
    let req = from(Some(("shop", "checkout")), "/orders/1");
    let (ex, action) = h.arrive(&req, 0);
    assert_eq!(
        body(&action),
        "sluice: denied by authorization of policy \"p\" (default deny)\n"
    );
    drop(ex);
    let settled = h.request(&req, 1, ok);
    assert_eq!(
        (settled.status, settled.verdict),
        (403, Verdict::Unauthorized)
    );
    assert_eq!(settled.route.as_deref(), Some("orders"));
    assert_eq!(settled.attempts, 0, "nothing reached the app");
    assert!(h
        .rec
        .notes()
        .contains(&"unauthorized orders enforce".to_owned()));
}

#[test]
fn a_namespace_rule_allows_every_account_in_it() {
    let h = inbound(RULES, MtlsMode::Permissive);
    for sa in ["prometheus", "blackbox"] {
        let settled = h.request(&from(Some(("monitoring", sa)), "/healthz"), 0, ok);
        assert_eq!(settled.status, 200, "{sa}");
    }
    let settled = h.request(&from(Some(("ops", "prometheus")), "/healthz"), 0, ok);
    assert_eq!(settled.status, 403);
}

#[test]
fn a_route_scoped_rule_allows_only_its_routes() {
    let h = inbound(RULES, MtlsMode::Permissive);
    let frontend = Some(("shop", "frontend"));
    assert_eq!(h.request(&from(frontend, "/orders/7"), 0, ok).status, 200);
    let health = h.request(&from(frontend, "/healthz"), 1, ok);
    assert_eq!(
        (health.status, health.route.as_deref()),
        (403, Some("health"))
    );
}

#[test]
fn plaintext_is_refused_under_strict_and_served_under_permissive() {
    // The listener's default.
    let strict = inbound("", MtlsMode::Strict);
    let (_ex, action) = strict.arrive(&from(None, "/orders/1"), 0);
    assert_eq!(body(&action), "sluice: mTLS required by policy \"p\"\n");
    let settled = strict.request(&from(None, "/orders/1"), 1, ok);
    assert_eq!(
        (settled.status, settled.verdict),
        (403, Verdict::Unauthorized)
    );
    let mtls = strict.request(&from(Some(("shop", "anyone")), "/orders/1"), 2, ok);
    assert_eq!(mtls.status, 200, "no authorization: any mTLS caller");

    let permissive = inbound("", MtlsMode::Permissive);
    assert_eq!(
        permissive.request(&from(None, "/orders/1"), 0, ok).status,
        200
    );

    // The policy's own mode wins over the listener's, both ways.
    let policy_strict = inbound("  mtls: {mode: strict}\n", MtlsMode::Permissive);
    assert_eq!(
        policy_strict
            .request(&from(None, "/orders/1"), 0, ok)
            .status,
        403
    );
    let policy_permissive = inbound("  mtls: {mode: permissive}\n", MtlsMode::Strict);
    assert_eq!(
        policy_permissive
            .request(&from(None, "/orders/1"), 0, ok)
            .status,
        200
    );
}

#[test]
fn a_plaintext_caller_matches_no_rule() {
    let h = inbound(RULES, MtlsMode::Permissive);
    assert_eq!(h.request(&from(None, "/healthz"), 0, ok).status, 403);
}

#[test]
fn a_denied_grpc_call_gets_permission_denied_trailers_only() {
    let h = inbound(RULES, MtlsMode::Permissive);
    let req = Req {
        method: "POST",
        headers: vec![("content-type", "application/grpc")],
        ..from(Some(("shop", "checkout")), "/orders/shop.Orders/Get")
    };
    let (_ex, action) = h.arrive(&req, 0);
    let Action::Answer(reply) = action else {
        panic!("{action:?}")
    };
    assert_eq!(reply.status, 200);
    assert_eq!(reply.content_type, Some("application/grpc"));
    assert!(reply.body.is_empty(), "trailers-only");
    let field = |name: &str| {
        reply
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("grpc-status").as_deref(), Some("7"));
    assert_eq!(
        field("grpc-message").as_deref(),
        Some("sluice: denied by authorization of policy \"p\" (default deny)")
    );
}

#[test]
fn shadow_mode_counts_a_denial_and_lets_the_request_through() {
    let h = inbound(&format!("  mode: shadow\n{RULES}"), MtlsMode::Strict);
    for (caller, ms) in [(Some(("shop", "checkout")), 0), (None, 1)] {
        let settled = h.request(&from(caller, "/orders/1"), ms, ok);
        assert_eq!(settled.status, 200);
        assert_eq!(settled.verdict, Verdict::Allowed);
        assert_eq!(settled.shadow, Some(Verdict::Unauthorized));
    }
    let counted = h
        .rec
        .notes()
        .iter()
        .filter(|n| *n == "unauthorized orders shadow")
        .count();
    assert_eq!(counted, 2);
}

#[test]
fn a_reload_that_changes_the_rules_applies_to_the_next_request() {
    let mut h = inbound(RULES, MtlsMode::Permissive);
    let checkout = from(Some(("shop", "checkout")), "/orders/1");
    // A request that arrived before the swap keeps the snapshot it pinned.
    let (mut before, first) = h.arrive(&checkout, 0);
    assert!(matches!(first, Action::Answer(_)));
    h.rt = runtime(
        "  authorization:\n    rules: [{from: {serviceAccounts: [shop/checkout]}}]\n",
        ROUTES,
    );
    assert_eq!(h.request(&checkout, 1, ok).status, 200);
    assert_eq!(
        h.request(&from(Some(("shop", "frontend")), "/orders/1"), 2, ok)
            .status,
        403
    );
    before.on(
        &checkout,
        h.at(3),
        Event::Finished {
            status: 403,
            failed: false,
            grpc_status: None,
        },
    );
    assert_eq!(
        h.rec.settled().pop().map(|s| s.verdict),
        Some(Verdict::Unauthorized)
    );
}

#[test]
fn outbound_requests_are_never_authorized() {
    let mut h = inbound(
        &format!("  mtls: {{mode: strict}}\n{RULES}"),
        MtlsMode::Strict,
    );
    h.side = outbound();
    let settled = h.request(&from(None, "/orders/1"), 0, ok);
    assert_eq!((settled.status, settled.verdict), (200, Verdict::Allowed));
}

#[test]
fn a_meshed_backend_is_dialled_expecting_its_identity() {
    let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [svc]\n  backends:\n    - address: 127.0.0.1:1001\n      tls: {identity: \"spiffe://cluster.local/ns/shop/sa/reviews\"}\n";
    let set =
        sluice_policy::load::parse_str(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    let rt = Runtime::build(set, "test".into(), None, &GlobalLimits::new(false))
        .unwrap_or_else(|e| panic!("{e}"));
    let h = Harness::new(Arc::new(rt));
    let (_ex, action) = h.arrive(&Req::get("/"), 0);
    let Action::Connect(peer) = action else {
        panic!("{action:?}")
    };
    assert_eq!(
        peer.tls.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/reviews")
    );
}
