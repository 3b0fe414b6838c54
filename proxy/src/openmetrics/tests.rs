use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::proto::{Quantile, Summary};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::*;

const ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const OTHER: &str = "0af7651916cd43dd8448eb211c80319c";

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn exemplar(id: &str, value: f64, ms: u64) -> Exemplar {
    Exemplar::new(id, value, at(ms)).expect("valid trace id")
}

fn text(families: &[MetricFamily], exemplars: &[Exemplar]) -> String {
    String::from_utf8(encode(families, |_, _| exemplars)).expect("utf-8")
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

/// A histogram `d_seconds{policy="p",route="r"}` with bounds 0.005, 0.25, 1 and `values`.
fn histogram(registry: &Registry, values: &[f64]) -> Histogram {
    let opts = HistogramOpts::new("d_seconds", "Durations.")
        .const_label("policy", "p")
        .const_label("route", "r")
        .buckets(vec![0.005, 0.25, 1.0]);
    let h = register(registry, Histogram::with_opts(opts).expect("histogram"));
    for v in values {
        h.observe(*v);
    }
    h
}

#[test]
fn writes_every_kind_of_family_as_the_specification_spells_it() {
    let registry = Registry::new();
    let requests = register(
        &registry,
        IntCounterVec::new(
            Opts::new("t_requests_total", "Requests (\"all\" of them), a\\b."),
            &["code", "path"],
        )
        .expect("counter"),
    );
    requests
        .with_label_values(&["200", "/a\"b\\c\nd"])
        .inc_by(3);
    register(
        &registry,
        IntCounter::new("t_restarts", "A counter without _total.").expect("counter"),
    )
    .inc();
    register(
        &registry,
        IntGauge::new("t_inflight", "Line one\nline two.").expect("gauge"),
    )
    .set(-2);
    // Binary fractions: the sum is exact.
    histogram(&registry, &[0.00390625, 0.125, 0.5, 7.5]);
    let expected = concat!(
        "# TYPE d_seconds histogram\n",
        "# HELP d_seconds Durations.\n",
        "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"0.005\"} 1\n",
        "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"0.25\"} 2\n",
        "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"1.0\"} 3\n",
        "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"+Inf\"} 4\n",
        "d_seconds_count{policy=\"p\",route=\"r\"} 4\n",
        "d_seconds_sum{policy=\"p\",route=\"r\"} 8.12890625\n",
        "# TYPE t_inflight gauge\n",
        "# HELP t_inflight Line one\\nline two.\n",
        "t_inflight -2\n",
        "# TYPE t_requests counter\n",
        "# HELP t_requests Requests (\\\"all\\\" of them), a\\\\b.\n",
        "t_requests_total{code=\"200\",path=\"/a\\\"b\\\\c\\nd\"} 3\n",
        "# TYPE t_restarts unknown\n",
        "# HELP t_restarts A counter without _total.\n",
        "t_restarts 1\n",
        "# EOF\n",
    );
    assert_eq!(text(&registry.gather(), &[]), expected);
}

#[test]
fn an_empty_registry_is_just_the_end_marker() {
    assert_eq!(text(&Registry::new().gather(), &[]), "# EOF\n");
}

#[test]
fn an_exemplar_goes_on_the_first_bucket_whose_le_is_at_least_its_value() {
    let registry = Registry::new();
    histogram(&registry, &[0.001, 0.2, 0.25, 0.3, 7.5]);
    let exemplars = [
        // Any order; on a bound it belongs to that bound's bucket.
        exemplar(OTHER, 7.5, 1_733_390_000_004),
        exemplar(ID, 0.25, 1_733_390_000_123),
        exemplar(OTHER, 0.3, 1_733_390_000_050),
    ];
    let text = text(&registry.gather(), &exemplars);
    let buckets: Vec<&str> = text.lines().filter(|l| l.contains("_bucket")).collect();
    assert_eq!(
        buckets,
        [
            "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"0.005\"} 1",
            "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"0.25\"} 3 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.25 1733390000.123",
            "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"1.0\"} 4 # {trace_id=\"0af7651916cd43dd8448eb211c80319c\"} 0.3 1733390000.050",
            "d_seconds_bucket{policy=\"p\",route=\"r\",le=\"+Inf\"} 5 # {trace_id=\"0af7651916cd43dd8448eb211c80319c\"} 7.5 1733390000.004",
        ]
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn a_bucket_shows_the_latest_of_two_exemplars_that_fall_in_it() {
    let registry = Registry::new();
    histogram(&registry, &[0.1, 0.2]);
    let exemplars = [exemplar(ID, 0.2, 2_000), exemplar(OTHER, 0.1, 1_000)];
    let text = text(&registry.gather(), &exemplars);
    let marked: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
    assert_eq!(
        marked,
        ["d_seconds_bucket{policy=\"p\",route=\"r\",le=\"0.25\"} 2 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.2 2.000"]
    );
}

#[test]
fn exemplars_go_only_where_the_lookup_puts_them() {
    let registry = Registry::new();
    histogram(&registry, &[0.1]);
    register(
        &registry,
        IntCounter::new("c_total", "C.").expect("counter"),
    )
    .inc();
    let exemplars = [exemplar(ID, 0.1, 1)];
    let none: &[Exemplar] = &[];
    let out = encode(&registry.gather(), |family, metric| {
        let route = metric.get_label().iter().find(|l| l.name() == "route");
        match (family, route.map(|l| l.value())) {
            ("d_seconds", Some("r")) => &exemplars[..],
            _ => none,
        }
    });
    let text = String::from_utf8(out).expect("utf-8");
    assert_eq!(text.matches(" # {").count(), 1, "{text}");
    let none = String::from_utf8(encode(&registry.gather(), |_, _| &[])).expect("utf-8");
    assert!(!none.contains(" # {"), "{none}");
}

#[test]
fn summaries_write_canonical_quantiles_count_and_sum() {
    let mut summary = Summary::default();
    summary.set_sample_count(10);
    summary.set_sample_sum(2.5);
    let quantile = |q: f64, v: f64| {
        let mut x = Quantile::default();
        x.set_quantile(q);
        x.set_value(v);
        x
    };
    summary.set_quantile(vec![quantile(0.5, 0.2), quantile(1.0, f64::NAN)]);
    let mut metric = Metric::default();
    metric.set_summary(summary);
    let mut family = MetricFamily::default();
    family.set_name("s_seconds".into());
    family.set_field_type(MetricType::SUMMARY);
    family.set_metric(vec![metric]);
    assert_eq!(
        text(&[family], &[]),
        concat!(
            "# TYPE s_seconds summary\n",
            "s_seconds{quantile=\"0.5\"} 0.2\n",
            "s_seconds{quantile=\"1.0\"} NaN\n",
            "s_seconds_count 10\n",
            "s_seconds_sum 2.5\n",
            "# EOF\n",
        )
    );
}

#[test]
#[allow(deprecated)] // Untyped: the crate makes none, a custom collector may.
fn untyped_metrics_are_unknown_and_timestamps_are_seconds() {
    let mut metric = Metric::default();
    let mut value = prometheus::proto::Untyped::default();
    value.set_value(0.5);
    metric.set_untyped(value);
    metric.set_timestamp_ms(1_520_879_607_789);
    let mut family = MetricFamily::default();
    family.set_name("u".into());
    family.set_field_type(MetricType::UNTYPED);
    family.set_metric(vec![metric]);
    assert_eq!(
        text(&[family], &[]),
        "# TYPE u unknown\nu 0.5 1520879607.789\n# EOF\n"
    );
}

#[test]
fn bounds_are_canonical_numbers_as_the_specification_lists_them() {
    let canon = |v: f64| {
        let mut s = String::new();
        canonical(&mut s, v);
        s
    };
    for (v, spelled) in [
        (0.0, "0.0"),
        (0.001, "0.001"),
        (0.002, "0.002"),
        (0.01, "0.01"),
        (0.1, "0.1"),
        (0.9, "0.9"),
        (0.95, "0.95"),
        (0.99, "0.99"),
        (0.999, "0.999"),
        (1.0, "1.0"),
        (1.7, "1.7"),
        (10.0, "10.0"),
        (1e-10, "1e-10"),
        (1e-9, "1e-09"),
        (1e-5, "1e-05"),
        (0.0001, "0.0001"),
        (100_000.0, "100000.0"),
        (1e6, "1e+06"),
        (1e10, "1e+10"),
        // The proxy's own bounds.
        (0.0025, "0.0025"),
        (0.25, "0.25"),
        (2.5, "2.5"),
        (120.0, "120.0"),
        (0.3, "0.3"),
        (123_456.7, "123456.7"),
        (1_234_567.0, "1.234567e+06"),
        (-0.5, "-0.5"),
        (f64::INFINITY, "+Inf"),
        (f64::NEG_INFINITY, "-Inf"),
        (f64::NAN, "NaN"),
    ] {
        assert_eq!(canon(v), spelled, "{v:e}");
    }
}

#[test]
fn sample_values_are_integers_when_they_are_and_canonical_otherwise() {
    let num = |v: f64| {
        let mut s = String::new();
        number(&mut s, v);
        s
    };
    assert_eq!(num(12.0), "12");
    assert_eq!(num(1_733_390_000.0), "1733390000");
    assert_eq!(num(0.0213), "0.0213");
    assert_eq!(num(2.5e-5), "2.5e-05");
    assert_eq!(num(1e300), "1e+300");
    assert_eq!(num(f64::INFINITY), "+Inf");
}

#[test]
fn negotiates_openmetrics_only_when_asked_for_it() {
    // What Prometheus 2.x sends.
    assert!(accepted(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    ));
    assert!(accepted("application/openmetrics-text"));
    assert!(accepted(
        "Application/OpenMetrics-Text; version=\"1.0.0\"; q=0.9, text/plain; q=0.9"
    ));
    for text in [
        "",
        "*/*",
        "text/plain",
        "text/plain;version=0.0.4",
        "text/plain, application/openmetrics-text;q=0.5",
        "application/openmetrics-text;q=0",
        "application/openmetrics-text;version=2.0.0",
        "application/openmetrics-text;version=0.0.1",
    ] {
        assert!(!accepted(text), "{text:?}");
    }
}
