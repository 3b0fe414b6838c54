//! Mutual TLS between two real `sluice-proxy` processes on loopback: an outbound
//! proxy (the caller's sidecar) and an inbound one (the callee's), with a tap
//! between them that records every byte and can cut every connection.
//!
//! What is shown: the hop is TLS from its first byte and carries no readable
//! request; the inbound side knows the caller's workload identity; a server that
//! is not the expected workload, and a client whose certificate another root
//! signed, are refused; plaintext is served only where the mode allows it; and
//! certificates that expire while traffic flows are replaced (files renewed)
//! without a failed request.

#[path = "support/pki.rs"]
mod pki;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pki::Ca;
use support::{get, upstream, ProxyProcess, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every wait gives up after this (a generous deadline, not a measured time).
const PATIENCE: Duration = Duration::from_secs(15);
const DAY: Duration = Duration::from_secs(24 * 3600);
const CALLEE: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const CALLER: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

/// A TCP relay that keeps what passes each way and can cut its connections.
struct Tap {
    addr: SocketAddr,
    /// Client to server, and server to client, every connection appended.
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
    accepted: Arc<AtomicUsize>,
    relays: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Tap {
    async fn start(to: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let tap = Tap {
            addr: listener.local_addr().expect("addr"),
            up: Arc::default(),
            down: Arc::default(),
            accepted: Arc::default(),
            relays: Arc::default(),
        };
        let (up, down, accepted, relays) = (
            Arc::clone(&tap.up),
            Arc::clone(&tap.down),
            Arc::clone(&tap.accepted),
            Arc::clone(&tap.relays),
        );
        tokio::spawn(async move {
            // Bounded by the test's life: the runtime ends with the test.
            while let Ok((client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let a = tokio::spawn(copy(cr, sw, Arc::clone(&up)));
                let b = tokio::spawn(copy(sr, cw, Arc::clone(&down)));
                let mut relays = relays.lock().expect("relays");
                relays.push(a.abort_handle());
                relays.push(b.abort_handle());
            }
        });
        tap
    }

    /// Closes every relayed connection (both sockets of each are dropped).
    fn cut(&self) {
        for relay in self.relays.lock().expect("relays").drain(..) {
            relay.abort();
        }
    }

    fn up(&self) -> Vec<u8> {
        self.up.lock().expect("up").clone()
    }

    fn down(&self) -> Vec<u8> {
        self.down.lock().expect("down").clone()
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = [0u8; 16 * 1024];
    // Bounded by the connection: ends at EOF, an error, or an abort.
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                seen.lock().expect("seen").extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The callee's sidecar: an inbound listener delivering to `app` under policy
/// `reviews` (one route `all`, then the `spec` lines given), with the workload
/// identity shop/reviews.
async fn callee(
    ca: &Ca,
    dir: &TempDir,
    app: SocketAddr,
    spec: &str,
    extra: &[&str],
) -> ProxyProcess {
    callee_with(
        ca,
        dir,
        app,
        &format!("  routes:\n    - name: all\n{spec}"),
        extra,
    )
    .await
}

fn reviews_policy(spec: &str) -> String {
    format!("apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: reviews}}\nspec:\n{spec}")
}

/// Like [`callee`], with the whole `spec` body given.
async fn callee_with(
    ca: &Ca,
    dir: &TempDir,
    app: SocketAddr,
    spec: &str,
    extra: &[&str],
) -> ProxyProcess {
    let mut args: Vec<String> = ca.write_identity(dir, "shop", "reviews", DAY);
    let path = dir.write("policy.yaml", &reviews_policy(spec));
    args.extend(
        [
            "--policy",
            &path.display().to_string(),
            "--inbound",
            "127.0.0.1:0",
            "--app",
            &app.to_string(),
            "--inbound-policy",
            "reviews",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    let proxy = ProxyProcess::start_args(&args);
    proxy.wait_ready().await;
    proxy
}

/// The caller's sidecar: host `reviews` goes to `to`, which must prove `expected`.
async fn caller(
    ca: &Ca,
    dir: &TempDir,
    to: SocketAddr,
    expected: &str,
    life: Duration,
) -> ProxyProcess {
    caller_as(ca, dir, "frontend", to, expected, life).await
}

/// A caller running as ServiceAccount `shop/{sa}`.
async fn caller_as(
    ca: &Ca,
    dir: &TempDir,
    sa: &str,
    to: SocketAddr,
    expected: &str,
    life: Duration,
) -> ProxyProcess {
    let mut args = ca.write_identity(dir, "shop", sa, life);
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: to-reviews}}\nspec:\n  hosts: [reviews]\n  backends:\n    - address: {to}\n      tls: {{identity: \"{expected}\"}}\n  routes:\n    - name: all\n      retries: {{attempts: 2, on: [connect-failure, reset]}}\n"
    );
    let path = dir.write("policy.yaml", &policy);
    args.extend(["--policy".to_owned(), path.display().to_string()]);
    let proxy = ProxyProcess::start_args(&args);
    proxy.wait_ready().await;
    proxy
}

#[tokio::test]
async fn the_hop_between_proxies_is_tls_and_carries_the_callers_identity() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (callee_dir, caller_dir) = (TempDir::new(), TempDir::new());
    let callee = callee(&ca, &callee_dir, app.addr(), "", &[]).await;
    let tap = Tap::start(callee.addr("inbound")).await;
    let caller = caller(&ca, &caller_dir, tap.addr, CALLEE, DAY).await;

    let response = get(caller.listen_addr(), "reviews", "/secret-path?token=abc")
        .await
        .expect("request");
    assert_eq!(response.status, 200, "{}", caller.stderr());
    assert_eq!(response.header("x-upstream"), Some("reviews-app"));

    let (up, down) = (tap.up(), tap.down());
    assert!(up.len() > 5 && down.len() > 5, "bytes passed both ways");
    // A TLS handshake record (0x16), TLS major version 3, from the first byte.
    assert_eq!(&up[..2], &[0x16, 0x03], "starts with a ClientHello");
    assert_eq!(&down[..2], &[0x16, 0x03], "answered with a ServerHello");
    for visible in [&b"secret-path"[..], b"HTTP/1.1", b"reviews", b"GET "] {
        assert!(
            !contains(&up, visible),
            "{:?} is visible on the wire",
            String::from_utf8_lossy(visible)
        );
    }
    assert!(
        !contains(&down, b"HTTP/1.1 200"),
        "the response is visible on the wire"
    );

    // The callee knows who called: the access log names the caller's identity.
    let deadline = Instant::now() + PATIENCE;
    let line = loop {
        let log = callee.access_log();
        if let Some(line) = log.into_iter().find(|l| l["path"] == "/secret-path") {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line: {}",
            callee.stdout()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["peer"], CALLER, "{line}");

    // Each proxy shows who it is, and when its certificate expires.
    let dump = support::get(callee.admin_addr(), "admin", "/config_dump")
        .await
        .expect("config_dump");
    let dump: serde_json::Value = serde_json::from_slice(&dump.body).expect("json");
    assert_eq!(dump["identity"]["id"], CALLEE, "{dump}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    // Published by the once-a-second housekeeping: wait for it (bounded).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = support::metrics(&caller).await;
        let expiry = support::sample(&metrics, "sluice_identity_expiry_timestamp_seconds");
        if expiry > now + 3600.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_workload_is_refused() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (callee_dir, caller_dir) = (TempDir::new(), TempDir::new());
    let callee = callee(&ca, &callee_dir, app.addr(), "", &[]).await;
    // Same root, another workload expected: the callee's certificate is valid
    // but names shop/reviews.
    let caller = caller(
        &ca,
        &caller_dir,
        callee.addr("inbound"),
        "spiffe://cluster.local/ns/shop/sa/ratings",
        DAY,
    )
    .await;
    let response = get(caller.listen_addr(), "reviews", "/")
        .await
        .expect("request");
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(app.requests(), 0, "nothing reached the app");
    assert!(
        caller.stderr().contains("mTLS handshake failed"),
        "{}",
        caller.stderr()
    );
}

/// A TLS client presenting `(chain, key)`, trusting any server (the test looks at
/// the server's side of the handshake only).
async fn tls_get(to: SocketAddr, chain: &str, key: &str) -> std::io::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(to).await?;
    let mut tls = connector
        .connect(ServerName::IpAddress(to.ip().into()), tcp)
        .await?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        .await?;
    tls.flush().await?;
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut got))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(got)
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn a_client_certificate_from_another_root_is_refused() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let dir = TempDir::new();
    let callee = callee(&ca, &dir, app.addr(), "", &[]).await;
    let inbound = callee.addr("inbound");

    // The control: a certificate from the mesh's root is served.
    let (chain, key) = ca.workload("shop", "frontend", DAY);
    let served = tls_get(inbound, &chain, &key).await.expect("mesh client");
    assert!(
        served.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&served)
    );

    let other = Ca::new("elsewhere");
    let (chain, key) = other.workload("shop", "frontend", DAY);
    let refused = tls_get(inbound, &chain, &key).await;
    assert!(
        !matches!(&refused, Ok(bytes) if !bytes.is_empty()),
        "a foreign certificate got an answer: {refused:?}"
    );
    assert_eq!(app.requests(), 1, "only the mesh client reached the app");
}

#[tokio::test]
async fn plaintext_is_served_when_permissive_and_refused_when_strict() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (permissive_dir, strict_dir, policy_dir) = (TempDir::new(), TempDir::new(), TempDir::new());
    let permissive = callee(&ca, &permissive_dir, app.addr(), "", &[]).await;
    let response = get(permissive.addr("inbound"), "reviews", "/")
        .await
        .expect("request");
    assert_eq!(response.status, 200);

    // Mesh-wide strict: a plaintext caller is refused, and nothing reaches the app.
    let before = app.requests();
    let strict = callee(&ca, &strict_dir, app.addr(), "", &["--mtls-mode", "strict"]).await;
    let response = get(strict.addr("inbound"), "reviews", "/")
        .await
        .expect("request");
    assert_eq!(response.status, 403, "{}", response.text());
    assert!(response.text().contains("mTLS"), "{}", response.text());
    // Strict by the policy, on a permissive proxy.
    let by_policy = callee(
        &ca,
        &policy_dir,
        app.addr(),
        "  mtls: {mode: strict}\n",
        &[],
    )
    .await;
    let response = get(by_policy.addr("inbound"), "reviews", "/")
        .await
        .expect("request");
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(
        app.requests(),
        before,
        "no plaintext request reached the app"
    );
}

#[tokio::test]
async fn certificates_that_expire_are_renewed_without_a_failed_request() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (callee_dir, caller_dir) = (TempDir::new(), TempDir::new());
    // Short-lived certificates, renewed (files replaced) every second; the tap
    // cuts every connection twice a second, so handshakes keep happening with
    // whatever certificates are current.
    let life = Duration::from_secs(4);
    let callee = callee(&ca, &callee_dir, app.addr(), "", &[]).await;
    ca.write_identity(&callee_dir, "shop", "reviews", life);
    let tap = Tap::start(callee.addr("inbound")).await;
    let caller = caller(&ca, &caller_dir, tap.addr, CALLEE, life).await;

    let start = Instant::now();
    let first_expiry = start + life;
    let (mut ok, mut failed) = (0u32, Vec::new());
    let mut renewed = start;
    let mut cut = start;
    let mut accepted_after_expiry = 0;
    // Bounded: about 10 s of requests, one at a time.
    while start.elapsed() < Duration::from_secs(10) {
        if renewed.elapsed() >= Duration::from_secs(1) {
            ca.write_identity(&callee_dir, "shop", "reviews", life);
            ca.write_identity(&caller_dir, "shop", "frontend", life);
            renewed = Instant::now();
        }
        if cut.elapsed() >= Duration::from_millis(500) {
            tap.cut();
            cut = Instant::now();
        }
        if Instant::now() > first_expiry + Duration::from_secs(1) && accepted_after_expiry == 0 {
            accepted_after_expiry = tap.accepted.load(Ordering::Relaxed);
        }
        match get(caller.listen_addr(), "reviews", "/").await {
            Ok(r) if r.status == 200 => ok += 1,
            Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}\n{}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)],
        caller.stderr()
    );
    assert!(ok > 50, "{ok} requests");
    assert!(
        tap.accepted.load(Ordering::Relaxed) > accepted_after_expiry && accepted_after_expiry > 0,
        "new connections were made after the first certificates expired"
    );
    assert!(
        caller.stderr().contains("workload identity renewed"),
        "{}",
        caller.stderr()
    );
}

const AUTHORIZED_ROUTES: &str =
    "  routes:\n    - name: orders\n      match: {pathPrefix: /orders}\n    - name: all\n";

#[tokio::test]
async fn authorization_lets_named_accounts_in_and_refuses_the_others() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (callee_dir, frontend_dir, checkout_dir) = (TempDir::new(), TempDir::new(), TempDir::new());
    let rules = "  authorization:\n    default: deny\n    rules:\n      - from: {serviceAccounts: [shop/frontend]}\n        routes: [orders]\n";
    let callee = callee_with(
        &ca,
        &callee_dir,
        app.addr(),
        &format!("{AUTHORIZED_ROUTES}{rules}"),
        &[],
    )
    .await;
    let inbound = callee.addr("inbound");
    let frontend = caller_as(&ca, &frontend_dir, "frontend", inbound, CALLEE, DAY).await;
    let checkout = caller_as(&ca, &checkout_dir, "checkout", inbound, CALLEE, DAY).await;

    let allowed = get(frontend.listen_addr(), "reviews", "/orders/1")
        .await
        .expect("request");
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let other_route = get(frontend.listen_addr(), "reviews", "/profile")
        .await
        .expect("request");
    assert_eq!(other_route.status, 403, "{}", other_route.text());
    let other_account = get(checkout.listen_addr(), "reviews", "/orders/1")
        .await
        .expect("request");
    assert_eq!(other_account.status, 403, "{}", other_account.text());
    assert!(
        other_account.text().contains("reviews"),
        "the refusal names the rule set: {}",
        other_account.text()
    );
    let plaintext = get(inbound, "reviews", "/orders/1").await.expect("request");
    assert_eq!(
        plaintext.status,
        403,
        "a plaintext caller has no identity: {}",
        plaintext.text()
    );
    assert_eq!(app.requests(), 1, "only the allowed call reached the app");

    let metrics = support::metrics_once(
        &callee,
        r#"sluice_authz_denied_total{mode="enforce",policy="reviews",route="orders"}"#,
        2.0,
    )
    .await;
    assert_eq!(
        support::sample(
            &metrics,
            r#"sluice_authz_denied_total{mode="enforce",policy="reviews",route="all"}"#
        ),
        1.0,
        "{metrics}"
    );
    // The refusal is logged with the caller's identity (4 requests, 4 lines).
    let log = support::log_lines(&callee, 4).await;
    assert!(
        log.iter().any(|l| l["decision"] == "unauthorized"
            && l["peer"] == "spiffe://cluster.local/ns/shop/sa/checkout"),
        "{log:?}"
    );
}

#[tokio::test]
async fn shadow_authorization_counts_and_lets_through() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (callee_dir, checkout_dir) = (TempDir::new(), TempDir::new());
    let rules = "  mode: shadow\n  authorization:\n    default: deny\n    rules:\n      - from: {serviceAccounts: [shop/frontend]}\n";
    let callee = callee_with(
        &ca,
        &callee_dir,
        app.addr(),
        &format!("{AUTHORIZED_ROUTES}{rules}"),
        &[],
    )
    .await;
    let checkout = caller_as(
        &ca,
        &checkout_dir,
        "checkout",
        callee.addr("inbound"),
        CALLEE,
        DAY,
    )
    .await;
    let response = get(checkout.listen_addr(), "reviews", "/orders/1")
        .await
        .expect("request");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(app.requests(), 1);
    support::metrics_once(
        &callee,
        r#"sluice_authz_denied_total{mode="shadow",policy="reviews",route="orders"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_reload_that_changes_the_rules_applies_without_dropping_requests() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (callee_dir, frontend_dir, checkout_dir) = (TempDir::new(), TempDir::new(), TempDir::new());
    let rules = |accounts: &str| {
        format!("{AUTHORIZED_ROUTES}  authorization:\n    default: deny\n    rules:\n      - from: {{serviceAccounts: [{accounts}]}}\n")
    };
    let callee = callee_with(&ca, &callee_dir, app.addr(), &rules("shop/frontend"), &[]).await;
    let inbound = callee.addr("inbound");
    let frontend = caller_as(&ca, &frontend_dir, "frontend", inbound, CALLEE, DAY).await;
    let checkout = caller_as(&ca, &checkout_dir, "checkout", inbound, CALLEE, DAY).await;
    let refused = get(checkout.listen_addr(), "reviews", "/orders/1")
        .await
        .expect("request");
    assert_eq!(refused.status, 403);

    // The frontend keeps calling while the rules change; checkout is let in.
    let old = support::version(&callee).await;
    let to = frontend.listen_addr();
    let load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        let client = support::HttpClient::connect(to).await;
        let Ok(mut client) = client else {
            return statuses;
        };
        // Bounded: 400 requests on one keep-alive connection.
        for _ in 0..400 {
            match client
                .request("GET", "reviews", "/orders/1", &[], b"")
                .await
            {
                Ok(r) => statuses.push(r.status),
                Err(_) => statuses.push(0),
            }
        }
        statuses
    });
    support::replace(
        &callee_dir,
        &reviews_policy(&rules("shop/frontend, shop/checkout")),
    );
    support::wait_new_version(&callee, &old).await;
    let statuses = load.await.expect("load");
    assert_eq!(statuses.len(), 400);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let let_in = get(checkout.listen_addr(), "reviews", "/orders/1")
        .await
        .expect("request");
    assert_eq!(let_in.status, 200, "{}", let_in.text());
}

#[tokio::test]
async fn strict_refuses_plaintext_where_no_route_or_no_policy_governs() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (routed_dir, unowned_dir) = (TempDir::new(), TempDir::new());
    // A policy whose only route is /orders: a plaintext caller asking elsewhere is
    // refused for want of mTLS, not told which paths are routed (404).
    let routed = callee_with(
        &ca,
        &routed_dir,
        app.addr(),
        "  routes:\n    - name: orders\n      match: {pathPrefix: /orders}\n",
        &["--mtls-mode", "strict"],
    )
    .await;
    let response = get(routed.addr("inbound"), "reviews", "/elsewhere")
        .await
        .expect("request");
    assert_eq!(response.status, 403, "{}", response.text());
    assert!(response.text().contains("mTLS"), "{}", response.text());

    // No inbound policy loaded at all (ungoverned traffic reaches the app as it
    // is): strict still keeps plaintext out.
    let mut args = ca.write_identity(&unowned_dir, "shop", "reviews", DAY);
    let path = unowned_dir.write(
        "policy.yaml",
        &reviews_policy("  routes:\n    - name: all\n"),
    );
    args.extend(
        [
            "--policy",
            &path.display().to_string(),
            "--inbound",
            "127.0.0.1:0",
            "--app",
            &app.addr().to_string(),
            "--inbound-policy",
            "not-loaded",
            "--mtls-mode",
            "strict",
        ]
        .map(String::from),
    );
    let unowned = ProxyProcess::start_args(&args);
    unowned.wait_ready().await;
    let response = get(unowned.addr("inbound"), "reviews", "/")
        .await
        .expect("request");
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(app.requests(), 0, "no plaintext request reached the app");
    // A meshed caller still gets through where nothing governs.
    let (chain, key) = ca.workload("shop", "frontend", DAY);
    let served = tls_get(unowned.addr("inbound"), &chain, &key)
        .await
        .expect("mesh client");
    assert!(
        served.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&served)
    );
}

#[tokio::test]
async fn http2_inside_mtls_keeps_the_callers_identity() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let (callee_dir, caller_dir) = (TempDir::new(), TempDir::new());
    // Strict, and only the frontend allowed: a stream that lost its connection's
    // identity would be refused.
    let rules = "  mtls: {mode: strict}\n  authorization:\n    rules:\n      - from: {serviceAccounts: [shop/frontend]}\n";
    let callee = callee(&ca, &callee_dir, app.addr(), rules, &[]).await;
    let tap = Tap::start(callee.addr("inbound")).await;
    let mut args = ca.write_identity(&caller_dir, "shop", "frontend", DAY);
    let policy = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: to-reviews}}\nspec:\n  hosts: [reviews]\n  backends:\n    - address: {}\n      protocol: h2c\n      tls: {{identity: \"{CALLEE}\"}}\n  routes:\n    - name: all\n",
        tap.addr
    );
    let path = caller_dir.write("policy.yaml", &policy);
    args.extend(["--policy".to_owned(), path.display().to_string()]);
    let caller = ProxyProcess::start_args(&args);
    caller.wait_ready().await;

    for i in 0..3 {
        let response = get(caller.listen_addr(), "reviews", &format!("/h2/{i}"))
            .await
            .expect("request");
        assert_eq!(
            response.status,
            200,
            "{}\n{}",
            response.text(),
            callee.stderr()
        );
    }
    let up = tap.up();
    assert_eq!(&up[..2], &[0x16, 0x03], "TLS from the first byte");
    assert!(
        !contains(&up, b"PRI * HTTP/2.0"),
        "the HTTP/2 preface is visible"
    );
    let log = support::log_lines(&callee, 3).await;
    assert!(
        log.iter()
            .all(|l| l["peer"] == CALLER && l["status"] == 200),
        "{log:?}"
    );
}

#[tokio::test]
async fn an_identity_of_another_trust_domain_matches_no_rule() {
    let ca = Ca::new("mesh");
    let app = upstream("reviews-app").await;
    let dir = TempDir::new();
    let rules = "  authorization:\n    rules:\n      - from: {serviceAccounts: [shop/frontend]}\n";
    let callee = callee(&ca, &dir, app.addr(), rules, &[]).await;
    let inbound = callee.addr("inbound");
    // The same root signs both (a shared or federated root): only the trust
    // domain differs.
    let (chain, key) = ca.workload("shop", "frontend", DAY);
    let ours = tls_get(inbound, &chain, &key).await.expect("ours");
    assert!(
        ours.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ours)
    );
    let (chain, key) = ca.workload_in("elsewhere.example", "shop", "frontend", DAY);
    let theirs = tls_get(inbound, &chain, &key).await.expect("theirs");
    assert!(
        theirs.starts_with(b"HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&theirs)
    );
    assert_eq!(app.requests(), 1);
}
