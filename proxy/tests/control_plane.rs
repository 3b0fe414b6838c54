//! The control plane and its proxies end to end: an in-process `sluice-cp serve`
//! (the library the binary runs) and real `sluice-proxy` processes on loopback.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_control_plane::serve::{start, Running, ServeConfig};
use sluice_control_plane::store::Store;
use support::{get, upstream, ProxyProcess, TempDir};

fn policy(backend: SocketAddr, burst: u32) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shop}}\nspec:\n  hosts: [shop]\n  backends:\n    - address: \"{backend}\"\n  routes:\n    - name: all\n      rateLimit: {{requestsPerSecond: 0.01, burst: {burst}}}\n"
    )
}

/// Replaces `name` in `dir` atomically.
fn write(dir: &Path, name: &str, yaml: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

struct ControlPlane {
    running: Running,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ControlPlane {
    /// Starts on `listen` (`127.0.0.1:0` the first time). A restart on the port the
    /// first start got can find it briefly taken by another test's outgoing
    /// connection, whose ephemeral port is drawn from the same range, so binding is
    /// retried for a bounded while.
    async fn start(dir: &Path, listen: SocketAddr) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let config = ServeConfig {
                policies: Some(dir.to_owned()),
                listen,
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
            match start(config, async {
                let _ = stopped.await;
            })
            .await
            {
                Ok(running) => {
                    return ControlPlane {
                        running,
                        stop: Some(stop),
                    }
                }
                Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("control plane does not start: {e}"),
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.running.addr)
    }

    fn store(&self) -> Arc<Store> {
        Arc::clone(&self.running.store)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let finished = tokio::time::timeout(Duration::from_secs(5), &mut self.running.task).await;
        assert!(
            finished.is_ok(),
            "the control plane did not stop within 5 s"
        );
    }
}

fn proxy(url: &str, node: &str, state: &Path) -> ProxyProcess {
    let args: Vec<String> = [
        "--control-plane",
        url,
        "--node-id",
        node,
        "--state-dir",
        &state.display().to_string(),
        "--label",
        "app=shop",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    ProxyProcess::start_args(&args)
}

async fn dump(proxy: &ProxyProcess) -> serde_json::Value {
    let body = get(proxy.admin_addr(), "admin", "/config_dump")
        .await
        .expect("config_dump")
        .body;
    serde_json::from_slice(&body).expect("json")
}

/// Polls (bounded by `within`) until `check` holds; panics with `what` otherwise.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The version of policy `id` the proxy `node` holds, by the control plane's status.
fn acked(store: &Store, node: &str, id: &str) -> Option<String> {
    store
        .status()
        .proxies
        .iter()
        .find(|p| p.node_id == node)
        .and_then(|p| p.policy_versions.get(id).cloned())
}

/// The version of policy `id` the control plane serves.
fn served(store: &Store, id: &str) -> Option<String> {
    let id = sluice_policy::PolicyId::parse(id);
    store.served().policies.get(&id).map(|p| p.version.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_reaches_three_proxies_and_an_invalid_edit_reaches_none() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = TempDir::new();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    write(&policies, "shop.yaml", &policy(a.addr(), 5));
    let cp = ControlPlane::start(&policies, ([127, 0, 0, 1], 0).into()).await;
    let store = cp.store();
    let proxies: Vec<ProxyProcess> = (1..=3)
        .map(|i| {
            proxy(
                &cp.url(),
                &format!("proxy-{i}"),
                &dir.path().join(format!("state-{i}")),
            )
        })
        .collect();
    for p in &proxies {
        p.wait_ready().await;
        // Discovered on demand: the first request for the host fetches its policy.
        let r = get(p.listen_addr(), "shop", "/").await.expect("request");
        assert_eq!(r.header("x-upstream"), Some("a"));
    }
    let v1 = served(&store, "shop").expect("served");
    eventually(Duration::from_secs(5), "all three ACK version 1", || {
        let (store, v1) = (Arc::clone(&store), v1.clone());
        async move { (1..=3).all(|i| acked(&store, &format!("proxy-{i}"), "shop") == Some(v1.clone())) }
    })
    .await;
    let status = store.status();
    assert_eq!(status.proxies.len(), 3);
    assert!(status
        .proxies
        .iter()
        .all(|p| p.connected && p.labels.get("app").map(String::as_str) == Some("shop")));

    // An edit reaches all three: ACKed, and in their /config_dump.
    write(&policies, "shop.yaml", &policy(b.addr(), 5));
    eventually(Duration::from_secs(10), "a second version", || {
        let (store, v1) = (Arc::clone(&store), v1.clone());
        async move { served(&store, "shop").is_some_and(|v| v != v1) }
    })
    .await;
    let v2 = served(&store, "shop").expect("served");
    eventually(Duration::from_secs(10), "all three ACK version 2", || {
        let (store, v2) = (Arc::clone(&store), v2.clone());
        async move { (1..=3).all(|i| acked(&store, &format!("proxy-{i}"), "shop") == Some(v2.clone())) }
    })
    .await;
    for p in &proxies {
        let d = dump(p).await;
        assert_eq!(d["policyVersions"]["shop"], v2.as_str());
        let r = get(p.listen_addr(), "shop", "/").await.expect("request");
        assert_eq!(r.header("x-upstream"), Some("b"));
    }

    // An invalid edit is refused with its file:line:column; proxies stay on version 2.
    write(&policies, "shop.yaml", &policy(a.addr(), 0));
    eventually(
        Duration::from_secs(3),
        "the refused change shows in status",
        || {
            let store = Arc::clone(&store);
            async move { !store.status().rejected_errors.is_empty() }
        },
    )
    .await;
    let status = store.status();
    assert_eq!(served(&store, "shop"), Some(v2.clone()));
    assert!(
        status.rejected_errors[0].starts_with("shop: Invalid: ")
            && status.rejected_errors[0].contains(
                "shop.yaml:10:51: spec.routes[0].rateLimit.burst: must be at least 1, got 0"
            ),
        "{:?}",
        status.rejected_errors
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in &proxies {
        assert_eq!(dump(p).await["policyVersions"]["shop"], v2.as_str());
        // Traffic still behaves by version 2: backend b, its limit of 5.
        let r = get(p.listen_addr(), "shop", "/").await.expect("request");
        assert_eq!((r.status, r.header("x-upstream")), (200, Some("b")));
    }
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_outlive_the_control_plane_and_a_restarted_proxy_serves_the_persisted_policy() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = TempDir::new();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    write(&policies, "shop.yaml", &policy(a.addr(), 100));
    let cp = ControlPlane::start(&policies, ([127, 0, 0, 1], 0).into()).await;
    // Restarted below on the port it got: the proxy keeps dialling this URL.
    let listen = cp.running.addr;
    let url = cp.url();
    let state = dir.path().join("state");
    let p = proxy(&url, "survivor", &state);
    p.wait_ready().await;
    let connected = |p: &ProxyProcess| {
        let admin = p.admin_addr();
        async move {
            get(admin, "admin", "/metrics")
                .await
                .map(|m| m.text().contains("sluice_control_plane_connected 1"))
                .unwrap_or(false)
        }
    };
    eventually(Duration::from_secs(3), "connected", || connected(&p)).await;
    // The proxy holds what its traffic uses: a request discovers the policy.
    let r = get(p.listen_addr(), "shop", "/").await.expect("request");
    assert_eq!(r.header("x-upstream"), Some("a"));

    cp.stop().await;
    eventually(Duration::from_secs(3), "the proxy notices", || {
        let admin = p.admin_addr();
        async move {
            get(admin, "admin", "/metrics")
                .await
                .map(|m| m.text().contains("sluice_control_plane_connected 0"))
                .unwrap_or(false)
        }
    })
    .await;
    assert_eq!(
        get(p.listen_addr(), "shop", "/")
            .await
            .expect("still serving")
            .header("x-upstream"),
        Some("a")
    );

    // Restarted while the control plane is down: it starts from the persisted snapshot.
    drop(p);
    let restarted = proxy(&url, "survivor", &state);
    restarted.wait_ready().await;
    let ready = get(restarted.admin_addr(), "admin", "/ready")
        .await
        .expect("ready")
        .text();
    assert!(ready.contains("from state:"), "{ready}");
    assert_eq!(
        get(restarted.listen_addr(), "shop", "/")
            .await
            .expect("persisted")
            .header("x-upstream"),
        Some("a")
    );

    // The control plane comes back (with a new policy meanwhile): the proxy converges.
    write(&policies, "shop.yaml", &policy(b.addr(), 100));
    let cp = ControlPlane::start(&policies, listen).await;
    eventually(Duration::from_secs(10), "reconnects and converges", || {
        let listen = restarted.listen_addr();
        async move {
            get(listen, "shop", "/")
                .await
                .map(|r| r.header("x-upstream") == Some("b"))
                .unwrap_or(false)
        }
    })
    .await;
    let ready = get(restarted.admin_addr(), "admin", "/ready")
        .await
        .expect("ready")
        .text();
    assert!(ready.contains("from control-plane:"), "{ready}");
    cp.stop().await;
}

/// Policy `name` for host `name`, to `backend`.
fn named(name: &str, backend: SocketAddr) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}]\n  backends:\n    - address: \"{backend}\"\n"
    )
}

/// A map's keys in order (the status' maps are hash maps).
fn sorted_keys(map: &std::collections::HashMap<String, String>) -> Vec<&str> {
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// The identities of the policies in a proxy's /config_dump.
async fn held(proxy: &ProxyProcess) -> Vec<String> {
    let d = dump(proxy).await;
    let mut names: Vec<String> = d["policyVersions"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// A mesh of 100 policies: the proxy is ready holding none, holds what its requests
/// name (and the control plane knows it), answers a host nobody owns with a 404 at
/// once, and releases what goes unused for `--policy-idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_holds_only_what_its_requests_use_and_releases_it_when_idle() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    let mesh: String = (0..100)
        .map(|i| named(&format!("s{i}"), a.addr()))
        .collect::<Vec<_>>()
        .join("---\n");
    write(&policies, "mesh.yaml", &mesh);
    let cp = ControlPlane::start(&policies, ([127, 0, 0, 1], 0).into()).await;
    let store = cp.store();
    let state = dir.path().join("state");
    let args: Vec<String> = [
        "--control-plane",
        &cp.url(),
        "--node-id",
        "lean",
        "--state-dir",
        &state.display().to_string(),
        "--policy-idle",
        "1s",
        // Held from the start and never released.
        "--dependency",
        "s42:8080",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let p = ProxyProcess::start_args(&args);
    p.wait_ready().await;
    eventually(
        Duration::from_secs(5),
        "the dependency held without a request",
        || async { held(&p).await == ["s42"] },
    )
    .await;
    for host in ["s3", "s7"] {
        let r = get(p.listen_addr(), host, "/").await.expect("request");
        assert_eq!((r.status, r.header("x-upstream")), (200, Some("a")));
    }
    assert_eq!(held(&p).await, ["s3", "s42", "s7"]);
    eventually(
        Duration::from_secs(5),
        "the control plane sees what it holds",
        || {
            let store = Arc::clone(&store);
            async move {
                store.status().proxies.iter().any(|x| {
                    x.node_id == "lean" && sorted_keys(&x.policy_versions) == ["s3", "s42", "s7"]
                })
            }
        },
    )
    .await;
    // Nobody owns it: 404, and said so by the control plane (not a timeout).
    let r = get(p.listen_addr(), "nobody", "/").await.expect("request");
    assert_eq!(r.status, 404);
    assert!(
        r.text().contains("no policy governs host \"nobody\""),
        "{}",
        r.text()
    );
    // Unused for the idle period: released, from the proxy and the control plane;
    // the declared dependency stays.
    eventually(Duration::from_secs(10), "released", || async {
        held(&p).await == ["s42"]
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the control plane sees the release",
        || {
            let store = Arc::clone(&store);
            async move {
                store.status().proxies.iter().any(|x| {
                    x.node_id == "lean"
                        && sorted_keys(&x.policy_versions) == ["s42"]
                        && x.hosts_wanted == 1
                })
            }
        },
    )
    .await;
    // Asked again: discovered again.
    let r = get(p.listen_addr(), "s3", "/").await.expect("request");
    assert_eq!(r.status, 200);
    cp.stop().await;
}

/// `--all-policies` with a mesh larger than one update: the parts arrive and are
/// applied together; the proxy holds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_holding_every_policy_gets_a_large_mesh_in_parts() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    // Two files: the YAML reader takes at most 1,024 documents per file.
    for half in 0..2 {
        let mesh: Vec<String> = (half * 600..(half + 1) * 600)
            .map(|i| named(&format!("h{i}"), a.addr()))
            .collect();
        write(&policies, &format!("mesh-{half}.yaml"), &mesh.join("---\n"));
    }
    let cp = ControlPlane::start(&policies, ([127, 0, 0, 1], 0).into()).await;
    let args: Vec<String> = [
        "--control-plane",
        &cp.url(),
        "--node-id",
        "all",
        "--all-policies",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let p = ProxyProcess::start_args(&args);
    p.wait_ready().await;
    eventually(
        Duration::from_secs(10),
        "all 1,200 policies held",
        || async { held(&p).await.len() == 1200 },
    )
    .await;
    let r = get(p.listen_addr(), "h1100", "/").await.expect("request");
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("a")));
    cp.stop().await;
}

#[path = "../../control-plane/tests/support/fake_apiserver.rs"]
mod fake_apiserver;

/// A real proxy and a control plane as they run in a cluster: the control plane
/// follows the (fake) cluster's TrafficPolicies and serves TLS off loopback (the
/// certificate from its own CA), the proxy dials https with that CA and presents its
/// ServiceAccount token, which the control plane checks with TokenReview.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_its_service_account_token_gets_policies_over_tls() {
    let backend = upstream("shop").await;
    let fake = Arc::new(fake_apiserver::FakeApiServer::default());
    fake.add_token("sa-token", "sluice", "shop", "shop-proxy", "shop-7d4b9");
    fake.add_token(
        "api-token",
        "https://kubernetes.default.svc",
        "shop",
        "shop-proxy",
        "shop-7d4b9",
    );
    fake.add_policy(
        "shop",
        "shop",
        serde_json::json!({"hosts": ["shop"], "backends": [{"address": backend.addr().to_string()}]}),
    );
    let (api, _) = fake.start().await;

    let dir = TempDir::new();
    let ca = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("cert");
    let (cert_path, key_path) = (
        dir.write("tls.crt", &cert.pem()),
        dir.write("tls.key", &key.serialize_pem()),
    );
    let static_token = dir.write("cli-token", "cli-secret\n");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(
        ServeConfig {
            policies: None,
            listen: "0.0.0.0:0".parse().expect("addr"),
            tls: Some((cert_path, key_path)),
            cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
            token_file: Some(static_token),
            kubernetes: Some(kube::Config::new(api.parse().expect("url"))),
            token_review: Some("sluice".into()),
            operators: Vec::new(),
            telemetry: None,
            webhook: None,
            ca: None,
        },
        async {
            let _ = stopped.await;
        },
    )
    .await
    .expect("serve");
    let url = format!("https://localhost:{}", running.addr.port());

    // `=`: the PEM starts with dashes, which clap would take for a flag.
    let ca_pem = format!("--ca-pem={}", ca_cert.pem());
    let with_token = |token: &str, node: &str| {
        let state = dir.path().join(format!("state-{node}"));
        let token_file = dir.write(&format!("token-{node}"), token);
        let args: Vec<String> = [
            "--control-plane",
            &url,
            "--node-id",
            node,
            "--namespace",
            "shop",
            "--state-dir",
            &state.display().to_string(),
            "--token-file",
            &token_file.display().to_string(),
            &ca_pem,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        ProxyProcess::start_args(&args)
    };
    let proxy = with_token("sa-token", "shop-7d4b9");
    proxy.wait_ready().await;
    let response = get(proxy.listen_addr(), "shop", "/")
        .await
        .expect("request");
    assert_eq!(response.status, 200);
    let status = running.store.status();
    let seen = status
        .proxies
        .iter()
        .find(|p| p.node_id == "shop-7d4b9")
        .expect("listed");
    assert_eq!(
        (seen.namespace.as_str(), seen.service_account.as_str()),
        ("shop", "shop-proxy")
    );
    assert_eq!(seen.authenticated_by, "token-review");

    // A token for the Kubernetes API itself is no proof: refused, and the proxy
    // says why in its log.
    let refused = with_token("api-token", "shop-7d4b9");
    eventually(
        Duration::from_secs(10),
        "the refusal in the proxy's log",
        || {
            let stderr = refused.stderr();
            async move { stderr.contains("is invalid for the target audiences") }
        },
    )
    .await;
    let _ = stop.send(());
}
