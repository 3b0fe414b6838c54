//! Property: any valid model, written back as YAML, parses to the same model.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use proptest::collection::{btree_set, vec};
use proptest::option;
use proptest::prelude::*;
use sluice_policy::*;

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,8}[a-z0-9]"
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..5000).prop_map(Duration::from_millis),
        (1u64..600).prop_map(Duration::from_secs),
    ]
}

fn open_ratio() -> impl Strategy<Value = f64> {
    (1u32..1000).prop_map(|x| f64::from(x) / 1000.0)
}

fn closed_ratio() -> impl Strategy<Value = f64> {
    (0u32..=100).prop_map(|x| f64::from(x) / 100.0)
}

fn address() -> impl Strategy<Value = Address> {
    (prop_oneof![name(), "127\\.0\\.0\\.[1-9]"], 1u16..=u16::MAX)
        .prop_map(|(host, port)| Address { host, port })
}

/// Namespaces never `default`, so that no Service named without one (in the
/// generated policies, which have none: `default`) is another's duplicate.
fn service() -> impl Strategy<Value = ServiceRef> {
    (
        "[a-z][a-z0-9-]{0,6}[a-z0-9]",
        option::of("[a-z][a-z0-9]{0,5}"),
        prop_oneof![
            (1u16..=u16::MAX).prop_map(ServicePort::Number),
            "[a-z][a-z0-9]{0,6}".prop_map(ServicePort::Name),
        ],
    )
        .prop_map(|(name, namespace, port)| ServiceRef {
            name,
            namespace,
            port,
        })
}

/// Distinct backends, each an address or a Service, in a policy without namespace.
fn backends(count: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Backend>> {
    btree_set(
        prop_oneof![address().prop_map(Ok), service().prop_map(Err)],
        count,
    )
    .prop_flat_map(|targets| {
        let n = targets.len();
        (
            Just(targets),
            vec(1u32..=10_000, n),
            vec(any::<bool>(), n),
            vec(option::of(identity()), n),
        )
    })
    .prop_map(|(targets, weights, h2c, tls)| {
        targets
            .into_iter()
            .zip(weights)
            .zip(h2c)
            .zip(tls)
            .map(|(((target, weight), h2c), tls)| {
                let (address, service) = match target {
                    Ok(address) => (address, None),
                    Err(service) => (service.address(None), Some(service)),
                };
                Backend {
                    address,
                    weight,
                    protocol: if h2c { Protocol::H2c } else { Protocol::Http1 },
                    service,
                    tls: tls.map(|identity| BackendTls { identity }),
                }
            })
            .collect()
    })
}

/// A workload identity a policy may name.
fn identity() -> impl Strategy<Value = String> {
    ("[a-z]{1,6}(\\.[a-z]{1,5})?", name(), name())
        .prop_map(|(domain, ns, sa)| format!("spiffe://{domain}/ns/{ns}/sa/{sa}"))
}

/// An authorization whose rules name some of `routes`. Validation drops repeats
/// within a rule's lists, so the generated lists have none.
fn authorization(routes: Vec<String>) -> impl Strategy<Value = Authorization> {
    let rule = (
        btree_set((name(), name()), 0..3),
        btree_set(name(), 0..3),
        option::of(proptest::sample::subsequence(
            routes.clone(),
            1..=routes.len(),
        )),
    )
        .prop_filter("a rule names some caller", |(sas, namespaces, _)| {
            !sas.is_empty() || !namespaces.is_empty()
        })
        .prop_map(|(sas, namespaces, routes)| AuthorizationRule {
            service_accounts: sas
                .into_iter()
                .map(|(namespace, name)| ServiceAccount { namespace, name })
                .collect(),
            namespaces: namespaces.into_iter().collect(),
            routes,
        });
    (
        prop_oneof![
            Just(AuthorizationDefault::Deny),
            Just(AuthorizationDefault::Allow)
        ],
        vec(rule, 0..3),
    )
        .prop_map(|(default, rules)| Authorization { default, rules })
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![Just(Key::ClientIp), "x-[a-z]{1,8}".prop_map(Key::Header)]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::btree_map("x-[a-z]{1,6}", "[a-z0-9]{0,6}", 0..3)
        .prop_map(|m| m.into_iter().collect())
}

fn rate_limit() -> impl Strategy<Value = RateLimit> {
    (
        (1u32..100_000).prop_map(|x| f64::from(x) / 4.0),
        1u32..10_000,
        option::of(
            (key(), 1u32..1_000_000).prop_map(|(key, max_keys)| KeyedLimit { key, max_keys }),
        ),
    )
        .prop_map(|(requests_per_second, burst, key)| RateLimit {
            requests_per_second,
            burst,
            key,
        })
}

fn tcp() -> impl Strategy<Value = TcpLimits> {
    (
        duration(),
        option::of(1u32..100_000),
        option::of((1u32..1000, 1u32..1000)),
    )
        .prop_map(|(connect_timeout, max_connections, rate)| TcpLimits {
            connect_timeout,
            max_connections,
            connection_rate: rate.map(|(rps, burst)| RateLimit {
                requests_per_second: f64::from(rps) / 4.0,
                burst,
                key: None,
            }),
        })
}

fn route(name: String) -> impl Strategy<Value = Route> {
    let matcher = (
        prop_oneof![
            Just(PathMatch::Any),
            "/[a-z]{0,6}".prop_map(PathMatch::Exact),
            "/[a-z]{0,6}".prop_map(PathMatch::Prefix)
        ],
        btree_set(prop_oneof![Just("GET"), Just("POST"), Just("PUT")], 0..3),
        headers(),
        option::of((
            "[a-z]{1,5}(\\.[A-Z][a-z]{0,5})?",
            option::of("[A-Z][a-z]{0,5}"),
        )),
    )
        .prop_map(|(path, methods, headers, grpc)| RouteMatch {
            // `grpc` sets the path: the two never come together.
            grpc: grpc
                .filter(|_| path == PathMatch::Any)
                .map(|(service, method)| GrpcMatch { service, method }),
            path,
            methods: methods.into_iter().map(str::to_owned).collect(),
            headers,
        });
    let retries = (
        1u32..=10,
        btree_set(0usize..8, 1..4),
        closed_ratio(),
        (0u32..100).prop_map(f64::from),
    )
        .prop_map(|(attempts, on, ratio, min_per_second)| Retries {
            attempts,
            on: on
                .into_iter()
                .map(|i| {
                    [
                        RetryOn::ConnectFailure,
                        RetryOn::GatewayError,
                        RetryOn::Reset,
                        RetryOn::Grpc(GrpcCode::Cancelled),
                        RetryOn::Grpc(GrpcCode::DeadlineExceeded),
                        RetryOn::Grpc(GrpcCode::Internal),
                        RetryOn::Grpc(GrpcCode::ResourceExhausted),
                        RetryOn::Grpc(GrpcCode::Unavailable),
                    ][i]
                })
                .collect(),
            budget: RetryBudget {
                ratio,
                min_per_second,
            },
        });
    let global = (
        rate_limit(),
        (1u32..100_000).prop_map(|x| f64::from(x) / 4.0),
        1u32..10_000,
    )
        .prop_map(|(shared, requests_per_second, burst)| GlobalRateLimit {
            when_unreachable: RateLimit {
                requests_per_second,
                burst,
                key: shared.key.clone(),
            },
            shared,
        });
    let concurrency = prop_oneof![
        (1u32..1000).prop_map(|max| Concurrency::Fixed { max }),
        (1u32..100, 0u32..1000).prop_map(|(min, extra)| Concurrency::Adaptive {
            min,
            max: min + extra
        }),
    ];
    let breaker = (
        option::of(1u32..100),
        option::of(closed_ratio()),
        option::of(
            (duration(), closed_ratio())
                .prop_map(|(threshold, ratio)| SlowCall { threshold, ratio }),
        ),
        (duration(), 1u32..1000, duration(), 1u32..10),
    )
        .prop_filter("a breaker needs a trigger", |(c, e, s, _)| {
            c.is_some() || e.is_some() || s.is_some()
        })
        .prop_map(
            |(
                consecutive_failures,
                error_ratio,
                slow_call,
                (window, min_requests, open_for, half_open_requests),
            )| {
                CircuitBreaker {
                    consecutive_failures,
                    error_ratio,
                    slow_call,
                    window,
                    min_requests,
                    open_for,
                    half_open_requests,
                }
            },
        );
    let fallback = (
        prop_oneof![
            (200u16..600, headers(), "[ -~]{0,20}").prop_map(|(status, headers, body)| {
                FallbackAction::Static {
                    status,
                    headers,
                    body,
                }
            }),
            address().prop_map(FallbackAction::Backend),
        ],
        btree_set(0usize..4, 1..4),
        option::of(0usize..17),
        option::of("[ -~]{0,20}"),
    )
        .prop_map(|(action, on, grpc_status, grpc_message)| {
            // Only a static fallback has a gRPC form.
            let is_static = matches!(action, FallbackAction::Static { .. });
            Fallback {
                action,
                on: on.into_iter().map(|i| FallbackCause::ALL[i]).collect(),
                grpc_status: grpc_status.filter(|_| is_static).map(|i| GrpcCode::ALL[i]),
                grpc_message: grpc_message.filter(|_| is_static),
            }
        });
    let grpc_failures = btree_set(0usize..17, 0..6).prop_map(|codes| {
        codes
            .into_iter()
            .map(|i| GrpcCode::ALL[i])
            .collect::<Vec<_>>()
    });
    let priority = ("x-[a-z]{1,6}", vec("[a-z]{1,5}", 1..3))
        .prop_map(|(header, shed_first)| Priority { header, shed_first });
    (
        matcher,
        option::of(duration()),
        option::of(retries),
        option::of(rate_limit()),
        option::of(global),
        option::of(concurrency),
        option::of(breaker),
        option::of(fallback),
        option::of(priority),
        option::of(prop_oneof![Just(Mode::Enforce), Just(Mode::Shadow)]),
        option::of(backends(1..4)),
        prop_oneof![Just(GrpcCode::FAILURES.to_vec()), grpc_failures],
    )
        .prop_map(
            move |(
                matcher,
                timeout,
                retries,
                rate_limit,
                global_rate_limit,
                concurrency,
                circuit_breaker,
                fallback,
                priority,
                mode,
                backends,
                grpc_failures,
            )| Route {
                name: name.clone(),
                matcher,
                timeout,
                retries,
                rate_limit,
                global_rate_limit,
                concurrency,
                circuit_breaker,
                fallback,
                priority,
                mode,
                backends,
                grpc_failures,
            },
        )
}

fn policy() -> impl Strategy<Value = TrafficPolicy> {
    let algorithm = prop_oneof![
        Just(Algorithm::WeightedRoundRobin),
        Just(Algorithm::P2cEwma),
        key().prop_map(|hash_on| Algorithm::ConsistentHash { hash_on }),
    ];
    // Validation never yields a policy without routes: "no routes" is the implicit
    // catch-all, which must come back as it went (it is written as no routes at all).
    let routes = btree_set(name(), 0..4)
        .prop_flat_map(|names| names.into_iter().map(route).collect::<Vec<_>>())
        .prop_map(|routes| {
            if routes.is_empty() {
                vec![Route::catch_all(DEFAULT_ROUTE)]
            } else {
                routes
            }
        });
    (
        name(),
        btree_set("[a-z]{1,8}(\\.[a-z]{1,5})?", 0..3),
        prop_oneof![Just(Mode::Enforce), Just(Mode::Shadow)],
        backends(0..4),
        (algorithm, option::of(duration())),
        option::of(
            (
                "/[a-z]{0,5}",
                option::of("([a-z]{1,5}(\\.[A-Z][a-z]{0,4})?)?"),
                duration(),
                1u32..10,
                1u32..10,
            )
                .prop_map(|(path, grpc, t, u, h)| HealthCheck {
                    path: if grpc.is_some() { String::new() } else { path },
                    grpc,
                    interval: t * 2,
                    timeout: t,
                    unhealthy_after: u,
                    healthy_after: h,
                }),
        ),
        option::of(
            (1u32..20, duration(), 0u8..=100).prop_map(|(c, e, m)| OutlierDetection {
                consecutive_failures: c,
                eject_for: e,
                max_ejected_percent: m,
            }),
        ),
        option::of(
            (
                option::of(open_ratio()),
                option::of((duration(), open_ratio())),
            )
                .prop_map(|(availability, latency)| Slo {
                    availability,
                    latency: latency.map(|(threshold, target)| LatencySlo { threshold, target }),
                }),
        ),
        option::of(tcp()),
        routes,
    )
        .prop_map(
            |(
                name,
                hosts,
                mode,
                backends,
                (algorithm, slow_start),
                health_check,
                outlier_detection,
                slo,
                tcp,
                routes,
            )| {
                TrafficPolicy {
                    hosts: hosts.into_iter().map(|h| format!("{name}-{h}")).collect(),
                    name,
                    namespace: None,
                    mode,
                    backends,
                    load_balancer: LoadBalancer {
                        algorithm,
                        slow_start,
                    },
                    health_check,
                    outlier_detection,
                    slo,
                    tcp,
                    routes,
                    mtls: None,
                    authorization: None,
                }
            },
        )
        .prop_flat_map(|policy| {
            let routes: Vec<String> = policy.routes.iter().map(|r| r.name.clone()).collect();
            (
                Just(policy),
                option::of(prop_oneof![
                    Just(MtlsMode::Strict),
                    Just(MtlsMode::Permissive)
                ]),
                option::of(authorization(routes)),
            )
        })
        .prop_map(|(policy, mtls, authorization)| TrafficPolicy {
            mtls,
            authorization,
            ..policy
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_valid_model_round_trips_through_yaml(policies in vec(policy(), 1..3)) {
        let mut seen = BTreeSet::new();
        let policies: Vec<_> = policies.into_iter().filter(|p| seen.insert(p.name.clone())).collect();
        let set = PolicySet { policies };
        let yaml = to_yaml(&set);
        let parsed = parse_str(Path::new("roundtrip.yaml"), &yaml)
            .map_err(|e| TestCaseError::fail(format!("{e}\n--- yaml ---\n{yaml}")))?;
        prop_assert_eq!(parsed, set, "yaml:\n{}", yaml);
    }
}
