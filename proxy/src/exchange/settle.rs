//! Settlement: what a request held goes back exactly once (the breaker's
//! admission, the concurrency slot, an open attempt), and the request is recorded.

use std::time::{Duration, Instant};

use sluice_policy::GrpcCode;

use super::{grpc, Exchange, Observe, Record, Request, State, Target};
use crate::trace;
use crate::verdict::Verdict;

impl<O: Observe> Exchange<O> {
    /// Settles the request with the route's components, metrics and access log.
    pub(super) fn finish(
        &mut self,
        req: &(impl Request + ?Sized),
        now: Instant,
        status: u16,
        failed: bool,
        grpc_status: Option<u32>,
    ) {
        let arrived = self.state != State::New;
        self.state = State::Done;
        if !arrived {
            // No request: the stand-in for a head the front refused.
            return;
        }
        let elapsed = now.saturating_duration_since(self.start);
        // A relayed gRPC response's status came in its trailers: the attempt is
        // settled by it. A response that ended without one (and without an error)
        // reads as UNKNOWN to the client, as gRPC libraries report it.
        let mut grpc_code = grpc_status.map(GrpcCode::from_number);
        if std::mem::take(&mut self.grpc_pending) && (grpc_code.is_some() || !failed) {
            let code = *grpc_code.get_or_insert(GrpcCode::Unknown);
            self.settle_grpc(now, code);
        }
        // An attempt still open here ended without a response: the client left.
        // It is abandoned (its time so far is a latency sample for P2C; the backend
        // is neither blamed nor credited, as Envoy's outlier detection ignores
        // downstream resets).
        if let Some((index, started)) = self.attempt.take() {
            if let Some(endpoints) = self.endpoints() {
                endpoints.abandon(index, now, now.saturating_duration_since(started));
            }
        }
        // Settle the request with the route's components: exactly one outcome each.
        let (admission, permit) = (self.admission.take(), std::mem::take(&mut self.permit));
        if let Some(route) = self.route() {
            let attempted = !self.tried.is_empty();
            let last_failed = self.last_attempt_failed;
            if let (Some(breaker), Some(admission)) = (&route.breaker, admission) {
                if attempted && (!failed || last_failed) {
                    let t = breaker.record(now, admission, last_failed, elapsed);
                    if let Some(t) = t {
                        self.obs.breaker_changed(route, t);
                    }
                } else {
                    breaker.cancel(admission);
                }
            }
            if permit {
                if let Some(limiter) = &route.concurrency {
                    limiter.release(now, elapsed, last_failed);
                }
            }
        }
        // The attempt relayed to the end (or cut short by the client) ends now.
        if let Some(last) = self.trace.as_mut().and_then(|t| t.attempts.last_mut()) {
            last.end.get_or_insert(now);
        }
        let backend = match self.target {
            Target::FallbackBackend => Some("fallback"),
            _ => self.backend_label(),
        };
        // Exported: sampled at the head, or refused, failed, retried or served a
        // fallback (the tail's reasons, known only now).
        let export = self.trace.as_ref().is_some_and(|t| {
            t.head_sampled
                || !matches!(self.verdict, Verdict::Allowed | Verdict::Passthrough)
                || self.fallback.is_some()
                || failed
                || status == 0
                || status >= 500
                || t.attempts.iter().any(|a| a.outcome != Some("success"))
        });
        // What the request is classed by (`code_class`, the SLO rules): the HTTP
        // status, or for a gRPC call its gRPC status, as docs/grpc.md maps it (the
        // proxy's own answers keep the class of the HTTP answer they stand for).
        let mut class_status = status;
        if self.grpc && status == 200 {
            match self.answered {
                Some((http, code)) => {
                    class_status = http;
                    grpc_code = Some(code);
                }
                None => {
                    let code = grpc_code.unwrap_or(GrpcCode::Unknown);
                    class_status = match self.route() {
                        Some(route) => grpc::class_status(code, &route.route.grpc_failures),
                        None => grpc::class_status(code, &GrpcCode::FAILURES),
                    };
                }
            }
        }
        let trace_id = trace::trace_id_of(&self.traceparent);
        self.obs.finished(&Record {
            req,
            route: self.route(),
            policy: self.policy(),
            status,
            class_status,
            grpc_status: grpc_code.filter(|_| self.grpc).map(|c| c as u32),
            elapsed,
            verdict: self.verdict,
            shadow: self.shadow,
            fallback: self.fallback,
            backend,
            attempts: (self.tried.len() + usize::from(self.target == Target::FallbackBackend))
                as u32,
            trace_id: trace_id.unwrap_or(""),
            trace: self.trace.as_ref().filter(|_| export),
            // An exemplar leads to a trace that was recorded: with tracing on, this
            // request's own when it is exported; without, a caller's sampled trace
            // (its span is recorded upstream of the proxy), never one started here.
            exemplar: match self.trace {
                Some(_) if export => trace_id,
                Some(_) => None,
                None => trace_id.filter(|_| {
                    !self.traceparent_generated && trace::sampled(self.traceparent.as_bytes())
                }),
            },
            policy_version: self.runtime.as_ref().map(|r| r.version.as_str()),
            direction: self.direction,
        });
    }
}

impl<O: Observe> Drop for Exchange<O> {
    fn drop(&mut self) {
        // Whatever ended the request, what it held goes back: a handed-off or
        // abandoned exchange must not leak a breaker probe or a concurrency slot.
        if let Some(route) = self.route() {
            if let (Some(breaker), Some(admission)) = (&route.breaker, self.admission) {
                breaker.cancel(admission);
            }
            if self.permit {
                if let Some(limiter) = &route.concurrency {
                    limiter.release(Instant::now(), Duration::ZERO, false);
                }
            }
        }
        if let (Some((index, started)), Some(endpoints)) = (self.attempt, self.endpoints()) {
            let now = Instant::now();
            endpoints.abandon(index, now, now.saturating_duration_since(started));
        }
        self.obs.end(self.ticket);
    }
}
