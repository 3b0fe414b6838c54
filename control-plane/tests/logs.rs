//! `sluice-cp serve`'s operational log as a log pipeline reads it: every stderr line
//! one JSON object with `ts` (RFC 3339 UTC, milliseconds), `level`, `target` and
//! `msg`, the same shape as the proxy's; `--log-level`, else `$RUST_LOG`, decides
//! which lines are written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VALID: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec: {hosts: [shop]}\n";
const INVALID: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\n";

/// A scratch directory with `policies/shop.yaml` holding `policy`.
fn scratch(name: &str, policy: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-logs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).expect("temp dir");
    std::fs::write(dir.join("policies/shop.yaml"), policy).expect("policy");
    dir
}

/// `sluice-cp serve --policies DIR/policies --listen 127.0.0.1:0 ARGS` with
/// `RUST_LOG` as given (unset for `None`), stderr to `DIR/stderr.log`.
fn serve(dir: &Path, args: &[&str], rust_log: Option<&str>) -> Child {
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-cp"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--policies"])
        .arg(dir.join("policies"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    command.spawn().expect("sluice-cp runs")
}

/// Waits (at most 10 s) for `needle` on stderr, then stops the server with SIGTERM
/// and returns everything it wrote to stderr.
fn stop_after(mut child: Child, dir: &Path, needle: &str) -> String {
    let read = || std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read().contains(needle) {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("no {needle:?} on stderr:\n{}", read());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = child.wait().expect("exits");
    assert!(status.success(), "{status:?}: {}", read());
    read()
}

/// Every line as JSON, each checked for the keys every line has.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
            let ts = v["ts"].as_str().unwrap_or_else(|| panic!("no ts: {line}"));
            assert!(
                ts.len() == 24 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
                "ts is not RFC 3339 with milliseconds: {line}"
            );
            for key in ["level", "target", "msg"] {
                assert!(v[key].is_string(), "no {key}: {line}");
            }
            v
        })
        .collect()
}

#[test]
fn every_stderr_line_is_json_with_ts_level_target_and_msg() {
    let dir = scratch("shape", VALID);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).expect("cert");
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).expect("key");
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let child = serve(
        &dir,
        &[
            "--webhook",
            "127.0.0.1:0",
            "--tls-cert",
            &crt.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
        ],
        None,
    );
    let stderr = stop_after(child, &dir, "webhook serving");
    let lines = json_lines(&stderr);
    let msgs: Vec<&str> = lines.iter().filter_map(|l| l["msg"].as_str()).collect();
    for expected in [
        "policy accepted",
        "serving",
        "webhook serving",
        "shutting down",
    ] {
        assert!(msgs.contains(&expected), "no {expected:?} in {msgs:?}");
    }
    let accepted = &lines[msgs
        .iter()
        .position(|m| *m == "policy accepted")
        .unwrap_or(0)];
    assert_eq!(accepted["level"], "info");
    assert_eq!(accepted["target"], "sluice_control_plane::serve");
    assert_eq!(accepted["version"], 1);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn warn_from_the_flag_or_rust_log_writes_no_info_lines() {
    for (name, args, rust_log) in [
        ("flag", &["--log-level", "warn"][..], Some("info")),
        ("env", &[][..], Some("warn")),
    ] {
        let dir = scratch(name, INVALID);
        let child = serve(&dir, args, rust_log);
        let stderr = stop_after(child, &dir, "policy rejected");
        let lines = json_lines(&stderr);
        assert!(
            lines
                .iter()
                .all(|l| l["level"] == "warn" || l["level"] == "error"),
            "{name}: {stderr}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn a_log_level_that_does_not_parse_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-cp"))
        .args(["serve", "--log-level", "info,kube=verbose"])
        .output()
        .expect("sluice-cp runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("'--log-level <FILTER>'"), "{stderr}");
}
