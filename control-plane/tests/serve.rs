//! `sluice-cp serve` as a client sees it: versions pushed on subscribe, ACK/NACK in
//! status, the API locked behind TLS and a bearer token off loopback, and what the
//! real binary logs when it accepts a policy with warnings.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
use sluice_control_plane::api::{DiscoveryRequest, StatusRequest};
use sluice_control_plane::cli::{connect, Remote};
use sluice_control_plane::serve::{start, Running, ServeConfig, UsageError};
use tokio_stream::wrappers::ReceiverStream;

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec: {hosts: [shop]}\n";

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).expect("temp dir");
    std::fs::write(dir.join("policies/shop.yaml"), POLICY).expect("policy");
    dir
}

async fn serve(
    dir: &Path,
    config: impl FnOnce(&mut ServeConfig),
) -> anyhow::Result<(Running, tokio::sync::oneshot::Sender<()>)> {
    let mut c = ServeConfig {
        policies: Some(dir.join("policies")),
        listen: "127.0.0.1:0".parse()?,
        tls: None,
        cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
        token_file: None,
        kubernetes: None,
        token_review: None,
        operators: Vec::new(),
        telemetry: None,
        webhook: None,
    };
    config(&mut c);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(c, async {
        let _ = stopped.await;
    })
    .await?;
    Ok((running, stop))
}

#[tokio::test]
async fn a_subscriber_gets_the_current_snapshot_and_its_nack_shows_in_status() {
    let dir = temp("nack");
    let (running, stop) = serve(&dir, |_| {}).await.expect("serve");
    let mut client = PolicyDiscoveryClient::connect(format!("http://{}", running.addr))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node_id: "fake-proxy".into(),
        namespace: "shop".into(),
        ..Default::default()
    })
    .await
    .expect("subscribe");
    let mut stream = client
        .stream_policies(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("message")
        .expect("a snapshot at once");
    assert_eq!(first.version, 1);
    assert!(first.policies_yaml.contains("name: shop"));
    tx.send(DiscoveryRequest {
        node_id: "fake-proxy".into(),
        version: 0,
        response_nonce: first.nonce.clone(),
        error: "proxy.yaml:3:7: spec.routes[0]: cannot apply".into(),
        ..Default::default()
    })
    .await
    .expect("nack");
    let deadline = Instant::now() + Duration::from_secs(3);
    let proxy = loop {
        let status = client
            .get_status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if let Some(p) = status
            .proxies
            .into_iter()
            .find(|p| !p.last_nack_error.is_empty())
        {
            break p;
        }
        assert!(Instant::now() < deadline, "the NACK never showed in status");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(proxy.node_id, "fake-proxy");
    assert_eq!((proxy.last_nack_version, proxy.acked_version), (1, 0));
    assert_eq!(
        proxy.last_nack_error,
        "proxy.yaml:3:7: spec.routes[0]: cannot apply"
    );
    assert!(proxy.connected);
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn off_loopback_the_api_requires_tls_and_the_right_token() {
    let dir = temp("auth");
    let everywhere = "0.0.0.0:0".parse().expect("addr");
    let refused = serve(&dir, |c| c.listen = everywhere)
        .await
        .err()
        .expect("refuses to start");
    assert_eq!(
        refused.downcast_ref::<UsageError>(),
        Some(&UsageError::Unprotected {
            listen: everywhere,
            missing: vec!["--tls-cert", "--tls-key", "--token-review or --token-file"],
        }),
        "{refused}"
    );

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_path, key_path, token_path) =
        (dir.join("tls.crt"), dir.join("tls.key"), dir.join("token"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("key");
    std::fs::write(&token_path, "s3cret-token\n").expect("token");
    let (running, stop) = serve(&dir, |c| {
        c.listen = everywhere;
        c.tls = Some((cert_path.clone(), key_path.clone()));
        c.token_file = Some(token_path.clone());
    })
    .await
    .expect("serves with TLS and a token");
    let server = format!("https://localhost:{}", running.addr.port());
    let remote = |token: Option<&str>| {
        if let Some(t) = token {
            std::fs::write(dir.join("client-token"), t).expect("client token");
        }
        Remote {
            server: server.clone(),
            token_file: token.map(|_| dir.join("client-token")),
            ca_file: Some(cert_path.clone()),
        }
    };
    let code =
        |r: Result<tonic::Response<_>, tonic::Status>| r.err().map(|s: tonic::Status| s.code());

    let mut anonymous = connect(&remote(None)).await.expect("TLS connect");
    assert_eq!(
        code(anonymous.get_status(StatusRequest {}).await),
        Some(tonic::Code::Unauthenticated)
    );
    let mut wrong = connect(&remote(Some("guess"))).await.expect("TLS connect");
    assert_eq!(
        code(wrong.get_status(StatusRequest {}).await),
        Some(tonic::Code::Unauthenticated)
    );
    let mut right = connect(&remote(Some("s3cret-token")))
        .await
        .expect("TLS connect");
    let status = right
        .get_status(StatusRequest {})
        .await
        .expect("authorized")
        .into_inner();
    assert_eq!(status.served_version, 1);

    // Plain HTTP to the TLS listener gets nowhere.
    let plain = Remote {
        server: format!("http://127.0.0.1:{}", running.addr.port()),
        token_file: None,
        ca_file: None,
    };
    match connect(&plain).await {
        Err(_) => {}
        Ok(mut c) => assert!(c.get_status(StatusRequest {}).await.is_err()),
    }
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn a_renewed_api_certificate_serves_the_next_connections() {
    let dir = temp("rotate");
    let old = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let new = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (old_ca, new_ca) = (dir.join("old-ca.pem"), dir.join("new-ca.pem"));
    std::fs::write(&cert_path, old.cert.pem()).expect("cert");
    std::fs::write(&key_path, old.signing_key.serialize_pem()).expect("key");
    std::fs::write(&old_ca, old.cert.pem()).expect("ca");
    std::fs::write(&new_ca, new.cert.pem()).expect("ca");
    let (running, stop) = serve(&dir, |c| {
        c.tls = Some((cert_path.clone(), key_path.clone()));
        c.cert_check_every = Duration::from_millis(50);
    })
    .await
    .expect("serves with TLS");
    let server = format!("https://localhost:{}", running.addr.port());
    // Whether a client trusting only `ca` gets an answer.
    let answers = |ca: &Path| {
        let remote = Remote {
            server: server.clone(),
            token_file: None,
            ca_file: Some(ca.to_path_buf()),
        };
        async move {
            match connect(&remote).await {
                Ok(mut client) => client.get_status(StatusRequest {}).await.is_ok(),
                Err(_) => false,
            }
        }
    };
    assert!(answers(&old_ca).await);
    assert!(!answers(&new_ca).await);

    // Renewed in place (key first, as a Secret volume update may land): the next
    // connections get the new certificate (bounded wait).
    std::fs::write(&key_path, new.signing_key.serialize_pem()).expect("key");
    std::fs::write(&cert_path, new.cert.pem()).expect("cert");
    let mut renewed = false;
    for _ in 0..100 {
        if answers(&new_ca).await {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(renewed, "the renewed certificate is served");
    assert!(!answers(&old_ca).await);
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn accepting_a_policy_with_a_route_that_can_never_match_logs_a_warning() {
    let dir = temp("warn");
    let policy = dir.join("policies/shop.yaml");
    std::fs::write(
        &policy,
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec:\n  hosts: [shop]\n  routes:\n    - name: all\n    - {name: orders, match: {pathPrefix: /orders, methods: [GET]}}\n",
    )
    .expect("policy");
    let stderr_path = dir.join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-cp"))
        .args(["serve", "--listen", "127.0.0.1:0", "--policies"])
        .arg(dir.join("policies"))
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("sluice-cp serve runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("policy accepted with warnings"))
        {
            break line.to_owned();
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no warning logged: {log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let line: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(line["level"], "warn");
    assert_eq!(line["version"], 1);
    let warning = format!(
        "{}:8:7: warning: spec.routes[1]: route \"orders\" can never match: route \"all\" (spec.routes[0]) matches every request it would",
        policy.display()
    );
    // Several warnings are one field, joined by "; ".
    assert_eq!(line["warnings"], serde_json::json!(warning));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
