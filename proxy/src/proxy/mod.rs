//! The request flow, engine-agnostic. Two HTTP engines run it: pingora's
//! `ProxyHttp` phases ([`phases`](self::phases), pingora: h2c, upgrades, chunked request
//! bodies, everything) and Sluice's own HTTP/1.1 fast path (`h1`: the common
//! keep-alive request, handing anything else to pingora). Both ask the same questions
//! here: [`SluiceProxy::admit`] (route, then govern), [`SluiceProxy::choose_peer`],
//! what to do after a failed connect, a 5xx or a broken exchange, what to answer
//! when everything failed, and [`SluiceProxy::finish`], which settles the request's
//! outcome with the components and turns the `Ctx` into metrics and one access-log line.
//!
//! Governance order, cheapest refusal first: rate limit, circuit breaker,
//! concurrency limit. A refusal is served by the route's fallback when its `on` lists
//! the cause, else answered 429/503. In shadow mode nothing is refused: what would
//! have happened is counted (`mode="shadow"`) and logged as `shadow_decision`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use sluice_policy::{FallbackAction, FallbackCause, Key, Mode, Protocol, RetryOn};

use crate::accesslog::{self, AccessRecord, Timestamp};
use crate::breaker::{Admission, Transition};
use crate::metrics::{code_class, code_class_index, Metrics};
use crate::ratelimit::Decision as Limit;
use crate::runtime::{PolicyRuntime, RouteRuntime, Routed, Runtime};
use crate::trace::{self, IdGenerator};

mod flow;
mod govern;
mod phases;

pub use flow::{Admit, ExchangeFailure, Failure, Peer, Reply, StatusVerdict};

/// How long a connection attempt to a backend may take before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled upstream connection is kept.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// State shared by every request of a listener and by the admin and reload tasks.
pub struct Shared {
    pub runtime: Arc<ArcSwapOption<Runtime>>,
    pub metrics: Metrics,
    pub ids: IdGenerator,
    /// Requests between `new_ctx` and the end of `finish`; the drain waits for 0.
    pub inflight: AtomicUsize,
    pub access_log: accesslog::AccessLog,
    /// Redis reachability and the sync task's wake-up, for the global rate limits.
    pub globals: Arc<crate::globallimit::GlobalLimits>,
}

#[derive(Clone)]
pub struct SluiceProxy {
    pub shared: Arc<Shared>,
    /// `outbound` or `inbound`: the access log's and metrics' `direction`.
    pub direction: &'static str,
    /// Inbound listener: every request is governed by this policy, whatever its Host...
    pub inbound_policy: Option<String>,
    /// ...and goes to the local app at this address.
    pub inbound_app: Option<SocketAddr>,
    /// Connections arrive by iptables REDIRECT: use their original destination.
    pub transparent: bool,
    /// The proxy's own listening ports (proxy, inbound, admin, telemetry): inbound
    /// traffic redirected from one of them is never delivered to 127.0.0.1 at that
    /// port, where it would reach the proxy itself (the loopback-only admin
    /// listener's `/config_dump` among it) from outside the pod.
    pub own_ports: Vec<u16>,
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
    pub(crate) start: Instant,
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
    pub(crate) rate_headers: Option<(u32, u32, u64)>,
    /// The breaker admission to settle in `logging`.
    admission: Option<Admission>,
    /// Holds a slot of the route's concurrency limit, released in `logging`.
    permit: bool,
    /// Retries made (beyond the first attempt), bounded by `retries.attempts`.
    retries: u32,
    /// The cause a fallback is (being) served for.
    pub(crate) fallback: Option<FallbackCause>,
    /// The next `upstream_peer` goes to the fallback backend.
    to_fallback_backend: bool,
    /// The attempt in progress: backend index and when it started (for P2C and
    /// outlier detection), settled exactly once.
    attempt: Option<(usize, Instant)>,
    /// Transparent mode: where the client was really connecting to.
    pub(crate) original_dst: Option<SocketAddr>,
    /// Unclaimed transparent traffic goes here, ungoverned.
    passthrough: Option<SocketAddr>,
    _inflight: InflightGuard,
}

impl Ctx {
    pub(crate) fn policy(&self) -> Option<&PolicyRuntime> {
        let rt = self.runtime.as_ref()?;
        match self.routed {
            Routed::NoRoute { policy } | Routed::Route { policy, .. } => rt.policies.get(policy),
            Routed::NoPolicy => None,
        }
    }

    pub(crate) fn route(&self) -> Option<&RouteRuntime> {
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

pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}
