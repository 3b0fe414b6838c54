//! The Kubernetes source against a fake API server speaking the list/watch protocol
//! (an HTTP server in this test): resources become versions, a broken watch resumes
//! from its last resourceVersion, an invalid resource is refused as a whole.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_control_plane::serve::{start, ServeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn resource(name: &str, rv: u64, hosts: serde_json::Value, burst: i64) -> serde_json::Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv.to_string(), "uid": format!("uid-{name}")},
        "spec": {"hosts": hosts, "routes": [{"name": "all", "rateLimit": {"requestsPerSecond": 10, "burst": burst}}]},
    })
}

fn event(kind: &str, object: serde_json::Value) -> String {
    format!("{}\n", json!({"type": kind, "object": object}))
}

/// Reads one request head (bounded: 64 KiB); returns its request line.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head)
        .lines()
        .next()
        .map(str::to_owned)
}

async fn chunk(stream: &mut TcpStream, data: &str) -> std::io::Result<()> {
    stream
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await
}

/// Serves one list, then watches: the first watch sends a change and breaks; the
/// second (which must resume from resourceVersion 11) adds two resources, one of
/// them invalid, then deletes the invalid one, and stays open.
async fn fake_api_server(listener: TcpListener, watches: Arc<Mutex<Vec<String>>>) {
    // Bounded by the test's life (the runtime ends with it).
    while let Ok((mut stream, _)) = listener.accept().await {
        let watches = Arc::clone(&watches);
        tokio::spawn(async move {
            while let Some(line) = read_head(&mut stream).await {
                let target = line.split(' ').nth(1).unwrap_or("").to_owned();
                if !target.contains("/trafficpolicies") {
                    // Services and EndpointSlices (the endpoints source) are not
                    // this test's: not found, which that source retries.
                    let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
                    let head = format!(
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if stream
                        .write_all(format!("{head}{body}").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                if !target.contains("watch=") {
                    let list = json!({
                        "apiVersion": "sluice.dev/v1alpha1",
                        "kind": "TrafficPolicyList",
                        "metadata": {"resourceVersion": "10"},
                        "items": [resource("catalog", 10, json!(["catalog"]), 5)],
                    })
                    .to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        list.len()
                    );
                    if stream
                        .write_all(format!("{head}{list}").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                let n = {
                    let mut w = watches
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    w.push(target.clone());
                    w.len()
                };
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                if n == 1 {
                    let _ = chunk(
                        &mut stream,
                        &event("MODIFIED", resource("catalog", 11, json!(["catalog"]), 7)),
                    )
                    .await;
                    // The watch breaks: end the stream and the connection.
                    let _ = stream.write_all(b"0\r\n\r\n").await;
                    return;
                }
                let _ = chunk(
                    &mut stream,
                    &event("ADDED", resource("cart", 12, json!(["cart"]), 3)),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = chunk(
                    &mut stream,
                    &event("ADDED", resource("bad", 13, json!(["bad"]), 0)),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = chunk(
                    &mut stream,
                    &event("DELETED", resource("bad", 14, json!(["bad"]), 0)),
                )
                .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
        });
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_custom_resources_through_a_broken_watch() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let watches = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(fake_api_server(listener, Arc::clone(&watches)));

    let config = ServeConfig {
        policies: None,
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
        cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
        token_file: None,
        kubernetes: Some(kube::Config::new(url.parse().expect("url"))),
        token_review: None,
        operators: Vec::new(),
        telemetry: None,
        webhook: None,
        ca: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(config, async {
        let _ = stopped.await;
    })
    .await
    .expect("serve");
    let store = Arc::clone(&running.store);

    // The list, then the change sent on the first watch.
    wait_for("the modified catalog", || {
        store
            .current()
            .is_some_and(|c| c.yaml().contains("burst: 7"))
    })
    .await;
    // The watch broke after resourceVersion 11; the next one resumes from there.
    wait_for("cart from the resumed watch", || {
        store
            .current()
            .is_some_and(|c| c.yaml().contains("name: cart"))
    })
    .await;
    let recorded = watches
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert!(recorded.len() >= 2, "{recorded:?}");
    assert!(recorded[0].contains("resourceVersion=10"), "{recorded:?}");
    assert!(recorded[1].contains("resourceVersion=11"), "{recorded:?}");

    // The invalid resource is refused alone, naming the resource...
    let served = store.current().map(|c| c.version).unwrap_or(0);
    wait_for("the invalid resource refused", || {
        store
            .status()
            .rejected_errors
            .iter()
            .any(|e| e.starts_with("shop/bad: Invalid: kubernetes:shop/bad:"))
    })
    .await;
    assert_eq!(store.current().map(|c| c.version), Some(served));
    let status = store.status();
    assert!(
        status.rejected_errors[0]
            .contains("spec.routes[0].rateLimit.burst: must be at least 1, got 0"),
        "{:?}",
        status.rejected_errors
    );
    // ...and deleting it clears the refusal (nothing served changed: no new version).
    wait_for("the refusal cleared", || {
        store.status().rejected_errors.is_empty()
    })
    .await;
    assert_eq!(store.current().map(|c| c.version), Some(served));
    assert_eq!(
        store.current().map(|c| c.source.clone()),
        Some("kubernetes".to_owned())
    );
    let _ = stop.send(());
}
