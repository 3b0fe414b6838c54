//! One stream of a client connection: the request as the flow sees it, its body
//! as attempts read it (kept for a resend while small), the exchange's actions
//! carried out, and the proxy's own answers written.

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::HeaderMap;

use super::{events, Conn, Engine, MAX_RESEND_BODY};
use crate::exchange::{Action, Event, Exchange, Reply, Request, MAX_ATTEMPTS};
use crate::shard::Handle;
use crate::shared::Shared;

/// A request as the flow sees it on the h2 engine.
pub(super) struct H2Request<'a> {
    pub(super) parts: &'a http::request::Parts,
    client_ip: IpAddr,
    peer_identity: Option<&'a crate::identity::PeerIdentity>,
    /// Part of the body went upstream and was not kept: it cannot be resent.
    pub(super) truncated: bool,
}

impl H2Request<'_> {
    /// `:authority`, else the Host field (RFC 9113 §8.3.1 allows either).
    pub(super) fn authority(&self) -> &str {
        self.parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                self.parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("")
    }
}

impl Request for H2Request<'_> {
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }

    fn path(&self) -> &str {
        self.parts.uri.path()
    }

    fn host(&self) -> &str {
        self.authority()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.parts.headers.get(name).map(|v| v.as_bytes())
    }

    fn client_ip(&self) -> Option<IpAddr> {
        Some(self.client_ip)
    }

    fn body_truncated(&self) -> bool {
        self.truncated
    }

    fn peer_identity(&self) -> Option<&crate::identity::PeerIdentity> {
        self.peer_identity
    }
}

/// Why moving data failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Client,
    Upstream,
}

/// The client's request body as attempts read it: what was kept first (a
/// resend), then what is still to come from the client.
pub(super) struct Body {
    recv: RecvStream,
    /// The client's side of the body ended (read whole, or there was none).
    ended: bool,
    /// What was read, kept for a resend (only when the route may retry).
    kept: Vec<Bytes>,
    kept_len: usize,
    keep: bool,
    /// Data was read and not kept.
    truncated: bool,
    /// The next kept chunk the current attempt sends.
    replay_at: usize,
    trailers: Option<HeaderMap>,
}

impl Body {
    pub(super) fn new(recv: RecvStream, keep: bool) -> Self {
        Body {
            ended: recv.is_end_stream(),
            recv,
            kept: Vec::new(),
            kept_len: 0,
            keep,
            truncated: false,
            replay_at: 0,
            trailers: None,
        }
    }

    /// There is no body at all (sent as END_STREAM on the request's HEADERS).
    pub(super) fn is_empty(&self) -> bool {
        self.ended && self.kept.is_empty() && self.trailers.is_none()
    }

    pub(super) fn truncated(&self) -> bool {
        self.truncated
    }

    /// The client announced its length (kept for HTTP/1 backends).
    pub(super) fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// A new attempt sends the body from its start.
    pub(super) fn rewind(&mut self) {
        self.replay_at = 0;
    }

    /// The next chunk of the body for the current attempt; `None` at its end.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, Side> {
        if let Some(chunk) = self.kept.get(self.replay_at) {
            self.replay_at += 1;
            return Ok(Some(chunk.clone()));
        }
        if self.ended {
            return Ok(None);
        }
        match self.recv.data().await {
            Some(Ok(chunk)) => {
                // Released as read: what the client may send more is bounded by
                // the windows, and Sluice reads no further until this is sent on.
                let _ = self.recv.flow_control().release_capacity(chunk.len());
                if self.keep && !self.truncated && self.kept_len + chunk.len() <= MAX_RESEND_BODY {
                    self.kept_len += chunk.len();
                    self.kept.push(chunk.clone());
                    self.replay_at = self.kept.len();
                } else {
                    self.truncated = true;
                    self.kept = Vec::new();
                    self.replay_at = 0;
                }
                Ok(Some(chunk))
            }
            Some(Err(_)) => Err(Side::Client),
            None => {
                self.ended = true;
                self.trailers = self.recv.trailers().await.map_err(|_| Side::Client)?;
                Ok(None)
            }
        }
    }
}

/// Sends `data` on `stream` as its flow control allows (never queuing more than
/// the window: `MAX_SEND_BUFFER` bounds what waits), ending the stream with it
/// when `end`.
pub(super) async fn send_data(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        if end {
            stream.send_data(Bytes::new(), true)?;
        }
        return Ok(());
    }
    // Bounded: each pass sends some of `data`, or waits for capacity (which
    // fails when the stream or connection goes away).
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let mut capacity = stream.capacity();
        if capacity == 0 {
            capacity = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(e),
                None => return Err(h2::Error::from(h2::Reason::CANCEL)),
            };
            if capacity == 0 {
                continue;
            }
        }
        let piece = data.split_to(capacity.min(data.len()));
        stream.send_data(piece, end && data.is_empty())?;
    }
    Ok(())
}

/// Resolves when the client reset the stream (or its connection went away).
pub(super) async fn client_reset(respond: &mut SendResponse<Bytes>) {
    let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
}

/// An HTTP/2 response head for the proxy's own answer.
fn reply_head(reply: &Reply, with_length: bool) -> http::Response<()> {
    let mut response = http::Response::new(());
    *response.status_mut() =
        http::StatusCode::from_u16(reply.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    if let Some(ct) = reply.content_type {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
    }
    for (name, value) in &reply.headers {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    if with_length {
        headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(reply.body.len()),
        );
    }
    response
}

impl Engine {
    /// One stream, from its head to its settlement.
    pub(super) async fn stream(
        &self,
        conn: &Conn,
        req: http::Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) {
        let (parts, recv) = req.into_parts();
        if parts.method == http::Method::CONNECT {
            // Tunnels over HTTP/2 (CONNECT, extended CONNECT) are not served: nothing
            // of the request may be forwarded as if it were an ordinary one.
            let mut respond = respond;
            let mut refused = http::Response::new(());
            *refused.status_mut() = http::StatusCode::NOT_IMPLEMENTED;
            let _ = respond.send_response(refused, true);
            return;
        }
        let mut req = H2Request {
            parts: &parts,
            client_ip: conn.peer.ip(),
            peer_identity: conn.peer_identity.as_ref(),
            truncated: false,
        };
        let mut exchange = self.flow.exchange(Instant::now());
        let undiscovered = self.flow.discover(req.host()).await;
        let event = self.flow.arrived(conn.original_dst, true, undiscovered);
        let action = exchange.on(&req, exchange.start(), event);
        let mut body = Body::new(recv, exchange.may_resend());
        self.drive(conn, &mut req, &mut body, exchange, action, respond)
            .await;
    }

    /// Carries out the exchange's actions until it relays a response or answers.
    async fn drive(
        &self,
        conn: &Conn,
        req: &mut H2Request<'_>,
        body: &mut Body,
        mut exchange: Exchange<Handle<Shared>>,
        mut action: Action,
        mut respond: SendResponse<Bytes>,
    ) {
        // Bounded: the exchange makes at most MAX_ATTEMPTS attempts, each one
        // pass, then answers.
        for _ in 0..=MAX_ATTEMPTS {
            let peer = match action {
                Action::Connect(peer) => peer,
                Action::Answer(reply) => {
                    return answer(req, exchange, reply, respond);
                }
                Action::Relay | Action::HandOff | Action::Abort | Action::Done => {
                    respond.send_reset(h2::Reason::INTERNAL_ERROR);
                    exchange.on(&*req, Instant::now(), Event::ClientGone);
                    return;
                }
            };
            req.truncated = body.truncated();
            body.rewind();
            let step = if peer.h2c {
                self.upstream
                    .via_h2(conn, req, body, &mut exchange, &peer, &mut respond)
                    .await
            } else {
                self.upstream
                    .via_http1(conn, req, body, &mut exchange, &peer, &mut respond)
                    .await
            };
            match step {
                Some(next) => action = next,
                None => return,
            }
        }
        let failed = Event::Failed {
            status: 502,
            error: "too many attempts",
        };
        match exchange.on(&*req, Instant::now(), failed) {
            Action::Answer(reply) => answer(req, exchange, reply, respond),
            _ => respond.send_reset(h2::Reason::INTERNAL_ERROR),
        }
    }
}

/// Writes the proxy's own answer and settles the request. An answer without a
/// body (a gRPC status the proxy gives: 200 with `grpc-status`) is one HEADERS
/// frame with END_STREAM (trailers-only, as gRPC expects).
fn answer(
    req: &H2Request<'_>,
    mut exchange: Exchange<Handle<Shared>>,
    reply: Reply,
    mut respond: SendResponse<Bytes>,
) {
    let head_request = req.parts.method == http::Method::HEAD;
    let empty = reply.body.is_empty() || head_request;
    let head = reply_head(&reply, !reply.body.is_empty());
    let written = match respond.send_response(head, empty) {
        // The body fits the stream's initial window (the proxy's answers are
        // short): queued at once, h2 writes it as the window allows.
        Ok(mut stream) if !empty => stream.send_data(reply.body.clone(), true).is_ok(),
        Ok(_) => true,
        Err(_) => false,
    };
    // Nothing came from upstream: the exchange knows its own answer's status.
    let finished = events::finished(reply.status, !written, None);
    exchange.on(req, Instant::now(), finished);
}
