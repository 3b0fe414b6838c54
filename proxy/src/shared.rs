//! State shared by every request of every listener and by the admin, reload and
//! background tasks: the live snapshot, the metrics, the access log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use fnv::FnvHashSet;
use prometheus::Registry;

use crate::accesslog::AccessLog;
use crate::demand::Demand;
use crate::endpoints::{literal, Endpoints, Member};
use crate::globallimit::GlobalLimits;
use crate::metrics::{Metrics, ROUTE_SERIES_IDLE};
use crate::resolve::Names;
use crate::runtime::{DurationCollector, Runtime};
use crate::series::Ledger;
use crate::services::ServiceSets;
use crate::shard::{Handle, InFlight, Live};
use crate::trace::{IdGenerator, Tracer};

/// Aligned to 128 bytes so that its `Arc`'s reference counts sit on a line of
/// their own, not on the fields every request reads. (Exchanges hold per-thread
/// [`Handle`]s, so those counts are written at set-up and by background tasks,
/// not per request; the alignment keeps it so should a per-request clone return.)
#[repr(align(128))]
pub struct Shared {
    /// The live snapshot, replaced whole on reload; [`Runtime::empty`] until a
    /// policy loads.
    pub runtime: Arc<Live<Runtime>>,
    pub metrics: Metrics,
    /// The routes and policies that have metric series now, and how long they keep
    /// them without traffic (see `series`).
    pub series: Ledger,
    pub ids: IdGenerator,
    /// Requests between their exchange's start and its end; the drain waits for 0.
    pub inflight: InFlight,
    pub access_log: AccessLog,
    /// Redis reachability and the sync task's wake-up, for the global rate limits.
    pub globals: Arc<GlobalLimits>,
    /// The Services' endpoint sets pushed by the control plane (empty in file
    /// mode): written whole by the endpoints stream, read by the swap into the
    /// live snapshot (`tasks::apply_resolved`) and by /config_dump.
    pub services: ArcSwap<ServiceSets>,
    /// Policies discovered on demand (`--control-plane` without
    /// `--all-policies`): set once at start, before any listener serves.
    pub demand: std::sync::OnceLock<Demand>,
    /// This proxy's workload identity (mTLS between proxies): none until
    /// credentials are installed (files, or the control plane's CA).
    pub identity: Arc<crate::identity::tls::Tls>,
    /// Spans are recorded and queued for the OTLP exporter (`--otlp-endpoint`).
    pub tracer: Option<Tracer>,
}

impl Shared {
    /// Everything empty: no policy yet, metrics on a registry of their own (which
    /// also exports the per-route duration histograms of whatever snapshot is live).
    pub fn new(access_log: bool, redis: bool) -> prometheus::Result<Shared> {
        let runtime = Arc::new(Live::new(Arc::new(Runtime::empty())));
        let registry = Registry::new();
        registry.register(Box::new(DurationCollector::new(Arc::clone(&runtime))?))?;
        let metrics = Metrics::register(registry)?;
        let dropped = metrics.access_log_dropped.clone();
        Ok(Shared {
            runtime,
            metrics,
            series: Ledger::new(ROUTE_SERIES_IDLE),
            ids: IdGenerator::default(),
            inflight: InFlight::default(),
            access_log: AccessLog::new(access_log, dropped),
            globals: GlobalLimits::new(redis),
            services: ArcSwap::from_pointee(ServiceSets::default()),
            demand: std::sync::OnceLock::new(),
            identity: Arc::default(),
            tracer: None,
        })
    }
}

impl Shared {
    /// The live snapshot, for a request to be routed by and to keep for its whole
    /// life: a reference counted on the calling thread's line (see
    /// [`Live::pin`]), not on the snapshot's, which every thread shares.
    pub fn snapshot(&self) -> Handle<Runtime> {
        self.runtime.pin()
    }

    /// Routes and policies keep their series for `idle` without traffic, instead of
    /// [`ROUTE_SERIES_IDLE`] (`--metrics-idle`).
    pub fn with_metrics_idle(mut self, idle: Duration) -> Self {
        self.series = Ledger::new(idle);
        self
    }

    /// Records spans and queues them on `tracer` (for the exporter).
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = Some(tracer);
        self
    }

    /// Makes a reloaded snapshot the live one. It may replace a snapshot the
    /// endpoints stream had just swapped pods into, so the pushed Service sets go
    /// into it at once, not at the resolver job's next tick (named backends keep
    /// what the build resolved).
    pub fn install(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
        apply_resolved(self, &Names::default(), Instant::now());
        self.forget_removed_backends();
    }

    /// Removes the series of backends a reload took out of a policy it kept: the
    /// policy keeps its series while it has traffic, and a removed backend's gauges
    /// would otherwise stay at their last value (a `sluice_backend_healthy` of 0
    /// keeping an alert firing). Policies the reload removed go whole, with the
    /// rest of their series (see `series`).
    fn forget_removed_backends(&self) {
        let runtime = self.runtime.load();
        let policies: FnvHashSet<&str> = runtime.policies.iter().map(|p| p.name.as_str()).collect();
        let backends: FnvHashSet<(&str, &str)> = runtime
            .policies
            .iter()
            .flat_map(|p| {
                p.all_endpoints()
                    .flat_map(|e| e.backends().map(|(label, _)| (p.name.as_str(), label)))
            })
            .collect();
        self.metrics.remove_backends(|policy, backend| {
            // `app`: the inbound listener's local application, in no policy's backends.
            backend != "app" && policies.contains(policy) && !backends.contains(&(policy, backend))
        });
    }
}

/// Swaps in a snapshot whose endpoints are at the last good answers when some
/// policy's are not; true when it did. A Service backend with a pushed set takes
/// it (see `services`: the set has precedence over DNS); any other backend with no
/// answer yet keeps what it has; IP literals are their own answer. The endpoints
/// stream calls this too (with no DNS answers, so names keep what they have).
pub fn apply_resolved(shared: &Shared, names: &Names, now: Instant) -> bool {
    // Bounded: a lost compare-and-swap (a reload, or the other caller — the resolver
    // job and the endpoints stream both swap) is tried again on the newer snapshot,
    // so an acknowledged endpoint update is in the live snapshot when this returns;
    // past the bound, the resolver job's next tick corrects it.
    for _ in 0..8 {
        let current = shared.runtime.load_full();
        let services = shared.services.load();
        let replaced: Vec<Vec<(usize, Arc<Endpoints>)>> = current
            .policies
            .iter()
            .map(|policy| {
                policy
                    .endpoint_sets()
                    .filter_map(|(set, endpoints)| {
                        Some((set, Arc::new(resolved(endpoints, names, &services, now)?)))
                    })
                    .collect()
            })
            .collect();
        if replaced.iter().all(Vec::is_empty) {
            return false;
        }
        let next = Arc::new(current.with_endpoints(replaced));
        if shared.runtime.swap_if_current(&current, next) {
            return true;
        }
    }
    false
}

/// `endpoints` rebuilt on the pushed sets and the last good answers, when they
/// differ from them.
fn resolved(
    endpoints: &Endpoints,
    names: &Names,
    services: &ServiceSets,
    now: Instant,
) -> Option<Endpoints> {
    let namespace = endpoints.rule().namespace.as_deref();
    let wanted = endpoints
        .rule()
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if let Some(members) = services.members(b, namespace) {
                return members;
            }
            let Some(address) = b.dialable_address() else {
                return endpoints.backend_members(i);
            };
            let (host, port) = (address.host.as_str(), address.port);
            match (literal(host, port), names.addresses(host, port)) {
                (Some(addr), _) => vec![Member::ready(addr)],
                (None, Some(addrs)) => addrs.iter().copied().map(Member::ready).collect(),
                (None, None) => endpoints.backend_members(i),
            }
        })
        .collect();
    endpoints.with_members(wanted, now)
}
