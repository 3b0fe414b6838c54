//! `sluice-cp serve --telemetry` as the kubelet and Prometheus see it: `/live`,
//! `/ready` (503 with the reason until the source has been read, then 200) and
//! `/metrics`, each counter moving when its event happens: pushes, ACKs and NACKs
//! through the gRPC API, policy changes through the policies directory, token
//! reviews and watch restarts against the fake API server, admission reviews
//! through the webhook.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
use sluice_control_plane::api::PolicyRequest;
use sluice_control_plane::inject::InjectOptions;
use sluice_control_plane::serve::{start, Running, ServeConfig, WebhookConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_stream::wrappers::ReceiverStream;

const TIMEOUT: Duration = Duration::from_secs(10);
const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec: {hosts: [shop]}\n";
const CHANGED: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec: {hosts: [shop, shop.internal]}\n";
const INVALID: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\n";

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-telemetry-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).expect("temp dir");
    std::fs::write(dir.join("policies/shop.yaml"), POLICY).expect("policy");
    dir
}

/// A loopback control plane with telemetry, without a source unless `config` adds one.
async fn serve(
    config: impl FnOnce(&mut ServeConfig),
) -> (Running, tokio::sync::oneshot::Sender<()>) {
    let mut c = ServeConfig {
        policies: None,
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
        cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
        token_file: None,
        kubernetes: None,
        token_review: None,
        operators: Vec::new(),
        telemetry: Some("127.0.0.1:0".parse().expect("addr")),
        webhook: None,
        ca: None,
    };
    config(&mut c);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(c, async {
        let _ = stopped.await;
    })
    .await
    .expect("serve");
    (running, stop)
}

fn telemetry(running: &Running) -> SocketAddr {
    running.telemetry.expect("telemetry bound")
}

/// `GET path` on its own connection: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let head = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        let _ = tcp.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    };
    let response = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("answered in time");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (status, body.to_owned())
}

/// The value of `series` (its name and labels as exposed) in `/metrics`.
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

/// Waits (bounded) until `series` satisfies `check`.
async fn until(addr: SocketAddr, series: &str, check: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let value = metric(addr, series).await;
        if check(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn equals(addr: SocketAddr, series: &str, expected: f64) {
    until(addr, series, |v| v == expected).await;
}

/// Waits (bounded) until `/ready` answers `status`; returns the body.
async fn ready_is(addr: SocketAddr, status: u16) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (got, body) = get(addr, "/ready").await;
        if got == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/ready stayed {got}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn counts_pushes_acks_nacks_and_policy_changes_of_a_directory() {
    let dir = temp("dir");
    let (running, stop) = serve(|c| c.policies = Some(dir.join("policies"))).await;
    let addr = telemetry(&running);
    assert_eq!(get(addr, "/live").await, (200, "live\n".to_owned()));
    // The directory is read before anything serves.
    assert_eq!(get(addr, "/ready").await, (200, "ready\n".to_owned()));
    assert_eq!(get(addr, "/config_dump").await.0, 404);
    let (_, exposition) = get(addr, "/metrics").await;
    assert!(
        exposition.contains("process_cpu_seconds_total"),
        "{exposition}"
    );
    equals(addr, "sluice_cp_served_version", 1.0).await;
    equals(
        addr,
        "sluice_cp_policy_changes_total{result=\"accepted\"}",
        1.0,
    )
    .await;
    equals(addr, "sluice_cp_proxies_connected", 0.0).await;

    // A proxy subscribes to everything: the served policy is pushed.
    let mut client = PolicyDiscoveryClient::connect(format!("http://{}", running.addr))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = PolicyRequest {
        node_id: "proxy-1".into(),
        all: true,
        ..Default::default()
    };
    tx.send(hello.clone()).await.expect("subscribe");
    let mut stream = client
        .stream_policies(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.message().await.expect("message").expect("update");
    assert_eq!(first.policies.len(), 1);
    equals(addr, "sluice_cp_pushes_total", 1.0).await;
    equals(addr, "sluice_cp_proxies_connected", 1.0).await;
    tx.send(PolicyRequest {
        response_nonce: first.nonce,
        all: false,
        ..hello.clone()
    })
    .await
    .expect("ack");
    equals(addr, "sluice_cp_acks_total", 1.0).await;

    // A change is accepted and pushed; the proxy refuses it.
    std::fs::write(dir.join("policies/shop.yaml"), CHANGED).expect("change");
    let second = stream.message().await.expect("message").expect("update");
    assert_eq!(second.policies.len(), 1);
    assert_ne!(second.policies[0].version, first.policies[0].version);
    equals(addr, "sluice_cp_served_version", 2.0).await;
    equals(
        addr,
        "sluice_cp_policy_changes_total{result=\"accepted\"}",
        2.0,
    )
    .await;
    equals(addr, "sluice_cp_pushes_total", 2.0).await;
    tx.send(PolicyRequest {
        response_nonce: second.nonce,
        refused: [("shop".to_owned(), "shop.yaml:1:1: cannot apply".to_owned())].into(),
        all: false,
        ..hello
    })
    .await
    .expect("nack");
    equals(addr, "sluice_cp_nacks_total", 1.0).await;
    equals(addr, "sluice_cp_acks_total", 1.0).await;

    // An invalid change is refused; the served version stays.
    std::fs::write(dir.join("policies/shop.yaml"), INVALID).expect("break");
    equals(
        addr,
        "sluice_cp_policy_changes_total{result=\"rejected\"}",
        1.0,
    )
    .await;
    equals(addr, "sluice_cp_served_version", 2.0).await;

    // The proxy hangs up.
    drop((tx, stream));
    equals(addr, "sluice_cp_proxies_connected", 0.0).await;
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Subscribes as `node` in `namespace` with `token`: the call's outcome.
async fn subscribe(
    running: &Running,
    token: &str,
    node: &str,
    namespace: &str,
) -> Result<(), tonic::Status> {
    let mut client = PolicyDiscoveryClient::connect(format!("http://{}", running.addr))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(PolicyRequest {
        node_id: node.into(),
        namespace: namespace.into(),
        ..Default::default()
    })
    .await
    .expect("subscribe");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let response = client.stream_policies(request).await.map(|_| ());
    drop(tx);
    response
}

#[tokio::test]
async fn ready_waits_for_the_first_list_and_restarts_and_token_reviews_are_counted() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_policy("shop", "shop", serde_json::json!({"hosts": ["shop"]}));
    fake.add_token("good", "sluice", "shop", "reviews", "reviews-1");
    fake.add_token(
        "for-the-api",
        "https://kubernetes.default.svc",
        "shop",
        "reviews",
        "reviews-1",
    );
    // The API server fails every list until told otherwise.
    *fake.failing_policy_requests.lock().expect("lock") = usize::MAX;
    let (url, _) = fake.start().await;
    let (running, stop) = serve(|c| {
        c.kubernetes = Some(kube::Config::new(url.parse().expect("url")));
        c.token_review = Some("sluice".into());
    })
    .await;
    let addr = telemetry(&running);

    let (status, why) = get(addr, "/ready").await;
    assert_eq!(status, 503, "{why}");
    assert!(
        why.starts_with("not ready: the TrafficPolicy resources have not been listed yet"),
        "{why}"
    );
    assert_eq!(get(addr, "/live").await.0, 200);
    until(addr, "sluice_cp_watch_restarts_total", |v| v >= 1.0).await;
    let why = ready_is(addr, 503).await;
    assert!(why.contains("(last attempt: "), "{why}");
    equals(addr, "sluice_cp_served_version", 0.0).await;

    // The API server recovers: the retried list completes.
    *fake.failing_policy_requests.lock().expect("lock") = 0;
    assert_eq!(ready_is(addr, 200).await, "ready\n");
    equals(addr, "sluice_cp_served_version", 1.0).await;

    subscribe(&running, "good", "reviews-1", "shop")
        .await
        .expect("subscribed");
    equals(
        addr,
        "sluice_cp_token_reviews_total{result=\"authenticated\"}",
        1.0,
    )
    .await;
    assert!(subscribe(&running, "for-the-api", "reviews-1", "shop")
        .await
        .is_err());
    equals(
        addr,
        "sluice_cp_token_reviews_total{result=\"refused\"}",
        1.0,
    )
    .await;
    *fake.forbid_reviews.lock().expect("lock") = true;
    assert!(subscribe(&running, "unknown", "reviews-1", "shop")
        .await
        .is_err());
    equals(addr, "sluice_cp_token_reviews_total{result=\"error\"}", 1.0).await;
    let _ = stop.send(());
}

/// A TLS client trusting only `cert`.
fn connector_trusting(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("trust");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// POSTs `tests/webhook/NAME.json` to the webhook's `/inject`.
async fn admit(connector: &tokio_rustls::TlsConnector, addr: SocketAddr, name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/webhook/{name}.json"));
    let body = std::fs::read(&path).expect("fixture");
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let server = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = connector.connect(server, tcp).await.expect("TLS handshake");
        let head = format!(
            "POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.expect("write head");
        tls.write_all(&body).await.expect("write body");
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        response
    };
    let response = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("answered in time");
    assert!(response.starts_with(b"HTTP/1.1 "), "{name}: no answer");
}

#[tokio::test]
async fn the_webhook_makes_ready_and_counts_each_review_by_outcome() {
    let dir = temp("webhook");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("key");
    let (running, stop) = serve(|c| {
        c.policies = Some(dir.join("policies"));
        c.webhook = Some(WebhookConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert: cert_path,
            key: key_path,
            inject: InjectOptions {
                ca_pem: Some(
                    "-----BEGIN CERTIFICATE-----\nTEST-CA\n-----END CERTIFICATE-----\n".into(),
                ),
                ..InjectOptions::default()
            },
        });
    })
    .await;
    let addr = telemetry(&running);
    let webhook = running.webhook.expect("webhook bound");
    assert_eq!(ready_is(addr, 200).await, "ready\n");
    let connector = connector_trusting(&cert);
    for (fixture, outcome) in [
        ("patched", "patched"),
        ("opt-out", "unchanged"),
        ("bad-annotation", "refused"),
        ("malformed-not-json", "error"),
    ] {
        admit(&connector, webhook, fixture).await;
        let series = format!("sluice_cp_webhook_reviews_total{{outcome=\"{outcome}\"}}");
        equals(addr, &series, 1.0).await;
    }
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn the_binary_serves_telemetry_where_told() {
    let dir = temp("binary");
    let stderr_path = dir.join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-cp"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--telemetry",
            "127.0.0.1:0",
            "--policies",
        ])
        .arg(dir.join("policies"))
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("sluice-cp serve runs");
    // The address bound, from the log line announcing it.
    let deadline = Instant::now() + TIMEOUT;
    let addr: SocketAddr = loop {
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let listen = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["msg"] == "telemetry serving /live, /ready and /metrics")
            .and_then(|l| l["listen"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = listen {
            break addr;
        }
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no telemetry line: {log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (ready, served) = runtime.block_on(async {
        (
            get(addr, "/ready").await,
            metric(addr, "sluice_cp_served_version").await,
        )
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready, (200, "ready\n".to_owned()));
    assert_eq!(served, 1.0);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
