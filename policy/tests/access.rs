//! `spec.mtls`, `spec.authorization` and `backends[].tls`: what they mean in the
//! model, every mistake placed at `file:line:column` with its YAML path, and the
//! warnings about authorizations that decide nothing.

use std::path::Path;

use sluice_policy::*;

/// A policy for `orders` in `shop` with two routes, and `extra` under `spec`.
fn doc(extra: &str) -> String {
    format!(
        "\
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: orders, namespace: shop}}
spec:
  hosts: [orders]
  routes:
    - name: orders
      match: {{pathPrefix: /orders}}
    - name: health
      match: {{path: /healthz}}
{extra}"
    )
}

fn errors(yaml: &str) -> Vec<String> {
    match parse_str(Path::new("p.yaml"), yaml) {
        Ok(set) => panic!("accepted: {set:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn warnings(yaml: &str) -> Vec<String> {
    let checked = check_str(Path::new("p.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    checked.warnings.iter().map(ToString::to_string).collect()
}

fn policy(yaml: &str) -> TrafficPolicy {
    parse_str(Path::new("p.yaml"), yaml)
        .unwrap_or_else(|e| panic!("{e}"))
        .policies
        .remove(0)
}

#[test]
fn accepts_mtls_and_authorization_by_account_namespace_and_route() {
    let p = policy(&doc("  mtls: {mode: strict}
  authorization:
    rules:
      - from: {serviceAccounts: [shop/frontend, shop/checkout], namespaces: [ops]}
        routes: [orders]
      - from: {namespaces: [monitoring]}
"));
    assert_eq!(p.mtls, Some(MtlsMode::Strict));
    let authz = p.authorization.expect("authorization");
    // Listing who may call means nobody else may.
    assert_eq!(authz.default, AuthorizationDefault::Deny);
    assert_eq!(
        authz.rules[0],
        AuthorizationRule {
            service_accounts: vec![
                ServiceAccount {
                    namespace: "shop".into(),
                    name: "frontend".into()
                },
                ServiceAccount {
                    namespace: "shop".into(),
                    name: "checkout".into()
                },
            ],
            namespaces: vec!["ops".into()],
            routes: Some(vec!["orders".into()]),
        }
    );
    assert_eq!(authz.rules[1].routes, None);
    assert!(authz.rules[0].names("shop", "frontend"));
    assert!(authz.rules[0].names("ops", "anyone"));
    assert!(!authz.rules[0].names("shop", "reviews"));
}

#[test]
fn without_mtls_the_policy_leaves_the_mode_to_the_mesh_default() {
    let p = policy(&doc(""));
    assert_eq!((p.mtls, p.authorization), (None, None));
}

#[test]
fn rejects_service_account_without_namespace() {
    let yaml = doc("  authorization:
    rules:
      - from: {serviceAccounts: [shop/frontend, checkout]}
");
    assert_eq!(
        errors(&yaml),
        ["p.yaml:13:49: spec.authorization.rules[0].from.serviceAccounts[1]: expected a ServiceAccount as `namespace/name` (a DNS-1123 label: lower-case letters, digits and '-', at most 63; then a DNS-1123 subdomain: such labels joined by '.'), got \"checkout\""]
    );
}

#[test]
fn rejects_service_account_parts_that_are_not_dns_labels() {
    let yaml = doc("  authorization:
    rules:
      - from:
          serviceAccounts: [Shop/frontend, shop/front_end, shop/frontend/x, shop/web.v2]
");
    let got = errors(&yaml);
    let places: Vec<&str> = got
        .iter()
        .map(|e| e.split(": expected").next().unwrap_or(""))
        .collect();
    assert_eq!(
        places,
        [
            "p.yaml:14:29: spec.authorization.rules[0].from.serviceAccounts[0]",
            "p.yaml:14:44: spec.authorization.rules[0].from.serviceAccounts[1]",
            "p.yaml:14:60: spec.authorization.rules[0].from.serviceAccounts[2]",
        ]
    );
}

#[test]
fn rejects_namespace_that_is_not_a_dns_label() {
    let yaml = doc("  authorization:
    rules:
      - from: {namespaces: [ops, -ops]}
");
    assert_eq!(
        errors(&yaml),
        ["p.yaml:13:34: spec.authorization.rules[0].from.namespaces[1]: expected a namespace (a DNS-1123 label: lower-case letters, digits and '-', at most 63), got \"-ops\""]
    );
}

#[test]
fn rejects_rule_naming_a_route_the_policy_does_not_have() {
    let yaml = doc("  authorization:
    rules:
      - from: {namespaces: [ops]}
        routes: [health, order]
");
    assert_eq!(
        errors(&yaml),
        ["p.yaml:14:26: spec.authorization.rules[0].routes[1]: no route named \"order\" in this policy, did you mean `orders`?"]
    );
}

#[test]
fn a_rule_may_name_the_implicit_default_route() {
    let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  authorization:\n    rules: [{from: {namespaces: [ops]}, routes: [default]}]\n";
    let p = policy(yaml);
    assert_eq!(
        p.authorization.map(|a| a.rules[0].routes.clone()),
        Some(Some(vec![DEFAULT_ROUTE.to_owned()]))
    );
}

#[test]
fn rejects_rule_that_names_no_caller() {
    let yaml = doc("  authorization:
    rules:
      - from: {}
        routes: []
");
    assert_eq!(
        errors(&yaml),
        [
            "p.yaml:13:15: spec.authorization.rules[0].from: a rule needs `serviceAccounts` or `namespaces`: naming nobody, it would allow nobody (to allow every caller, write `default: allow`)",
            "p.yaml:14:17: spec.authorization.rules[0].routes: must not be empty",
        ]
    );
}

#[test]
fn rejects_unknown_mtls_mode_and_default() {
    let yaml = doc("  mtls: {mode: strcit}
  authorization: {default: permit}
");
    assert_eq!(
        errors(&yaml),
        [
            "p.yaml:11:16: spec.mtls.mode: unknown value \"strcit\", did you mean `strict`?",
            "p.yaml:12:28: spec.authorization.default: unknown value \"permit\", expected one of `allow`, `deny`",
        ]
    );
}

#[test]
fn accepts_a_backend_identity_and_writes_it_back() {
    let yaml = doc("  backends:
    - service: reviews
      port: 9080
      tls: {identity: \"spiffe://cluster.local/ns/shop/sa/reviews\"}
");
    let p = policy(&yaml);
    assert_eq!(
        p.backends[0].tls,
        Some(BackendTls {
            identity: "spiffe://cluster.local/ns/shop/sa/reviews".into()
        })
    );
    let again = parse_str(
        Path::new("again.yaml"),
        &to_yaml(&PolicySet {
            policies: vec![p.clone()],
        }),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.policies, vec![p]);
}

#[test]
fn rejects_backend_identity_that_is_not_a_spiffe_workload_id() {
    let yaml = doc("  backends:
    - address: 127.0.0.1:9
      tls: {identity: \"spiffe://cluster.local/sa/reviews\"}
");
    assert_eq!(
        errors(&yaml),
        ["p.yaml:13:23: spec.backends[0].tls.identity: expected a workload identity, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (namespace: a DNS-1123 label; service account: a DNS-1123 subdomain), got \"spiffe://cluster.local/sa/reviews\""]
    );
}

#[test]
fn warns_default_deny_without_rules() {
    let yaml = doc("  authorization: {default: deny}\n");
    assert_eq!(
        warnings(&yaml),
        ["p.yaml:11:18: warning: spec.authorization: `default: deny` and no rules: every caller is denied; add rules naming who may call"]
    );
}

#[test]
fn warns_default_allow_that_makes_rules_moot() {
    let yaml = doc("  authorization:
    default: allow
    rules: [{from: {namespaces: [ops]}}]
");
    assert_eq!(
        warnings(&yaml),
        ["p.yaml:12:14: warning: spec.authorization.default: `default: allow` lets every caller through, and rules only allow: this authorization changes nothing; use `default: deny`"]
    );
}

#[test]
fn rules_with_default_deny_draw_no_warning() {
    let yaml = doc("  mtls: {mode: permissive}
  authorization:
    rules: [{from: {namespaces: [ops]}}]
");
    assert_eq!(warnings(&yaml), Vec::<String>::new());
}
