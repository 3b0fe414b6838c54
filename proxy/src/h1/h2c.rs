//! HTTP/1.1 requests whose backends speak h2c, served on the fast path: sent over
//! the h2 engine's multiplexed upstream connections ([`crate::h2::H2Backends`]),
//! the response written back as HTTP/1.1 (length-delimited when the backend said
//! its length, else chunked; trailers stay behind: HTTP/1.1 clients rarely ask for
//! them). Before, such a request was handed to pingora with its connection.
//!
//! Chunked request bodies still go to pingora (the fast path keeps them in their
//! re-encoded form, not as data).

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;

use super::upstream::unless_client_leaves;
use super::{
    push_governance_fields, push_header, push_number, reason, Client, Engine, FastRequest, Served,
};
use crate::exchange::{Action, Event, Exchange, Peer, Request};
use crate::h2::{H2Response, Sent};
use crate::shard::Handle;
use crate::shared::Shared;

/// What an attempt on an h2c backend came to.
pub(super) enum H2cStep {
    /// The exchange's next action (another attempt, or its answer).
    Next(Action),
    /// The response was relayed (or the client left): settled.
    Done(Served),
}

/// Connection-specific fields: never forwarded between HTTP/1.1 and HTTP/2.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "host"
    )
}

/// The request as the h2c backend gets it: the head as the h1 engine forwards it
/// (hop-by-hop fields left behind), its origin-form target as `:path`, its host as
/// `:authority`, Sluice's fields added. `None` if it cannot be said in HTTP/2.
fn h2_request(
    req: &FastRequest<'_>,
    exchange: &Exchange<Handle<Shared>>,
    peer: &Peer,
    client_ip: IpAddr,
) -> Option<http::Request<()>> {
    let mut head = Vec::with_capacity(req.head.bytes().len() + 2);
    req.head.write_forwarded(&mut head, false);
    head.extend_from_slice(b"\r\n");
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; sluice_h1::MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut []);
    parsed.parse_with_uninit_headers(&head, &mut fields).ok()?;
    let authority = match req.host() {
        "" => peer.addr.to_string(),
        host => host.to_owned(),
    };
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(parsed.path?)
        .build()
        .ok()?;
    let mut out = http::Request::new(());
    *out.method_mut() = http::Method::from_bytes(req.method().as_bytes()).ok()?;
    *out.uri_mut() = uri;
    *out.version_mut() = http::Version::HTTP_2;
    let headers = out.headers_mut();
    for h in parsed.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if hop_by_hop(name.as_str()) {
            continue;
        }
        headers.append(name, http::HeaderValue::from_bytes(h.value).ok()?);
    }
    if let Some(tp) = exchange.generated_traceparent() {
        headers.insert("traceparent", http::HeaderValue::from_str(tp).ok()?);
    }
    let ip = http::HeaderValue::from_str(&client_ip.to_string()).ok()?;
    headers.append("x-forwarded-for", ip);
    Some(out)
}

impl Engine {
    /// One attempt of `req` on an h2c backend.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt_h2c(
        &self,
        client: &mut Client,
        req: &FastRequest<'_>,
        body: &Bytes,
        exchange: &mut Exchange<Handle<Shared>>,
        peer: &Peer,
        keep_alive: bool,
        out: &mut Vec<u8>,
    ) -> H2cStep {
        let request = h2_request(req, exchange, peer, client.peer.ip());
        let (Some(backends), Some(request)) = (&self.h2c, request) else {
            let failed = Event::Failed {
                status: 502,
                error: "request not expressible in HTTP/2",
            };
            return H2cStep::Next(exchange.on(req, Instant::now(), failed));
        };
        // Requests already read behind this one: the client means to stay.
        let watch = client.buf.is_empty();
        let sent = {
            let sending = backends.send(client.thread, peer, request, body.clone());
            unless_client_leaves(sending, watch, client.stream.tcp(), &mut client.watch_timer).await
        };
        let response = match sent {
            None => {
                exchange.on(req, Instant::now(), Event::ClientGone);
                return H2cStep::Done(Served::Close);
            }
            Some(Sent::ConnectFailed(error)) => {
                let failed = Event::ConnectFailed { error };
                return H2cStep::Next(exchange.on(req, Instant::now(), failed));
            }
            Some(Sent::Broken {
                timed_out,
                stale,
                error,
            }) => {
                let event = Event::Broken {
                    timed_out,
                    stale,
                    responding: false,
                    error,
                };
                return H2cStep::Next(exchange.on(req, Instant::now(), event));
            }
            Some(Sent::Response(response)) => response,
        };
        let status = response.head.status.as_u16();
        // gRPC is HTTP/2 only: an HTTP/1.1 client's call carries no grpc-status.
        let event = Event::Response {
            status,
            grpc_status: None,
        };
        let action = exchange.on(req, Instant::now(), event);
        if !matches!(action, Action::Relay) {
            return H2cStep::Next(action);
        }
        self.relay_h2c(client, req, exchange, response, keep_alive, out)
            .await
    }

    /// Writes the h2c backend's response as HTTP/1.1 and settles the request.
    async fn relay_h2c(
        &self,
        client: &mut Client,
        req: &FastRequest<'_>,
        exchange: &mut Exchange<Handle<Shared>>,
        mut response: H2Response,
        keep_alive: bool,
        out: &mut Vec<u8>,
    ) -> H2cStep {
        let status = response.head.status.as_u16();
        let bodyless = req.method() == "HEAD" || matches!(status, 100..=199 | 204 | 304);
        let length = response
            .head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let ended = response.is_end_stream();
        let chunked = !bodyless && length.is_none() && !ended;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(digits.format(status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &response.head.headers {
            if !hop_by_hop(name.as_str()) {
                push_header(out, name.as_str(), value.as_bytes());
            }
        }
        if !bodyless && length.is_none() && ended {
            push_number(out, "content-length", 0);
        }
        push_governance_fields(out, exchange);
        if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        // The body: written as it comes, the head with the first piece (one write
        // for a response that arrives whole).
        let mut written_any = false;
        let mut client_ok = true;
        let mut more = !bodyless && !ended;
        // Bounded by the response: each pass relays a piece or ends.
        while more {
            match response.data().await {
                Ok(Some(data)) => {
                    if chunked {
                        sluice_h1::chunked::push_hex(out, data.len() as u64);
                        out.extend_from_slice(b"\r\n");
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    } else {
                        out.extend_from_slice(&data);
                    }
                    more = !response.is_end_stream();
                    if more {
                        client_ok = client.stream.send(out).await.is_ok();
                        written_any = true;
                        out.clear();
                        if !client_ok {
                            break;
                        }
                    }
                }
                Ok(None) => more = false,
                Err(broken) => {
                    let event = Event::Broken {
                        timed_out: broken.timed_out,
                        stale: false,
                        responding: written_any,
                        error: broken.error,
                    };
                    let action = exchange.on(req, Instant::now(), event);
                    if !written_any {
                        // Nothing went out: the exchange may still answer or retry.
                        return H2cStep::Next(action);
                    }
                    exchange.on(req, Instant::now(), finished(status, true));
                    return H2cStep::Done(Served::Close);
                }
            }
        }
        if client_ok {
            if chunked {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            client_ok = client.stream.send(out).await.is_ok();
        }
        exchange.on(req, Instant::now(), finished(status, !client_ok));
        H2cStep::Done(if client_ok && keep_alive {
            Served::KeepAlive
        } else {
            Served::Close
        })
    }
}

fn finished(status: u16, failed: bool) -> Event<'static> {
    Event::Finished {
        status,
        failed,
        grpc_status: None,
    }
}
