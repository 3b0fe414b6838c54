//! The active health check's probe: one `GET` to one backend, judged by its status.
//!
//! A check asks whether the backend answers now, so every probe opens its own
//! connection and asks the backend to close it (`connection: close`): a pooled
//! connection could hide a backend that no longer accepts. The request carries the
//! backend's label as `host`. Only the response head is read, with `sluice_h1`'s
//! parser (the one the proxy reads backends with): interim 1xx responses are
//! skipped, and a final 2xx or 3xx is a passed check. Anything else fails it: another
//! status, a refused or reset connection, a malformed or oversized head, or no final
//! head within the rule's timeout. The body is never read.
//!
//! h2c backends are asked the same over HTTP/2 ([`probe_h2`]: they may not speak
//! HTTP/1 at all, as gRPC servers do not), on a connection of its own too. A gRPC
//! check (`healthCheck.grpc`) calls `grpc.health.v1.Health/Check` and passes only on
//! `grpc-status: 0` with the answer `SERVING`; its answer is read, bounded by
//! [`MAX_GRPC_ANSWER`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use crate::conn::Conn;

/// The most bytes of a gRPC health answer read (a `HealthCheckResponse` is 2).
pub const MAX_GRPC_ANSWER: usize = 1024;
/// The largest response header block accepted from a probed backend.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// 1xx responses a backend may send before the final one (100 Continue, 103 Early
/// Hints); more than this fails the check.
const MAX_INTERIM_RESPONSES: usize = 8;

/// Where a check goes: an address, and for a meshed backend the identity it must
/// prove over mTLS (a check is a client like any other: a strict peer refuses
/// plaintext, and a check in plaintext would mark it down).
pub struct Dial {
    pub addr: SocketAddr,
    pub tls: Option<(Arc<str>, Arc<crate::identity::tls::Tls>)>,
}

impl From<SocketAddr> for Dial {
    fn from(addr: SocketAddr) -> Self {
        Dial { addr, tls: None }
    }
}

impl Dial {
    async fn connect(&self, timeout: Duration) -> io::Result<Conn> {
        let (expected, identity) = match &self.tls {
            Some((expected, identity)) => (Some(expected), identity.as_ref()),
            None => (None, &crate::identity::tls::Tls::default()),
        };
        crate::conn::dial(self.addr, expected, identity, timeout)
            .await
            .map_err(|e| io::Error::other(e.as_str()))
    }
}

/// Whether `GET path` on `to` gets a 2xx or 3xx final status within `timeout`.
pub async fn probe(to: impl Into<Dial>, host: &str, path: &str, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, final_status(to.into(), host, path, timeout))
        .await
        .is_ok_and(|status| status.is_ok_and(|status| (200..400).contains(&status)))
}

/// The status of the final response to `GET path`, on a new connection to `to`.
async fn final_status(to: Dial, host: &str, path: &str, timeout: Duration) -> io::Result<u16> {
    let mut stream = to.connect(timeout).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.send(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut interim = 0;
    // Each pass consumes a head or reads more bytes; the parser refuses a head past
    // sluice_h1::MAX_HEAD, and interim responses are capped.
    loop {
        match sluice_h1::parse_response(&buf, false) {
            Ok(Some(head)) if (100..200).contains(&head.status) && head.status != 101 => {
                interim += 1;
                if interim > MAX_INTERIM_RESPONSES {
                    return Err(invalid_data("too many interim (1xx) responses"));
                }
                buf.drain(..head.len);
                continue;
            }
            Ok(Some(head)) => return Ok(head.status),
            Ok(None) => {}
            Err(refusal) => return Err(invalid_data(refusal.reason)),
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a complete response head",
            ));
        }
    }
}

/// Over HTTP/2 (prior knowledge): whether `GET path` gets a 2xx or 3xx, or with
/// `grpc` (a service, "" for the whole server) whether the gRPC health check
/// answers SERVING, within `timeout`.
pub async fn probe_h2(
    to: impl Into<Dial>,
    host: &str,
    path: &str,
    grpc: Option<&str>,
    timeout: Duration,
) -> bool {
    tokio::time::timeout(timeout, h2_check(to.into(), host, path, grpc, timeout))
        .await
        .is_ok_and(|passed| passed.unwrap_or(false))
}

async fn h2_check(
    to: Dial,
    host: &str,
    path: &str,
    grpc: Option<&str>,
    timeout: Duration,
) -> io::Result<bool> {
    let tcp = to.connect(timeout).await?;
    let (mut client, conn) = h2::client::Builder::new()
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(h2_error)?;
    let ask = async move {
        let (method, path) = match grpc {
            Some(_) => (http::Method::POST, "/grpc.health.v1.Health/Check"),
            None => (http::Method::GET, path),
        };
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{host}{path}"));
        if grpc.is_some() {
            request = request
                .header("content-type", "application/grpc")
                .header("te", "trailers");
        }
        let request = request.body(()).map_err(|e| invalid_data(&e.to_string()))?;
        let (response, mut body) = client
            .send_request(request, grpc.is_none())
            .map_err(h2_error)?;
        if let Some(service) = grpc {
            body.send_data(health_request(service), true)
                .map_err(h2_error)?;
        }
        let response = response.await.map_err(h2_error)?;
        let status = response.status().as_u16();
        if grpc.is_none() || status != 200 {
            return Ok(grpc.is_none() && (200..400).contains(&status));
        }
        let (head, mut body) = response.into_parts();
        let mut answer = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(h2_error)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if answer.len() + chunk.len() > MAX_GRPC_ANSWER {
                return Err(invalid_data("the gRPC health answer is too large"));
            }
            answer.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(h2_error)?;
        // The status is in the trailers, or in the head of a trailers-only answer.
        let ok = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| head.headers.get("grpc-status"))
            .is_some_and(|v| v.as_bytes() == b"0");
        Ok(ok && serving(&answer))
    };
    // The connection is driven beside the request and dropped with it.
    tokio::select! {
        biased;
        passed = ask => passed,
        _ = conn => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the connection ended before the answer",
        )),
    }
}

/// A framed `HealthCheckRequest { service }` (field 1, a string; nothing for "").
fn health_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        message.push(0x0a);
        let mut n = service.len() as u64;
        while n >= 0x80 {
            message.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        message.push(n as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0); // not compressed
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

/// Whether `answer` is exactly one uncompressed `HealthCheckResponse` whose status
/// (field 1; absent means UNKNOWN) is SERVING.
fn serving(answer: &[u8]) -> bool {
    let Some((&[flag, a, b, c, d], rest)) = answer.split_first_chunk::<5>() else {
        return false;
    };
    let length = u32::from_be_bytes([a, b, c, d]) as usize;
    if flag != 0 || rest.len() != length {
        return false;
    }
    let mut message = rest;
    let mut status = 0;
    // Each pass consumes at least one byte (a tag).
    while !message.is_empty() {
        let Some((tag, after)) = varint(message) else {
            return false;
        };
        message = after;
        match (tag >> 3, tag & 7) {
            (field, 0) => {
                let Some((value, after)) = varint(message) else {
                    return false;
                };
                if field == 1 {
                    status = value;
                }
                message = after;
            }
            (_, 2) => {
                let Some((n, after)) = varint(message) else {
                    return false;
                };
                let Some(after) = usize::try_from(n).ok().and_then(|n| after.get(n..)) else {
                    return false;
                };
                message = after;
            }
            _ => return false,
        }
    }
    status == SERVING
}

/// A protobuf varint and what follows it.
fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

fn h2_error(e: h2::Error) -> io::Error {
    io::Error::other(e)
}

fn invalid_data(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A one-connection backend that reads the request head, answers `response`,
    /// keeps the connection open until the client goes when `hold` (else closes it),
    /// and hands back the request it read.
    async fn backend_then(
        response: &'static [u8],
        hold: bool,
    ) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if conn.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                request.push(byte[0]);
            }
            conn.write_all(response).await.unwrap();
            if hold {
                let _ = conn.read(&mut [0u8; 1]).await;
            }
            String::from_utf8(request).unwrap()
        });
        (addr, task)
    }

    async fn backend(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        backend_then(response, true).await
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn passes_on_2xx_and_sends_one_closing_get() {
        let (addr, backend) = backend(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").await;
        assert!(probe(addr, "web", "/healthz", TIMEOUT).await);
        assert_eq!(
            backend.await.unwrap(),
            "GET /healthz HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn passes_on_3xx() {
        let (addr, _backend) = backend(b"HTTP/1.1 302 Found\r\nlocation: /\r\n\r\n").await;
        assert!(probe(addr, "web", "/", TIMEOUT).await);
    }

    #[tokio::test]
    async fn fails_on_4xx_and_5xx() {
        for response in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
        ] {
            let (addr, _backend) = backend(response).await;
            assert!(!probe(addr, "web", "/", TIMEOUT).await);
        }
    }

    #[tokio::test]
    async fn skips_interim_responses() {
        let (addr, _backend) = backend(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        )
        .await;
        assert!(probe(addr, "web", "/", TIMEOUT).await);
    }

    #[tokio::test]
    async fn fails_on_a_malformed_head_or_an_early_close() {
        let (addr, _backend) = backend(b"nonsense\r\n\r\n").await;
        assert!(!probe(addr, "web", "/", TIMEOUT).await);
        let (addr, _backend) = backend_then(b"HTTP/1.1 200 OK\r\n", false).await;
        assert!(!probe(addr, "web", "/", TIMEOUT).await);
    }

    #[tokio::test(start_paused = true)]
    async fn fails_when_no_head_arrives_within_the_timeout() {
        let (addr, _backend) = backend(b"").await;
        assert!(!probe(addr, "web", "/", Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn fails_when_nothing_listens() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(!probe(addr, "web", "/", TIMEOUT).await);
    }

    /// How the h2c backend of a test answers: HTTP status, body, trailers.
    #[derive(Clone)]
    struct H2Answer {
        status: u16,
        body: &'static [u8],
        grpc_status: Option<&'static str>,
    }

    /// A one-connection h2c backend answering its streams with `answer`, and handing
    /// back the path and body of the first request.
    async fn h2_backend(
        answer: H2Answer,
    ) -> (SocketAddr, tokio::task::JoinHandle<(String, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            let path = request.uri().path().to_owned();
            let mut body = request.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                got.extend_from_slice(&chunk.unwrap());
            }
            let response = http::Response::builder()
                .status(answer.status)
                .body(())
                .unwrap();
            let trailers_only = answer.body.is_empty() && answer.grpc_status.is_some();
            let mut stream = respond.send_response(response, false).unwrap();
            if !trailers_only || answer.grpc_status.is_none() {
                stream
                    .send_data(
                        Bytes::from_static(answer.body),
                        answer.grpc_status.is_none(),
                    )
                    .unwrap();
            }
            if let Some(code) = answer.grpc_status {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static(code));
                stream.send_trailers(trailers).unwrap();
            }
            // Keep the connection served until the probe is done with it.
            let _ = conn.accept().await;
            (path, got)
        });
        (addr, task)
    }

    /// A framed HealthCheckResponse with `status`.
    const SERVING_ANSWER: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];
    const NOT_SERVING_ANSWER: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x02];

    #[tokio::test]
    async fn an_h2c_backend_is_asked_over_http2() {
        let ok = H2Answer {
            status: 204,
            body: b"",
            grpc_status: None,
        };
        let (addr, backend) = h2_backend(ok).await;
        assert!(probe_h2(addr, "web", "/healthz", None, TIMEOUT).await);
        assert_eq!(backend.await.unwrap().0, "/healthz");
        let down = H2Answer {
            status: 503,
            body: b"down",
            grpc_status: None,
        };
        let (addr, _backend) = h2_backend(down).await;
        assert!(!probe_h2(addr, "web", "/healthz", None, TIMEOUT).await);
    }

    #[tokio::test]
    async fn a_grpc_check_passes_only_on_serving_with_status_ok() {
        let serving = H2Answer {
            status: 200,
            body: SERVING_ANSWER,
            grpc_status: Some("0"),
        };
        let (addr, backend) = h2_backend(serving).await;
        assert!(probe_h2(addr, "web", "", Some("shop.Orders"), TIMEOUT).await);
        let (path, body) = backend.await.unwrap();
        assert_eq!(path, "/grpc.health.v1.Health/Check");
        assert_eq!(body, b"\0\0\0\0\x0d\x0a\x0bshop.Orders");
        for answer in [
            H2Answer {
                status: 200,
                body: NOT_SERVING_ANSWER,
                grpc_status: Some("0"),
            },
            // UNIMPLEMENTED, trailers-only: the server has no health service.
            H2Answer {
                status: 200,
                body: b"",
                grpc_status: Some("12"),
            },
            H2Answer {
                status: 200,
                body: SERVING_ANSWER,
                grpc_status: None,
            },
            H2Answer {
                status: 503,
                body: b"",
                grpc_status: None,
            },
        ] {
            let (addr, _backend) = h2_backend(answer).await;
            assert!(!probe_h2(addr, "web", "", Some(""), TIMEOUT).await);
        }
    }

    #[test]
    fn health_answers_are_read_strictly() {
        assert!(serving(SERVING_ANSWER));
        assert!(!serving(NOT_SERVING_ANSWER));
        // Absent status is UNKNOWN; unknown fields are skipped.
        assert!(!serving(&[0, 0, 0, 0, 0]));
        assert!(serving(&[0, 0, 0, 0, 5, 0x12, 0x01, b'x', 0x08, 0x01]));
        // Compressed, truncated, trailing bytes, a runaway varint.
        assert!(!serving(&[1, 0, 0, 0, 2, 0x08, 0x01]));
        assert!(!serving(&[0, 0, 0, 0, 3, 0x08, 0x01]));
        assert!(!serving(&[0, 0, 0, 0, 2, 0x08, 0x01, 0]));
        assert!(!serving(&[
            0, 0, 0, 0, 11, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
        ]));
        assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
    }
}
