//! The admin listener (loopback by default): `/live`, `/ready`, `/metrics`,
//! `/config_dump`. Read-only; it never changes the proxy's state.
//!
//! `/metrics` is Prometheus' text format, or OpenMetrics with exemplars on the
//! request-duration buckets for a scrape whose `Accept` asks for it (`openmetrics`).
//!
//! The telemetry listener (`--telemetry`, the pod IP in Kubernetes) serves the
//! same `/live`, `/ready` and `/metrics` for probes and Prometheus, and nothing
//! else: `/config_dump` shows every policy and the Redis keys, and stays on the
//! admin listener, on loopback.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use fnv::FnvHashMap;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::listening::Service;
use sluice_policy::spec::TrafficPolicySpec;

use crate::accesslog::Timestamp;
use crate::exemplar::Exemplar;
use crate::openmetrics;
use crate::shared::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
    /// The proxy's listeners: ready means they accept connections, not only that a
    /// policy is loaded (pingora binds each service on its own runtime, so the admin
    /// listener can be up before them).
    pub listeners: Vec<std::net::SocketAddr>,
    /// What this listener serves.
    pub scope: Scope,
    /// The workload identity comes from the control plane: not ready until the
    /// first certificate is in (as Linkerd's proxy), so that a strict peer never
    /// sees this pod's traffic in plaintext and its inbound listener can answer
    /// meshed callers from its first request.
    pub needs_identity: bool,
}

/// What an admin-style listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything (`--admin`).
    Full,
    /// Health and metrics only (`--telemetry`).
    Telemetry,
}

/// The first listener not accepting connections yet, if any.
fn closed_listener(listeners: &[std::net::SocketAddr]) -> Option<std::net::SocketAddr> {
    listeners.iter().copied().find(|addr| {
        let mut target = *addr;
        if target.ip().is_unspecified() {
            target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_millis(200))
            .is_err()
    })
}

/// Per policy, each backend's resolved addresses: `{"policy": {"api:8080":
/// ["10.0.0.1:8080", ...]}}` (empty for a name that resolved to nothing).
fn endpoints(rt: &crate::runtime::Runtime) -> serde_json::Value {
    rt.policies
        .iter()
        .map(|p| {
            let backends: serde_json::Map<String, serde_json::Value> = p
                .endpoints
                .backends()
                .map(|(label, addrs)| {
                    let addrs = addrs.iter().map(|a| serde_json::Value::from(a.to_string()));
                    (label.to_owned(), addrs.collect())
                })
                .collect();
            (p.name.clone(), serde_json::Value::Object(backends))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The Services' endpoint sets pushed by the control plane: `{"ns/name": {"version":
/// 3, "endpoints": [{"ip", "servicePort", "servicePortName", "targetPort", "ready",
/// "serving", "terminating", "pod", "zone", "identity"}]}}`; empty in file mode.
fn service_endpoints(services: &crate::services::ServiceSets) -> serde_json::Value {
    services
        .iter()
        .map(|(key, set)| {
            let endpoints: Vec<serde_json::Value> = set
                .endpoints
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "ip": e.ip.to_string(),
                        "servicePort": e.service_port,
                        "servicePortName": e.service_port_name,
                        "targetPort": e.target_port,
                        "ready": e.ready,
                        "serving": e.serving,
                        "terminating": e.terminating,
                        "pod": e.pod,
                        "zone": e.zone,
                        // The workload it must prove to be (mTLS), if meshed.
                        "identity": e.identity.as_deref(),
                    })
                })
                .collect();
            let set = serde_json::json!({"version": set.version, "endpoints": endpoints});
            (key.to_owned(), set)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Per policy, who may call it (its inbound requests): the mTLS mode as compiled
/// (`null`: the listener's `--mtls-mode`) and its authorization in brief.
fn access(rt: &crate::runtime::Runtime) -> serde_json::Value {
    rt.set
        .policies
        .iter()
        .map(|p| {
            let authorization = p.authorization.as_ref().map(|a| {
                let rules: Vec<serde_json::Value> = a
                    .rules
                    .iter()
                    .map(|r| {
                        let from: Vec<String> = r
                            .service_accounts
                            .iter()
                            .map(ToString::to_string)
                            .chain(r.namespaces.iter().map(|ns| format!("{ns}/*")))
                            .collect();
                        serde_json::json!({"from": from, "routes": r.routes})
                    })
                    .collect();
                serde_json::json!({"default": a.default.as_str(), "rules": rules})
            });
            let access = serde_json::json!({
                "mtls": p.mtls.map(|m| m.as_str()),
                "authorization": authorization,
            });
            (p.id().to_string(), access)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

impl Admin {
    /// The proxy's own workload identity for `/config_dump`: its SPIFFE ID and
    /// when its certificate expires; `null` without one (no mTLS).
    fn identity(&self) -> serde_json::Value {
        match self.shared.identity.current() {
            Some(active) => serde_json::json!({
                "id": active.identity.to_string(),
                "not_after_unix": active
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            }),
            None => serde_json::Value::Null,
        }
    }

    /// The global rate limits' state: whether Redis answers, and per route its
    /// bucket's Redis key, the keys tracked and the tokens leased right now.
    fn global_limits(&self, rt: &crate::runtime::Runtime) -> serde_json::Value {
        let globals = &self.shared.globals;
        let routes: Vec<serde_json::Value> = rt
            .routes()
            .filter_map(|r| r.global.as_deref().map(|g| (r, g)))
            .map(|(r, g)| {
                serde_json::json!({
                    "policy": r.policy,
                    "route": r.name,
                    "redisKey": g.prefix(),
                    "trackedKeys": g.tracked_keys(),
                    "leased": g.leased(),
                })
            })
            .collect();
        serde_json::json!({
            "redisConfigured": globals.configured(),
            "redisReachable": globals.reachable(),
            "routes": routes,
        })
    }
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> http::Response<Vec<u8>> {
    let mut resp = http::Response::new(body);
    *resp.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

impl Admin {
    /// `/metrics`: OpenMetrics, with the duration histograms' exemplars, when the
    /// scrape's `accept` header asks for it (Prometheus does); else the text format.
    fn metrics(&self, accept: Option<&str>) -> http::Response<Vec<u8>> {
        let metrics = &self.shared.metrics;
        // Requests count themselves in `Shared::inflight` only; the gauge is that
        // count as of this scrape.
        let inflight = self.shared.inflight.count();
        metrics
            .inflight
            .set(i64::try_from(inflight).unwrap_or(i64::MAX));
        if !accept.is_some_and(openmetrics::accepted) {
            return reply(200, "text/plain; version=0.0.4", metrics.render());
        }
        // Read before the histograms are gathered: an exemplar shown is one its
        // bucket has already counted (`RouteLive::observe` counts first).
        let runtime = self.shared.runtime.load();
        // By policy, then route: a map keyed by both could not be looked up with
        // the labels' shorter-lived strings.
        let mut exemplars: FnvHashMap<&str, FnvHashMap<&str, Vec<Exemplar>>> =
            FnvHashMap::default();
        for route in runtime.routes() {
            let latest = route.series.exemplars();
            if !latest.is_empty() {
                let series = &route.series;
                exemplars
                    .entry(series.policy())
                    .or_default()
                    .insert(series.route(), latest);
            }
        }
        let body = metrics.render_openmetrics(|policy, route| {
            exemplars
                .get(policy)
                .and_then(|routes| routes.get(route))
                .map(Vec::as_slice)
                .unwrap_or(&[])
        });
        reply(200, openmetrics::CONTENT_TYPE, body)
    }

    /// The admin response for `path`, for a client that sent `accept` (separate
    /// from the session for tests).
    pub fn answer(&self, path: &str, accept: Option<&str>) -> http::Response<Vec<u8>> {
        if self.scope == Scope::Telemetry && !matches!(path, "/live" | "/ready" | "/metrics") {
            return reply(
                404,
                "text/plain",
                b"not found: this listener serves /live, /ready and /metrics; the rest is on the admin listener (loopback)\n".to_vec(),
            );
        }
        let runtime = self.shared.runtime.load_full();
        match path {
            "/live" => reply(200, "text/plain", b"live\n".to_vec()),
            "/ready" => match &runtime {
                rt if !rt.loaded() => reply(
                    503,
                    "text/plain",
                    b"not ready: no valid policy loaded yet\n".to_vec(),
                ),
                _ if self.needs_identity && self.shared.identity.current().is_none() => reply(
                    503,
                    "text/plain",
                    b"not ready: no workload certificate from the control plane yet\n".to_vec(),
                ),
                _ if closed_listener(&self.listeners).is_some() => reply(
                    503,
                    "text/plain",
                    b"not ready: a listener is not accepting connections yet\n".to_vec(),
                ),
                rt => reply(
                    200,
                    "text/plain",
                    // With on-demand discovery a proxy is ready holding nothing yet.
                    format!(
                        "ready: policy version {} ({} policies held) from {}\n",
                        rt.version,
                        rt.policies.len(),
                        rt.source
                    )
                    .into_bytes(),
                ),
            },
            "/metrics" => self.metrics(accept),
            "/config_dump" => {
                let dump = match &runtime {
                    rt if rt.loaded() => serde_json::json!({
                        "version": rt.version,
                        "source": rt.source,
                        "loadedAt": Timestamp(rt.loaded_at).to_string(),
                        // Each policy's version as the control plane names it.
                        "policyVersions": rt.set.policies.iter().map(|p| (p.id().to_string(), sluice_policy::policy_yaml(p).1)).collect::<std::collections::BTreeMap<_, _>>(),
                        "policies": rt.set.policies.iter().map(TrafficPolicySpec::from).collect::<Vec<_>>(),
                        "identity": self.identity(),
                        "access": access(rt),
                        "globalRateLimits": self.global_limits(rt),
                        "endpoints": endpoints(rt),
                        "serviceEndpoints": service_endpoints(&self.shared.services.load()),
                    }),
                    _ => serde_json::json!({"version": null, "source": null, "policies": []}),
                };
                let mut body = serde_json::to_vec_pretty(&dump).unwrap_or_default();
                body.push(b'\n');
                reply(200, "application/json", body)
            }
            _ => reply(
                404,
                "text/plain",
                b"not found; try /live, /ready, /metrics, /config_dump\n".to_vec(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let head = session.req_header();
        let accept = head
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        self.answer(head.uri.path(), accept)
    }
}

/// Serves an [`Admin`] on a socket bound beforehand (`crate::listeners`: port 0
/// works, and a port in use is a clear exit), as a pingora background service.
pub struct AdminListener {
    admin: Arc<Admin>,
    /// Taken once, when the service starts.
    socket: Mutex<Option<std::net::TcpListener>>,
}

impl AdminListener {
    /// Serves `admin` on `socket` (bound, non-blocking).
    pub fn new(admin: Admin, socket: std::net::TcpListener) -> Self {
        AdminListener {
            admin: Arc::new(admin),
            socket: Mutex::new(Some(socket)),
        }
    }
}

#[async_trait]
impl BackgroundService for AdminListener {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(socket) = socket else { return };
        let listener = match tokio::net::TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = &e as &dyn std::error::Error, "cannot listen");
                std::process::exit(1);
            }
        };
        // Like pingora's own listeners: stop accepting at shutdown; connections
        // already accepted see the same shutdown signal.
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return } else { continue }
                }
            };
            let Ok((stream, _)) = accepted else {
                // EMFILE and the like: back off briefly instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            };
            let (admin, shutdown) = (Arc::clone(&self.admin), shutdown.clone());
            tokio::spawn(async move {
                let stream: pingora::protocols::l4::stream::Stream = stream.into();
                Service::<Admin>::handle_event(Box::new(stream), admin, shutdown).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    /// What Prometheus 2.x sends with every scrape.
    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    /// An admin over a proxy holding policy `p` (route `r`, SLO threshold 300 ms)
    /// whose route settled one request of 20 ms carrying trace [`TRACE`].
    fn admin_with_an_exemplar() -> Admin {
        let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  hosts: [h]\n  backends: [{address: \"127.0.0.1:9\"}]\n  slo: {availability: 0.99, latency: {threshold: 300ms, target: 0.99}}\n  routes: [{name: r}]\n";
        let set = sluice_policy::parse_str(std::path::Path::new("p.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let shared = Arc::new(Shared::new(false, false).unwrap_or_else(|e| panic!("{e}")));
        let rt = crate::runtime::Runtime::build(set, "test".into(), None, &shared.globals)
            .unwrap_or_else(|e| panic!("{e}"));
        shared.runtime.store(Arc::new(rt));
        let runtime = shared.runtime.load();
        let route = runtime.routes().next().expect("route r");
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_733_390_000_123);
        route
            .series
            .record(&shared.series, route.slo_threshold, |live| {
                live.observe(std::time::Duration::from_millis(20), Some((TRACE, at)))
            });
        Admin {
            shared: Arc::clone(&shared),
            listeners: Vec::new(),
            scope: Scope::Telemetry,
            needs_identity: false,
        }
    }

    fn content_type(response: &http::Response<Vec<u8>>) -> &str {
        response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[test]
    fn a_scrape_asking_for_openmetrics_gets_the_duration_exemplars() {
        let admin = admin_with_an_exemplar();
        let response = admin.answer("/metrics", Some(PROMETHEUS_ACCEPT));
        assert_eq!(response.status(), 200);
        assert_eq!(content_type(&response), openmetrics::CONTENT_TYPE);
        let body = String::from_utf8_lossy(response.body());
        assert!(body.ends_with("\n# EOF\n"), "{body}");
        let marked: Vec<&str> = body.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(
            marked,
            [format!("sluice_request_duration_seconds_bucket{{policy=\"p\",route=\"r\",le=\"0.025\"}} 1 # {{trace_id=\"{TRACE}\"}} 0.02 1733390000.123")],
            "{body}"
        );
        // Every family of the text format is there, counters declared without
        // their `_total`.
        let text = admin.answer("/metrics", None);
        let text = String::from_utf8_lossy(text.body());
        let declared = |body: &str| -> Vec<String> {
            body.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .map(|t| t.replacen("_total counter", " counter", 1))
                .collect()
        };
        assert_eq!(declared(&body), declared(&text));
        assert!(declared(&body).contains(&"sluice_passthrough_requests counter".to_owned()));
    }

    #[test]
    fn other_scrapes_get_the_text_format_without_exemplars() {
        let admin = admin_with_an_exemplar();
        for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
            let response = admin.answer("/metrics", accept);
            assert_eq!(content_type(&response), "text/plain; version=0.0.4");
            let body = String::from_utf8_lossy(response.body());
            assert!(!body.contains("# EOF") && !body.contains(" # {"), "{body}");
            assert!(
                body.contains("sluice_request_duration_seconds_bucket{policy=\"p\",route=\"r\",le=\"0.025\"} 1\n"),
                "{body}"
            );
        }
    }

    #[test]
    fn the_dump_shows_each_policys_mtls_mode_and_authorization_in_brief() {
        let yaml = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: orders, namespace: shop}\nspec:\n  mtls: {mode: strict}\n  authorization:\n    rules:\n      - from: {serviceAccounts: [shop/frontend], namespaces: [ops]}\n        routes: [default]\n---\napiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: open}\nspec: {}\n";
        let set = sluice_policy::parse_str(std::path::Path::new("p.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let globals = crate::globallimit::GlobalLimits::new(false);
        let rt = crate::runtime::Runtime::build(set, "test".into(), None, &globals)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            access(&rt),
            serde_json::json!({
                "shop/orders": {
                    "mtls": "strict",
                    "authorization": {
                        "default": "deny",
                        "rules": [{"from": ["shop/frontend", "ops/*"], "routes": ["default"]}],
                    },
                },
                "open": {"mtls": null, "authorization": null},
            })
        );
    }
}
