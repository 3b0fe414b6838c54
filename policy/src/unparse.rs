//! Model -> spec: the inverse of `validate`, so a validated policy can be written
//! back as YAML (the control plane serves policies in their canonical form, and the
//! round-trip property test holds the two directions to each other).

use crate::duration;
use crate::model::*;
use crate::spec::*;

fn mode(m: Mode) -> ModeSpec {
    match m {
        Mode::Enforce => ModeSpec::Enforce,
        Mode::Shadow => ModeSpec::Shadow,
    }
}

fn dur(d: std::time::Duration) -> DurationSpec {
    DurationSpec(duration::format(d))
}

impl From<&TrafficPolicy> for TrafficPolicySpec {
    fn from(p: &TrafficPolicy) -> Self {
        TrafficPolicySpec {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: MetadataSpec {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                labels: Default::default(),
                annotations: Default::default(),
            },
            spec: PolicyBodySpec {
                hosts: p.hosts.clone(),
                mode: Some(mode(p.mode)),
                backends: p.backends.iter().map(backend).collect(),
                load_balancer: Some(LoadBalancerSpec {
                    algorithm: Some(match p.load_balancer.algorithm {
                        Algorithm::WeightedRoundRobin => AlgorithmSpec::WeightedRoundRobin,
                        Algorithm::P2cEwma => AlgorithmSpec::P2cEwma,
                        Algorithm::ConsistentHash { .. } => AlgorithmSpec::ConsistentHash,
                    }),
                    hash_on: match &p.load_balancer.algorithm {
                        Algorithm::ConsistentHash { hash_on } => Some(hash_on.to_string()),
                        _ => None,
                    },
                    slow_start: p.load_balancer.slow_start.map(dur),
                }),
                health_check: p.health_check.as_ref().map(|h| HealthCheckSpec {
                    path: h.grpc.is_none().then(|| h.path.clone()),
                    grpc: h.grpc.as_ref().map(|service| GrpcHealthSpec {
                        service: service.clone(),
                    }),
                    interval: dur(h.interval),
                    timeout: dur(h.timeout),
                    unhealthy_after: Some(i64::from(h.unhealthy_after)),
                    healthy_after: Some(i64::from(h.healthy_after)),
                }),
                outlier_detection: p.outlier_detection.as_ref().map(|o| OutlierDetectionSpec {
                    consecutive_failures: i64::from(o.consecutive_failures),
                    eject_for: dur(o.eject_for),
                    max_ejected_percent: Some(i64::from(o.max_ejected_percent)),
                }),
                slo: p.slo.as_ref().map(|s| SloSpec {
                    availability: s.availability,
                    latency: s.latency.as_ref().map(|l| LatencySloSpec {
                        threshold: dur(l.threshold),
                        target: l.target,
                    }),
                }),
                tcp: p.tcp.as_ref().map(|t| TcpSpec {
                    connect_timeout: Some(dur(t.connect_timeout)),
                    max_connections: t.max_connections.map(i64::from),
                    connections_per_second: t
                        .connection_rate
                        .as_ref()
                        .map(|r| r.requests_per_second),
                    burst: t.connection_rate.as_ref().map(|r| i64::from(r.burst)),
                }),
                routes: if is_implicit(&p.routes) {
                    Vec::new()
                } else {
                    p.routes.iter().map(route).collect()
                },
                mtls: p.mtls.map(|m| MtlsSpec {
                    mode: match m {
                        MtlsMode::Strict => MtlsModeSpec::Strict,
                        MtlsMode::Permissive => MtlsModeSpec::Permissive,
                    },
                }),
                authorization: p.authorization.as_ref().map(authorization),
            },
        }
    }
}

/// A Service backend is written as its Service (its address is derived from it).
fn backend(b: &Backend) -> BackendSpec {
    let (address, service, port) = match &b.service {
        Some(s) => (
            None,
            Some(s.to_string()),
            Some(match &s.port {
                ServicePort::Number(n) => PortSpec::Number(i64::from(*n)),
                ServicePort::Name(name) => PortSpec::Name(name.clone()),
            }),
        ),
        None => (Some(b.address.to_string()), None, None),
    };
    BackendSpec {
        address,
        service,
        port,
        weight: Some(i64::from(b.weight)),
        protocol: Some(match b.protocol {
            Protocol::Http1 => ProtocolSpec::Http1,
            Protocol::H2c => ProtocolSpec::H2c,
        }),
        tls: b.tls.as_ref().map(|t| BackendTlsSpec {
            identity: t.identity.clone(),
        }),
    }
}

fn authorization(a: &Authorization) -> AuthorizationSpec {
    AuthorizationSpec {
        default: Some(match a.default {
            AuthorizationDefault::Allow => AuthorizationDefaultSpec::Allow,
            AuthorizationDefault::Deny => AuthorizationDefaultSpec::Deny,
        }),
        rules: a
            .rules
            .iter()
            .map(|r| AuthorizationRuleSpec {
                from: AuthorizationFromSpec {
                    service_accounts: r.service_accounts.iter().map(ToString::to_string).collect(),
                    namespaces: r.namespaces.clone(),
                },
                routes: r.routes.clone(),
            })
            .collect(),
    }
}

/// Whether `routes` is only what `validate` adds to a policy written without routes.
/// Written back as "no routes", so that such a policy keeps the canonical YAML (and
/// so the content hash) it had before the implicit route existed, and `diff` shows
/// nothing; `routes: [{name: default}]` is the same model, and is written the same.
fn is_implicit(routes: &[Route]) -> bool {
    matches!(routes, [only] if *only == Route::catch_all(DEFAULT_ROUTE))
}

fn route(r: &Route) -> RouteSpec {
    let m = &r.matcher;
    RouteSpec {
        name: r.name.clone(),
        matcher: Some(MatchSpec {
            path: match &m.path {
                PathMatch::Exact(p) => Some(p.clone()),
                _ => None,
            },
            path_prefix: match &m.path {
                PathMatch::Prefix(p) => Some(p.clone()),
                _ => None,
            },
            methods: m.methods.clone(),
            headers: m.headers.iter().cloned().collect(),
            grpc: m.grpc.as_ref().map(|g| GrpcMatchSpec {
                service: g.service.clone(),
                method: g.method.clone(),
            }),
        }),
        timeout: r.timeout.map(dur),
        retries: r.retries.as_ref().map(|x| RetriesSpec {
            attempts: i64::from(x.attempts),
            on: x
                .on
                .iter()
                .map(|o| match o {
                    RetryOn::ConnectFailure => RetryOnSpec::ConnectFailure,
                    RetryOn::GatewayError => RetryOnSpec::GatewayError,
                    RetryOn::Reset => RetryOnSpec::Reset,
                    RetryOn::Grpc(GrpcCode::Cancelled) => RetryOnSpec::Cancelled,
                    RetryOn::Grpc(GrpcCode::DeadlineExceeded) => RetryOnSpec::DeadlineExceeded,
                    RetryOn::Grpc(GrpcCode::Internal) => RetryOnSpec::Internal,
                    RetryOn::Grpc(GrpcCode::ResourceExhausted) => RetryOnSpec::ResourceExhausted,
                    // The only other code validation produces.
                    RetryOn::Grpc(_) => RetryOnSpec::Unavailable,
                })
                .collect(),
            budget: Some(RetryBudgetSpec {
                ratio: x.budget.ratio,
                min_per_second: Some(x.budget.min_per_second),
            }),
        }),
        rate_limit: r.rate_limit.as_ref().map(|l| RateLimitSpec {
            requests_per_second: l.requests_per_second,
            burst: i64::from(l.burst),
            key: l.key.as_ref().map(|k| k.key.to_string()),
            max_keys: l.key.as_ref().map(|k| i64::from(k.max_keys)),
        }),
        global_rate_limit: r.global_rate_limit.as_ref().map(|g| GlobalRateLimitSpec {
            requests_per_second: g.shared.requests_per_second,
            burst: i64::from(g.shared.burst),
            key: g.shared.key.as_ref().map(|k| k.key.to_string()),
            max_keys: g.shared.key.as_ref().map(|k| i64::from(k.max_keys)),
            when_unreachable: Some(LocalBucketSpec {
                requests_per_second: g.when_unreachable.requests_per_second,
                burst: i64::from(g.when_unreachable.burst),
            }),
        }),
        concurrency: r.concurrency.as_ref().map(|c| match c {
            Concurrency::Fixed { max } => ConcurrencySpec {
                max: Some(i64::from(*max)),
                adaptive: None,
            },
            Concurrency::Adaptive { min, max } => ConcurrencySpec {
                max: None,
                adaptive: Some(AdaptiveSpec {
                    min: i64::from(*min),
                    max: i64::from(*max),
                }),
            },
        }),
        circuit_breaker: r.circuit_breaker.as_ref().map(|b| CircuitBreakerSpec {
            consecutive_failures: b.consecutive_failures.map(i64::from),
            error_ratio: b.error_ratio,
            slow_call: b.slow_call.as_ref().map(|s| SlowCallSpec {
                threshold: dur(s.threshold),
                ratio: s.ratio,
            }),
            window: Some(dur(b.window)),
            min_requests: Some(i64::from(b.min_requests)),
            open_for: Some(dur(b.open_for)),
            half_open_requests: Some(i64::from(b.half_open_requests)),
        }),
        fallback: r.fallback.as_ref().map(|f| {
            let on =
                f.on.iter()
                    .map(|c| match c {
                        FallbackCause::BreakerOpen => FallbackCauseSpec::BreakerOpen,
                        FallbackCause::RateLimited => FallbackCauseSpec::RateLimited,
                        FallbackCause::Overloaded => FallbackCauseSpec::Overloaded,
                        FallbackCause::UpstreamError => FallbackCauseSpec::UpstreamError,
                    })
                    .collect();
            match &f.action {
                FallbackAction::Static {
                    status,
                    headers,
                    body,
                } => FallbackSpec {
                    status: Some(i64::from(*status)),
                    headers: headers.iter().cloned().collect(),
                    body: Some(body.clone()),
                    backend: None,
                    on,
                    grpc_status: f.grpc_status.map(grpc_code),
                    grpc_message: f.grpc_message.clone(),
                },
                FallbackAction::Backend(a) => FallbackSpec {
                    status: None,
                    headers: Default::default(),
                    body: None,
                    backend: Some(a.to_string()),
                    on,
                    grpc_status: None,
                    grpc_message: None,
                },
            }
        }),
        priority: r.priority.as_ref().map(|p| PrioritySpec {
            header: p.header.clone(),
            shed_first: p.shed_first.clone(),
        }),
        mode: r.mode.map(mode),
        // The default list is left out, so policies written before it keep their
        // canonical YAML (and content hash).
        grpc_failures: (r.grpc_failures != GrpcCode::FAILURES)
            .then(|| r.grpc_failures.iter().map(|c| grpc_code(*c)).collect()),
        backends: r
            .backends
            .as_ref()
            .map(|list| list.iter().map(backend).collect()),
    }
}

/// The policy's name of a code.
fn grpc_code(code: GrpcCode) -> GrpcCodeSpec {
    use GrpcCodeSpec as S;
    const SPECS: [GrpcCodeSpec; 17] = [
        S::Ok,
        S::Cancelled,
        S::Unknown,
        S::InvalidArgument,
        S::DeadlineExceeded,
        S::NotFound,
        S::AlreadyExists,
        S::PermissionDenied,
        S::ResourceExhausted,
        S::FailedPrecondition,
        S::Aborted,
        S::OutOfRange,
        S::Unimplemented,
        S::Internal,
        S::Unavailable,
        S::DataLoss,
        S::Unauthenticated,
    ];
    SPECS[code as usize]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn round(yaml: &str) -> (crate::PolicySet, String) {
        let head = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  backends: [{address: 127.0.0.1:9}]\n";
        let set = crate::parse_str(Path::new("p.yaml"), &format!("{head}{yaml}")).expect("valid");
        let canonical = crate::to_yaml(&set);
        (set, canonical)
    }

    #[test]
    fn the_implicit_route_is_written_back_as_no_routes() {
        let (_, canonical) = round("");
        assert!(!canonical.contains("routes"), "{canonical}");
    }

    #[test]
    fn a_lone_bare_default_route_is_the_same_policy_as_no_routes() {
        assert_eq!(round("  routes: [{name: default}]\n"), round(""));
    }

    #[test]
    fn a_default_route_with_settings_of_its_own_is_written_out() {
        let (set, canonical) = round("  routes: [{name: default, timeout: 2s}]\n");
        assert!(canonical.contains("name: default"), "{canonical}");
        let again = crate::parse_str(Path::new("again.yaml"), &canonical).expect("valid");
        assert_eq!(again, set);
    }
}
