//! The request flow, as pingora's `ProxyHttp` phases. Each phase is thin: it asks the
//! pinned [`Runtime`]'s components (router, limiter, breaker, concurrency limit,
//! balancer, retry budget) and records what happened in the per-request [`Ctx`];
//! `logging` settles the request's outcome with the components and turns the `Ctx`
//! into metrics and one access-log line.
//!
//! Governance order, cheapest refusal first: rate limit, circuit breaker,
//! concurrency limit. A refusal is served by the route's fallback when its `on` lists
//! the cause, else answered 429/503. In shadow mode nothing is refused: what would
//! have happened is counted (`mode="shadow"`) and logged as `shadow_decision`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use sluice_policy::{FallbackAction, FallbackCause, Key, Mode, Protocol, RetryOn};

use crate::accesslog::{self, AccessRecord, Timestamp};
use crate::breaker::{Admission, Transition};
use crate::metrics::{code_class, code_class_index, Metrics};
use crate::ratelimit::Decision as Limit;
use crate::respond::{respond, text};
use crate::runtime::{PolicyRuntime, RouteRuntime, Routed, Runtime};
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
    pub access_log: accesslog::AccessLog,
}

pub struct SluiceProxy {
    pub shared: Arc<Shared>,
    /// `outbound` or `inbound`: the access log's and metrics' `direction`.
    pub direction: &'static str,
    /// Inbound listener: every request is governed by this policy, whatever its Host...
    pub inbound_policy: Option<String>,
    /// ...and goes to the local app at this address.
    pub inbound_app: Option<std::net::SocketAddr>,
    /// Connections arrive by iptables REDIRECT: use their original destination.
    pub transparent: bool,
}

/// The backend index standing for the local app of an inbound listener.
const APP: usize = usize::MAX;

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

/// What governance decided for a request (the access log's `decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    RateLimited,
    BreakerOpen,
    Shed,
    Fallback,
    NoPolicy,
    NoRoute,
    NotReady,
    /// Transparent outbound traffic no policy claims, forwarded untouched.
    Passthrough,
}

impl Verdict {
    /// How many verdicts there are (for per-route counter caches).
    pub const COUNT: usize = 9;

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::RateLimited => "rate_limited",
            Verdict::BreakerOpen => "breaker_open",
            Verdict::Shed => "shed",
            Verdict::Fallback => "fallback",
            Verdict::NoPolicy => "no_policy",
            Verdict::NoRoute => "no_route",
            Verdict::NotReady => "not_ready",
            Verdict::Passthrough => "passthrough",
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    RateLimited { retry_after: Duration, limit: u32 },
    BreakerOpen { retry_in: Duration },
    Overloaded { limit: u32 },
}

impl Refusal {
    fn cause(self) -> FallbackCause {
        match self {
            Refusal::RateLimited { .. } => FallbackCause::RateLimited,
            Refusal::BreakerOpen { .. } => FallbackCause::BreakerOpen,
            Refusal::Overloaded { .. } => FallbackCause::Overloaded,
        }
    }

    fn verdict(self) -> Verdict {
        match self {
            Refusal::RateLimited { .. } => Verdict::RateLimited,
            Refusal::BreakerOpen { .. } => Verdict::BreakerOpen,
            Refusal::Overloaded { .. } => Verdict::Shed,
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
    /// Backends tried so far, by index (bounded by attempts).
    tried: Vec<usize>,
    backend: Option<usize>,
    /// The status of the last upstream response seen.
    upstream_status: Option<u16>,
    /// Whether the last attempt at a backend failed (connect error, timeout, reset, 5xx).
    last_attempt_failed: bool,
    rate_headers: Option<(u32, u32, u64)>,
    /// The breaker admission to settle in `logging`.
    admission: Option<Admission>,
    /// Holds a slot of the route's concurrency limit, released in `logging`.
    permit: bool,
    /// Retries made (beyond the first attempt), bounded by `retries.attempts`.
    retries: u32,
    /// The cause a fallback is (being) served for.
    fallback: Option<FallbackCause>,
    /// The next `upstream_peer` goes to the fallback backend.
    to_fallback_backend: bool,
    /// The attempt in progress: backend index and when it started (for P2C and
    /// outlier detection), settled exactly once.
    attempt: Option<(usize, Instant)>,
    /// Transparent mode: where the client was really connecting to.
    original_dst: Option<std::net::SocketAddr>,
    /// Unclaimed transparent traffic goes here, ungoverned.
    passthrough: Option<std::net::SocketAddr>,
    _inflight: InflightGuard,
}

impl Ctx {
    fn policy(&self) -> Option<&PolicyRuntime> {
        let rt = self.runtime.as_ref()?;
        match self.routed {
            Routed::NoRoute { policy } | Routed::Route { policy, .. } => rt.policies.get(policy),
            Routed::NoPolicy => None,
        }
    }

    fn route(&self) -> Option<&RouteRuntime> {
        let rt = self.runtime.as_ref()?;
        match self.routed {
            Routed::Route { policy, route } => rt.policies.get(policy)?.routes.get(route),
            _ => None,
        }
    }

    fn backend_label(&self) -> Option<&str> {
        if self.to_fallback_backend {
            return None;
        }
        let (p, i) = (self.policy()?, self.backend?);
        if i == APP {
            return Some("app");
        }
        p.endpoints.targets.get(i).map(|t| t.label.as_str())
    }
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

/// The destination an iptables-redirected connection was really for (pingora reads
/// `SO_ORIGINAL_DST`); `None` when the client connected to the proxy directly.
fn original_destination(session: &Session) -> Option<std::net::SocketAddr> {
    let socket = session.digest()?.socket_digest.as_ref()?;
    let original = *socket.original_dst()?.as_inet()?;
    let local = session.server_addr().and_then(|a| a.as_inet()).copied();
    (Some(original) != local).then_some(original)
}

/// The position of an outcome in a target's upstream counter cache.
fn upstream_outcome_index(outcome: &str) -> usize {
    match outcome {
        "success" => 0,
        "http_5xx" => 1,
        "connect_error" => 2,
        "timeout" => 3,
        _ => 4,
    }
}

/// What a request is keyed by (rate-limit keys, consistent hashing): a header's
/// value (empty when absent: such requests share one key), or the client's IP.
fn request_key(session: &Session, key: &Key) -> String {
    match key {
        Key::Header(name) => session
            .req_header()
            .headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        Key::ClientIp => session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
    }
}

fn is_idempotent(req: &RequestHeader) -> bool {
    matches!(
        req.method.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
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

mod govern;

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = Ctx;

    /// No downstream modules: pingora's default adds a (disabled) compression
    /// module that still runs on every request; a sidecar passes bodies through.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

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
            last_attempt_failed: false,
            rate_headers: None,
            admission: None,
            permit: false,
            retries: 0,
            fallback: None,
            to_fallback_backend: false,
            attempt: None,
            original_dst: None,
            passthrough: None,
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
            text(session, 503, &[], "sluice: no policy loaded yet\n".into()).await?;
            return Ok(true);
        };
        if self.transparent {
            ctx.original_dst = original_destination(session);
        }
        let req = session.req_header();
        let header = |name: &str| req.headers.get(name).map(|v| v.as_bytes());
        let (method, path) = (req.method.as_str(), req.uri.path());
        let inbound = self.direction == "inbound";
        let routed = match (&self.inbound_policy, inbound) {
            (Some(name), true) => match runtime.policy_index(name) {
                Some(policy) => runtime.route_in_policy(policy, method, path, header),
                None => Routed::NoPolicy,
            },
            (None, true) => Routed::NoPolicy,
            (_, false) => match runtime.route(host_of(session), method, path, header) {
                // Transparent outbound: no policy claims the Host; try the address the
                // app connected to against the policies' backends.
                Routed::NoPolicy if ctx.original_dst.is_some() => {
                    match ctx
                        .original_dst
                        .and_then(|dst| runtime.policy_by_backend(dst))
                    {
                        Some(policy) => runtime.route_in_policy(policy, method, path, header),
                        None => Routed::NoPolicy,
                    }
                }
                routed => routed,
            },
        };
        if routed == Routed::NoPolicy {
            // Transparent outbound traffic nobody claims goes where it was going;
            // inbound traffic without a (loaded) inbound policy still reaches the app.
            let target = if inbound {
                self.app_address(ctx)
            } else {
                ctx.original_dst
            };
            if let Some(dst) = target {
                // Nobody governs it: forward untouched (and count it), never drop it.
                ctx.passthrough = Some(dst);
                ctx.verdict = Verdict::Passthrough;
                ctx.runtime = Some(Arc::clone(&runtime));
                self.shared
                    .metrics
                    .passthrough
                    .with_label_values(&[self.direction])
                    .inc();
                return Ok(false);
            }
        }
        ctx.runtime = Some(Arc::clone(&runtime));
        ctx.routed = routed;
        match routed {
            Routed::NoPolicy => {
                ctx.verdict = Verdict::NoPolicy;
                let body = match &self.inbound_policy {
                    Some(name) => format!("sluice: the inbound policy {name:?} is not loaded\n"),
                    None => format!("sluice: no policy governs host {:?}\n", host_of(session)),
                };
                text(session, 404, &[], body).await?;
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
                text(session, 404, &[], body).await?;
                return Ok(true);
            }
            Routed::Route { policy, route } => {
                let route = &runtime.policies[policy].routes[route];
                if route.route.retries.is_some() {
                    // Keep (a bounded prefix of) the request body so a retry can resend it.
                    session.enable_retry_buffering();
                }
                if let Err(refusal) = self.govern(session, ctx, route, Instant::now()) {
                    return self.refuse(session, ctx, refusal).await;
                }
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let timeout = ctx.route().and_then(|r| r.route.timeout);
        let remaining = timeout.map(|t| {
            t.saturating_sub(ctx.start.elapsed())
                .max(Duration::from_millis(1))
        });
        if ctx.to_fallback_backend {
            let Some(addr) = ctx.route().and_then(|r| r.fallback_addr) else {
                return Err(Error::explain(
                    ErrorType::HTTPStatus(502),
                    "the fallback backend does not resolve",
                ));
            };
            let mut peer = HttpPeer::new(addr, false, String::new());
            peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
            peer.options.read_timeout = remaining;
            peer.options.write_timeout = remaining;
            return Ok(Box::new(peer));
        }
        if let Some(dst) = ctx.passthrough {
            let mut peer = HttpPeer::new(dst, false, String::new());
            peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
            peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
            return Ok(Box::new(peer));
        }
        let Some(policy) = ctx.policy() else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(502),
                "request was not routed",
            ));
        };
        let endpoints = Arc::clone(&policy.endpoints);
        let key = endpoints
            .hash_key()
            .map(|k| request_key(session, k))
            .unwrap_or_default();
        let now = Instant::now();
        let picked = match self.direction == "inbound" {
            // Inbound: the local app is the only backend, whatever the policy lists.
            true => self.app_address(ctx).map(|app| (APP, app, Protocol::Http1)),
            false => endpoints
                .pick(now, key.as_bytes(), &ctx.tried)
                .and_then(|i| {
                    let t = endpoints.targets.get(i)?;
                    Some((i, t.addr?, t.protocol))
                }),
        };
        let Some((index, addr, protocol)) = picked else {
            let reason = format!("policy {:?} has no reachable backend", policy.name);
            return Err(Error::explain(ErrorType::HTTPStatus(502), reason));
        };
        let h2c = protocol == Protocol::H2c;
        ctx.tried.push(index);
        ctx.backend = Some(index);
        if index != APP {
            endpoints.begin(index);
            ctx.attempt = Some((index, now));
        }
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout =
            Some(remaining.map_or(CONNECT_TIMEOUT, |r| r.min(CONNECT_TIMEOUT)));
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        peer.options.read_timeout = remaining;
        peer.options.write_timeout = remaining;
        if h2c {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = 100;
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.record_upstream(ctx, "connect_error");
        ctx.last_attempt_failed = true;
        self.end_attempt(ctx, true);
        if ctx.to_fallback_backend {
            return e;
        }
        let Some(policy) = ctx.policy() else { return e };
        // The inbound app is the only backend: nothing to fail over to.
        let untried = self.direction != "inbound" && policy.endpoints.untried_left(&ctx.tried);
        // Nothing was sent, so any method may go elsewhere. Without a retry policy a
        // refused connection still fails over to an untried backend (free: no load
        // reached anyone); with one, failover is a retry and draws from the budget.
        let retry = match ctx.route().and_then(|r| r.route.retries.as_ref()) {
            None => untried,
            Some(_) => self.may_retry(session, ctx, RetryOn::ConnectFailure, true),
        };
        if retry {
            if ctx.route().is_some_and(|r| r.route.retries.is_some()) {
                ctx.retries += 1;
            }
            e.set_retry(true);
        } else {
            e.set_retry(self.fallback_backend_for_error(ctx));
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
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

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.last_attempt_failed = status >= 500;
        self.end_attempt(ctx, status >= 500);
        self.record_upstream(ctx, if status >= 500 { "http_5xx" } else { "success" });
        if status < 500 || ctx.to_fallback_backend {
            return Ok(());
        }
        let gateway = matches!(status, 502..=504);
        if gateway && self.may_retry(session, ctx, RetryOn::GatewayError, false) {
            ctx.retries += 1;
            let mut e = Error::explain(ErrorType::HTTPStatus(status), "retrying a gateway error");
            e.set_retry(true);
            return Err(e);
        }
        let fallback_on_error = ctx
            .route()
            .and_then(|r| r.route.fallback.as_ref())
            .is_some_and(|f| f.on.contains(&FallbackCause::UpstreamError));
        if fallback_on_error {
            // Refuse this response; fail_to_proxy serves the static fallback, or the
            // retry goes to the fallback backend.
            let to_backend = self.fallback_backend_for_error(ctx);
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                "upstream error, serving the fallback",
            );
            e.set_retry(to_backend);
            return Err(e);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
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
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) {
            // Our own decision from upstream_response_filter, already settled.
            return e;
        }
        ctx.last_attempt_failed = true;
        self.end_attempt(ctx, true);
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        self.record_upstream(ctx, if timed_out { "timeout" } else { "error" });
        if ctx.upstream_status.is_none() && !timed_out && !ctx.to_fallback_backend {
            // A connection that broke before any response: pingora's rule retries a
            // stale pooled connection once (nothing reached the app); `reset` retries
            // the rest when the policy allows it.
            if client_reused
                && is_idempotent(session.req_header())
                && !session.retry_buffer_truncated()
            {
                e.retry.decide_reuse(true);
                return e;
            }
            if self.may_retry(session, ctx, RetryOn::Reset, false) {
                ctx.retries += 1;
                e.set_retry(true);
                return e;
            }
        }
        let to_backend =
            session.response_written().is_none() && self.fallback_backend_for_error(ctx);
        e.set_retry(to_backend);
        e
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
        if code == 0 || session.response_written().is_some() {
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        // An upstream failure the route's static fallback covers.
        let static_fallback = code >= 500
            && !ctx.to_fallback_backend
            && ctx
                .route()
                .and_then(|r| r.route.fallback.as_ref())
                .is_some_and(|f| {
                    f.on.contains(&FallbackCause::UpstreamError)
                        && matches!(f.action, FallbackAction::Static { .. })
                });
        if static_fallback {
            if let Some(route) = ctx.route() {
                self.count_fallback(route, FallbackCause::UpstreamError, Mode::Enforce);
            }
            ctx.fallback = Some(FallbackCause::UpstreamError);
            ctx.verdict = Verdict::Fallback;
            let status = match ctx
                .route()
                .and_then(|r| r.route.fallback.as_ref())
                .map(|f| &f.action)
            {
                Some(FallbackAction::Static { status, .. }) => *status,
                _ => code,
            };
            let _ = self.serve_static_fallback(session, ctx).await;
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: true,
            };
        }
        let what = match code {
            504 => "sluice: the backend did not answer within the route's timeout".to_owned(),
            400 => "sluice: malformed request".to_owned(),
            _ if is_connect_error(e) => {
                let name = ctx.policy().map_or("?", |p| p.name.as_str());
                format!(
                    "sluice: no backend of policy {name:?} accepted a connection ({} tried, last {}: {})",
                    ctx.tried.len(),
                    ctx.backend_label().unwrap_or("the fallback backend"),
                    e.etype().as_str()
                )
            }
            _ if matches!(e.etype(), ErrorType::HTTPStatus(_)) => match e.context.as_ref() {
                Some(c) => format!("sluice: {}", c.as_str()),
                None => format!("sluice: upstream answered {code}"),
            },
            _ => format!(
                "sluice: backend {} failed: {}",
                ctx.backend_label().unwrap_or("?"),
                e.etype().as_str()
            ),
        };
        let _ = text(session, code, &[], format!("{what}\n")).await;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.start.elapsed();
        let metrics = &self.shared.metrics;
        let now = Instant::now();
        // An attempt still open here ended without a response (the client left).
        self.end_attempt(ctx, e.is_some());
        // Settle the request with the route's components: exactly one outcome each.
        if let Some(route) = ctx.route() {
            let attempted = !ctx.tried.is_empty();
            let failed = ctx.last_attempt_failed;
            if let (Some(breaker), Some(admission)) = (&route.breaker, ctx.admission) {
                if attempted && (e.is_none() || failed) {
                    let t = breaker.record(now, admission, failed, elapsed);
                    self.note_transition(route, t);
                } else {
                    breaker.cancel(admission);
                }
            }
            if ctx.permit {
                if let Some(limiter) = &route.concurrency {
                    limiter.release(now, elapsed, failed);
                }
            }
            route.duration.observe(elapsed.as_secs_f64());
        }
        let (policy, route) = match (ctx.policy(), ctx.route()) {
            (Some(p), Some(r)) => (Some(p.name.as_str()), Some(r.name.as_str())),
            (Some(p), None) => (Some(p.name.as_str()), None),
            _ => (None, None),
        };
        let labels = [
            policy.unwrap_or(""),
            route.unwrap_or(""),
            code_class(status),
            ctx.verdict.as_str(),
            self.direction,
        ];
        let make = || metrics.requests.with_label_values(&labels);
        match ctx.route() {
            Some(r) => {
                let index = (code_class_index(status) * Verdict::COUNT + ctx.verdict as usize) * 2
                    + usize::from(self.direction == "inbound");
                if let Some(counter) = r.requests.get(index, make) {
                    counter.inc();
                }
            }
            None => make().inc(),
        }
        if self.shared.access_log.enabled() {
            let req = session.req_header();
            let backend = if ctx.to_fallback_backend {
                Some("fallback")
            } else {
                ctx.backend_label()
            };
            self.shared.access_log.write(&AccessRecord {
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
                fallback: ctx.fallback.map(FallbackCause::as_str),
                attempts: ctx.tried.len() as u32 + u32::from(ctx.to_fallback_backend),
                policy_version: ctx.runtime.as_ref().map(|r| r.version.as_str()),
                direction: self.direction,
            });
        }
    }
}
