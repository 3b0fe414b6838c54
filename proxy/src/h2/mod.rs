//! Sluice's HTTP/2 engine: h2c client connections (prior knowledge, or the
//! preface on a transparent listener), one [`Exchange`](crate::exchange::Exchange) per stream, to h2c
//! backends over multiplexed HTTP/2 and to HTTP/1 backends over pooled HTTP/1.1.
//!
//! Why its own engine: pingora serves h2c at about half the h1 engine's throughput;
//! the `h2` crate (the framing, HPACK, flow control and the state machine that hyper
//! and tonic use) under a thin driver of Sluice's own costs little more per request
//! than HTTP/1.1 (bench/RESULTS.md, `bench/h2.sh`). The h1 listener peeks for the
//! preface and hands such connections here ([`Engine::serve`]).
//!
//! Each stream is driven exactly as the h1 engine drives a request: `discover`,
//! `Arrived`, then `Connect` / `Response` / `Broken` / `ConnectFailed` until the
//! exchange relays a response or answers itself, then `Finished`. Request bodies
//! stream through (a copy of up to [`MAX_RESEND_BODY`] is kept when the route may
//! retry, so a retry can resend it; beyond that the request says `body_truncated`).
//! Trailers go through both ways (gRPC's `grpc-status`), `te: trailers` and
//! `grpc-timeout` go to h2c backends. Hop-by-hop fields never cross (RFC 9113
//! §8.2.2). The streams of one connection run in its task, on the worker thread
//! that accepted it (no task, no lock per stream).
//!
//! Bounds, per client connection (all explicit, see docs/http2.md):
//! - [`MAX_CONCURRENT_STREAMS`] streams at once (SETTINGS_MAX_CONCURRENT_STREAMS;
//!   a client that opens more gets REFUSED_STREAM), and no more than that many
//!   streams' work in progress on Sluice's side either: streams the client reset
//!   still count until their work is dropped, so resetting streams does not buy
//!   more concurrency (Rapid Reset, CVE-2023-44487);
//! - [`MAX_PENDING_ACCEPT_RESET_STREAMS`] streams reset before Sluice accepted them,
//!   and [`MAX_LOCAL_ERROR_RESET_STREAMS`] streams Sluice had to reset for the peer's
//!   protocol errors (CVE-2025-8671): beyond either the connection is closed with
//!   GOAWAY (ENHANCE_YOUR_CALM);
//! - flow control: [`STREAM_WINDOW`] per stream, [`CONNECTION_WINDOW`] per
//!   connection (what a client can have in flight unread), [`MAX_SEND_BUFFER`]
//!   queued per stream towards the client; data is released to the client only as
//!   it is forwarded, so a slow backend slows its client, not Sluice's memory;
//! - [`MAX_HEADER_LIST_SIZE`] for a request's header block (the h1 engine's longest
//!   field line), [`MAX_FRAME_SIZE`] per frame;
//! - idle: a connection without streams for the listener's idle timeout is sent
//!   GOAWAY; on shutdown every connection is sent GOAWAY and its streams finish.
//!
//! The h1 engine sends HTTP/1.1 clients' requests for h2c backends over the same
//! kind of upstream connections ([`H2Backends`]), instead of handing them to pingora.
//!
//! Upstream: [`MAX_STREAMS_PER_UPSTREAM`] streams per h2c backend connection (fewer
//! if the backend says so), another connection opened when all are full, at most
//! [`MAX_UPSTREAM_CONNECTIONS`] per worker thread and backend (beyond, streams queue
//! on the least loaded one).

mod bridge;
mod events;
mod http1;
mod io;
mod stream;
mod translate;
mod upstream;

use std::net::SocketAddr;
use std::pin::Pin;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use pingora::server::ShutdownWatch;
use std::sync::Arc;

use crate::phases::SluiceProxy;
pub use bridge::{BodyBroken, H2Backends, H2Response, Sent};

/// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS), and
/// streams whose work Sluice has in progress per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// The initial flow-control window of each stream Sluice receives on.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// The flow-control window of a whole connection Sluice receives on.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// The largest frame Sluice accepts (the protocol's default and minimum).
pub const MAX_FRAME_SIZE: u32 = 16 * 1024;
/// The largest header block (HPACK-decoded, RFC 9113 §6.5.2 accounting) a client
/// may send: the h1 engine's longest field line (`sluice_h1::MAX_FIELD_LINE`).
pub const MAX_HEADER_LIST_SIZE: u32 = sluice_h1::MAX_FIELD_LINE as u32;
/// Data queued per stream towards a peer before Sluice stops reading what feeds it.
pub const MAX_SEND_BUFFER: usize = 256 * 1024;
/// Streams a client reset before Sluice accepted them, pending at once: more is a
/// Rapid Reset flood, and the connection is closed (GOAWAY, ENHANCE_YOUR_CALM).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams Sluice reset because of the client's errors (bad frames on a stream):
/// more and the connection is closed.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Request bodies up to this size are kept while they stream upstream, when the
/// route may retry, so a retry can send them again (the h1 engine's `MAX_BODY`).
pub const MAX_RESEND_BODY: usize = 64 * 1024;
/// Streams per HTTP/2 connection to a backend.
pub const MAX_STREAMS_PER_UPSTREAM: usize = 100;
/// HTTP/2 connections per worker thread and backend.
pub const MAX_UPSTREAM_CONNECTIONS: usize = 64;

/// The HTTP/2 engine of one listener.
pub struct Engine {
    flow: SluiceProxy,
    idle_timeout: Duration,
    upstream: upstream::Upstreams,
}

/// What every stream of a client connection shares.
struct Conn {
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    /// The worker thread serving the connection: the h2c upstream pool's key.
    thread: ThreadId,
    /// The same thread, as the HTTP/1 upstream pool knows it.
    pooled: crate::pool::Worker,
    /// The `x-forwarded-for` value, formatted once.
    forwarded_for: http::HeaderValue,
    /// The client's verified workload identity (mTLS).
    peer_identity: Option<crate::identity::PeerIdentity>,
}

impl Engine {
    /// Serves `flow`'s requests over HTTP/2; a connection idle (no streams) for
    /// `idle_timeout` is closed.
    pub fn new(flow: SluiceProxy, idle_timeout: Duration) -> Self {
        let identity = Arc::clone(&flow.shared.identity);
        Engine {
            flow,
            idle_timeout,
            upstream: upstream::Upstreams::new(identity),
        }
    }

    /// Drops idle and closed upstream connections (run periodically).
    pub fn sweep(&self, now: Instant) {
        self.upstream.sweep(now);
    }

    /// Serves a client connection that opened with the HTTP/2 preface; `read`: the
    /// bytes already read from it (the preface first).
    pub async fn serve(
        &self,
        stream: crate::conn::Conn,
        read: BytesMut,
        peer: SocketAddr,
        original_dst: Option<SocketAddr>,
        mut shutdown: ShutdownWatch,
    ) {
        let peer_identity = stream.peer_identity().cloned();
        let io = io::Rewound::new(stream, read);
        let handshake = server_builder().handshake::<_, bytes::Bytes>(io);
        let mut conn = match tokio::time::timeout(self.idle_timeout, handshake).await {
            Ok(Ok(conn)) => conn,
            // Not HTTP/2 after all, or too slow to say so: nothing to answer.
            _ => return,
        };
        let info = Conn {
            peer,
            original_dst,
            thread: std::thread::current().id(),
            pooled: self.upstream.http1.worker(),
            forwarded_for: http::HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or_else(|_| http::HeaderValue::from_static("")),
            peer_identity,
        };
        let mut streams = FuturesUnordered::new();
        let mut idle: Pin<Box<tokio::time::Sleep>> =
            Box::pin(tokio::time::sleep(self.idle_timeout));
        let mut going_away = false;
        if *shutdown.borrow() {
            // Accepted as the server began to stop: the client is told at once.
            going_away = true;
            conn.graceful_shutdown();
        }
        // Bounded: ends when the connection closes (GOAWAY sent on idle or shutdown
        // ends it once its streams are done).
        loop {
            let room = streams.len() < MAX_CONCURRENT_STREAMS as usize;
            tokio::select! {
                biased;
                Some(()) = streams.next(), if !streams.is_empty() => {
                    if streams.is_empty() {
                        idle.as_mut().reset((Instant::now() + self.idle_timeout).into());
                    }
                }
                // At the bound, the connection is still driven (the streams in
                // progress need it) but not asked for new streams: they wait in h2
                // (counted against MAX_CONCURRENT_STREAMS there) until one here is done.
                accepted = std::future::poll_fn(|cx| {
                    if room {
                        conn.poll_accept(cx)
                    } else {
                        conn.poll_closed(cx).map(|_| None)
                    }
                }) => match accepted {
                    Some(Ok((req, respond))) => {
                        streams.push(self.stream(&info, req, respond));
                    }
                    // The client closed, or broke the protocol (h2 sent GOAWAY).
                    Some(Err(_)) | None => break,
                },
                () = idle.as_mut(), if streams.is_empty() && !going_away => {
                    going_away = true;
                    conn.graceful_shutdown();
                }
                changed = shutdown.changed(), if !going_away => {
                    if changed.is_err() || *shutdown.borrow() {
                        going_away = true;
                        conn.graceful_shutdown();
                    }
                }
            }
        }
        // The connection is gone: streams still in progress notice (their sends
        // and resets fail) and settle as the client gone.
        while streams.next().await.is_some() {}
    }
}

/// The server side's settings and bounds (the module doc says why each).
fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS));
    b
}
