//! The validated policy model. Every value here has passed `validate`; the data
//! plane uses these types as they are and never re-checks them.

use std::fmt;
use std::time::Duration;

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
    pub backends: Vec<Backend>,
    pub load_balancer: LoadBalancer,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
    pub slo: Option<Slo>,
    /// First match wins. Never empty: a policy written without routes has one
    /// [`Route::catch_all`] named [`DEFAULT_ROUTE`].
    pub routes: Vec<Route>,
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
    pub address: Address,
    /// 0..=10000; 0 drains the backend.
    pub weight: u32,
    pub protocol: Protocol,
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
    pub path: String,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Upper-case method names; empty = any method.
    pub methods: Vec<String>,
    /// (lower-case name, exact value), sorted by name.
    pub headers: Vec<(String, String)>,
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
        }
    }

    /// The mode in force for this route: its own override, else the policy's.
    pub fn effective_mode(&self, policy_mode: Mode) -> Mode {
        self.mode.unwrap_or(policy_mode)
    }
}
