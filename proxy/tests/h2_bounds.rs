//! The HTTP/2 engine's bounds end to end: concurrent streams per client connection,
//! streams per backend connection, a Rapid Reset flood, the header list, the idle
//! timeout and shutdown (GOAWAY).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use support::http2::{connect, get, h2c_backend, h2c_backend_with, policy, request, send, WAIT};
use support::{start_with, upstream, TempDir};

#[tokio::test]
async fn the_proxy_advertises_and_keeps_its_concurrent_stream_bound() {
    let (backend, seen) = h2c_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    // The SETTINGS arrive with the first exchange.
    assert_eq!(get(&client, "grpc", "/").await.status, 200);
    assert_eq!(client.current_max_send_streams(), 100);
    // 150 slow streams at once: the rest wait, none is refused or lost.
    let mut tasks = Vec::new();
    for _ in 0..150 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            get(&client, "grpc", "/slow").await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert!(seen.max_in_flight.load(Ordering::SeqCst) <= 100);

    // A client that starts out assuming more (before the SETTINGS arrive) gets
    // REFUSED_STREAM for what exceeds the bound (RFC 9113 §5.1.2), or holds it
    // back once it knows: either way no more than 100 are served at once.
    let tcp = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let (rude, conn) = h2::client::Builder::new()
        .initial_max_send_streams(300)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut rude = rude;
    let mut responses = Vec::new();
    for _ in 0..150 {
        let req = request("GET", "grpc", "/slow").body(()).expect("request");
        match rude.send_request(req, true) {
            Ok((response, _)) => responses.push(response),
            Err(_) => break,
        }
    }
    let (mut ok, mut refused) = (0, 0);
    for response in responses {
        match tokio::time::timeout(WAIT, response).await.expect("in time") {
            Ok(r) if r.status() == 200 => ok += 1,
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
            other => panic!("unexpected: {:?}", other.map(|r| r.status())),
        }
    }
    assert_eq!(ok + refused, 150, "ok {ok}, refused {refused}");
    assert!(seen.max_in_flight.load(Ordering::SeqCst) <= 100);
}

#[tokio::test]
async fn a_rapid_reset_flood_is_bounded_and_the_proxy_serves_on() {
    let (backend, seen) = h2c_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let mut client = client;
    // Open and cancel streams as fast as the client can (CVE-2023-44487).
    let mut sent = 0;
    for _ in 0..5000 {
        let Ok(ready) = tokio::time::timeout(WAIT, client.clone().ready()).await else {
            break;
        };
        let Ok(mut ready) = ready else { break };
        let req = request("GET", "grpc", "/slow").body(()).expect("request");
        match ready.send_request(req, true) {
            Ok((response, _)) => {
                drop(response);
                sent += 1;
            }
            Err(_) => break,
        }
        client = ready;
    }
    drop(client);
    // The flood's connection ends (GOAWAY for too many resets, or its end), in time.
    let _ = tokio::time::timeout(WAIT, conn).await;
    assert!(sent > 0);
    // What reached the backend was bounded by the concurrency bound at any moment.
    assert!(seen.max_in_flight.load(Ordering::SeqCst) <= 100);
    // And the proxy still serves a new connection.
    assert!(proxy.exit_status().is_none(), "the proxy is still running");
    let fresh = connect(proxy.listen_addr()).await;
    assert_eq!(get(&fresh, "grpc", "/").await.status, 200);
}

#[tokio::test]
async fn a_header_list_over_the_bound_is_refused_before_any_backend() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", a.addr(), false, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    assert_eq!(get(&client, "shop", "/").await.status, 200);
    let big = "x".repeat(20 * 1024);
    let req = request("GET", "shop", "/big")
        .header("x-big", big.as_str())
        .body(())
        .expect("request");
    match send(&client, req, None, None).await {
        Ok(got) => assert_eq!(got.status, 431),
        Err(e) => assert!(e.is_reset(), "refused by a reset, got {e:?}"),
    }
    assert_eq!(a.requests(), 1, "nothing of it reached the backend");
}

#[tokio::test]
async fn an_idle_connection_is_sent_goaway_and_closed() {
    let a = upstream("a").await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("shop", a.addr(), false, "    - name: all\n"),
        &["--h2c", "--idle-timeout", "1s"],
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    assert_eq!(get(&client, "shop", "/").await.status, 200);
    // The client keeps its handle: only the proxy can end the connection.
    let ended = tokio::time::timeout(WAIT, conn).await;
    assert!(ended.is_ok(), "the idle connection was closed by the proxy");
    drop(client);
}

#[tokio::test]
async fn on_sigterm_streams_in_progress_finish_and_the_connection_is_sent_goaway() {
    let (backend, seen) = h2c_backend().await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, "grpc", "/slow").await.status })
    };
    // Bounded wait until the stream is at the backend.
    let deadline = std::time::Instant::now() + WAIT;
    while seen.in_flight.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.sigterm();
    assert_eq!(
        slow.await.expect("task"),
        200,
        "the stream in progress finished"
    );
    let ended = tokio::time::timeout(WAIT, conn).await;
    assert!(
        ended.is_ok(),
        "the connection was ended by the proxy (GOAWAY)"
    );
    drop(client);
    assert!(proxy.wait_exit(WAIT).await.is_some(), "the proxy exited");
}

#[tokio::test]
async fn a_backend_connection_at_its_stream_limit_makes_another_open() {
    // The backend takes 10 streams per connection.
    let (backend, seen) = h2c_backend_with(Some(10)).await;
    let dir = TempDir::new();
    let proxy = start_with(
        &dir,
        &policy("grpc", backend, true, "    - name: all\n"),
        &["--h2c"],
    )
    .await;
    let client = connect(proxy.listen_addr()).await;
    // The first exchange brings the backend's SETTINGS to the proxy.
    assert_eq!(get(&client, "grpc", "/").await.status, 200);
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            get(&client, "grpc", "/slow").await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert!(
        seen.connections.load(Ordering::SeqCst) >= 3,
        "30 streams at 10 per connection need 3 connections: {}",
        seen.connections.load(Ordering::SeqCst)
    );
    assert!(
        seen.max_in_flight.load(Ordering::SeqCst) > 10,
        "streams went on other connections instead of queueing behind the first"
    );
}
