//! The control plane's Prometheus metrics, on an explicit registry (no globals):
//! [`crate::serve::start`] creates one per server and hands [`Metrics`] to the
//! components that count (the policy sources, the gRPC API, the token reviewer, the
//! webhook), so every test gets a fresh set.
//!
//! Labels come from fixed sets only (a result, an outcome), never node ids,
//! namespaces or policy names: a fleet of proxies must not become a fleet of series.
//! Every labelled series exists from the start at 0, because `rate()` over a counter
//! that appears late misses its first increments, and an alert on
//! `{result="rejected"}` needs the series to exist before the first rejection.
//!
//! Every metric here has a row in `docs/metrics.md` (checked by
//! `control-plane/tests/observability_assets.rs`).

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::store::Offer;

/// The `result` of a policy change offered by a source.
pub const POLICY_CHANGE_RESULTS: [&str; 3] = ["accepted", "rejected", "unchanged"];
/// The `result` of a TokenReview (as [`crate::auth::ReviewObserver`] reports it).
pub const TOKEN_REVIEW_RESULTS: [&str; 3] = ["authenticated", "refused", "error"];
/// The `outcome` of an admission review ([`crate::webhook::Outcome`]).
pub const WEBHOOK_OUTCOMES: [&str; 4] = ["patched", "unchanged", "refused", "error"];
/// The `result` of a TrafficPolicy status write ([`crate::status::StatusWriter`]).
pub const STATUS_WRITE_RESULTS: [&str; 4] = ["written", "not_found", "refused", "error"];

/// Every metric of one control plane. Cloning shares the series (the handles are
/// reference-counted), so each component holds its own copy.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The number of the served set (0 before the first accepted change).
    pub served_version: IntGauge,
    /// Proxies with at least one open policy stream.
    pub proxies_connected: IntGauge,
    /// Policy updates sent to proxies.
    pub pushes: IntCounter,
    /// Updates proxies applied whole.
    pub acks: IntCounter,
    /// Updates proxies refused a policy of.
    pub nacks: IntCounter,
    /// Failed lists or watches of the TrafficPolicy resources (each is retried).
    pub watch_restarts: IntCounter,
    /// Services with an endpoint set (`--kubernetes`).
    pub endpoint_sets: IntGauge,
    /// Changes of Services' endpoint sets (a Service added, changed or removed).
    pub endpoint_set_changes: IntCounter,
    /// `EndpointsUpdate`s sent to proxies.
    pub endpoint_updates: IntCounter,
    /// Endpoint updates proxies refused.
    pub endpoint_nacks: IntCounter,
    /// Failed lists or watches of Services or EndpointSlices (each is retried).
    pub endpoint_watch_restarts: IntCounter,
    policy_changes: IntCounterVec,
    token_reviews: IntCounterVec,
    webhook_reviews: IntCounterVec,
    status_writes: IntCounterVec,
    /// The CA certificate's notAfter (`--ca-cert`; 0 without a CA).
    pub ca_not_after: IntGauge,
    certificate_requests: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// A counter with one label whose every value in `values` exists from the start.
fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
    registry.register(Box::new(c.clone()))?;
    for value in values {
        c.with_label_values(&[*value]);
    }
    Ok(c)
}

impl Metrics {
    /// Registers every metric on `registry`, and the process's own (`process_*`).
    pub fn register(registry: Registry) -> prometheus::Result<Self> {
        let r = &registry;
        // CPU, memory, threads and file descriptors, as every Prometheus client
        // library exports them: the fleet dashboard reads them without cAdvisor.
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            served_version: gauge(
                r,
                "sluice_cp_served_version",
                "The policy version the control plane serves (0 before the first accepted change).",
            )?,
            proxies_connected: gauge(
                r,
                "sluice_cp_proxies_connected",
                "Proxies holding a policy stream to this control plane.",
            )?,
            pushes: counter(
                r,
                "sluice_cp_pushes_total",
                "Policy updates sent to proxies (only the policies each subscribed to that changed).",
            )?,
            acks: counter(
                r,
                "sluice_cp_acks_total",
                "Policy updates proxies applied whole (ACK).",
            )?,
            nacks: counter(
                r,
                "sluice_cp_nacks_total",
                "Policy updates proxies refused a policy of (NACK; the refused policy keeps its previous version there, the others apply).",
            )?,
            watch_restarts: counter(
                r,
                "sluice_cp_watch_restarts_total",
                "Lists or watches of the TrafficPolicy resources that failed and are retried with backoff.",
            )?,
            endpoint_sets: gauge(
                r,
                "sluice_cp_endpoint_sets",
                "Kubernetes Services whose endpoint set the control plane serves.",
            )?,
            endpoint_set_changes: counter(
                r,
                "sluice_cp_endpoint_set_changes_total",
                "Changes of Services' endpoint sets (added, changed or removed), each a new version of that Service's set.",
            )?,
            endpoint_updates: counter(
                r,
                "sluice_cp_endpoint_updates_total",
                "EndpointsUpdates sent to proxies (each carries the whole set of every Service it names).",
            )?,
            endpoint_nacks: counter(
                r,
                "sluice_cp_endpoint_nacks_total",
                "EndpointsUpdates proxies answered with a NACK.",
            )?,
            endpoint_watch_restarts: counter(
                r,
                "sluice_cp_endpoint_watch_restarts_total",
                "Lists or watches of Services or EndpointSlices that failed and are retried with backoff.",
            )?,
            policy_changes: counter_vec(
                r,
                "sluice_cp_policy_changes_total",
                "Policy sets offered by the source, by result (accepted, rejected, unchanged).",
                "result",
                &POLICY_CHANGE_RESULTS,
            )?,
            token_reviews: counter_vec(
                r,
                "sluice_cp_token_reviews_total",
                "Kubernetes TokenReviews of proxies' tokens, by result (authenticated, refused, error).",
                "result",
                &TOKEN_REVIEW_RESULTS,
            )?,
            webhook_reviews: counter_vec(
                r,
                "sluice_cp_webhook_reviews_total",
                "Admission reviews the injection webhook answered, by outcome (patched, unchanged, refused, error).",
                "outcome",
                &WEBHOOK_OUTCOMES,
            )?,
            status_writes: counter_vec(
                r,
                "sluice_cp_status_writes_total",
                "TrafficPolicy status writes (PATCH of the status subresource), by result (written, not_found, refused, error).",
                "result",
                &STATUS_WRITE_RESULTS,
            )?,
            ca_not_after: gauge(
                r,
                "sluice_cp_ca_not_after_timestamp_seconds",
                "When the CA certificate that signs workload certificates expires (Unix seconds; 0 when the control plane is no CA).",
            )?,
            certificate_requests: counter_vec(
                r,
                "sluice_cp_certificate_requests_total",
                "Workload certificate requests (Identity.Certify), by result (issued, refused, invalid, error).",
                "result",
                &crate::ca::CERTIFY_RESULTS,
            )?,
            registry,
        })
    }

    /// Counts what a source's change came to; an accepted one is now served.
    pub fn offered(&self, offer: &Offer) {
        let result = match offer {
            Offer::Accepted(version) => {
                self.served(*version);
                "accepted"
            }
            Offer::Rejected => "rejected",
            Offer::Unchanged => "unchanged",
        };
        self.policy_changes.with_label_values(&[result]).inc();
    }

    /// `version` is served now (an accepted change, or a rollback).
    pub fn served(&self, version: u64) {
        self.served_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// Counts one status write; `result` is one of [`STATUS_WRITE_RESULTS`].
    pub fn status_written(&self, result: &'static str) {
        self.status_writes.with_label_values(&[result]).inc();
    }

    /// Counts one certificate request; `result` is one of
    /// [`crate::ca::CERTIFY_RESULTS`].
    pub fn certified(&self, result: &'static str) {
        self.certificate_requests.with_label_values(&[result]).inc();
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> prometheus::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

impl crate::auth::ReviewObserver for Metrics {
    fn reviewed(&self, result: &'static str) {
        self.token_reviews.with_label_values(&[result]).inc();
    }
}

impl crate::webhook::AdmissionObserver for Metrics {
    fn admitted(&self, outcome: crate::webhook::Outcome) {
        self.webhook_reviews
            .with_label_values(&[outcome.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::register(Registry::new()).expect("register")
    }

    fn exposition(m: &Metrics) -> String {
        String::from_utf8(m.render().expect("render")).expect("utf-8")
    }

    #[test]
    fn every_labelled_series_exists_at_zero_before_its_first_event() {
        let text = exposition(&metrics());
        for result in POLICY_CHANGE_RESULTS {
            assert!(
                text.contains(&format!(
                    "sluice_cp_policy_changes_total{{result=\"{result}\"}} 0"
                )),
                "{text}"
            );
        }
        for result in TOKEN_REVIEW_RESULTS {
            assert!(text.contains(&format!(
                "sluice_cp_token_reviews_total{{result=\"{result}\"}} 0"
            )));
        }
        for outcome in WEBHOOK_OUTCOMES {
            assert!(text.contains(&format!(
                "sluice_cp_webhook_reviews_total{{outcome=\"{outcome}\"}} 0"
            )));
        }
        for result in crate::ca::CERTIFY_RESULTS {
            assert!(text.contains(&format!(
                "sluice_cp_certificate_requests_total{{result=\"{result}\"}} 0"
            )));
        }
        for result in STATUS_WRITE_RESULTS {
            assert!(text.contains(&format!(
                "sluice_cp_status_writes_total{{result=\"{result}\"}} 0"
            )));
        }
    }

    #[test]
    fn an_accepted_change_is_counted_and_served() {
        let m = metrics();
        m.offered(&Offer::Accepted(3));
        m.offered(&Offer::Rejected);
        let text = exposition(&m);
        assert!(text.contains("sluice_cp_served_version 3"), "{text}");
        assert!(text.contains("sluice_cp_policy_changes_total{result=\"accepted\"} 1"));
        assert!(text.contains("sluice_cp_policy_changes_total{result=\"rejected\"} 1"));
    }

    #[test]
    fn each_registry_is_its_own() {
        let (a, b) = (metrics(), metrics());
        a.pushes.inc();
        assert_eq!((a.pushes.get(), b.pushes.get()), (1, 0));
    }
}
