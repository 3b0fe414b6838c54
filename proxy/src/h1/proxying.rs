//! A request the fast path proxies: the exchange's actions carried out (attempts
//! on pooled or new upstream connections), the response relayed, or the proxy's
//! own answer written; the request settled either way.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use sluice_h1::{Framing, ResponseHead};

use super::h2c::H2cStep;
use super::upstream::{read_response_head, relay_body, unless_client_leaves, Broken, Relay};
use super::{
    push_governance_fields, push_header, write_reply_head, Client, Engine, FastRequest, Served,
};
use crate::conn::{dial, Conn};
use crate::exchange::{Action, Event, Exchange, Peer, Reply, Request, MAX_ATTEMPTS};
use crate::shard::Handle;
use crate::shared::Shared;

impl Engine {
    /// Writes the proxy's own answer and settles the request.
    pub(super) async fn answer(
        &self,
        client: &mut Client,
        req: &FastRequest<'_>,
        mut exchange: Exchange<Handle<Shared>>,
        reply: Reply,
        keep_alive: bool,
        out: &mut Vec<u8>,
    ) -> Served {
        let keep_alive = keep_alive && !reply.close;
        out.clear();
        write_reply_head(
            out,
            reply.status,
            reply.content_type,
            &reply.headers,
            reply.body.len(),
            !keep_alive,
        );
        if req.method() != "HEAD" {
            out.extend_from_slice(&reply.body);
        }
        let written = client.stream.send(out).await.is_ok();
        let finished = Event::Finished {
            status: reply.status,
            failed: !written,
            grpc_status: None,
        };
        exchange.on(req, Instant::now(), finished);
        if written && keep_alive {
            Served::KeepAlive
        } else {
            Served::Close
        }
    }

    /// Carries out the exchange's actions: attempts upstream (failovers,
    /// retries, fallbacks) until it relays a response or answers itself.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn drive(
        &self,
        client: &mut Client,
        req: &FastRequest<'_>,
        body: &Bytes,
        mut exchange: Exchange<Handle<Shared>>,
        mut action: Action,
        keep_alive: bool,
        out: &mut Vec<u8>,
        ubuf: &mut BytesMut,
    ) -> Served {
        let head_request = req.method() == "HEAD";
        // Bounded: the exchange makes at most MAX_ATTEMPTS attempts, each one
        // pass, then answers.
        for _ in 0..=MAX_ATTEMPTS {
            let peer = match action {
                Action::Connect(peer) => peer,
                Action::Answer(reply) => {
                    return self
                        .answer(client, req, exchange, reply, keep_alive, out)
                        .await
                }
                Action::Relay | Action::HandOff | Action::Abort | Action::Done => {
                    exchange.on(req, Instant::now(), Event::ClientGone);
                    return Served::Close;
                }
            };
            if peer.h2c {
                let step = self
                    .attempt_h2c(client, req, body, &mut exchange, &peer, keep_alive, out)
                    .await;
                match step {
                    H2cStep::Next(next) => {
                        action = next;
                        continue;
                    }
                    H2cStep::Done(served) => return served,
                }
            }
            // A connection: pooled (unless a stale one just broke), else new.
            let pooled = match peer.fresh {
                true => None,
                false => self.pool.take(client.pooled, peer.addr, peer.tls.as_ref()),
            };
            let (mut upstream, reused) = match pooled {
                Some(s) => (s, true),
                None => match dial(
                    peer.addr,
                    peer.tls.as_ref(),
                    &self.flow.shared.identity,
                    peer.connect_timeout,
                )
                .await
                {
                    Ok(s) => (s, false),
                    Err(kind) => {
                        let failed = Event::ConnectFailed {
                            error: kind.as_str(),
                        };
                        action = exchange.on(req, Instant::now(), failed);
                        continue;
                    }
                },
            };
            // The request: the client's head, Sluice's headers, the body, one write.
            out.clear();
            let tp = exchange.generated_traceparent();
            req.head
                .write_forwarded_without(out, false, tp.map(|_| "traceparent"));
            if let Some(tp) = tp {
                push_header(out, "traceparent", tp.as_bytes());
            }
            out.extend_from_slice(&client.forwarded_for);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(body);
            ubuf.clear();
            // Requests already read behind this one: the client means to stay (even
            // if it has half-closed after sending them), so it is not watched.
            let watch = client.buf.is_empty();
            let (client_reader, mut client_writer) = client.stream.split();
            let io_timer = &mut client.io_timer;
            let attempt = async {
                io_timer.within(peer.io_timeout, upstream.send(out)).await?;
                read_response_head(
                    &mut upstream,
                    ubuf,
                    head_request,
                    peer.io_timeout,
                    &mut client_writer,
                    io_timer,
                )
                .await
            };
            let left = unless_client_leaves(attempt, watch, client_reader, &mut client.watch_timer);
            let response = match left.await {
                None => {
                    // As nginx (499) and Envoy (downstream reset): the backend's
                    // answer would go nowhere; its connection is dropped mid-exchange.
                    // Status 0: nothing was sent, as pingora's side logs it.
                    exchange.on(req, Instant::now(), Event::ClientGone);
                    return Served::Close;
                }
                Some(Ok(head)) => head,
                Some(Err(broken)) => {
                    let event = Event::Broken {
                        timed_out: matches!(broken, Broken::TimedOut),
                        // A malformed answer is an answer: not resent as if the
                        // pooled connection had been stale.
                        stale: reused && !matches!(broken, Broken::BadResponse),
                        responding: false,
                        error: broken.name(),
                    };
                    action = exchange.on(req, Instant::now(), event);
                    continue;
                }
            };
            let status = response.status;
            action = exchange.on(
                req,
                Instant::now(),
                Event::Response {
                    status,
                    // gRPC is HTTP/2 only: nothing this engine relays carries it.
                    grpc_status: None,
                },
            );
            if let Action::Relay = action {
                return self
                    .relay(
                        client, req, exchange, upstream, &peer, response, ubuf, keep_alive, out,
                    )
                    .await;
            }
        }
        // Not reached: the exchange answers once its attempts are spent.
        let failed = Event::Failed {
            status: 502,
            error: "too many attempts",
        };
        match exchange.on(req, Instant::now(), failed) {
            Action::Answer(reply) => {
                self.answer(client, req, exchange, reply, keep_alive, out)
                    .await
            }
            _ => Served::Close,
        }
    }

    /// Relays an accepted response: its head with Sluice's headers, then its body.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn relay(
        &self,
        client: &mut Client,
        req: &FastRequest<'_>,
        mut exchange: Exchange<Handle<Shared>>,
        mut upstream: Conn,
        peer: &Peer,
        response: ResponseHead,
        ubuf: &mut BytesMut,
        keep_alive: bool,
        out: &mut Vec<u8>,
    ) -> Served {
        let status = response.status;
        // The client's connection outlives the backend's unless the client asked
        // to close or the body ends only when the backend closes (the backend's own
        // `Connection` is not relayed; Sluice says `close` when it will close).
        let close_client = !keep_alive || response.framing == Framing::UntilClose;
        out.clear();
        response.write_relayed(ubuf, out);
        push_governance_fields(out, &exchange);
        if close_client {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        bytes::Buf::advance(ubuf, response.len);
        let result = relay_body(
            &mut upstream,
            ubuf,
            &mut client.stream,
            response.framing,
            out,
            peer.io_timeout,
            &mut client.io_timer,
        )
        .await;
        let (upstream_ok, client_ok) = match result {
            Ok(()) => (true, true),
            Err(Relay::Client) => (false, false),
            Err(Relay::Upstream(broken)) => {
                let event = Event::Broken {
                    timed_out: matches!(broken, Broken::TimedOut),
                    stale: false,
                    responding: true,
                    error: broken.name(),
                };
                exchange.on(req, Instant::now(), event);
                (false, false)
            }
        };
        if upstream_ok && !response.close && ubuf.is_empty() {
            self.pool
                .put(client.pooled, peer.addr, peer.tls.as_ref(), upstream);
        }
        let finished = Event::Finished {
            status,
            failed: !client_ok,
            grpc_status: None,
        };
        exchange.on(req, Instant::now(), finished);
        if client_ok && !close_client {
            Served::KeepAlive
        } else {
            Served::Close
        }
    }
}
