use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Registry;

use super::*;
use crate::metrics::Metrics;

const IDLE: Duration = Duration::from_secs(600);

fn metrics() -> Metrics {
    Metrics::register(Registry::new()).unwrap_or_else(|e| panic!("{e}"))
}

/// What the proxy records for one request answered 200 on `route`.
fn request(metrics: &Metrics, ledger: &Ledger, route: &Arc<RouteSeries>) {
    let labels = [route.policy(), route.route(), "2xx", "allowed", "outbound"];
    route.record(ledger, None, |live| {
        live.duration.observe(Duration::from_millis(10));
        live.requests
            .inc(0, metrics, || metrics.requests.with_label_values(&labels));
    });
}

/// The route's `sluice_requests_total` as exported, if it is.
fn exported_requests(metrics: &Metrics, route: &RouteSeries) -> Option<f64> {
    let series = format!(
        "sluice_requests_total{{code_class=\"2xx\",decision=\"allowed\",direction=\"outbound\",policy=\"{}\",route=\"{}\"}} ",
        route.policy(),
        route.route()
    );
    let text = String::from_utf8(metrics.render()).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(|v| v.parse().expect("a number"))
}

/// The route's histogram's sample count, while it has one.
fn observed(route: &RouteSeries) -> Option<u64> {
    let families = route.collect_duration();
    let metric = families.first()?.get_metric().first()?;
    Some(metric.get_histogram().get_sample_count())
}

/// A housekeeping pass at `now` over a snapshot holding `routes` (and no policy).
fn pass(metrics: &Metrics, ledger: &Ledger, routes: &[Arc<RouteSeries>], now: Instant) {
    ledger.expire(metrics, || routes.iter(), std::iter::empty, now);
}

#[test]
fn a_route_has_no_series_until_it_is_used() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    assert!(!route.is_live());
    assert_eq!(observed(&route), None);
    assert_eq!(exported_requests(&metrics, &route), None);

    request(&metrics, &ledger, &route);
    assert!(route.is_live());
    assert_eq!(observed(&route), Some(1));
    assert_eq!(exported_requests(&metrics, &route), Some(1.0));
}

#[test]
fn series_idle_for_the_period_are_removed_and_come_back_afresh() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    let routes = [Arc::clone(&route)];
    let t0 = Instant::now();
    request(&metrics, &ledger, &route);
    request(&metrics, &ledger, &route);
    metrics.breaker_state.with_label_values(&["p", "r"]).set(1);
    pass(&metrics, &ledger, &routes, t0);
    pass(
        &metrics,
        &ledger,
        &routes,
        t0 + IDLE - Duration::from_secs(1),
    );
    assert_eq!(exported_requests(&metrics, &route), Some(2.0));
    assert_eq!(observed(&route), Some(2));

    pass(&metrics, &ledger, &routes, t0 + IDLE);
    assert!(!route.is_live());
    assert_eq!(observed(&route), None);
    assert_eq!(exported_requests(&metrics, &route), None);
    let text = String::from_utf8(metrics.render()).expect("utf-8");
    assert!(
        !text.contains("route=\"r\""),
        "every series of the route is gone:\n{text}"
    );

    // Used again: series again, counting from 0 (a counter reset to Prometheus).
    request(&metrics, &ledger, &route);
    assert_eq!(exported_requests(&metrics, &route), Some(1.0));
    assert_eq!(observed(&route), Some(1));
    // ...and idle again, gone again: the ledger took it back in.
    pass(&metrics, &ledger, &routes, t0 + 2 * IDLE);
    pass(&metrics, &ledger, &routes, t0 + 3 * IDLE);
    assert_eq!(exported_requests(&metrics, &route), None);
}

#[test]
fn steady_traffic_never_resets_a_routes_counters() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    let routes = [Arc::clone(&route)];
    let t0 = Instant::now();
    // One request every 9 minutes, for three hours: always within the idle period.
    for i in 0..20u32 {
        request(&metrics, &ledger, &route);
        pass(
            &metrics,
            &ledger,
            &routes,
            t0 + i * Duration::from_secs(9 * 60),
        );
    }
    assert_eq!(exported_requests(&metrics, &route), Some(20.0));
    assert_eq!(observed(&route), Some(20));
}

#[test]
fn a_route_used_within_the_period_keeps_its_series_past_it() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    let routes = [Arc::clone(&route)];
    let t0 = Instant::now();
    request(&metrics, &ledger, &route);
    pass(&metrics, &ledger, &routes, t0);
    // Marked without a request settling (one in flight), late in the period.
    route.mark_used();
    pass(
        &metrics,
        &ledger,
        &routes,
        t0 + IDLE - Duration::from_secs(1),
    );
    pass(&metrics, &ledger, &routes, t0 + IDLE);
    assert_eq!(exported_requests(&metrics, &route), Some(1.0));
    pass(&metrics, &ledger, &routes, t0 + 2 * IDLE);
    assert_eq!(exported_requests(&metrics, &route), None);
}

#[test]
fn a_route_a_reload_removed_loses_its_series_at_the_first_pass_without_use() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    let t0 = Instant::now();
    request(&metrics, &ledger, &route);
    // The snapshot no longer has it; the request that just settled (on the older
    // snapshot) still counts as use for this pass.
    pass(&metrics, &ledger, &[], t0);
    assert_eq!(exported_requests(&metrics, &route), Some(1.0));
    pass(&metrics, &ledger, &[], t0 + Duration::from_secs(1));
    assert_eq!(exported_requests(&metrics, &route), None);
    assert!(!route.is_live());
}

#[test]
fn a_route_added_back_under_its_name_keeps_the_series_it_shares_with_the_old_one() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let old = Arc::new(RouteSeries::new("p", "r"));
    let t0 = Instant::now();
    request(&metrics, &ledger, &old);
    // A reload removes the route, the next adds it back: a new `RouteSeries`, the
    // same labels.
    let new = Arc::new(RouteSeries::new("p", "r"));
    request(&metrics, &ledger, &new);
    let routes = [Arc::clone(&new)];
    pass(&metrics, &ledger, &routes, t0);
    pass(&metrics, &ledger, &routes, t0 + Duration::from_secs(1));
    assert!(!old.is_live(), "the old one is gone");
    assert!(new.is_live());
    request(&metrics, &ledger, &new);
    assert_eq!(
        exported_requests(&metrics, &new),
        Some(3.0),
        "the series the new one counts into stayed"
    );
}

#[test]
fn a_policy_has_backend_series_only_while_it_is_used() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let used = Arc::new(PolicySeries::new("used"));
    let other = Arc::new(PolicySeries::new("other"));
    let policies = [Arc::clone(&used), Arc::clone(&other)];
    assert!(!used.is_live());
    used.record(&ledger);
    assert!(used.is_live() && !other.is_live());
    let t0 = Instant::now();
    for (policy, value) in [("used", 3), ("other", 1)] {
        let labels = [policy, "10.0.0.1:80"];
        metrics
            .backend_endpoints
            .with_label_values(&labels)
            .set(value);
    }
    metrics
        .upstream_requests
        .with_label_values(&["used", "10.0.0.1:80", "success"])
        .inc();
    metrics
        .requests
        .with_label_values(&["used", "", "4xx", "no_route", "outbound"])
        .inc();
    let pass = |now| ledger.expire(&metrics, std::iter::empty, || policies.iter(), now);
    assert!(pass(t0).is_empty());
    let gone = pass(t0 + IDLE);
    assert_eq!(gone.len(), 1);
    assert!(Arc::ptr_eq(&gone[0], &used));
    assert!(!used.is_live());
    let text = String::from_utf8(metrics.render()).expect("utf-8");
    assert!(!text.contains("policy=\"used\""), "{text}");
    // Only the expired policy's series go.
    assert!(
        text.contains("sluice_backend_endpoints{backend=\"10.0.0.1:80\",policy=\"other\"} 1"),
        "{text}"
    );
}

#[test]
fn a_changed_slo_threshold_remakes_the_histogram_with_a_bucket_at_it() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    request(&metrics, &ledger, &route);
    let buckets = |route: &RouteSeries| -> Vec<f64> {
        let families = route.collect_duration();
        families[0].get_metric()[0]
            .get_histogram()
            .get_bucket()
            .iter()
            .map(|b| b.upper_bound())
            .collect()
    };
    assert!(!buckets(&route).contains(&0.3));
    route.relayout(None);
    assert_eq!(
        observed(&route),
        Some(1),
        "the same layout keeps its counts"
    );
    route.relayout(Some(Duration::from_millis(300)));
    assert!(buckets(&route).contains(&0.3));
    assert_eq!(observed(&route), Some(0));
}

/// A request of `seconds` on `route` that carries trace `trace_id` as its exemplar.
fn traced(
    ledger: &Ledger,
    route: &Arc<RouteSeries>,
    layout: Option<Duration>,
    seconds: f64,
    trace_id: &str,
) {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(1_733_390_000);
    route.record(ledger, layout, |live| {
        live.observe(Duration::from_secs_f64(seconds), Some((trace_id, at)))
    });
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[test]
fn a_routes_exemplars_are_the_latest_of_each_bucket_its_histogram_counted() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    assert!(route.exemplars().is_empty(), "no series, no exemplars");
    request(&metrics, &ledger, &route);
    assert!(
        route.exemplars().is_empty(),
        "a request without a trace leaves none"
    );
    traced(&ledger, &route, None, 0.02, TRACE);
    traced(
        &ledger,
        &route,
        None,
        0.3,
        "0af7651916cd43dd8448eb211c80319c",
    );
    let values: Vec<f64> = route.exemplars().iter().map(|e| e.value).collect();
    assert_eq!(values, [0.02, 0.3]);
    assert_eq!(observed(&route), Some(3));
}

#[test]
fn expired_series_lose_their_exemplars_and_come_back_without_them() {
    let (metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    let routes = [Arc::clone(&route)];
    let t0 = Instant::now();
    traced(&ledger, &route, None, 0.02, TRACE);
    assert_eq!(route.exemplars().len(), 1);
    pass(&metrics, &ledger, &routes, t0);
    pass(&metrics, &ledger, &routes, t0 + IDLE);
    assert!(!route.is_live());
    assert!(route.exemplars().is_empty());
    request(&metrics, &ledger, &route);
    assert!(route.is_live());
    assert!(
        route.exemplars().is_empty(),
        "new series start without exemplars"
    );
}

#[test]
fn a_remade_histogram_starts_without_the_old_buckets_exemplars() {
    let (_metrics, ledger) = (metrics(), Ledger::new(IDLE));
    let route = Arc::new(RouteSeries::new("p", "r"));
    traced(&ledger, &route, None, 0.28, TRACE);
    route.relayout(None);
    assert_eq!(route.exemplars().len(), 1, "the same layout keeps them");
    let threshold = Some(Duration::from_millis(300));
    route.relayout(threshold);
    assert!(route.exemplars().is_empty());
    traced(&ledger, &route, threshold, 0.28, TRACE);
    assert_eq!(route.exemplars().len(), 1);
    assert_eq!(observed(&route), Some(1));
}
