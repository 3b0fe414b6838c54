//! The validated policy model. Every value here has passed `validate`; the data
//! plane uses these types as they are and never re-checks them.

use std::fmt;
use std::time::Duration;

mod access;
pub use access::*;

/// Every policy loaded from one source, in load order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicySet {
    pub policies: Vec<TrafficPolicy>,
}

impl PolicySet {
    pub fn get(&self, name: &str) -> Option<&TrafficPolicy> {
        self.policies.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrafficPolicy {
    pub name: String,
    pub namespace: Option<String>,
    /// Lower-cased, without port.
    pub hosts: Vec<String>,
    pub mode: Mode,
    /// May be empty: an inbound policy's requests go to the app, and a route with
    /// backends of its own does not use these.
    pub backends: Vec<Backend>,
    pub load_balancer: LoadBalancer,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
    pub slo: Option<Slo>,
    /// Limits on opaque TCP connections this policy governs (`spec.tcp`).
    pub tcp: Option<TcpLimits>,
    /// First match wins. Never empty: a policy written without routes has one
    /// [`Route::catch_all`] named [`DEFAULT_ROUTE`].
    pub routes: Vec<Route>,
    /// `spec.mtls.mode`; `None`: the proxy's mesh-wide default.
    pub mtls: Option<MtlsMode>,
    /// `spec.authorization`; `None`: every caller may call every route.
    pub authorization: Option<Authorization>,
}

/// A policy's identity: `namespace/name`, or `name` for a policy written without a
/// namespace (a file outside Kubernetes). The same name in two namespaces is two
/// policies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    pub namespace: Option<String>,
    pub name: String,
}

impl PolicyId {
    /// Reads `namespace/name` or `name` (as [`fmt::Display`] writes it).
    pub fn parse(text: &str) -> PolicyId {
        match text.split_once('/') {
            Some((namespace, name)) => PolicyId {
                namespace: Some(namespace.to_owned()),
                name: name.to_owned(),
            },
            None => PolicyId {
                namespace: None,
                name: text.to_owned(),
            },
        }
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{namespace}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl TrafficPolicy {
    pub fn id(&self) -> PolicyId {
        PolicyId {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// `host:port`, as written (the host may be a name or an IP literal).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Where a proxy dials the backend by name. For a [`Backend::service`], the
    /// Service's cluster DNS name and port (`NAME.NAMESPACE.svc.cluster.local:PORT`,
    /// its ClusterIP), see [`ServiceRef::address`]; port 0 when the Service port is
    /// named, since no name says which number it is: such a backend has no address
    /// to dial ([`Backend::dialable_address`] is `None`) and gets its endpoints only
    /// from the control plane.
    pub address: Address,
    /// 0..=10000; 0 drains the backend.
    pub weight: u32,
    pub protocol: Protocol,
    /// The Kubernetes Service the backend was written as; `None` for an `address`.
    pub service: Option<ServiceRef>,
    /// A meshed backend: the identity it must prove over mTLS.
    pub tls: Option<BackendTls>,
}

impl Backend {
    /// The address to dial by name; `None` for a Service reached through a named
    /// port, whose number only the Service's endpoints know.
    pub fn dialable_address(&self) -> Option<&Address> {
        (self.address.port != 0).then_some(&self.address)
    }
}

/// A Kubernetes Service as a backend: `name` or `name.namespace`, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    /// A DNS-1035 label.
    pub name: String,
    /// A DNS-1123 label; `None`: the policy's own namespace.
    pub namespace: Option<String>,
    pub port: ServicePort,
}

/// The namespace of a Service named without one, in a policy that has none either
/// (a policy file without `metadata.namespace`): Kubernetes' own default, where
/// `kubectl` would look too.
pub const DEFAULT_NAMESPACE: &str = "default";

impl ServiceRef {
    /// The namespace the Service lives in, given the policy's.
    pub fn namespace_in<'a>(&'a self, policy_namespace: Option<&'a str>) -> &'a str {
        self.namespace
            .as_deref()
            .or(policy_namespace)
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    /// The address a proxy dials without the control plane's endpoints: the
    /// Service's ClusterIP through cluster DNS. Port 0 for a named port (see
    /// [`Backend::address`]).
    pub fn address(&self, policy_namespace: Option<&str>) -> Address {
        Address {
            host: format!(
                "{}.{}.svc.cluster.local",
                self.name,
                self.namespace_in(policy_namespace)
            ),
            port: match self.port {
                ServicePort::Number(n) => n,
                ServicePort::Name(_) => 0,
            },
        }
    }
}

/// As written: `name`, or `name.namespace`.
impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}.{ns}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A Service port, by number or by name (an IANA_SVC_NAME such as `http`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServicePort::Number(n) => write!(f, "{n}"),
            ServicePort::Name(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Http1,
    H2c,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LoadBalancer {
    pub algorithm: Algorithm,
    pub slow_start: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    #[default]
    WeightedRoundRobin,
    P2cEwma,
    ConsistentHash {
        hash_on: Key,
    },
}

/// What a request is keyed by, for keyed limits and consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A request header, by lower-case name.
    Header(String),
    ClientIp,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Header(name) => write!(f, "header:{name}"),
            Key::ClientIp => f.write_str("client-ip"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// The path of an HTTP `GET` check (over HTTP/2 to h2c backends); "" with `grpc`.
    pub path: String,
    /// A gRPC health check instead (`grpc.health.v1.Health/Check` of this service,
    /// "" for the server as a whole): passed when the backend answers `SERVING`.
    pub grpc: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub eject_for: Duration,
    pub max_ejected_percent: u8,
}

/// `spec.tcp`: connection-level governance of opaque TCP.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpLimits {
    pub connect_timeout: Duration,
    pub max_connections: Option<u32>,
    /// New connections per second as a token bucket (`key` is always `None`).
    pub connection_rate: Option<RateLimit>,
}

impl TcpLimits {
    /// What a policy without `connectTimeout` waits: as long as an HTTP attempt.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
}

#[derive(Debug, Clone, PartialEq)]
pub struct Slo {
    pub availability: Option<f64>,
    pub latency: Option<LatencySlo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LatencySlo {
    pub threshold: Duration,
    pub target: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub rate_limit: Option<RateLimit>,
    pub global_rate_limit: Option<GlobalRateLimit>,
    pub concurrency: Option<Concurrency>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub fallback: Option<Fallback>,
    pub priority: Option<Priority>,
    /// The route's own override; `None` inherits the policy's mode.
    pub mode: Option<Mode>,
    /// The gRPC statuses that count as a failed call (breaker, outlier detection,
    /// `code_class`) for this route's gRPC requests; [`GrpcCode::FAILURES`] unless set.
    pub grpc_failures: Vec<GrpcCode>,
    /// The route's own backends (never empty), balanced apart from the policy's
    /// under the policy's `loadBalancer`, `healthCheck` and `outlierDetection`;
    /// `None`: the policy's backends.
    pub backends: Option<Vec<Backend>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Upper-case method names; empty = any method.
    pub methods: Vec<String>,
    /// (lower-case name, exact value), sorted by name.
    pub headers: Vec<(String, String)>,
    /// Only gRPC requests (by content type) to this service (and method); the
    /// path is then `/SERVICE/METHOD` (or `/SERVICE/` as a prefix) and `path` is `Any`.
    pub grpc: Option<GrpcMatch>,
}

impl RouteMatch {
    /// The paths this route matches: `path`, or the gRPC method's.
    pub fn effective_path(&self) -> PathMatch {
        match &self.grpc {
            Some(GrpcMatch {
                service,
                method: Some(method),
            }) => PathMatch::Exact(format!("/{service}/{method}")),
            Some(GrpcMatch {
                service,
                method: None,
            }) => PathMatch::Prefix(format!("/{service}/")),
            None => self.path.clone(),
        }
    }
}

/// A gRPC service (fully qualified, `shop.Orders`) and optionally one method.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrpcMatch {
    pub service: String,
    pub method: Option<String>,
}

/// A gRPC status code (grpc/doc/statuscodes.md), by its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    pub const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// What counts as a failed call unless a route says otherwise: the server or
    /// the path to it failed, not the caller (the codes Envoy's and Linkerd's gRPC
    /// failure accrual treat as server errors).
    pub const FAILURES: [GrpcCode; 5] = [
        GrpcCode::Unknown,
        GrpcCode::DeadlineExceeded,
        GrpcCode::ResourceExhausted,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
    ];

    /// The code numbered `n`; numbers gRPC does not define are `UNKNOWN`, as the
    /// gRPC libraries read them.
    pub fn from_number(n: u32) -> GrpcCode {
        usize::try_from(n)
            .ok()
            .and_then(|i| GrpcCode::ALL.get(i).copied())
            .unwrap_or(GrpcCode::Unknown)
    }

    /// As policies write it: `deadline-exceeded`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrpcCode::Ok => "ok",
            GrpcCode::Cancelled => "cancelled",
            GrpcCode::Unknown => "unknown",
            GrpcCode::InvalidArgument => "invalid-argument",
            GrpcCode::DeadlineExceeded => "deadline-exceeded",
            GrpcCode::NotFound => "not-found",
            GrpcCode::AlreadyExists => "already-exists",
            GrpcCode::PermissionDenied => "permission-denied",
            GrpcCode::ResourceExhausted => "resource-exhausted",
            GrpcCode::FailedPrecondition => "failed-precondition",
            GrpcCode::Aborted => "aborted",
            GrpcCode::OutOfRange => "out-of-range",
            GrpcCode::Unimplemented => "unimplemented",
            GrpcCode::Internal => "internal",
            GrpcCode::Unavailable => "unavailable",
            GrpcCode::DataLoss => "data-loss",
            GrpcCode::Unauthenticated => "unauthenticated",
        }
    }

    /// The code written as policies write it, or as its number.
    pub fn parse(text: &str) -> Option<GrpcCode> {
        if let Ok(n) = text.parse::<u32>() {
            return (n <= 16).then(|| GrpcCode::from_number(n));
        }
        let wanted = text.to_ascii_lowercase().replace('_', "-");
        GrpcCode::ALL.into_iter().find(|c| c.as_str() == wanted)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum PathMatch {
    #[default]
    Any,
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retries {
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub budget: RetryBudget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    ConnectFailure,
    GatewayError,
    Reset,
    /// A gRPC response whose status (in its head: a trailers-only response) is
    /// this code; only gRPC requests.
    Grpc(GrpcCode),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudget {
    /// Retries allowed as a fraction of recent requests.
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    pub min_per_second: f64,
}

impl Default for RetryBudget {
    /// Linkerd's defaults: 20% extra load, at least 10 retries/s.
    fn default() -> Self {
        RetryBudget {
            ratio: 0.2,
            min_per_second: 10.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: Option<KeyedLimit>,
}

/// A token bucket shared by every replica through Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalRateLimit {
    /// The shared bucket (and its key, if per key).
    pub shared: RateLimit,
    /// This replica's own bucket while Redis cannot be reached; same key as `shared`.
    pub when_unreachable: RateLimit,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyedLimit {
    pub key: Key,
    pub max_keys: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Concurrency {
    Fixed { max: u32 },
    Adaptive { min: u32, max: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    pub consecutive_failures: Option<u32>,
    pub error_ratio: Option<f64>,
    pub slow_call: Option<SlowCall>,
    pub window: Duration,
    pub min_requests: u32,
    pub open_for: Duration,
    pub half_open_requests: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SlowCall {
    pub threshold: Duration,
    pub ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fallback {
    pub action: FallbackAction,
    pub on: Vec<FallbackCause>,
    /// What a gRPC request gets instead of the static response (a gRPC client
    /// cannot read it): this status, else the code of the cause.
    pub grpc_status: Option<GrpcCode>,
    /// The `grpc-message` with it; else the static body.
    pub grpc_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FallbackAction {
    Static {
        status: u16,
        /// (lower-case name, value), sorted by name.
        headers: Vec<(String, String)>,
        body: String,
    },
    Backend(Address),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FallbackCause {
    BreakerOpen,
    RateLimited,
    Overloaded,
    UpstreamError,
}

impl FallbackCause {
    pub const ALL: [FallbackCause; 4] = [
        FallbackCause::BreakerOpen,
        FallbackCause::RateLimited,
        FallbackCause::Overloaded,
        FallbackCause::UpstreamError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FallbackCause::BreakerOpen => "breaker-open",
            FallbackCause::RateLimited => "rate-limited",
            FallbackCause::Overloaded => "overloaded",
            FallbackCause::UpstreamError => "upstream-error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Priority {
    /// Lower-case header name.
    pub header: String,
    pub shed_first: Vec<String>,
}

/// The name of the route a policy without `routes` is given.
pub const DEFAULT_ROUTE: &str = "default";

impl Route {
    /// A route that matches every request and adds no mechanism of its own: its
    /// requests go to the policy's backends under the policy-level settings only.
    pub fn catch_all(name: impl Into<String>) -> Route {
        Route {
            name: name.into(),
            matcher: RouteMatch::default(),
            timeout: None,
            retries: None,
            rate_limit: None,
            global_rate_limit: None,
            concurrency: None,
            circuit_breaker: None,
            fallback: None,
            priority: None,
            mode: None,
            grpc_failures: GrpcCode::FAILURES.to_vec(),
            backends: None,
        }
    }

    /// The backends this route's requests go to: its own, else the policy's.
    pub fn effective_backends<'a>(&'a self, policy: &'a [Backend]) -> &'a [Backend] {
        self.backends.as_deref().unwrap_or(policy)
    }

    /// The mode in force for this route: its own override, else the policy's.
    pub fn effective_mode(&self, policy_mode: Mode) -> Mode {
        self.mode.unwrap_or(policy_mode)
    }
}
