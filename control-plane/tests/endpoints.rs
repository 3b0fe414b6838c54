//! `EndpointDiscovery.StreamEndpoints` against the fake API server's Services and
//! EndpointSlices and the real `serve`: a proxy (a client of the same proto) gets
//! the Services it names, each change of them, `removed` when one goes; nothing it
//! did not name; and its ACKs and NACKs show in status.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fake_apiserver::{endpoint_slice, pod, service, FakeApiServer, Kind};
use serde_json::json;
use sluice_control_plane::api::endpoint_discovery_client::EndpointDiscoveryClient;
use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
use sluice_control_plane::api::{EndpointsRequest, EndpointsUpdate, ProxyStatus, StatusRequest};
use sluice_control_plane::serve::{start, Running, ServeConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const OPERATOR_TOKEN: &str = "operator-s3cret";
const PROXY_TOKEN: &str = "client-0-token";

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-eps-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `serve --kubernetes --token-review` on the fake, with a static operator token.
async fn serve(
    fake: &Arc<FakeApiServer>,
    dir: &Path,
) -> (Running, tokio::sync::oneshot::Sender<()>) {
    serve_with(fake, dir, None).await
}

/// The same, as the mesh's CA (trust domain `mesh.test`), or not.
async fn serve_with(
    fake: &Arc<FakeApiServer>,
    dir: &Path,
    ca: Option<sluice_control_plane::ca::CaConfig>,
) -> (Running, tokio::sync::oneshot::Sender<()>) {
    let (url, _) = fake.start().await;
    std::fs::write(dir.join("token"), OPERATOR_TOKEN).expect("token");
    let config = ServeConfig {
        policies: None,
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
        cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
        token_file: Some(dir.join("token")),
        kubernetes: Some(kube::Config::new(url.parse().expect("url"))),
        token_review: Some("sluice".into()),
        operators: Vec::new(),
        telemetry: None,
        webhook: None,
        ca,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(config, async {
        let _ = stopped.await;
    })
    .await
    .expect("serve");
    (running, stop)
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    request
}

/// A proxy's stream: the sender of its requests, and the updates.
struct Proxy {
    tx: mpsc::Sender<EndpointsRequest>,
    updates: Streaming<EndpointsUpdate>,
}

async fn subscribe(
    running: &Running,
    token: Option<&str>,
    services: &[&str],
) -> Result<Proxy, tonic::Status> {
    let mut client = EndpointDiscoveryClient::connect(format!("http://{}", running.addr))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(4);
    tx.send(EndpointsRequest {
        node_id: "client-0".into(),
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        resubscribe: true,
        ..Default::default()
    })
    .await
    .expect("subscribe");
    let updates = client
        .stream_endpoints(with_token(ReceiverStream::new(rx), token))
        .await?
        .into_inner();
    Ok(Proxy { tx, updates })
}

impl Proxy {
    async fn next(&mut self) -> EndpointsUpdate {
        tokio::time::timeout(Duration::from_secs(10), self.updates.message())
            .await
            .expect("an update within 10 s")
            .expect("the stream is open")
            .expect("an update")
    }

    async fn answer(&self, update: &EndpointsUpdate, error: &str) {
        self.tx
            .send(EndpointsRequest {
                node_id: "client-0".into(),
                response_nonce: update.nonce.clone(),
                error: error.into(),
                ..Default::default()
            })
            .await
            .expect("answer");
    }
}

/// `(ip, service_port, name, target_port, ready)` of a Service's set in `update`.
fn endpoints_of(update: &EndpointsUpdate, service: &str) -> Vec<(String, u32, String, u32, bool)> {
    let set = update
        .sets
        .iter()
        .find(|s| s.service == service)
        .unwrap_or_else(|| panic!("{service} not in {update:?}"));
    set.endpoints
        .iter()
        .map(|e| {
            (
                e.ip.clone(),
                e.service_port,
                e.service_port_name.clone(),
                e.target_port,
                e.ready,
            )
        })
        .collect()
}

fn version_of(update: &EndpointsUpdate, service: &str) -> u64 {
    update
        .sets
        .iter()
        .find(|s| s.service == service)
        .map_or(0, |s| s.version)
}

/// The proxy's row in status, once `check` holds (bounded wait).
async fn proxy_status(running: &Running, check: impl Fn(&ProxyStatus) -> bool) -> ProxyStatus {
    let mut client = PolicyDiscoveryClient::connect(format!("http://{}", running.addr))
        .await
        .expect("connect");
    for _ in 0..200 {
        let status = client
            .get_status(with_token(StatusRequest {}, Some(OPERATOR_TOKEN)))
            .await
            .expect("status")
            .into_inner();
        if let Some(p) = status.proxies.into_iter().find(|p| p.node_id == "client-0") {
            if check(&p) {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("status never showed what was expected");
}

fn reviews_slice(endpoints: &[(&str, bool)]) -> serde_json::Value {
    endpoint_slice(
        "shop",
        "reviews-a1",
        "reviews",
        &[("http", 8080)],
        endpoints,
    )
}

fn ip(i: u8, ready: bool) -> (String, u32, String, u32, bool) {
    (format!("127.0.0.{i}"), 80, "http".into(), 8080, ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_gets_its_services_endpoints_each_change_and_removal() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token(PROXY_TOKEN, "sluice", "shop", "client", "client-0");
    // The slice's port is named: it must meet the Service's "http" port, not its
    // first one.
    fake.apply(service(
        "shop",
        "reviews",
        &[("metrics", 9090, json!(9090)), ("http", 80, json!("http"))],
    ));
    let three = [
        ("127.0.0.11", true),
        ("127.0.0.12", true),
        ("127.0.0.13", true),
    ];
    fake.apply(reviews_slice(&three));
    // Two slices, one Service.
    fake.apply(service("shop", "ratings", &[("", 80, json!(8081))]));
    fake.apply(endpoint_slice(
        "shop",
        "ratings-1",
        "ratings",
        &[("", 8081)],
        &[("127.0.0.21", true)],
    ));
    fake.apply(endpoint_slice(
        "shop",
        "ratings-2",
        "ratings",
        &[("", 8081)],
        &[("127.0.0.22", true)],
    ));
    fake.apply(service("shop", "other", &[("", 80, json!(80))]));
    fake.apply(endpoint_slice(
        "shop",
        "other-1",
        "other",
        &[("", 80)],
        &[("127.0.0.31", true)],
    ));
    let dir = temp("flow");
    let (running, stop) = serve(&fake, &dir).await;

    let mut proxy = subscribe(
        &running,
        Some(PROXY_TOKEN),
        &["shop/reviews", "shop/ratings", "shop/missing"],
    )
    .await
    .expect("subscribed");
    let first = proxy.next().await;
    assert_eq!(first.sets.len(), 2, "{first:?}");
    assert!(first.removed.is_empty());
    assert_eq!(
        endpoints_of(&first, "shop/reviews"),
        [ip(11, true), ip(12, true), ip(13, true)]
    );
    let ratings: Vec<String> = endpoints_of(&first, "shop/ratings")
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(ratings, ["127.0.0.21", "127.0.0.22"]);
    let set = &first
        .sets
        .iter()
        .find(|s| s.service == "shop/reviews")
        .expect("reviews")
        .endpoints[0];
    assert_eq!(
        (set.pod.as_str(), set.zone.as_str()),
        ("shop/reviews-11", "zone-a")
    );
    proxy.answer(&first, "").await;
    // The (empty) TrafficPolicy list is served as version 1 once listed.
    for _ in 0..400 {
        if running.store.current().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let policy_version = running.store.current().map(|c| c.version);
    assert_eq!(policy_version, Some(1));
    let acked = proxy_status(&running, |p| p.endpoint_versions.len() == 2).await;
    assert_eq!(
        acked.endpoint_versions.get("shop/reviews"),
        Some(&version_of(&first, "shop/reviews"))
    );
    assert_eq!(
        acked.endpoint_versions.get("shop/ratings"),
        Some(&version_of(&first, "shop/ratings"))
    );

    // A pod turns unready: that Service's whole set again, newer.
    fake.apply(reviews_slice(&[
        ("127.0.0.11", true),
        ("127.0.0.12", false),
        ("127.0.0.13", true),
    ]));
    let unready = proxy.next().await;
    assert_eq!(unready.sets.len(), 1);
    assert_eq!(
        endpoints_of(&unready, "shop/reviews"),
        [ip(11, true), ip(12, false), ip(13, true)]
    );
    assert_ne!(
        version_of(&unready, "shop/reviews"),
        version_of(&first, "shop/reviews")
    );
    proxy.answer(&unready, "").await;

    // A Service nobody asked for changes: nothing is sent (the next update is the
    // fourth pod's).
    fake.apply(endpoint_slice(
        "shop",
        "other-1",
        "other",
        &[("", 80)],
        &[("127.0.0.32", true)],
    ));
    fake.apply(reviews_slice(&[
        ("127.0.0.11", true),
        ("127.0.0.12", false),
        ("127.0.0.13", true),
        ("127.0.0.14", true),
    ]));
    let fourth = proxy.next().await;
    assert_eq!(
        fourth
            .sets
            .iter()
            .map(|s| s.service.as_str())
            .collect::<Vec<_>>(),
        ["shop/reviews"]
    );
    assert_eq!(
        endpoints_of(&fourth, "shop/reviews"),
        [ip(11, true), ip(12, false), ip(13, true), ip(14, true)]
    );
    proxy.answer(&fourth, "").await;
    let v = version_of(&fourth, "shop/reviews");
    proxy_status(&running, |p| {
        p.endpoint_versions.get("shop/reviews") == Some(&v)
    })
    .await;

    // No longer wanted: removed, and gone from status once ACKed.
    proxy
        .tx
        .send(EndpointsRequest {
            node_id: "client-0".into(),
            services: vec!["shop/reviews".into()],
            resubscribe: true,
            ..Default::default()
        })
        .await
        .expect("resubscribe");
    let dropped = proxy.next().await;
    assert_eq!(
        (dropped.sets.len(), dropped.removed.as_slice()),
        (0, ["shop/ratings".to_owned()].as_slice())
    );
    proxy.answer(&dropped, "").await;
    proxy_status(&running, |p| p.endpoint_versions.len() == 1).await;

    // The Service is deleted: removed. The proxy refuses that update: status says.
    assert!(fake.delete(Kind::Service, "shop", "reviews"));
    let deleted = proxy.next().await;
    assert_eq!(
        (deleted.sets.len(), deleted.removed.as_slice()),
        (0, ["shop/reviews".to_owned()].as_slice())
    );
    proxy.answer(&deleted, "cannot drop the last backend").await;
    let nacked = proxy_status(&running, |p| !p.last_endpoints_nack_error.is_empty()).await;
    assert_eq!(
        nacked.last_endpoints_nack_error,
        "cannot drop the last backend"
    );
    assert_eq!(nacked.last_endpoints_nack, ["shop/reviews removed"]);

    // ...and back: sent again whole (its version is its content's hash).
    fake.apply(service("shop", "reviews", &[("http", 80, json!("http"))]));
    let back = proxy.next().await;
    assert_ne!(version_of(&back, "shop/reviews"), 0, "{back:?}");
    assert_eq!(endpoints_of(&back, "shop/reviews").len(), 4);

    // `sluice-cp status` shows it too.
    proxy.answer(&back, "").await;
    let v = version_of(&back, "shop/reviews");
    proxy_status(&running, |p| {
        p.endpoint_versions.get("shop/reviews") == Some(&v)
    })
    .await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-cp"))
        .args([
            "status",
            "--server",
            &format!("http://{}", running.addr),
            "--token-file",
        ])
        .arg(dir.join("token"))
        .output()
        .expect("sluice-cp status runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("  endpoints acked: shop/reviews@{v}\n")),
        "{text}"
    );
    assert!(
        text.contains("  endpoints NACK: cannot drop the last backend (shop/reviews removed)\n"),
        "{text}"
    );
    assert_eq!(running.metrics.endpoint_sets.get(), 3);
    // Endpoint changes make no policy version.
    assert_eq!(running.store.current().map(|c| c.version), policy_version);
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_stream_is_refused() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token(PROXY_TOKEN, "sluice", "shop", "client", "client-0");
    let dir = temp("auth");
    let (running, stop) = serve(&fake, &dir).await;
    let refused = |r: Result<Proxy, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        refused(subscribe(&running, None, &["shop/reviews"]).await),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        refused(subscribe(&running, Some("forged"), &["shop/reviews"]).await),
        Some(tonic::Code::Unauthenticated)
    );
    // A proxy's token speaks for its own pod only.
    fake.add_token("other-pod", "sluice", "shop", "client", "client-1");
    assert_eq!(
        refused(subscribe(&running, Some("other-pod"), &["shop/reviews"]).await),
        Some(tonic::Code::PermissionDenied)
    );
    // The right token: answered, empty (no such Service).
    let mut proxy = subscribe(&running, Some(PROXY_TOKEN), &["shop/reviews"])
        .await
        .expect("subscribed");
    let first = proxy.next().await;
    assert!(
        first.sets.is_empty() && first.removed.is_empty(),
        "{first:?}"
    );
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `(ip, identity)` of a Service's set in `update`.
fn identities_of(update: &EndpointsUpdate, service: &str) -> Vec<(String, String)> {
    update
        .sets
        .iter()
        .find(|s| s.service == service)
        .unwrap_or_else(|| panic!("{service} not in {update:?}"))
        .endpoints
        .iter()
        .map(|e| (e.ip.clone(), e.identity.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_pods_endpoints_carry_their_service_accounts_identity() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token(PROXY_TOKEN, "sluice", "shop", "client", "client-0");
    fake.apply(service("shop", "reviews", &[("http", 80, json!("http"))]));
    fake.apply(reviews_slice(&[
        ("127.0.0.1", true),
        ("127.0.0.2", true),
        ("127.0.0.3", true),
    ]));
    // reviews-1 is meshed with a certificate; reviews-2 is meshed by an older
    // injector (no certificate), reviews-3 not at all.
    fake.apply(pod("shop", "reviews-1", "reviews-sa", true));
    let mut old = pod("shop", "reviews-2", "reviews-sa", true);
    old["spec"]["initContainers"][0]["args"] = json!(["--token-file", "/t"]);
    fake.apply(old);
    fake.apply(pod("shop", "reviews-3", "reviews-sa", false));
    let dir = temp("identities");
    sluice_control_plane::ca::init(&dir.join("ca"), "mesh.test").expect("ca");
    let ca = sluice_control_plane::ca::CaConfig {
        cert: dir.join("ca/ca.crt"),
        key: dir.join("ca/ca.key"),
        trust_roots: None,
        trust_domain: "mesh.test".into(),
        ttl: Duration::from_secs(3600),
        static_token_identities: false,
    };
    let (running, _stop) = serve_with(&fake, &dir, Some(ca)).await;
    let mut proxy = subscribe(&running, Some(PROXY_TOKEN), &["shop/reviews"])
        .await
        .expect("subscribed");
    let first = proxy.next().await;
    let id = "spiffe://mesh.test/ns/shop/sa/reviews-sa".to_owned();
    assert_eq!(
        identities_of(&first, "shop/reviews"),
        [
            ("127.0.0.1".to_owned(), id.clone()),
            ("127.0.0.2".to_owned(), String::new()),
            ("127.0.0.3".to_owned(), String::new()),
        ]
    );
    proxy.answer(&first, "").await;

    // A pod meshed later changes its Service's set; one going away too.
    fake.apply(pod("shop", "reviews-3", "reviews-sa", true));
    let update = proxy.next().await;
    assert_eq!(identities_of(&update, "shop/reviews")[2].1, id);
    proxy.answer(&update, "").await;
    assert!(fake.delete(Kind::Pod, "shop", "reviews-1"));
    let update = proxy.next().await;
    assert_eq!(identities_of(&update, "shop/reviews")[0].1, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_no_endpoint_carries_an_identity() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token(PROXY_TOKEN, "sluice", "shop", "client", "client-0");
    fake.apply(service("shop", "reviews", &[("http", 80, json!("http"))]));
    fake.apply(reviews_slice(&[("127.0.0.1", true)]));
    fake.apply(pod("shop", "reviews-1", "reviews-sa", true));
    let dir = temp("no-identities");
    let (running, _stop) = serve(&fake, &dir).await;
    let mut proxy = subscribe(&running, Some(PROXY_TOKEN), &["shop/reviews"])
        .await
        .expect("subscribed");
    let first = proxy.next().await;
    assert_eq!(
        identities_of(&first, "shop/reviews"),
        [("127.0.0.1".to_owned(), String::new())]
    );
}
