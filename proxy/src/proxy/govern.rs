//! Governance decisions of a request, apart from the engines: the rate limit,
//! circuit breaker and concurrency limit in order, refusals and the fallbacks that
//! answer them, retry permission from the budget, and the balancer/outlier
//! bookkeeping of each attempt.

use std::borrow::Cow;

use super::*;

impl SluiceProxy {
    /// Where inbound traffic is delivered: in transparent mode the app listens on
    /// the port the client dialled, else on `--app`.
    pub(super) fn app_address(&self, ctx: &Ctx) -> Option<SocketAddr> {
        match ctx.original_dst {
            Some(dst) if self.own_ports.contains(&dst.port()) => None,
            Some(dst) => Some(SocketAddr::from(([127, 0, 0, 1], dst.port()))),
            None => self.inbound_app,
        }
    }

    pub(super) fn note_transition(&self, route: &RouteRuntime, t: Option<Transition>) {
        if let Some(t) = t {
            let m = &self.shared.metrics;
            let labels = [route.policy.as_str(), route.name.as_str()];
            m.breaker_state.with_label_values(&labels).set(t.to.gauge());
            m.breaker_transitions
                .with_label_values(&[route.policy.as_str(), route.name.as_str(), t.to.as_str()])
                .inc();
            tracing::warn!(
                policy = route.policy.as_str(),
                route = route.name.as_str(),
                from = t.from.as_str(),
                to = t.to.as_str(),
                "circuit breaker state changed"
            );
        }
    }

    /// Rate limit, breaker, concurrency limit, in that order. `Err` is a refusal
    /// (never in shadow mode, which only records).
    pub(super) fn govern(
        &self,
        req: &impl Request,
        ctx: &mut Ctx,
        route: &RouteRuntime,
        now: Instant,
    ) -> Result<(), Refusal> {
        let m = &self.shared.metrics;
        let shadow = route.mode == Mode::Shadow;
        let mode = route.mode.as_str();
        let labels3 = |third: &'static str| [route.policy.as_str(), route.name.as_str(), third];

        if let Some(limiter) = &route.limiter {
            let key = limiter.key().map(|k| request_key(req, k));
            let decision = match &key {
                Some(key) => limiter.check_owned(key),
                None => limiter.check(""),
            };
            match decision {
                Limit::Allowed { remaining, reset } => {
                    ctx.rate_headers = Some((limiter.limit(), remaining, ceil_secs(reset)));
                }
                Limit::Limited { retry_after } => {
                    self.over_rate_limit(route, ctx, retry_after, limiter.limit())?;
                }
            }
        }

        if let Some(limiter) = &route.global {
            let key = limiter.key().map(|k| request_key(req, k));
            match limiter.check(key.as_deref().unwrap_or(""), now) {
                Limit::Allowed { remaining, reset } => {
                    // The tighter of the two limits is the one to advertise.
                    let tighter = ctx.rate_headers.is_none_or(|(_, left, _)| remaining < left);
                    if tighter {
                        ctx.rate_headers = Some((limiter.limit(), remaining, ceil_secs(reset)));
                    }
                }
                Limit::Limited { retry_after } => {
                    self.over_rate_limit(route, ctx, retry_after, limiter.limit())?;
                }
            }
        }

        if let Some(breaker) = &route.breaker {
            let (admission, transition) = breaker.admit(now);
            self.note_transition(route, transition);
            if admission == Admission::Rejected {
                m.breaker_rejected.with_label_values(&labels3(mode)).inc();
                if !shadow {
                    return Err(Refusal::BreakerOpen {
                        retry_in: breaker.retry_in(now),
                    });
                }
                ctx.shadow.get_or_insert(Verdict::BreakerOpen.as_str());
                self.shadow_fallback(route, FallbackCause::BreakerOpen);
            } else {
                ctx.admission = Some(admission);
            }
        }

        if let Some(limiter) = &route.concurrency {
            let (class, shed_first) = match &route.route.priority {
                Some(p) => {
                    let value = req
                        .header(p.header.as_str())
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .unwrap_or("");
                    // The label is bounded: a listed class, or "default".
                    match p.shed_first.iter().find(|c| c.as_str() == value) {
                        Some(c) => (c.as_str(), true),
                        None => ("default", false),
                    }
                }
                None => ("default", false),
            };
            if limiter.try_acquire(shed_first) {
                ctx.permit = true;
            } else {
                m.shed
                    .with_label_values(&[route.policy.as_str(), route.name.as_str(), class, mode])
                    .inc();
                if !shadow {
                    return Err(Refusal::Overloaded {
                        limit: limiter.limit(),
                    });
                }
                ctx.shadow.get_or_insert(Verdict::Shed.as_str());
                self.shadow_fallback(route, FallbackCause::Overloaded);
            }
        }
        if let Some(budget) = &route.budget {
            budget.deposit(now);
        }
        Ok(())
    }

    /// A rate limit (local or global) found no token: counted, then refused, or in
    /// shadow mode only recorded.
    fn over_rate_limit(
        &self,
        route: &RouteRuntime,
        ctx: &mut Ctx,
        retry_after: Duration,
        limit: u32,
    ) -> Result<(), Refusal> {
        self.shared
            .metrics
            .rate_limited
            .with_label_values(&[
                route.policy.as_str(),
                route.name.as_str(),
                route.mode.as_str(),
            ])
            .inc();
        if route.mode != Mode::Shadow {
            return Err(Refusal::RateLimited { retry_after, limit });
        }
        ctx.shadow.get_or_insert(Verdict::RateLimited.as_str());
        self.shadow_fallback(route, FallbackCause::RateLimited);
        Ok(())
    }

    /// Answers a refusal: the route's fallback when it covers the cause, else the
    /// refusal's own status. `None`: the request goes on to the fallback backend.
    pub(super) fn refusal_reply(&self, ctx: &mut Ctx, refusal: Refusal) -> Option<Reply> {
        let runtime = ctx.runtime.clone()?;
        let Routed::Route { policy, route } = ctx.routed else {
            return None;
        };
        let route = runtime.policies.get(policy)?.routes.get(route)?;
        let cause = refusal.cause();
        if let Some(fallback) = route
            .route
            .fallback
            .as_ref()
            .filter(|f| f.on.contains(&cause))
        {
            self.count_fallback(route, cause, Mode::Enforce);
            ctx.verdict = Verdict::Fallback;
            ctx.fallback = Some(cause);
            if let FallbackAction::Backend(_) = fallback.action {
                ctx.to_fallback_backend = true;
                return None;
            }
            return self.static_fallback_reply(ctx);
        }
        ctx.verdict = refusal.verdict();
        let (policy, name) = (&route.policy, &route.name);
        Some(match refusal {
            Refusal::RateLimited { retry_after, limit } => {
                let secs = ceil_secs(retry_after).max(1).to_string();
                let body = format!("sluice: rate limit of route {name:?} (policy {policy:?}) exceeded; retry in {secs}s\n");
                let headers = vec![
                    ("retry-after".into(), secs.clone()),
                    ("ratelimit-limit".into(), limit.to_string()),
                    ("ratelimit-remaining".into(), "0".to_owned()),
                    ("ratelimit-reset".into(), secs),
                ];
                Reply::text(429, headers, body)
            }
            Refusal::BreakerOpen { retry_in } => {
                let secs = ceil_secs(retry_in).max(1).to_string();
                let body = format!(
                    "sluice: circuit breaker of route {name:?} (policy {policy:?}) is open; retry in {secs}s\n"
                );
                Reply::text(503, vec![("retry-after".into(), secs)], body)
            }
            Refusal::Overloaded { limit } => {
                let body = format!(
                    "sluice: route {name:?} (policy {policy:?}) is overloaded ({limit} requests in flight); retry later\n"
                );
                Reply::text(503, vec![("retry-after".into(), "1".to_owned())], body)
            }
        })
    }

    /// In shadow mode, counts the fallback that would have answered `cause`.
    pub(super) fn shadow_fallback(&self, route: &RouteRuntime, cause: FallbackCause) {
        if route
            .route
            .fallback
            .as_ref()
            .is_some_and(|f| f.on.contains(&cause))
        {
            self.count_fallback(route, cause, Mode::Shadow);
        }
    }

    pub(super) fn count_fallback(&self, route: &RouteRuntime, cause: FallbackCause, mode: Mode) {
        self.shared
            .metrics
            .fallbacks
            .with_label_values(&[
                route.policy.as_str(),
                route.name.as_str(),
                cause.as_str(),
                mode.as_str(),
            ])
            .inc();
    }

    /// The route's static fallback for the cause in `ctx.fallback`.
    pub(super) fn static_fallback_reply(&self, ctx: &Ctx) -> Option<Reply> {
        let (route, cause) = (ctx.route()?, ctx.fallback?);
        let Some(FallbackAction::Static {
            status,
            headers,
            body,
        }) = route.route.fallback.as_ref().map(|f| &f.action)
        else {
            return None;
        };
        let content_type = (!headers.iter().any(|(k, _)| k == "content-type"))
            .then_some("text/plain; charset=utf-8");
        Some(Reply {
            status: *status,
            content_type,
            headers: headers
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), v.clone()))
                .chain([("x-sluice-fallback".into(), cause.as_str().to_owned())])
                .collect(),
            body: Bytes::from(body.clone()),
        })
    }

    /// Whether one more retry may be made for `on`, drawing from the budget.
    pub(super) fn may_retry(
        &self,
        req: &impl Request,
        ctx: &Ctx,
        on: RetryOn,
        nothing_sent: bool,
    ) -> bool {
        let Some(route) = ctx.route() else {
            return false;
        };
        let Some(retries) = &route.route.retries else {
            return false;
        };
        if !retries.on.contains(&on) || ctx.retries >= retries.attempts {
            return false;
        }
        if !nothing_sent && (!is_idempotent(req.method()) || req.body_truncated()) {
            return false;
        }
        let labels = |r: &'static str| [route.policy.as_str(), route.name.as_str(), r];
        let granted = route
            .budget
            .as_ref()
            .is_none_or(|b| b.withdraw(Instant::now()));
        let result = if granted {
            "retried"
        } else {
            "budget_exhausted"
        };
        self.shared
            .metrics
            .retries
            .with_label_values(&labels(result))
            .inc();
        granted
    }

    /// Whether a failed primary request can be answered by the fallback backend.
    pub(super) fn fallback_backend_for_error(&self, ctx: &mut Ctx) -> bool {
        let Some(route) = ctx.route() else {
            return false;
        };
        let covers = route.route.fallback.as_ref().is_some_and(|f| {
            f.on.contains(&FallbackCause::UpstreamError)
                && matches!(f.action, FallbackAction::Backend(_))
        });
        if !covers || ctx.to_fallback_backend {
            return false;
        }
        self.count_fallback(route, FallbackCause::UpstreamError, Mode::Enforce);
        ctx.to_fallback_backend = true;
        ctx.fallback = Some(FallbackCause::UpstreamError);
        ctx.verdict = Verdict::Fallback;
        true
    }

    /// Settles the attempt in progress with the backend's balancer and outlier
    /// detector (once; later calls are no-ops).
    pub(super) fn end_attempt(&self, ctx: &mut Ctx, now: Instant, failed: bool) {
        let Some((index, started)) = ctx.attempt.take() else {
            return;
        };
        let Some(policy) = ctx.policy() else { return };
        if policy
            .endpoints
            .finish(index, now, now.saturating_duration_since(started), failed)
        {
            let label = policy
                .endpoints
                .targets
                .get(index)
                .map_or("?", |t| t.label.as_str());
            self.shared
                .metrics
                .backend_ejections
                .with_label_values(&[policy.name.as_str(), label])
                .inc();
            tracing::warn!(
                policy = policy.name.as_str(),
                backend = label,
                "backend ejected"
            );
        }
    }

    /// Ends the open attempt, if any, as abandoned: the client left before its answer.
    pub(super) fn abandon_attempt(&self, ctx: &mut Ctx, now: Instant) {
        let Some((index, started)) = ctx.attempt.take() else {
            return;
        };
        if let Some(policy) = ctx.policy() {
            policy
                .endpoints
                .abandon(index, now, now.saturating_duration_since(started));
        }
    }

    pub(super) fn record_upstream(&self, ctx: &Ctx, outcome: &'static str) {
        let (Some(p), Some(label)) = (ctx.policy(), ctx.backend_label()) else {
            return;
        };
        let make = || {
            self.shared.metrics.upstream_requests.with_label_values(&[
                p.name.as_str(),
                label,
                outcome,
            ])
        };
        let target = ctx
            .backend
            .and_then(|i| p.endpoints.targets.get(i))
            .filter(|_| !ctx.to_fallback_backend);
        match target {
            Some(t) => {
                if let Some(counter) = t.upstream.get(upstream_outcome_index(outcome), make) {
                    counter.inc();
                }
            }
            None => make().inc(),
        }
    }
}
