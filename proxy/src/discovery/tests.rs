use std::path::Path;

use super::*;

fn shared_with(yaml: &str) -> Arc<Shared> {
    let shared = Arc::new(Shared::new(false, false).unwrap_or_else(|e| panic!("{e}")));
    let set =
        sluice_policy::load::parse_str(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    let runtime =
        Runtime::build(set, "t".into(), None, &shared.globals).unwrap_or_else(|e| panic!("{e}"));
    shared.runtime.store(Arc::new(runtime));
    shared
}

/// Policy `p` in namespace `shop`: `reviews` by name on the policy, `ratings.other`
/// by number on a route, and a plain address.
const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  hosts: [h]\n  backends: [{service: reviews, port: http}]\n  routes:\n    - name: r\n      match: {path: /r}\n      backends: [{service: ratings.other, port: 8080}, {address: 127.0.0.1:1}]\n    - name: rest\n";

fn pod(last: u8, ready: bool) -> api::Endpoint {
    api::Endpoint {
        ip: format!("10.0.0.{last}"),
        service_port: 80,
        service_port_name: "http".into(),
        target_port: 8080,
        ready,
        serving: true,
        terminating: !ready,
        pod: format!("shop/reviews-{last}"),
        zone: String::new(),
        identity: String::new(),
    }
}

fn update(
    nonce: &str,
    service: &str,
    version: u64,
    pods: Vec<api::Endpoint>,
) -> api::EndpointsUpdate {
    api::EndpointsUpdate {
        nonce: nonce.into(),
        sets: vec![api::EndpointSet {
            service: service.into(),
            version,
            endpoints: pods,
        }],
        removed: Vec::new(),
    }
}

fn policy_addrs(shared: &Shared) -> Vec<String> {
    let rt = shared.runtime.load();
    rt.policies[0]
        .endpoints
        .targets
        .iter()
        .map(|t| format!("{}{}", t.addr, if t.draining { " draining" } else { "" }))
        .collect()
}

#[test]
fn the_subscription_names_the_services_of_policy_and_route_backends() {
    let shared = shared_with(POLICY);
    let wanted: Vec<String> = subscribed(&shared.runtime.load()).into_iter().collect();
    assert_eq!(wanted, ["other/ratings", "shop/reviews"]);
}

#[test]
fn a_pushed_set_becomes_the_backends_endpoints_without_a_reload() {
    let shared = shared_with(POLICY);
    let before = shared.runtime.load_full();
    assert!(
        policy_addrs(&shared).is_empty(),
        "a named port has no endpoint yet"
    );
    let error = take_update(
        &shared,
        &update("1", "shop/reviews", 1, vec![pod(1, true), pod(2, false)]),
    );
    assert_eq!(error, "");
    assert_eq!(
        policy_addrs(&shared),
        ["10.0.0.1:8080", "10.0.0.2:8080 draining"]
    );
    let after = shared.runtime.load_full();
    assert_eq!(after.version, before.version, "not a reload");
    assert!(Arc::ptr_eq(
        &after.policies[0].routes,
        &before.policies[0].routes
    ));
}

#[test]
fn a_malformed_update_is_nacked_and_keeps_the_previous_sets() {
    let shared = shared_with(POLICY);
    take_update(&shared, &update("1", "shop/reviews", 1, vec![pod(1, true)]));
    let mut bad = pod(2, true);
    bad.ip = "10.0.0.300".into();
    let error = take_update(&shared, &update("2", "shop/reviews", 2, vec![bad]));
    assert!(error.contains("not an IP address"), "{error}");
    let mut zero = pod(3, true);
    zero.target_port = 0;
    let error = take_update(&shared, &update("3", "shop/reviews", 3, vec![zero]));
    assert!(error.contains("targetPort 0"), "{error}");
    let error = take_update(&shared, &update("4", "reviews", 4, vec![pod(4, true)]));
    assert!(error.contains("namespace/name"), "{error}");
    assert_eq!(policy_addrs(&shared), ["10.0.0.1:8080"]);
    let version = shared
        .services
        .load()
        .get("shop/reviews")
        .map(|s| s.version);
    assert_eq!(version, Some(1));
}

#[test]
fn a_route_backend_on_a_numeric_port_takes_its_set_over_dns() {
    let shared = shared_with(POLICY);
    let mut pod = pod(7, true);
    pod.service_port = 8080;
    pod.service_port_name = String::new();
    pod.target_port = 9000;
    take_update(&shared, &update("1", "other/ratings", 1, vec![pod]));
    let rt = shared.runtime.load();
    let route = rt.policies[0].route_endpoints[0]
        .as_ref()
        .unwrap_or_else(|| panic!("route r has backends of its own"));
    let addrs: Vec<String> = route.targets.iter().map(|t| t.addr.to_string()).collect();
    assert_eq!(addrs, ["10.0.0.7:9000", "127.0.0.1:1"]);
}

#[test]
fn a_meshed_pods_identity_reaches_its_target_and_a_malformed_one_is_nacked() {
    let shared = shared_with(POLICY);
    let mut meshed = pod(1, true);
    meshed.identity = "spiffe://cluster.local/ns/shop/sa/reviews".into();
    let error = take_update(
        &shared,
        &update("1", "shop/reviews", 1, vec![meshed, pod(2, true)]),
    );
    assert_eq!(error, "");
    let runtime = shared.runtime.load();
    let identities: Vec<(String, Option<&str>)> = runtime.policies[0]
        .endpoints
        .targets
        .iter()
        .map(|t| (t.addr.to_string(), t.identity.as_deref()))
        .collect();
    assert_eq!(
        identities,
        [
            (
                "10.0.0.1:8080".to_owned(),
                Some("spiffe://cluster.local/ns/shop/sa/reviews")
            ),
            ("10.0.0.2:8080".to_owned(), None),
        ]
    );
    let mut bad = pod(3, true);
    bad.identity = "spiffe://cluster.local/shop/reviews".into();
    let error = take_update(&shared, &update("2", "shop/reviews", 2, vec![bad]));
    assert!(error.contains("not a workload identity"), "{error}");
}
