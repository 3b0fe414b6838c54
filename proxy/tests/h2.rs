//! The HTTP/2 engine end to end: an h2c client (the `h2` crate) through the real
//! `sluice-proxy` binary (`--h2c`) to an in-process h2c backend and to an HTTP/1
//! backend; trailers, large bodies, refusals, broken backends and the bounds.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use support::{log_lines, start_with, upstream, TempDir};

/// How long any one wait in these tests may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

fn policy(host: &str, backend: SocketAddr, h2c: bool, routes: &str) -> String {
    let protocol = if h2c { ", protocol: h2c" } else { "" };
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {host}}}\nspec:\n  hosts: [{host}]\n  backends:\n    - {{address: \"{backend}\"{protocol}}}\n  routes:\n{routes}"
    )
}

/// What the h2c test backend saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    streams: AtomicUsize,
}

/// An h2c backend: `/echo` streams the request body back (its length in
/// `x-body-len` trailers) with `grpc-status: 0` in trailers, echoing the request's
/// `x-req-trailer` trailer; `/reset` resets the stream; `/slow` answers after
/// 300 ms; anything else answers 200 "ok" with the request's `te` and
/// `grpc-timeout` in `x-seen-te` and `x-seen-grpc-timeout`.
async fn h2c_backend() -> (SocketAddr, Arc<Seen>) {
    h2c_backend_with(None).await
}

/// [`h2c_backend`] allowing at most `max_streams` streams per connection.
async fn h2c_backend_with(max_streams: Option<u32>) -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let shared = Arc::clone(&seen);
    tokio::spawn(async move {
        // Bounded by the test's life: the runtime ends with the test.
        while let Ok((socket, _)) = listener.accept().await {
            let seen = Arc::clone(&shared);
            seen.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut builder = h2::server::Builder::new();
                if let Some(max) = max_streams {
                    builder.max_concurrent_streams(max);
                }
                let Ok(mut conn) = builder.handshake::<_, Bytes>(socket).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let seen = Arc::clone(&seen);
                    tokio::spawn(serve_stream(req, respond, seen));
                }
            });
        }
    });
    (addr, seen)
}

async fn serve_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    seen: Arc<Seen>,
) {
    seen.streams.fetch_add(1, Ordering::SeqCst);
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let (parts, mut body) = req.into_parts();
    match parts.uri.path() {
        "/reset" => respond.send_reset(h2::Reason::INTERNAL_ERROR),
        "/echo" => {
            let resp = http::Response::builder()
                .status(200)
                .body(())
                .expect("response");
            let Ok(mut send) = respond.send_response(resp, false) else {
                seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            let mut len = 0usize;
            while let Some(Ok(chunk)) = body.data().await {
                len += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
                send.reserve_capacity(chunk.len());
                let _ = send.send_data(chunk, false);
            }
            let req_trailers = body.trailers().await.ok().flatten();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            trailers.insert("x-body-len", http::HeaderValue::from(len));
            if let Some(v) = req_trailers.and_then(|t| t.get("x-req-trailer").cloned()) {
                trailers.insert("x-echo-trailer", v);
            }
            let _ = send.send_trailers(trailers);
        }
        path => {
            if path == "/slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let seen_header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .cloned()
                    .unwrap_or(http::HeaderValue::from_static("-"))
            };
            let resp = http::Response::builder()
                .status(200)
                .header("x-seen-te", seen_header("te"))
                .header("x-seen-grpc-timeout", seen_header("grpc-timeout"))
                .body(())
                .expect("response");
            if let Ok(mut send) = respond.send_response(resp, false) {
                let _ = send.send_data(Bytes::from_static(b"ok"), true);
            }
        }
    }
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// An h2c client connection to `addr` (prior knowledge).
async fn connect(addr: SocketAddr) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = tokio::time::timeout(WAIT, h2::client::handshake(tcp))
        .await
        .expect("handshake in time")
        .expect("h2 handshake");
    tokio::spawn(conn);
    client
}

/// A response as the client got it.
struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
    trailers: Option<http::HeaderMap>,
}

fn request(method: &str, authority: &str, path: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path}"))
}

/// Sends `req` with `body` (and `trailers`), reads the whole response.
async fn send(
    client: &SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
) -> Result<Got, h2::Error> {
    let exchange = async {
        let mut client = client.clone().ready().await?;
        let end = body.is_none() && trailers.is_none();
        let (response, mut stream) = client.send_request(req, end)?;
        if let Some(mut data) = body {
            // Flow control: a body larger than the window goes as it opens.
            while !data.is_empty() {
                stream.reserve_capacity(data.len());
                let capacity = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(e),
                    None => break,
                };
                let piece = data.split_to(capacity.min(data.len()));
                let last = data.is_empty() && trailers.is_none();
                stream.send_data(piece, last)?;
            }
        }
        if let Some(trailers) = trailers {
            stream.send_trailers(trailers)?;
        }
        let response = response.await?;
        let (parts, mut recv) = response.into_parts();
        let mut body = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await?;
        Ok(Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            trailers,
        })
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("response in time")
}

async fn get(client: &SendRequest<Bytes>, authority: &str, path: &str) -> Got {
    let req = request("GET", authority, path).body(()).expect("request");
    send(client, req, None, None).await.expect("exchange")
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

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

/// An HTTP/1.1 backend that answers every request with a chunked body ("hello
/// world" in two chunks) and `grpc-status: 0` in its trailer section.
async fn chunked_http1_backend() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // Bounded by the test's life.
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // One request per connection: read its head, answer, close.
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 4096];
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5;ext=1\r\nworld\r\n0\r\ngrpc-status: 0\r\nx-trailer: t\r\n\r\n";
                let _ = socket.write_all(answer).await;
            });
        }
    });
    addr
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
