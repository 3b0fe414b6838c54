//! Sluice's own HTTP/1.1 engine for the common request, driving the same
//! request flow ([`crate::exchange`]) as pingora's phases ([`crate::phases`]).
//!
//! Why: pingora spends ~25 µs of CPU per proxied request on this machine against
//! nginx's ~10 (bench/RESULTS.md: a second header map, a cloned request header, a
//! task and an `Arc<Mutex>` per pooled connection). This engine parses heads in
//! place (`sluice_h1`: httparse, then every RFC 9112 rule that two parsers could
//! read differently), forwards them in canonical form with Sluice's headers
//! appended, and keeps idle upstream connections in a Vec per worker thread and
//! backend.
//!
//! What it serves itself: HTTP/1.1 keep-alive requests in origin- or absolute-form
//! (forwarded in origin-form) whose body is at most [`MAX_BODY`], by Content-Length
//! or chunked (read whole, so retries can resend it; chunks go on re-encoded), to
//! HTTP/1 backends; responses framed by length, chunks or close, HEAD, 1xx, 204 and
//! 304, relayed in canonical form. Hop-by-hop fields stay behind both ways (RFC 9110
//! §7.6.1): the backend's `Connection: close` ends the backend connection, not the
//! client's, as in Envoy. Anything else — HTTP/1.0, larger bodies, `Expect`,
//! upgrades and CONNECT, a chunked body for a policy whose backends speak h2c —
//! is handed over, connection and bytes already read, to pingora for the rest of
//! the connection, through the same checks ([`crate::front`]). A request refused by those
//! checks is answered with its status and the connection closed; nothing of it
//! goes upstream. A connection that opens with the HTTP/2 preface goes to
//! [`crate::h2`] (with `--engine pingora`, to pingora's h2c); requests for h2c
//! backends are sent over the h2 engine's upstream connections (`h2c.rs`).

mod h2c;
mod listener;
mod proxying;
pub use listener::Listener;
mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::conn::Conn;
use crate::exchange::{Action, Exchange, Request};
use crate::front;
use crate::phases::SluiceProxy;
use crate::pool::Pool;
use crate::shard::Handle;
use crate::shared::Shared;
use sluice_h1::{Body, ChunkedDecoder, Form, Refusal, RequestHead};

/// Request bodies up to this size are read whole on the fast path; larger ones go
/// to pingora, which streams them.
pub const MAX_BODY: u64 = 64 * 1024;
/// How long a client connection may sit idle between requests (and how long a
/// request head may take to arrive), unless `--idle-timeout` says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The HTTP/2 connection preface (h2c with prior knowledge).
use sluice_h1::detect::H2_PREFACE;

struct Engine {
    flow: SluiceProxy,
    listen: SocketAddr,
    /// Where connections the fast path does not serve go.
    pingora: Arc<HttpProxy<SluiceProxy>>,
    /// Only with `--h2c`: the pingora instance that speaks h2c, for connections that
    /// open with the HTTP/2 preface (with `--engine pingora`).
    pingora_h2c: Option<Arc<HttpProxy<SluiceProxy>>>,
    /// Sluice's HTTP/2 engine, for connections that open with the preface (with
    /// `--h2c`, or on a transparent listener); `None` with `--engine pingora`.
    h2: Option<crate::h2::Engine>,
    /// HTTP/2 connections to h2c backends, for HTTP/1.1 requests whose policy
    /// wants them (`None` with `--engine pingora`).
    h2c: Option<crate::h2::H2Backends>,
    pool: Pool,
    idle_timeout: Duration,
    /// Serve requests here; else every connection goes to pingora (`--engine pingora`).
    fast_path: bool,
}

/// A request as the flow sees it on the fast path.
struct FastRequest<'a> {
    head: &'a RequestHead,
    /// The head's method, path and host, read once: the flow asks for them twice
    /// (routing, then the access log) and each read checks UTF-8 again.
    method: &'a str,
    path: &'a str,
    host: &'a str,
    client_ip: IpAddr,
    /// The caller's verified identity (mTLS); a clone, since the client's
    /// connection is borrowed mutably while the request is served.
    peer_identity: Option<crate::identity::PeerIdentity>,
}

impl Request for FastRequest<'_> {
    fn method(&self) -> &str {
        self.method
    }

    fn path(&self) -> &str {
        self.path
    }

    fn host(&self) -> &str {
        self.host
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.head.header(name)
    }

    fn client_ip(&self) -> Option<IpAddr> {
        Some(self.client_ip)
    }

    fn body_truncated(&self) -> bool {
        false
    }

    fn peer_identity(&self) -> Option<&crate::identity::PeerIdentity> {
        self.peer_identity.as_ref()
    }
}

/// The client side of a connection.
struct Client {
    stream: Conn,
    peer: SocketAddr,
    /// Bytes received and not yet used (pipelined requests stay here).
    buf: BytesMut,
    /// The exchange of a request handed to pingora with the connection (routed
    /// here, governed there).
    handed: Option<Exchange<Handle<Shared>>>,
    /// Transparent mode: the destination the connection was redirected from.
    original_dst: Option<SocketAddr>,
    shutdown: ShutdownWatch,
    /// The `x-forwarded-for` line added to each request, formatted once.
    forwarded_for: Vec<u8>,
    /// The worker thread serving the connection (its runtime is single-threaded, so
    /// the task never moves): the h2c backends' key.
    thread: ThreadId,
    /// The same thread, as the upstream pool knows it.
    pooled: crate::pool::Worker,
    /// One idle timer per connection, re-armed lazily from `last_active` when it
    /// fires, so requests do not touch the timer wheel.
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    last_active: Instant,
    /// The upstream side's timers, kept across requests for the same reason.
    io_timer: upstream::Timer,
    watch_timer: upstream::Timer,
}

/// How a request ended, for the connection loop.
enum Served {
    /// Done; the connection can carry the next request.
    KeepAlive,
    Close,
    /// Not for the fast path: the connection goes to pingora.
    HandOff,
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_number(out: &mut Vec<u8>, name: &str, value: u64) {
    let mut digits = itoa::Buffer::new();
    push_header(out, name, digits.format(value).as_bytes());
}

/// The fields governance adds to a relayed response: `RateLimit-*` and
/// `x-sluice-fallback`.
fn push_governance_fields(out: &mut Vec<u8>, exchange: &Exchange<Handle<Shared>>) {
    let (rate, fallback) = exchange.response_headers();
    if let Some(h) = rate {
        push_number(out, "ratelimit-limit", u64::from(h.limit));
        push_number(out, "ratelimit-remaining", u64::from(h.remaining));
        push_number(out, "ratelimit-reset", h.reset);
    }
    if let Some(cause) = fallback {
        push_header(out, "x-sluice-fallback", cause.as_bytes());
    }
}

impl Engine {
    async fn serve(&self, stream: TcpStream, peer: SocketAddr, shutdown: ShutdownWatch) {
        let _ = stream.set_nodelay(true);
        let original_dst = self
            .flow
            .transparent
            .then(|| original_destination(&stream))
            .flatten();
        // Transparent listeners: opaque TCP is proxied there and never comes back.
        let detect = self.flow.detect.as_ref();
        let side = &self.flow.side;
        let wait = detect.map_or(self.idle_timeout, |d| d.timeout);
        let sorted =
            crate::opaque::sort(&self.flow.shared, side, detect, stream, original_dst, wait).await;
        let Some((stream, buf)) = sorted else {
            return;
        };
        let mut client = Client {
            stream,
            peer,
            buf,
            handed: None,
            original_dst,
            shutdown,
            forwarded_for: format!("x-forwarded-for: {}\r\n", peer.ip()).into_bytes(),
            thread: std::thread::current().id(),
            pooled: self.pool.worker(),
            idle: Box::pin(tokio::time::sleep(self.idle_timeout)),
            idle_timeout: self.idle_timeout,
            last_active: Instant::now(),
            io_timer: upstream::Timer::new(),
            watch_timer: upstream::Timer::new(),
        };
        // Inside mTLS, a meshed caller speaks HTTP/2 whenever its backend does.
        if self.h2.is_some() || self.pingora_h2c.is_some() || client.stream.is_tls() {
            match client.starts_with_preface().await {
                Some(true) => return self.serve_h2(client).await,
                Some(false) => {}
                None => return,
            }
        }
        if !self.fast_path {
            return hand_off(client, &self.pingora, true).await;
        }
        let mut head = RequestHead::default();
        let mut out = Vec::with_capacity(4 * 1024);
        let mut upstream_buf = BytesMut::with_capacity(upstream::HEAD_ROOM);
        loop {
            if *client.shutdown.borrow() {
                return client.stream.close().await;
            }
            match self
                .serve_one(&mut client, &mut head, &mut out, &mut upstream_buf)
                .await
            {
                Served::KeepAlive => {}
                Served::Close => return client.stream.close().await,
                Served::HandOff => return hand_off(client, &self.pingora, true).await,
            }
        }
    }

    /// A connection that opened with the HTTP/2 preface: to the h2 engine, or to
    /// pingora's h2c with `--engine pingora`.
    async fn serve_h2(&self, client: Client) {
        // mTLS connections always to Sluice's engine (it keeps the caller's
        // identity for every stream); with `--engine pingora`, h2c to pingora's.
        let ours = self.fast_path || client.stream.is_tls() || self.pingora_h2c.is_none();
        match (&self.h2, &self.pingora_h2c) {
            (Some(h2), _) if ours => {
                let Client {
                    stream,
                    peer,
                    buf,
                    original_dst,
                    shutdown,
                    ..
                } = client;
                h2.serve(stream, buf, peer, original_dst, shutdown).await;
            }
            (_, Some(h2c)) => hand_off(client, h2c, false).await,
            // No engine for HTTP/2 here: nothing to answer it with.
            _ => {}
        }
    }

    /// Reads one request and answers it.
    async fn serve_one(
        &self,
        client: &mut Client,
        head: &mut RequestHead,
        out: &mut Vec<u8>,
        upstream_buf: &mut BytesMut,
    ) -> Served {
        // The head, within the idle timeout.
        let n_head = loop {
            if !client.buf.is_empty() {
                match head.parse(&client.buf) {
                    Ok(Some(n)) => break n,
                    Ok(None) => {}
                    Err(e) => return self.reject(client, e).await,
                }
            }
            if !client.read_more().await {
                return Served::Close;
            }
        };
        // What the fast path serves: HTTP/1.1 requests for a backend (origin- or
        // absolute-form), their body whole and small. The rest goes to pingora,
        // through the same checks (front.rs).
        if head.minor_version() != 1
            || head.upgrade()
            || head.expect()
            || !matches!(head.form(), Form::Origin | Form::Absolute)
        {
            return Served::HandOff;
        }
        // The body, whole: by length (bounded by MAX_BODY, left in place), or
        // chunked (decoded, bounded by MAX_BODY, re-encoded canonically).
        let chunked = match head.body() {
            Body::None => None,
            Body::Length(n) if n <= MAX_BODY => {
                while client.buf.len() < n_head + n as usize {
                    if !client.read_more().await {
                        return Served::Close;
                    }
                }
                None
            }
            Body::Length(_) => return Served::HandOff,
            Body::Chunked => match self.read_chunked(client, n_head).await {
                Ok(Some(chunked)) => Some(chunked),
                Ok(None) => return Served::HandOff,
                Err(Some(refusal)) => return self.reject(client, refusal).await,
                Err(None) => return Served::Close,
            },
        };
        // Requests for h2c backends stay here unless their body is chunked (kept
        // re-encoded, not as data): those go to pingora.
        let h2c = self.h2c.is_some() && chunked.is_none();
        let head_bytes = client.buf.split_to(n_head).freeze();
        head.attach(head_bytes);
        let body = match chunked {
            Some((canonical, end)) => {
                bytes::Buf::advance(&mut client.buf, end - n_head);
                canonical
            }
            None => {
                let length = match head.body() {
                    Body::Length(n) => n as usize,
                    _ => 0,
                };
                client.buf.split_to(length).freeze()
            }
        };
        let keep_alive = !head.close();

        let req = FastRequest {
            head,
            method: head.method(),
            path: head.path(),
            host: std::str::from_utf8(head.host()).unwrap_or(""),
            client_ip: client.peer.ip(),
            peer_identity: client.stream.peer_identity().cloned(),
        };
        let mut exchange = self.flow.exchange(Instant::now());
        client.last_active = exchange.start();
        let undiscovered = self.flow.discover(req.host()).await;
        let event = self.flow.arrived(client.original_dst, h2c, undiscovered);
        let action = exchange.on(&req, exchange.start(), event);
        if let Action::HandOff = action {
            // A policy with h2c backends, a chunked body: pingora's HTTP/2 client. The request
            // goes over as it came, with its exchange (routed, not yet governed).
            let mut replay =
                BytesMut::with_capacity(req.head.bytes().len() + body.len() + client.buf.len());
            replay.extend_from_slice(req.head.bytes());
            replay.extend_from_slice(&body);
            replay.extend_from_slice(&client.buf);
            client.buf = replay;
            client.handed = Some(exchange);
            return Served::HandOff;
        }
        self.drive(
            client,
            &req,
            &body,
            exchange,
            action,
            keep_alive,
            out,
            upstream_buf,
        )
        .await
    }

    /// A chunked request body after the `n_head` bytes of its head, read whole and
    /// re-encoded canonically (what goes upstream, and what a retry resends), and
    /// where its raw bytes end in the buffer (which is left as it was). `Ok(None)`: larger
    /// than MAX_BODY, for pingora to stream;
    /// `Err(Some(_))`: refused framing, before anything went upstream;
    /// `Err(None)`: the client left.
    async fn read_chunked(
        &self,
        client: &mut Client,
        n_head: usize,
    ) -> Result<Option<(Bytes, usize)>, Option<Refusal>> {
        // Trailers are checked and dropped, as on pingora's side of the front.
        let mut decoder = ChunkedDecoder::new(false);
        let mut canonical = Vec::new();
        let mut at = n_head;
        // Bounded: each pass consumes input, reads more, or ends.
        loop {
            let progress = decoder
                .transcode(&client.buf[at..], &mut canonical)
                .map_err(Some)?;
            at += progress.consumed;
            if progress.done {
                break;
            }
            if canonical.len() as u64 > MAX_BODY {
                return Ok(None);
            }
            if !client.read_more().await {
                return Err(None);
            }
        }
        Ok(Some((Bytes::from(canonical), at)))
    }

    /// A head Sluice refuses (sluice_h1 says why and with which status), then close.
    async fn reject(&self, client: &mut Client, refusal: Refusal) -> Served {
        let status = refusal.status;
        let body = front::refusal_body(refusal);
        let mut out = Vec::new();
        write_reply_head(
            &mut out,
            status,
            Some("text/plain; charset=utf-8"),
            &[],
            body.len(),
            true,
        );
        out.extend_from_slice(body.as_bytes());
        let _ = client.stream.send(&out).await;
        Served::Close
    }
}

/// A response head of the proxy's own: status line, type, length, extra headers.
fn write_reply_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: Option<&str>,
    headers: &[(std::borrow::Cow<'static, str>, String)],
    length: usize,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(ct) = content_type {
        push_header(out, "content-type", ct.as_bytes());
    }
    for (name, value) in headers {
        push_header(out, name, value.as_bytes());
    }
    push_number(out, "content-length", length as u64);
    if close {
        push_header(out, "connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

impl Client {
    /// With h2c on: whether the connection opens with the HTTP/2 preface. Reads
    /// until it can tell (keeping what it read); `None` when the client left.
    async fn starts_with_preface(&mut self) -> Option<bool> {
        loop {
            let n = self.buf.len().min(H2_PREFACE.len());
            if self.buf[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    /// Reads more from the client: `false` when it closed, failed or stayed idle
    /// for its idle timeout.
    async fn read_more(&mut self) -> bool {
        // A page at a time (`upstream::HEAD_ROOM`); a large request body
        // accumulating here still grows it geometrically (`BytesMut` doubles when
        // it moves).
        if self.buf.capacity() - self.buf.len() < upstream::HEAD_ROOM {
            self.buf.reserve(upstream::HEAD_ROOM);
        }
        // Bounded: each pass either returns or moves the deadline forward to a
        // later `last_active`, which only requests (not this loop) advance.
        loop {
            tokio::select! {
                biased;
                read = self.stream.read_buf(&mut self.buf) => return matches!(read, Ok(n) if n > 0),
                () = self.idle.as_mut() => {
                    let deadline = self.last_active + self.idle_timeout;
                    if deadline <= Instant::now() {
                        return false;
                    }
                    self.idle.as_mut().reset(deadline.into());
                }
            }
        }
    }
}

/// Where an iptables-redirected connection was going (`SO_ORIGINAL_DST`, read by
/// pingora); `None` for a connection made to the proxy itself.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let original = pingora::protocols::l4::ext::get_original_dest(stream.as_raw_fd())
        .ok()
        .flatten()?;
    (Some(original) != stream.local_addr().ok()).then_some(original)
}

/// Gives the connection, with the bytes read so far, to pingora: HTTP/1 through
/// the strict front (`front`), HTTP/2 (binary framing, checked by the h2 crate)
/// as it is.
async fn hand_off(client: Client, app: &Arc<HttpProxy<SluiceProxy>>, front: bool) {
    let Client {
        stream,
        peer,
        buf,
        handed,
        shutdown,
        ..
    } = client;
    let fd = stream.tcp().as_raw_fd();
    let peer_identity = stream.peer_identity().cloned();
    let mut stream = stream.into_pingora();
    // From the socket itself: a TLS connection is a virtual stream to pingora.
    let digest = SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(peer.into()));
    stream.set_socket_digest(digest);
    let stream: pingora::protocols::Stream = if front {
        let front = front::Front::new(stream, &buf).with_peer_identity(peer_identity);
        match handed {
            Some(exchange) => Box::new(front.with_exchange(exchange)),
            None => Box::new(front),
        }
    } else {
        stream.rewind(&buf);
        Box::new(stream)
    };
    pingora::services::listening::Service::<HttpProxy<SluiceProxy>>::handle_event(
        stream,
        Arc::clone(app),
        shutdown,
    )
    .await;
}
