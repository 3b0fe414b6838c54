//! Attempts at backends: the next peer, and what a failed connection, a broken
//! exchange or a response status leads to (failover, resend, retry within the
//! budget, the fallback backend, or the proxy's own answer).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_policy::{FallbackAction, FallbackCause, GrpcCode, Protocol, RetryOn};

use super::{
    is_idempotent, reply, request_key, Action, Exchange, Observe, Outcome, Peer, Reply, Request,
    State, Target, APP, CONNECT_TIMEOUT, MAX_ATTEMPTS,
};
use crate::verdict::Verdict;

impl<O: Observe> Exchange<O> {
    /// The next attempt's peer: the fallback backend, the passthrough target, the
    /// inbound app or a balanced pick among the untried backends; a 502 when there
    /// is none.
    pub(super) fn next_attempt(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
        fresh: bool,
    ) -> Action {
        self.state = State::Proxying;
        if self.attempts >= MAX_ATTEMPTS {
            return self.fail(502, reply::Failure::Status("too many attempts"));
        }
        let remaining = self.deadline.map(|t| {
            t.saturating_sub(now.saturating_duration_since(self.start))
                .max(Duration::from_millis(1))
        });
        let peer = |addr, h2c| Peer {
            addr,
            h2c,
            connect_timeout: remaining.map_or(CONNECT_TIMEOUT, |r| r.min(CONNECT_TIMEOUT)),
            io_timeout: remaining,
            fresh,
            tls: None,
        };
        let next = match self.target {
            Target::FallbackBackend => match self.route().and_then(|r| r.fallback_addr) {
                Some(addr) => Ok(Peer {
                    connect_timeout: CONNECT_TIMEOUT,
                    ..peer(addr, false)
                }),
                None => Err("the fallback backend does not resolve".to_owned()),
            },
            Target::Passthrough(addr) => Ok(Peer {
                connect_timeout: CONNECT_TIMEOUT,
                io_timeout: None,
                ..peer(addr, false)
            }),
            Target::App(Some(addr)) => {
                self.tried.push(APP);
                self.backend = Some(APP);
                Ok(peer(addr, false))
            }
            Target::App(None) => Err(format!(
                "policy {:?} has no reachable backend",
                self.policy().map_or("", |p| p.name.as_str())
            )),
            Target::Balanced => match self.pick(req, now) {
                Ok((addr, h2c, tls)) => Ok(Peer {
                    tls,
                    ..peer(addr, h2c)
                }),
                Err(e) => Err(e),
            },
        };
        match next {
            Ok(peer) => {
                self.attempts += 1;
                if let Some(t) = &mut self.trace {
                    t.begin_attempt(self.obs.ids(), peer.addr, now, &mut self.traceparent);
                }
                Action::Connect(peer)
            }
            Err(reason) => self.fail(502, reply::Failure::Status(&reason)),
        }
    }

    /// A balanced pick among the untried backends; the attempt is opened on it.
    pub(super) fn pick(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
    ) -> Result<(SocketAddr, bool, Option<Arc<str>>), String> {
        let (Some(policy), Some(endpoints)) = (self.policy(), self.endpoints()) else {
            return Err("request was not routed".into());
        };
        // Borrowed, not cloned: an `Arc` clone here was a refcount write per
        // request on a line every worker thread writes. The borrow of `self` ends
        // with `begin`, before the attempt is recorded.
        let key = endpoints
            .hash_key()
            .map(|k| request_key(req, k))
            .unwrap_or_default();
        let picked = endpoints
            .pick(now, key.as_bytes(), &self.tried)
            .and_then(|i| {
                let t = endpoints.targets.get(i)?;
                Some((i, t.addr, t.protocol, t.identity.clone()))
            });
        let Some((index, addr, protocol, tls)) = picked else {
            return Err(format!("policy {:?} has no reachable backend", policy.name));
        };
        endpoints.begin(index);
        self.tried.push(index);
        self.backend = Some(index);
        self.attempt = Some((index, now));
        Ok((addr, protocol == Protocol::H2c, tls))
    }

    /// A connection attempt failed: another backend, the fallback backend, or a 502.
    pub(super) fn connect_failed(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
        error: &'static str,
    ) -> Action {
        self.record_upstream(Outcome::ConnectError);
        self.trace_attempt(Outcome::ConnectError, 0, Some(now));
        self.last_attempt_failed = true;
        self.end_attempt(now, true);
        let failed = |ex: &mut Self| ex.fail(502, reply::Failure::Connect(error));
        if self.target == Target::FallbackBackend {
            return failed(self);
        }
        if self.policy().is_none() {
            return failed(self);
        }
        let retries = self.route().is_some_and(|r| r.route.retries.is_some());
        // Nothing was sent, so any method may go elsewhere. Without a retry policy a
        // refused connection still fails over to an untried backend (free: no load
        // reached anyone); with one, failover is a retry and draws from the budget.
        // The inbound app is the only backend: nothing to fail over to without one.
        let again = if retries {
            self.may_retry(req, now, RetryOn::ConnectFailure, true)
        } else {
            self.target == Target::Balanced
                && self
                    .endpoints()
                    .is_some_and(|e| e.untried_left(&self.tried))
        };
        if again {
            if retries {
                self.retries += 1;
            }
            return self.next_attempt(req, now, false);
        }
        if self.fallback_backend_for_error() {
            return self.next_attempt(req, now, false);
        }
        failed(self)
    }

    /// An upstream response head arrived with `status` (and `grpc_status`, a
    /// trailers-only gRPC response's).
    pub(super) fn response(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
        status: u16,
        grpc_status: Option<u32>,
    ) -> Action {
        if matches!(status, 100 | 102..=199) {
            // Interim (100 Continue, 103 Early Hints): passed on, and the final
            // response is still to come, so nothing is settled yet.
            return Action::Relay;
        }
        if self.grpc && status == 200 {
            return self.grpc_response(req, now, grpc_status);
        }
        self.upstream_status = Some(status);
        self.last_attempt_failed = status >= 500;
        self.end_attempt(now, status >= 500);
        let outcome = if status >= 500 {
            Outcome::Http5xx
        } else {
            Outcome::Success
        };
        self.record_upstream(outcome);
        // Still open: the body is being relayed (a retry or the end closes it).
        self.trace_attempt(outcome, status, None);
        if status < 500 || self.target == Target::FallbackBackend {
            self.state = State::Relaying;
            return Action::Relay;
        }
        let gateway = matches!(status, 502..=504);
        if gateway && self.may_retry(req, now, RetryOn::GatewayError, false) {
            self.retries += 1;
            return self.next_attempt(req, now, false);
        }
        self.upstream_failed(req, now, status)
    }

    /// A gRPC call's response head (HTTP 200): with its status in it (trailers-
    /// only) the attempt is settled now, and may be retried on that code; else the
    /// status comes in the trailers and is settled at `Finished`.
    fn grpc_response(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
        grpc_status: Option<u32>,
    ) -> Action {
        self.upstream_status = Some(200);
        let Some(code) = grpc_status.map(GrpcCode::from_number) else {
            self.grpc_pending = true;
            self.state = State::Relaying;
            return Action::Relay;
        };
        let failed = self.settle_grpc(now, code);
        if self.target == Target::FallbackBackend {
            self.state = State::Relaying;
            return Action::Relay;
        }
        if self.may_retry(req, now, RetryOn::Grpc(code), false) {
            self.retries += 1;
            return self.next_attempt(req, now, false);
        }
        if failed {
            return self.upstream_failed(req, now, 200);
        }
        self.state = State::Relaying;
        Action::Relay
    }

    /// Settles the attempt by its gRPC status; whether the route counts it failed.
    pub(super) fn settle_grpc(&mut self, now: Instant, code: GrpcCode) -> bool {
        let failed = self.grpc_failure(code);
        self.last_attempt_failed = failed;
        self.end_attempt(now, failed);
        let outcome = if failed {
            Outcome::GrpcError
        } else {
            Outcome::Success
        };
        self.record_upstream(outcome);
        self.trace_attempt(outcome, 200, None);
        failed
    }

    /// Whether `code` is a failed call for the request's route (the default list
    /// without one).
    pub(super) fn grpc_failure(&self, code: GrpcCode) -> bool {
        match self.route() {
            Some(route) => route.route.grpc_failures.contains(&code),
            None => GrpcCode::FAILURES.contains(&code),
        }
    }

    /// A failed response that is not retried: the fallback when the route's
    /// covers upstream errors, else it is relayed as it is.
    fn upstream_failed(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
        status: u16,
    ) -> Action {
        if self.covers_upstream_errors() {
            // This response is refused: the next attempt goes to the fallback
            // backend, or the static fallback answers.
            if self.fallback_backend_for_error() {
                return self.next_attempt(req, now, false);
            }
            // A gRPC failure arrives as HTTP 200: answered as an upstream error.
            return self.fail(
                if status >= 500 { status } else { 502 },
                reply::Failure::Status("upstream error, serving the fallback"),
            );
        }
        self.state = State::Relaying;
        Action::Relay
    }

    /// The exchange with the backend broke or timed out after connecting.
    pub(super) fn broken(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
        timed_out: bool,
        stale: bool,
        responding: bool,
        error: &'static str,
    ) -> Action {
        self.last_attempt_failed = true;
        self.end_attempt(now, true);
        let outcome = if timed_out {
            Outcome::Timeout
        } else {
            Outcome::Error
        };
        self.record_upstream(outcome);
        self.trace_attempt(outcome, self.upstream_status.unwrap_or(0), Some(now));
        if responding {
            // Part of the answer went out: it cannot be replaced, only cut short.
            return Action::Abort;
        }
        if self.upstream_status.is_none() && !timed_out && self.target != Target::FallbackBackend {
            // A connection that broke before any response: a stale pooled connection
            // is resent once on a new one (nothing reached the app); `reset` retries
            // the rest when the policy allows it.
            if stale && is_idempotent(req.method()) && !req.body_truncated() {
                return self.next_attempt(req, now, true);
            }
            if self.may_retry(req, now, RetryOn::Reset, false) {
                self.retries += 1;
                return self.next_attempt(req, now, false);
            }
        }
        if self.fallback_backend_for_error() {
            return self.next_attempt(req, now, false);
        }
        let status = if timed_out { 504 } else { 502 };
        self.fail(status, reply::Failure::Other(error))
    }

    /// The proxy answers this (its own response; a gRPC call gets it as a gRPC status).
    pub(super) fn answer(&mut self, reply: Reply) -> Action {
        self.state = State::Answering;
        self.answered = Some((reply.status, reply.grpc));
        if self.grpc {
            return Action::Answer(reply.into_grpc());
        }
        Action::Answer(reply)
    }

    /// The request could not be proxied: the route's static fallback when it
    /// covers upstream errors (a complete answer: the client connection stays
    /// usable), else an explanation with `status`.
    pub(super) fn fail(&mut self, status: u16, failure: reply::Failure<'_>) -> Action {
        if status >= 500 && self.target != Target::FallbackBackend && self.covers_upstream_errors()
        {
            if let Some(reply) = self.static_fallback(FallbackCause::UpstreamError) {
                return self.answer(reply);
            }
        }
        let reply = self.failure_reply(status, failure);
        self.answer(reply)
    }

    /// Whether one more retry may be made for `on`, drawing from the budget.
    pub(super) fn may_retry(
        &self,
        req: &(impl Request + ?Sized),
        now: Instant,
        on: RetryOn,
        nothing_sent: bool,
    ) -> bool {
        let Some(route) = self.route() else {
            return false;
        };
        let Some(retries) = &route.route.retries else {
            return false;
        };
        if !retries.on.contains(&on) || self.retries >= retries.attempts {
            return false;
        }
        // gRPC calls are all POSTs: a route that lists retries for them marks its
        // methods retryable (match them by `grpc.method`).
        let idempotent = self.grpc || is_idempotent(req.method());
        if !nothing_sent && (!idempotent || req.body_truncated()) {
            return false;
        }
        let granted = route.budget.as_ref().is_none_or(|b| b.withdraw(now));
        self.obs.retry(route, granted);
        granted
    }

    /// Whether the route's fallback answers upstream errors.
    pub(super) fn covers_upstream_errors(&self) -> bool {
        self.route()
            .and_then(|r| r.route.fallback.as_ref())
            .is_some_and(|f| f.on.contains(&FallbackCause::UpstreamError))
    }

    /// Whether a failed primary request goes on to the fallback backend (then set up).
    pub(super) fn fallback_backend_for_error(&mut self) -> bool {
        let Some(route) = self.route() else {
            return false;
        };
        let covers = route.route.fallback.as_ref().is_some_and(|f| {
            f.on.contains(&FallbackCause::UpstreamError)
                && matches!(f.action, FallbackAction::Backend(_))
        });
        if !covers || self.target == Target::FallbackBackend {
            return false;
        }
        self.obs.fallback(
            route,
            FallbackCause::UpstreamError,
            sluice_policy::Mode::Enforce,
        );
        self.target = Target::FallbackBackend;
        self.fallback = Some(FallbackCause::UpstreamError);
        self.verdict = Verdict::Fallback;
        true
    }

    /// Settles the attempt in progress with the backend's balancer and outlier
    /// detector (once; later calls are no-ops).
    pub(super) fn end_attempt(&mut self, now: Instant, failed: bool) {
        let Some((index, started)) = self.attempt.take() else {
            return;
        };
        let (Some(policy), Some(endpoints)) = (self.policy(), self.endpoints()) else {
            return;
        };
        let rtt = now.saturating_duration_since(started);
        if endpoints.finish(index, now, rtt, failed) {
            self.obs.ejected(policy, endpoints, index);
        }
    }

    /// What the attempt in progress came to, on its span (tracing on).
    fn trace_attempt(&mut self, outcome: Outcome, status: u16, end: Option<Instant>) {
        if let Some(t) = &mut self.trace {
            t.attempt_outcome(outcome.as_str(), status, end);
        }
    }

    pub(super) fn record_upstream(&self, outcome: Outcome) {
        if let (Some(policy), Some(endpoints)) = (self.policy(), self.endpoints()) {
            let backend = match self.target {
                Target::FallbackBackend => return,
                Target::Balanced | Target::App(_) => self.backend,
                Target::Passthrough(_) => return,
            };
            if let Some(backend) = backend {
                self.obs.upstream(policy, endpoints, backend, outcome);
            }
        }
    }
}
