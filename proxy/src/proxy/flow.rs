//! The steps of a request that both engines take, as plain decisions: each returns
//! what to do next and leaves the writing to the engine.

use std::borrow::Cow;

use super::*;

/// A response the proxy writes itself (404, 429, 503, 502/504, static fallbacks).
pub struct Reply {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub headers: Vec<(Cow<'static, str>, String)>,
    pub body: Bytes,
}

impl Reply {
    pub(super) fn text(
        status: u16,
        headers: Vec<(Cow<'static, str>, String)>,
        body: String,
    ) -> Reply {
        Reply {
            status,
            content_type: Some("text/plain; charset=utf-8"),
            headers,
            body: Bytes::from(body),
        }
    }
}

/// The outcome of [`SluiceProxy::admit`].
pub enum Admit {
    /// Send the request upstream ([`SluiceProxy::choose_peer`]).
    Proxy,
    /// Answer it with this.
    Reply(Reply),
}

/// Where one attempt goes, and its time limits.
pub struct Peer {
    pub addr: SocketAddr,
    pub h2c: bool,
    pub connect_timeout: Duration,
    /// What is left of the route's timeout, for each read and write of the exchange.
    pub io_timeout: Option<Duration>,
}

/// What to do with an upstream response's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusVerdict {
    /// Pass the response on.
    Accept,
    /// Drop it and retry (a gateway error the route retries).
    Retry,
    /// Drop it for the route's fallback: the fallback backend when `to_backend`,
    /// else the static fallback or an error ([`SluiceProxy::failure_reply`]).
    Fallback { to_backend: bool },
}

/// What to do after an exchange broke (reset, timeout) before it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeFailure {
    /// A stale pooled connection: resend on a new connection (not a counted retry).
    Resend,
    /// A retry the policy allows.
    Retry,
    /// Give up; the next attempt goes to the fallback backend when `to_backend`.
    Fail { to_backend: bool },
}

/// Why the request could not be proxied, for the error answer.
pub enum Failure<'a> {
    /// No backend accepted a connection; the last error's name.
    Connect(&'a str),
    /// A decision of the flow (e.g. a refused 5xx), with its explanation.
    Status(Option<&'a str>),
    /// The exchange broke; the error's name.
    Other(&'a str),
}

impl SluiceProxy {
    /// A fresh context, counting the request in flight until it is dropped.
    pub fn new_ctx(&self) -> Ctx {
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

    /// The trace context and the route. `Err` is the answer when no policy is
    /// loaded yet. Engines may look at `ctx.policy()` before [`Self::admit`].
    pub fn route_request(&self, req: &impl Request, ctx: &mut Ctx) -> Result<(), Reply> {
        match req
            .header("traceparent")
            .filter(|v| trace::trace_id(v).is_some())
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            Some(tp) => ctx.traceparent = tp.to_owned(),
            None => {
                ctx.traceparent = self.shared.ids.new_traceparent();
                ctx.traceparent_generated = true;
            }
        }
        let Some(runtime) = self.shared.runtime.load_full() else {
            ctx.verdict = Verdict::NotReady;
            return Err(Reply::text(
                503,
                Vec::new(),
                "sluice: no policy loaded yet\n".into(),
            ));
        };
        let header = |name: &str| req.header(name);
        let (method, path) = (req.method(), req.path());
        let inbound = self.direction == "inbound";
        let routed = match (&self.inbound_policy, inbound) {
            (Some(name), true) => match runtime.policy_index(name) {
                Some(policy) => runtime.route_in_policy(policy, method, path, header),
                None => Routed::NoPolicy,
            },
            (None, true) => Routed::NoPolicy,
            (_, false) => match runtime.route(req.host(), method, path, header) {
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
        ctx.runtime = Some(runtime);
        ctx.routed = routed;
        Ok(())
    }

    /// After [`Self::route_request`]: passthrough, 404s, then governance.
    pub fn admit(&self, req: &impl Request, ctx: &mut Ctx) -> Admit {
        let Some(runtime) = ctx.runtime.clone() else {
            return Admit::Proxy;
        };
        let inbound = self.direction == "inbound";
        match ctx.routed {
            Routed::NoPolicy => {
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
                    self.shared
                        .metrics
                        .passthrough
                        .with_label_values(&[self.direction])
                        .inc();
                    return Admit::Proxy;
                }
                ctx.verdict = Verdict::NoPolicy;
                let body = match &self.inbound_policy {
                    Some(name) => format!("sluice: the inbound policy {name:?} is not loaded\n"),
                    None => format!("sluice: no policy governs host {:?}\n", req.host()),
                };
                Admit::Reply(Reply::text(404, Vec::new(), body))
            }
            Routed::NoRoute { policy } => {
                ctx.verdict = Verdict::NoRoute;
                let body = format!(
                    "sluice: policy {:?} has no route for {} {}\n",
                    runtime.policies[policy].name,
                    req.method(),
                    req.path()
                );
                Admit::Reply(Reply::text(404, Vec::new(), body))
            }
            Routed::Route { policy, route } => {
                let route = &runtime.policies[policy].routes[route];
                // The request's arrival is "now" for its governance (one clock read less).
                match self.govern(req, ctx, route, ctx.start) {
                    Ok(()) => Admit::Proxy,
                    Err(refusal) => match self.refusal_reply(ctx, refusal) {
                        Some(reply) => Admit::Reply(reply),
                        None => Admit::Proxy,
                    },
                }
            }
        }
    }

    /// The next attempt's peer: the fallback backend, the passthrough target, the
    /// inbound app or a balanced pick among the untried backends. `Err` explains
    /// why there is none (a 502).
    pub fn choose_peer(&self, req: &impl Request, ctx: &mut Ctx) -> Result<Peer, String> {
        let now = Instant::now();
        let timeout = ctx.route().and_then(|r| r.route.timeout);
        let remaining = timeout.map(|t| {
            t.saturating_sub(now.saturating_duration_since(ctx.start))
                .max(Duration::from_millis(1))
        });
        if ctx.to_fallback_backend {
            let Some(addr) = ctx.route().and_then(|r| r.fallback_addr) else {
                return Err("the fallback backend does not resolve".into());
            };
            return Ok(Peer {
                addr,
                h2c: false,
                connect_timeout: CONNECT_TIMEOUT,
                io_timeout: remaining,
            });
        }
        if let Some(addr) = ctx.passthrough {
            return Ok(Peer {
                addr,
                h2c: false,
                connect_timeout: CONNECT_TIMEOUT,
                io_timeout: None,
            });
        }
        let Some(policy) = ctx.policy() else {
            return Err("request was not routed".into());
        };
        let endpoints = Arc::clone(&policy.endpoints);
        let key = endpoints
            .hash_key()
            .map(|k| request_key(req, k))
            .unwrap_or_default();
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
            return Err(format!("policy {:?} has no reachable backend", policy.name));
        };
        ctx.tried.push(index);
        ctx.backend = Some(index);
        if index != APP {
            endpoints.begin(index);
            ctx.attempt = Some((index, now));
        }
        Ok(Peer {
            addr,
            h2c: protocol == Protocol::H2c,
            connect_timeout: remaining.map_or(CONNECT_TIMEOUT, |r| r.min(CONNECT_TIMEOUT)),
            io_timeout: remaining,
        })
    }

    /// A connection attempt failed: whether to try again (another backend, or the
    /// fallback backend, which this then sets up).
    pub fn connect_failed(&self, req: &impl Request, ctx: &mut Ctx) -> bool {
        self.record_upstream(ctx, "connect_error");
        ctx.last_attempt_failed = true;
        self.end_attempt(ctx, Instant::now(), true);
        if ctx.to_fallback_backend {
            return false;
        }
        let Some(policy) = ctx.policy() else {
            return false;
        };
        // The inbound app is the only backend: nothing to fail over to.
        let untried = self.direction != "inbound" && policy.endpoints.untried_left(&ctx.tried);
        // Nothing was sent, so any method may go elsewhere. Without a retry policy a
        // refused connection still fails over to an untried backend (free: no load
        // reached anyone); with one, failover is a retry and draws from the budget.
        let retry = match ctx.route().and_then(|r| r.route.retries.as_ref()) {
            None => untried,
            Some(_) => self.may_retry(req, ctx, RetryOn::ConnectFailure, true),
        };
        if retry {
            if ctx.route().is_some_and(|r| r.route.retries.is_some()) {
                ctx.retries += 1;
            }
            return true;
        }
        self.fallback_backend_for_error(ctx)
    }

    /// An upstream response head arrived with `status`.
    pub fn upstream_status(&self, req: &impl Request, ctx: &mut Ctx, status: u16) -> StatusVerdict {
        ctx.upstream_status = Some(status);
        ctx.last_attempt_failed = status >= 500;
        self.end_attempt(ctx, Instant::now(), status >= 500);
        self.record_upstream(ctx, if status >= 500 { "http_5xx" } else { "success" });
        if status < 500 || ctx.to_fallback_backend {
            return StatusVerdict::Accept;
        }
        let gateway = matches!(status, 502..=504);
        if gateway && self.may_retry(req, ctx, RetryOn::GatewayError, false) {
            ctx.retries += 1;
            return StatusVerdict::Retry;
        }
        let fallback_on_error = ctx
            .route()
            .and_then(|r| r.route.fallback.as_ref())
            .is_some_and(|f| f.on.contains(&FallbackCause::UpstreamError));
        if fallback_on_error {
            // Refuse this response: the static fallback answers, or the next attempt
            // goes to the fallback backend.
            return StatusVerdict::Fallback {
                to_backend: self.fallback_backend_for_error(ctx),
            };
        }
        StatusVerdict::Accept
    }

    /// The exchange with the backend broke (or timed out) after connecting.
    /// `reused`: the connection came from the pool; `responding`: part of the
    /// response already went to the client.
    pub fn exchange_failed(
        &self,
        req: &impl Request,
        ctx: &mut Ctx,
        timed_out: bool,
        reused: bool,
        responding: bool,
    ) -> ExchangeFailure {
        ctx.last_attempt_failed = true;
        self.end_attempt(ctx, Instant::now(), true);
        self.record_upstream(ctx, if timed_out { "timeout" } else { "error" });
        if ctx.upstream_status.is_none() && !timed_out && !ctx.to_fallback_backend {
            // A connection that broke before any response: a stale pooled connection
            // is resent once (nothing reached the app); `reset` retries the rest when
            // the policy allows it.
            if reused && is_idempotent(req.method()) && !req.body_truncated() {
                return ExchangeFailure::Resend;
            }
            if self.may_retry(req, ctx, RetryOn::Reset, false) {
                ctx.retries += 1;
                return ExchangeFailure::Retry;
            }
        }
        ExchangeFailure::Fail {
            to_backend: !responding && self.fallback_backend_for_error(ctx),
        }
    }

    /// The answer when the request could not be proxied with `code` (502, 504, a
    /// refused 5xx, 400): the route's static fallback when it covers upstream
    /// errors (then the flag is true: a complete answer, the client connection stays
    /// usable), else an explanation.
    pub fn failure_reply(&self, ctx: &mut Ctx, code: u16, failure: Failure<'_>) -> (Reply, bool) {
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
            if let Some(reply) = self.static_fallback_reply(ctx) {
                return (reply, true);
            }
        }
        let what = match failure {
            _ if code == 504 => {
                "sluice: the backend did not answer within the route's timeout".to_owned()
            }
            _ if code == 400 => "sluice: malformed request".to_owned(),
            Failure::Connect(error) => {
                let name = ctx.policy().map_or("?", |p| p.name.as_str());
                format!(
                    "sluice: no backend of policy {name:?} accepted a connection ({} tried, last {}: {error})",
                    ctx.tried.len(),
                    ctx.backend_label().unwrap_or("the fallback backend"),
                )
            }
            Failure::Status(Some(context)) => format!("sluice: {context}"),
            Failure::Status(None) => format!("sluice: upstream answered {code}"),
            Failure::Other(error) => format!(
                "sluice: backend {} failed: {error}",
                ctx.backend_label().unwrap_or("?"),
            ),
        };
        (Reply::text(code, Vec::new(), format!("{what}\n")), false)
    }

    /// Settles the request (`status` as sent to the client, 0 if none; `failed`:
    /// it ended in an error) with the route's components, metrics and access log.
    pub fn finish(&self, req: &impl Request, status: u16, failed: bool, ctx: &mut Ctx) {
        // One clock read for the whole settlement.
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(ctx.start);
        let metrics = &self.shared.metrics;
        // An attempt still open here ended without a response: the client left.
        // It is abandoned (its time so far is a latency sample for P2C; the backend
        // is neither blamed nor credited, as Envoy's outlier detection ignores
        // downstream resets).
        self.abandon_attempt(ctx, now);
        // Settle the request with the route's components: exactly one outcome each.
        if let Some(route) = ctx.route() {
            let attempted = !ctx.tried.is_empty();
            let last_failed = ctx.last_attempt_failed;
            if let (Some(breaker), Some(admission)) = (&route.breaker, ctx.admission) {
                if attempted && (!failed || last_failed) {
                    let t = breaker.record(now, admission, last_failed, elapsed);
                    self.note_transition(route, t);
                } else {
                    breaker.cancel(admission);
                }
            }
            if ctx.permit {
                if let Some(limiter) = &route.concurrency {
                    limiter.release(now, elapsed, last_failed);
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
            let backend = if ctx.to_fallback_backend {
                Some("fallback")
            } else {
                ctx.backend_label()
            };
            self.shared.access_log.write(&AccessRecord {
                ts: Timestamp::now(),
                trace_id: trace::trace_id(ctx.traceparent.as_bytes()).unwrap_or(""),
                method: req.method(),
                host: req.host(),
                path: req.path(),
                policy,
                route,
                backend,
                status,
                duration: elapsed,
                decision: ctx.verdict.as_str(),
                shadow_decision: ctx.shadow,
                fallback: ctx.fallback.map(FallbackCause::as_str),
                attempts: ctx.tried.len() as u32 + u32::from(ctx.to_fallback_backend),
                policy_version: ctx.runtime.as_ref().map(|r| r.version.as_str()),
                direction: self.direction,
            });
        }
    }

    /// The traceparent to add upstream, when it was started here.
    pub fn generated_traceparent<'c>(&self, ctx: &'c Ctx) -> Option<&'c str> {
        ctx.traceparent_generated
            .then_some(ctx.traceparent.as_str())
    }
}
