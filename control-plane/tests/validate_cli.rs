//! `sluice-cp validate` as a user runs it: exit codes, stdout summary, stderr errors.

use std::path::Path;
use std::process::Command;

fn sluice_cp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-cp"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("sluice-cp runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn accepts_the_example_policies_with_one_line_per_policy() {
    let (code, stdout, stderr) = sluice_cp(&["validate", "policies/"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(
        "demo: valid, 4 hosts, 3 backends (weighted-round-robin), 6 routes, mode enforce\n"
    ));
    assert!(stdout.contains(
        "example-canary: valid, 2 hosts, 3 backends (weighted-round-robin), 2 routes (1 with backends of its own), mode enforce\n"
    ));
    assert!(stdout.contains(
        "example-grpc: valid, 1 host, 2 backends (weighted-round-robin), 2 routes, mode enforce\n"
    ));
    assert!(stdout.contains(
        "example-mtls: valid, 1 host, 1 backend (weighted-round-robin), 2 routes, mode enforce, mtls strict, authorization: 2 rules, default deny\n"
    ));
    assert!(stdout.ends_with("13 valid policies\n"), "{stdout}");
}

#[test]
fn counts_the_implicit_route_of_a_policy_without_routes() {
    let (code, stdout, stderr) = sluice_cp(&["validate", "policies/load-balancing.yaml"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "example-load-balancing: valid, 1 host, 3 backends (consistent-hash on header:x-user-id), 1 route, mode enforce\n\
         example-p2c: valid, 1 host, 2 backends (p2c-ewma), 1 route, mode enforce\n\
         2 valid policies\n"
    );
}

#[test]
fn warns_on_stderr_about_routes_that_can_never_match_and_still_exits_0() {
    let dir = std::env::temp_dir().join(format!("sluice-cp-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("x.yaml");
    std::fs::write(
        &file,
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: x}\nspec:\n  routes:\n    - name: all\n    - name: b\n      match: {path: /b}\n",
    )
    .expect("write");
    let path = file.to_str().expect("utf-8 path").to_owned();
    let (code, stdout, stderr) = sluice_cp(&["validate", &path]);
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stderr,
        format!("{path}:7:7: warning: spec.routes[1]: route \"b\" can never match: route \"all\" (spec.routes[0]) matches every request it would\n")
    );
    assert!(stdout.ends_with("1 valid policy\n"), "{stdout}");
}

#[test]
fn rejects_an_invalid_file_with_every_error_on_stderr() {
    let (code, stdout, stderr) = sluice_cp(&["validate", "policy/tests/invalid/many-errors.yaml"]);
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    assert!(stderr.contains(
        "policy/tests/invalid/many-errors.yaml:14:48: spec.routes[0].rateLimit.burst: must be at least 1, got 0\n"
    ));
    assert_eq!(stderr.lines().count(), 8, "{stderr}");
}

#[test]
fn rejects_hosts_claimed_across_two_paths() {
    let dir = std::env::temp_dir().join(format!("sluice-cp-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let other = dir.join("other.yaml");
    std::fs::write(
        &other,
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: other}\nspec:\n  hosts: [demo]\n",
    )
    .expect("write");
    let (code, _, stderr) = sluice_cp(&[
        "validate",
        "policies/demo.yaml",
        other.to_str().expect("utf-8 path"),
    ]);
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "other.yaml:5:11: spec.hosts[0]: host \"demo\" is already governed by policy \"demo\""
        ),
        "{stderr}"
    );
}

#[test]
fn missing_and_non_yaml_inputs_are_clear_errors() {
    let (code, _, stderr) = sluice_cp(&["validate", "no/such/dir"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("no/such/dir:0:0: cannot read policy path"),
        "{stderr}"
    );

    let (code, _, stderr) = sluice_cp(&["validate", "Cargo.toml"]);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("Cargo.toml:"), "{stderr}");
}
