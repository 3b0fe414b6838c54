//! Streams to h2c backends: multiplexed connections kept per worker thread and
//! backend (each bounded to [`MAX_STREAMS_PER_UPSTREAM`] streams, another opened
//! when all are full), one attempt of a stream on one of them, and the response
//! relayed with its trailers while the request body may still be streaming.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fnv::FnvHashMap;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::SendStream;
use pingora::ErrorType;

use super::stream::{client_reset, send_data, Body, H2Request, Side};
use super::{
    events, Conn, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, MAX_SEND_BUFFER, MAX_STREAMS_PER_UPSTREAM,
    MAX_UPSTREAM_CONNECTIONS, STREAM_WINDOW,
};
use crate::exchange::{Action, Event, Exchange, Peer, UPSTREAM_IDLE_TIMEOUT};
use crate::shard::Handle;
use crate::shared::Shared;

/// One HTTP/2 connection to a backend.
struct H2Conn {
    send: SendRequest<Bytes>,
    /// Streams in progress on it (bounded by MAX_STREAMS_PER_UPSTREAM).
    streams: AtomicUsize,
    /// Its connection task ended: no more streams on it.
    closed: Arc<AtomicBool>,
    last_used: Mutex<Instant>,
}

impl H2Conn {
    /// Streams it takes: Sluice's bound, or fewer if the backend said so
    /// (SETTINGS_MAX_CONCURRENT_STREAMS), so that a full connection means another
    /// connection rather than streams queued behind the backend's limit.
    fn room(&self) -> usize {
        self.send
            .current_max_send_streams()
            .min(MAX_STREAMS_PER_UPSTREAM)
    }
}

/// A stream's hold on a connection, given back on drop.
pub(super) struct Lease(Arc<H2Conn>);

impl Lease {
    /// A handle to open the stream with.
    pub(super) fn send(&self) -> SendRequest<Bytes> {
        self.0.send.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        *self.0.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// The HTTP/2 connections to one backend from one worker thread.
type Connections = Vec<Arc<H2Conn>>;

/// The upstream connections of one listener's h2 engine.
pub(super) struct Upstreams {
    /// Per (worker thread, backend, expected identity): a connection belongs to
    /// the runtime (thread) that opened it, threads only share the lock; one
    /// verified as a workload serves only attempts that expect that workload.
    h2: Mutex<FnvHashMap<crate::pool::Key, Connections>>,
    pub(super) http1: crate::pool::Pool,
    /// This proxy's identity, for mTLS to meshed backends.
    pub(super) identity: Arc<crate::identity::tls::Tls>,
}

impl Upstreams {
    pub(super) fn new(identity: Arc<crate::identity::tls::Tls>) -> Self {
        Upstreams {
            h2: Mutex::default(),
            http1: crate::pool::Pool::default(),
            identity,
        }
    }
}

/// Runs `io` within `limit`; `None` when it took longer.
pub(super) async fn within<T>(limit: Option<Duration>, io: impl Future<Output = T>) -> Option<T> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, io).await.ok(),
        None => Some(io.await),
    }
}

/// The client side's settings towards backends (the same windows and limits as
/// towards clients).
fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE * 4)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(0)
        .enable_push(false);
    b
}

/// A failed attempt after connecting, as the exchange hears it.
pub(super) fn broken(timed_out: bool, stale: bool, error: &'static str) -> Event<'static> {
    Event::Broken {
        timed_out,
        stale,
        responding: false,
        error,
    }
}

/// Fields that describe a connection, not a message (RFC 9113 §8.2.2): never
/// forwarded between HTTP/2 and HTTP/1 or between two HTTP/2 connections.
pub(super) fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    )
}

/// The response head relayed to the client: the backend's, without hop-by-hop
/// fields, with Sluice's own added.
pub(super) fn relayed_head(
    mut parts: http::response::Parts,
    exchange: &Exchange<Handle<Shared>>,
) -> http::Response<()> {
    let hop: Vec<http::HeaderName> = parts
        .headers
        .keys()
        .filter(|n| is_hop_by_hop(n) || *n == "te")
        .cloned()
        .collect();
    for name in hop {
        parts.headers.remove(name);
    }
    let (rate, fallback) = exchange.response_headers();
    if let Some(h) = rate {
        parts
            .headers
            .insert("ratelimit-limit", http::HeaderValue::from(h.limit));
        parts
            .headers
            .insert("ratelimit-remaining", http::HeaderValue::from(h.remaining));
        parts
            .headers
            .insert("ratelimit-reset", http::HeaderValue::from(h.reset));
    }
    if let Some(cause) = fallback {
        parts
            .headers
            .insert("x-sluice-fallback", http::HeaderValue::from_static(cause));
    }
    parts.version = http::Version::HTTP_2;
    http::Response::from_parts(parts, ())
}

/// The request as it goes to an h2c backend: the client's head (h2 already
/// refused connection-specific fields; `te: trailers` stays), `:authority` from
/// the client's, Sluice's fields added.
fn upstream_request(
    req: &H2Request<'_>,
    exchange: &Exchange<Handle<Shared>>,
    conn: &Conn,
) -> http::Request<()> {
    let parts = req.parts;
    let mut out = http::Request::new(());
    *out.method_mut() = parts.method.clone();
    *out.version_mut() = http::Version::HTTP_2;
    let authority = req.authority();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *out.uri_mut() = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .unwrap_or_else(|_| parts.uri.clone());
    let headers = out.headers_mut();
    *headers = parts.headers.clone();
    // `:authority` carries it (RFC 9113 §8.3.1).
    headers.remove(http::header::HOST);
    if let Some(tp) = exchange.generated_traceparent() {
        if let Ok(tp) = http::HeaderValue::from_str(tp) {
            headers.insert("traceparent", tp);
        }
    }
    headers.append("x-forwarded-for", conn.forwarded_for.clone());
    events::grpc_timeout(exchange, headers);
    out
}

/// Sends the request body (and trailers) upstream; whether the body could not all
/// be kept for a resend.
async fn pump(
    body: &mut Body,
    up: &mut SendStream<Bytes>,
    limit: Option<Duration>,
) -> Result<bool, Side> {
    // Bounded by the body: each pass sends a chunk or ends.
    while let Some(chunk) = body.next().await? {
        match within(limit, send_data(up, chunk, false)).await {
            Some(Ok(())) => {}
            _ => return Err(Side::Upstream),
        }
    }
    match body.trailers() {
        Some(trailers) => up
            .send_trailers(trailers.clone())
            .map_err(|_| Side::Upstream)?,
        None => up
            .send_data(Bytes::new(), true)
            .map_err(|_| Side::Upstream)?,
    }
    Ok(body.truncated())
}

/// Whether a stream that failed before its response reached the backend's app:
/// refused (REFUSED_STREAM, or beyond a GOAWAY's last stream) or on a connection
/// that broke.
pub(super) fn unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away() || e.is_io()
}

impl Upstreams {
    /// A connection with room for a stream: pooled unless `peer.fresh`, else new.
    pub(super) async fn h2_conn(
        &self,
        thread: ThreadId,
        peer: &Peer,
    ) -> Result<(Lease, bool), ErrorType> {
        let key = (thread, peer.addr, peer.tls.clone());
        if !peer.fresh {
            let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = pool.get_mut(&key) {
                list.retain(|c| !c.closed.load(Ordering::Relaxed));
                let roomy = list
                    .iter()
                    .find(|c| c.streams.load(Ordering::Relaxed) < c.room());
                let chosen = match roomy {
                    Some(c) => Some(c),
                    // At the bound on connections: the least loaded one (h2 queues
                    // the stream until the backend has room).
                    None if list.len() >= MAX_UPSTREAM_CONNECTIONS => list
                        .iter()
                        .min_by_key(|c| c.streams.load(Ordering::Relaxed)),
                    None => None,
                };
                if let Some(c) = chosen {
                    c.streams.fetch_add(1, Ordering::Relaxed);
                    return Ok((Lease(Arc::clone(c)), true));
                }
            }
        }
        let io = crate::conn::dial(
            peer.addr,
            peer.tls.as_ref(),
            &self.identity,
            peer.connect_timeout,
        )
        .await?;
        let handshake = client_builder().handshake::<_, Bytes>(io);
        let (send, connection) = match tokio::time::timeout(peer.connect_timeout, handshake).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(_)) => return Err(ErrorType::ConnectError),
            Err(_) => return Err(ErrorType::ConnectTimedout),
        };
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        // The connection's I/O, on this worker thread's runtime (current-thread):
        // ends when the backend closes it or every handle to it is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
            flag.store(true, Ordering::Relaxed);
        });
        let conn = Arc::new(H2Conn {
            send,
            streams: AtomicUsize::new(1),
            closed,
            last_used: Mutex::new(Instant::now()),
        });
        let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        let list = pool.entry(key).or_default();
        if list.len() < MAX_UPSTREAM_CONNECTIONS {
            list.push(Arc::clone(&conn));
        }
        Ok((Lease(conn), false))
    }

    /// Drops closed connections and those idle past the upstream idle timeout.
    pub(super) fn sweep(&self, now: Instant) {
        {
            let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            for list in pool.values_mut() {
                list.retain(|c| {
                    let idle_since = *c.last_used.lock().unwrap_or_else(|e| e.into_inner());
                    !c.closed.load(Ordering::Relaxed)
                        && (c.streams.load(Ordering::Relaxed) > 0
                            || now.saturating_duration_since(idle_since) < UPSTREAM_IDLE_TIMEOUT)
                });
            }
            pool.retain(|_, list| !list.is_empty());
        }
        self.http1.sweep(now);
    }

    /// One attempt of a stream on an h2c backend; the next action, or `None` when
    /// the stream is done (relayed, or its client gone) and settled.
    pub(super) async fn via_h2(
        &self,
        conn: &Conn,
        req: &mut H2Request<'_>,
        body: &mut Body,
        exchange: &mut Exchange<Handle<Shared>>,
        peer: &Peer,
        respond: &mut SendResponse<Bytes>,
    ) -> Option<Action> {
        let (lease, reused) = match self.h2_conn(conn.thread, peer).await {
            Ok(pair) => pair,
            Err(kind) => {
                let failed = Event::ConnectFailed {
                    error: kind.as_str(),
                };
                return Some(exchange.on(&*req, Instant::now(), failed));
            }
        };
        let request = upstream_request(req, exchange, conn);
        let limit = peer.io_timeout;
        let send = match within(limit, lease.send().ready()).await {
            Some(Ok(send)) => send,
            Some(Err(e)) => {
                let event = broken(
                    false,
                    reused && unprocessed(&e),
                    ErrorType::ConnectionClosed.as_str(),
                );
                return Some(exchange.on(&*req, Instant::now(), event));
            }
            None => {
                let event = broken(true, false, ErrorType::WriteTimedout.as_str());
                return Some(exchange.on(&*req, Instant::now(), event));
            }
        };
        let mut send = send;
        let empty = body.is_empty();
        let (response, mut up) = match send.send_request(request, empty) {
            Ok(pair) => pair,
            Err(e) => {
                let event = broken(
                    false,
                    reused && unprocessed(&e),
                    ErrorType::WriteError.as_str(),
                );
                return Some(exchange.on(&*req, Instant::now(), event));
            }
        };
        drop(send);
        let mut pumped = empty.then_some(false);
        let pump = pump(body, &mut up, limit);
        tokio::pin!(pump);
        let response = within(limit, response);
        tokio::pin!(response);
        // The response head, while the request body goes up; bounded by the
        // route's timeout (`limit`) or the client leaving.
        let head = loop {
            tokio::select! {
                biased;
                head = &mut response => break head,
                sent = &mut pump, if pumped.is_none() => match sent {
                    Ok(truncated) => pumped = Some(truncated),
                    Err(Side::Client) => {
                        up_reset(respond);
                        exchange.on(&*req, Instant::now(), Event::ClientGone);
                        return None;
                    }
                    // The backend stopped reading; its answer (or error) says why.
                    Err(Side::Upstream) => pumped = Some(true),
                },
                () = client_reset(respond) => {
                    exchange.on(&*req, Instant::now(), Event::ClientGone);
                    return None;
                }
            }
        };
        // A body still going up cannot be resent as it is (the attempt has it).
        req.truncated = pumped.unwrap_or(true) || req.truncated;
        let response = match head {
            Some(Ok(response)) => response,
            Some(Err(e)) => {
                let stale = reused && unprocessed(&e);
                let event = broken(false, stale, ErrorType::ReadError.as_str());
                return Some(exchange.on(&*req, Instant::now(), event));
            }
            None => {
                let event = broken(true, false, ErrorType::ReadTimedout.as_str());
                return Some(exchange.on(&*req, Instant::now(), event));
            }
        };
        let (parts, mut up_body) = response.into_parts();
        let status = parts.status.as_u16();
        let head_grpc = events::grpc_status(&parts.headers);
        let action = exchange.on(&*req, Instant::now(), events::response(status, head_grpc));
        if !matches!(action, Action::Relay) {
            // Refused (a retry, the fallback): the backend's stream is reset as
            // its handles drop.
            return Some(action);
        }
        let head = relayed_head(parts, exchange);
        let end = up_body.is_end_stream();
        let mut down = match respond.send_response(head, end) {
            Ok(down) => down,
            Err(_) => {
                exchange.on(
                    &*req,
                    Instant::now(),
                    events::finished(status, true, head_grpc),
                );
                return None;
            }
        };
        if end {
            exchange.on(
                &*req,
                Instant::now(),
                events::finished(status, false, head_grpc),
            );
            return None;
        }
        // The body and trailers, while the request body may still be going up
        // (gRPC streams both ways at once). Bounded by the response's end, an
        // error, or the route's timeout on each read.
        let relayed = {
            let relay = relay_response(&mut up_body, &mut down, limit);
            tokio::pin!(relay);
            loop {
                tokio::select! {
                    biased;
                    relayed = &mut relay => break relayed,
                    // A client that stopped sending may still read; a backend that
                    // stopped reading may still answer: the response decides.
                    sent = &mut pump, if pumped.is_none() => pumped = Some(sent.unwrap_or(true)),
                }
            }
        };
        let finished = match relayed {
            Ok(Some(trailers)) => {
                let grpc = events::grpc_status(&trailers).or(head_grpc);
                let sent = down.send_trailers(trailers).is_ok();
                events::finished(status, !sent, grpc)
            }
            Ok(None) => events::finished(status, false, head_grpc),
            Err((Side::Client, _)) => events::finished(status, true, head_grpc),
            Err((Side::Upstream, timed_out)) => {
                let event = Event::Broken {
                    timed_out,
                    stale: false,
                    responding: true,
                    error: if timed_out {
                        ErrorType::ReadTimedout.as_str()
                    } else {
                        ErrorType::ReadError.as_str()
                    },
                };
                exchange.on(&*req, Instant::now(), event);
                // Cut short: the client must not take it for a complete answer.
                down.send_reset(h2::Reason::INTERNAL_ERROR);
                events::finished(status, true, head_grpc)
            }
        };
        exchange.on(&*req, Instant::now(), finished);
        drop(lease);
        None
    }
}

/// Relays the response body and trailers from the backend to the client, each
/// read within the route's timeout; the trailers, or where it failed (and whether
/// by timing out). Its own future, so that the request body keeps streaming up
/// while it waits for the client's window (gRPC streams both ways at once).
async fn relay_response(
    up_body: &mut h2::RecvStream,
    down: &mut SendStream<Bytes>,
    limit: Option<Duration>,
) -> Result<Option<http::HeaderMap>, (Side, bool)> {
    // Bounded by the response's end, an error, or the route's timeout on each read.
    loop {
        match within(limit, up_body.data()).await {
            Some(Some(Ok(data))) => {
                let n = data.len();
                let last = up_body.is_end_stream();
                if send_data(down, data, last).await.is_err() {
                    return Err((Side::Client, false));
                }
                let _ = up_body.flow_control().release_capacity(n);
                if last {
                    return Ok(None);
                }
            }
            Some(Some(Err(_))) => return Err((Side::Upstream, false)),
            Some(None) => {
                return match within(limit, up_body.trailers()).await {
                    Some(Ok(trailers)) => Ok(trailers),
                    Some(Err(_)) => Err((Side::Upstream, false)),
                    None => Err((Side::Upstream, true)),
                }
            }
            None => return Err((Side::Upstream, true)),
        }
    }
}

/// The client's request body failed mid-way (it reset the stream, or sent
/// something h2 refused): its stream ends here.
fn up_reset(respond: &mut SendResponse<Bytes>) {
    respond.send_reset(h2::Reason::CANCEL);
}
