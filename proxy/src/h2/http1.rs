//! Streams to HTTP/1 backends: the request written as HTTP/1.1 (Content-Length
//! when the client gave one, else chunked; cookies joined, RFC 9113 §8.2.3), the
//! response head read with `sluice_h1`'s strict parser and translated to HTTP/2
//! (hop-by-hop fields dropped, RFC 9113 §8.2.2), its body relayed by its framing
//! (chunked trailers become HTTP/2 trailers). Idle connections are kept per
//! worker thread and backend, as the h1 engine keeps its own.
//!
//! Request trailers do not go to HTTP/1 backends (a chunked request could carry
//! them, but few HTTP/1 servers read them); gRPC backends speak h2c.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::SendStream;
use pingora::ErrorType;
use sluice_h1::{parse_response, ChunkedDecoder, Framing, ResponseHead};
use tokio::io::AsyncReadExt;

use super::stream::{client_reset, send_data, Body, H2Request, Side};
use super::translate::{translate, Dechunk};
use super::upstream::{broken, is_hop_by_hop, relayed_head, within, Upstreams};
use super::{events, Conn};
use crate::exchange::{Action, Event, Exchange, Peer};
use crate::shard::Handle;
use crate::shared::Shared;

/// Request bytes gathered before a write to the backend.
const WRITE_CHUNK: usize = 16 * 1024;

/// Where an exchange with an HTTP/1 backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    Io,
    TimedOut,
    Closed,
    BadResponse,
}

impl Broken {
    fn name(self) -> &'static str {
        match self {
            Broken::Io => ErrorType::ReadError.as_str(),
            Broken::TimedOut => ErrorType::ReadTimedout.as_str(),
            Broken::Closed => ErrorType::ConnectionClosed.as_str(),
            Broken::BadResponse => ErrorType::InvalidHTTPHeader.as_str(),
        }
    }
}

async fn fill(
    up: &mut crate::conn::Conn,
    buf: &mut BytesMut,
    limit: Option<Duration>,
) -> Result<(), Broken> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    match within(limit, up.read_buf(buf)).await {
        Some(Ok(0)) => Err(Broken::Closed),
        Some(Ok(_)) => Ok(()),
        Some(Err(_)) => Err(Broken::Io),
        None => Err(Broken::TimedOut),
    }
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The request head as HTTP/1.1; whether its body goes chunked.
fn write_head(
    out: &mut Vec<u8>,
    req: &H2Request<'_>,
    exchange: &Exchange<Handle<Shared>>,
    conn: &Conn,
    body: &Body,
) -> bool {
    let parts = req.parts;
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(req.authority().as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut cookies: Option<Vec<u8>> = None;
    let traceparent = exchange.generated_traceparent();
    for (name, value) in &parts.headers {
        if name == http::header::HOST || name == http::header::TE || is_hop_by_hop(name) {
            continue;
        }
        if traceparent.is_some() && name.as_str() == "traceparent" {
            // Ours goes instead, below.
            continue;
        }
        if name == http::header::COOKIE {
            // HTTP/2 may split cookies into several fields; HTTP/1 has one.
            let joined = cookies.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(value.as_bytes());
            continue;
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(cookies) = cookies {
        push_field(out, b"cookie", &cookies);
    }
    if let Some(tp) = traceparent {
        push_field(out, b"traceparent", tp.as_bytes());
    }
    push_field(out, b"x-forwarded-for", conn.forwarded_for.as_bytes());
    let chunked = !body.is_empty() && !parts.headers.contains_key(http::header::CONTENT_LENGTH);
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

/// Sends the request: head and body, in writes of up to [`WRITE_CHUNK`].
async fn send_request(
    up: &mut crate::conn::Conn,
    out: &mut Vec<u8>,
    body: &mut Body,
    chunked: bool,
    limit: Option<Duration>,
) -> Result<(), Side> {
    // Bounded by the body: each pass takes a chunk or ends.
    while let Some(chunk) = body.next().await? {
        if chunked {
            sluice_h1::chunked::push_hex(out, chunk.len() as u64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&chunk);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(&chunk);
        }
        if out.len() >= WRITE_CHUNK {
            write_out(up, out, limit).await?;
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write_out(up, out, limit).await
}

/// Writes out what `out` gathered, within the route's timeout, and empties it.
async fn write_out(
    up: &mut crate::conn::Conn,
    out: &mut Vec<u8>,
    limit: Option<Duration>,
) -> Result<(), Side> {
    let written = matches!(within(limit, up.send(out)).await, Some(Ok(())));
    out.clear();
    if written {
        Ok(())
    } else {
        Err(Side::Upstream)
    }
}

/// Reads the final response head into `buf` (interim 1xx answers are dropped:
/// the client asked nothing of them over HTTP/2 that Sluice relays).
async fn read_head(
    up: &mut crate::conn::Conn,
    buf: &mut BytesMut,
    head_request: bool,
    limit: Option<Duration>,
) -> Result<ResponseHead, Broken> {
    // Bounded: each pass reads more (within the route's timeout) or returns;
    // the head is bounded by sluice_h1::MAX_HEAD.
    loop {
        fill(up, buf, limit).await?;
        loop {
            match parse_response(buf, head_request) {
                Ok(Some(head)) if head.status == 101 => return Err(Broken::BadResponse),
                Ok(Some(head)) if (100..200).contains(&head.status) => buf.advance(head.len),
                Ok(Some(head)) => return Ok(head),
                Ok(None) => break,
                Err(_) => return Err(Broken::BadResponse),
            }
            if buf.is_empty() {
                break;
            }
        }
    }
}

/// Relays the response body framed by `framing`; its trailers, if any.
async fn relay_body(
    up: &mut crate::conn::Conn,
    buf: &mut BytesMut,
    down: &mut SendStream<Bytes>,
    framing: Framing,
    limit: Option<Duration>,
) -> Result<Option<http::HeaderMap>, (Side, Broken)> {
    let client = |_| (Side::Client, Broken::Io);
    match framing {
        Framing::Empty => Ok(None),
        Framing::Length(total) => {
            let mut left = total;
            // Bounded by `total`: each pass relays some of it or fails.
            loop {
                let take = left.min(buf.len() as u64) as usize;
                left -= take as u64;
                if take > 0 || left == 0 {
                    let piece = buf.split_to(take).freeze();
                    send_data(down, piece, left == 0).await.map_err(client)?;
                }
                if left == 0 {
                    return Ok(None);
                }
                fill(up, buf, limit)
                    .await
                    .map_err(|b| (Side::Upstream, b))?;
            }
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::new(true);
            let mut canon = Vec::new();
            let mut pending = BytesMut::new();
            let mut dechunk = Dechunk::default();
            let mut data = Vec::new();
            // Bounded: each pass decodes input, reads more, or ends.
            loop {
                let progress = decoder
                    .transcode(buf, &mut canon)
                    .map_err(|_| (Side::Upstream, Broken::BadResponse))?;
                buf.advance(progress.consumed);
                pending.extend_from_slice(&canon);
                canon.clear();
                dechunk.take(&mut pending, &mut data);
                for piece in data.drain(..) {
                    send_data(down, piece, false).await.map_err(client)?;
                }
                if progress.done {
                    return Ok(dechunk.trailers.filter(|t| !t.is_empty()));
                }
                fill(up, buf, limit)
                    .await
                    .map_err(|b| (Side::Upstream, b))?;
            }
        }
        Framing::UntilClose => loop {
            if !buf.is_empty() {
                let piece = buf.split().freeze();
                send_data(down, piece, false).await.map_err(client)?;
            }
            match fill(up, buf, limit).await {
                Ok(()) => {}
                Err(Broken::Closed) => return Ok(None),
                Err(b) => return Err((Side::Upstream, b)),
            }
        },
    }
}

impl Upstreams {
    /// One attempt of a stream on an HTTP/1 backend; the next action, or `None`
    /// when the stream is done and settled.
    pub(super) async fn via_http1(
        &self,
        conn: &Conn,
        req: &mut H2Request<'_>,
        body: &mut Body,
        exchange: &mut Exchange<Handle<Shared>>,
        peer: &Peer,
        respond: &mut SendResponse<Bytes>,
    ) -> Option<Action> {
        let pooled = match peer.fresh {
            true => None,
            false => self.http1.take(conn.pooled, peer.addr, peer.tls.as_ref()),
        };
        let (mut up, reused) = match pooled {
            Some(s) => (s, true),
            None => match crate::conn::dial(
                peer.addr,
                peer.tls.as_ref(),
                &self.identity,
                peer.connect_timeout,
            )
            .await
            {
                Ok(s) => (s, false),
                Err(kind) => {
                    let failed = Event::ConnectFailed {
                        error: kind.as_str(),
                    };
                    return Some(exchange.on(&*req, Instant::now(), failed));
                }
            },
        };
        let limit = peer.io_timeout;
        let head_request = req.parts.method == http::Method::HEAD;
        let mut out = Vec::with_capacity(1024);
        let chunked = write_head(&mut out, req, exchange, conn, body);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let attempt = async {
            send_request(&mut up, &mut out, body, chunked, limit)
                .await
                .map_err(|side| (side, Broken::Io))?;
            read_head(&mut up, &mut buf, head_request, limit)
                .await
                .map_err(|b| (Side::Upstream, b))
        };
        let outcome = tokio::select! {
            biased;
            outcome = attempt => Some(outcome),
            () = client_reset(respond) => None,
        };
        req.truncated = body.truncated();
        let head = match outcome {
            Some(Ok(head)) => head,
            None | Some(Err((Side::Client, _))) => {
                exchange.on(&*req, Instant::now(), Event::ClientGone);
                return None;
            }
            Some(Err((Side::Upstream, b))) => {
                // A malformed answer is an answer: not resent as if stale.
                let stale = reused && b != Broken::BadResponse && b != Broken::TimedOut;
                let event = broken(b == Broken::TimedOut, stale, b.name());
                return Some(exchange.on(&*req, Instant::now(), event));
            }
        };
        let status = head.status;
        let parts = translate(&buf, &head);
        let head_grpc = events::grpc_status(&parts.headers);
        let action = exchange.on(&*req, Instant::now(), events::response(status, head_grpc));
        if !matches!(action, Action::Relay) {
            return Some(action);
        }
        buf.advance(head.len);
        let empty = head.framing == Framing::Empty || head.framing == Framing::Length(0);
        let mut down = match respond.send_response(relayed_head(parts, exchange), empty) {
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
        let relayed = if empty {
            Ok(None)
        } else {
            relay_body(&mut up, &mut buf, &mut down, head.framing, limit).await
        };
        let finished = match relayed {
            Ok(trailers) => {
                let grpc = trailers
                    .as_ref()
                    .and_then(events::grpc_status)
                    .or(head_grpc);
                let ended = match (trailers, empty) {
                    (_, true) => true,
                    (Some(trailers), _) => down.send_trailers(trailers).is_ok(),
                    (None, _) if head.framing == Framing::Length(0) => true,
                    (None, _) => match head.framing {
                        // Ended with the last piece of data.
                        Framing::Length(_) => true,
                        _ => down.send_data(Bytes::new(), true).is_ok(),
                    },
                };
                if !head.close && buf.is_empty() {
                    self.http1
                        .put(conn.pooled, peer.addr, peer.tls.as_ref(), up);
                }
                events::finished(status, !ended, grpc)
            }
            Err((Side::Client, _)) => events::finished(status, true, head_grpc),
            Err((Side::Upstream, b)) => {
                let event = Event::Broken {
                    timed_out: b == Broken::TimedOut,
                    stale: false,
                    responding: true,
                    error: b.name(),
                };
                exchange.on(&*req, Instant::now(), event);
                down.send_reset(h2::Reason::INTERNAL_ERROR);
                events::finished(status, true, head_grpc)
            }
        };
        exchange.on(&*req, Instant::now(), finished);
        None
    }
}
