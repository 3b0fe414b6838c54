//! The operational log on stderr as a log pipeline reads it: every line one JSON
//! object with `ts` (RFC 3339 UTC, milliseconds), `level`, `target` and `msg`, and
//! `--log-level` deciding which lines are written.

mod support;

use std::time::Duration;

use support::{replace, start, start_with, upstream, HttpClient, TempDir};

fn policy(backend: std::net::SocketAddr) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shop}}\n\
         spec:\n  hosts: [shop]\n  backends: [{{address: \"{backend}\"}}]\n  routes: [{{name: all}}]\n"
    )
}

/// Every line of `stderr` as JSON, each checked for the keys every line has.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
            let ts = v["ts"].as_str().unwrap_or_else(|| panic!("no ts: {line}"));
            // 2026-11-18T11:06:40.123Z
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

#[tokio::test]
async fn every_stderr_line_is_json_with_ts_level_target_and_msg() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start(&dir, &policy(a.addr())).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let ok = client
        .request("GET", "shop", "/", &[], b"")
        .await
        .expect("request");
    assert_eq!(ok.status, 200);
    proxy.sigterm();
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits");
    assert!(status.success(), "{status:?}");

    let lines = json_lines(&proxy.stderr());
    let applied = lines
        .iter()
        .find(|l| l["msg"] == "policy applied")
        .unwrap_or_else(|| panic!("no policy applied line: {lines:?}"));
    assert_eq!(applied["level"], "info");
    assert_eq!(applied["target"], "sluice_proxy::source");
    assert_eq!(applied["policies"], 1);
    // One line per listener, with the address it got (the test gave port 0).
    let listening = |name: &str| {
        lines
            .iter()
            .find(|l| l["msg"] == "listening" && l["listener"] == name)
            .unwrap_or_else(|| panic!("no listening line for {name}: {lines:?}"))
    };
    assert_eq!(listening("listen")["addr"], proxy.listen_addr().to_string());
    assert_eq!(listening("admin")["addr"], proxy.admin_addr().to_string());
    assert!(lines.iter().any(|l| l["msg"] == "drained, exiting"));
}

#[tokio::test]
async fn log_level_warn_writes_warnings_and_errors_only() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start_with(&dir, &policy(a.addr()), &["--log-level", "warn"]).await;
    replace(
        &dir,
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\n",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !proxy.stderr().contains("policy rejected") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rejection logged: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.sigterm();
    proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits");

    let lines = json_lines(&proxy.stderr());
    assert!(lines
        .iter()
        .any(|l| l["msg"] == "policy rejected" && l["level"] == "error"));
    let info: Vec<_> = lines.iter().filter(|l| l["level"] == "info").collect();
    assert!(
        info.is_empty(),
        "info lines under --log-level warn: {info:?}"
    );
}
