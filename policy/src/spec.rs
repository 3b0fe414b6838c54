//! The wire format: what a policy author writes, exactly as YAML deserializes it.
//!
//! These types accept any well-formed document shape and reject unknown fields; the
//! checks on values (ranges, cross-field rules) live in `validate`, which turns a
//! spec into the model. Nothing outside this crate should consume a `*Spec`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only `apiVersion` this crate understands.
pub const API_VERSION: &str = "sluice.dev/v1alpha1";
/// The only `kind` this crate understands.
pub const KIND: &str = "TrafficPolicy";

/// One `TrafficPolicy` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// Always `sluice.dev/v1alpha1`.
    pub api_version: String,
    /// Always `TrafficPolicy`.
    pub kind: String,
    pub metadata: MetadataSpec,
    pub spec: PolicyBodySpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetadataSpec {
    /// Unique policy name (a DNS-1123 label).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Everything that governs one service's traffic.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyBodySpec {
    /// Host / :authority values governed by this policy (the port is ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// `enforce` (default) or `shadow`: in shadow mode mechanisms only record what they would do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ModeSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    /// Connection-level governance of opaque (non-HTTP) TCP to this policy's
    /// backends (outbound) or to the app (an inbound policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSpec>,
    /// Routes, first match wins; a request that matches none is answered 404.
    /// Without routes, one implicit route named `default` matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Whether callers of an inbound policy must come over mutual TLS; absent: the
    /// proxy's mesh-wide default (`sluice-proxy --mtls-mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// Which callers (by workload identity: the ServiceAccount of an mTLS caller)
    /// may call which routes of an inbound policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationSpec>,
}

/// `spec.mtls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// `strict`: plaintext callers are refused (403); `permissive`: both are served.
    pub mode: MtlsModeSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MtlsModeSpec {
    Strict,
    Permissive,
}

/// `spec.authorization`: rules that allow callers; whoever no rule allows gets
/// `default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationSpec {
    /// What a caller no rule allows gets: `deny` (the default: listing who may
    /// call means nobody else may) or `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<AuthorizationDefaultSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthorizationRuleSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthorizationDefaultSpec {
    Allow,
    Deny,
}

/// One rule: callers `from` these identities may call these `routes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRuleSpec {
    pub from: AuthorizationFromSpec,
    /// Route names of this policy; absent: every route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<String>>,
}

/// Who a rule allows: any listed ServiceAccount, or anyone in a listed namespace
/// (at least one entry).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationFromSpec {
    /// `namespace/name` of a Kubernetes ServiceAccount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ModeSpec {
    Enforce,
    Shadow,
}

/// One backend: an `address`, or a Kubernetes `service` with its `port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    /// `host:port`; give either this or `service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// A Kubernetes Service: `name` (in the policy's namespace) or `name.namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The Service port, by number (1..=65535) or by name; required with `service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSpec>,
    /// Relative weight, 0..=10000 (0 drains the backend); default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// `http1` (default) or `h2c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolSpec>,
    /// The backend is meshed: speak mTLS to it and expect this identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTlsSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTlsSpec {
    /// The workload identity its certificate must name:
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub identity: String,
}

/// A port by number or by name, as a Kubernetes Service port is referred to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PortSpec {
    Number(i64),
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolSpec {
    Http1,
    H2c,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<AlgorithmSpec>,
    /// `header:NAME` or `client-ip`; consistent-hash only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// Ramp a new or recovered backend's weight up over this duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<DurationSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AlgorithmSpec {
    WeightedRoundRobin,
    P2cEwma,
    ConsistentHash,
}

/// A duration with a unit: `250ms`, `30s`, `5m`, kept as written.
///
/// A bare number deserializes too (as its text), so `timeout: 30` is reported by
/// validation as "expected a duration with a unit" rather than as a type error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct DurationSpec(
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h)$"))] pub String,
);

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(i64),
            Float(f64),
        }
        Ok(DurationSpec(match Raw::deserialize(d)? {
            Raw::Text(s) => s,
            Raw::Int(i) => i.to_string(),
            Raw::Float(f) => f.to_string(),
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// The path of an HTTP `GET` check (2xx or 3xx passes; over HTTP/2 to h2c
    /// backends); give this or `grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A gRPC health check (`grpc.health.v1.Health/Check`, over h2c): passes when
    /// the backend answers `SERVING`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthSpec>,
    pub interval: DurationSpec,
    pub timeout: DurationSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_after: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcHealthSpec {
    /// The service asked about; absent or "": the server as a whole.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    pub consecutive_failures: i64,
    pub eject_for: DurationSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejected_percent: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SloSpec {
    /// Target ratio of non-5xx responses, e.g. 0.999.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySloSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LatencySloSpec {
    pub threshold: DurationSpec,
    pub target: f64,
}

/// `spec.tcp`: limits on opaque TCP connections (protocol detection found no HTTP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSpec {
    /// Longest wait for the destination to accept a connection (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<DurationSpec>,
    /// Most connections open at once (>= 1); further ones are closed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    /// New connections per second (token-bucket refill, > 0, fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_second: Option<f64>,
    /// Bucket size for `connectionsPerSecond` (>= 1; default: the rate, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    /// Absent: the route matches every request.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<MatchSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// A token bucket shared by every replica (through Redis, `sluice-proxy --redis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_rate_limit: Option<GlobalRateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<PrioritySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ModeSpec>,
    /// The gRPC statuses that count as a failed call for this route's gRPC requests
    /// (breaker, outlier detection, `code_class`). Absent: `unknown`,
    /// `deadline-exceeded`, `resource-exhausted`, `internal`, `unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_failures: Option<Vec<GrpcCodeSpec>>,
    /// The route's own backends (same form as the policy's, not empty), instead of
    /// the policy's; balanced under the policy's `loadBalancer`, `healthCheck` and
    /// `outlierDetection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<BackendSpec>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchSpec {
    /// Exact path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Path prefix, on segment boundaries or not (`/orders` matches `/orders2`, as Envoy's prefix does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact header values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// gRPC calls (content type `application/grpc`) to this service, and method if
    /// given; not with `path` or `pathPrefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMatchSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatchSpec {
    /// The fully qualified service, `package.Service` (e.g. `shop.Orders`).
    pub service: String,
    /// One method of it (e.g. `Get`); absent: every method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A gRPC status code by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum GrpcCodeSpec {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetriesSpec {
    pub attempts: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOnSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOnSpec {
    ConnectFailure,
    GatewayError,
    Reset,
    /// gRPC `CANCELLED` (in a trailers-only response; gRPC requests only).
    Cancelled,
    /// gRPC `DEADLINE_EXCEEDED`.
    DeadlineExceeded,
    /// gRPC `INTERNAL`.
    Internal,
    /// gRPC `RESOURCE_EXHAUSTED`.
    ResourceExhausted,
    /// gRPC `UNAVAILABLE`.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSpec {
    pub ratio: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Token refill rate (> 0, fractions allowed).
    pub requests_per_second: f64,
    /// Bucket size (>= 1).
    pub burst: i64,
    /// `header:NAME` or `client-ip`; absent = one bucket for the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Hard cap on tracked keys; required when `key` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalRateLimitSpec {
    /// Token refill rate of the one bucket all replicas share (> 0, fractions allowed).
    pub requests_per_second: f64,
    /// Size of the shared bucket (>= 1).
    pub burst: i64,
    /// `header:NAME` or `client-ip`; absent = one shared bucket for the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Hard cap on the keys each replica tracks; required when `key` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<i64>,
    /// This replica's own bucket, used while Redis cannot be reached (and for the
    /// moment a replica waits for its first share). Absent: the shared rate and burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_unreachable: Option<LocalBucketSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalBucketSpec {
    /// Token refill rate (> 0, fractions allowed).
    pub requests_per_second: f64,
    /// Bucket size (>= 1).
    pub burst: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConcurrencySpec {
    /// Fixed limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// Adaptive limit between min and max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdaptiveSpec {
    pub min: i64,
    pub max: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call: Option<SlowCallSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<DurationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_requests: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlowCallSpec {
    pub threshold: DurationSpec,
    pub ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Serve from this `host:port` instead of a static response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Causes served by the fallback; absent = all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<FallbackCauseSpec>,
    /// What gRPC requests get instead (a trailers-only response with this status);
    /// absent: the cause's own code (`resource-exhausted` for limits and
    /// overload, `unavailable` for an open breaker or upstream errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcCodeSpec>,
    /// The `grpc-message` with it; absent: `body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackCauseSpec {
    BreakerOpen,
    RateLimited,
    Overloaded,
    UpstreamError,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrioritySpec {
    /// Request header carrying the priority class.
    pub header: String,
    /// Classes shed first when the route is overloaded.
    pub shed_first: Vec<String>,
}
