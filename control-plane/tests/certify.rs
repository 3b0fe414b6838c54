//! `Identity.Certify` over a real server on loopback: a proxy's certificate names
//! the workload its token proves (TokenReview against the fake API server), never
//! what its CSR asks for; the static token gets one only with
//! `--static-token-identities`; a control plane without a CA says so.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fake_apiserver::FakeApiServer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use sluice_control_plane::api::identity_client::IdentityClient;
use sluice_control_plane::api::{CertifyRequest, CertifyResponse};
use sluice_control_plane::ca::{self, CaConfig};
use sluice_control_plane::serve::{start, Running, ServeConfig};

fn temp_dir(name: &str) -> PathBuf {
    let unique = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "sluice-certify-{name}-{}-{unique}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// A control plane with a fresh root CA in `dir` and the static token `cli-secret`;
/// following the fake cluster (TokenReview) when `fake` is given.
async fn control_plane(
    name: &str,
    fake: Option<&Arc<FakeApiServer>>,
    static_token_identities: bool,
    with_ca: bool,
) -> (Running, String, tokio::sync::oneshot::Sender<()>) {
    let dir = temp_dir(name);
    ca::init(&dir, "cluster.local").expect("ca init");
    let root = std::fs::read_to_string(dir.join("ca.crt")).expect("root");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "cli-secret\n").expect("token");
    let kubernetes = match fake {
        Some(fake) => {
            let (url, _) = fake.start().await;
            Some(kube::Config::new(url.parse().expect("url")))
        }
        None => None,
    };
    let config = ServeConfig {
        policies: None,
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
        cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
        token_file: Some(token_file),
        token_review: kubernetes.as_ref().map(|_| "sluice".to_owned()),
        kubernetes,
        operators: Vec::new(),
        telemetry: None,
        webhook: None,
        ca: with_ca.then(|| CaConfig {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
            trust_roots: None,
            trust_domain: "cluster.local".into(),
            ttl: Duration::from_secs(3600),
            static_token_identities,
        }),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(config, async {
        let _ = stopped.await;
    })
    .await
    .expect("serve");
    (running, root, stop)
}

/// A CSR for a fresh key that asks for `uri`.
fn csr(uri: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("uri"))];
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

async fn certify(
    running: &Running,
    token: &str,
    csr_pem: String,
) -> Result<CertifyResponse, tonic::Status> {
    let mut client = IdentityClient::connect(format!("http://{}", running.addr))
        .await
        .expect("connect");
    let mut request = tonic::Request::new(CertifyRequest { csr_pem });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    client
        .certify(request)
        .await
        .map(tonic::Response::into_inner)
}

fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("pem")
}

/// The leaf's URI SANs, after checking the chain against `root` as a client
/// certificate would be.
fn verified_uris(answer: &CertifyResponse, root: &str) -> Vec<String> {
    let chain = ders(&answer.cert_chain_pem);
    let mut roots = rustls::RootCertStore::empty();
    for r in ders(&answer.trust_roots_pem) {
        roots.add(r).expect("root");
    }
    assert_eq!(answer.trust_roots_pem, root);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .expect("chains to the root");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
    assert_eq!(leaf.validity().not_after.timestamp(), answer.not_after_unix);
    leaf.subject_alternative_name()
        .expect("san")
        .expect("has a san")
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect()
}

fn exposition(running: &Running) -> String {
    String::from_utf8(running.metrics.render().expect("render")).expect("utf-8")
}

#[tokio::test]
async fn a_proxy_gets_a_certificate_for_the_service_account_its_token_proves() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token("good", "sluice", "shop", "reviews", "reviews-7d4b9-x2kqz");
    let (running, root, _stop) = control_plane("review", Some(&fake), true, true).await;
    // It asks to be the cluster's admin: the token says otherwise.
    let answer = certify(
        &running,
        "good",
        csr("spiffe://cluster.local/ns/kube-system/sa/admin"),
    )
    .await
    .expect("issued");
    assert_eq!(answer.identity, "spiffe://cluster.local/ns/shop/sa/reviews");
    assert_eq!(
        verified_uris(&answer, &root),
        vec!["URI(spiffe://cluster.local/ns/shop/sa/reviews)"]
    );
    let left = answer.not_after_unix
        - SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("now")
            .as_secs() as i64;
    assert!(
        (3590..=3600).contains(&left),
        "an hour's certificate: {left}"
    );

    let forged = certify(
        &running,
        "forged",
        csr("spiffe://cluster.local/ns/shop/sa/x"),
    )
    .await
    .expect_err("refused");
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);
    let text = exposition(&running);
    assert!(
        text.contains("sluice_cp_certificate_requests_total{result=\"issued\"} 1"),
        "{text}"
    );
    assert!(text.contains("sluice_cp_certificate_requests_total{result=\"refused\"} 1"));
    assert!(!text.contains("sluice_cp_ca_not_after_timestamp_seconds 0"));
}

#[tokio::test]
async fn the_static_token_gets_the_csrs_identity_only_with_static_token_identities() {
    let (running, root, _stop) = control_plane("static-on", None, true, true).await;
    let answer = certify(
        &running,
        "cli-secret",
        csr("spiffe://cluster.local/ns/dev/sa/tester"),
    )
    .await
    .expect("issued");
    assert_eq!(
        verified_uris(&answer, &root),
        vec!["URI(spiffe://cluster.local/ns/dev/sa/tester)"]
    );
    let other_domain = certify(
        &running,
        "cli-secret",
        csr("spiffe://evil.example/ns/dev/sa/tester"),
    )
    .await
    .expect_err("refused");
    assert_eq!(other_domain.code(), tonic::Code::InvalidArgument);

    let (running, _, _stop) = control_plane("static-off", None, false, true).await;
    let refused = certify(
        &running,
        "cli-secret",
        csr("spiffe://cluster.local/ns/dev/sa/tester"),
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("--static-token-identities"));
}

#[tokio::test]
async fn a_bad_csr_is_refused_and_a_control_plane_without_a_ca_says_so() {
    let (running, _, _stop) = control_plane("bad-csr", None, true, true).await;
    let bad = certify(&running, "cli-secret", "not a CSR".into())
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        exposition(&running).contains("sluice_cp_certificate_requests_total{result=\"invalid\"} 1")
    );

    let (running, _, _stop) = control_plane("no-ca", None, true, false).await;
    let none = certify(
        &running,
        "cli-secret",
        csr("spiffe://cluster.local/ns/dev/sa/tester"),
    )
    .await
    .expect_err("no CA");
    assert_eq!(none.code(), tonic::Code::FailedPrecondition);
    assert!(none.message().contains("--ca-cert"));
}
