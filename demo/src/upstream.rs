//! A small HTTP/1.1 server that stands in for a real backend: the demo upstream behind
//! `sluice-demo-upstream`, and the in-process fake upstream in integration tests.
//!
//! It is hand-rolled on tokio and `httparse` rather than built on a server framework
//! because it has to misbehave on demand — fail a deterministic share of requests, hang
//! after reading a request, reset the connection — and because it must stay small
//! enough to be obviously correct: a bug in the fake would show up as a phantom bug in
//! the proxy under test.
//!
//! # What it answers
//!
//! Every request gets `content-type: text/plain`, `content-length`, `x-upstream: <name>`,
//! `x-seen-traceparent` (the request's `traceparent`, when present) and the body
//! `<name> <METHOD> <request-target>\n`. The status is chosen in this order:
//!
//! 1. the [`Behaviour`] set at run time: `Reset`, `Hang` and `Fail` win over everything;
//! 2. `GET /healthz` answers `200 ok\n`;
//! 3. an `x-demo-status: NNN` request header (200..=599) answers that status;
//! 4. `fail_ratio` answers 503 to exactly `floor(n * fail_ratio)` of the first `n`
//!    requests, spread evenly, so tests repeat exactly (no randomness);
//! 5. otherwise 200.
//!
//! Before answering it sleeps for the configured latency, plus `Behaviour::Slow`, plus
//! `x-demo-delay-ms: N` (capped at 60 s; ignored by `/healthz`).
//!
//! # Limits and invariants
//!
//! - Keep-alive: requests on one connection are served in order until the client sends
//!   `Connection: close` (or speaks HTTP/1.0 without `keep-alive`) or goes away.
//! - The request head is capped at 64 KiB and 64 headers (431 and close beyond that); a
//!   malformed request answers 400 and closes.
//! - Request bodies are read and discarded, framed by `Content-Length` or by chunked
//!   transfer-encoding (decoded, trailers skipped), at most 1 MiB (413 and close beyond
//!   that). Both framings at once answer 400, as RFC 9112 asks of a server.
//! - Every connection task belongs to the server, so [`Upstream::stop`] (or dropping
//!   the [`Upstream`]) closes the listener *and* every open connection: a stopped
//!   upstream looks like a dead host, not a half-alive one.
//! - Every loop ends with its connection or with the server; each pass consumes input
//!   that is capped by the limits above.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
const MAX_BODY_BYTES: u64 = 1024 * 1024;
/// A chunk-size line is a hex number plus optional extensions; anything longer is abuse.
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
const MAX_DEMO_DELAY_MS: u64 = 60_000;
const READ_CHUNK_BYTES: usize = 8 * 1024;
/// How long a closing connection keeps draining input after its last response, so the
/// kernel sends FIN rather than RST and the client gets to read that response.
const LINGER_ON_CLOSE: Duration = Duration::from_secs(2);

/// Static settings of one upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Sent back as `x-upstream` and in the body; must be a valid header value.
    pub name: String,
    /// Added before every answer.
    pub latency: Duration,
    /// Share of ordinary requests answered 503, in `0.0..=1.0`.
    pub fail_ratio: f64,
}

impl UpstreamConfig {
    /// A healthy, instant upstream called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            latency: Duration::ZERO,
            fail_ratio: 0.0,
        }
    }
}

/// How the upstream treats requests; changed at run time with [`Upstream::set_behaviour`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer as configured.
    #[default]
    Normal,
    /// Answer every request, `/healthz` included, with this status (use 200..=599).
    Fail(u16),
    /// Read the request and never answer; the connection stays open until the client
    /// closes it or the upstream stops.
    Hang,
    /// Read the request, then reset the connection (RST) without answering.
    Reset,
    /// Answer normally after this extra delay.
    Slow(Duration),
}

/// A running upstream. Dropping it stops it, like [`Upstream::stop`].
#[must_use = "dropping an Upstream stops it"]
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds `addr` (use `127.0.0.1:0` for an ephemeral port) and serves in a spawned
    /// task. Fails with `InvalidInput` when the name is not a valid header value or
    /// `fail_ratio` is outside `0.0..=1.0`.
    pub async fn start(addr: SocketAddr, config: UpstreamConfig) -> io::Result<Upstream> {
        validate(&config)?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: config.name,
            latency: config.latency,
            fail_ratio: config.fail_ratio,
            requests: AtomicU64::new(0),
            ratio_requests: AtomicU64::new(0),
            behaviour: Mutex::new(Behaviour::Normal),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Upstream {
            addr,
            shared,
            accept_task: Some(accept_task),
        })
    }

    /// The bound address, with the real port when started on port 0.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Requests received so far (every complete request head, whatever the answer,
    /// including hung and reset ones, so tests can count retries).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Applies to every request whose head is read from now on, on all connections.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self
            .shared
            .behaviour
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = behaviour;
    }

    /// Stops accepting and closes every connection. The tasks are aborted, which tokio
    /// completes asynchronously; use [`Upstream::shutdown`] when a test must observe the
    /// port closed right after the call.
    pub fn stop(self) {
        drop(self);
    }

    /// Like [`Upstream::stop`], but returns only once the listener is closed.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            // The only possible outcome is cancellation, which is what we asked for.
            let _ = task.await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = &self.accept_task {
            task.abort();
        }
    }
}

fn validate(config: &UpstreamConfig) -> io::Result<()> {
    let name_ok = !config.name.is_empty()
        && config
            .name
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    if !name_ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "upstream name must be non-empty printable ASCII, got {:?}",
                config.name
            ),
        ));
    }
    if !(0.0..=1.0).contains(&config.fail_ratio) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fail_ratio must be within 0.0..=1.0, got {}",
                config.fail_ratio
            ),
        ));
    }
    Ok(())
}

struct Shared {
    name: String,
    latency: Duration,
    fail_ratio: f64,
    requests: AtomicU64,
    /// Requests that `fail_ratio` applied to; drives the deterministic failure choice.
    ratio_requests: AtomicU64,
    behaviour: Mutex<Behaviour>,
}

impl Shared {
    fn behaviour(&self) -> Behaviour {
        self.behaviour
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fails request `n` exactly when `floor(n * ratio)` steps up, so the first `n`
    /// requests contain `floor(n * ratio)` failures, evenly spread and identical on
    /// every run.
    fn next_ratio_failure(&self) -> bool {
        if self.fail_ratio <= 0.0 {
            return false;
        }
        let n = self.ratio_requests.fetch_add(1, Ordering::Relaxed) + 1;
        (n as f64 * self.fail_ratio).floor() > ((n - 1) as f64 * self.fail_ratio).floor()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in this set so that aborting this task also aborts them.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Best effort: responses are single writes, so Nagle only adds delay.
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                // Transient (EMFILE, ECONNABORTED): back off rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            // Reap finished connections so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let mut conn = Connection {
        stream,
        buf: Vec::new(),
        shared,
    };
    match conn.serve().await {
        Ok(Close::Graceful) => conn.linger_close().await,
        Ok(Close::Reset) => {
            // Zero linger turns the close into an RST, which is what a crashed peer sends.
            let _ = conn.stream.set_zero_linger();
        }
        Err(Stop::Reject(reject)) => {
            if conn.write_rejection(&reject).await.is_ok() {
                conn.linger_close().await;
            }
        }
        // Nobody is left to answer.
        Err(Stop::Closed) => {}
    }
}

/// How a connection ends when the server decides to end it.
enum Close {
    Graceful,
    Reset,
}

/// Why a connection stopped before finishing a request.
enum Stop {
    /// The peer went away or the socket failed.
    Closed,
    /// The request is refused with this answer, then the connection closes.
    Reject(Reject),
}

impl From<io::Error> for Stop {
    fn from(_: io::Error) -> Self {
        Stop::Closed
    }
}

struct Reject {
    status: u16,
    why: &'static str,
}

fn reject(status: u16, why: &'static str) -> Stop {
    Stop::Reject(Reject { status, why })
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// The parts of a request head the upstream acts on, copied out of the read buffer.
struct RequestHead {
    method: String,
    target: String,
    keep_alive: bool,
    framing: Framing,
    traceparent: Option<Vec<u8>>,
    demo_status: Option<u16>,
    demo_delay: Duration,
}

impl RequestHead {
    fn from_parsed(req: &httparse::Request<'_, '_>) -> Result<Self, Stop> {
        let method = req.method.ok_or_else(|| reject(400, "missing method"))?;
        let target = req
            .path
            .ok_or_else(|| reject(400, "missing request target"))?;
        let version = req.version.ok_or_else(|| reject(400, "missing version"))?;
        let mut head = RequestHead {
            method: method.to_owned(),
            target: target.to_owned(),
            // HTTP/1.1 is persistent by default, HTTP/1.0 only on request.
            keep_alive: version == 1,
            framing: Framing::Empty,
            traceparent: None,
            demo_status: None,
            demo_delay: Duration::ZERO,
        };
        let mut content_length: Option<u64> = None;
        let mut chunked: Option<bool> = None;
        let mut wants_close = false;
        for header in req.headers.iter() {
            let name = header.name;
            let value = header.value;
            if name.eq_ignore_ascii_case("content-length") {
                let length = parse_ascii::<u64>(value)
                    .ok_or_else(|| reject(400, "invalid content-length"))?;
                if content_length.is_some_and(|seen| seen != length) {
                    return Err(reject(400, "conflicting content-length headers"));
                }
                content_length = Some(length);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // Only the last coding frames the message; repeated headers append.
                let last = tokens(value).last().unwrap_or_default();
                chunked = Some(last.eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case("close") {
                        wants_close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        head.keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("traceparent") {
                head.traceparent.get_or_insert_with(|| value.to_vec());
            } else if name.eq_ignore_ascii_case("x-demo-status") {
                let status = parse_ascii::<u16>(value)
                    .filter(|s| (200..=599).contains(s))
                    .ok_or_else(|| reject(400, "x-demo-status must be 200..=599"))?;
                head.demo_status = Some(status);
            } else if name.eq_ignore_ascii_case("x-demo-delay-ms") {
                let ms = parse_ascii::<u64>(value)
                    .ok_or_else(|| reject(400, "x-demo-delay-ms must be a number"))?;
                head.demo_delay = Duration::from_millis(ms.min(MAX_DEMO_DELAY_MS));
            }
        }
        if wants_close {
            head.keep_alive = false;
        }
        head.framing = match (content_length, chunked) {
            (Some(_), Some(_)) => {
                return Err(reject(400, "both content-length and transfer-encoding"))
            }
            (_, Some(false)) => return Err(reject(400, "transfer-encoding must end in chunked")),
            (_, Some(true)) => Framing::Chunked,
            (Some(length), None) if length > MAX_BODY_BYTES => {
                return Err(reject(413, "request body over 1 MiB"))
            }
            (Some(length), None) => Framing::Length(length),
            (None, None) => Framing::Empty,
        };
        Ok(head)
    }

    fn is_healthz(&self) -> bool {
        let path = self.target.split('?').next().unwrap_or_default();
        (self.method == "GET" || self.method == "HEAD") && path == "/healthz"
    }
}

fn parse_ascii<T: std::str::FromStr>(value: &[u8]) -> Option<T> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// What to do with a request whose head and body have been read.
enum Plan {
    Reset,
    Hang,
    Respond { status: u16, delay: Duration },
}

fn plan(shared: &Shared, head: &RequestHead) -> Plan {
    let slow = match shared.behaviour() {
        Behaviour::Reset => return Plan::Reset,
        Behaviour::Hang => return Plan::Hang,
        Behaviour::Fail(status) => {
            return Plan::Respond {
                status,
                delay: shared.latency,
            }
        }
        Behaviour::Slow(extra) => extra,
        Behaviour::Normal => Duration::ZERO,
    };
    let delay = shared.latency.saturating_add(slow);
    if head.is_healthz() {
        return Plan::Respond { status: 200, delay };
    }
    let status = match head.demo_status {
        Some(status) => status,
        None if shared.next_ratio_failure() => 503,
        None => 200,
    };
    Plan::Respond {
        status,
        delay: delay.saturating_add(head.demo_delay),
    }
}

struct Connection {
    stream: TcpStream,
    /// Bytes read but not consumed yet; pipelined requests wait here.
    buf: Vec<u8>,
    shared: Arc<Shared>,
}

impl Connection {
    /// Serves requests until one asks to close or the connection must end.
    async fn serve(&mut self) -> Result<Close, Stop> {
        // One pass per request, for the life of the connection.
        loop {
            let Some(head) = self.read_head().await? else {
                return Ok(Close::Graceful);
            };
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            self.discard_body(&head.framing).await?;
            let (status, delay) = match plan(&self.shared, &head) {
                Plan::Reset => return Ok(Close::Reset),
                Plan::Hang => {
                    self.discard_until_eof().await;
                    return Err(Stop::Closed);
                }
                Plan::Respond { status, delay } => (status, delay),
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let body = if head.is_healthz() && status == 200 {
                "ok\n".to_owned()
            } else {
                format!("{} {} {}\n", self.shared.name, head.method, head.target)
            };
            self.write_response(status, &head, &body).await?;
            if !head.keep_alive {
                return Ok(Close::Graceful);
            }
        }
    }

    /// Reads the next request head; `None` when the client closed between requests.
    async fn read_head(&mut self) -> Result<Option<RequestHead>, Stop> {
        // Each pass reads more bytes, and the buffer is capped at MAX_HEAD_BYTES.
        loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
                        return Err(reject(431, "request head over 64 KiB"));
                    }
                    Ok(httparse::Status::Complete(len)) => {
                        let head = RequestHead::from_parsed(&req)?;
                        self.buf.drain(..len);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() >= MAX_HEAD_BYTES => {
                        return Err(reject(431, "request head over 64 KiB"));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(reject(431, "more than 64 request headers"));
                    }
                    Err(_) => return Err(reject(400, "malformed request")),
                }
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Stop::Closed)
                };
            }
        }
    }

    async fn discard_body(&mut self, framing: &Framing) -> Result<(), Stop> {
        match *framing {
            Framing::Empty => Ok(()),
            Framing::Length(length) => self.skip(length).await,
            Framing::Chunked => self.discard_chunked().await,
        }
    }

    async fn discard_chunked(&mut self) -> Result<(), Stop> {
        let mut total: u64 = 0;
        // Each pass consumes one non-empty chunk, and their sizes are capped in total.
        loop {
            let size = match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((consumed, size))) => {
                    self.buf.drain(..consumed);
                    size
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_CHUNK_LINE_BYTES => {
                    return Err(reject(400, "chunk-size line too long"));
                }
                Ok(httparse::Status::Partial) => {
                    self.fill_or_closed().await?;
                    continue;
                }
                Err(_) => return Err(reject(400, "invalid chunk size")),
            };
            if size == 0 {
                return self.skip_trailers().await;
            }
            total = total.saturating_add(size);
            if total > MAX_BODY_BYTES {
                return Err(reject(413, "request body over 1 MiB"));
            }
            self.skip(size).await?;
            self.expect_crlf().await?;
        }
    }

    /// Skips trailer fields up to and including the empty line that ends the message.
    async fn skip_trailers(&mut self) -> Result<(), Stop> {
        let mut skipped = 0;
        // Each pass consumes a line or reads more; trailers are capped like a head.
        loop {
            match self.buf.windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.buf.drain(..2);
                    return Ok(());
                }
                Some(end) => {
                    skipped += end + 2;
                    self.buf.drain(..end + 2);
                }
                None => self.fill_or_closed().await?,
            }
            if skipped + self.buf.len() > MAX_HEAD_BYTES {
                return Err(reject(431, "trailers over 64 KiB"));
            }
        }
    }

    async fn expect_crlf(&mut self) -> Result<(), Stop> {
        while self.buf.len() < 2 {
            self.fill_or_closed().await?;
        }
        if &self.buf[..2] != b"\r\n" {
            return Err(reject(400, "chunk data not followed by CRLF"));
        }
        self.buf.drain(..2);
        Ok(())
    }

    /// Consumes exactly `remaining` bytes of input (callers cap it at 1 MiB).
    async fn skip(&mut self, mut remaining: u64) -> Result<(), Stop> {
        while remaining > 0 {
            if self.buf.is_empty() {
                self.fill_or_closed().await?;
            }
            let take = usize::try_from(remaining).map_or(self.buf.len(), |r| r.min(self.buf.len()));
            self.buf.drain(..take);
            remaining -= take as u64;
        }
        Ok(())
    }

    async fn fill(&mut self) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK_BYTES);
        self.stream.read_buf(&mut self.buf).await
    }

    /// Reads more input; the end of input here means a truncated request.
    async fn fill_or_closed(&mut self) -> Result<(), Stop> {
        match self.fill().await? {
            0 => Err(Stop::Closed),
            _ => Ok(()),
        }
    }

    /// Reads and drops input until the client leaves: a hung server still holds the
    /// socket, but its task ends with the connection.
    async fn discard_until_eof(&mut self) {
        let mut sink = [0u8; READ_CHUNK_BYTES];
        while let Ok(n) = self.stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    }

    async fn write_response(
        &mut self,
        status: u16,
        head: &RequestHead,
        body: &str,
    ) -> io::Result<()> {
        // 204 and 304 never carry a body; HEAD gets the length it would have had.
        let bodyless_status = status == 204 || status == 304;
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\nx-upstream: {}\r\n",
            reason(status),
            self.shared.name
        )
        .into_bytes();
        if !bodyless_status {
            out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        if let Some(traceparent) = &head.traceparent {
            // httparse guarantees header values hold no CR or LF, so echoing is safe.
            out.extend_from_slice(b"x-seen-traceparent: ");
            out.extend_from_slice(traceparent);
            out.extend_from_slice(b"\r\n");
        }
        if !head.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !bodyless_status && head.method != "HEAD" {
            out.extend_from_slice(body.as_bytes());
        }
        self.stream.write_all(&out).await
    }

    async fn write_rejection(&mut self, reject: &Reject) -> io::Result<()> {
        let body = format!("{}\n", reject.why);
        let out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\nx-upstream: {}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            reject.status,
            reason(reject.status),
            self.shared.name,
            body.len(),
        );
        self.stream.write_all(out.as_bytes()).await
    }

    /// Half-closes, then drains briefly: closing a socket with unread input makes the
    /// kernel send RST, which can destroy the response before the client reads it.
    async fn linger_close(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(LINGER_ON_CLOSE, self.discard_until_eof()).await;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        418 => "I'm a teapot",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        // RFC 9112 allows an empty reason phrase.
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start(config: UpstreamConfig) -> Upstream {
        Upstream::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap()
    }

    struct TestResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl TestResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Reads one content-length framed response, leaving any later bytes in `buf`.
    async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> TestResponse {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = resp.parse(buf).unwrap() {
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8(h.value.to_vec()).unwrap();
                        (h.name.to_ascii_lowercase(), value)
                    })
                    .collect();
                let status = resp.code.unwrap();
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap());
                while buf.len() < len + length {
                    assert_ne!(stream.read_buf(buf).await.unwrap(), 0, "early EOF");
                }
                let body = String::from_utf8(buf[len..len + length].to_vec()).unwrap();
                buf.drain(..len + length);
                return TestResponse {
                    status,
                    headers,
                    body,
                };
            }
            assert_ne!(stream.read_buf(buf).await.unwrap(), 0, "early EOF");
        }
    }

    async fn exchange(upstream: &Upstream, request: &str) -> TestResponse {
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        read_response(&mut stream, &mut Vec::new()).await
    }

    async fn read_to_eof(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn serves_two_requests_on_one_kept_alive_connection() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        let mut buf = Vec::new();
        for path in ["/one", "/two?x=1"] {
            let request = format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let response = read_response(&mut stream, &mut buf).await;
            assert_eq!(response.status, 200);
            assert_eq!(response.header("x-upstream"), Some("a"));
            assert_eq!(response.header("content-type"), Some("text/plain"));
            assert_eq!(response.body, format!("a GET {path}\n"));
        }
        assert_eq!(upstream.requests(), 2);
    }

    #[tokio::test]
    async fn serves_pipelined_requests_in_order() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        let requests = "GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc";
        stream.write_all(requests.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_response(&mut stream, &mut buf).await.body,
            "a GET /1\n"
        );
        assert_eq!(
            read_response(&mut stream, &mut buf).await.body,
            "a POST /2\n"
        );
    }

    #[tokio::test]
    async fn discards_chunked_body_and_keeps_connection() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        let request = "POST /up HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n\
                       3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nx-trailer: t\r\n\r\n\
                       GET /after HTTP/1.1\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_response(&mut stream, &mut buf).await.body,
            "a POST /up\n"
        );
        assert_eq!(
            read_response(&mut stream, &mut buf).await.body,
            "a GET /after\n"
        );
    }

    #[tokio::test]
    async fn closes_after_answering_connection_close() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let raw = String::from_utf8(read_to_eof(&mut stream).await.unwrap()).unwrap();
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        assert!(raw.contains("connection: close\r\n"), "{raw}");
        assert!(raw.ends_with("a GET /\n"), "{raw}");
    }

    #[tokio::test]
    async fn answers_fail_status_to_every_request_while_failing() {
        let upstream = start(UpstreamConfig::new("a")).await;
        upstream.set_behaviour(Behaviour::Fail(503));
        assert_eq!(
            exchange(&upstream, "GET / HTTP/1.1\r\n\r\n").await.status,
            503
        );
        let health = exchange(&upstream, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(health.status, 503);
        upstream.set_behaviour(Behaviour::Normal);
        let health = exchange(&upstream, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    }

    #[tokio::test]
    async fn answers_status_from_x_demo_status() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let response = exchange(&upstream, "GET / HTTP/1.1\r\nx-demo-status: 418\r\n\r\n").await;
        assert_eq!(response.status, 418);
        assert_eq!(response.body, "a GET /\n");
    }

    #[tokio::test]
    async fn echoes_traceparent() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let request = format!("GET / HTTP/1.1\r\ntraceparent: {traceparent}\r\n\r\n");
        let response = exchange(&upstream, &request).await;
        assert_eq!(response.header("x-seen-traceparent"), Some(traceparent));
        let plain = exchange(&upstream, "GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(plain.header("x-seen-traceparent"), None);
    }

    #[tokio::test]
    async fn fails_the_configured_share_of_requests_deterministically() {
        let config = UpstreamConfig {
            fail_ratio: 0.5,
            ..UpstreamConfig::new("a")
        };
        let upstream = start(config).await;
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(exchange(&upstream, "GET / HTTP/1.1\r\n\r\n").await.status);
        }
        assert_eq!(statuses, [200, 503, 200, 503, 200, 503]);
    }

    #[tokio::test]
    async fn answers_400_and_closes_on_malformed_request() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        stream.write_all(b"\x01garbage\r\n\r\n").await.unwrap();
        let raw = String::from_utf8(read_to_eof(&mut stream).await.unwrap()).unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{raw}");
        assert!(raw.contains("connection: close\r\n"), "{raw}");
        assert_eq!(upstream.requests(), 0);
    }

    #[tokio::test]
    async fn answers_413_to_oversized_body() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let request = "POST / HTTP/1.1\r\ncontent-length: 2000000\r\n\r\n";
        assert_eq!(exchange(&upstream, request).await.status, 413);
    }

    #[tokio::test]
    async fn rejects_request_with_both_length_and_chunked() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let request =
            "POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc";
        assert_eq!(exchange(&upstream, request).await.status, 400);
    }

    #[tokio::test]
    async fn answers_head_without_body() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        stream
            .write_all(b"HEAD /x HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let raw = String::from_utf8(read_to_eof(&mut stream).await.unwrap()).unwrap();
        assert!(raw.contains("content-length: 10\r\n"), "{raw}");
        assert!(raw.ends_with("\r\n\r\n"), "{raw}");
    }

    #[tokio::test]
    async fn resets_without_answering() {
        let upstream = start(UpstreamConfig::new("a")).await;
        upstream.set_behaviour(Behaviour::Reset);
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        match read_to_eof(&mut stream).await {
            Ok(bytes) => assert!(bytes.is_empty()),
            Err(err) => assert_eq!(err.kind(), io::ErrorKind::ConnectionReset),
        }
        assert_eq!(upstream.requests(), 1);
    }

    #[tokio::test]
    async fn hangs_after_reading_the_request() {
        let upstream = start(UpstreamConfig::new("a")).await;
        upstream.set_behaviour(Behaviour::Hang);
        let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        for _ in 0..500 {
            if upstream.requests() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(upstream.requests(), 1);
        // An absence can only be sampled; a slow machine makes this pass, never fail.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await;
        assert!(read.is_err(), "expected no answer, got {read:?}");
    }

    #[tokio::test]
    async fn refuses_connections_after_shutdown() {
        let upstream = start(UpstreamConfig::new("a")).await;
        let addr = upstream.addr();
        upstream.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn rejects_invalid_config() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bad_ratio = UpstreamConfig {
            fail_ratio: 1.5,
            ..UpstreamConfig::new("a")
        };
        let err = Upstream::start(addr, bad_ratio).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = Upstream::start(addr, UpstreamConfig::new("a\r\nx: y"))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
