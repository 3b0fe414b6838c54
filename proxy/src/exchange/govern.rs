//! Admission: the rate limits, circuit breaker and concurrency limit in order, and
//! the refusals and fallbacks that answer them.

use std::time::{Duration, Instant};

use sluice_policy::{FallbackAction, FallbackCause, Mode};

use super::{ceil_secs, request_key, Exchange, Observe, RateHeaders, Reply, Request, Target};
use crate::breaker::Admission;
use crate::ratelimit::Decision as Limit;
use crate::runtime::RouteRuntime;
use crate::verdict::Verdict;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Refusal {
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

impl<O: Observe> Exchange<O> {
    /// Rate limit, breaker, concurrency limit, in that order. `Err` is a refusal
    /// (never in shadow mode, which only records).
    pub(super) fn govern(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
    ) -> Result<(), Refusal> {
        // Taken out and put back rather than cloned: a clone is an atomic add and
        // a subtract (on the thread's own line since the snapshot is a per-thread
        // handle, but two writes all the same) for a borrow `self` cannot lend
        // while `govern_route` takes `&mut self`.
        let Some(runtime) = self.runtime.take() else {
            return Ok(());
        };
        let result = match super::route_of(&runtime, self.routed) {
            Some(route) => self.govern_route(req, route, now),
            None => Ok(()),
        };
        self.runtime = Some(runtime);
        result
    }

    fn govern_route(
        &mut self,
        req: &(impl Request + ?Sized),
        route: &RouteRuntime,
        now: Instant,
    ) -> Result<(), Refusal> {
        if let Some(limiter) = &route.limiter {
            let key = limiter.key().map(|k| request_key(req, k));
            let decision = match &key {
                Some(key) => limiter.check_owned(key),
                None => limiter.check(""),
            };
            self.rate_limit(route, decision, limiter.limit())?;
        }
        if let Some(limiter) = &route.global {
            let key = limiter.key().map(|k| request_key(req, k));
            let decision = limiter.check(key.as_deref().unwrap_or(""), now);
            self.rate_limit(route, decision, limiter.limit())?;
        }

        if let Some(breaker) = &route.breaker {
            let (admission, transition) = breaker.admit(now);
            if let Some(t) = transition {
                self.obs.breaker_changed(route, t);
            }
            if admission == Admission::Rejected {
                self.obs.breaker_rejected(route);
                self.shadow_or(
                    route,
                    Refusal::BreakerOpen {
                        retry_in: breaker.retry_in(now),
                    },
                )?;
            } else {
                self.admission = Some(admission);
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
                self.permit = true;
            } else {
                self.obs.shed(route, class);
                self.shadow_or(
                    route,
                    Refusal::Overloaded {
                        limit: limiter.limit(),
                    },
                )?;
            }
        }
        if let Some(budget) = &route.budget {
            budget.deposit(now);
        }
        Ok(())
    }

    /// One rate limit's decision (local or global, in that order): an admitted
    /// request advertises the tighter of the limits it passed, a refused one is a
    /// refusal (only recorded in shadow mode).
    fn rate_limit(
        &mut self,
        route: &RouteRuntime,
        decision: Limit,
        limit: u32,
    ) -> Result<(), Refusal> {
        match decision {
            Limit::Allowed { remaining, reset } => {
                if self.rate_headers.is_none_or(|h| remaining < h.remaining) {
                    self.rate_headers = Some(RateHeaders {
                        limit,
                        remaining,
                        reset: ceil_secs(reset),
                    });
                }
                Ok(())
            }
            Limit::Limited { retry_after } => {
                self.obs.rate_limited(route);
                self.shadow_or(route, Refusal::RateLimited { retry_after, limit })
            }
        }
    }

    /// A refusal, or in shadow mode only its record (and the fallback that would
    /// have answered it, counted).
    fn shadow_or(&mut self, route: &RouteRuntime, refusal: Refusal) -> Result<(), Refusal> {
        if route.mode != Mode::Shadow {
            return Err(refusal);
        }
        self.shadow.get_or_insert(refusal.verdict());
        let cause = refusal.cause();
        if route
            .route
            .fallback
            .as_ref()
            .is_some_and(|f| f.on.contains(&cause))
        {
            self.obs.fallback(route, cause, Mode::Shadow);
        }
        Ok(())
    }

    /// Answers a refusal: the route's fallback when it covers the cause, else the
    /// refusal's own status. `None`: the request goes on to the fallback backend.
    pub(super) fn refuse(&mut self, refusal: Refusal) -> Option<Reply> {
        let runtime = self.runtime.clone()?;
        let route = super::route_of(&runtime, self.routed)?;
        let cause = refusal.cause();
        if let Some(fallback) = route
            .route
            .fallback
            .as_ref()
            .filter(|f| f.on.contains(&cause))
        {
            if let FallbackAction::Backend(_) = fallback.action {
                self.obs.fallback(route, cause, Mode::Enforce);
                self.verdict = Verdict::Fallback;
                self.fallback = Some(cause);
                self.target = Target::FallbackBackend;
                return None;
            }
            return self.static_fallback(cause);
        }
        self.verdict = refusal.verdict();
        let (policy, name) = (&route.policy, &route.name);
        Some(match refusal {
            Refusal::RateLimited { retry_after, limit } => {
                Reply::rate_limited(policy, name, retry_after, limit)
            }
            Refusal::BreakerOpen { retry_in } => Reply::breaker_open(policy, name, retry_in),
            Refusal::Overloaded { limit } => Reply::overloaded(policy, name, limit),
        })
    }

    /// The route's static fallback answering `cause` (counted, and the request's
    /// decision from now on); `None` when the route has none.
    pub(super) fn static_fallback(&mut self, cause: FallbackCause) -> Option<Reply> {
        let runtime = self.runtime.clone()?;
        let route = super::route_of(&runtime, self.routed)?;
        let fallback = route.route.fallback.as_ref()?;
        let FallbackAction::Static {
            status,
            headers,
            body,
        } = &fallback.action
        else {
            return None;
        };
        self.obs.fallback(route, cause, Mode::Enforce);
        self.verdict = Verdict::Fallback;
        self.fallback = Some(cause);
        let grpc = (fallback.grpc_status, fallback.grpc_message.as_deref());
        Some(Reply::fallback(*status, headers, body, cause, grpc))
    }
}
