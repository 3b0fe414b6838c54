//! The admission webhook over real HTTPS on 127.0.0.1, with a certificate made by the
//! test and a rustls client that trusts only it.
//!
//! Every `tests/webhook/NAME.json` is POSTed to `/inject`; the HTTP status and the
//! AdmissionReview that come back, with the base64 patch decoded for reading, must
//! equal `tests/webhook/NAME.expected.json` (`BLESS=1` rewrites them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use sluice_control_plane::inject::{inject_documents, InjectOptions};
use sluice_control_plane::webhook::{answer, Outcome, WebhookServer, MAX_BODY_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Harness {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

fn opts() -> InjectOptions {
    InjectOptions {
        image: "ghcr.io/sluice/sluice:test".into(),
        control_plane: "https://sluice-control-plane.sluice-system.svc:15010".into(),
        ca_pem: Some("-----BEGIN CERTIFICATE-----\nTEST-CA\n-----END CERTIFICATE-----\n".into()),
        otlp_endpoint: None,
        trace_sample_ratio: None,
    }
}

impl Harness {
    async fn start(name: &str) -> Self {
        Self::start_checking(name, sluice_control_plane::tls::CERT_CHECK_EVERY).await
    }

    /// A webhook whose certificate files (`dir/tls.crt`, `dir/tls.key`) are
    /// checked for a renewed pair every `cert_check_every`.
    async fn start_checking(name: &str, cert_check_every: Duration) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sluice-webhook-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");

        let server = WebhookServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            &cert_path,
            &key_path,
            opts(),
        )
        .await
        .expect("webhook binds")
        .cert_check_every(cert_check_every);
        let addr = server.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));

        let connector = connector_trusting(&cert);
        Self {
            addr,
            connector,
            stop: Some(stop),
            server,
            dir,
        }
    }

    /// One request on its own connection; returns the status code and the body.
    async fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let exchange = async {
            let tcp = TcpStream::connect(self.addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = self
                .connector
                .connect(name, tcp)
                .await
                .expect("TLS handshake");
            let head = format!(
                "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            tls.write_all(head.as_bytes()).await.expect("write head");
            // The server may answer (413) before reading all of a large body.
            let _ = tls.write_all(body).await;
            let mut response = Vec::new();
            let _ = tls.read_to_end(&mut response).await;
            response
        };
        let response = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .expect("answered in time");
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&response)));
        let head = String::from_utf8_lossy(&response[..split]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head}"));
        (status, response[split + 4..].to_vec())
    }

    async fn review(&self, body: &[u8]) -> (u16, Value) {
        let (status, body) = self.request("POST", "/inject", body).await;
        let review = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
        (status, review)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TIMEOUT, &mut self.server)
            .await
            .expect("server stops")
            .expect("server task ends cleanly");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhook");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("tests/webhook exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.to_str()
                .is_some_and(|s| s.ends_with(".json") && !s.ends_with(".expected.json"))
        })
        .collect();
    files.sort();
    files
}

/// The review with its patch decoded, for golden files people can read.
fn readable(status: u16, mut review: Value) -> Value {
    if let Some(patch) = review["response"]["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("patch is base64");
        review["response"]["patch"] = serde_json::from_slice(&bytes).expect("patch is JSON");
    }
    serde_json::json!({"status": status, "review": review})
}

#[tokio::test]
async fn every_admission_review_fixture_gets_its_expected_answer() {
    let harness = Harness::start("fixtures").await;
    let files = fixtures();
    assert!(files.len() >= 10);
    let mut mismatches = Vec::new();
    for file in files {
        let body = std::fs::read(&file).expect("fixture");
        let (status, review) = harness.review(&body).await;
        let got = readable(status, review);
        let expected_file = PathBuf::from(
            file.to_str()
                .expect("utf-8")
                .replace(".json", ".expected.json"),
        );
        let pretty = serde_json::to_string_pretty(&got).expect("json") + "\n";
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&expected_file, &pretty).expect("write expected");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_file)
            .unwrap_or_else(|_| panic!("missing {}", expected_file.display()));
        if pretty != expected {
            mismatches.push(format!("{}:\n{pretty}", expected_file.display()));
        }
    }
    harness.stop().await;
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// What `sluice_cp_webhook_reviews_total{outcome}` counts for each fixture: a pod
/// let through without its sidecar must never count as `patched`.
#[test]
fn every_fixture_counts_as_its_outcome() {
    let expected = |name: &str| match name {
        "patched" | "patched-annotated" | "patched-traced" => Outcome::Patched,
        "already-injected" | "opt-out" | "not-a-pod" | "update" => Outcome::Unchanged,
        "bad-annotation" | "bad-trace-annotation" => Outcome::Refused,
        "invalid-pod" | "malformed-no-request" | "malformed-not-json" | "malformed-wrong-kind" => {
            Outcome::Error
        }
        other => panic!("new fixture {other}: add its outcome here"),
    };
    for file in fixtures() {
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name");
        let (_, _, outcome) = answer(&std::fs::read(&file).expect("fixture"), &opts());
        assert_eq!(outcome, expected(name), "{name}");
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/webhook/{name}.json")))
        .expect("fixture")
}

#[tokio::test]
async fn the_webhook_patch_gives_the_same_pod_as_the_cli() {
    let harness = Harness::start("same").await;
    let request: Value = serde_json::from_slice(&fixture("patched")).expect("json");
    let (status, review) = harness.review(&fixture("patched")).await;
    harness.stop().await;
    assert_eq!(status, 200);
    assert_eq!(review["response"]["uid"], "0001");
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");

    let mut pod = request["request"]["object"].clone();
    let patch = readable(status, review)["review"]["response"]["patch"].clone();
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("a JSON Patch");
    json_patch::patch(&mut pod, &patch).expect("the patch applies");

    let yaml = serde_json::to_string(&request["request"]["object"]).expect("json");
    let by_cli = inject_documents(&yaml, &opts()).expect("inject");
    let by_cli: Value = serde_saphyr::from_str(&by_cli).expect("yaml");
    assert_eq!(pod, by_cli);
}

#[tokio::test]
async fn malformed_requests_get_errors_and_the_server_keeps_serving() {
    let harness = Harness::start("malformed").await;
    let (status, review) = harness.review(b"{\"apiVersion\": ").await;
    assert_eq!(status, 400);
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["allowed"], false);

    let huge = vec![b' '; MAX_BODY_BYTES + 1];
    let (status, review) = harness.review(&huge).await;
    assert_eq!(status, 413);
    assert_eq!(review["response"]["status"]["code"], 413);

    let (status, _) = harness.request("GET", "/inject", b"").await;
    assert_eq!(status, 405);
    let (status, _) = harness.request("POST", "/elsewhere", b"{}").await;
    assert_eq!(status, 404);
    let (status, body) = harness.request("GET", "/healthz", b"").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));

    // A client that speaks no TLS at all is dropped without harm.
    let mut plain = TcpStream::connect(harness.addr).await.expect("connect");
    let _ = plain.write_all(b"POST /inject HTTP/1.1\r\n\r\n").await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, plain.read_to_end(&mut sink)).await;

    let (status, review) = harness.review(&fixture("patched")).await;
    assert_eq!(
        (status, &review["response"]["allowed"]),
        (200, &Value::Bool(true))
    );
    harness.stop().await;
}

#[tokio::test]
async fn refuses_to_start_without_a_usable_certificate() {
    let dir = std::env::temp_dir().join(format!("sluice-webhook-nocert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let addr = "127.0.0.1:0".parse().expect("addr");
    let err = WebhookServer::bind(addr, &empty, &empty, opts())
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .starts_with("cannot load TLS certificate from"),
        "{err}"
    );
    let missing = dir.join("missing.pem");
    let err = WebhookServer::bind(addr, &missing, &missing, opts())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that trusts only `cert`.
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

/// Whether a TLS handshake with the webhook succeeds for `connector`.
async fn handshakes(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        connector.connect(name, tcp).await.is_ok()
    };
    tokio::time::timeout(TIMEOUT, attempt)
        .await
        .expect("handshake ends in time")
}

#[tokio::test]
async fn a_rotated_certificate_serves_the_next_handshakes() {
    let harness = Harness::start_checking("rotate", Duration::from_millis(50)).await;
    let new = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (trusts_old, trusts_new) = (&harness.connector, connector_trusting(&new));
    assert!(handshakes(harness.addr, trusts_old).await);
    assert!(!handshakes(harness.addr, &trusts_new).await);

    // Rotated in place, as a Secret volume or cert-manager does (bounded wait).
    let (cert_path, key_path) = (harness.dir.join("tls.crt"), harness.dir.join("tls.key"));
    std::fs::write(&key_path, new.signing_key.serialize_pem()).expect("write key");
    std::fs::write(&cert_path, new.cert.pem()).expect("write cert");
    let mut rotated = false;
    for _ in 0..100 {
        if handshakes(harness.addr, &trusts_new).await {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the new certificate is served");
    assert!(!handshakes(harness.addr, trusts_old).await);
    harness.stop().await;
}
