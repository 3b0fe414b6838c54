//! `sluice-cp serve` as a client sees it: each policy a resource, sent to those
//! who subscribe to its host, refused alone (by the proxy, or invalid at the
//! source) and shown in status, the API locked behind TLS and a bearer token off loopback, and what the
//! real binary logs when it accepts a policy with warnings.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
use sluice_control_plane::api::{PolicyRequest, StatusRequest};
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
        ca: None,
    };
    config(&mut c);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(c, async {
        let _ = stopped.await;
    })
    .await?;
    Ok((running, stop))
}

fn cart(version: u32) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: cart}}\nspec:\n  hosts: [cart]\n  routes:\n    - name: r{version}\n"
    )
}

/// Replaces `name` in `dir` atomically (the watch must not read half a file).
fn write(dir: &Path, name: &str, yaml: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

type Client = PolicyDiscoveryClient<tonic::transport::Channel>;

/// A client of `running`'s API, and a policy stream opened with `first`.
async fn subscribe(
    running: &Running,
    first: PolicyRequest,
) -> (
    Client,
    tokio::sync::mpsc::Sender<PolicyRequest>,
    tonic::Streaming<sluice_control_plane::api::PolicyUpdate>,
) {
    let mut client = PolicyDiscoveryClient::connect(format!("http://{}", running.addr))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.expect("subscribe");
    let stream = client
        .stream_policies(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    (client, tx, stream)
}

/// The proxy `node`'s entry in status, once `check` holds (bounded wait).
async fn proxy_status(
    client: &mut Client,
    node: &str,
    check: impl Fn(&sluice_control_plane::api::ProxyStatus) -> bool,
) -> sluice_control_plane::api::ProxyStatus {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client
            .get_status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if let Some(p) = status.proxies.into_iter().find(|p| p.node_id == node) {
            if check(&p) {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "status never showed it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_subscriber_gets_the_policies_of_its_hosts_only_and_refuses_one_alone() {
    let dir = temp("resources");
    let policies = dir.join("policies");
    write(&policies, "cart.yaml", &cart(1));
    write(&policies, "other.yaml", &POLICY.replace("shop", "other"));
    let (running, stop) = serve(&dir, |_| {}).await.expect("serve");
    let hello = PolicyRequest {
        node_id: "fake-proxy".into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    let (mut client, tx, mut stream) = subscribe(
        &running,
        PolicyRequest {
            hosts_added: vec!["shop".into(), "nowhere.example".into()],
            ..hello.clone()
        },
    )
    .await;
    // Only what it asked for, and an answer for the host nobody owns.
    let first = stream
        .message()
        .await
        .expect("message")
        .expect("an update at once");
    let ids: Vec<&str> = first.policies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["shop"]);
    assert!(first.policies[0].yaml.contains("name: shop"));
    assert_eq!(first.unknown_hosts, ["nowhere.example"]);
    let shop_version = first.policies[0].version.clone();
    tx.send(PolicyRequest {
        response_nonce: first.nonce.clone(),
        refused: [("shop".to_owned(), "proxy.yaml:3:7: cannot apply".to_owned())].into(),
        ..hello.clone()
    })
    .await
    .expect("nack");
    let proxy = proxy_status(&mut client, "fake-proxy", |p| !p.last_nack.is_empty()).await;
    assert_eq!(proxy.last_nack, [format!("shop@{shop_version}")]);
    assert!(proxy.last_nack_error.contains("cannot apply"));
    assert!(proxy.policy_versions.is_empty());
    assert_eq!((proxy.hosts_wanted, proxy.all_policies), (2, false));

    // A host added later: that policy alone.
    tx.send(PolicyRequest {
        hosts_added: vec!["cart".into()],
        ..hello.clone()
    })
    .await
    .expect("more");
    let second = stream.message().await.expect("message").expect("update");
    let ids: Vec<&str> = second.policies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["cart"]);
    tx.send(PolicyRequest {
        response_nonce: second.nonce.clone(),
        ..hello.clone()
    })
    .await
    .expect("ack");
    let cart_v1 = second.policies[0].version.clone();
    proxy_status(&mut client, "fake-proxy", |p| {
        p.policy_versions.get("cart") == Some(&cart_v1)
    })
    .await;

    // A policy nobody here wants changes: nothing is sent for it; the next update
    // is the next change of a wanted one, that policy alone.
    write(
        &policies,
        "other.yaml",
        &POLICY.replace("shop", "elsewhere"),
    );
    write(&policies, "cart.yaml", &cart(2));
    let third = stream.message().await.expect("message").expect("update");
    let ids: Vec<&str> = third.policies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["cart"], "{third:?}");
    assert_ne!(third.policies[0].version, cart_v1);
    assert!(third.removed.is_empty());

    // Unsubscribed: removed.
    tx.send(PolicyRequest {
        hosts_removed: vec!["cart".into()],
        ..hello.clone()
    })
    .await
    .expect("less");
    let fourth = stream.message().await.expect("message").expect("update");
    assert_eq!(fourth.removed, ["cart"]);
    assert!(fourth.policies.is_empty());
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn an_invalid_file_refuses_its_own_policy_and_the_others_go_on() {
    let dir = temp("per-policy");
    let policies = dir.join("policies");
    write(&policies, "cart.yaml", &cart(1));
    let (running, stop) = serve(&dir, |_| {}).await.expect("serve");
    let store = std::sync::Arc::clone(&running.store);
    let served = |id: &str| {
        store
            .served()
            .policies
            .get(&sluice_policy::PolicyId::parse(id))
            .map(|p| p.version.clone())
    };
    let (shop_v1, cart_v1) = (served("shop").expect("shop"), served("cart").expect("cart"));
    // shop breaks, cart changes, in one reload: cart's change is served, shop keeps
    // its last good version, and status says where shop is wrong.
    write(
        &policies,
        "shop.yaml",
        &POLICY.replace("hosts: [shop]", "hosts: [shop], mode: loud"),
    );
    write(&policies, "cart.yaml", &cart(2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while served("cart") == Some(cart_v1.clone()) {
        assert!(Instant::now() < deadline, "cart's change was never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while running.store.rejected().is_empty() {
        assert!(Instant::now() < deadline, "shop's refusal never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served("shop"), Some(shop_v1.clone()));
    let rejected = running.store.rejected();
    assert!(
        rejected[0].starts_with("shop: Invalid: ")
            && rejected[0].contains("shop.yaml:4:")
            && rejected[0].contains("spec.mode"),
        "{rejected:?}"
    );
    assert!(rejected[0].contains(&format!("still serving its last good version {shop_v1}")));
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
    assert_eq!(line["policy"], "shop");
    let warning = format!(
        "{}:8:7: warning: spec.routes[1]: route \"orders\" can never match: route \"all\" (spec.routes[0]) matches every request it would",
        policy.display()
    );
    // Several warnings are one field, one per line.
    assert_eq!(line["warnings"], serde_json::json!(warning));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn a_subscriber_to_every_policy_of_a_large_mesh_gets_it_in_parts() {
    let dir = temp("parts");
    let policies = dir.join("policies");
    // Two files: the YAML reader takes at most 1,024 documents per file.
    for half in 0..2 {
        let mesh: Vec<String> = (half * 750..(half + 1) * 750)
            .map(|i| POLICY.replace("shop", &format!("s{i}")))
            .collect();
        write(&policies, &format!("mesh-{half}.yaml"), &mesh.join("---\n"));
    }
    let (running, stop) = serve(&dir, |_| {}).await.expect("serve");
    let hello = PolicyRequest {
        node_id: "everything".into(),
        ..Default::default()
    };
    let (mut client, tx, mut stream) = subscribe(
        &running,
        PolicyRequest {
            all: true,
            ..hello.clone()
        },
    )
    .await;
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a part within 30 s")
            .expect("message")
            .expect("part")
    };
    let first = next().await;
    let second = next().await;
    assert_eq!((first.policies.len(), first.more), (1000, true));
    assert_eq!((second.policies.len(), second.more), (501, false));
    for part in [first, second] {
        tx.send(PolicyRequest {
            response_nonce: part.nonce,
            ..hello.clone()
        })
        .await
        .expect("ack");
    }
    proxy_status(&mut client, "everything", |p| {
        p.policy_versions.len() == 1501
    })
    .await;
    let _ = stop.send(());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
