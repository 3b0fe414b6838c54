//! HTTP/1.1 on the wire through the real `sluice-proxy`: framing of every kind of
//! response, pipelining, upstream connection reuse and stale pooled connections,
//! bad heads, and the requests the fast path hands to pingora (HTTP/1.0, chunked
//! and large bodies, Expect, upgrades). Always on `--engine h1`: the idle timeout,
//! the watch for clients that leave and the relayed response heads are the h1
//! engine's own. What both engines must accept, refuse and forward alike is
//! `front.rs`, which runs each test on both.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{send_raw, start_with, ProxyProcess, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Request heads and bodies as a backend received them.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A raw backend: answers each request by its path with fixed bytes, counts
/// connections and keeps every request head and body it received.
struct Backend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const BIG: usize = 512 * 1024;

/// The response for `path`, and whether the backend closes the connection after it.
fn answer(method: &str, path: &str, body: &[u8]) -> (Vec<u8>, bool) {
    let fixed = |text: &str| (text.as_bytes().to_vec(), false);
    match path {
        "/chunked" => fixed(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        ),
        "/until-close" => ("HTTP/1.1 200 OK\r\n\r\nuntil close".into(), true),
        "/not-modified" => fixed("HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"),
        "/early-hints" => fixed(
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
        "/big" => {
            let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
            out.resize(out.len() + BIG, b'x');
            (out, false)
        }
        // Fields about the backend's connection, which must not reach the client;
        // then the backend closes, as it said.
        "/hop-by-hop" => (
            "HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nKeep-Alive: timeout=1\r\nX-Private: secret\r\nUpgrade: h2c\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok"
                .into(),
            true,
        ),
        "/answers-in-http10" => ("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok".into(), true),
        // Answers, then closes without saying so (as a backend whose keep-alive
        // timeout just ran out).
        "/then-close" => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into(), true),
        _ if method == "HEAD" => fixed("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"),
        _ => {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Echo-Path: {path}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(body);
            (out, false)
        }
    }
}

/// Appends what the next read brings; EOF is an error.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await? {
        0 => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        n => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
    }
}

/// Reads a request body framed by length or chunks (decoded).
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &str,
) -> std::io::Result<Vec<u8>> {
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.trim().to_owned())
    };
    if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((n, 0))) => {
                    // Expect the final empty line (no trailers in these tests).
                    while buf.len() < n + 2 {
                        fill(stream, buf).await?;
                    }
                    buf.drain(..n + 2);
                    return Ok(body);
                }
                Ok(httparse::Status::Complete((n, size))) => {
                    let end = n + size as usize + 2;
                    while buf.len() < end {
                        fill(stream, buf).await?;
                    }
                    body.extend_from_slice(&buf[n..n + size as usize]);
                    buf.drain(..end);
                }
                Ok(httparse::Status::Partial) => fill(stream, buf).await?,
                Err(_) => return Err(std::io::ErrorKind::InvalidData.into()),
            }
        }
    }
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if head.to_ascii_lowercase().contains("expect: 100-continue") {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    while buf.len() < length {
        fill(stream, buf).await?;
    }
    Ok(buf.drain(..length).collect())
}

async fn serve(mut stream: TcpStream, requests: Seen) -> std::io::Result<()> {
    let mut buf = Vec::new();
    // Bounded: each pass answers one request; a test sends a handful.
    for _ in 0..1000 {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await? {
                0 => return Ok(()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut words = head.split_whitespace();
        let (method, path) = (
            words.next().unwrap_or("").to_owned(),
            words.next().unwrap_or("").to_owned(),
        );
        if head.to_ascii_lowercase().contains("upgrade: websocket") {
            stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                .await?;
            requests.lock().unwrap().push((head, Vec::new()));
            // Echo raw bytes both ways until the client closes.
            let (mut r, mut w) = stream.split();
            if !buf.is_empty() {
                w.write_all(&buf).await?;
            }
            tokio::io::copy(&mut r, &mut w).await?;
            return Ok(());
        }
        if path == "/slow" {
            // Answers after 3 s unless the proxy drops the connection first;
            // records which (after recording the request itself).
            requests.lock().unwrap().push((head, Vec::new()));
            let mut probe = [0u8; 1];
            let outcome = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut probe));
            let outcome = match outcome.await {
                Ok(Ok(0)) | Ok(Err(_)) => "dropped",
                Ok(Ok(_)) => "more bytes",
                Err(_) => "waited",
            };
            requests
                .lock()
                .unwrap()
                .push((format!("/slow: {outcome}"), Vec::new()));
            if outcome != "waited" {
                return Ok(());
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await?;
            continue;
        }
        let body = read_body(&mut stream, &mut buf, &head).await?;
        let (response, close) = answer(&method, &path, &body);
        requests.lock().unwrap().push((head, body));
        stream.write_all(&response).await?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

async fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (count, seen) = (Arc::clone(&connections), Arc::clone(&requests));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, Arc::clone(&seen)));
        }
    });
    Backend {
        addr,
        connections,
        requests,
        task,
    }
}

fn policy(backend: SocketAddr) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: wire}}\nspec:\n  hosts: [wire]\n  backends:\n    - {{address: \"{backend}\"}}\n  routes:\n    - name: all\n      rateLimit: {{requestsPerSecond: 100000, burst: 100000}}\n"
    )
}

async fn proxy_for(backend: &Backend) -> (TempDir, ProxyProcess) {
    proxy_with(backend, &[]).await
}

async fn proxy_with(backend: &Backend, extra: &[&str]) -> (TempDir, ProxyProcess) {
    let dir = TempDir::new();
    let args: Vec<&str> = ["--engine", "h1"].iter().chain(extra).copied().collect();
    let proxy = start_with(&dir, &policy(backend.addr), &args).await;
    (dir, proxy)
}

/// Splits `bytes` into responses: (head, body) pairs, framed by Content-Length or
/// chunks; a response with neither takes the rest.
fn responses(mut bytes: &[u8], head_request: bool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head")
            + 4;
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        bytes = &bytes[end..];
        let lower = head.to_ascii_lowercase();
        let status: u16 = head[9..12].parse().expect("status");
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().expect("length"));
        let body = if head_request || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else if lower.contains("transfer-encoding: chunked") {
            let mut body = Vec::new();
            loop {
                let Ok(httparse::Status::Complete((n, size))) = httparse::parse_chunk_size(bytes)
                else {
                    panic!("bad chunk in {:?}", String::from_utf8_lossy(bytes));
                };
                bytes = &bytes[n..];
                if size == 0 {
                    let end = bytes
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|i| i + 4);
                    let end = match bytes.starts_with(b"\r\n") {
                        true => 2,
                        false => end.expect("trailers end"),
                    };
                    bytes = &bytes[end..];
                    break;
                }
                body.extend_from_slice(&bytes[..size as usize]);
                bytes = &bytes[size as usize + 2..];
            }
            body
        } else if let Some(n) = length {
            let body = bytes[..n].to_vec();
            bytes = &bytes[n..];
            body
        } else {
            std::mem::take(&mut bytes).to_vec()
        };
        out.push((head, body));
    }
    out
}

/// Reads until `done` says the bytes so far are enough; `None` when the proxy closes
/// (or resets) the connection first. Each read waits at most 5 s.
async fn read_until(client: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the proxy answers or closes in time")
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Some(got)
}

/// One answer whose body ends in `ok`.
async fn read_ok(client: &mut TcpStream) -> Option<Vec<u8>> {
    read_until(client, |got| got.ends_with(b"ok")).await
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: wire\r\n{extra}\r\n")
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_over_one_upstream_connection() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    let mut wire = String::new();
    for i in 0..5 {
        wire.push_str(&get(&format!("/p{i}"), ""));
    }
    wire.push_str(&get("/last", "Connection: close\r\n"));
    let reply = send_raw(proxy.listen_addr(), wire.as_bytes())
        .await
        .expect("raw");
    let answers = responses(&reply, false);
    let paths: Vec<String> = answers
        .iter()
        .map(|(head, _)| {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let line = head
                .lines()
                .find(|l| l.starts_with("X-Echo-Path"))
                .expect("echo");
            line["X-Echo-Path: ".len()..].to_owned()
        })
        .collect();
    assert_eq!(paths, ["/p0", "/p1", "/p2", "/p3", "/p4", "/last"]);
    // Every allowed answer carries the rate-limit headers.
    assert!(answers
        .iter()
        .all(|(h, _)| h.contains("ratelimit-remaining: ")));

    // Twenty more requests on fresh client connections reuse pooled upstream ones.
    for _ in 0..20 {
        let reply = send_raw(
            proxy.listen_addr(),
            get("/x", "Connection: close\r\n").as_bytes(),
        )
        .await
        .expect("raw");
        assert!(reply.starts_with(b"HTTP/1.1 200"));
    }
    let connections = backend.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "{connections} upstream connections for 26 requests"
    );
}

#[tokio::test]
async fn every_response_framing_is_relayed_exactly() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    let wire = [
        get("/chunked", ""),
        get("/not-modified", ""),
        "HEAD /head HTTP/1.1\r\nHost: wire\r\n\r\n".to_owned(),
        get("/early-hints", ""),
        get("/big", ""),
        get("/until-close", ""),
    ]
    .concat();
    // HEAD answers carry a length but no body: split those by hand.
    let reply = send_raw(proxy.listen_addr(), wire.as_bytes())
        .await
        .expect("raw");
    let text = String::from_utf8_lossy(&reply).into_owned();
    let head_at = text
        .find("HTTP/1.1 200 OK\r\nContent-Length: 11")
        .expect("HEAD answer");
    let head_end = head_at + text[head_at..].find("\r\n\r\n").expect("end") + 4;
    let mut answers = responses(&reply[..head_at], false);
    answers.extend(responses(&reply[head_at..head_end], true));
    answers.extend(responses(&reply[head_end..], false));
    let summary: Vec<(u16, usize)> = answers
        .iter()
        .map(|(h, b)| (h[9..12].parse().expect("status"), b.len()))
        .collect();
    assert_eq!(
        summary,
        [
            (200, 11),
            (304, 0),
            (200, 0),
            (103, 0),
            (200, 2),
            (200, BIG),
            (200, 11)
        ]
    );
    assert_eq!(answers[0].1, b"hello world");
    assert_eq!(answers[4].1, b"ok");
    assert_eq!(answers[6].1, b"until close");
    assert!(answers[3].0.contains("Link: </a.css>"));
}

#[tokio::test]
async fn the_backends_connection_fields_stay_behind_and_its_close_is_its_own() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    // One client connection; the backend closes its connection after the first
    // two answers and the last (whose body ends at the close).
    let wire = [
        get("/hop-by-hop", ""),
        get("/answers-in-http10", ""),
        get("/second", ""),
        get("/until-close", ""),
    ]
    .concat();
    let reply = send_raw(proxy.listen_addr(), wire.as_bytes())
        .await
        .expect("raw");
    let answers = responses(&reply, false);
    let heads: Vec<String> = answers
        .iter()
        .map(|(h, _)| h.to_ascii_lowercase())
        .collect();
    assert_eq!(answers.len(), 4, "{heads:?}");
    for gone in ["connection:", "keep-alive:", "x-private:", "upgrade:"] {
        assert!(!heads[0].contains(gone), "{gone} relayed: {}", heads[0]);
    }
    assert!(heads[0].contains("x-kept: k"), "{}", heads[0]);
    assert_eq!(answers[0].1, b"ok");
    // An HTTP/1.0 backend's answer reaches the HTTP/1.1 client as HTTP/1.1.
    assert!(heads[1].starts_with("http/1.1 200 ok\r\n"), "{}", heads[1]);
    assert!(heads[2].contains("x-echo-path: /second"), "{}", heads[2]);
    assert!(!heads[2].contains("connection:"), "{}", heads[2]);
    // A body that ends when the backend closes ends the client's connection too,
    // and the proxy says so.
    assert!(heads[3].contains("connection: close"), "{}", heads[3]);
    assert_eq!(answers[3].1, b"until close");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_client_that_leaves_takes_its_upstream_request_with_it() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    let seen = |what: &str| {
        backend
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h.starts_with(what))
            .count()
    };
    // A client that stays, with a second request pipelined behind the slow one,
    // then half-closes (it has nothing more to send): neither the pipelined bytes
    // nor the half-close are taken for a departure while answers are owed.
    let mut stays = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let pipelined = [get("/slow", ""), get("/after", "")].concat();
    stays.write_all(pipelined.as_bytes()).await.expect("write");
    stays.shutdown().await.expect("half-close");
    // A client that leaves once its request reached the backend (bounded wait).
    let mut leaves = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    leaves
        .write_all(get("/slow", "").as_bytes())
        .await
        .expect("write");
    for _ in 0..100 {
        if seen("GET /slow") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen("GET /slow"), 2, "both slow requests reach the backend");
    drop(leaves);
    // The proxy drops the leaver's upstream request well before the backend's 3 s
    // (it watches after 100 ms): the backend sees its connection close.
    for _ in 0..100 {
        if seen("/slow: dropped") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen("/slow: dropped"),
        1,
        "the leaver's request was dropped"
    );
    // The one that stayed gets both answers.
    let got = read_until(&mut stays, |got| {
        // The second answer has an empty body: done at its head's end.
        String::from_utf8_lossy(got).matches("HTTP/1.1 200").count() == 2
            && got.ends_with(b"\r\n\r\n")
    })
    .await
    .expect("answers for the client that stayed");
    let answers = responses(&got, false);
    assert_eq!(answers[0].1, b"ok");
    assert!(
        answers[1].0.contains("X-Echo-Path: /after"),
        "{:?}",
        answers[1].0
    );
    assert_eq!(seen("/slow: waited"), 1);
}

#[tokio::test]
async fn a_backend_closing_an_idle_connection_costs_no_request() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    let mut client = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for i in 0..10 {
        // The backend closes after each answer; the pooled connection is dead when
        // the next request comes, whatever its method.
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let req =
            format!("{method} /then-close HTTP/1.1\r\nHost: wire\r\nContent-Length: 0\r\n\r\n");
        client.write_all(req.as_bytes()).await.expect("write");
        let got = read_ok(&mut client)
            .await
            .expect("proxy closed the client connection");
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn bodies_reach_the_backend_whole_in_every_framing() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    let small = "s".repeat(1000);
    let large = "L".repeat(300 * 1024);
    let cases = [
        format!("POST /small HTTP/1.1\r\nHost: wire\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{small}", small.len()),
        format!("POST /large HTTP/1.1\r\nHost: wire\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{large}", large.len()),
        "POST /chunked-in HTTP/1.1\r\nHost: wire\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".to_owned(),
        "POST /http10 HTTP/1.0\r\nHost: wire\r\nContent-Length: 4\r\n\r\nten!".to_owned(),
    ];
    let expected: [&[u8]; 4] = [small.as_bytes(), large.as_bytes(), b"abcde", b"ten!"];
    for (wire, body) in cases.iter().zip(expected) {
        let reply = send_raw(proxy.listen_addr(), wire.as_bytes())
            .await
            .expect("raw");
        let answers = responses(&reply, false);
        assert_eq!(answers.len(), 1, "{}", String::from_utf8_lossy(&reply));
        assert_eq!(answers[0].1, body, "echoed body for {}", &wire[..30]);
    }
    let seen = backend.requests.lock().unwrap();
    assert!(seen.iter().all(|(head, _)| head
        .to_ascii_lowercase()
        .contains("x-forwarded-for: 127.0.0.1")));
}

#[tokio::test]
async fn expect_continue_and_upgrades_work_through_the_proxy() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    // Expect: 100-continue: the client waits for the interim answer before the body.
    let mut client = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    client
        .write_all(b"POST /expect HTTP/1.1\r\nHost: wire\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("write");
    let end_of_head = |got: &[u8]| got.windows(4).any(|w| w == b"\r\n\r\n");
    let interim = read_until(&mut client, end_of_head).await.expect("100");
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    client.write_all(b"hello").await.expect("body");
    let got = read_until(&mut client, |got| got.ends_with(b"hello"))
        .await
        .expect("the echo");
    assert!(got.starts_with(b"HTTP/1.1 200"));

    // An upgrade becomes a byte tunnel.
    let mut client = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    client
        .write_all(b"GET /tunnel HTTP/1.1\r\nHost: wire\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let got = read_until(&mut client, end_of_head).await.expect("101");
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    client
        .write_all(b"ping through the tunnel")
        .await
        .expect("tunnel write");
    let echoed = read_until(&mut client, |got| {
        got.len() >= "ping through the tunnel".len()
    })
    .await
    .expect("the echo through the tunnel");
    assert_eq!(echoed, b"ping through the tunnel");
}

#[tokio::test]
async fn bad_heads_get_400_or_431_and_nothing_reaches_the_backend() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_for(&backend).await;
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: wire\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70 * 1024)
    );
    let many = format!(
        "GET / HTTP/1.1\r\nHost: wire\r\n{}\r\n",
        "x-h: v\r\n".repeat(300)
    );
    for (wire, status) in [
        (
            "GET / HTTP/1.1\r\nHost: wire\r\nContent-Length: nope\r\n\r\n".to_owned(),
            "400",
        ),
        ("GET /\0 HTTP/1.1\r\n\r\n".to_owned(), "400"),
        ("GET / HTTP/1.1\r\nX-No-Host: 1\r\n\r\n".to_owned(), "400"),
        (huge, "431"),
        (many, "431"),
    ] {
        let reply = send_raw(proxy.listen_addr(), wire.as_bytes())
            .await
            .expect("raw");
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}"))
                || (status == "431" && text.starts_with("HTTP/1.1 400")),
            "{text:?}"
        );
    }
    assert!(backend.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn idle_clients_are_disconnected_and_busy_ones_are_not() {
    let backend = backend().await;
    let (_dir, proxy) = proxy_with(&backend, &["--idle-timeout", "1s"]).await;
    let request = "GET /early-hints HTTP/1.1\r\nHost: wire\r\n\r\n";

    // A request every 100 ms (a tenth of the timeout) for longer than the timeout:
    // the timeout counts from the last request, so it never cuts this connection.
    let mut busy = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for _ in 0..15 {
        busy.write_all(request.as_bytes()).await.expect("write");
        assert!(
            read_ok(&mut busy).await.is_some(),
            "a busy connection was closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Silent after one request: closed (the wait is bounded far beyond the timeout).
    let mut idle = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    idle.write_all(request.as_bytes()).await.expect("write");
    assert!(read_ok(&mut idle).await.is_some());
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut buf))
        .await
        .expect("an idle connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the proxy to close the idle connection");

    // A client that never sends a whole head is cut too.
    let mut slow = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: wi")
        .await
        .expect("write");
    let n = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut buf))
        .await
        .expect("a connection sending a head too slowly closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}
