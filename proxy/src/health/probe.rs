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

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// 1xx responses a backend may send before the final one (100 Continue, 103 Early
/// Hints); more than this fails the check.
const MAX_INTERIM_RESPONSES: usize = 8;

/// Whether `GET path` on `addr` gets a 2xx or 3xx final status within `timeout`.
pub async fn probe(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, final_status(addr, host, path))
        .await
        .is_ok_and(|status| status.is_ok_and(|status| (200..400).contains(&status)))
}

/// The status of the final response to `GET path`, on a new connection to `addr`.
async fn final_status(addr: SocketAddr, host: &str, path: &str) -> io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
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

fn invalid_data(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
