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
