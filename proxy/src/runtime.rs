//! The compiled, live policy: one immutable snapshot (routes, limiters, balancers,
//! metric handles) that a request pins for its whole life.
//!
//! A new snapshot is built off the request path from a validated `PolicySet` and the
//! previous snapshot. Stateful parts whose rule did not change are *carried over*
//! (the same `Arc` moves into the new snapshot): a token bucket keeps its tokens, a
//! balancer its position, a histogram its counts. Every stateful component goes
//! through [`carry`], so later ones (breakers, EWMA) get the same guarantee.

use fnv::FnvHashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::shard::Live;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use sluice_policy::{Backend, FallbackAction, Mode, PolicySet, Route, TrafficPolicy};

use crate::authz::Access;
use crate::breaker::CircuitBreaker;
use crate::budget::RetryBudget;
use crate::concurrency::ConcurrencyLimiter;
use crate::endpoints::{Endpoints, EndpointsRule};
use crate::globallimit::{GlobalLimiter, GlobalLimits};
use crate::metrics::{DURATION_HELP, DURATION_NAME};
use crate::pathmatch::{self, PathMatcher};
use crate::ratelimit::RouteLimiter;
use crate::series::{PolicySeries, RouteSeries};
use crate::tcplimit::TcpLimiter;

/// Aligned to 128 bytes so that its `Arc`'s reference counts sit on a line of
/// their own, not on the one holding the fields every request reads: they are
/// written when a thread's pin is refilled after a swap and by background loads
/// (requests clone the thread's pinned [`crate::shard::Handle`] instead, see
/// [`Live::pin`]).
#[repr(align(128))]
pub struct Runtime {
    /// Content hash of the canonical policy: equal policies give equal versions on
    /// every proxy, which makes version skew visible.
    pub version: String,
    /// Where the policy came from (`file:/path`, later `control-plane:URL`).
    pub source: String,
    pub loaded_at: SystemTime,
    pub set: PolicySet,
    pub policies: Vec<PolicyRuntime>,
    /// False only for the empty snapshot a proxy starts with: no policy loaded
    /// yet, so not ready, and every request is answered 503.
    loaded: bool,
    /// Host -> policy index. FNV, not SipHash: the keys come from validated policies
    /// (no flooding risk) and are short; FNV hashes them several times faster.
    hosts: FnvHashMap<String, usize>,
}

#[derive(Clone)]
pub struct PolicyRuntime {
    /// The policy's identity: `namespace/name`, or `name` without a namespace (see
    /// [`sluice_policy::PolicyId`]); the `policy` label of its metrics.
    pub name: String,
    /// Set when a request is routed to the policy's hosts; cleared by the job that
    /// releases policies discovered on demand and left unused (`control_plane`).
    /// Carried over across reloads, like every stateful part.
    pub used: Arc<std::sync::atomic::AtomicBool>,
    pub mode: Mode,
    /// Shared, so that a snapshot that only changes endpoints (DNS) is cheap to make.
    pub routes: Arc<Vec<RouteRuntime>>,
    /// The policy's backends.
    pub endpoints: Arc<Endpoints>,
    /// One per route, in route order: the route's own backends, balanced apart
    /// from the policy's (their own round-robin position, latencies, ejections),
    /// or `None` for a route that uses the policy's. Beside the routes rather than
    /// in them: like `endpoints`, a set may be rebuilt without the routes' state.
    pub route_endpoints: Vec<Option<Arc<Endpoints>>>,
    /// Whether the policy's own series (its backends') exist: carried by name.
    pub series: Arc<PolicySeries>,
    /// `spec.tcp`: the limits on its opaque TCP connections, carried while the
    /// rule is unchanged (open connections keep their slots across a reload).
    pub tcp: Option<Arc<TcpLimiter>>,
    /// `spec.mtls` and `spec.authorization`, for its inbound requests.
    pub access: Arc<Access>,
}

impl PolicyRuntime {
    /// The backends of route `route`'s requests: its own, else the policy's.
    pub fn endpoints_of(&self, route: usize) -> &Arc<Endpoints> {
        self.route_endpoints
            .get(route)
            .and_then(Option::as_ref)
            .unwrap_or(&self.endpoints)
    }

    /// Every set of backends of the policy: its own, then each route's own. Each
    /// needs the background work (slow-start refresh, health checks) of the first.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &Arc<Endpoints>> {
        self.endpoint_sets().map(|(_, e)| e)
    }

    /// [`Self::all_endpoints`] with each set's number, stable for the snapshot:
    /// 0 is the policy's, `1 + r` route `r`'s own (see [`Self::endpoint_set`]).
    pub fn endpoint_sets(&self) -> impl Iterator<Item = (usize, &Arc<Endpoints>)> {
        std::iter::once((0, &self.endpoints)).chain(
            self.route_endpoints
                .iter()
                .enumerate()
                .filter_map(|(r, e)| Some((1 + r, e.as_ref()?))),
        )
    }

    /// The set numbered `set` by [`Self::endpoint_sets`].
    pub fn endpoint_set(&self, set: usize) -> Option<&Arc<Endpoints>> {
        match set {
            0 => Some(&self.endpoints),
            r => self.route_endpoints.get(r - 1)?.as_ref(),
        }
    }
}

pub struct RouteRuntime {
    pub policy: String,
    pub name: String,
    pub route: Route,
    /// `route.matcher.path`, compiled (see [`crate::pathmatch`]).
    path: PathMatcher,
    /// The route's override, else the policy's mode.
    pub mode: Mode,
    pub limiter: Option<Arc<RouteLimiter>>,
    /// The rate limit shared with the other replicas (through Redis).
    pub global: Option<Arc<GlobalLimiter>>,
    pub breaker: Option<Arc<CircuitBreaker>>,
    pub concurrency: Option<Arc<ConcurrencyLimiter>>,
    pub budget: Option<Arc<RetryBudget>>,
    /// The resolved address of a `fallback.backend`, if any.
    pub fallback_addr: Option<SocketAddr>,
    /// The route's metric series, made at its first use (see `series`): carried by
    /// name, so its counters and its histogram outlive reloads.
    pub series: Arc<RouteSeries>,
    /// The policy's SLO latency threshold: a bucket of the route's histogram.
    pub slo_threshold: Option<std::time::Duration>,
}

/// Where a request goes: indices into the runtime it was routed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    NoPolicy,
    NoRoute { policy: usize },
    Route { policy: usize, route: usize },
}

/// Reuses `previous` when `same` says its rule is unchanged, else builds anew.
pub fn carry<S>(
    previous: Option<&Arc<S>>,
    same: impl Fn(&S) -> bool,
    make: impl FnOnce() -> S,
) -> Arc<S> {
    match previous {
        Some(p) if same(p) => Arc::clone(p),
        _ => Arc::new(make()),
    }
}

impl Runtime {
    pub fn build(
        set: PolicySet,
        source: String,
        previous: Option<&Runtime>,
        globals: &Arc<GlobalLimits>,
    ) -> prometheus::Result<Runtime> {
        let mut policies = Vec::with_capacity(set.policies.len());
        let mut hosts = FnvHashMap::default();
        for (index, policy) in set.policies.iter().enumerate() {
            let before = previous.and_then(|p| p.policy(&policy.id().to_string()));
            policies.push(compile_policy(policy, before, globals)?);
            for host in &policy.hosts {
                hosts.insert(host.clone(), index);
            }
        }
        Ok(Runtime {
            version: version_of(&set),
            source,
            loaded_at: SystemTime::now(),
            set,
            policies,
            loaded: true,
            hosts,
        })
    }

    /// What a proxy serves before its first policy: nothing (see [`Runtime::loaded`]).
    pub fn empty() -> Runtime {
        Runtime {
            version: String::new(),
            source: String::new(),
            loaded_at: SystemTime::now(),
            set: PolicySet::default(),
            policies: Vec::new(),
            loaded: false,
            hosts: FnvHashMap::default(),
        }
    }

    /// This snapshot with the endpoints of some policies replaced (`replaced[i]` for
    /// policy `i`; `None` keeps its own): what the resolver job stores when a name's
    /// addresses change. Everything else is the same `Arc`s, so no state is lost,
    /// and it is not a reload: version, source and load time stay.
    pub fn with_endpoints(&self, replaced: Vec<Vec<(usize, Arc<Endpoints>)>>) -> Runtime {
        let mut replaced = replaced.into_iter();
        let policies = self
            .policies
            .iter()
            .map(|p| {
                let mut p = p.clone();
                for (set, endpoints) in replaced.next().unwrap_or_default() {
                    match set {
                        0 => p.endpoints = endpoints,
                        r => {
                            if let Some(slot) = p.route_endpoints.get_mut(r - 1) {
                                *slot = Some(endpoints);
                            }
                        }
                    }
                }
                p
            })
            .collect();
        Runtime {
            version: self.version.clone(),
            source: self.source.clone(),
            loaded_at: self.loaded_at,
            set: self.set.clone(),
            policies,
            loaded: self.loaded,
            hosts: self.hosts.clone(),
        }
    }

    /// Whether a policy was loaded (false for [`Runtime::empty`]).
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// The policy with this identity (`namespace/name`, or `name`).
    pub fn policy(&self, id: &str) -> Option<&PolicyRuntime> {
        self.policies.iter().find(|p| p.name == id)
    }

    /// The index of the policy that owns `host` (port ignored, any case).
    pub fn policy_of_host(&self, host: &str) -> Option<usize> {
        let bare = sluice_policy::validate::host_without_port(host);
        if bare.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&bare.to_ascii_lowercase()).copied()
        } else {
            self.hosts.get(bare).copied()
        }
    }

    pub fn routes(&self) -> impl Iterator<Item = &RouteRuntime> {
        self.policies.iter().flat_map(|p| p.routes.iter())
    }

    /// Matches the Host (port ignored, case-insensitive) to a policy, then the first
    /// route whose path, method and headers match.
    pub fn route<'h>(
        &self,
        host: &str,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> Routed {
        match self.policy_of_host(host) {
            Some(policy) => self.route_in_policy(policy, method, path, header),
            None => Routed::NoPolicy,
        }
    }

    /// The policy one of whose backends, or one of whose routes' backends, is
    /// `addr` (transparent outbound matching).
    pub fn policy_by_backend(&self, addr: std::net::SocketAddr) -> Option<usize> {
        self.policies.iter().position(|p| {
            p.all_endpoints()
                .any(|e| e.targets.iter().any(|t| t.addr == addr))
        })
    }

    /// The index of the policy `name`: its identity (`namespace/name`), or a bare
    /// name (`--inbound-policy NAME`), which matches the first policy of that name
    /// in any namespace (a proxy holds its own namespace's inbound policy).
    pub fn policy_index(&self, name: &str) -> Option<usize> {
        self.policies
            .iter()
            .position(|p| p.name == name)
            .or_else(|| {
                self.policies
                    .iter()
                    .position(|p| p.name.rsplit_once('/').is_some_and(|(_, n)| n == name))
            })
    }

    /// The first route of policy `policy` whose path, method and headers match.
    pub fn route_in_policy<'h>(
        &self,
        policy: usize,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> Routed {
        let Some(p) = self.policies.get(policy) else {
            return Routed::NoPolicy;
        };
        let path_head = pathmatch::head(path.as_bytes());
        let matched = p.routes.iter().position(|r| {
            let m = &r.route.matcher;
            r.path.matches(path.as_bytes(), path_head)
                && (m.grpc.is_none() || is_grpc(header("content-type")))
                && (m.methods.is_empty() || m.methods.iter().any(|x| x == method))
                && m.headers
                    .iter()
                    .all(|(name, value)| header(name) == Some(value.as_bytes()))
        });
        match matched {
            Some(route) => Routed::Route { policy, route },
            None => Routed::NoRoute { policy },
        }
    }
}

/// Whether a request with this `content-type` is a gRPC call: `application/grpc`,
/// alone or with a subtype (`+proto`, `+json`) or parameters. gRPC-Web
/// (`application/grpc-web`) frames its status into the body, so it is not.
pub fn is_grpc(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let prefix = b"application/grpc";
    ct.len() >= prefix.len()
        && ct[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(ct.get(prefix.len()), None | Some(b'+' | b';'))
}

fn compile_policy(
    policy: &TrafficPolicy,
    before: Option<&PolicyRuntime>,
    globals: &Arc<GlobalLimits>,
) -> prometheus::Result<PolicyRuntime> {
    let id = policy.id().to_string();
    let endpoints = compile_endpoints(
        endpoints_rule(policy, &policy.backends),
        before.map(|b| &b.endpoints),
    );
    let slo_threshold = policy
        .slo
        .as_ref()
        .and_then(|s| s.latency.as_ref())
        .map(|l| l.threshold);
    let mut routes = Vec::with_capacity(policy.routes.len());
    let mut route_endpoints = Vec::with_capacity(policy.routes.len());
    for route in &policy.routes {
        let old = before.and_then(|b| b.routes.iter().find(|r| r.name == route.name));
        let limiter = route.rate_limit.as_ref().map(|rule| {
            carry(
                old.and_then(|o| o.limiter.as_ref()),
                |l| l.rule() == rule,
                || RouteLimiter::new(rule, governor::clock::DefaultClock::default()),
            )
        });
        let global = route.global_rate_limit.as_ref().map(|rule| {
            let before = old.and_then(|o| o.global.as_ref());
            let prefix =
                GlobalLimiter::prefix_for(policy.namespace.as_deref(), &policy.name, &route.name);
            carry(
                before,
                |g| g.rule() == rule && g.prefix() == prefix,
                || {
                    GlobalLimiter::new(
                        rule,
                        policy.namespace.as_deref(),
                        &policy.name,
                        &route.name,
                        Arc::clone(globals),
                        before.map(|b| &**b),
                    )
                },
            )
        });
        let now = Instant::now();
        let breaker = route.circuit_breaker.as_ref().map(|rule| {
            carry(
                old.and_then(|o| o.breaker.as_ref()),
                |b| b.rule() == rule,
                || CircuitBreaker::new(rule, now),
            )
        });
        let concurrency = route.concurrency.as_ref().map(|rule| {
            carry(
                old.and_then(|o| o.concurrency.as_ref()),
                |c| c.rule() == rule,
                || ConcurrencyLimiter::new(rule, now),
            )
        });
        let budget = route.retries.as_ref().map(|retries| {
            carry(
                old.and_then(|o| o.budget.as_ref()),
                |b| *b.rule() == retries.budget,
                || RetryBudget::new(&retries.budget, now),
            )
        });
        // Carried from the route's own backends before, if it had them: its
        // balancer state is not the policy's.
        let old_endpoints = before.and_then(|b| {
            let j = b.routes.iter().position(|r| r.name == route.name)?;
            b.route_endpoints.get(j)?.as_ref()
        });
        route_endpoints.push(
            route
                .backends
                .as_ref()
                .map(|backends| compile_endpoints(endpoints_rule(policy, backends), old_endpoints)),
        );
        let fallback_addr = match route.fallback.as_ref().map(|f| &f.action) {
            Some(FallbackAction::Backend(a)) => (a.host.as_str(), a.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next()),
            _ => None,
        };
        // By name, whatever the SLO threshold: a changed threshold remakes only the
        // histogram (the housekeeping job's `RouteSeries::relayout`), not the counters.
        let series = carry(
            old.map(|o| &o.series),
            |s| s.policy() == id && s.route() == route.name,
            || RouteSeries::new(&id, &route.name),
        );
        routes.push(RouteRuntime {
            policy: id.clone(),
            name: route.name.clone(),
            mode: route.effective_mode(policy.mode),
            route: route.clone(),
            path: PathMatcher::new(&route.matcher.effective_path()),
            limiter,
            global,
            breaker,
            concurrency,
            budget,
            fallback_addr,
            series,
            slo_threshold,
        });
    }
    let series = carry(
        before.map(|b| &b.series),
        |s| s.policy() == id,
        || PolicySeries::new(&id),
    );
    let tcp = policy.tcp.as_ref().map(|rule| {
        let previous = before.and_then(|b| b.tcp.as_ref());
        carry(
            previous,
            |t| t.rule() == rule,
            || TcpLimiter::after(rule, previous.map(|p| &**p)),
        )
    });
    Ok(PolicyRuntime {
        name: id,
        used: before.map_or_else(Default::default, |b| Arc::clone(&b.used)),
        mode: policy.mode,
        routes: Arc::new(routes),
        endpoints,
        route_endpoints,
        series,
        tcp,
        access: Arc::new(Access::new(policy)),
    })
}

/// A set of backends under the policy's balancer settings (the policy's own or a
/// route's: both are balanced the same way).
///
/// A Service reached by a named port has no address to dial by name (its model
/// address has port 0): it is in the rule, but `Endpoints::new` gives it no endpoint
/// (rather than one at port 0) until the control plane sends the Service's endpoints.
pub fn endpoints_rule(policy: &TrafficPolicy, backends: &[Backend]) -> EndpointsRule {
    EndpointsRule {
        backends: backends.to_vec(),
        load_balancer: policy.load_balancer.clone(),
        health_check: policy.health_check.clone(),
        outlier_detection: policy.outlier_detection.clone(),
        namespace: policy.namespace.clone(),
    }
}

/// The previous endpoints when their rule is unchanged, else new ones that keep
/// what they can of the previous (slow-start progress).
fn compile_endpoints(rule: EndpointsRule, previous: Option<&Arc<Endpoints>>) -> Arc<Endpoints> {
    carry(
        previous,
        |e| *e.rule() == rule,
        || Endpoints::new(rule.clone(), previous.map(|p| &**p), Instant::now()),
    )
}

/// The content hash of the canonical YAML (the control plane's, shortened):
/// stable across processes and Rust versions.
fn version_of(set: &PolicySet) -> String {
    let mut hash = sluice_policy::hash::content_hash(&sluice_policy::to_yaml(set));
    hash.truncate(12);
    hash
}

/// `sluice_request_duration_seconds{policy,route}`: a histogram per route of the live
/// snapshot that has series (used lately, see `series`), with the SLO threshold among
/// its buckets; routes without traffic and removed routes are left out.
pub struct DurationCollector {
    runtime: Arc<Live<Runtime>>,
    desc: Desc,
}

impl DurationCollector {
    pub fn new(runtime: Arc<Live<Runtime>>) -> prometheus::Result<Self> {
        let desc = Desc::new(
            DURATION_NAME.into(),
            DURATION_HELP.into(),
            vec!["policy".into(), "route".into()],
            Default::default(),
        )?;
        Ok(DurationCollector { runtime, desc })
    }
}

impl Collector for DurationCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let runtime = self.runtime.load();
        let mut family: Option<MetricFamily> = None;
        for route in runtime.routes() {
            for mut f in route.series.collect_duration() {
                match family.as_mut() {
                    None => family = Some(f),
                    Some(all) => all.mut_metric().append(f.mut_metric()),
                }
            }
        }
        family.into_iter().collect()
    }
}

/// Milliseconds since the epoch, for logs and dumps.
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(tcp: &str, previous: Option<&Runtime>) -> Runtime {
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: db}}\nspec:\n  backends:\n    - address: 127.0.0.1:5432\n  tcp: {tcp}\n"
        );
        let set = sluice_policy::load::parse_str(std::path::Path::new("t.yaml"), &yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        Runtime::build(set, "test".into(), previous, &GlobalLimits::new(false))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn limiter(rt: &Runtime) -> &Arc<TcpLimiter> {
        rt.policies[0]
            .tcp
            .as_ref()
            .unwrap_or_else(|| panic!("spec.tcp"))
    }

    #[test]
    fn tcp_limits_carry_over_a_reload_that_leaves_them_unchanged() {
        let first = build("{maxConnections: 1}", None);
        let _open = limiter(&first).admit().unwrap_or_else(|e| panic!("{e:?}"));
        let second = build("{maxConnections: 1}", Some(&first));
        assert!(Arc::ptr_eq(limiter(&first), limiter(&second)));
        // The connection opened before the reload still holds the only slot.
        assert!(limiter(&second).admit().is_err());
    }

    #[test]
    fn changed_tcp_limits_still_count_the_open_connections() {
        let first = build("{maxConnections: 1}", None);
        let open = limiter(&first).admit().unwrap_or_else(|e| panic!("{e:?}"));
        let second = build("{maxConnections: 2}", Some(&first));
        assert!(!Arc::ptr_eq(limiter(&first), limiter(&second)));
        assert_eq!(limiter(&second).open(), 1);
        let _another = limiter(&second).admit().unwrap_or_else(|e| panic!("{e:?}"));
        assert!(limiter(&second).admit().is_err());
        // The slot taken under the old rule is given back to the new one.
        drop(open);
        assert_eq!(limiter(&second).open(), 1);
    }
}
