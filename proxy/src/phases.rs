//! The request flow as pingora's `ProxyHttp` phases: each phase reports what
//! happened to the request's [`Exchange`] and turns its [`Action`] into pingora's
//! terms (a peer, retry flags on errors, written responses). pingora serves what
//! the fast path (`h1`) hands over: h2c, upgrades, large or streamed bodies,
//! HTTP/1.0 (and everything with `--engine pingora`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::exchange::grpc;
use crate::exchange::{
    Action, Direction, Event, Exchange, Peer, Reply, Request, Side, UPSTREAM_IDLE_TIMEOUT,
};
use crate::front;
use crate::respond::respond;
use crate::shard::{Handle, Handles};
use crate::shared::Shared;

/// One listener's flow: pingora's `ProxyHttp`, and what the fast path runs too.
#[derive(Clone)]
pub struct SluiceProxy {
    pub shared: Arc<Shared>,
    /// References to `shared` for the exchanges, one per thread (see
    /// [`Handles`]).
    observers: Arc<Handles<Shared>>,
    pub side: Side,
    /// Connections arrive by iptables REDIRECT: use their original destination.
    pub transparent: bool,
    /// Transparent listeners: tell HTTP from opaque TCP before the HTTP engines
    /// parse (`opaque::sort`); `None` serves every connection as HTTP.
    pub detect: Option<crate::detect::Detection>,
}

impl SluiceProxy {
    pub fn new(
        shared: Arc<Shared>,
        side: Side,
        transparent: bool,
        detect: Option<crate::detect::Detection>,
    ) -> Self {
        SluiceProxy {
            observers: Arc::new(Handles::new(&shared)),
            shared,
            side,
            transparent,
            detect,
        }
    }

    /// A fresh exchange, counted in flight until it is dropped.
    pub fn exchange(&self, now: Instant) -> Exchange<Handle<Shared>> {
        Exchange::new(self.observers.mine(), now)
    }

    /// Before routing an outbound request: when policies are discovered on demand
    /// and no held policy owns `host`, waits (bounded) for the control plane's
    /// answer about it. Marks the owning policy used (so it is not released).
    /// True when it asked and the answer did not come in time.
    pub async fn discover(&self, host: &str) -> bool {
        let Some(demand) = self.shared.demand.get() else {
            return false;
        };
        if self.side.direction != Direction::Outbound {
            return false;
        }
        {
            let runtime = self.shared.runtime.load();
            if let Some(policy) = runtime
                .policy_of_host(host)
                .and_then(|i| runtime.policies.get(i))
            {
                // A load first: the flag is written once per release period, not
                // per request, so the cache line stays shared.
                if !policy.used.load(Ordering::Relaxed) {
                    policy.used.store(true, Ordering::Relaxed);
                }
                return false;
            }
        }
        demand
            .wait(host, || {
                self.shared.runtime.load().policy_of_host(host).is_some()
            })
            .await
    }

    /// The first event of a request whose head arrived.
    pub fn arrived(
        &self,
        original_dst: Option<SocketAddr>,
        h2c: bool,
        undiscovered: bool,
    ) -> Event<'_> {
        Event::Arrived {
            runtime: self.shared.snapshot(),
            side: &self.side,
            original_dst,
            h2c,
            undiscovered,
        }
    }
}

/// A request's state across pingora's phases: its exchange, and what the last
/// event asked for that a later phase carries out.
pub struct Ctx {
    exchange: Exchange<Handle<Shared>>,
    /// The peer the next `upstream_peer` returns.
    next: Option<Peer>,
    /// The answer `fail_to_proxy` writes.
    reply: Option<Reply>,
    /// The `grpc-status` of the relayed response (its head, or its trailers).
    grpc_status: Option<u32>,
}

impl Ctx {
    /// Keeps what an action asks a later phase to do; whether it is an attempt.
    fn keep(&mut self, action: Action) -> bool {
        match action {
            Action::Connect(peer) => {
                self.next = Some(peer);
                true
            }
            Action::Answer(reply) => {
                self.reply = Some(reply);
                false
            }
            Action::Relay | Action::HandOff | Action::Abort | Action::Done => false,
        }
    }
}

impl Request for Session {
    fn method(&self) -> &str {
        self.req_header().method.as_str()
    }

    fn path(&self) -> &str {
        self.req_header().uri.path()
    }

    fn host(&self) -> &str {
        let req = self.req_header();
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()))
            .unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.req_header().headers.get(name).map(|v| v.as_bytes())
    }

    fn client_ip(&self) -> Option<IpAddr> {
        self.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
    }

    fn body_truncated(&self) -> bool {
        self.retry_buffer_truncated()
    }

    fn peer_identity(&self) -> Option<&crate::identity::PeerIdentity> {
        front::peer_identity(self.downstream_session.stream())
    }
}

/// Dials a meshed peer for pingora: TCP, then mTLS checking its identity.
#[derive(Debug)]
struct MeshConnect {
    identity: Arc<crate::identity::tls::Tls>,
    expected: Arc<str>,
    limit: std::time::Duration,
}

#[async_trait]
impl pingora::connectors::L4Connect for MeshConnect {
    async fn connect(
        &self,
        addr: &pingora::protocols::l4::socket::SocketAddr,
    ) -> Result<pingora::protocols::l4::stream::Stream> {
        let Some(addr) = addr.as_inet() else {
            return Err(Error::new(ErrorType::ConnectError));
        };
        crate::conn::dial(*addr, Some(&self.expected), &self.identity, self.limit)
            .await
            .map(crate::conn::Conn::into_pingora)
            .map_err(Error::new)
    }
}

/// The destination an iptables-redirected connection was really for (pingora reads
/// `SO_ORIGINAL_DST`); `None` when the client connected to the proxy directly.
fn original_destination(session: &Session) -> Option<SocketAddr> {
    let socket = session.digest()?.socket_digest.as_ref()?;
    let original = *socket.original_dst()?.as_inet()?;
    let local = session.server_addr().and_then(|a| a.as_inet()).copied();
    (Some(original) != local).then_some(original)
}

async fn write_reply(session: &mut Session, reply: &Reply) -> Result<()> {
    if reply.close {
        session.set_keepalive(None);
    }
    // A gRPC status is trailers-only: one HEADERS frame that ends the stream.
    // pingora's session ends an HTTP/2 stream only with a body frame (its `end`
    // flag is not passed on for headers), and grpc-go reads a status in headers
    // without END_STREAM as no status at all: written to the h2 stream itself.
    // (Over HTTP/1, where gRPC does not run, it is written like any answer, so
    // the request body is drained or the connection closed as always.)
    if let (true, ServerSession::H2(h2)) = (reply.is_grpc(), session.downstream_session.as_mut()) {
        let mut resp = ResponseHeader::build(reply.status, Some(reply.headers.len() + 1))?;
        if let Some(ct) = reply.content_type {
            resp.insert_header("content-type", ct)?;
        }
        for (name, value) in &reply.headers {
            resp.append_header(name.to_string(), value.as_str())?;
        }
        return h2.write_response_header(Box::new(resp), true);
    }
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_str()))
        .collect();
    respond(
        session,
        reply.status,
        reply.content_type,
        &headers,
        reply.body.clone(),
    )
    .await
}

/// A backend's response framed one way before it goes on, as the h1 engine relays
/// it (sluice_h1::response): identical Content-Length repeats become one, none
/// stays beside Transfer-Encoding (RFC 9112 §6.3: the coding decides), and
/// lengths that disagree are the backend's failure (a 502), never a guess.
fn one_framing(resp: &mut ResponseHeader) -> Result<()> {
    let lengths: Vec<http::HeaderValue> = resp
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .cloned()
        .collect();
    if resp.headers.contains_key(http::header::TRANSFER_ENCODING) {
        resp.remove_header(&http::header::CONTENT_LENGTH);
    } else if let [first, rest @ ..] = lengths.as_slice() {
        if rest.iter().any(|l| l != first) {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "the backend sent conflicting content-length fields",
            ));
        }
        if !rest.is_empty() {
            resp.insert_header(http::header::CONTENT_LENGTH, first.clone())?;
        }
    }
    Ok(())
}

/// The answer to a request the HTTP/1 front refused, as the fast path writes it.
async fn write_refusal(session: &mut Session, refusal: sluice_h1::Refusal) -> Result<()> {
    let body = front::refusal_body(refusal);
    respond(
        session,
        refusal.status,
        Some("text/plain; charset=utf-8"),
        &[("connection", "close")],
        body.into(),
    )
    .await
}

/// What a phase answers when the exchange asked for something it cannot do
/// there (an engine bug, never a client's doing).
fn out_of_order(phase: &str) -> Box<Error> {
    Error::explain(
        ErrorType::InternalError,
        format!("the request flow asked for something {phase} cannot do"),
    )
}

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = Ctx;

    /// No downstream modules: pingora's default adds a (disabled) compression
    /// module that still runs on every request; a sidecar passes bodies through.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            exchange: self.exchange(Instant::now()),
            next: None,
            reply: None,
            grpc_status: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Requests pipelined behind this one are served in turn (pingora drops
        // them by default). Safe: the front hands pingora one message at a time,
        // each checked.
        session.downstream_session.set_pipelining_enabled(true);
        if let Some(refused) = front::refusal(session.downstream_session.stream()) {
            // The head Sluice put in place of one it refused: answered in order,
            // after any response still going out, then the connection closes.
            session.downstream_session.set_keepalive(None);
            write_refusal(session, refused.refusal).await?;
            return Ok(true);
        }
        let now = Instant::now();
        let action = match front::take_exchange(session.downstream_session.stream()) {
            // Routed by the fast path already: governed here, on the same snapshot.
            Some(handed) => {
                ctx.exchange = handed;
                ctx.exchange.on(&*session, now, Event::Resume)
            }
            None => {
                let original_dst = if self.transparent {
                    original_destination(session)
                } else {
                    None
                };
                let host = Request::host(session).to_owned();
                let undiscovered = self.discover(&host).await;
                let event = self.arrived(original_dst, true, undiscovered);
                ctx.exchange.on(&*session, now, event)
            }
        };
        if ctx.exchange.may_resend() {
            // Keep (a bounded prefix of) the request body so a retry can resend it.
            session.enable_retry_buffering();
        }
        match action {
            Action::Connect(peer) => {
                ctx.next = Some(peer);
                Ok(false)
            }
            Action::Answer(reply) => {
                write_reply(session, &reply).await?;
                Ok(true)
            }
            Action::Relay | Action::HandOff | Action::Abort | Action::Done => {
                Err(out_of_order("request_filter"))
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(peer) = ctx.next.take() else {
            return Err(out_of_order("upstream_peer"));
        };
        let mut http = HttpPeer::new(peer.addr, false, String::new());
        http.options.connection_timeout = Some(peer.connect_timeout);
        http.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        // None for passthrough traffic: it has no route, hence no timeout.
        http.options.read_timeout = peer.io_timeout;
        http.options.write_timeout = peer.io_timeout;
        if peer.h2c {
            http.options.set_http_version(2, 2);
            http.options.max_h2_streams = 100;
        }
        if let Some(expected) = &peer.tls {
            // mTLS to a meshed peer, by Sluice's own connector (pingora is built
            // without TLS; its pool keeps connections per SNI, which is otherwise
            // unused here, so a connection verified as one workload serves only
            // attempts that expect that workload).
            http.sni = expected.to_string();
            http.options.custom_l4 = Some(Arc::new(MeshConnect {
                identity: Arc::clone(&self.shared.identity),
                expected: Arc::clone(expected),
                limit: peer.connect_timeout,
            }));
        }
        Ok(Box::new(http))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let event = Event::ConnectFailed {
            error: e.etype().as_str(),
        };
        let action = ctx.exchange.on(&*session, Instant::now(), event);
        e.set_retry(ctx.keep(action));
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(tp) = ctx.exchange.generated_traceparent() {
            upstream.insert_header("traceparent", tp)?;
        }
        if session.req_header().version == http::Version::HTTP_10
            && !ctx.exchange.wants_h2c()
            && !upstream.headers.contains_key(http::header::HOST)
        {
            // pingora speaks HTTP/1.1 to HTTP/1 backends; an HTTP/1.0 request
            // without Host must then carry an empty one (RFC 9112 §3.2), or the
            // backend may refuse it, or guess. (HTTP/2 has :authority instead.)
            upstream.insert_header(http::header::HOST, "")?;
        }
        if let Some(ip) = session.client_ip() {
            upstream.append_header("x-forwarded-for", ip.to_string())?;
        }
        if let Some(timeout) = ctx.exchange.upstream_grpc_timeout(Instant::now()) {
            // What is left of the call's deadline, in place of the client's.
            upstream.insert_header("grpc-timeout", timeout)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        one_framing(resp)?;
        let status = resp.status.as_u16();
        let grpc_status = grpc::status_of(&resp.headers);
        ctx.grpc_status = grpc_status;
        let event = Event::Response {
            status,
            grpc_status,
        };
        let action = ctx.exchange.on(&*session, Instant::now(), event);
        if let Action::Relay = action {
            return Ok(());
        }
        // Dropped for a retry (or the fallback backend), or for the answer
        // fail_to_proxy writes.
        let mut e = Error::explain(ErrorType::HTTPStatus(status), "refused upstream response");
        e.set_retry(ctx.keep(action));
        Err(e)
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // A gRPC call's outcome, settled when the request finishes (`logging`).
        if let Some(code) = grpc::status_of(trailers) {
            ctx.grpc_status = Some(code);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if session.is_upgrade_req() && resp.status.as_u16() != 101 {
            // The front passed everything after an upgrade request through
            // unchecked (it would be a tunnel); with the switch refused, the
            // connection must not carry more requests.
            session.downstream_session.set_keepalive(None);
        }
        let (rate, fallback) = ctx.exchange.response_headers();
        if let Some(h) = rate {
            // HeaderValue::from(integer) formats without an intermediate String.
            resp.insert_header("ratelimit-limit", http::HeaderValue::from(h.limit))?;
            resp.insert_header("ratelimit-remaining", http::HeaderValue::from(h.remaining))?;
            resp.insert_header("ratelimit-reset", http::HeaderValue::from(h.reset))?;
        }
        if let Some(cause) = fallback {
            resp.insert_header("x-sluice-fallback", cause)?;
        }
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if front::refusal(session.downstream_session.stream()).is_some() {
            // The client's body was refused mid-way: not the backend's failure,
            // nothing to retry; fail_to_proxy answers.
            e.set_retry(false);
            return e;
        }
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) {
            // Our own decision from upstream_response_filter, already settled.
            return e;
        }
        let event = Event::Broken {
            timed_out: matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            ),
            stale: client_reused,
            responding: session.response_written().is_some(),
            error: e.etype().as_str(),
        };
        let action = ctx.exchange.on(&*session, Instant::now(), event);
        let resend = matches!(&action, Action::Connect(peer) if peer.fresh);
        let again = ctx.keep(action);
        if resend {
            // pingora resends only what it knows it can (a reused connection
            // that broke before its answer).
            e.retry.decide_reuse(true);
        } else {
            e.set_retry(again);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if let Some(refused) = front::refusal(session.downstream_session.stream()) {
            // A request body the front refused (bad chunk framing): its status,
            // unless a response has started; the connection closes either way.
            let status = refused.refusal.status;
            if session.response_written().is_none() {
                let _ = write_refusal(session, refused.refusal).await;
            }
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ if *e.esource() == ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            _ => 502,
        };
        if code == 0 || session.response_written().is_some() {
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        // The answer an event already decided, else the exchange's for this error.
        let reply = match ctx.reply.take() {
            Some(reply) => reply,
            None => {
                let event = Event::Failed {
                    status: code,
                    error: e.etype().as_str(),
                };
                match ctx.exchange.on(&*session, Instant::now(), event) {
                    Action::Answer(reply) => reply,
                    _ => {
                        return FailToProxy {
                            error_code: code,
                            can_reuse_downstream: false,
                        }
                    }
                }
            }
        };
        // pingora does not reuse the client connection after a failed proxy
        // attempt, whatever this says (its proxy path passes on the attempt's own
        // reuse flag, not ours): the answer must say `Connection: close`, or the
        // client sends its next request into a closing connection (a reset).
        session.set_keepalive(None);
        let _ = write_reply(session, &reply).await;
        FailToProxy {
            error_code: reply.status,
            can_reuse_downstream: false,
        }
    }

    /// Every failed request is in the access log already (status, decision,
    /// attempts) and in the metrics. pingora's own error line per failure, now that
    /// its `log` records reach stderr, would repeat that once per request through an
    /// outage or under rate limiting (our refusals are errors to pingora too).
    fn suppress_error_log(&self, _: &Session, _: &Ctx, _: &Error) -> bool {
        true
    }

    /// The same for the warning pingora logs before each retry.
    fn suppress_proxy_warn_log(
        &self,
        _: &Session,
        _: &Ctx,
        _: &Error,
        _: ProxyWarnLogContext,
    ) -> bool {
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // An exchange that never saw a head (the stand-in for a head the front
        // refused, which the fast path does not log either) settles nothing.
        let event = Event::Finished {
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            failed: e.is_some(),
            grpc_status: ctx.grpc_status,
        };
        ctx.exchange.on(&*session, Instant::now(), event);
    }
}
