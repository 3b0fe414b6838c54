//! `sluice-cp status`, `diff`, `history` and `rollback` as an operator runs them,
//! against a server started in this test.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_control_plane::serve::{start, ServeConfig};

fn policy(burst: u32) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shop}}\nspec:\n  hosts: [shop]\n  routes:\n    - name: orders\n      rateLimit: {{requestsPerSecond: 10, burst: {burst}}}\n"
    )
}

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

fn temp() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-cli-remote-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).expect("temp dir");
    dir
}

fn write(dir: &Path, text: &str) {
    let tmp = dir.join("policies/.shop.yaml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(tmp, dir.join("policies/shop.yaml")).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_diff_history_and_rollback_work_against_a_server() {
    let dir = temp();
    write(&dir, &policy(5));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig {
        policies: Some(dir.join("policies")),
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
        cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
        token_file: None,
        kubernetes: None,
        token_review: None,
        operators: Vec::new(),
        telemetry: None,
        webhook: None,
        ca: None,
    };
    let running = start(config, async {
        let _ = stopped.await;
    })
    .await
    .expect("serve");
    let server = format!("http://{}", running.addr);
    let store = std::sync::Arc::clone(&running.store);

    // A second version, then the CLI looks at it (the blocking CLI runs off the runtime).
    write(&dir, &policy(9));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.current().map(|c| c.version) != Some(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the edit was not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            sluice_cp(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let (code, out, err) = run(vec!["status".into(), "--server".into(), server.clone()])
        .await
        .expect("status");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("serving version 2 ("), "{out}");

    let (code, out, _) = run(vec![
        "status".into(),
        "--server".into(),
        server.clone(),
        "--output".into(),
        "json".into(),
    ])
    .await
    .expect("status json");
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).expect("json status");
    assert_eq!(json["served_version"], 2);

    let proposal = dir.join("proposal.yaml");
    std::fs::write(&proposal, policy(20)).expect("proposal");
    let (code, out, err) = run(vec![
        "diff".into(),
        proposal.display().to_string(),
        "--server".into(),
        server.clone(),
    ])
    .await
    .expect("diff");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "policy shop: route orders: rate limit: 10/s (burst 9) -> 10/s (burst 20)\n"
    );

    let (code, out, _) = run(vec!["history".into(), "--server".into(), server.clone()])
        .await
        .expect("history");
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");

    let (code, out, err) = run(vec!["rollback".into(), "--server".into(), server.clone()])
        .await
        .expect("rollback");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "now serving version 3 (rollback to version 1)\n");
    let (_, out, _) = run(vec!["status".into(), "--server".into(), server.clone()])
        .await
        .expect("status");
    assert!(out.contains("[rollback]"), "{out}");

    let (code, _, err) = run(vec![
        "rollback".into(),
        "--to".into(),
        "99".into(),
        "--server".into(),
        server,
    ])
    .await
    .expect("rollback");
    assert_eq!(code, 1);
    assert!(
        err.contains("version 99 is not in the last 20 versions"),
        "{err}"
    );

    let (code, _, err) = run(vec![
        "status".into(),
        "--server".into(),
        "http://127.0.0.1:1".into(),
    ])
    .await
    .expect("unreachable");
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the control plane"), "{err}");
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
