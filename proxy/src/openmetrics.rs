//! The OpenMetrics 1.0 text exposition of a registry's metric families, with
//! exemplars on histogram buckets.
//!
//! Why an encoder of our own: the prometheus crate writes only Prometheus' text
//! format (0.0.4), which cannot carry exemplars. Prometheus asks for OpenMetrics in
//! its scrapes' `Accept` header and, run with `--enable-feature=exemplar-storage`,
//! stores the exemplars it finds; a client that does not ask ([`accepted`]) gets the
//! text format, unchanged.
//!
//! What differs from the text format (the specification's rules, followed here):
//! - a counter is declared without its `_total` (`# TYPE sluice_requests counter`)
//!   and sampled with it; a counter whose name does not end in `_total` cannot be
//!   spelled as one and is declared `unknown`, as untyped metrics are;
//! - `HELP` escapes `"` as well as `\` and line feeds;
//! - `le` and `quantile` values are canonical numbers (Go's `%g`, with `.0` added
//!   to integers: `1.0`, `0.25`, `1e-05`), so a bound has one spelling whoever
//!   exposes it; infinities are `+Inf` / `-Inf`;
//! - a bucket may carry one exemplar, written after its count:
//!   `..._bucket{le="0.05"} 12 # {trace_id="4bf9..."} 0.0213 1733390000.123`,
//!   always on the bucket that counted its value (the first whose `le` is at least
//!   the value);
//! - the exposition ends with `# EOF`.

use std::fmt::Write;

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};

use crate::exemplar::Exemplar;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scrape's `Accept` header asks for OpenMetrics 1.0 at least as much as
/// for the text format: a media range `application/openmetrics-text` (without a
/// version, or version 1.0.0) with a quality above 0 and not below that of
/// `text/plain`. Wildcards choose nothing: `*/*` (curl's default) keeps the text
/// format that every client reads.
pub fn accepted(accept: &str) -> bool {
    let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let (mut quality, mut version) = (1.0_f32, None);
        for param in parts {
            let Some((name, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match name.trim() {
                n if n.eq_ignore_ascii_case("q") => quality = value.parse().unwrap_or(0.0),
                n if n.eq_ignore_ascii_case("version") => version = Some(value),
                _ => {}
            }
        }
        if media.eq_ignore_ascii_case("application/openmetrics-text")
            && version.is_none_or(|v| v == "1.0.0")
        {
            openmetrics = openmetrics.max(quality);
        } else if media.eq_ignore_ascii_case("text/plain") {
            text = text.max(quality);
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// The OpenMetrics exposition of `families`, with `exemplars(family, metric)` on
/// the buckets of each histogram metric (any order: each goes on the bucket that
/// counted its value, the latest when two fall in one bucket).
pub fn encode<'e>(
    families: &[MetricFamily],
    exemplars: impl Fn(&str, &Metric) -> &'e [Exemplar],
) -> Vec<u8> {
    let mut out = String::with_capacity(16 * 1024);
    for family in families {
        let name = family.name();
        let kind = family.get_field_type();
        let declared = match kind {
            MetricType::COUNTER => name.strip_suffix("_total").map(|stem| (stem, "counter")),
            MetricType::GAUGE => Some((name, "gauge")),
            MetricType::HISTOGRAM => Some((name, "histogram")),
            MetricType::SUMMARY => Some((name, "summary")),
            MetricType::UNTYPED => None,
        };
        let (declared, type_name) = declared.unwrap_or((name, "unknown"));
        let _ = writeln!(out, "# TYPE {declared} {type_name}");
        if !family.help().is_empty() {
            let _ = write!(out, "# HELP {declared} ");
            escape(&mut out, family.help());
            out.push('\n');
        }
        for metric in family.get_metric() {
            match kind {
                MetricType::COUNTER => {
                    sample(
                        &mut out,
                        name,
                        metric,
                        None,
                        metric.get_counter().get_value(),
                    );
                }
                MetricType::GAUGE => {
                    sample(&mut out, name, metric, None, metric.get_gauge().get_value());
                }
                // The crate deprecates untyped metrics (it makes none, and its text
                // encoder panics on them), but a collector may still return one.
                #[allow(deprecated)]
                MetricType::UNTYPED => {
                    sample(
                        &mut out,
                        name,
                        metric,
                        None,
                        metric.get_untyped().get_value(),
                    );
                }
                MetricType::HISTOGRAM => histogram(&mut out, name, metric, exemplars(name, metric)),
                MetricType::SUMMARY => summary(&mut out, name, metric),
            }
        }
    }
    out.push_str("# EOF\n");
    out.into_bytes()
}

fn histogram(out: &mut String, name: &str, metric: &Metric, exemplars: &[Exemplar]) {
    let h = metric.get_histogram();
    let buckets = h.get_bucket();
    // The crate leaves +Inf implicit; a histogram built with it explicit has it last.
    let explicit_inf = buckets
        .last()
        .is_some_and(|b| b.upper_bound() == f64::INFINITY);
    let slots = buckets.len() + usize::from(!explicit_inf);
    let mut placed: Vec<Option<&Exemplar>> =
        vec![None; if exemplars.is_empty() { 0 } else { slots }];
    for e in exemplars {
        let i = buckets
            .iter()
            .position(|b| e.value <= b.upper_bound())
            .unwrap_or(slots - 1);
        if let Some(slot) = placed.get_mut(i) {
            if slot.is_none_or(|held| held.timestamp_ms <= e.timestamp_ms) {
                *slot = Some(e);
            }
        }
    }
    let bucket_name = Suffixed(name, "_bucket");
    let counts = buckets
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .chain((!explicit_inf).then_some((f64::INFINITY, h.get_sample_count())));
    for (i, (bound, count)) in counts.enumerate() {
        let mut le = String::new();
        canonical(&mut le, bound);
        labels(out, &bucket_name, metric, Some(("le", le.as_str())));
        let _ = write!(out, " {count}");
        if let Some(e) = placed.get(i).copied().flatten() {
            let _ = write!(out, " # {{trace_id=\"{:032x}\"}} ", e.trace_id);
            number(out, e.value);
            let _ = write!(
                out,
                " {}.{:03}",
                e.timestamp_ms / 1000,
                e.timestamp_ms % 1000
            );
        }
        out.push('\n');
    }
    labels(out, &Suffixed(name, "_count"), metric, None);
    let _ = writeln!(out, " {}", h.get_sample_count());
    sample(
        out,
        Suffixed(name, "_sum"),
        metric,
        None,
        h.get_sample_sum(),
    );
}

fn summary(out: &mut String, name: &str, metric: &Metric) {
    let s = metric.get_summary();
    for q in s.get_quantile() {
        let mut quantile = String::new();
        canonical(&mut quantile, q.quantile());
        sample(
            out,
            name,
            metric,
            Some(("quantile", quantile.as_str())),
            q.value(),
        );
    }
    labels(out, &Suffixed(name, "_count"), metric, None);
    let _ = writeln!(out, " {}", s.sample_count());
    sample(out, Suffixed(name, "_sum"), metric, None, s.sample_sum());
}

/// A metric name and a suffix, written as one.
struct Suffixed<'a>(&'a str, &'a str);

impl std::fmt::Display for Suffixed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)?;
        f.write_str(self.1)
    }
}

/// One sample line: name, labels, value and the metric's timestamp if it has one.
fn sample(
    out: &mut String,
    name: impl std::fmt::Display,
    metric: &Metric,
    extra: Option<(&str, &str)>,
    value: f64,
) {
    labels(out, &name, metric, extra);
    out.push(' ');
    number(out, value);
    let ms = metric.timestamp_ms();
    if ms != 0 {
        // OpenMetrics timestamps are seconds.
        let sign = if ms < 0 { "-" } else { "" };
        let ms = ms.unsigned_abs();
        let _ = write!(out, " {sign}{}.{:03}", ms / 1000, ms % 1000);
    }
    out.push('\n');
}

/// `name{label="value",...}` (no braces without labels).
fn labels(
    out: &mut String,
    name: &dyn std::fmt::Display,
    metric: &Metric,
    extra: Option<(&str, &str)>,
) {
    let _ = write!(out, "{name}");
    let pairs = metric.get_label();
    if pairs.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    let all = pairs
        .iter()
        .map(|p: &LabelPair| (p.name(), p.value()))
        .chain(extra);
    for (i, (label, value)) in all.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(label);
        out.push_str("=\"");
        escape(out, value);
        out.push('"');
    }
    out.push('}');
}

/// The escaping of label values and HELP text: `\`, `"` and line feed.
fn escape(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value: integers (counts, most counters and gauges) as integers, exact
/// and as the text format writes them; other values as [`canonical`] numbers.
fn number(out: &mut String, v: f64) {
    // Below 2^53 every integer is exact in an f64.
    if v.fract() == 0.0 && v.abs() < 9_007_199_254_740_992.0 {
        let _ = write!(out, "{}", v as i64);
    } else {
        canonical(out, v);
    }
}

/// The specification's canonical number: Go's shortest `%g` (exponent form below
/// 1e-4 and from 1e6 on, with at least two exponent digits), `.0` added when there
/// is neither a point nor an exponent, `+Inf`, `-Inf`, `NaN`.
fn canonical(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
        return;
    }
    if v == 0.0 {
        out.push_str("0.0");
        return;
    }
    // Rust's `{:e}` gives the shortest digits that read back as `v`, as Go's does:
    // `-1.2345e-7`, `1e6`, `2.5e-1`.
    let sci = format!("{:e}", v.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if v < 0.0 {
        out.push('-');
    }
    if !(-4..6).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "{mantissa}e{sign}{:02}", exponent.unsigned_abs());
        return;
    }
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if exponent < 0 {
        out.push_str("0.");
        for _ in 1..exponent.unsigned_abs() {
            out.push('0');
        }
        out.push_str(&digits);
        return;
    }
    let whole = exponent.unsigned_abs() as usize + 1;
    if digits.len() > whole {
        out.push_str(&digits[..whole]);
        out.push('.');
        out.push_str(&digits[whole..]);
    } else {
        out.push_str(&digits);
        for _ in digits.len()..whole {
            out.push('0');
        }
        out.push_str(".0");
    }
}

#[cfg(test)]
mod tests;
