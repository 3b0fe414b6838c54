//! One request's flow, as a state machine both engines drive: [`Exchange::on`]
//! takes what happened ([`Event`]) and says what to do next ([`Action`]). Every
//! governance decision, retry, failover, fallback and outcome lives here, once;
//! the engines (`h1`, Sluice's HTTP/1.1 fast path, and `phases`, pingora's
//! `ProxyHttp`) only do the I/O the actions ask for and report what came of it.
//!
//! ```text
//!            Arrived ──► route ──► govern ──► pick a peer ──► Connect(peer)
//!               │          │         │                          │
//!               │     Answer(404/503)│ refusal: Answer(429/503) │ ConnectFailed ─► next peer / Answer(502)
//!               │       HandOff      │   or the fallback        │ Broken ────────► resend, retry / Answer(502/504) / Abort
//!               ▼                    ▼                          │ Response ──────► Relay / retry / Answer(fallback)
//!          (pingora: Resume)                                    ▼
//!                                  Finished{status} ──► settle breaker, limiter, balancer; metrics; access log
//! ```
//!
//! An inbound policy first decides who may call (`authz.rs`: its mTLS mode, then
//! its authorization; 403 or gRPC `PERMISSION_DENIED`). Then governance, cheapest
//! refusal first: rate limit (local, then global), circuit breaker, concurrency limit. A refusal is answered by the route's fallback
//! when its `on` lists the cause, else 429/503. In shadow mode nothing is refused:
//! what would have happened is counted (`mode="shadow"`) and logged as
//! `shadow_decision`.
//!
//! Time comes in with every event (`now`), so tests drive an exchange on a fake
//! clock; side effects (metrics, the access log) go through one [`Observe`]r.
//! Resources taken for the request (a breaker admission, a concurrency slot, an
//! open attempt on a backend) are settled exactly once, at `Finished` at the
//! latest, whatever order events come in.

mod attempts;
mod authz;
mod govern;
pub mod grpc;
mod observe;
mod reply;
mod settle;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_policy::{FallbackCause, GrpcCode, Key, MtlsMode};

use crate::breaker::Admission;
use crate::endpoints::Endpoints;
use crate::runtime::{PolicyRuntime, RouteRuntime, Routed, Runtime};
use crate::shard::{Handle, Ticket};
use crate::trace;
use crate::verdict::Verdict;

pub use observe::{spans, Observe, Outcome, Record};
pub use reply::Reply;

/// How long a connection attempt to a backend may take before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled upstream connection is kept.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts per request (first try, failovers, retries, resends, the fallback
/// backend), as pingora's own bound.
pub const MAX_ATTEMPTS: usize = 16;

/// Which side of the pod a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The app's calls to other services, routed by Host.
    Outbound,
    /// Calls to the app, governed by one policy and delivered to the app.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What a listener tells the flow about where its requests go.
#[derive(Debug, Clone)]
pub struct Side {
    pub direction: Direction,
    /// Inbound: every request is governed by this policy, whatever its Host...
    pub inbound_policy: Option<String>,
    /// ...and goes to the local app at this address (without `--transparent`).
    pub inbound_app: Option<SocketAddr>,
    /// The proxy's own listening ports (proxy, inbound, admin, telemetry): inbound
    /// traffic redirected from one of them is never delivered to 127.0.0.1 at that
    /// port, where it would reach the proxy itself (the loopback-only admin
    /// listener's `/config_dump` among it) from outside the pod.
    pub own_ports: Vec<u16>,
    /// The mesh-wide mTLS mode (`--mtls-mode`): what an inbound policy without
    /// `spec.mtls` gets. Only inbound requests are judged by it.
    pub mtls_default: MtlsMode,
}

impl Side {
    /// Where inbound traffic is delivered: in transparent mode the app listens on
    /// the port the client dialled, else on `--app`.
    pub fn app_address(&self, original_dst: Option<SocketAddr>) -> Option<SocketAddr> {
        match original_dst {
            Some(dst) if self.own_ports.contains(&dst.port()) => None,
            Some(dst) => Some(SocketAddr::from(([127, 0, 0, 1], dst.port()))),
            None => self.inbound_app,
        }
    }
}

/// What the flow reads from a request, whichever engine parsed it.
pub trait Request {
    fn method(&self) -> &str;
    fn path(&self) -> &str;
    /// The Host header (or the request target's authority), "" when absent.
    fn host(&self) -> &str;
    fn header(&self, name: &str) -> Option<&[u8]>;
    fn client_ip(&self) -> Option<IpAddr>;
    /// The body kept for resending is incomplete, so once sent it cannot be retried.
    fn body_truncated(&self) -> bool;
    /// The caller's workload identity, when it came over mTLS (verified).
    fn peer_identity(&self) -> Option<&crate::identity::PeerIdentity> {
        None
    }
}

/// Something that happened to the request.
pub enum Event<'a> {
    /// The request head arrived: route it on `runtime` (the live snapshot, empty
    /// before any policy loaded), then govern it. `original_dst`: where an
    /// iptables-redirected connection was going. `h2c`: whether the engine can
    /// speak h2c to backends (else a policy that needs it is handed off).
    Arrived {
        runtime: Handle<Runtime>,
        side: &'a Side,
        original_dst: Option<SocketAddr>,
        h2c: bool,
        /// The control plane was asked which policy owns the Host (on demand) and
        /// did not answer in time: unowned, it is a 503 to retry, not a 404.
        undiscovered: bool,
    },
    /// The engine that took a handed-off exchange goes on where it stopped.
    Resume,
    /// Connecting to the last `Connect`'s peer failed; `error` names why.
    ConnectFailed { error: &'static str },
    /// The upstream response head arrived; `grpc_status`: the `grpc-status` in it
    /// (a trailers-only gRPC response).
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    /// The exchange with the backend broke (or timed out) after connecting.
    /// `stale`: a pooled connection broke before any answer (nothing reached the
    /// app); `responding`: part of the response already went to the client.
    Broken {
        timed_out: bool,
        stale: bool,
        responding: bool,
        error: &'static str,
    },
    /// The engine cannot go on with the request (a malformed request body: 400;
    /// an internal error: 502); the answer explains `error`.
    Failed { status: u16, error: &'static str },
    /// The client left before its answer was complete.
    ClientGone,
    /// The answer went out (`status`, 0 if none; `failed`: it ended in an error;
    /// `grpc_status`: the `grpc-status` the client got from upstream, in the
    /// trailers or the head): settle everything.
    Finished {
        status: u16,
        failed: bool,
        grpc_status: Option<u32>,
    },
}

/// What the engine is to do next.
#[derive(Debug)]
pub enum Action {
    /// Send the request to this peer (on a new connection when `fresh`).
    Connect(Peer),
    /// Pass the upstream response on, with [`Exchange::response_headers`].
    Relay,
    /// Answer the client with this (the proxy's own response).
    Answer(Reply),
    /// This engine cannot serve the request (its backends speak h2c): give the
    /// connection and this exchange to pingora, which goes on with `Resume`.
    HandOff,
    /// The response cannot be completed: close the client connection.
    Abort,
    /// Nothing more to do.
    Done,
}

/// Where one attempt goes, and its time limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub h2c: bool,
    pub connect_timeout: Duration,
    /// What is left of the route's timeout, for each read and write of the exchange.
    pub io_timeout: Option<Duration>,
    /// A stale pooled connection broke: this attempt must use a new connection.
    pub fresh: bool,
    /// The peer is a meshed proxy: speak mTLS to it and check that its certificate
    /// names this workload identity (a SPIFFE ID).
    pub tls: Option<Arc<str>>,
}

/// Where the request's attempts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Balanced over the policy's backends.
    Balanced,
    /// The local app of an inbound listener (its only backend; `None` when the
    /// connection was redirected from one of the proxy's own ports).
    App(Option<SocketAddr>),
    /// Nobody governs it: where it was going, untouched.
    Passthrough(SocketAddr),
    /// The route's fallback backend.
    FallbackBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No head yet.
    New,
    /// Routed, then handed to another engine before governance.
    HandedOff,
    /// Attempts in progress.
    Proxying,
    /// The response is being relayed.
    Relaying,
    /// The proxy's own answer is being written.
    Answering,
    /// Settled.
    Done,
}

/// The `RateLimit-*` response fields: limit, remaining, seconds to reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit: u32,
    pub remaining: u32,
    pub reset: u64,
}

/// One request, from its head to its settlement.
pub struct Exchange<O: Observe> {
    obs: O,
    /// Its count among the requests in flight, given back when it is dropped.
    ticket: Ticket,
    start: Instant,
    state: State,
    direction: Direction,
    /// The snapshot the request was routed by, pinned for its whole life.
    runtime: Option<Handle<Runtime>>,
    routed: Routed,
    verdict: Verdict,
    shadow: Option<Verdict>,
    /// The `traceparent` sent upstream: the caller's, or one started here; with
    /// tracing, one naming the attempt's span.
    traceparent: String,
    /// Set when the traceparent was made here and must replace the caller's
    /// upstream.
    traceparent_generated: bool,
    /// The request's span and its attempts' (tracing on: `Observe::sampler`).
    trace: Option<trace::RequestTrace>,
    target: Target,
    /// Backends tried so far, by index (bounded by [`MAX_ATTEMPTS`]).
    tried: Vec<usize>,
    /// The backend of the last attempt.
    backend: Option<usize>,
    /// Attempts made, all kinds (bounded by [`MAX_ATTEMPTS`]).
    attempts: usize,
    /// The attempt in progress: backend index and when it started (for P2C and
    /// outlier detection), settled exactly once.
    attempt: Option<(usize, Instant)>,
    /// The status of the last upstream response seen.
    upstream_status: Option<u16>,
    /// Whether the last attempt failed (connect error, timeout, reset, 5xx).
    last_attempt_failed: bool,
    /// Retries made (beyond the first attempt), bounded by `retries.attempts`.
    retries: u32,
    /// The breaker admission, settled at the end.
    admission: Option<Admission>,
    /// Holds a slot of the route's concurrency limit, released at the end.
    permit: bool,
    rate_headers: Option<RateHeaders>,
    /// The cause a fallback is (being) served for.
    fallback: Option<FallbackCause>,
    /// A gRPC call (by content type): its outcome is its `grpc-status`, and the
    /// proxy's own answers to it are gRPC statuses.
    grpc: bool,
    /// The request's time limit from its start: the route's timeout, shortened by
    /// the client's `grpc-timeout`.
    deadline: Option<Duration>,
    /// A relayed gRPC response's status is still to come, in its trailers: the
    /// attempt is settled at `Finished`.
    grpc_pending: bool,
    /// The proxy's own answer: its HTTP status, and the gRPC status of it.
    answered: Option<(u16, GrpcCode)>,
}

/// The backend index standing for the local app of an inbound listener.
const APP: usize = usize::MAX;

impl<O: Observe> Exchange<O> {
    /// An exchange that counts as in flight (for the drain) until it is dropped.
    pub fn new(obs: O, now: Instant) -> Self {
        let ticket = obs.begin();
        Exchange {
            obs,
            ticket,
            start: now,
            state: State::New,
            direction: Direction::Outbound,
            runtime: None,
            routed: Routed::NoPolicy,
            verdict: Verdict::Allowed,
            shadow: None,
            traceparent: String::new(),
            traceparent_generated: false,
            trace: None,
            target: Target::Balanced,
            tried: Vec::new(),
            backend: None,
            attempts: 0,
            attempt: None,
            upstream_status: None,
            last_attempt_failed: false,
            retries: 0,
            admission: None,
            permit: false,
            rate_headers: None,
            fallback: None,
            grpc: false,
            deadline: None,
            grpc_pending: false,
            answered: None,
        }
    }

    /// When the request arrived.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The governance decision so far.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Whether the head arrived (a stand-in for a refused head never does).
    pub fn arrived(&self) -> bool {
        self.state != State::New
    }

    /// The request may be retried: the engine keeps its body to resend it.
    pub fn may_resend(&self) -> bool {
        self.route().is_some_and(|r| r.route.retries.is_some())
    }

    /// Fields added to a relayed response: `RateLimit-*`, `x-sluice-fallback`.
    pub fn response_headers(&self) -> (Option<RateHeaders>, Option<&'static str>) {
        (self.rate_headers, self.fallback.map(FallbackCause::as_str))
    }

    /// The traceparent to send upstream in place of the caller's, when it was
    /// made here (a trace started here, or with tracing, the attempt's span).
    pub fn generated_traceparent(&self) -> Option<&str> {
        self.traceparent_generated
            .then_some(self.traceparent.as_str())
    }

    /// Whether the request is a gRPC call.
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// The `grpc-timeout` to send upstream in place of the client's: what is left
    /// of the call's deadline at `now` (so the server stops working when the
    /// client stops waiting); `None` for other requests, or without a deadline.
    pub fn upstream_grpc_timeout(&self, now: Instant) -> Option<String> {
        if !self.grpc {
            return None;
        }
        let left = self
            .deadline?
            .saturating_sub(now.saturating_duration_since(self.start));
        Some(grpc::format_timeout(left.max(Duration::from_millis(1))))
    }

    /// The backends the request goes to speak h2c.
    pub fn wants_h2c(&self) -> bool {
        self.endpoints().is_some_and(|e| e.speaks_h2c)
    }

    /// Takes an event, says what to do.
    pub fn on(&mut self, req: &(impl Request + ?Sized), now: Instant, event: Event<'_>) -> Action {
        match (self.state, event) {
            (
                State::New,
                Event::Arrived {
                    runtime,
                    side,
                    original_dst,
                    h2c,
                    undiscovered,
                },
            ) => {
                if let Some(reply) = self.arrive(req, runtime, side, original_dst, undiscovered) {
                    return self.answer(reply);
                }
                if !h2c && self.wants_h2c() {
                    // Before any governance is spent: the engine that can speak
                    // h2c governs it, on this same routing and snapshot.
                    self.state = State::HandedOff;
                    return Action::HandOff;
                }
                self.admit(req, now)
            }
            (State::HandedOff, Event::Resume) => self.admit(req, now),
            (State::Proxying, Event::ConnectFailed { error }) => {
                self.connect_failed(req, now, error)
            }
            (
                State::Proxying,
                Event::Response {
                    status,
                    grpc_status,
                },
            ) => self.response(req, now, status, grpc_status),
            (
                State::Proxying | State::Relaying,
                Event::Broken {
                    timed_out,
                    stale,
                    responding,
                    error,
                },
            ) => self.broken(req, now, timed_out, stale, responding, error),
            (State::Relaying, Event::Failed { .. }) => Action::Abort,
            (State::Done, Event::Failed { .. }) => Action::Done,
            (_, Event::Failed { status, error }) => {
                let failure = reply::Failure::Other(error);
                self.fail(status, failure)
            }
            (State::Done, Event::ClientGone | Event::Finished { .. }) => Action::Done,
            (_, Event::ClientGone) => {
                self.finish(req, now, 0, true, None);
                Action::Done
            }
            (
                _,
                Event::Finished {
                    status,
                    failed,
                    grpc_status,
                },
            ) => {
                self.finish(req, now, status, failed, grpc_status);
                Action::Done
            }
            // Anything else is out of order (an engine's bug): the connection
            // cannot be trusted to go on.
            _ => Action::Abort,
        }
    }

    /// Routing and the trace context; the answer when no policy can take it.
    fn arrive(
        &mut self,
        req: &(impl Request + ?Sized),
        runtime: Handle<Runtime>,
        side: &Side,
        original_dst: Option<SocketAddr>,
        undiscovered: bool,
    ) -> Option<Reply> {
        self.state = State::Proxying;
        self.direction = side.direction;
        self.grpc = crate::runtime::is_grpc(req.header("content-type"));
        let caller = req
            .header("traceparent")
            .filter(|v| trace::trace_id(v).is_some());
        match (
            self.obs.sampler(),
            caller.and_then(|v| std::str::from_utf8(v).ok()),
        ) {
            (Some(sampler), _) => {
                let t = trace::RequestTrace::start(caller, sampler, self.obs.ids(), self.start);
                self.traceparent = t.traceparent(t.span_id);
                self.traceparent_generated = true;
                self.trace = Some(t);
            }
            (None, Some(tp)) => self.traceparent = tp.to_owned(),
            (None, None) => {
                self.traceparent = self.obs.ids().new_traceparent();
                self.traceparent_generated = true;
            }
        }
        if !runtime.loaded() {
            self.verdict = Verdict::NotReady;
            return Some(Reply::not_ready());
        }
        let header = |name: &str| req.header(name);
        let (method, path) = (req.method(), req.path());
        self.routed = match (side.direction, &side.inbound_policy) {
            (Direction::Inbound, Some(name)) => match runtime.policy_index(name) {
                Some(policy) => runtime.route_in_policy(policy, method, path, header),
                None => Routed::NoPolicy,
            },
            (Direction::Inbound, None) => Routed::NoPolicy,
            (Direction::Outbound, _) => match runtime.route(req.host(), method, path, header) {
                // Transparent outbound: no policy claims the Host; try the address the
                // app connected to against the policies' backends.
                Routed::NoPolicy => match original_dst.and_then(|d| runtime.policy_by_backend(d)) {
                    Some(policy) => runtime.route_in_policy(policy, method, path, header),
                    None => Routed::NoPolicy,
                },
                routed => routed,
            },
        };
        self.runtime = Some(runtime);
        let client_deadline = self
            .grpc
            .then(|| req.header("grpc-timeout").and_then(grpc::parse_timeout))
            .flatten();
        self.deadline = match (self.route().and_then(|r| r.route.timeout), client_deadline) {
            (Some(route), Some(client)) => Some(route.min(client)),
            (route, client) => route.or(client),
        };
        let unclaimed = self.routed == Routed::NoPolicy;
        self.target = match side.direction {
            // The local app is an inbound listener's only backend, whatever the
            // policy lists (and where ungoverned inbound traffic goes).
            Direction::Inbound => match side.app_address(original_dst) {
                Some(app) if unclaimed => Target::Passthrough(app),
                app => Target::App(app),
            },
            Direction::Outbound => match original_dst {
                Some(dst) if unclaimed => Target::Passthrough(dst),
                _ => Target::Balanced,
            },
        };
        // Unclaimed traffic with nowhere to go is a 404.
        if unclaimed && !matches!(self.target, Target::Passthrough(_)) {
            self.verdict = Verdict::NoPolicy;
            if undiscovered {
                return Some(Reply::undiscovered(req.host()));
            }
            return Some(Reply::no_policy(side.inbound_policy.as_deref(), req.host()));
        }
        // Before any engine hand-off and any governance: a caller refused here
        // spends no rate-limit token, breaker probe or concurrency slot.
        self.authorize(req, side)
    }

    /// After routing: passthrough, 404s, then governance and the first attempt.
    fn admit(&mut self, req: &(impl Request + ?Sized), now: Instant) -> Action {
        self.state = State::Proxying;
        match self.routed {
            Routed::NoPolicy => {
                // Nobody governs it (`arrive` answered it unless it goes somewhere):
                // forward untouched (and count it), never drop it.
                self.verdict = Verdict::Passthrough;
                self.obs.passthrough(self.direction);
                self.next_attempt(req, now, false)
            }
            Routed::NoRoute { .. } => {
                self.verdict = Verdict::NoRoute;
                let name = self.policy().map_or("", |p| p.name.as_str());
                let reply = Reply::no_route(name, req.method(), req.path());
                self.answer(reply)
            }
            Routed::Route { .. } => match self.govern(req, now) {
                Ok(()) => self.next_attempt(req, now, false),
                Err(refusal) => match self.refuse(refusal) {
                    Some(reply) => self.answer(reply),
                    None => self.next_attempt(req, now, false),
                },
            },
        }
    }

    fn policy(&self) -> Option<&PolicyRuntime> {
        policy_of(self.runtime.as_ref()?, self.routed)
    }

    fn route(&self) -> Option<&RouteRuntime> {
        route_of(self.runtime.as_ref()?, self.routed)
    }

    /// The backends the request goes to: its route's own, else its policy's. Every
    /// pick, outcome and label of a backend index goes through here, since an index
    /// means something only in the set it was picked from.
    fn endpoints(&self) -> Option<&Arc<Endpoints>> {
        let policy = self.policy()?;
        Some(match self.routed {
            Routed::Route { route, .. } => policy.endpoints_of(route),
            Routed::NoRoute { .. } | Routed::NoPolicy => &policy.endpoints,
        })
    }

    /// The last attempt's backend, as labels and the access log name it.
    fn backend_label(&self) -> Option<&str> {
        match (self.backend?, self.target) {
            (_, Target::FallbackBackend) => None,
            (APP, _) => Some("app"),
            (i, _) => self.endpoints()?.targets.get(i).map(|t| t.label.as_str()),
        }
    }
}

/// The policy a request was routed to, in the snapshot it was routed by.
fn policy_of(runtime: &Runtime, routed: Routed) -> Option<&PolicyRuntime> {
    match routed {
        Routed::NoRoute { policy } | Routed::Route { policy, .. } => runtime.policies.get(policy),
        Routed::NoPolicy => None,
    }
}

/// The route a request was routed to, in the snapshot it was routed by.
fn route_of(runtime: &Runtime, routed: Routed) -> Option<&RouteRuntime> {
    match routed {
        Routed::Route { policy, route } => runtime.policies.get(policy)?.routes.get(route),
        _ => None,
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// What a request is keyed by (rate-limit keys, consistent hashing): a header's
/// value (empty when absent: such requests share one key), or the client's IP.
fn request_key(req: &(impl Request + ?Sized), key: &Key) -> String {
    match key {
        Key::Header(name) => req
            .header(name.as_str())
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("")
            .to_owned(),
        Key::ClientIp => req.client_ip().map(|ip| ip.to_string()).unwrap_or_default(),
    }
}

/// Methods RFC 9110 calls idempotent: resent or retried after a broken exchange.
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}
