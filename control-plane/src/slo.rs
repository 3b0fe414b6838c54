//! `sluice-cp slo-rules PATH`: Prometheus rules generated from the policies' `slo`
//! blocks, so an SLO written once drives recording rules, alerts and dashboards.
//!
//! For every policy with an `slo`, and for each of its objectives (availability,
//! latency), this emits:
//!
//! - recording rules `slo:sluice_errors:ratio_rate<W>` for W in 5m, 30m, 1h, 6h, 3d:
//!   the share of the policy's requests that were bad, labelled `policy` (and
//!   `namespace` when the scrape adds one) and `slo` (`availability` | `latency`);
//! - `slo:sluice_objective:ratio`, the target itself, so dashboards need not repeat it;
//! - multi-window, multi-burn-rate alerts (Google SRE workbook, ch. 5): a burn rate
//!   must hold over a long window (it is significant) *and* a short one (it is still
//!   happening, so the alert resets soon after the fix):
//!   fast 14.4x over 1h and 5m and slow 6x over 6h and 30m page; 1x over 3d and 6h is
//!   a ticket.
//!
//! What counts as bad: for availability, a response with a 5xx status (whatever
//! served it: the backend, a fallback, or Sluice refusing with 503); 429s and fallbacks
//! answered 2xx are good, since governance answered as the policy said. For latency, a
//! request slower than the threshold, read from the `sluice_request_duration_seconds`
//! bucket whose `le` is the threshold (the proxy adds every route's SLO threshold to
//! its buckets, so the bucket exists and the SLI is exact, not interpolated).
//!
//! [`static_rules`] holds the alerts that do not depend on policies.

pub mod dashboards;
pub mod k8s;
pub mod rules;
mod static_rules;

use std::fmt::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sluice_policy::{PolicySet, TrafficPolicy};

use rules::{Group, Rule};
pub use static_rules::{static_groups, static_rules};

/// SLI windows recorded for every objective.
pub const WINDOWS: [&str; 5] = ["5m", "30m", "1h", "6h", "3d"];

/// Where the `runbook_url` annotations point (a section per alert name, lower-cased).
pub const RUNBOOK: &str = "docs/runbooks.md";

/// The recording rule holding an objective's bad-event ratio over `window`.
pub fn error_ratio_record(window: &str) -> String {
    format!("slo:sluice_errors:ratio_rate{window}")
}

/// The recording rule holding each objective's target.
pub const OBJECTIVE_RECORD: &str = "slo:sluice_objective:ratio";

/// One multi-window burn-rate alert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurnAlert {
    pub alert: &'static str,
    /// Multiple of the sustainable error rate (1 spends the budget in exactly the SLO
    /// period).
    pub factor: f64,
    pub long: &'static str,
    pub short: &'static str,
    pub severity: &'static str,
}

/// Fast and slow burns page; the 1x burn is a ticket.
pub const BURN_ALERTS: [BurnAlert; 3] = [
    BurnAlert {
        alert: "SluiceErrorBudgetBurnFast",
        factor: 14.4,
        long: "1h",
        short: "5m",
        severity: "critical",
    },
    BurnAlert {
        alert: "SluiceErrorBudgetBurnSlow",
        factor: 6.0,
        long: "6h",
        short: "30m",
        severity: "critical",
    },
    BurnAlert {
        alert: "SluiceErrorBudgetBurnTicket",
        factor: 1.0,
        long: "3d",
        short: "6h",
        severity: "warning",
    },
];

/// Runs `sluice-cp slo-rules PATH`: the rules on stdout, or the policy errors on
/// stderr and exit 1.
pub fn run(path: PathBuf) -> ExitCode {
    match sluice_policy::load_path(&path) {
        Ok(set) => {
            print!("{}", slo_rules(&set));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(1)
        }
    }
}

/// The recording and alerting rules for every policy of `set` that has an `slo`, in
/// the set's order, as a Prometheus rule file.
pub fn slo_rules(set: &PolicySet) -> String {
    rules::render(&slo_groups(set))
}

/// The same rules as data (one group per policy), for embedding elsewhere.
pub fn slo_groups(set: &PolicySet) -> Vec<Group> {
    set.policies.iter().filter_map(policy_group).collect()
}

/// An objective of one policy: what is measured and its target.
struct Objective<'a> {
    policy: &'a str,
    slo: &'static str,
    target: f64,
    /// The bad-event ratio over a window, as PromQL.
    errors: Box<dyn Fn(&str) -> String + 'a>,
}

fn objectives(policy: &TrafficPolicy) -> Vec<Objective<'_>> {
    let Some(slo) = &policy.slo else {
        return Vec::new();
    };
    let name = policy.name.as_str();
    let mut out = Vec::new();
    if let Some(target) = slo.availability {
        out.push(Objective {
            policy: name,
            slo: "availability",
            target,
            errors: Box::new(move |w| availability_errors(name, w)),
        });
    }
    if let Some(latency) = &slo.latency {
        let threshold = latency.threshold;
        out.push(Objective {
            policy: name,
            slo: "latency",
            target: latency.target,
            errors: Box::new(move |w| latency_errors(name, threshold, w)),
        });
    }
    out
}

fn policy_group(policy: &TrafficPolicy) -> Option<Group> {
    let objectives = objectives(policy);
    if objectives.is_empty() {
        return None;
    }
    let mut rules = Vec::new();
    for o in &objectives {
        for window in WINDOWS {
            rules.push(Rule::Record {
                record: error_ratio_record(window),
                expr: (o.errors)(window),
                // `policy` is already there (aggregated by); repeating it keeps the
                // rule's identity unique across policies (promtool's duplicate lint).
                labels: vec![
                    ("policy".into(), o.policy.into()),
                    ("slo".into(), o.slo.into()),
                ],
            });
        }
        rules.push(Rule::Record {
            record: OBJECTIVE_RECORD.into(),
            expr: format!("vector({})", o.target),
            labels: vec![
                ("policy".into(), o.policy.into()),
                ("slo".into(), o.slo.into()),
            ],
        });
    }
    for o in &objectives {
        for burn in BURN_ALERTS {
            rules.push(burn_alert(o, burn));
        }
    }
    Some(Group {
        name: format!("sluice-slo-{}", policy.name),
        rules,
    })
}

fn burn_alert(o: &Objective<'_>, burn: BurnAlert) -> Rule {
    let selector = format!("{{policy=\"{}\",slo=\"{}\"}}", label_value(o.policy), o.slo);
    let threshold = format!("({} * (1 - {}))", burn.factor, o.target);
    let expr = format!(
        "{long}{selector} > {threshold}\nand\n{short}{selector} > {threshold}",
        long = error_ratio_record(burn.long),
        short = error_ratio_record(burn.short),
    );
    let budget_percent = (1.0 - o.target) * 100.0;
    let what = match o.slo {
        "availability" => "requests answered 5xx".to_owned(),
        _ => "requests slower than the latency threshold".to_owned(),
    };
    Rule::Alert {
        alert: burn.alert.into(),
        expr,
        for_: None,
        labels: vec![
            ("severity".into(), burn.severity.into()),
            ("policy".into(), o.policy.into()),
            ("slo".into(), o.slo.into()),
            ("burn_rate".into(), burn.factor.to_string()),
        ],
        annotations: vec![
            (
                "summary".into(),
                format!(
                    "Policy {} is spending its {} error budget {}x faster than sustainable.",
                    o.policy, o.slo, burn.factor
                ),
            ),
            (
                "description".into(),
                format!(
                    "{{{{ $value | humanizePercentage }}}} of {what} over the last {long} \
                     (and still over the last {short}) for policy {{{{ $labels.policy }}}}; \
                     the objective {target} allows {budget}.",
                    long = burn.long,
                    short = burn.short,
                    target = o.target,
                    budget = percent(budget_percent),
                ),
            ),
            ("runbook_url".into(), runbook(burn.alert)),
        ],
    }
}

/// `runbook_url` of an alert.
pub fn runbook(alert: &str) -> String {
    format!("{RUNBOOK}#{}", alert.to_ascii_lowercase())
}

fn percent(p: f64) -> String {
    // Rounded to what a human writes: 0.1%, 0.5%, 1%.
    let rounded = (p * 1e6).round() / 1e6;
    format!("{rounded}%")
}

/// A PromQL double-quoted string's content.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

fn availability_errors(policy: &str, window: &str) -> String {
    let p = label_value(policy);
    // `or 0 * total`: the 5xx series does not exist until the first 5xx, and a ratio
    // with a missing numerator would be missing instead of 0.
    format!(
        "(\n  sum by (namespace, policy) (rate(sluice_requests_total{{policy=\"{p}\",code_class=\"5xx\"}}[{window}]))\n  or\n  0 * sum by (namespace, policy) (rate(sluice_requests_total{{policy=\"{p}\"}}[{window}]))\n)\n/\nsum by (namespace, policy) (rate(sluice_requests_total{{policy=\"{p}\"}}[{window}]))"
    )
}

fn latency_errors(policy: &str, threshold: Duration, window: &str) -> String {
    let p = label_value(policy);
    let le = le_matcher(threshold);
    format!(
        "1 - (\n  sum by (namespace, policy) (rate(sluice_request_duration_seconds_bucket{{policy=\"{p}\",{le}}}[{window}]))\n  /\n  sum by (namespace, policy) (rate(sluice_request_duration_seconds_count{{policy=\"{p}\"}}[{window}]))\n)"
    )
}

/// The `le` matcher of the bucket at `threshold`. The proxy writes bounds with Rust's
/// shortest float form (`0.25`, `1`); Prometheus 3 normalises integral bounds to
/// `1.0` on ingestion, so for those both spellings are matched.
pub fn le_matcher(threshold: Duration) -> String {
    let secs = threshold.as_secs_f64();
    let text = secs.to_string();
    if secs.fract() == 0.0 {
        let mut m = String::new();
        let _ = write!(m, "le=~\"{text}|{text}\\\\.0\"");
        m
    } else {
        format!("le=\"{text}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop}
spec:
  hosts: [shop]
  backends: [{address: "127.0.0.1:1"}]
  slo:
    availability: 0.999
    latency: {threshold: 300ms, target: 0.99}
  routes: [{name: all}]
---
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: plain}
spec:
  hosts: [plain]
  backends: [{address: "127.0.0.1:2"}]
  routes: [{name: all}]
"#;

    fn set() -> PolicySet {
        sluice_policy::parse_str(std::path::Path::new("t.yaml"), POLICY)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn generates_one_group_per_policy_with_an_slo() {
        let groups = slo_groups(&set());
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].name, "sluice-slo-shop");
    }

    #[test]
    fn records_every_window_for_each_objective() {
        let text = slo_rules(&set());
        for w in WINDOWS {
            let record = format!("- record: \"slo:sluice_errors:ratio_rate{w}\"");
            assert_eq!(text.matches(&record).count(), 2, "{w}: {text}");
        }
        assert!(text.contains("vector(0.999)"));
        assert!(text.contains("vector(0.99)"));
    }

    #[test]
    fn latency_sli_reads_the_bucket_at_the_threshold() {
        let text = slo_rules(&set());
        assert!(
            text.contains("sluice_request_duration_seconds_bucket{policy=\"shop\",le=\"0.3\"}[1h]"),
            "{text}"
        );
    }

    #[test]
    fn integral_thresholds_match_both_spellings() {
        assert_eq!(
            le_matcher(Duration::from_secs(1)),
            r#"le=~"1|1\\.0""#.to_owned()
        );
        assert_eq!(le_matcher(Duration::from_millis(250)), r#"le="0.25""#);
        assert_eq!(le_matcher(Duration::from_millis(2500)), r#"le="2.5""#);
    }

    #[test]
    fn alerts_use_both_windows_at_the_burn_rate() {
        let text = slo_rules(&set());
        assert!(text.contains(
            "slo:sluice_errors:ratio_rate1h{policy=\"shop\",slo=\"availability\"} > (14.4 * (1 - 0.999))\n        and\n        slo:sluice_errors:ratio_rate5m{policy=\"shop\",slo=\"availability\"} > (14.4 * (1 - 0.999))"
        ), "{text}");
        assert!(text.contains(
            "slo:sluice_errors:ratio_rate6h{policy=\"shop\",slo=\"latency\"} > (6 * (1 - 0.99))"
        ));
        assert!(text.contains(
            "slo:sluice_errors:ratio_rate3d{policy=\"shop\",slo=\"latency\"} > (1 * (1 - 0.99))"
        ));
        assert_eq!(text.matches("- alert: ").count(), 6);
        assert_eq!(
            text.matches("\"runbook_url\": \"docs/runbooks.md#sluiceerrorbudgetburn")
                .count(),
            6
        );
    }

    #[test]
    fn describes_the_budget_in_percent() {
        let text = slo_rules(&set());
        assert!(text.contains("the objective 0.999 allows 0.1%."), "{text}");
        assert!(text.contains("the objective 0.99 allows 1%."));
    }

    #[test]
    fn no_slo_means_no_rules() {
        let set = PolicySet::default();
        assert_eq!(slo_rules(&set), "groups:\n");
    }
}
