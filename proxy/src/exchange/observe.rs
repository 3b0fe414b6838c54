//! Where an exchange's side effects go: one trait, so the flow's decisions are
//! tested apart from Prometheus and stdout, and one implementation for the proxy
//! (`Handle<Shared>`: the metrics, the access log, the in-flight count).
//!
//! Every event on a route or a policy marks it used first (see `series`): that is
//! what makes its series exist, and what keeps them while traffic lasts.

use std::time::{Duration, SystemTime};

use sluice_policy::{FallbackCause, Mode};

use super::{Direction, Request, APP};
use crate::accesslog::{AccessRecord, Timestamp};
use crate::breaker::Transition;
use crate::endpoints::Endpoints;
use crate::metrics::{code_class, code_class_index};
use crate::runtime::{PolicyRuntime, RouteRuntime};
use crate::shard::{Handle, Ticket};
use crate::shared::Shared;
use crate::trace::{IdGenerator, RequestTrace, Sampler, SpanData, SpanKind, Value};
use crate::verdict::Verdict;

/// How one attempt at a backend ended (`sluice_upstream_requests_total`'s outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Http5xx,
    ConnectError,
    Timeout,
    Error,
    /// A gRPC status the route counts as a failure.
    GrpcError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Http5xx => "http_5xx",
            Outcome::ConnectError => "connect_error",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::GrpcError => "grpc_error",
        }
    }
}

/// A settled request, as metrics and the access log see it.
pub struct Record<'a, R: ?Sized> {
    pub req: &'a R,
    pub policy: Option<&'a PolicyRuntime>,
    pub route: Option<&'a RouteRuntime>,
    /// As sent to the client, 0 if nothing was.
    pub status: u16,
    /// What the request is classed by (`code_class`): `status`, or for a gRPC call
    /// the HTTP status its gRPC status stands for (see `grpc::class_status`).
    pub class_status: u16,
    /// A gRPC call's status, as the client got it.
    pub grpc_status: Option<u32>,
    pub elapsed: Duration,
    pub verdict: Verdict,
    pub shadow: Option<Verdict>,
    pub fallback: Option<FallbackCause>,
    pub backend: Option<&'a str>,
    pub attempts: u32,
    pub trace_id: &'a str,
    /// The request's span and its attempts', when they are to be exported
    /// (tracing on, and sampled at the head or for the way the request ended).
    pub trace: Option<&'a RequestTrace>,
    /// The trace id to attach to this request's duration observation as an
    /// exemplar (a sampled trace's, so it can be looked up), `None` for none.
    pub exemplar: Option<&'a str>,
    pub policy_version: Option<&'a str>,
    pub direction: Direction,
}

/// The side effects of an exchange.
pub trait Observe {
    /// The exchange starts (it counts as in flight until `end`, which gives the
    /// ticket back).
    fn begin(&self) -> Ticket;
    fn end(&self, ticket: Ticket);
    /// Trace and span ids (`traceparent`s for requests that came without one).
    fn ids(&self) -> &IdGenerator;
    /// Tracing is on (spans are recorded): how traces started here are sampled.
    fn sampler(&self) -> Option<Sampler>;
    fn rate_limited(&self, route: &RouteRuntime);
    /// An inbound policy refused the caller (mTLS required, or authorization);
    /// in `route.mode` (shadow: let through).
    fn unauthorized(&self, route: &RouteRuntime);
    fn breaker_rejected(&self, route: &RouteRuntime);
    fn breaker_changed(&self, route: &RouteRuntime, t: Transition);
    fn shed(&self, route: &RouteRuntime, class: &str);
    fn fallback(&self, route: &RouteRuntime, cause: FallbackCause, mode: Mode);
    /// A retry was asked for: `granted` by the budget, or not.
    fn retry(&self, route: &RouteRuntime, granted: bool);
    /// An attempt at `backend` (an index into `endpoints`' targets, the route's or
    /// the policy's, or the app) ended.
    fn upstream(
        &self,
        policy: &PolicyRuntime,
        endpoints: &Endpoints,
        backend: usize,
        outcome: Outcome,
    );
    /// Outlier detection ejected `backend` (of `endpoints`).
    fn ejected(&self, policy: &PolicyRuntime, endpoints: &Endpoints, backend: usize);
    /// Unclaimed traffic forwarded untouched.
    fn passthrough(&self, direction: Direction);
    fn finished<R: Request + ?Sized>(&self, record: &Record<'_, R>);
}

fn target_label(endpoints: &Endpoints, backend: usize) -> &str {
    match backend {
        APP => "app",
        i => endpoints.targets.get(i).map_or("?", |t| t.label.as_str()),
    }
}

impl Shared {
    /// Marks `route` used: its series exist from here on.
    fn route_used(&self, route: &RouteRuntime) {
        route
            .series
            .record(&self.series, route.slo_threshold, |_| ());
    }
}

/// The proxy's observer: Prometheus counters (through the snapshot's cached
/// handles where the request path is hot), the access log, warnings for state
/// changes.
impl Observe for Handle<Shared> {
    fn begin(&self) -> Ticket {
        // The gauge is set from this count at each scrape (admin), not here: two
        // fewer writes per request to a line every worker thread shares.
        self.inflight.enter()
    }

    fn end(&self, ticket: Ticket) {
        self.inflight.leave(ticket);
    }

    fn ids(&self) -> &IdGenerator {
        &self.ids
    }

    fn sampler(&self) -> Option<Sampler> {
        self.tracer.as_ref().map(|t| t.sampler)
    }

    fn rate_limited(&self, route: &RouteRuntime) {
        self.route_used(route);
        let labels = [
            route.policy.as_str(),
            route.name.as_str(),
            route.mode.as_str(),
        ];
        self.metrics.rate_limited.with_label_values(&labels).inc();
    }

    fn unauthorized(&self, route: &RouteRuntime) {
        self.route_used(route);
        let labels = [
            route.policy.as_str(),
            route.name.as_str(),
            route.mode.as_str(),
        ];
        self.metrics.authz_denied.with_label_values(&labels).inc();
    }

    fn breaker_rejected(&self, route: &RouteRuntime) {
        self.route_used(route);
        let labels = [
            route.policy.as_str(),
            route.name.as_str(),
            route.mode.as_str(),
        ];
        self.metrics
            .breaker_rejected
            .with_label_values(&labels)
            .inc();
    }

    fn breaker_changed(&self, route: &RouteRuntime, t: Transition) {
        self.route_used(route);
        let m = &self.metrics;
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

    fn shed(&self, route: &RouteRuntime, class: &str) {
        self.route_used(route);
        let labels = [
            route.policy.as_str(),
            route.name.as_str(),
            class,
            route.mode.as_str(),
        ];
        self.metrics.shed.with_label_values(&labels).inc();
    }

    fn fallback(&self, route: &RouteRuntime, cause: FallbackCause, mode: Mode) {
        self.route_used(route);
        let labels = [
            route.policy.as_str(),
            route.name.as_str(),
            cause.as_str(),
            mode.as_str(),
        ];
        self.metrics.fallbacks.with_label_values(&labels).inc();
    }

    fn retry(&self, route: &RouteRuntime, granted: bool) {
        self.route_used(route);
        let result = if granted {
            "retried"
        } else {
            "budget_exhausted"
        };
        let labels = [route.policy.as_str(), route.name.as_str(), result];
        self.metrics.retries.with_label_values(&labels).inc();
    }

    fn upstream(
        &self,
        policy: &PolicyRuntime,
        endpoints: &Endpoints,
        backend: usize,
        outcome: Outcome,
    ) {
        policy.series.record(&self.series);
        let make = || {
            self.metrics.upstream_requests.with_label_values(&[
                policy.name.as_str(),
                target_label(endpoints, backend),
                outcome.as_str(),
            ])
        };
        match endpoints.targets.get(backend) {
            Some(t) => t.upstream.inc(outcome as usize, &self.metrics, make),
            None => make().inc(),
        }
    }

    fn ejected(&self, policy: &PolicyRuntime, endpoints: &Endpoints, backend: usize) {
        policy.series.record(&self.series);
        let label = target_label(endpoints, backend);
        self.metrics
            .backend_ejections
            .with_label_values(&[policy.name.as_str(), label])
            .inc();
        tracing::warn!(
            policy = policy.name.as_str(),
            backend = label,
            "backend ejected"
        );
    }

    fn passthrough(&self, direction: Direction) {
        self.metrics
            .passthrough
            .with_label_values(&[direction.as_str()])
            .inc();
    }

    fn finished<R: Request + ?Sized>(&self, r: &Record<'_, R>) {
        if let Some(policy) = r.policy {
            policy.series.record(&self.series);
        }
        let policy = r.policy.map(|p| p.name.as_str());
        let route = r.route.map(|r| r.name.as_str());
        let labels = [
            policy.unwrap_or(""),
            route.unwrap_or(""),
            code_class(r.class_status),
            r.verdict.as_str(),
            r.direction.as_str(),
        ];
        let make = || self.metrics.requests.with_label_values(&labels);
        let recorded = r.route.map(|route| {
            let index = (code_class_index(r.class_status) * Verdict::COUNT + r.verdict as usize)
                * 2
                + usize::from(r.direction == Direction::Inbound);
            route
                .series
                .record(&self.series, route.slo_threshold, |series| {
                    // The wall clock is read only for the few requests with an exemplar.
                    let exemplar = r.exemplar.map(|id| (id, SystemTime::now()));
                    series.observe(r.elapsed, exemplar);
                    series.requests.inc(index, &self.metrics, make);
                })
        });
        if recorded.is_none() {
            make().inc();
        }
        if self.access_log.enabled() {
            self.access_log.write(&AccessRecord {
                ts: Timestamp::now(),
                trace_id: r.trace_id,
                method: r.req.method(),
                host: r.req.host(),
                path: r.req.path(),
                policy,
                route,
                backend: r.backend,
                status: r.status,
                grpc_status: r.grpc_status,
                duration: r.elapsed,
                decision: r.verdict.as_str(),
                shadow_decision: r.shadow.map(Verdict::as_str),
                fallback: r.fallback.map(FallbackCause::as_str),
                attempts: r.attempts,
                policy_version: r.policy_version,
                direction: r.direction.as_str(),
                peer: r.req.peer_identity().map(|p| &*p.id),
            });
        }
        if let (Some(trace), Some(tracer)) = (r.trace, &self.tracer) {
            for span in spans(r, trace) {
                if !tracer.queue.push(span) {
                    self.metrics.trace_spans_dropped_queue_full.inc();
                }
            }
        }
    }
}

/// The spans of a finished request: its own, then one per attempt, as
/// OpenTelemetry's HTTP semantic conventions name their attributes (the route
/// template is Sluice's route name), plus Sluice's own (`sluice.*`).
pub fn spans<R: Request + ?Sized>(r: &Record<'_, R>, t: &RequestTrace) -> Vec<SpanData> {
    let method = r.req.method();
    let str_attr = |key: &'static str, value: &str| (key, Value::Str(value.to_owned()));
    let mut attributes = vec![
        str_attr("http.request.method", method),
        str_attr("url.path", r.req.path()),
        str_attr("sluice.direction", r.direction.as_str()),
        str_attr("sluice.decision", r.verdict.as_str()),
        ("sluice.attempts", Value::Int(i64::from(r.attempts))),
    ];
    let optional = [
        ("http.route", r.route.map(|x| x.name.as_str())),
        ("sluice.route", r.route.map(|x| x.name.as_str())),
        ("sluice.policy", r.policy.map(|p| p.name.as_str())),
        ("sluice.backend", r.backend),
        ("sluice.policy_version", r.policy_version),
        ("sluice.shadow_decision", r.shadow.map(Verdict::as_str)),
        (
            "sluice.fallback_cause",
            r.fallback.map(FallbackCause::as_str),
        ),
        (
            "sluice.peer_identity",
            r.req.peer_identity().map(|p| &*p.id),
        ),
        (
            "server.address",
            Some(r.req.host()).filter(|h| !h.is_empty()),
        ),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            attributes.push(str_attr(key, value));
        }
    }
    if let Some(ip) = r.req.client_ip() {
        attributes.push(("client.address", Value::Str(ip.to_string())));
    }
    if r.status != 0 {
        attributes.push(("http.response.status_code", Value::Int(i64::from(r.status))));
    }
    if let Some(code) = r.grpc_status {
        attributes.push(("rpc.grpc.status_code", Value::Int(i64::from(code))));
    }
    let kind = match r.direction {
        Direction::Inbound => SpanKind::Server,
        Direction::Outbound => SpanKind::Client,
    };
    // The conventions: a server span is an error on 5xx, a client span on 4xx too;
    // no status at all (the response never went out) is one either way.
    let error_from = match kind {
        SpanKind::Server => 500,
        SpanKind::Client => 400,
    };
    let error = (r.status == 0 || r.status >= error_from).then(|| match r.verdict {
        Verdict::Allowed => format!("HTTP {}", r.status),
        v => v.as_str().to_owned(),
    });
    let name = match r.route {
        Some(route) => format!("{method} {}", route.name),
        None => method.to_owned(),
    };
    let mut spans = Vec::with_capacity(1 + t.attempts.len());
    spans.push(SpanData {
        trace_id: t.trace_id,
        span_id: t.span_id,
        parent_span_id: t.parent.unwrap_or(0),
        name,
        kind,
        start_unix_nanos: t.start_unix_nanos,
        end_unix_nanos: t.unix_nanos_at(t.start + r.elapsed),
        attributes,
        error,
    });
    for (n, a) in t.attempts.iter().enumerate() {
        let mut attributes = vec![
            str_attr("http.request.method", method),
            str_attr("server.address", &a.addr.ip().to_string()),
            ("server.port", Value::Int(i64::from(a.addr.port()))),
            ("sluice.attempt", Value::Int(n as i64 + 1)),
            str_attr("sluice.outcome", a.outcome.unwrap_or("abandoned")),
        ];
        if a.status != 0 {
            attributes.push(("http.response.status_code", Value::Int(i64::from(a.status))));
        }
        spans.push(SpanData {
            trace_id: t.trace_id,
            span_id: a.span_id,
            parent_span_id: t.span_id,
            name: format!("attempt {}", n + 1),
            kind: SpanKind::Client,
            start_unix_nanos: t.unix_nanos_at(a.start),
            end_unix_nanos: t.unix_nanos_at(a.end.unwrap_or(t.start + r.elapsed)),
            attributes,
            error: match a.outcome {
                Some("success") => None,
                other => Some(other.unwrap_or("abandoned").to_owned()),
            },
        });
    }
    spans
}
