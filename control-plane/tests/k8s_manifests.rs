//! The Kubernetes manifests agree with the code and the repository: the policy copy
//! kustomize packs into the control plane's ConfigMap is the repository's, and the
//! webhook configuration calls the path the webhook serves.
//! (Rendering and schema validation: `scripts/k8s-test`.)

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("directory exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

#[test]
fn k8s_policies_match_the_repository_policies() {
    let repo = root().join("policies");
    let copy = root().join("k8s/base/policies");
    let names = yaml_files(&repo);
    assert_eq!(
        yaml_files(&copy),
        names,
        "k8s/base/policies/ must hold exactly policies/*.yaml: cp policies/*.yaml k8s/base/policies/"
    );
    let kustomization =
        std::fs::read_to_string(root().join("k8s/base/kustomization.yaml")).expect("kustomization");
    for name in names {
        let a = std::fs::read_to_string(repo.join(&name)).expect("policy");
        let b = std::fs::read_to_string(copy.join(&name)).expect("copy");
        assert!(
            a == b,
            "k8s/base/policies/{name} is stale: cp policies/*.yaml k8s/base/policies/"
        );
        assert!(
            kustomization.contains(&format!("- policies/{name}\n")),
            "k8s/base/kustomization.yaml does not list policies/{name}"
        );
    }
}

#[test]
fn webhook_configuration_calls_the_served_path() {
    let webhook =
        std::fs::read_to_string(root().join("k8s/base/webhook.yaml")).expect("webhook.yaml");
    let path = format!("path: {}\n", sluice_control_plane::webhook::INJECT_PATH);
    assert_eq!(webhook.matches(&path).count(), 2, "{webhook}");
    assert_eq!(webhook.matches("failurePolicy: Ignore").count(), 2);
}

#[test]
fn demo_policy_is_valid() {
    sluice_policy::load_path(&root().join("k8s/demo/policy.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
}
