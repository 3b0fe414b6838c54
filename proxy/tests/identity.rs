//! The proxy's certificate client against an in-process control plane that is the
//! mesh's CA, over TLS with the static token (`--static-token-identities`, the
//! only way to name a workload outside Kubernetes); and two real proxies started
//! with `--identity-from-control-plane` speaking mTLS with what it issued.

mod support;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sluice_control_plane::ca::CaConfig;
use sluice_control_plane::serve::{start, Running, ServeConfig};
use sluice_proxy::control_plane::Ca;
use sluice_proxy::issuer::{certify_at, IssueError, Renewal};

const ID: &str = "spiffe://cluster.local/ns/dev/sa/tester";

struct ControlPlane {
    running: Running,
    dir: PathBuf,
    /// The control plane's own TLS certificate (what `--ca-file` names).
    tls_ca: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn control_plane(name: &str, static_token_identities: bool) -> ControlPlane {
    control_plane_with_ttl(name, static_token_identities, Duration::from_secs(3600)).await
}

/// A control plane whose CA issues certificates for `ttl` (below the CLI's
/// minimum: the configuration is built here, so renewals can be watched).
async fn control_plane_with_ttl(
    name: &str,
    static_token_identities: bool,
    ttl: Duration,
) -> ControlPlane {
    let unique = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "sluice-proxy-identity-{name}-{}-{unique}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    sluice_control_plane::ca::init(&dir.join("ca"), "cluster.local").expect("ca init");
    let tls = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("tls");
    std::fs::write(dir.join("tls.crt"), tls.cert.pem()).expect("tls.crt");
    std::fs::write(dir.join("tls.key"), tls.signing_key.serialize_pem()).expect("tls.key");
    std::fs::write(dir.join("token"), "s3cret\n").expect("token");
    std::fs::create_dir_all(dir.join("policies")).expect("policies");
    let config = ServeConfig {
        policies: Some(dir.join("policies")),
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: Some((dir.join("tls.crt"), dir.join("tls.key"))),
        cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
        token_file: Some(dir.join("token")),
        kubernetes: None,
        token_review: None,
        operators: Vec::new(),
        telemetry: None,
        webhook: None,
        ca: Some(CaConfig {
            cert: dir.join("ca/ca.crt"),
            key: dir.join("ca/ca.key"),
            trust_roots: None,
            trust_domain: "cluster.local".into(),
            ttl,
            static_token_identities,
        }),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(config, async {
        let _ = stopped.await;
    })
    .await
    .expect("serve");
    ControlPlane {
        running,
        tls_ca: tls.cert.pem(),
        dir,
        _stop: stop,
    }
}

impl ControlPlane {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.running.addr.port())
    }

    fn ca(&self) -> Ca {
        Ca::Pem(self.tls_ca.clone())
    }
}

#[tokio::test]
async fn a_proxy_gets_credentials_for_its_identity_that_chain_to_the_mesh_root() {
    let cp = control_plane("issued", true).await;
    let token = cp.dir.join("token");
    let credentials = certify_at(&cp.url(), Some(&cp.ca()), Some(&token), Some(ID))
        .await
        .expect("issued");
    assert_eq!(credentials.identity, ID);
    assert_eq!(credentials.peer_identity().service_account(), "tester");
    assert_eq!(credentials.chain.len(), 1);
    let root = std::fs::read_to_string(cp.dir.join("ca/ca.crt")).expect("root");
    let roots: Vec<_> = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(root.as_bytes())
            .collect::<Result<_, _>>()
            .expect("root pem")
    };
    assert_eq!(credentials.roots, roots);
    let left = credentials
        .not_after
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
    // Two requests, two keys.
    let again = certify_at(&cp.url(), Some(&cp.ca()), Some(&token), Some(ID))
        .await
        .expect("issued");
    assert_ne!(
        again.key.secret_der(),
        credentials.key.secret_der(),
        "a fresh key per certificate"
    );
}

#[tokio::test]
async fn a_refusal_says_why() {
    let cp = control_plane("refused", false).await;
    let token = cp.dir.join("token");
    let refused = certify_at(&cp.url(), Some(&cp.ca()), Some(&token), Some(ID))
        .await
        .expect_err("refused");
    let IssueError::Refused(status) = &refused else {
        panic!("{refused}");
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(refused.to_string().contains("--static-token-identities"));
    // Without the control plane's CA the https channel is not even opened.
    let unverified = certify_at(&cp.url(), None, Some(&token), Some(ID))
        .await
        .expect_err("no CA");
    assert!(matches!(unverified, IssueError::Connect(_)), "{unverified}");
}

#[tokio::test]
async fn renewal_hands_over_credentials_and_stops_on_shutdown() {
    // Four-second certificates: renewed at half life, so a second one comes
    // about two seconds after the first (and before the first expires).
    let cp = control_plane_with_ttl("renewal", true, Duration::from_secs(4)).await;
    let renewal = Renewal {
        url: cp.url(),
        ca: Some(cp.ca()),
        token_file: Some(cp.dir.join("token")),
        requested: Some(ID.to_owned()),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(renewal.run(
        move |credentials| {
            let _ = tx.send(credentials);
            Ok(())
        },
        shutdown,
    ));
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("in time")
        .expect("credentials");
    assert_eq!(first.identity, ID);
    let second = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("renewed in time")
        .expect("credentials");
    assert_eq!(second.identity, ID);
    assert!(second.not_after > first.not_after, "a new certificate");
    assert!(
        SystemTime::now() < first.not_after,
        "renewed before the first expired"
    );
    stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("no panic");
}

const CALLEE: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const CALLER: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

/// A proxy following the control plane at `url` with the static token, asking for
/// `identity`, with `extra` arguments.
fn meshed_proxy(
    url: &str,
    token: &std::path::Path,
    identity: &str,
    extra: &[&str],
) -> support::ProxyProcess {
    let mut args: Vec<String> = [
        "--control-plane",
        url,
        "--token-file",
        &token.display().to_string(),
        "--identity-from-control-plane",
        "--identity-request",
        identity,
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    support::ProxyProcess::start_args(&args)
}

/// Waits (bounded) until the proxy's /config_dump names `identity` as its own.
async fn wait_for_identity(proxy: &support::ProxyProcess, identity: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(dump) = support::get(proxy.admin_addr(), "admin", "/config_dump").await {
            let dump: serde_json::Value = serde_json::from_slice(&dump.body).unwrap_or_default();
            if dump["identity"]["id"] == identity {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no identity {identity}: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_proxies_speak_mtls_with_certificates_from_the_control_plane() {
    let cp = control_plane("e2e", true).await;
    let policies = cp.dir.join("policies");
    let app = support::upstream("reviews-app").await;
    std::fs::write(
        policies.join("reviews.yaml"),
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews-inbound]\n  mtls: {mode: strict}\n  routes:\n    - name: all\n",
    )
    .expect("policy");
    let url = format!("https://127.0.0.1:{}", cp.running.addr.port());
    let token = cp.dir.join("token");
    let ca_file = cp.dir.join("tls.crt");
    let ca_file = ca_file.display().to_string();
    let callee = meshed_proxy(
        &url,
        &token,
        CALLEE,
        &[
            "--ca-file",
            &ca_file,
            "--inbound",
            "127.0.0.1:0",
            "--app",
            &app.addr().to_string(),
            "--inbound-policy",
            "reviews",
        ],
    );
    callee.wait_ready().await;
    wait_for_identity(&callee, CALLEE).await;
    std::fs::write(
        policies.join("to-reviews.yaml"),
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: to-reviews}}\nspec:\n  hosts: [reviews]\n  backends:\n    - address: \"{}\"\n      tls: {{identity: \"{CALLEE}\"}}\n  routes:\n    - name: all\n",
            callee.addr("inbound")
        ),
    )
    .expect("policy");
    let caller = meshed_proxy(&url, &token, CALLER, &["--ca-file", &ca_file]);
    caller.wait_ready().await;
    wait_for_identity(&caller, CALLER).await;

    // The policy directory is watched: the caller learns `reviews` on demand.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let response = loop {
        let response = support::get(caller.listen_addr(), "reviews", "/")
            .await
            .expect("request");
        if response.status == 200 || std::time::Instant::now() > deadline {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        response.status,
        200,
        "caller: {}\ncallee: {}",
        caller.stderr(),
        callee.stderr()
    );
    assert_eq!(response.header("x-upstream"), Some("reviews-app"));
    // Strict mTLS let it in, and the callee knows who called.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let line = loop {
        if let Some(line) = callee.access_log().into_iter().find(|l| l["path"] == "/") {
            break line;
        }
        assert!(std::time::Instant::now() < deadline, "no access log line");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["peer"], CALLER, "{line}");
}

#[tokio::test]
async fn a_proxy_is_not_ready_until_it_has_a_workload_certificate() {
    // The static token may not name an identity here: every request is refused,
    // so the proxy never gets a certificate.
    let cp = control_plane("not-ready", false).await;
    let ca_file = cp.dir.join("tls.crt").display().to_string();
    let proxy = meshed_proxy(
        &cp.url(),
        &cp.dir.join("token"),
        CALLER,
        &["--ca-file", &ca_file],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let last = loop {
        let ready = support::get(proxy.admin_addr(), "admin", "/ready").await;
        if let Ok(r) = &ready {
            if r.status == 503 && r.text().contains("workload certificate") {
                break r.text();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ready:?}\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(last.starts_with("not ready"), "{last}");
}

#[tokio::test]
async fn credentials_that_do_not_install_are_asked_for_again_soon() {
    // Hour-long certificates: renewal would wait half an hour, so a second set
    // within seconds means the failed install was retried.
    let cp = control_plane("retry", true).await;
    let renewal = Renewal {
        url: cp.url(),
        ca: Some(cp.ca()),
        token_file: Some(cp.dir.join("token")),
        requested: Some(ID.to_owned()),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut refused_once = false;
    let task = tokio::spawn(renewal.run(
        move |credentials| {
            let _ = tx.send(credentials);
            if refused_once {
                Ok(())
            } else {
                refused_once = true;
                Err("not valid yet (a clock behind the control plane's)".to_owned())
            }
        },
        shutdown,
    ));
    for n in ["first", "second"] {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{n} set in time"))
            .expect("credentials");
    }
    stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("no panic");
}
