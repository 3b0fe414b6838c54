//! A `service:` backend's pods from the control plane's endpoint stream, end to end:
//! a real `sluice-proxy` following an in-test control plane that serves one policy
//! (`PolicyDiscovery.StreamPolicies`, as a resource) and pushes the Service's endpoint sets
//! (`EndpointDiscovery.StreamEndpoints`), with fake pods on 127.0.0.11.. .

mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::Stream;
use sluice_control_plane::api::{
    self,
    endpoint_discovery_server::{EndpointDiscovery, EndpointDiscoveryServer},
    policy_discovery_server::{PolicyDiscovery, PolicyDiscoveryServer},
};
use sluice_demo::upstream::{Upstream, UpstreamConfig};
use support::{get, ProxyProcess};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec:\n  hosts: [shop]\n  backends: [{service: reviews, port: http}]\n";

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the fake control plane pushes and what it heard back.
#[derive(Default)]
struct Plane {
    /// The policy YAML, pushed as a new snapshot on change.
    policy: tokio::sync::watch::Sender<String>,
    /// The pods of `default/reviews` (ip, targetPort, ready), pushed whole on change.
    pods: tokio::sync::watch::Sender<Vec<(SocketAddr, bool)>>,
    /// Every ACK/NACK of an endpoint update: (nonce, error).
    answers: Mutex<Vec<(String, String)>>,
    /// Every subscription's Services.
    subscriptions: Mutex<Vec<Vec<String>>>,
}

#[derive(Clone)]
struct Fake(Arc<Plane>);

#[tonic::async_trait]
impl PolicyDiscovery for Fake {
    type StreamPoliciesStream = Out<api::PolicyUpdate>;

    async fn stream_policies(
        &self,
        _request: Request<Streaming<api::PolicyRequest>>,
    ) -> Result<Response<Self::StreamPoliciesStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut policy = self.0.policy.subscribe();
        policy.mark_changed();
        tokio::spawn(async move {
            // Ends when the proxy hangs up or the test drops the plane.
            for version in 1.. {
                if policy.changed().await.is_err() {
                    return;
                }
                // Pushed whatever the proxy subscribed to: it holds what it is sent.
                let update = api::PolicyUpdate {
                    nonce: format!("p{version}"),
                    policies: vec![api::PolicyResource {
                        id: "shop".into(),
                        version: format!("v{version}"),
                        yaml: policy.borrow_and_update().clone(),
                        hosts: vec!["shop".into()],
                    }],
                    ..Default::default()
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_status(
        &self,
        _: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_current(
        &self,
        _: Request<api::CurrentRequest>,
    ) -> Result<Response<api::Snapshot>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_history(
        &self,
        _: Request<api::HistoryRequest>,
    ) -> Result<Response<api::HistoryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn rollback(
        &self,
        _: Request<api::RollbackRequest>,
    ) -> Result<Response<api::RollbackResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

fn update(version: u64, pods: &[(SocketAddr, bool)]) -> api::EndpointsUpdate {
    let endpoints = pods
        .iter()
        .map(|(addr, ready)| api::Endpoint {
            ip: addr.ip().to_string(),
            service_port: 80,
            service_port_name: "http".into(),
            target_port: u32::from(addr.port()),
            ready: *ready,
            serving: true,
            terminating: !*ready,
            pod: format!("default/reviews-{}", addr.ip()),
            zone: String::new(),
            identity: String::new(),
        })
        .collect();
    api::EndpointsUpdate {
        nonce: format!("e{version}"),
        sets: vec![api::EndpointSet {
            service: "default/reviews".into(),
            version,
            endpoints,
        }],
        removed: Vec::new(),
    }
}

#[tonic::async_trait]
impl EndpointDiscovery for Fake {
    type StreamEndpointsStream = Out<api::EndpointsUpdate>;

    async fn stream_endpoints(
        &self,
        request: Request<Streaming<api::EndpointsRequest>>,
    ) -> Result<Response<Self::StreamEndpointsStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let plane = Arc::clone(&self.0);
        tokio::spawn(async move {
            let mut pods = plane.pods.subscribe();
            let mut version = 0;
            pods.mark_changed();
            // Ends when the proxy hangs up (or the test ends with the runtime).
            loop {
                tokio::select! {
                    message = requests.message() => {
                        let Ok(Some(message)) = message else { return };
                        if message.resubscribe {
                            plane.subscriptions.lock().unwrap_or_else(PoisonError::into_inner).push(message.services);
                        } else {
                            plane.answers.lock().unwrap_or_else(PoisonError::into_inner).push((message.response_nonce, message.error));
                        }
                    }
                    changed = pods.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        version += 1;
                        let set = pods.borrow_and_update().clone();
                        if tx.send(Ok(update(version, &set))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn control_plane(plane: Arc<Plane>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = Fake(plane);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PolicyDiscoveryServer::new(fake.clone()))
            .add_service(EndpointDiscoveryServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn pod(ip: [u8; 4], name: &str) -> Upstream {
    Upstream::start(SocketAddr::from((ip, 0)), UpstreamConfig::new(name))
        .await
        .unwrap_or_else(|e| panic!("pod {name}: {e}"))
}

/// Polls (bounded by 10 s) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // Bounded by the deadline.
    while !check().await {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn acked(plane: &Plane, version: u64) -> bool {
    let answers = plane.answers.lock().unwrap_or_else(PoisonError::into_inner);
    answers
        .iter()
        .any(|(nonce, error)| *nonce == format!("e{version}") && error.is_empty())
}

/// `n` requests, `parallel` at a time; every status that was not 200.
async fn send(proxy: SocketAddr, n: usize, parallel: usize) -> Vec<String> {
    let tasks = (0..parallel).map(|_| {
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for _ in 0..n / parallel {
                match get(proxy, "shop", "/").await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => {
                        failed.push(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            failed
        })
    });
    let mut failed = Vec::new();
    for task in futures::future::join_all(tasks).await {
        failed.extend(task.expect("request task"));
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_pods_come_and_go_without_failing_a_request() {
    let pods = [
        pod([127, 0, 0, 11], "a").await,
        pod([127, 0, 0, 12], "b").await,
        pod([127, 0, 0, 13], "c").await,
    ];
    let plane = Arc::new(Plane::default());
    plane.policy.send_replace(POLICY.to_owned());
    plane
        .pods
        .send_replace(pods.iter().map(|p| (p.addr(), true)).collect());
    let url = format!("http://{}", control_plane(Arc::clone(&plane)).await);
    let args: Vec<String> = ["--control-plane", &url, "--node-id", "n1"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let proxy = ProxyProcess::start_args(&args);
    proxy.wait_ready().await;
    let listen = proxy.listen_addr();

    // The subscription names the Service, in the policy's namespace (here `default`).
    eventually("the proxy subscribes to default/reviews", async || {
        plane
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|s| s == &["default/reviews".to_owned()])
    })
    .await;
    eventually("the first set is acknowledged", async || acked(&plane, 1)).await;
    assert_eq!(send(listen, 30, 1).await, Vec::<String>::new());
    for p in &pods {
        assert!(p.requests() > 0, "pod {} got no request", p.name());
    }

    // Pod c stops being ready (terminating): no new request reaches it, none fails.
    plane.pods.send_replace(vec![
        (pods[0].addr(), true),
        (pods[1].addr(), true),
        (pods[2].addr(), false),
    ]);
    eventually("the second set is acknowledged", async || acked(&plane, 2)).await;
    let c_before = pods[2].requests();
    assert_eq!(send(listen, 40, 4).await, Vec::<String>::new());
    assert_eq!(
        pods[2].requests(),
        c_before,
        "a not-ready pod got a new request"
    );

    // /config_dump shows the set, its version and each endpoint's conditions.
    let dump = get(proxy.admin_addr(), "admin", "/config_dump")
        .await
        .expect("config_dump");
    let dump: serde_json::Value = serde_json::from_slice(&dump.body).expect("json");
    let set = &dump["serviceEndpoints"]["default/reviews"];
    assert_eq!(set["version"], 2, "{dump}");
    let not_ready: Vec<&serde_json::Value> = set["endpoints"]
        .as_array()
        .map(|e| e.iter().filter(|e| e["ready"] == false).collect())
        .unwrap_or_default();
    assert_eq!(not_ready.len(), 1, "{set}");
    assert_eq!(not_ready[0]["terminating"], true);

    // A fourth pod appears and takes traffic.
    let d = pod([127, 0, 0, 14], "d").await;
    plane.pods.send_replace(vec![
        (pods[0].addr(), true),
        (pods[1].addr(), true),
        (pods[2].addr(), false),
        (d.addr(), true),
    ]);
    eventually("the third set is acknowledged", async || acked(&plane, 3)).await;
    assert_eq!(send(listen, 40, 4).await, Vec::<String>::new());
    assert!(d.requests() > 0, "the new pod got no request");

    // Pod a is removed while requests flow (it keeps serving what it has, as a
    // terminating pod does): none fails, and it gets nothing new afterwards.
    let flowing = tokio::spawn(send(listen, 200, 4));
    tokio::time::sleep(Duration::from_millis(20)).await;
    plane.pods.send_replace(vec![
        (pods[1].addr(), true),
        (pods[2].addr(), false),
        (d.addr(), true),
    ]);
    assert_eq!(flowing.await.expect("requests"), Vec::<String>::new());
    eventually("the fourth set is acknowledged", async || acked(&plane, 4)).await;
    let a_before = pods[0].requests();
    assert_eq!(send(listen, 30, 3).await, Vec::<String>::new());
    assert_eq!(
        pods[0].requests(),
        a_before,
        "a removed pod got a new request"
    );

    // The backend counts its ready pods: b and d.
    let series =
        "sluice_backend_endpoints{backend=\"reviews.default.svc.cluster.local:0\",policy=\"shop\"}";
    eventually(
        "sluice_backend_endpoints counts the ready pods",
        async || support::sample(&support::metrics(&proxy).await, series) == 2.0,
    )
    .await;
    // A reload that adds a route with a Service backend of its own resubscribes.
    plane.policy.send_replace(format!(
        "{POLICY}  routes:\n    - name: ratings\n      match: {{path: /ratings}}\n      backends: [{{service: ratings.other, port: 8080}}]\n    - name: rest\n"
    ));
    eventually("the proxy resubscribes with other/ratings", async || {
        plane
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|s| s == &["default/reviews".to_owned(), "other/ratings".to_owned()])
    })
    .await;
    assert_eq!(send(listen, 10, 1).await, Vec::<String>::new());

    let metrics = support::metrics(&proxy).await;
    assert!(
        metrics.contains("sluice_endpoints_stream_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_endpoint_updates_total{result=\"ack\"} 4"),
        "{metrics}"
    );
}

/// A control plane that does not say (in time) which policy owns a host: the
/// request waits for `--discovery-timeout`, then gets a 503 worth retrying, not the
/// 404 of a host nobody governs; a host the proxy holds is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_the_control_plane_has_not_answered_for_is_a_503_to_retry() {
    let backend = pod([127, 0, 0, 31], "a").await;
    let plane = Arc::new(Plane::default());
    plane.policy.send_replace(POLICY.replace(
        "backends: [{service: reviews, port: http}]",
        &format!("backends: [{{address: \"{}\"}}]", backend.addr()),
    ));
    let url = format!("http://{}", control_plane(Arc::clone(&plane)).await);
    let args: Vec<String> = [
        "--control-plane",
        &url,
        "--node-id",
        "n2",
        "--discovery-timeout",
        "200ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let proxy = ProxyProcess::start_args(&args);
    proxy.wait_ready().await;
    let listen = proxy.listen_addr();
    eventually("the pushed policy serves", async || {
        get(listen, "shop", "/")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let r = get(listen, "elsewhere", "/").await.expect("request");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.text()
            .contains("has not answered yet which policy governs host \"elsewhere\""),
        "{}",
        r.text()
    );
}
