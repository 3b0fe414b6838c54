//! The flow as pingora's `ProxyHttp` phases: each phase asks the flow and turns
//! its answer into pingora's terms (retry flags on errors, written responses).

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use super::*;
use crate::h1::front;
use crate::respond::respond;

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
}

/// The destination an iptables-redirected connection was really for (pingora reads
/// `SO_ORIGINAL_DST`); `None` when the client connected to the proxy directly.
fn original_destination(session: &Session) -> Option<SocketAddr> {
    let socket = session.digest()?.socket_digest.as_ref()?;
    let original = *socket.original_dst()?.as_inet()?;
    let local = session.server_addr().and_then(|a| a.as_inet()).copied();
    (Some(original) != local).then_some(original)
}

fn is_connect_error(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectRefused
            | ErrorType::ConnectTimedout
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
    )
}

async fn write_reply(session: &mut Session, reply: Reply) -> Result<()> {
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
        reply.body,
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
    let body = crate::h1::refusal_body(refusal);
    respond(
        session,
        refusal.status,
        Some("text/plain; charset=utf-8"),
        &[("connection", "close")],
        body.into(),
    )
    .await
}

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = Ctx;

    /// No downstream modules: pingora's default adds a (disabled) compression
    /// module that still runs on every request; a sidecar passes bodies through.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        SluiceProxy::new_ctx(self)
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
        if self.transparent {
            ctx.original_dst = original_destination(session);
        }
        if let Err(reply) = self.route_request(&*session, ctx) {
            write_reply(session, reply).await?;
            return Ok(true);
        }
        if ctx.route().is_some_and(|r| r.route.retries.is_some()) {
            // Keep (a bounded prefix of) the request body so a retry can resend it.
            session.enable_retry_buffering();
        }
        match self.admit(&*session, ctx) {
            Admit::Proxy => Ok(false),
            Admit::Reply(reply) => {
                write_reply(session, reply).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let peer = self
            .choose_peer(&*session, ctx)
            .map_err(|reason| Error::explain(ErrorType::HTTPStatus(502), reason))?;
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
        Ok(Box::new(http))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let again = self.connect_failed(&*session, ctx);
        e.set_retry(again);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(tp) = self.generated_traceparent(ctx) {
            upstream.insert_header("traceparent", tp)?;
        }
        let h2c = ctx.policy().is_some_and(|p| p.endpoints.speaks_h2c);
        if session.req_header().version == http::Version::HTTP_10
            && !h2c
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
        match self.upstream_status(&*session, ctx, status) {
            StatusVerdict::Accept => Ok(()),
            StatusVerdict::Retry => {
                let mut e =
                    Error::explain(ErrorType::HTTPStatus(status), "retrying a gateway error");
                e.set_retry(true);
                Err(e)
            }
            StatusVerdict::Fallback { to_backend } => {
                // fail_to_proxy serves the static fallback, or the retry goes to the
                // fallback backend.
                let mut e = Error::explain(
                    ErrorType::HTTPStatus(status),
                    "upstream error, serving the fallback",
                );
                e.set_retry(to_backend);
                Err(e)
            }
        }
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
        if let Some((limit, remaining, reset)) = ctx.rate_headers {
            // HeaderValue::from(integer) formats without an intermediate String.
            resp.insert_header("ratelimit-limit", http::HeaderValue::from(limit))?;
            resp.insert_header("ratelimit-remaining", http::HeaderValue::from(remaining))?;
            resp.insert_header("ratelimit-reset", http::HeaderValue::from(reset))?;
        }
        if let Some(cause) = ctx.fallback {
            resp.insert_header("x-sluice-fallback", cause.as_str())?;
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
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        let responding = session.response_written().is_some();
        match self.exchange_failed(&*session, ctx, timed_out, client_reused, responding) {
            ExchangeFailure::Resend => e.retry.decide_reuse(true),
            ExchangeFailure::Retry => e.set_retry(true),
            ExchangeFailure::Fail { to_backend } => e.set_retry(to_backend),
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
        let failure = if is_connect_error(e) {
            Failure::Connect(e.etype().as_str())
        } else if matches!(e.etype(), ErrorType::HTTPStatus(_)) {
            Failure::Status(e.context.as_ref().map(|c| c.as_str()))
        } else {
            Failure::Other(e.etype().as_str())
        };
        let (reply, reuse) = self.failure_reply(ctx, code, failure);
        let status = reply.status;
        let _ = write_reply(session, reply).await;
        FailToProxy {
            error_code: status,
            can_reuse_downstream: reuse,
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
        if ctx.route().is_none()
            && front::refusal(session.downstream_session.stream()).is_some_and(|r| !r.in_body)
        {
            // Not a request of the client's: the stand-in for a head the front
            // refused, which the fast path does not log either.
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.finish(&*session, status, e.is_some(), ctx);
    }
}
