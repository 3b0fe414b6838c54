//! The whole chain as it runs in a cluster: a (fake) Kubernetes API with
//! TrafficPolicies, Services and EndpointSlices; the real control plane following it
//! (`serve --kubernetes`); a real `sluice-proxy` following the control plane. Pods
//! are demo upstreams on loopback addresses (127.0.0.0/8 is all local on Linux), one
//! EndpointSlice each (each pod listens on a port of its own, and slices carry ports).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_control_plane::serve::{start, ServeConfig};
use sluice_demo::upstream::{Upstream, UpstreamConfig};
use support::{get, ProxyProcess, TempDir};

#[path = "../../control-plane/tests/support/fake_apiserver.rs"]
mod fake_apiserver;

use fake_apiserver::{endpoint_slice, service, FakeApiServer, Kind};

async fn pod(ip: [u8; 4], name: &str) -> Upstream {
    Upstream::start(SocketAddr::from((ip, 0)), UpstreamConfig::new(name))
        .await
        .unwrap_or_else(|e| panic!("pod {name}: {e}"))
}

/// The EndpointSlice of one pod of `service`: its address and port, ready or not.
fn slice_of(service_name: &str, pod: &Upstream, ready: bool) -> serde_json::Value {
    let addr = pod.addr();
    let name = format!("{service_name}-{}", addr.ip().to_string().replace('.', "-"));
    endpoint_slice(
        "shop",
        &name,
        service_name,
        &[("http", addr.port())],
        &[(&addr.ip().to_string(), ready)],
    )
}

fn slice_name(service_name: &str, pod: &Upstream) -> String {
    format!(
        "{service_name}-{}",
        pod.addr().ip().to_string().replace('.', "-")
    )
}

/// The fake cluster, the control plane and a proxy following it.
struct Cluster {
    fake: Arc<FakeApiServer>,
    proxy: ProxyProcess,
    _running: sluice_control_plane::serve::Running,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: TempDir,
}

async fn cluster(policies: &[(&str, serde_json::Value)]) -> Cluster {
    let fake = Arc::new(FakeApiServer::default());
    for (name, spec) in policies {
        fake.add_policy("shop", name, spec.clone());
    }
    let (api, _) = fake.start().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(
        ServeConfig {
            policies: None,
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls: None,
            cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
            token_file: None,
            kubernetes: Some(kube::Config::new(api.parse().expect("url"))),
            token_review: None,
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
    let dir = TempDir::new();
    let url = format!("http://127.0.0.1:{}", running.addr.port());
    let state = dir.path().join("state").display().to_string();
    let args: Vec<String> = [
        "--control-plane",
        &url,
        "--node-id",
        "shop-7d4b9",
        "--namespace",
        "shop",
        "--state-dir",
        &state,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let proxy = ProxyProcess::start_args(&args);
    proxy.wait_ready().await;
    // Serve stops when `_stop` is dropped, with the test.
    Cluster {
        fake,
        proxy,
        _running: running,
        _stop: stop,
        _dir: dir,
    }
}

/// Which pod answered a request for `host` (`Err` for a failed request).
async fn ask(proxy: SocketAddr, host: &str) -> Result<String, String> {
    match get(proxy, host, "/").await {
        Ok(r) if r.status == 200 => Ok(r.header("x-upstream").unwrap_or("?").to_owned()),
        Ok(r) => Err(format!("{} {}", r.status, r.text())),
        Err(e) => Err(e.to_string()),
    }
}

/// Polls (bounded by 30 s) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    // Bounded by the deadline.
    while !check().await {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` requests: how many each pod answered; panics on a failed one.
async fn spread(proxy: SocketAddr, host: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let pod = ask(proxy, host)
            .await
            .unwrap_or_else(|e| panic!("a request failed: {e}"));
        *seen.entry(pod).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_come_go_and_turn_unready_without_a_failed_request() {
    let pods = [
        pod([127, 0, 0, 11], "r1").await,
        pod([127, 0, 0, 12], "r2").await,
        pod([127, 0, 0, 13], "r3").await,
    ];
    let c = cluster(&[(
        "ratings",
        json!({"hosts": ["ratings"], "backends": [{"service": "ratings", "port": "http"}]}),
    )])
    .await;
    c.fake
        .apply(service("shop", "ratings", &[("http", 9080, json!("http"))]));
    for p in &pods {
        c.fake.apply(slice_of("ratings", p, true));
    }
    let addr = c.proxy.listen_addr();
    // Before the first endpoint set arrives the Service has no pod: 502s.
    eventually("requests spread over all three pods", async || {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            if let Ok(pod) = ask(addr, "ratings").await {
                seen.insert(pod);
            }
        }
        seen.len() == 3
    })
    .await;

    // Load all along from here: not one request may fail.
    let (stop, failures, served) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        tokio::spawn(async move {
            // Bounded: the test stops it; the cap is a backstop.
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                match ask(addr, "ratings").await {
                    Ok(_) => served.fetch_add(1, Ordering::AcqRel),
                    Err(_) => failures.fetch_add(1, Ordering::AcqRel),
                };
            }
        })
    };

    // r2 turns unready: it gets no new request once the proxy has the change.
    c.fake.apply(slice_of("ratings", &pods[1], false));
    eventually("r2 out of rotation", async || {
        !spread(addr, "ratings", 30).await.contains_key("r2")
    })
    .await;
    assert!(!spread(addr, "ratings", 60).await.contains_key("r2"));

    // A fourth pod appears and takes traffic.
    let r4 = pod([127, 0, 0, 14], "r4").await;
    c.fake.apply(slice_of("ratings", &r4, true));
    eventually("r4 takes traffic", async || {
        spread(addr, "ratings", 30).await.contains_key("r4")
    })
    .await;

    // A rolling restart: each old pod is replaced, its successor ready before
    // the old one turns unready, then its slice goes.
    let mut successors = Vec::new();
    for (i, old) in pods.iter().enumerate() {
        let new = pod([127, 0, 0, 21 + i as u8], &format!("n{}", i + 1)).await;
        c.fake.apply(slice_of("ratings", &new, true));
        let name = format!("n{}", i + 1);
        eventually("the successor takes traffic", async || {
            spread(addr, "ratings", 30).await.contains_key(&name)
        })
        .await;
        c.fake.apply(slice_of("ratings", old, false));
        let old_name = format!("r{}", i + 1);
        eventually("the old pod out of rotation", async || {
            !spread(addr, "ratings", 30).await.contains_key(&old_name)
        })
        .await;
        assert!(c
            .fake
            .delete(Kind::EndpointSlice, "shop", &slice_name("ratings", old)));
        successors.push(new);
    }
    stop.store(true, Ordering::Release);
    load.await.expect("load");
    assert!(served.load(Ordering::Acquire) > 0, "the load ran");
    assert_eq!(
        failures.load(Ordering::Acquire),
        0,
        "requests failed while pods came and went"
    );
    let now: Vec<String> = spread(addr, "ratings", 60).await.into_keys().collect();
    assert_eq!(now, ["n1", "n2", "n3", "r4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_over_two_services_holds_whatever_their_pod_counts() {
    let mut v1 = Vec::new();
    for i in 0..3u8 {
        v1.push(pod([127, 0, 0, 41 + i], "v1").await);
    }
    let mut v2 = Vec::new();
    for i in 0..7u8 {
        v2.push(pod([127, 0, 0, 51 + i], "v2").await);
    }
    let c = cluster(&[(
        "reviews",
        json!({"hosts": ["reviews"], "backends": [
            {"service": "reviews-v1", "port": 9080, "weight": 90},
            {"service": "reviews-v2", "port": 9080, "weight": 10},
        ]}),
    )])
    .await;
    for (name, pods) in [("reviews-v1", &v1), ("reviews-v2", &v2)] {
        c.fake
            .apply(service("shop", name, &[("http", 9080, json!("http"))]));
        for p in pods.iter() {
            c.fake.apply(slice_of(name, p, true));
        }
    }
    let addr = c.proxy.listen_addr();
    // The first request discovers the policy (it may fail: no pods known yet).
    let _ = ask(addr, "reviews").await;
    let endpoints = (c.proxy.addr("admin"), "/config_dump".to_owned());
    eventually("all ten pods known to the proxy", async || {
        let dump = reqwest_free_get(&endpoints).await;
        v1.iter()
            .chain(&v2)
            .all(|p| dump.contains(&p.addr().to_string()))
    })
    .await;
    let seen = spread(addr, "reviews", 1_000).await;
    let share = seen.get("v1").copied().unwrap_or(0) as f64 / 1_000.0;
    assert!(
        (0.88..=0.92).contains(&share),
        "v1 got {share} of 1,000 requests ({seen:?})"
    );
}

/// A GET of the proxy's own admin endpoint, as text.
async fn reqwest_free_get(url: &(SocketAddr, String)) -> String {
    get(url.0, "localhost", &url.1)
        .await
        .map(|r| r.text())
        .unwrap_or_default()
}
