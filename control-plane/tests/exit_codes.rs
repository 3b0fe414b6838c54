//! `sluice-cp`'s exit codes as the README documents them: 0 for `--help` and
//! `--version`, 64 for usage errors (with a message naming what to change), 1 for
//! failures while running.

use std::process::Command;

/// Runs `sluice-cp ARGS`; returns the exit code, stdout and stderr.
fn sluice_cp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-cp"))
        .args(args)
        .output()
        .expect("sluice-cp runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version_print_to_stdout_and_exit_0() {
    let (code, stdout, stderr) = sluice_cp(&["--help"]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert!(stdout.contains("Usage: sluice-cp"), "{stdout}");
    let (code, stdout, _) = sluice_cp(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("--listen"), "{stdout}");
    let (code, stdout, _) = sluice_cp(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("sluice-cp "), "{stdout}");
}

#[test]
fn an_unknown_flag_exits_64_naming_it() {
    let (code, stdout, stderr) = sluice_cp(&["serve", "--bogus"]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.contains("unexpected argument '--bogus'"), "{stderr}");
}

#[test]
fn a_missing_subcommand_exits_64() {
    let (code, _, stderr) = sluice_cp(&[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("Usage: sluice-cp"), "{stderr}");
}

#[test]
fn a_bad_flag_value_exits_64_naming_the_flag() {
    let (code, _, stderr) = sluice_cp(&["status", "--output", "yaml"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("invalid value 'yaml' for '--output <OUTPUT>'"),
        "{stderr}"
    );
    let (code, _, stderr) = sluice_cp(&["serve", "--listen", "everywhere"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("'--listen <LISTEN>'"), "{stderr}");
}

#[test]
fn two_policy_sources_exit_64_naming_both() {
    // The arguments k8s/base shipped with (issue 16).
    let (code, _, stderr) = sluice_cp(&["serve", "--policies", "/tmp", "--kubernetes"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("'--kubernetes' cannot be used with '--policies <POLICIES>'")
            || stderr.contains("'--policies <POLICIES>' cannot be used with '--kubernetes'"),
        "{stderr}"
    );
}

#[test]
fn a_webhook_without_its_certificate_exits_64() {
    let (code, _, stderr) = sluice_cp(&["webhook", "--tls-key", "/tmp/key.pem"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--tls-cert"), "{stderr}");
}

#[test]
fn an_unprotected_listener_off_loopback_exits_64_naming_the_missing_flags() {
    let (code, _, stderr) = sluice_cp(&[
        "serve",
        "--policies",
        "/nonexistent",
        "--listen",
        "0.0.0.0:0",
        "--token-file",
        "/nonexistent/token",
    ]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        stderr,
        "sluice-cp: --listen 0.0.0.0:0 is not a loopback address: it needs --tls-cert, \
         --tls-key and a way to check callers (--token-review in Kubernetes, --token-file \
         elsewhere); add --tls-cert, --tls-key, or listen on 127.0.0.1:0\n"
    );
}

#[test]
fn an_unreadable_file_is_a_runtime_failure_exiting_1() {
    let (code, _, stderr) = sluice_cp(&[
        "serve",
        "--policies",
        "/nonexistent",
        "--listen",
        "0.0.0.0:0",
        "--tls-cert",
        "/nonexistent/tls.crt",
        "--tls-key",
        "/nonexistent/tls.key",
        "--token-file",
        "/nonexistent/token",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--token-file /nonexistent/token"),
        "{stderr}"
    );
}

#[test]
fn serve_with_a_webhook_whose_certificate_cannot_be_read_exits_1_naming_it() {
    let (code, _, stderr) = sluice_cp(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--webhook",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/tls.crt",
        "--tls-key",
        "/nonexistent/tls.key",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot load TLS certificate from /nonexistent/tls.crt"),
        "{stderr}"
    );
}

#[test]
fn serve_exits_1_when_its_webhook_cannot_listen_instead_of_running_without_it() {
    let dir = std::env::temp_dir().join(format!("sluice-exit-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&crt, cert.cert.pem()).expect("cert");
    std::fs::write(&key, cert.signing_key.serialize_pem()).expect("key");
    // The webhook's port is taken (by this test, for as long as sluice-cp runs).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").to_string();
    let (code, _, stderr) = sluice_cp(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--webhook",
        &port,
        "--tls-cert",
        &crt.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
    ]);
    drop(taken);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("--webhook {port}: cannot listen on {port}")),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn static_token_identities_in_a_cluster_exit_64() {
    let (code, _, stderr) = sluice_cp(&[
        "serve",
        "--kubernetes",
        "--token-review",
        "--token-file",
        "t",
        "--ca-cert",
        "c",
        "--ca-key",
        "k",
        "--static-token-identities",
    ]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("--static-token-identities cannot be used with --token-review"),
        "{stderr}"
    );
}
