//! `*Spec` -> model: every value check and every cross-field rule inside one policy.
//! Rules that span policies (duplicate names, hosts claimed twice) live in `load`.
//!
//! Checks accumulate: a document with five mistakes reports five violations, so an
//! author fixes them in one pass instead of five.

mod access;
mod backends;

use std::time::Duration;

use crate::duration;
use crate::error::{Problem, Violation};
use crate::model::*;
use crate::spec::*;

/// Collects violations while converting; each helper returns a usable placeholder so
/// that checking can go on after the first mistake.
struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    fn fail(&mut self, path: impl Into<String>, problem: Problem) {
        self.violations.push(Violation::new(path, problem));
    }

    fn int_range(&mut self, path: &str, value: i64, min: i64, max: i64) -> u32 {
        if value < min || value > max {
            let problem = if max == i64::from(u32::MAX) {
                Problem::TooSmall {
                    min: min.to_string(),
                    got: value.to_string(),
                }
            } else {
                Problem::OutOfRange {
                    min: min.to_string(),
                    max: max.to_string(),
                    got: value.to_string(),
                }
            };
            self.fail(path, problem);
            return min.max(0) as u32;
        }
        value as u32
    }

    fn at_least(&mut self, path: &str, value: i64, min: i64) -> u32 {
        self.int_range(path, value, min, i64::from(u32::MAX))
    }

    fn ratio(&mut self, path: &str, value: f64) -> f64 {
        if !(0.0..=1.0).contains(&value) {
            self.fail(
                path,
                Problem::OutOfRange {
                    min: "0".into(),
                    max: "1".into(),
                    got: value.to_string(),
                },
            );
            return 0.0;
        }
        value
    }

    fn duration(&mut self, path: &str, text: &DurationSpec) -> Duration {
        let text = text.0.as_str();
        match duration::parse(text) {
            Some(d) if !d.is_zero() => d,
            Some(_) => {
                self.fail(
                    path,
                    Problem::TooSmall {
                        min: "1ms".into(),
                        got: text.into(),
                    },
                );
                Duration::from_secs(1)
            }
            None => {
                self.fail(path, Problem::BadDuration { got: text.into() });
                Duration::from_secs(1)
            }
        }
    }

    fn address(&mut self, path: &str, text: &str) -> Address {
        parse_address(text).unwrap_or_else(|| {
            self.fail(path, Problem::BadAddress { got: text.into() });
            Address {
                host: String::new(),
                port: 0,
            }
        })
    }

    fn key(&mut self, path: &str, text: &str) -> Key {
        if text == "client-ip" {
            return Key::ClientIp;
        }
        match text.strip_prefix("header:") {
            Some(name) if is_header_name(name) => Key::Header(name.to_ascii_lowercase()),
            _ => {
                self.fail(path, Problem::BadKey { got: text.into() });
                Key::ClientIp
            }
        }
    }

    fn header_name(&mut self, path: &str, name: &str) -> String {
        if !is_header_name(name) {
            self.fail(
                path,
                Problem::BadValue {
                    expected: "an HTTP header name".into(),
                    got: name.into(),
                },
            );
        }
        name.to_ascii_lowercase()
    }
}

/// `host:port` or `[v6]:port`.
pub fn parse_address(text: &str) -> Option<Address> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        (host, port)
    } else {
        text.rsplit_once(':')?
    };
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    valid_host.then(|| Address {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// RFC 9110 token characters.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// DNS-1123 label, as Kubernetes requires of object names.
use crate::identity::is_dns_label;

fn mode(spec: ModeSpec) -> Mode {
    match spec {
        ModeSpec::Enforce => Mode::Enforce,
        ModeSpec::Shadow => Mode::Shadow,
    }
}

impl TryFrom<&TrafficPolicySpec> for TrafficPolicy {
    type Error = Vec<Violation>;

    fn try_from(doc: &TrafficPolicySpec) -> Result<Self, Self::Error> {
        let mut c = Checker {
            violations: Vec::new(),
        };
        if doc.api_version != API_VERSION {
            c.fail(
                "apiVersion",
                Problem::BadValue {
                    expected: API_VERSION.into(),
                    got: doc.api_version.clone(),
                },
            );
        }
        if doc.kind != KIND {
            c.fail(
                "kind",
                Problem::BadValue {
                    expected: KIND.into(),
                    got: doc.kind.clone(),
                },
            );
        }
        if !is_dns_label(&doc.metadata.name) {
            c.fail(
                "metadata.name",
                Problem::BadValue {
                    expected: "a DNS-1123 label (lower-case letters, digits, '-', at most 63)"
                        .into(),
                    got: doc.metadata.name.clone(),
                },
            );
        }
        let policy = body(&mut c, &doc.spec, &doc.metadata);
        if c.violations.is_empty() {
            Ok(policy)
        } else {
            Err(c.violations)
        }
    }
}

fn body(c: &mut Checker, spec: &PolicyBodySpec, meta: &MetadataSpec) -> TrafficPolicy {
    let mut hosts: Vec<String> = Vec::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        let bare = host_without_port(host).to_ascii_lowercase();
        if bare.is_empty()
            || !bare
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_' | '*'))
        {
            c.fail(
                &path,
                Problem::BadValue {
                    expected: "a host name".into(),
                    got: host.clone(),
                },
            );
        } else if let Some(first) = hosts.iter().position(|h| *h == bare) {
            c.fail(
                &path,
                Problem::Duplicate {
                    what: "host",
                    name: bare,
                    first: format!("at spec.hosts[{first}]"),
                },
            );
        } else {
            hosts.push(bare);
        }
    }

    let namespace = meta.namespace.as_deref();
    let backends = backends::backends(c, "spec.backends", &spec.backends, namespace);

    let load_balancer = spec
        .load_balancer
        .as_ref()
        .map(|lb| load_balancer(c, lb))
        .unwrap_or_default();
    let health_check = spec.health_check.as_ref().map(|h| health_check(c, h));
    let outlier_detection = spec.outlier_detection.as_ref().map(|o| OutlierDetection {
        consecutive_failures: c.at_least(
            "spec.outlierDetection.consecutiveFailures",
            o.consecutive_failures,
            1,
        ),
        eject_for: c.duration("spec.outlierDetection.ejectFor", &o.eject_for),
        max_ejected_percent: c.int_range(
            "spec.outlierDetection.maxEjectedPercent",
            o.max_ejected_percent.unwrap_or(50),
            0,
            100,
        ) as u8,
    });
    let slo = spec.slo.as_ref().map(|s| slo(c, s));
    let tcp = spec.tcp.as_ref().map(|t| tcp(c, t));

    let mut routes: Vec<Route> = Vec::new();
    for (i, r) in spec.routes.iter().enumerate() {
        let route = route(c, &format!("spec.routes[{i}]"), r, namespace);
        if let Some(first) = routes.iter().position(|x| x.name == route.name) {
            c.fail(
                format!("spec.routes[{i}].name"),
                Problem::Duplicate {
                    what: "route name",
                    name: route.name.clone(),
                    first: format!("at spec.routes[{first}]"),
                },
            );
        }
        routes.push(route);
    }
    // Without it every request would be answered 404: a policy that only names
    // backends (and how to balance them) means "send everything there".
    if spec.routes.is_empty() {
        routes.push(Route::catch_all(DEFAULT_ROUTE));
    }

    let mtls = spec.mtls.as_ref().map(access::mtls);
    let authorization = spec
        .authorization
        .as_ref()
        .map(|a| access::authorization(c, a, &routes));

    TrafficPolicy {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        hosts,
        mode: spec.mode.map(mode).unwrap_or_default(),
        backends,
        load_balancer,
        health_check,
        outlier_detection,
        slo,
        tcp,
        routes,
        mtls,
        authorization,
    }
}

/// `host`, `host:80`, `[::1]:80` -> the host part.
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    // A byte loop, not `rsplit_once`: host names are short and this runs per request
    // (memrchr's call costs more than the scan).
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => {
            &host[..colon]
        }
        _ => host,
    }
}

fn load_balancer(c: &mut Checker, lb: &LoadBalancerSpec) -> LoadBalancer {
    let hash_on = lb
        .hash_on
        .as_ref()
        .map(|k| c.key("spec.loadBalancer.hashOn", k));
    let algorithm = match (lb.algorithm, hash_on) {
        (Some(AlgorithmSpec::ConsistentHash), Some(hash_on)) => {
            Algorithm::ConsistentHash { hash_on }
        }
        (Some(AlgorithmSpec::ConsistentHash), None) => {
            c.fail(
                "spec.loadBalancer.algorithm",
                Problem::ConsistentHashWithoutHashOn,
            );
            Algorithm::default()
        }
        (_, Some(_)) => {
            c.fail(
                "spec.loadBalancer.hashOn",
                Problem::HashOnWithoutConsistentHash,
            );
            Algorithm::default()
        }
        (Some(AlgorithmSpec::P2cEwma), None) => Algorithm::P2cEwma,
        (Some(AlgorithmSpec::WeightedRoundRobin) | None, None) => Algorithm::WeightedRoundRobin,
    };
    LoadBalancer {
        algorithm,
        slow_start: lb
            .slow_start
            .as_ref()
            .map(|d| c.duration("spec.loadBalancer.slowStart", d)),
    }
}

fn health_check(c: &mut Checker, h: &HealthCheckSpec) -> HealthCheck {
    let path = match (&h.path, &h.grpc) {
        (Some(_), Some(_)) => {
            c.fail("spec.healthCheck.grpc", Problem::PathAndGrpcCheck);
            String::new()
        }
        (None, None) => {
            c.fail("spec.healthCheck", Problem::NoHealthProbe);
            String::new()
        }
        (Some(path), None) => {
            if !path.starts_with('/') {
                c.fail(
                    "spec.healthCheck.path",
                    Problem::BadValue {
                        expected: "a path starting with '/'".into(),
                        got: path.clone(),
                    },
                );
            }
            path.clone()
        }
        (None, Some(_)) => String::new(),
    };
    let grpc = h.grpc.as_ref().map(|g| {
        // A fully qualified service name, or "" for the whole server.
        let valid = g.service.is_empty()
            || g.service.split('.').all(|part| {
                part.starts_with(|ch: char| ch.is_ascii_alphabetic() || ch == '_')
                    && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
        if !valid {
            c.fail(
                "spec.healthCheck.grpc.service",
                Problem::BadValue {
                    expected: "a fully qualified gRPC service such as shop.Orders, or nothing"
                        .into(),
                    got: g.service.clone(),
                },
            );
        }
        g.service.clone()
    });
    let interval = c.duration("spec.healthCheck.interval", &h.interval);
    let timeout = c.duration("spec.healthCheck.timeout", &h.timeout);
    if timeout > interval {
        c.fail(
            "spec.healthCheck.timeout",
            Problem::TooLarge {
                max: format!("the interval ({})", h.interval.0),
                got: h.timeout.0.clone(),
            },
        );
    }
    HealthCheck {
        path,
        grpc,
        interval,
        timeout,
        unhealthy_after: c.at_least(
            "spec.healthCheck.unhealthyAfter",
            h.unhealthy_after.unwrap_or(3),
            1,
        ),
        healthy_after: c.at_least(
            "spec.healthCheck.healthyAfter",
            h.healthy_after.unwrap_or(2),
            1,
        ),
    }
}

fn open_ratio(c: &mut Checker, path: &str, value: f64) -> f64 {
    // An SLO of 0 or 1 makes error budgets meaningless (nothing / infinitely much).
    if !(value > 0.0 && value < 1.0) {
        c.fail(path, Problem::NotOpenRatio { got: value });
        return 0.5;
    }
    value
}

fn tcp(c: &mut Checker, t: &TcpSpec) -> TcpLimits {
    let connect_timeout = t
        .connect_timeout
        .as_ref()
        .map_or(TcpLimits::DEFAULT_CONNECT_TIMEOUT, |d| {
            c.duration("spec.tcp.connectTimeout", d)
        });
    let max_connections = t
        .max_connections
        .map(|m| c.at_least("spec.tcp.maxConnections", m, 1));
    let connection_rate = match (t.connections_per_second, t.burst) {
        (Some(rate), burst) => {
            if !(rate > 0.0 && rate.is_finite()) {
                c.fail(
                    "spec.tcp.connectionsPerSecond",
                    Problem::NotPositive { got: rate },
                );
            } else if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                c.fail(
                    "spec.tcp.connectionsPerSecond",
                    Problem::OutOfRange {
                        min: "0.000001".into(),
                        max: "1000000000".into(),
                        got: format!("{rate:e}"),
                    },
                );
            }
            // Without `burst`, one second's worth of connections (at least one).
            let default_burst = if rate.is_finite() && rate > 1.0 {
                rate.ceil().min(f64::from(u32::MAX)) as i64
            } else {
                1
            };
            let burst = c.at_least("spec.tcp.burst", burst.unwrap_or(default_burst), 1);
            Some(RateLimit {
                requests_per_second: rate,
                burst,
                key: None,
            })
        }
        (None, Some(_)) => {
            c.fail(
                "spec.tcp.burst",
                Problem::Invalid("`burst` only applies with `connectionsPerSecond`".into()),
            );
            None
        }
        (None, None) => None,
    };
    TcpLimits {
        connect_timeout,
        max_connections,
        connection_rate,
    }
}

fn slo(c: &mut Checker, s: &SloSpec) -> Slo {
    Slo {
        availability: s
            .availability
            .map(|a| open_ratio(c, "spec.slo.availability", a)),
        latency: s.latency.as_ref().map(|l| LatencySlo {
            threshold: c.duration("spec.slo.latency.threshold", &l.threshold),
            target: open_ratio(c, "spec.slo.latency.target", l.target),
        }),
    }
}

fn route(c: &mut Checker, at: &str, r: &RouteSpec, namespace: Option<&str>) -> Route {
    if !is_dns_label(&r.name) {
        c.fail(
            format!("{at}.name"),
            Problem::BadValue {
                expected: "a route name of lower-case letters, digits and '-'".into(),
                got: r.name.clone(),
            },
        );
    }
    Route {
        name: r.name.clone(),
        matcher: r
            .matcher
            .as_ref()
            .map(|m| route_match(c, &format!("{at}.match"), m))
            .unwrap_or_default(),
        timeout: r
            .timeout
            .as_ref()
            .map(|t| c.duration(&format!("{at}.timeout"), t)),
        retries: r
            .retries
            .as_ref()
            .map(|x| retries(c, &format!("{at}.retries"), x)),
        rate_limit: r
            .rate_limit
            .as_ref()
            .map(|x| rate_limit(c, &format!("{at}.rateLimit"), x)),
        global_rate_limit: r
            .global_rate_limit
            .as_ref()
            .map(|x| global_rate_limit(c, &format!("{at}.globalRateLimit"), x)),
        concurrency: r
            .concurrency
            .as_ref()
            .map(|x| concurrency(c, &format!("{at}.concurrency"), x)),
        circuit_breaker: r
            .circuit_breaker
            .as_ref()
            .map(|x| circuit_breaker(c, &format!("{at}.circuitBreaker"), x)),
        fallback: r
            .fallback
            .as_ref()
            .map(|x| fallback(c, &format!("{at}.fallback"), x)),
        priority: r.priority.as_ref().map(|p| {
            if p.shed_first.is_empty() {
                c.fail(format!("{at}.priority.shedFirst"), Problem::Empty);
            }
            Priority {
                header: c.header_name(&format!("{at}.priority.header"), &p.header),
                shed_first: p.shed_first.clone(),
            }
        }),
        mode: r.mode.map(mode),
        grpc_failures: match &r.grpc_failures {
            Some(codes) => {
                let mut list: Vec<GrpcCode> = codes.iter().map(|c| grpc_code(*c)).collect();
                list.sort();
                list.dedup();
                list
            }
            None => GrpcCode::FAILURES.to_vec(),
        },
        backends: r.backends.as_ref().map(|list| {
            let at = format!("{at}.backends");
            if list.is_empty() {
                c.fail(&at, Problem::Empty);
            }
            backends::backends(c, &at, list, namespace)
        }),
    }
}

fn route_match(c: &mut Checker, at: &str, m: &MatchSpec) -> RouteMatch {
    let mut check_path = |field: &str, p: &String| {
        if !p.starts_with('/') {
            c.fail(
                format!("{at}.{field}"),
                Problem::BadValue {
                    expected: "a path starting with '/'".into(),
                    got: p.clone(),
                },
            );
        }
        p.clone()
    };
    let path = match (&m.path, &m.path_prefix) {
        (Some(_), Some(_)) => {
            c.fail(format!("{at}.pathPrefix"), Problem::PathAndPrefix);
            PathMatch::Any
        }
        (Some(p), None) => PathMatch::Exact(check_path("path", p)),
        (None, Some(p)) => PathMatch::Prefix(check_path("pathPrefix", p)),
        (None, None) => PathMatch::Any,
    };
    let methods = m
        .methods
        .iter()
        .enumerate()
        .map(|(i, method)| {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                c.fail(
                    format!("{at}.methods[{i}]"),
                    Problem::BadValue {
                        expected: "an HTTP method such as GET or POST".into(),
                        got: method.clone(),
                    },
                );
            }
            method.to_ascii_uppercase()
        })
        .collect();
    let headers = m
        .headers
        .iter()
        .map(|(name, value)| {
            (
                c.header_name(&format!("{at}.headers.{name}"), name),
                value.clone(),
            )
        })
        .collect();
    let grpc = m.grpc.as_ref().map(|g| {
        if m.path.is_some() || m.path_prefix.is_some() {
            c.fail(format!("{at}.grpc"), Problem::GrpcAndPath);
        }
        // gRPC names: the proto identifier rules, the service dotted by package.
        let ident = |s: &str| {
            s.starts_with(|ch: char| ch.is_ascii_alphabetic() || ch == '_')
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !g.service.split('.').all(ident) {
            c.fail(
                format!("{at}.grpc.service"),
                Problem::BadValue {
                    expected: "a fully qualified gRPC service such as shop.Orders".into(),
                    got: g.service.clone(),
                },
            );
        }
        if let Some(method) = g.method.as_deref().filter(|m| !ident(m)) {
            c.fail(
                format!("{at}.grpc.method"),
                Problem::BadValue {
                    expected: "a gRPC method name such as Get".into(),
                    got: method.to_owned(),
                },
            );
        }
        GrpcMatch {
            service: g.service.clone(),
            method: g.method.clone(),
        }
    });
    RouteMatch {
        path,
        methods,
        headers,
        grpc,
    }
}

/// The model's code for a policy's name of it (declared in the same order, by
/// number; `a_grpc_code_spec_names_the_model_code` checks).
fn grpc_code(spec: GrpcCodeSpec) -> GrpcCode {
    GrpcCode::from_number(spec as u32)
}

fn retries(c: &mut Checker, at: &str, r: &RetriesSpec) -> Retries {
    Retries {
        attempts: c.int_range(&format!("{at}.attempts"), r.attempts, 1, 10),
        on: if r.on.is_empty() {
            vec![RetryOn::ConnectFailure, RetryOn::GatewayError]
        } else {
            r.on.iter()
                .map(|o| match o {
                    RetryOnSpec::ConnectFailure => RetryOn::ConnectFailure,
                    RetryOnSpec::GatewayError => RetryOn::GatewayError,
                    RetryOnSpec::Reset => RetryOn::Reset,
                    RetryOnSpec::Cancelled => RetryOn::Grpc(GrpcCode::Cancelled),
                    RetryOnSpec::DeadlineExceeded => RetryOn::Grpc(GrpcCode::DeadlineExceeded),
                    RetryOnSpec::Internal => RetryOn::Grpc(GrpcCode::Internal),
                    RetryOnSpec::ResourceExhausted => RetryOn::Grpc(GrpcCode::ResourceExhausted),
                    RetryOnSpec::Unavailable => RetryOn::Grpc(GrpcCode::Unavailable),
                })
                .collect()
        },
        budget: r
            .budget
            .as_ref()
            .map(|b| RetryBudget {
                ratio: c.ratio(&format!("{at}.budget.ratio"), b.ratio),
                min_per_second: match b.min_per_second {
                    Some(m) if !(m >= 0.0 && m.is_finite()) => {
                        c.fail(
                            format!("{at}.budget.minPerSecond"),
                            Problem::TooSmall {
                                min: "0".into(),
                                got: m.to_string(),
                            },
                        );
                        0.0
                    }
                    Some(m) => m,
                    None => RetryBudget::default().min_per_second,
                },
            })
            .unwrap_or_default(),
    }
}

/// Rates outside this range are refused: below it a token's period (and a bucket's
/// refill time) no longer fits a `Duration`, above it no proxy could ever see it.
const MIN_RATE: f64 = 1e-6;
const MAX_RATE: f64 = 1e9;

fn rate_limit(c: &mut Checker, at: &str, r: &RateLimitSpec) -> RateLimit {
    let rps = r.requests_per_second;
    if !(rps > 0.0 && rps.is_finite()) {
        c.fail(
            format!("{at}.requestsPerSecond"),
            Problem::NotPositive { got: rps },
        );
    } else if !(MIN_RATE..=MAX_RATE).contains(&rps) {
        c.fail(
            format!("{at}.requestsPerSecond"),
            Problem::OutOfRange {
                min: "0.000001".into(),
                max: "1000000000".into(),
                got: if (1e-3..1e6).contains(&rps) {
                    rps.to_string()
                } else {
                    format!("{rps:e}")
                },
            },
        );
    }
    let burst = c.at_least(&format!("{at}.burst"), r.burst, 1);
    let key = match (&r.key, r.max_keys) {
        (Some(k), Some(max)) => Some(KeyedLimit {
            key: c.key(&format!("{at}.key"), k),
            max_keys: c.int_range(&format!("{at}.maxKeys"), max, 1, 10_000_000),
        }),
        (Some(k), None) => {
            c.key(&format!("{at}.key"), k);
            c.fail(format!("{at}.key"), Problem::MaxKeysRequired);
            None
        }
        (None, Some(_)) => {
            c.fail(format!("{at}.maxKeys"), Problem::MaxKeysWithoutKey);
            None
        }
        (None, None) => None,
    };
    RateLimit {
        requests_per_second: r.requests_per_second,
        burst,
        key,
    }
}

fn global_rate_limit(c: &mut Checker, at: &str, g: &GlobalRateLimitSpec) -> GlobalRateLimit {
    let shared = rate_limit(
        c,
        at,
        &RateLimitSpec {
            requests_per_second: g.requests_per_second,
            burst: g.burst,
            key: g.key.clone(),
            max_keys: g.max_keys,
        },
    );
    let when_unreachable = match &g.when_unreachable {
        Some(local) => {
            let local = rate_limit(
                c,
                &format!("{at}.whenUnreachable"),
                &RateLimitSpec {
                    requests_per_second: local.requests_per_second,
                    burst: local.burst,
                    key: None,
                    max_keys: None,
                },
            );
            RateLimit {
                key: shared.key.clone(),
                ..local
            }
        }
        None => shared.clone(),
    };
    GlobalRateLimit {
        shared,
        when_unreachable,
    }
}

fn concurrency(c: &mut Checker, at: &str, x: &ConcurrencySpec) -> Concurrency {
    match (x.max, &x.adaptive) {
        (Some(max), None) => Concurrency::Fixed {
            max: c.at_least(&format!("{at}.max"), max, 1),
        },
        (None, Some(a)) => {
            let min = c.at_least(&format!("{at}.adaptive.min"), a.min, 1);
            let max = c.at_least(&format!("{at}.adaptive.max"), a.max, 1);
            if a.min > a.max {
                c.fail(
                    format!("{at}.adaptive"),
                    Problem::MinAboveMax {
                        min: a.min,
                        max: a.max,
                    },
                );
            }
            Concurrency::Adaptive { min, max }
        }
        (Some(_), Some(_)) => {
            c.fail(at, Problem::FixedAndAdaptive);
            Concurrency::Fixed { max: 1 }
        }
        (None, None) => {
            c.fail(at, Problem::NoConcurrencyLimit);
            Concurrency::Fixed { max: 1 }
        }
    }
}

fn circuit_breaker(c: &mut Checker, at: &str, b: &CircuitBreakerSpec) -> CircuitBreaker {
    if b.consecutive_failures.is_none() && b.error_ratio.is_none() && b.slow_call.is_none() {
        c.fail(at, Problem::NoBreakerTrigger);
    }
    CircuitBreaker {
        consecutive_failures: b
            .consecutive_failures
            .map(|n| c.at_least(&format!("{at}.consecutiveFailures"), n, 1)),
        error_ratio: b
            .error_ratio
            .map(|r| c.ratio(&format!("{at}.errorRatio"), r)),
        slow_call: b.slow_call.as_ref().map(|s| SlowCall {
            threshold: c.duration(&format!("{at}.slowCall.threshold"), &s.threshold),
            ratio: c.ratio(&format!("{at}.slowCall.ratio"), s.ratio),
        }),
        window: b
            .window
            .as_ref()
            .map(|w| c.duration(&format!("{at}.window"), w))
            .unwrap_or(Duration::from_secs(10)),
        min_requests: c.at_least(
            &format!("{at}.minRequests"),
            b.min_requests.unwrap_or(20),
            1,
        ),
        open_for: b
            .open_for
            .as_ref()
            .map(|w| c.duration(&format!("{at}.openFor"), w))
            .unwrap_or(Duration::from_secs(30)),
        half_open_requests: c.at_least(
            &format!("{at}.halfOpenRequests"),
            b.half_open_requests.unwrap_or(1),
            1,
        ),
    }
}

fn fallback(c: &mut Checker, at: &str, f: &FallbackSpec) -> Fallback {
    let is_static = f.status.is_some()
        || f.body.is_some()
        || !f.headers.is_empty()
        || f.grpc_status.is_some()
        || f.grpc_message.is_some();
    let action = match (&f.backend, is_static) {
        (Some(_), true) => {
            c.fail(at, Problem::AmbiguousFallback);
            None
        }
        (Some(b), false) => Some(FallbackAction::Backend(
            c.address(&format!("{at}.backend"), b),
        )),
        (None, true) => Some(FallbackAction::Static {
            status: c.int_range(&format!("{at}.status"), f.status.unwrap_or(503), 200, 599) as u16,
            headers: f
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        c.header_name(&format!("{at}.headers.{name}"), name),
                        value.clone(),
                    )
                })
                .collect(),
            body: f.body.clone().unwrap_or_default(),
        }),
        (None, false) => {
            c.fail(at, Problem::EmptyFallback);
            None
        }
    };
    let mut on: Vec<FallbackCause> = Vec::new();
    for cause in &f.on {
        let cause = match cause {
            FallbackCauseSpec::BreakerOpen => FallbackCause::BreakerOpen,
            FallbackCauseSpec::RateLimited => FallbackCause::RateLimited,
            FallbackCauseSpec::Overloaded => FallbackCause::Overloaded,
            FallbackCauseSpec::UpstreamError => FallbackCause::UpstreamError,
        };
        if !on.contains(&cause) {
            on.push(cause);
        }
    }
    if on.is_empty() {
        on = FallbackCause::ALL.to_vec();
    }
    Fallback {
        action: action.unwrap_or(FallbackAction::Static {
            status: 503,
            headers: Vec::new(),
            body: String::new(),
        }),
        on,
        grpc_status: f.grpc_status.map(grpc_code),
        grpc_message: f.grpc_message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::host_without_port;

    #[test]
    fn a_grpc_code_spec_names_the_model_code() {
        for code in crate::model::GrpcCode::ALL {
            let spec: crate::spec::GrpcCodeSpec =
                serde_json::from_value(serde_json::Value::String(code.as_str().into()))
                    .expect("every code has a spec name");
            assert_eq!(super::grpc_code(spec), code);
        }
    }
    use crate::model::{Route, DEFAULT_ROUTE};

    #[test]
    fn a_policy_without_routes_gets_one_catch_all_route_named_default() {
        let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  backends: [{address: 127.0.0.1:9}]\n";
        let set = crate::parse_str(std::path::Path::new("p.yaml"), yaml).expect("valid");
        assert_eq!(
            set.policies[0].routes,
            vec![Route::catch_all(DEFAULT_ROUTE)]
        );
    }

    #[test]
    fn host_without_port_strips_only_a_numeric_port() {
        for (host, bare) in [
            ("bench", "bench"),
            ("bench:8080", "bench"),
            ("bench:", "bench"),
            ("a.b.c:80", "a.b.c"),
            ("bench:http", "bench:http"),
            ("[::1]:8080", "::1"),
            ("[::1]", "::1"),
            ("", ""),
            (":9", ""),
        ] {
            assert_eq!(host_without_port(host), bare, "{host:?}");
        }
    }
}
