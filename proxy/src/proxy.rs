//! The request flow, as pingora's `ProxyHttp` phases. Each phase is thin: it asks the
//! pinned [`Runtime`] (router, limiter, balancer) and records what happened in the
//! per-request [`Ctx`]; `logging` turns the `Ctx` into metrics and the access log.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use sluice_policy::{Key, Mode, Protocol};

use crate::accesslog::{self, AccessRecord, Timestamp};
use crate::metrics::{code_class, Metrics};
use crate::ratelimit::Decision as Limit;
use crate::runtime::{Routed, Runtime};
use crate::trace::{self, IdGenerator};

/// How long a connection attempt to a backend may take before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled upstream connection is kept.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// State shared by every request of a listener and by the admin and reload tasks.
pub struct Shared {
    pub runtime: Arc<ArcSwapOption<Runtime>>,
    pub metrics: Metrics,
    pub ids: IdGenerator,
    /// Requests between `new_ctx` and the end of `logging`; the drain waits for 0.
    pub inflight: AtomicUsize,
    pub access_log: bool,
}

pub struct SluiceProxy {
    pub shared: Arc<Shared>,
    /// `outbound` or `inbound`: the access log's `direction`.
    pub direction: &'static str,
}

/// Counts a request in flight for exactly as long as its context lives.
pub struct InflightGuard(Arc<Shared>);

impl InflightGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.inflight.fetch_add(1, Ordering::AcqRel);
        shared.metrics.inflight.inc();
        InflightGuard(Arc::clone(shared))
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.inflight.dec();
    }
}

/// Why the proxy answered itself instead of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    RateLimited,
    NoPolicy,
    NoRoute,
    NotReady,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::RateLimited => "rate_limited",
            Verdict::NoPolicy => "no_policy",
            Verdict::NoRoute => "no_route",
            Verdict::NotReady => "not_ready",
        }
    }
}

pub struct Ctx {
    start: Instant,
    runtime: Option<Arc<Runtime>>,
    routed: Routed,
    verdict: Verdict,
    shadow: Option<&'static str>,
    /// The `traceparent` sent upstream: the caller's, or one started here.
    traceparent: String,
    /// Set when the traceparent was generated here and must be added upstream.
    traceparent_generated: bool,
    /// Backends tried so far, by index (bounded by the number of backends).
    tried: Vec<usize>,
    backend: Option<usize>,
    upstream_status: Option<u16>,
    rate_headers: Option<(u32, u32, u64)>,
    _inflight: InflightGuard,
}

impl Ctx {
    fn policy(&self) -> Option<&crate::runtime::PolicyRuntime> {
        let rt = self.runtime.as_ref()?;
        match self.routed {
            Routed::NoRoute { policy } | Routed::Route { policy, .. } => rt.policies.get(policy),
            Routed::NoPolicy => None,
        }
    }

    fn route(&self) -> Option<&crate::runtime::RouteRuntime> {
        let rt = self.runtime.as_ref()?;
        match self.routed {
            Routed::Route { policy, route } => rt.policies.get(policy)?.routes.get(route),
            _ => None,
        }
    }
}

/// Request bodies up to this size are read and discarded when the proxy answers
/// itself, so the client's keep-alive connection stays usable; larger (or chunked)
/// bodies are not waited for and the connection is closed after the answer.
pub const MAX_DRAINED_BODY: u64 = 64 * 1024;

/// Writes a complete response with a body (Content-Length set, so the client
/// connection stays usable).
async fn respond(
    session: &mut Session,
    status: u16,
    headers: &[(&'static str, String)],
    body: String,
) -> Result<()> {
    let req = &session.req_header().headers;
    let chunked = req.contains_key(http::header::TRANSFER_ENCODING);
    let length = req
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if chunked || length > MAX_DRAINED_BODY {
        session.set_keepalive(None);
    } else if length > 0 {
        session.drain_request_body().await?;
    }
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 2))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    for (name, value) in headers {
        resp.insert_header(*name, value.as_str())?;
    }
    resp.set_content_length(body.len())?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(())
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn host_of(session: &Session) -> &str {
    let req = session.req_header();
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            runtime: None,
            routed: Routed::NoPolicy,
            verdict: Verdict::Allowed,
            shadow: None,
            traceparent: String::new(),
            traceparent_generated: false,
            tried: Vec::new(),
            backend: None,
            upstream_status: None,
            rate_headers: None,
            _inflight: InflightGuard::new(&self.shared),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let incoming = session
            .req_header()
            .headers
            .get("traceparent")
            .filter(|v| trace::trace_id(v.as_bytes()).is_some())
            .and_then(|v| v.to_str().ok());
        match incoming {
            Some(tp) => ctx.traceparent = tp.to_owned(),
            None => {
                ctx.traceparent = self.shared.ids.new_traceparent();
                ctx.traceparent_generated = true;
            }
        }

        let Some(runtime) = self.shared.runtime.load_full() else {
            ctx.verdict = Verdict::NotReady;
            respond(session, 503, &[], "sluice: no policy loaded yet\n".into()).await?;
            return Ok(true);
        };
        let req = session.req_header();
        let routed = runtime.route(
            host_of(session),
            req.method.as_str(),
            req.uri.path(),
            |name| req.headers.get(name).map(|v| v.as_bytes()),
        );
        ctx.runtime = Some(Arc::clone(&runtime));
        ctx.routed = routed;
        match routed {
            Routed::NoPolicy => {
                ctx.verdict = Verdict::NoPolicy;
                let body = format!("sluice: no policy governs host {:?}\n", host_of(session));
                respond(session, 404, &[], body).await?;
                return Ok(true);
            }
            Routed::NoRoute { policy } => {
                ctx.verdict = Verdict::NoRoute;
                let req = session.req_header();
                let body = format!(
                    "sluice: policy {:?} has no route for {} {}\n",
                    runtime.policies[policy].name,
                    req.method,
                    req.uri.path()
                );
                respond(session, 404, &[], body).await?;
                return Ok(true);
            }
            Routed::Route { .. } => {}
        }

        let Some(route) = ctx.route() else {
            return Ok(false);
        };
        if let Some(limiter) = &route.limiter {
            let key = match limiter.key() {
                None => None,
                Some(Key::Header(name)) => Some(
                    session
                        .req_header()
                        .headers
                        .get(name.as_str())
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned(),
                ),
                Some(Key::ClientIp) => Some(
                    session
                        .client_addr()
                        .and_then(|a| a.as_inet())
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default(),
                ),
            };
            match limiter.check(key.as_deref().unwrap_or("")) {
                Limit::Allowed { remaining, reset } => {
                    ctx.rate_headers = Some((limiter.limit(), remaining, ceil_secs(reset)));
                }
                Limit::Limited { retry_after } => {
                    let mode = route.mode;
                    self.shared
                        .metrics
                        .rate_limited
                        .with_label_values(&[
                            route.policy.as_str(),
                            route.name.as_str(),
                            mode.as_str(),
                        ])
                        .inc();
                    if mode == Mode::Shadow {
                        ctx.shadow = Some(Verdict::RateLimited.as_str());
                    } else {
                        let secs = ceil_secs(retry_after).max(1);
                        let body = format!(
                            "sluice: rate limit of route {:?} (policy {:?}) exceeded; retry in {secs}s\n",
                            route.name, route.policy
                        );
                        let headers = [
                            ("retry-after", secs.to_string()),
                            ("ratelimit-limit", limiter.limit().to_string()),
                            ("ratelimit-remaining", "0".to_owned()),
                            ("ratelimit-reset", secs.to_string()),
                        ];
                        ctx.verdict = Verdict::RateLimited;
                        respond(session, 429, &headers, body).await?;
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(policy) = ctx.policy() else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(502),
                "request was not routed",
            ));
        };
        let tried = &ctx.tried;
        let pick = policy.balancer.pick(|i| {
            tried.contains(&i) || policy.backends.get(i).is_none_or(|b| b.addr.is_none())
        });
        let Some((index, addr)) = pick.and_then(|i| policy.backends[i].addr.map(|a| (i, a))) else {
            let reason = if ctx.tried.is_empty() {
                format!("policy {:?} has no reachable backend", policy.name)
            } else {
                format!(
                    "no backend of policy {:?} accepted a connection ({} tried)",
                    policy.name,
                    ctx.tried.len()
                )
            };
            return Err(Error::explain(ErrorType::HTTPStatus(502), reason));
        };
        let h2c = policy.backends[index].protocol == Protocol::H2c;
        let timeout = ctx.route().and_then(|r| r.route.timeout);
        ctx.tried.push(index);
        ctx.backend = Some(index);
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        peer.options.read_timeout = timeout;
        peer.options.write_timeout = timeout;
        if h2c {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = 100;
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(policy), Some(i)) = (ctx.policy(), ctx.backend) {
            if let Some(target) = policy.backends.get(i) {
                self.shared
                    .metrics
                    .upstream_requests
                    .with_label_values(&[
                        policy.name.as_str(),
                        target.label.as_str(),
                        "connect_error",
                    ])
                    .inc();
            }
            // Nothing was sent yet, so any method may go to the next backend.
            let untried = policy
                .backends
                .iter()
                .enumerate()
                .any(|(j, b)| b.addr.is_some() && !ctx.tried.contains(&j));
            e.set_retry(untried);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.traceparent_generated {
            upstream.insert_header("traceparent", ctx.traceparent.as_str())?;
        }
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            upstream.append_header("x-forwarded-for", ip.to_string())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        ctx.upstream_status = Some(status);
        if let (Some(policy), Some(i)) = (ctx.policy(), ctx.backend) {
            if let Some(target) = policy.backends.get(i) {
                let outcome = if status >= 500 { "http_5xx" } else { "success" };
                self.shared
                    .metrics
                    .upstream_requests
                    .with_label_values(&[policy.name.as_str(), target.label.as_str(), outcome])
                    .inc();
            }
        }
        if let Some((limit, remaining, reset)) = ctx.rate_headers {
            resp.insert_header("ratelimit-limit", limit.to_string())?;
            resp.insert_header("ratelimit-remaining", remaining.to_string())?;
            resp.insert_header("ratelimit-reset", reset.to_string())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ if *e.esource() == ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            _ => 502,
        };
        if code > 0 && session.response_written().is_none() {
            let what = match code {
                504 => "sluice: the backend did not answer within the route's timeout".to_owned(),
                400 => "sluice: malformed request".to_owned(),
                _ if matches!(
                    e.etype(),
                    ErrorType::ConnectRefused
                        | ErrorType::ConnectTimedout
                        | ErrorType::ConnectNoRoute
                        | ErrorType::ConnectError
                ) =>
                {
                    let (name, last) = match (ctx.policy(), ctx.backend) {
                        (Some(p), Some(i)) => (
                            p.name.as_str(),
                            p.backends.get(i).map(|b| b.label.as_str()).unwrap_or("?"),
                        ),
                        _ => ("?", "?"),
                    };
                    format!(
                        "sluice: no backend of policy {name:?} accepted a connection ({} tried, last {last}: {})",
                        ctx.tried.len(),
                        e.etype().as_str()
                    )
                }
                _ => match (ctx.policy(), ctx.backend) {
                    (Some(p), _) if matches!(e.etype(), ErrorType::HTTPStatus(_)) => {
                        format!(
                            "sluice: {}",
                            e.context
                                .as_ref()
                                .map(|c| c.as_str())
                                .unwrap_or(p.name.as_str())
                        )
                    }
                    (Some(p), Some(i)) => format!(
                        "sluice: backend {} of policy {:?} failed: {}",
                        p.backends.get(i).map(|b| b.label.as_str()).unwrap_or("?"),
                        p.name,
                        e.etype().as_str()
                    ),
                    _ => format!("sluice: upstream error: {}", e.etype().as_str()),
                },
            };
            let _ = respond(session, code, &[], format!("{what}\n")).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.start.elapsed();
        let metrics = &self.shared.metrics;
        let (policy, route) = match (ctx.policy(), ctx.route()) {
            (Some(p), Some(r)) => (Some(p.name.as_str()), Some(r.name.as_str())),
            (Some(p), None) => (Some(p.name.as_str()), None),
            _ => (None, None),
        };
        if let (Some(p), Some(i), Some(e)) = (ctx.policy(), ctx.backend, e) {
            // Connect failures were counted per attempt in fail_to_connect.
            let outcome = match e.etype() {
                ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
                    None
                }
                ErrorType::ConnectTimedout => None,
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => Some("timeout"),
                ErrorType::HTTPStatus(_) => None,
                _ if ctx.upstream_status.is_none() => Some("error"),
                _ => None,
            };
            if let (Some(outcome), Some(target)) = (outcome, p.backends.get(i)) {
                metrics
                    .upstream_requests
                    .with_label_values(&[p.name.as_str(), target.label.as_str(), outcome])
                    .inc();
            }
        }
        metrics
            .requests
            .with_label_values(&[
                policy.unwrap_or(""),
                route.unwrap_or(""),
                code_class(status),
                ctx.verdict.as_str(),
            ])
            .inc();
        if let Some(r) = ctx.route() {
            r.duration.observe(elapsed.as_secs_f64());
        }
        if self.shared.access_log {
            let req = session.req_header();
            let backend = match (ctx.policy(), ctx.backend) {
                (Some(p), Some(i)) => p.backends.get(i).map(|b| b.label.as_str()),
                _ => None,
            };
            accesslog::write(&AccessRecord {
                ts: Timestamp::now(),
                trace_id: trace::trace_id(ctx.traceparent.as_bytes()).unwrap_or(""),
                method: req.method.as_str(),
                host: host_of(session),
                path: req.uri.path(),
                policy,
                route,
                backend,
                status,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                decision: ctx.verdict.as_str(),
                shadow_decision: ctx.shadow,
                attempts: ctx.tried.len() as u32,
                policy_version: ctx.runtime.as_ref().map(|r| r.version.as_str()),
                direction: self.direction,
            });
        }
    }
}
