//! State shared by every request of every listener and by the admin, reload and
//! background tasks: the live snapshot, the metrics, the access log.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::Registry;

use crate::accesslog::AccessLog;
use crate::globallimit::GlobalLimits;
use crate::metrics::Metrics;
use crate::runtime::{DurationCollector, Runtime};
use crate::services::ServiceSets;
use crate::trace::IdGenerator;

pub struct Shared {
    /// The live snapshot, replaced whole on reload; [`Runtime::empty`] until a
    /// policy loads.
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub metrics: Metrics,
    pub ids: IdGenerator,
    /// Requests between their exchange's start and its end; the drain waits for 0.
    pub inflight: AtomicUsize,
    pub access_log: AccessLog,
    /// Redis reachability and the sync task's wake-up, for the global rate limits.
    pub globals: Arc<GlobalLimits>,
    /// The Services' endpoint sets pushed by the control plane (empty in file
    /// mode): written whole by the endpoints stream, read by the swap into the
    /// live snapshot (`tasks::apply_resolved`) and by /config_dump.
    pub services: ArcSwap<ServiceSets>,
}

impl Shared {
    /// Everything empty: no policy yet, metrics on a registry of their own (which
    /// also exports the per-route duration histograms of whatever snapshot is live).
    pub fn new(access_log: bool, redis: bool) -> prometheus::Result<Shared> {
        let runtime = Arc::new(ArcSwap::from_pointee(Runtime::empty()));
        let registry = Registry::new();
        registry.register(Box::new(DurationCollector::new(Arc::clone(&runtime))?))?;
        Ok(Shared {
            runtime,
            metrics: Metrics::register(registry)?,
            ids: IdGenerator::default(),
            inflight: AtomicUsize::new(0),
            access_log: AccessLog::new(access_log),
            globals: GlobalLimits::new(redis),
            services: ArcSwap::from_pointee(ServiceSets::default()),
        })
    }
}
