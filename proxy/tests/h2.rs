//! The HTTP/2 engine end to end: an h2c client (the `h2` crate) through the real
//! `sluice-proxy` binary (`--h2c`) to an in-process h2c backend and to an HTTP/1
//! backend: trailers, large bodies, refusals, broken backends, clients that leave,
//! and HTTP/1.1 clients to h2c backends. The bounds are in `h2_bounds.rs`.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use support::http2::{
    chunked_http1_backend, connect, get, h2c_backend, header, policy, request, send, WAIT,
};
use support::{log_lines, start_with, upstream, TempDir};

#[tokio::test]
async fn h2c_client_reaches_an_h2c_backend_with_te_and_the_remaining_grpc_timeout() {
    let (backend, _seen) = h2c_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let req = request("POST", "grpc", "/pkg.Svc/Get")
        .header("te", "trailers")
        .header("grpc-timeout", "100m")
        .header("content-type", "application/grpc")
        .body(())
        .expect("request");
    let got = send(&client, req, None, None).await.expect("exchange");
    assert_eq!(got.status, 200);
    assert_eq!(got.body, b"ok");
    assert_eq!(header(&got.headers, "x-seen-te"), "trailers");
    // What is left of the deadline goes upstream, in place of the client's.
    let sent = header(&got.headers, "x-seen-grpc-timeout");
    let (digits, unit) = sent.split_at(sent.len().saturating_sub(1));
    let nanos_per = match unit {
        "n" => 1,
        "u" => 1_000,
        "m" => 1_000_000,
        "S" => 1_000_000_000,
        other => panic!("grpc-timeout unit {other:?} in {sent:?}"),
    };
    let left = digits.parse::<u64>().expect("grpc-timeout digits") * nanos_per;
    assert!(
        left > 0 && left <= 100_000_000,
        "grpc-timeout {sent} within 100 ms"
    );
    let log = log_lines(&proxy, 1).await;
    assert_eq!(log[0]["route"], "all");
    assert_eq!(log[0]["status"], 200);
}

#[tokio::test]
async fn h2c_client_reaches_an_http1_backend_and_hop_by_hop_fields_stay_behind() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", a.addr(), false, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let got = get(&client, "shop", "/orders/1?x=1").await;
    assert_eq!(got.status, 200);
    assert_eq!(String::from_utf8_lossy(&got.body), "a GET /orders/1?x=1\n");
    assert_eq!(header(&got.headers, "x-upstream"), "a");
    assert!(got.headers.get("connection").is_none());
    assert!(got.headers.get("keep-alive").is_none());
    // The same connection carries more; so does HTTP/1.1 on the same listener.
    let again = get(&client, "shop", "/again").await;
    assert_eq!(String::from_utf8_lossy(&again.body), "a GET /again\n");
    let h1 = support::get(proxy.listen_addr(), "shop", "/h1")
        .await
        .expect("h1");
    assert_eq!(h1.status, 200);
    assert_eq!(a.requests(), 3);
}

#[tokio::test]
async fn many_concurrent_streams_on_one_connection_all_answered() {
    let (backend, seen) = h2c_backend().await;
    let a = upstream("a").await;
    let dir = TempDir::new();
    let yaml = format!(
        "{}---\n{}",
        policy("grpc", backend, true, "    - name: all\n"),
        policy("shop", a.addr(), false, "    - name: all\n")
    );
    let proxy = start_with(&dir, &yaml, &["--h2c"]).await;
    let client = connect(proxy.listen_addr()).await;
    // The proxy's SETTINGS (100 streams at once) arrive with the first exchange;
    // the client then holds back what exceeds it.
    assert_eq!(get(&client, "grpc", "/").await.status, 200);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (host, path) = if i % 2 == 0 {
                ("grpc", "/slow")
            } else {
                ("shop", "/x")
            };
            get(&client, host, path).await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert_eq!(seen.streams.load(Ordering::SeqCst), 101);
    assert_eq!(a.requests(), 100);
}

#[tokio::test]
async fn a_body_larger_than_the_window_streams_through_with_trailers_both_ways() {
    let (backend, _seen) = h2c_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    // 3 MiB: past the client's default 64 KiB window, Sluice's 256 KiB stream and
    // 1 MiB connection windows.
    let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-req-trailer", http::HeaderValue::from_static("sent"));
    let req = request("POST", "grpc", "/echo").body(()).expect("request");
    let got = send(
        &client,
        req,
        Some(Bytes::from(data.clone())),
        Some(trailers),
    )
    .await
    .expect("exchange");
    assert_eq!(got.status, 200);
    assert!(got.body == data, "the body comes back whole and in order");
    let trailers = got.trailers.expect("trailers relayed");
    assert_eq!(header(&trailers, "grpc-status"), "0");
    assert_eq!(
        header(&trailers, "x-body-len"),
        (3 * 1024 * 1024).to_string()
    );
    assert_eq!(header(&trailers, "x-echo-trailer"), "sent");
}

#[tokio::test]
async fn a_large_body_goes_to_an_http1_backend_chunked() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", a.addr(), false, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let req = request("POST", "shop", "/upload")
        .body(())
        .expect("request");
    let got = send(&client, req, Some(Bytes::from(vec![7u8; 600 * 1024])), None)
        .await
        .expect("exchange");
    assert_eq!(got.status, 200);
    assert_eq!(String::from_utf8_lossy(&got.body), "a POST /upload\n");
}

#[tokio::test]
async fn a_rate_limited_route_refuses_over_h2_with_429() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let routes = "    - name: limited\n      rateLimit: {requestsPerSecond: 0.01, burst: 1}\n";
    let proxy = start_with(&dir, &policy("shop", a.addr(), false, routes), &["--h2c"]).await;
    let client = connect(proxy.listen_addr()).await;
    assert_eq!(get(&client, "shop", "/").await.status, 200);
    let refused = get(&client, "shop", "/").await;
    assert_eq!(refused.status, 429);
    assert!(!header(&refused.headers, "retry-after").is_empty());
    assert_eq!(header(&refused.headers, "ratelimit-remaining"), "0");
    assert!(String::from_utf8_lossy(&refused.body).contains("rate limit"));
    // The connection stays usable after a refusal.
    assert_eq!(get(&client, "shop", "/").await.status, 429);
    assert_eq!(a.requests(), 1);
}

#[tokio::test]
async fn a_backend_reset_is_a_502_and_counted_broken() {
    let (backend, _seen) = h2c_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let got = get(&client, "grpc", "/reset").await;
    assert_eq!(got.status, 502);
    assert!(String::from_utf8_lossy(&got.body).contains("failed"));
    // The connection, and the backend connection, go on.
    assert_eq!(get(&client, "grpc", "/").await.status, 200);
    let log = log_lines(&proxy, 2).await;
    assert_eq!(log[0]["status"], 502);
}

#[tokio::test]
async fn a_transparent_listener_takes_the_preface_without_the_h2c_flag() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", a.addr(), false, "    - name: all\n"),
        &["--transparent"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let got = get(&client, "shop", "/t").await;
    assert_eq!(got.status, 200);
    assert_eq!(String::from_utf8_lossy(&got.body), "a GET /t\n");
}

#[tokio::test]
async fn http1_clients_reach_h2c_backends_on_the_fast_path() {
    let (backend, seen) = h2c_backend().await;
    let dir = TempDir::new();
    // No --h2c: that flag is about clients; backends speak what the policy says.
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &[],
    )
    .await;
    let mut client = support::HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let got = client
        .request("GET", "grpc", "/", &[("te", "trailers")], b"")
        .await
        .expect("get");
    assert_eq!((got.status, got.text()), (200, "ok".to_owned()));
    // `te` is hop-by-hop for an HTTP/1.1 client: it stays behind.
    assert_eq!(got.header("x-seen-te"), Some("-"));
    let echoed = client
        .request("POST", "grpc", "/echo", &[], b"hello body")
        .await
        .expect("post");
    assert_eq!(
        (echoed.status, echoed.text()),
        (200, "hello body".to_owned())
    );
    // Keep-alive: the same client connection goes on.
    let again = client
        .request("GET", "grpc", "/", &[], b"")
        .await
        .expect("again");
    assert_eq!(again.status, 200);
    assert_eq!(seen.streams.load(Ordering::SeqCst), 3);
    let log = log_lines(&proxy, 3).await;
    assert!(log
        .iter()
        .all(|l| l["status"] == 200 && l["route"] == "all"));
}

#[tokio::test]
async fn connect_is_not_served_over_h2() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", a.addr(), false, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("shop:443")
        .body(())
        .expect("request");
    let got = send(&client, req, None, None).await.expect("exchange");
    assert_eq!(got.status, 501);
    assert_eq!(a.requests(), 0, "nothing reached the backend");
    assert_eq!(get(&client, "shop", "/").await.status, 200);
}

#[tokio::test]
async fn a_chunked_http1_response_becomes_data_and_trailers() {
    let backend = chunked_http1_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", backend, false, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let got = get(&client, "shop", "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, b"hello world");
    assert!(got.headers.get("transfer-encoding").is_none());
    assert!(got.headers.get("connection").is_none());
    assert!(got.headers.get("keep-alive").is_none());
    let trailers = got.trailers.expect("trailers");
    assert_eq!(header(&trailers, "grpc-status"), "0");
    assert_eq!(header(&trailers, "x-trailer"), "t");
}

#[tokio::test]
async fn a_client_that_resets_its_stream_is_recorded_gone() {
    let (backend, seen) = h2c_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    let mut ready = client.clone().ready().await.expect("ready");
    let req = request("GET", "grpc", "/slow").body(()).expect("request");
    let (response, _) = ready.send_request(req, true).expect("send");
    // Bounded wait until the stream is at the backend, then the client gives up.
    let deadline = std::time::Instant::now() + WAIT;
    while seen.in_flight.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(response);
    let log = log_lines(&proxy, 1).await;
    assert_eq!(log[0]["status"], 0, "nothing was answered: {:?}", log[0]);
    // The connection goes on.
    assert_eq!(get(&client, "grpc", "/").await.status, 200);
}
