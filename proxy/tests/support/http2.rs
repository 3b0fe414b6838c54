//! HTTP/2 helpers for the h2 engine's tests: an h2c client (the `h2` crate, prior
//! knowledge), an in-process h2c backend that echoes, resets, waits or counts, and
//! an HTTP/1.1 backend with chunked trailers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;

/// How long any one wait in these tests may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn policy(host: &str, backend: SocketAddr, h2c: bool, routes: &str) -> String {
    let protocol = if h2c { ", protocol: h2c" } else { "" };
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {host}}}\nspec:\n  hosts: [{host}]\n  backends:\n    - {{address: \"{backend}\"{protocol}}}\n  routes:\n{routes}"
    )
}

/// What the h2c test backend saw.
#[derive(Default)]
pub struct Seen {
    pub connections: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub streams: AtomicUsize,
}

/// An h2c backend: `/echo` streams the request body back (its length in
/// `x-body-len` trailers) with `grpc-status: 0` in trailers, echoing the request's
/// `x-req-trailer` trailer; `/reset` resets the stream; `/slow` answers after
/// 300 ms; anything else answers 200 "ok" with the request's `te` and
/// `grpc-timeout` in `x-seen-te` and `x-seen-grpc-timeout`.
pub async fn h2c_backend() -> (SocketAddr, Arc<Seen>) {
    h2c_backend_with(None).await
}

/// [`h2c_backend`] allowing at most `max_streams` streams per connection.
pub async fn h2c_backend_with(max_streams: Option<u32>) -> (SocketAddr, Arc<Seen>) {
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
pub async fn connect(addr: SocketAddr) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = tokio::time::timeout(WAIT, h2::client::handshake(tcp))
        .await
        .expect("handshake in time")
        .expect("h2 handshake");
    tokio::spawn(conn);
    client
}

/// A response as the client got it.
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub trailers: Option<http::HeaderMap>,
}

pub fn request(method: &str, authority: &str, path: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path}"))
}

/// Sends `req` with `body` (and `trailers`), reads the whole response.
pub async fn send(
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

pub async fn get(client: &SendRequest<Bytes>, authority: &str, path: &str) -> Got {
    let req = request("GET", authority, path).body(()).expect("request");
    send(client, req, None, None).await.expect("exchange")
}

pub fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// An HTTP/1.1 backend that answers every request with a chunked body ("hello
/// world" in two chunks) and `grpc-status: 0` in its trailer section.
pub async fn chunked_http1_backend() -> SocketAddr {
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
