//! Checks that find a policy valid but probably not what its author meant. They never
//! refuse a policy: it serves as written, and each warning says where it will surprise.
//!
//! A route that can never match, because an earlier route matches every request it
//! would (routes are tried in order and the first match wins). Its settings are dead
//! configuration, which usually means routes are in the wrong order.
//!
//! A Service backend on a named port: no proxy can dial it by name (the number is
//! only in the Service's endpoints, which the control plane does not send yet), so
//! it gets no traffic.
//!
//! A route that takes gRPC calls (`match.grpc`) whose backends all speak HTTP/1:
//! gRPC runs over HTTP/2 only, so every call would fail.
//!
//! An authorization that denies every caller (`default: deny` and no rule), or that
//! allows every caller (`default: allow`: rules only allow, so they change nothing).
//!
//! The unreachable-route check never warns wrongly: a route is reported only when one earlier route
//! covers it condition by condition (path, methods, headers), each judged the way the
//! proxy matches requests. It stays silent when only several earlier routes together
//! cover a later one.

use std::fmt;
use std::path::PathBuf;

use crate::model::{
    AuthorizationDefault, Backend, PathMatch, Protocol, RouteMatch, ServicePort, TrafficPolicy,
};

/// Something valid but suspicious, independent of where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Warning {
    #[error("route {route:?} can never match: route {covered_by:?} (spec.routes[{covered_by_index}]) matches every request it would")]
    UnreachableRoute {
        route: String,
        covered_by: String,
        covered_by_index: usize,
    },
    #[error("route {route:?} takes gRPC calls but its backends speak HTTP/1: gRPC needs HTTP/2, so every call would fail; give them `protocol: h2c`")]
    GrpcOverHttp1 { route: String },
    #[error("`default: deny` and no rules: every caller is denied; add rules naming who may call")]
    DeniesEveryCaller,
    #[error("`default: allow` lets every caller through, and rules only allow: this authorization changes nothing; use `default: deny`")]
    AllowsEveryCaller,
    #[error("Service {service:?} is reached by the port name {port:?}: a proxy only dials a port number, so this backend gets no traffic until the control plane sends its endpoints; give the number")]
    NamedServicePort { service: String, port: String },
}

/// A warning placed in a file, like [`crate::PolicyError`]:
/// `x.yaml:12:7: warning: spec.routes[3]: route "b" can never match: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    /// The YAML path of what the warning is about (`spec.routes[3]`).
    pub path: String,
    pub warning: Warning,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: warning: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.path,
            self.warning
        )
    }
}

/// Route `route` (an index into the policy's routes) can never match: the earlier
/// route `covered_by` matches every request it would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    pub route: usize,
    pub covered_by: usize,
}

/// Every route of `policy` that an earlier route covers, each with the first route
/// that does, in route order.
pub fn unreachable_routes(policy: &TrafficPolicy) -> Vec<Unreachable> {
    let routes = &policy.routes;
    (0..routes.len())
        .filter_map(|j| {
            let covered_by = routes[..j]
                .iter()
                .position(|earlier| covers(&earlier.matcher, &routes[j].matcher))?;
            Some(Unreachable {
                route: j,
                covered_by,
            })
        })
        .collect()
}

/// Every warning about `policy`, with the YAML path it is about, in document order.
pub(crate) fn warnings(policy: &TrafficPolicy) -> Vec<(String, Warning)> {
    let mut out = named_ports("spec.backends", &policy.backends);
    for (i, route) in policy.routes.iter().enumerate() {
        if let Some(backends) = &route.backends {
            out.extend(named_ports(&format!("spec.routes[{i}].backends"), backends));
        }
    }
    for (i, route) in policy.routes.iter().enumerate() {
        let backends = route.effective_backends(&policy.backends);
        if route.matcher.grpc.is_some()
            && !backends.is_empty()
            && backends.iter().all(|b| b.protocol == Protocol::Http1)
        {
            out.push((
                format!("spec.routes[{i}].match.grpc"),
                Warning::GrpcOverHttp1 {
                    route: route.name.clone(),
                },
            ));
        }
    }
    if let Some(authz) = &policy.authorization {
        match authz.default {
            AuthorizationDefault::Deny if authz.rules.is_empty() => {
                out.push(("spec.authorization".into(), Warning::DeniesEveryCaller));
            }
            AuthorizationDefault::Allow => {
                out.push((
                    "spec.authorization.default".into(),
                    Warning::AllowsEveryCaller,
                ));
            }
            AuthorizationDefault::Deny => {}
        }
    }
    let unreachable = unreachable_routes(policy).into_iter().map(|u| {
        (
            format!("spec.routes[{}]", u.route),
            Warning::UnreachableRoute {
                route: policy.routes[u.route].name.clone(),
                covered_by: policy.routes[u.covered_by].name.clone(),
                covered_by_index: u.covered_by,
            },
        )
    });
    // In document order: the policy's backends come before its routes.
    let (first, routes): (Vec<_>, Vec<_>) = out
        .into_iter()
        .partition(|(path, _)| path.starts_with("spec.backends"));
    let mut routed: Vec<(String, Warning)> = unreachable.chain(routes).collect();
    // A route's backends are inside the route: `spec.routes[2]` sorts before
    // `spec.routes[2].backends[0]`, and by index (numerically) between routes.
    routed.sort_by_key(|(path, _)| route_index(path));
    first.into_iter().chain(routed).collect()
}

fn route_index(path: &str) -> usize {
    path.strip_prefix("spec.routes[")
        .and_then(|rest| rest.split(']').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or(usize::MAX)
}

/// The Service backends at `at` reached by a port name.
fn named_ports(at: &str, backends: &[Backend]) -> Vec<(String, Warning)> {
    backends
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let service = b.service.as_ref()?;
            let ServicePort::Name(port) = &service.port else {
                return None;
            };
            Some((
                format!("{at}[{i}].port"),
                Warning::NamedServicePort {
                    service: service.to_string(),
                    port: port.clone(),
                },
            ))
        })
        .collect()
}

/// Whether every request that `later` matches is matched by `earlier` too.
pub fn covers(earlier: &RouteMatch, later: &RouteMatch) -> bool {
    // An empty method list means any method: it covers every list, and only another
    // empty list covers it.
    let methods = earlier.methods.is_empty()
        || (!later.methods.is_empty() && later.methods.iter().all(|m| earlier.methods.contains(m)));
    // A request carrying every header `later` asks for carries those `earlier` asks for.
    let headers = earlier.headers.iter().all(|h| later.headers.contains(h));
    // A gRPC-only route covers only gRPC-only routes.
    let grpc = earlier.grpc.is_none() || later.grpc.is_some();
    path_covers(&earlier.effective_path(), &later.effective_path()) && methods && headers && grpc
}

/// Byte prefixes, as the proxy compares paths (`/api` covers `/apis`).
fn path_covers(earlier: &PathMatch, later: &PathMatch) -> bool {
    match (earlier, later) {
        (PathMatch::Any, _) => true,
        (PathMatch::Prefix(p), PathMatch::Prefix(q) | PathMatch::Exact(q)) => q.starts_with(p),
        (PathMatch::Exact(e), PathMatch::Exact(f)) => e == f,
        // Not even `pathPrefix: /` covers `Any`: a request target need not start
        // with '/' (`OPTIONS *`).
        (PathMatch::Prefix(_) | PathMatch::Exact(_), _) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::model::Route;

    fn matcher(path: PathMatch, methods: &[&str], headers: &[(&str, &str)]) -> RouteMatch {
        RouteMatch {
            path,
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            grpc: None,
        }
    }

    fn any() -> RouteMatch {
        RouteMatch::default()
    }

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.to_owned())
    }

    fn exact(p: &str) -> PathMatch {
        PathMatch::Exact(p.to_owned())
    }

    fn policy(routes: &[(&str, RouteMatch)]) -> TrafficPolicy {
        let mut policy = crate::parse_str(
            std::path::Path::new("p.yaml"),
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {}\n",
        )
        .expect("valid")
        .policies
        .remove(0);
        policy.routes = routes
            .iter()
            .map(|(name, matcher)| Route {
                matcher: matcher.clone(),
                ..Route::catch_all(*name)
            })
            .collect();
        policy
    }

    #[test]
    fn warns_about_a_route_after_a_catch_all_with_the_same_methods_and_headers() {
        let p = policy(&[
            ("all", any()),
            ("orders", matcher(prefix("/orders"), &[], &[])),
        ]);
        assert_eq!(
            warnings(&p),
            vec![(
                "spec.routes[1]".to_owned(),
                Warning::UnreachableRoute {
                    route: "orders".into(),
                    covered_by: "all".into(),
                    covered_by_index: 0,
                }
            )]
        );
    }

    #[test]
    fn routes_from_specific_to_general_draw_no_warning() {
        let p = policy(&[
            (
                "canary",
                matcher(prefix("/orders"), &[], &[("x-canary", "yes")]),
            ),
            ("orders", matcher(prefix("/orders"), &["GET"], &[])),
            ("health", matcher(exact("/healthz"), &[], &[])),
            ("default", any()),
        ]);
        assert_eq!(unreachable_routes(&p), vec![]);
    }

    #[test]
    fn names_the_first_earlier_route_that_covers() {
        let p = policy(&[
            ("api", matcher(prefix("/api"), &[], &[])),
            ("all", any()),
            ("v1", matcher(prefix("/api/v1"), &[], &[])),
        ]);
        assert_eq!(
            unreachable_routes(&p),
            vec![Unreachable {
                route: 2,
                covered_by: 0
            }]
        );
    }

    #[test]
    fn a_prefix_covers_every_path_that_starts_with_its_bytes() {
        let grpc = |service: &str, method: Option<&str>| RouteMatch {
            grpc: Some(crate::model::GrpcMatch {
                service: service.into(),
                method: method.map(Into::into),
            }),
            ..RouteMatch::default()
        };
        // A gRPC service covers its methods; a path route covers gRPC routes under
        // it, never the other way round (a gRPC route takes only gRPC requests).
        assert!(covers(
            &grpc("shop.Orders", None),
            &grpc("shop.Orders", Some("Get"))
        ));
        assert!(!covers(
            &grpc("shop.Orders", Some("Get")),
            &grpc("shop.Orders", None)
        ));
        assert!(covers(
            &matcher(prefix("/shop."), &[], &[]),
            &grpc("shop.Orders", None)
        ));
        assert!(!covers(
            &grpc("shop.Orders", None),
            &matcher(prefix("/shop.Orders/"), &[], &[])
        ));
        let api = matcher(prefix("/api"), &[], &[]);
        assert!(covers(&api, &matcher(prefix("/api/v1"), &[], &[])));
        assert!(covers(&api, &matcher(prefix("/apis"), &[], &[])));
        assert!(covers(&api, &matcher(exact("/api"), &[], &[])));
        assert!(covers(&api, &matcher(exact("/api/x"), &[], &[])));
        assert!(!covers(&api, &matcher(prefix("/ap"), &[], &[])));
        assert!(!covers(&api, &matcher(exact("/other"), &[], &[])));
        assert!(!covers(&matcher(prefix("/"), &[], &[]), &any()));
    }

    #[test]
    fn an_exact_path_covers_only_the_same_exact_path() {
        let health = matcher(exact("/healthz"), &[], &[]);
        assert!(covers(&health, &matcher(exact("/healthz"), &["GET"], &[])));
        assert!(!covers(&health, &matcher(exact("/healthz/deep"), &[], &[])));
        assert!(!covers(&health, &matcher(prefix("/healthz"), &[], &[])));
        assert!(!covers(&health, &any()));
    }

    #[test]
    fn earlier_methods_cover_only_a_later_route_limited_to_some_of_them() {
        let get_post = matcher(PathMatch::Any, &["GET", "POST"], &[]);
        assert!(covers(&get_post, &matcher(PathMatch::Any, &["GET"], &[])));
        assert!(covers(
            &get_post,
            &matcher(PathMatch::Any, &["POST", "GET"], &[])
        ));
        assert!(!covers(
            &get_post,
            &matcher(PathMatch::Any, &["GET", "PUT"], &[])
        ));
        assert!(!covers(&get_post, &any()));
        assert!(covers(&any(), &get_post));
    }

    #[test]
    fn earlier_headers_cover_only_a_later_route_that_asks_for_them_too() {
        let canary = matcher(PathMatch::Any, &[], &[("x-canary", "yes")]);
        assert!(covers(
            &canary,
            &matcher(PathMatch::Any, &[], &[("x-canary", "yes"), ("x-user", "1")])
        ));
        assert!(!covers(
            &canary,
            &matcher(PathMatch::Any, &[], &[("x-canary", "no")])
        ));
        assert!(!covers(&canary, &any()));
        assert!(covers(&any(), &canary));
    }

    #[test]
    fn the_implicit_route_alone_draws_no_warning() {
        let p = policy(&[("default", any())]);
        assert_eq!(warnings(&p), vec![]);
    }

    /// A request as the proxy matches it: one value per header name (the first).
    #[derive(Debug)]
    struct Request {
        method: String,
        path: String,
        headers: BTreeMap<String, String>,
    }

    /// The proxy's matching rule, written plainly (proxy/src/runtime.rs).
    fn matches(m: &RouteMatch, r: &Request) -> bool {
        let path = match &m.path {
            PathMatch::Any => true,
            PathMatch::Exact(e) => r.path == *e,
            PathMatch::Prefix(p) => r.path.starts_with(p.as_str()),
        };
        path && (m.methods.is_empty() || m.methods.contains(&r.method))
            && m.headers.iter().all(|(n, v)| r.headers.get(n) == Some(v))
    }

    /// Small alphabets, so that one matcher covers another often.
    fn arb_matcher() -> impl Strategy<Value = RouteMatch> {
        (
            prop_oneof![
                Just(PathMatch::Any),
                "/[ab]{0,3}".prop_map(PathMatch::Exact),
                "/[ab]{0,3}".prop_map(PathMatch::Prefix),
            ],
            proptest::collection::btree_set(prop_oneof![Just("GET"), Just("POST")], 0..=2),
            proptest::collection::btree_map(
                prop_oneof![Just("x-a"), Just("x-b")],
                prop_oneof![Just("1"), Just("2")],
                0..=2,
            ),
        )
            .prop_map(|(path, methods, headers)| RouteMatch {
                path,
                methods: methods.into_iter().map(str::to_owned).collect(),
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v.to_owned()))
                    .collect(),
                grpc: None,
            })
    }

    /// A request that `m` matches, otherwise arbitrary.
    fn request_for(m: RouteMatch) -> impl Strategy<Value = (RouteMatch, Request)> {
        let path = match &m.path {
            PathMatch::Any => prop_oneof!["/[ab/]{0,4}", Just("*".to_owned())].boxed(),
            PathMatch::Exact(e) => Just(e.clone()).boxed(),
            PathMatch::Prefix(p) => {
                let p = p.clone();
                "[ab/]{0,3}"
                    .prop_map(move |rest| format!("{p}{rest}"))
                    .boxed()
            }
        };
        let method = if m.methods.is_empty() {
            prop_oneof![Just("GET"), Just("POST"), Just("PUT")]
                .prop_map(str::to_owned)
                .boxed()
        } else {
            proptest::sample::select(m.methods.clone()).boxed()
        };
        let extra = proptest::collection::btree_map(
            prop_oneof![Just("x-a"), Just("x-b"), Just("x-c")],
            prop_oneof![Just("1"), Just("2")],
            0..=3,
        );
        (path, method, extra).prop_map(move |(path, method, extra)| {
            let mut headers: BTreeMap<String, String> = extra
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            headers.extend(m.headers.iter().cloned());
            (
                m.clone(),
                Request {
                    method,
                    path,
                    headers,
                },
            )
        })
    }

    proptest! {
        #[test]
        fn a_covering_route_matches_every_request_the_covered_one_matches(
            earlier in arb_matcher(),
            (later, request) in arb_matcher().prop_flat_map(request_for),
        ) {
            prop_assert!(matches(&later, &request));
            if covers(&earlier, &later) {
                prop_assert!(matches(&earlier, &request), "{earlier:?} covers {later:?} but not {request:?}");
            }
        }
    }
}
