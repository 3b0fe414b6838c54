//! Warnings about valid policies: placed at `file:line:column` with their YAML path,
//! as errors are, and never a reason to refuse a policy.

use std::path::Path;

const SHADOWED: &str = "\
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: x}
spec:
  hosts: [x]
  backends: [{address: 127.0.0.1:9}]
  routes:
    - name: health
      match: {path: /healthz}
    - name: all
    - {name: a, match: {pathPrefix: /a, methods: [GET]}}
    - name: b
      match: {headers: {x-b: \"1\"}}
";

#[test]
fn places_each_route_that_can_never_match_at_its_line_and_column() {
    let checked = sluice_policy::check_str(Path::new("x.yaml"), SHADOWED).expect("valid");
    let warnings: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec![
            "x.yaml:11:7: warning: spec.routes[2]: route \"a\" can never match: route \"all\" (spec.routes[1]) matches every request it would",
            "x.yaml:12:7: warning: spec.routes[3]: route \"b\" can never match: route \"all\" (spec.routes[1]) matches every request it would",
        ]
    );
}

#[test]
fn a_policy_with_warnings_still_loads_as_written() {
    let checked = sluice_policy::check_str(Path::new("x.yaml"), SHADOWED).expect("valid");
    let loaded = sluice_policy::parse_str(Path::new("x.yaml"), SHADOWED).expect("valid");
    assert_eq!(checked.set, loaded);
    assert_eq!(loaded.policies[0].routes.len(), 4);
}

#[test]
fn warnings_name_the_file_each_policy_came_from() {
    let other = SHADOWED
        .replace("{name: x}", "{name: other}")
        .replace("[x]", "[other]");
    let checked = sluice_policy::check_sources([
        (Path::new("x.yaml"), SHADOWED),
        (Path::new("other.yaml"), other.as_str()),
    ])
    .expect("valid");
    let files: Vec<&Path> = checked.warnings.iter().map(|w| w.file.as_path()).collect();
    assert_eq!(
        files,
        ["x.yaml", "x.yaml", "other.yaml", "other.yaml"].map(Path::new)
    );
}

#[test]
fn an_invalid_source_gives_its_errors_and_no_warnings() {
    let invalid = SHADOWED.replace("127.0.0.1:9", "nowhere");
    let errors = sluice_policy::check_str(Path::new("x.yaml"), &invalid).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "x.yaml:6:24: spec.backends[0].address: expected host:port, got \"nowhere\""
    );
}

#[test]
fn the_example_policies_draw_no_warnings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let checked = sluice_policy::check_path(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
}

#[test]
fn warns_that_a_service_on_a_named_port_gets_no_traffic() {
    let yaml = "\
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: x}
spec:
  backends:
    - {service: reviews, port: 9080}
    - {service: reviews-v2.shop, port: http}
  routes:
    - name: canary
      backends: [{service: reviews-v3, port: grpc}]
";
    let checked = sluice_policy::check_str(Path::new("x.yaml"), yaml).expect("valid");
    let warnings: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec![
            "x.yaml:7:40: warning: spec.backends[1].port: Service \"reviews-v2.shop\" is reached by the port name \"http\": a proxy only dials a port number, so this backend gets no traffic until the control plane sends its endpoints; give the number",
            "x.yaml:10:46: warning: spec.routes[0].backends[0].port: Service \"reviews-v3\" is reached by the port name \"grpc\": a proxy only dials a port number, so this backend gets no traffic until the control plane sends its endpoints; give the number",
        ]
    );
}

#[test]
fn a_grpc_route_to_http1_backends_is_warned_at_its_match() {
    let yaml = "\
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: g}
spec:
  hosts: [g]
  backends: [{address: 127.0.0.1:9}]
  routes:
    - name: orders
      match: {grpc: {service: shop.Orders}}
    - name: h2
      match: {grpc: {service: shop.Users}}
      backends: [{address: 127.0.0.1:10, protocol: h2c}]
";
    let checked = sluice_policy::check_str(Path::new("g.yaml"), yaml).expect("valid");
    let warnings: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec!["g.yaml:9:21: warning: spec.routes[0].match.grpc: route \"orders\" takes gRPC calls but its backends speak HTTP/1: gRPC needs HTTP/2, so every call would fail; give them `protocol: h2c`"]
    );
}
