//! The Kubernetes manifests agree with the code: the webhook configuration calls the
//! path the webhook serves, and refuses pods it cannot inject.
//! (Rendering and schema validation: `scripts/k8s-test`.)

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn webhook_configuration_calls_the_served_path() {
    let webhook =
        std::fs::read_to_string(root().join("k8s/base/webhook.yaml")).expect("webhook.yaml");
    let path = format!("path: {}\n", sluice_control_plane::webhook::INJECT_PATH);
    assert_eq!(webhook.matches(&path).count(), 2, "{webhook}");
    // A pod that asked for a sidecar is never created without one.
    assert_eq!(webhook.matches("failurePolicy: Fail").count(), 2);
    assert_eq!(webhook.matches("failurePolicy").count(), 2);
}

#[test]
fn demo_policy_is_valid() {
    sluice_policy::load_path(&root().join("k8s/demo/policy.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_monitors_scrape_the_ports_the_proxy_and_the_control_plane_expose() {
    let monitors = std::fs::read_to_string(root().join("k8s/monitoring/monitors.yaml"))
        .expect("monitors.yaml");
    let control_plane = std::fs::read_to_string(root().join("k8s/base/control-plane.yaml"))
        .expect("control-plane.yaml");
    // The PodMonitor selects injected pods by the label injection sets, on the port
    // injection names; the ServiceMonitor the Service's metrics port.
    assert!(
        monitors.contains(&format!(
            "{}: injected",
            sluice_control_plane::inject::INJECTED_LABEL
        )),
        "{monitors}"
    );
    assert!(monitors.contains("- port: sluice-metrics\n"), "{monitors}");
    let injected = std::fs::read_to_string(root().join("control-plane/tests/inject/pod.out"))
        .expect("pod.out");
    assert!(injected.contains("name: sluice-metrics"), "{injected}");
    assert!(
        injected.contains(&format!(
            "containerPort: {}",
            sluice_control_plane::inject::TELEMETRY_PORT
        )),
        "{injected}"
    );
    assert!(monitors.contains("- port: metrics\n"), "{monitors}");
    assert!(
        control_plane.contains("{name: metrics, port: 15014, targetPort: metrics"),
        "{control_plane}"
    );
    assert!(control_plane.contains("{name: metrics, containerPort: 15014"));
    // The jobs the shipped alerts select.
    assert!(monitors.contains("{targetLabel: job, replacement: sluice-proxy}"));
}

#[test]
fn the_control_plane_may_write_trafficpolicy_status_and_replace_a_spec_for_a_rollback() {
    let rbac = std::fs::read_to_string(root().join("k8s/base/rbac.yaml")).expect("rbac.yaml");
    // What `status::StatusWriter` does: PATCH …/trafficpolicies/NAME/status.
    assert!(
        rbac.contains("resources: [trafficpolicies/status]\n    verbs: [get, patch, update]\n"),
        "{rbac}"
    );
    // What `sluice-cp rollback --policy` does: PUT …/trafficpolicies/NAME (no patch,
    // no create, no delete).
    assert!(
        rbac.contains("resources: [trafficpolicies]\n    verbs: [get, list, watch, update]\n"),
        "{rbac}"
    );
}
