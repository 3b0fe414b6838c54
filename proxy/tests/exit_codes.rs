//! The exit codes the README documents, for `sluice-proxy`: 0 for `--help` and
//! `--version`, 64 for usage errors with a message naming the flag to change (the
//! demo binaries' are checked in `demo/tests/exit_codes.rs`).

use std::process::Command;

/// Runs `bin ARGS`; returns the exit code, stdout and stderr.
fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const PROXY: &str = env!("CARGO_BIN_EXE_sluice-proxy");

#[test]
fn help_and_version_print_to_stdout_and_exit_0() {
    let (code, stdout, stderr) = run(PROXY, &["--help"]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert!(stdout.contains("Usage: sluice-proxy"), "{stdout}");
    let (code, stdout, _) = run(PROXY, &["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("sluice-proxy "), "{stdout}");
}

#[test]
fn an_unknown_flag_exits_64_naming_it() {
    let (code, stdout, stderr) = run(PROXY, &["--policy", "p.yaml", "--bogus"]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.contains("unexpected argument '--bogus'"), "{stderr}");
}

#[test]
fn a_missing_source_exits_64_naming_the_flags() {
    let (code, _, stderr) = run(PROXY, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--policy <POLICY>"), "{stderr}");
}

#[test]
fn a_bad_flag_value_exits_64_naming_the_flag() {
    let (code, _, stderr) = run(PROXY, &["--policy", "p.yaml", "--drain-timeout", "soon"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("invalid value 'soon' for '--drain-timeout <DRAIN_TIMEOUT>'"),
        "{stderr}"
    );
}

#[test]
fn a_log_level_that_does_not_parse_exits_64_naming_the_flag() {
    let (code, _, stderr) = run(
        PROXY,
        &["--policy", "p.yaml", "--log-level", "info,h2=loud"],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("'--log-level <FILTER>'"), "{stderr}");
}

#[test]
fn an_inbound_listener_without_an_app_exits_64_before_binding() {
    // The listen address is taken: only a check made before binding names --app.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let (code, _, stderr) = run(
        PROXY,
        &[
            "--policy",
            "p.yaml",
            "--inbound",
            &taken,
            "--listen",
            &taken,
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--inbound needs --app"), "{stderr}");
}

#[test]
fn certificates_over_plaintext_from_a_remote_control_plane_exit_64() {
    let (code, _, stderr) = run(
        PROXY,
        &[
            "--control-plane",
            "http://10.0.0.1:15010",
            "--identity-from-control-plane",
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("--identity-from-control-plane needs an https://"),
        "{stderr}"
    );
}

#[test]
fn identity_files_that_do_not_load_exit_64_naming_the_flag() {
    let dir = std::env::temp_dir().join(format!("sluice-exit-identity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    let junk = junk.display().to_string();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  routes:\n    - name: all\n",
    )
    .expect("write");
    let policy = policy.display().to_string();
    let (code, _, stderr) = run(
        PROXY,
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--policy",
            &policy,
            "--identity-cert",
            &junk,
            "--identity-key",
            &junk,
            "--trust-roots",
            &junk,
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--identity-cert"), "{stderr}");
}
