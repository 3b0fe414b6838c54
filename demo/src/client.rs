//! A minimal HTTP/1.1 keep-alive client on tokio and `httparse`, for the demo load
//! generator and the integration tests.
//!
//! Hand-rolled so callers see the wire exactly: one [`HttpClient`] is one connection,
//! never silently reconnected, and nothing is retried or rewritten behind their back.
//! Every read is bounded in size and a request gives up after 10 s.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// 1xx responses a server may send before the final one (100 Continue, 103 Early Hints).
const MAX_INTERIM_RESPONSES: usize = 8;

/// A response as read off the wire.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// In wire order; names lower-cased, repeated headers kept.
    pub headers: Vec<(String, String)>,
    /// The decoded body (chunked framing removed).
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text, with invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 connection carrying requests one after another (keep-alive).
pub struct HttpClient {
    stream: TcpStream,
    /// Bytes read but not consumed yet.
    buf: Vec<u8>,
    /// False once the server closed the connection or an exchange broke it off.
    open: bool,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            open: true,
        })
    }

    /// Sends one request and reads its response, within 10 s.
    ///
    /// `host` becomes the `Host` header. `Content-Length` is added when `body` is not
    /// empty, unless `headers` already frame it (`content-length` or
    /// `transfer-encoding`), so tests can send hand-made framing. After the server
    /// closes the connection, or after an error or timeout, further requests fail
    /// with `NotConnected`: connect again.
    pub async fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        if !self.open {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "this connection is closed; connect again",
            ));
        }
        let exchange = self.exchange(method, host, path, headers, body);
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => {
                self.open = false;
                Err(err)
            }
            Err(_) => {
                // Part of a response may still arrive; the connection is unusable.
                self.open = false;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete response to {method} {path} within {REQUEST_TIMEOUT:?}"),
                ))
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        let mut framed = false;
        for (name, value) in headers {
            framed |= name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("transfer-encoding");
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() && !framed {
            request.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes).await?;

        // Interim 1xx responses precede the final one; skip them.
        for _ in 0..=MAX_INTERIM_RESPONSES {
            let (status, headers) = self.read_head().await?;
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let body = self.read_body(method, status, &headers).await?;
            let closes = header_tokens(&headers, "connection").any(|t| t == "close");
            if closes {
                self.open = false;
            }
            return Ok(Response {
                status,
                headers,
                body,
            });
        }
        Err(invalid_data("too many interim (1xx) responses"))
    }

    async fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        // Each pass reads more bytes, and the buffer is capped at MAX_HEAD_BYTES.
        loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = parsed
                        .code
                        .ok_or_else(|| invalid_data("response without status"))?;
                    let headers = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value).into_owned();
                            (h.name.to_ascii_lowercase(), value)
                        })
                        .collect();
                    self.buf.drain(..len);
                    return Ok((status, headers));
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD_BYTES => {
                    return Err(invalid_data("response head over 64 KiB"));
                }
                Ok(httparse::Status::Partial) => self.fill().await?,
                Err(err) => return Err(invalid_data(format!("malformed response: {err}"))),
            }
        }
    }

    async fn read_body(
        &mut self,
        method: &str,
        status: u16,
        headers: &[(String, String)],
    ) -> io::Result<Vec<u8>> {
        if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
            return Ok(Vec::new());
        }
        if header_tokens(headers, "transfer-encoding")
            .last()
            .is_some_and(|t| t == "chunked")
        {
            return self.read_chunked().await;
        }
        if let Some((_, value)) = headers.iter().find(|(n, _)| n == "content-length") {
            let length: usize = value
                .trim()
                .parse()
                .map_err(|_| invalid_data(format!("invalid content-length {value:?}")))?;
            if length > MAX_BODY_BYTES {
                return Err(invalid_data(format!("response body of {length} bytes")));
            }
            return self.take(length).await;
        }
        // Neither framing: the body runs until the server closes.
        self.open = false;
        let mut body = std::mem::take(&mut self.buf);
        let limit = (MAX_BODY_BYTES + 1).saturating_sub(body.len()) as u64;
        (&mut self.stream)
            .take(limit)
            .read_to_end(&mut body)
            .await?;
        if body.len() > MAX_BODY_BYTES {
            return Err(invalid_data("close-delimited response body over 16 MiB"));
        }
        Ok(body)
    }

    async fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        // Each pass consumes one non-empty chunk, and the body is capped in size.
        loop {
            let size = match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((consumed, size))) => {
                    self.buf.drain(..consumed);
                    usize::try_from(size).unwrap_or(usize::MAX)
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD_BYTES => {
                    return Err(invalid_data("chunk-size line over 64 KiB"));
                }
                Ok(httparse::Status::Partial) => {
                    self.fill().await?;
                    continue;
                }
                Err(_) => return Err(invalid_data("invalid chunk size")),
            };
            if size == 0 {
                self.skip_trailers().await?;
                return Ok(body);
            }
            if size > MAX_BODY_BYTES - body.len() {
                return Err(invalid_data("chunked response body over 16 MiB"));
            }
            body.extend(self.take(size).await?);
            if self.take(2).await? != b"\r\n" {
                return Err(invalid_data("chunk data not followed by CRLF"));
            }
        }
    }

    async fn skip_trailers(&mut self) -> io::Result<()> {
        // Each pass consumes a line or reads more; trailers are capped like a head.
        loop {
            match self.buf.windows(2).position(|w| w == b"\r\n") {
                Some(end) => {
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(());
                    }
                }
                None if self.buf.len() > MAX_HEAD_BYTES => {
                    return Err(invalid_data("trailers over 64 KiB"));
                }
                None => self.fill().await?,
            }
        }
    }

    /// Consumes exactly `n` bytes (callers cap `n`).
    async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads more input; the end of input here cuts a response short.
    async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(8 * 1024);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            self.open = false;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response was complete",
            ));
        }
        Ok(())
    }
}

/// Comma-separated, lower-cased tokens of every `name` header, in order.
fn header_tokens<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = String> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n == name)
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

pub(crate) fn invalid_data(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// One `GET` on a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> io::Result<Response> {
    HttpClient::connect(addr)
        .await?
        .request("GET", host, path, &[], b"")
        .await
}
