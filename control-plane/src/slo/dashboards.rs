//! The Grafana dashboards shipped in `dashboards/*.json`, written as data here so
//! every panel follows the same conventions (datasource variable, namespace/policy/
//! route filters, units, layout) and the committed JSON is checked for staleness.
//!
//! Each dashboard has a `datasource` variable (any Prometheus) and `namespace`,
//! `policy` and `route` variables whose "All" value is `.*`, so the filters also
//! match series without the label (a proxy scraped outside Kubernetes has no
//! `namespace`). SLO panels read the recording rules of [`super::slo_rules`].
//!
//! Only fields of Grafana's own `Dashboard` type are written (checked by
//! `dashboards/schema-check`); string-enum fields such as threshold modes and value
//! mappings are left to Grafana's defaults, because JSON cannot spell a TypeScript
//! enum.

use serde_json::{json, Value};

use super::{error_ratio_record, BURN_ALERTS, OBJECTIVE_RECORD, WINDOWS};

/// Grafana's dashboard JSON model version these dashboards are written for.
const SCHEMA_VERSION: u32 = 39;

/// The duration histogram's buckets: what latency panels plot, and what carries
/// exemplars.
const DURATION_BUCKETS: &str = "sluice_request_duration_seconds_bucket";

/// Filters every request-level query applies.
const REQ: &str = r#"namespace=~"$namespace",policy=~"$policy",route=~"$route""#;
/// Filters of per-policy series that have no route.
const POL: &str = r#"namespace=~"$namespace",policy=~"$policy""#;

/// One panel: a title, what it shows and its queries (`expr`, legend).
struct Panel {
    title: &'static str,
    kind: &'static str,
    unit: &'static str,
    description: &'static str,
    targets: Vec<(String, String)>,
}

fn panel(
    title: &'static str,
    kind: &'static str,
    unit: &'static str,
    description: &'static str,
    targets: Vec<(String, &str)>,
) -> Panel {
    Panel {
        title,
        kind,
        unit,
        description,
        targets: targets
            .into_iter()
            .map(|(e, l)| (e, l.to_owned()))
            .collect(),
    }
}

/// A dashboard: file name (in `dashboards/`), uid, title and panels.
pub struct Dashboard {
    pub file: &'static str,
    uid: &'static str,
    title: &'static str,
    description: &'static str,
    panels: Vec<Panel>,
}

/// Every dashboard, in a fixed order.
pub fn all() -> Vec<Dashboard> {
    vec![mesh(), governance(), slos(), fleet()]
}

impl Dashboard {
    /// The dashboard's JSON model.
    pub fn to_json(&self) -> Value {
        let ds = json!({"type": "prometheus", "uid": "${datasource}"});
        let mut panels = Vec::new();
        for (i, p) in self.panels.iter().enumerate() {
            let (x, y) = ((i % 2) as u32 * 12, (i / 2) as u32 * 8);
            let instant = matches!(p.kind, "table" | "bargauge");
            let targets: Vec<Value> = p
                .targets
                .iter()
                .enumerate()
                .map(|(j, (expr, legend))| {
                    let mut target = json!({
                        "refId": ref_id(j),
                        "datasource": ds,
                        "expr": expr,
                        "legendFormat": legend,
                        "range": !instant,
                        "instant": instant,
                    });
                    // The proxy puts sampled traces' ids on the duration buckets
                    // (docs/metrics.md, "Exemplars"): Grafana plots them on the
                    // latency graphs, linked to the trace. It asks once per metric
                    // and panel, so marking every such target costs nothing more.
                    if !instant && expr.contains(DURATION_BUCKETS) {
                        target["exemplar"] = json!(true);
                    }
                    target
                })
                .collect();
            let mut panel = json!({
                "id": i + 1,
                "type": p.kind,
                "title": p.title,
                "description": p.description,
                "datasource": ds,
                "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "targets": targets,
            });
            if p.kind == "timeseries" {
                panel["options"] = json!({
                    "legend": {"displayMode": "table", "placement": "bottom", "showLegend": true},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                });
            }
            panels.push(panel);
        }
        json!({
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["sluice"],
            "editable": true,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "timezone": "browser",
            "templating": {"list": variables()},
            "annotations": {"list": []},
            "links": [],
            "panels": panels,
        })
    }

    /// The JSON text committed in `dashboards/` (pretty, newline-terminated).
    pub fn render(&self) -> Result<String, serde_json::Error> {
        let mut text = serde_json::to_string_pretty(&self.to_json())?;
        text.push('\n');
        Ok(text)
    }
}

fn ref_id(i: usize) -> String {
    let letters = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    char::from(letters[i % letters.len()]).to_string()
}

fn variables() -> Vec<Value> {
    let ds = json!({"type": "prometheus", "uid": "${datasource}"});
    let query = |name: &str, label: &str, q: String| {
        json!({
            "name": name,
            "label": label,
            "type": "query",
            "datasource": ds,
            "query": {"query": q, "refId": name},
            "refresh": 2,
            "includeAll": true,
            "allValue": ".*",
            "multi": true,
            "sort": 1,
            "current": {"text": "All", "value": "$__all"},
        })
    };
    vec![
        json!({
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "refresh": 1,
            "current": {"text": "Prometheus", "value": "prometheus"},
        }),
        query(
            "namespace",
            "Namespace",
            "label_values(sluice_requests_total, namespace)".into(),
        ),
        query(
            "policy",
            "Policy",
            r#"label_values(sluice_requests_total{namespace=~"$namespace"}, policy)"#.into(),
        ),
        query(
            "route",
            "Route",
            r#"label_values(sluice_requests_total{namespace=~"$namespace",policy=~"$policy"}, route)"#
                .into(),
        ),
    ]
}

/// `sum by (by) (rate(metric{filters[,extra]}[$__rate_interval]))`
fn rate(metric: &str, filters: &str, extra: &str, by: &str) -> String {
    let sel = if extra.is_empty() {
        filters.to_owned()
    } else {
        format!("{filters},{extra}")
    };
    format!("sum by ({by}) (rate({metric}{{{sel}}}[$__rate_interval]))")
}

fn quantile(q: &str) -> String {
    format!(
        "histogram_quantile({q}, {})",
        rate(DURATION_BUCKETS, REQ, "", "policy, route, le")
    )
}

fn mesh() -> Dashboard {
    let total = rate("sluice_requests_total", REQ, "", "policy, route");
    let errors = rate(
        "sluice_requests_total",
        REQ,
        r#"code_class="5xx""#,
        "policy, route",
    );
    Dashboard {
        file: "mesh-overview.json",
        uid: "sluice-mesh-overview",
        title: "Sluice / Mesh overview",
        description: "Traffic, success and latency of every policy and route.",
        panels: vec![
            panel(
                "Requests per second",
                "timeseries",
                "reqps",
                "Requests answered, by policy and route.",
                vec![(total.clone(), "{{policy}} / {{route}}")],
            ),
            panel(
                "Success ratio",
                "timeseries",
                "percentunit",
                "Share of requests not answered 5xx (429s and fallbacks answered 2xx count as success).",
                vec![(
                    format!("1 - (({errors}) or 0 * ({total})) / ({total})"),
                    "{{policy}} / {{route}}",
                )],
            ),
            panel(
                "Latency p50 / p95 / p99",
                "timeseries",
                "s",
                "Request duration quantiles, from the per-route histograms.",
                vec![
                    (quantile("0.5"), "p50 {{policy}} / {{route}}"),
                    (quantile("0.95"), "p95 {{policy}} / {{route}}"),
                    (quantile("0.99"), "p99 {{policy}} / {{route}}"),
                ],
            ),
            panel(
                "Responses by status class",
                "timeseries",
                "reqps",
                "Requests by HTTP status class.",
                vec![(
                    rate("sluice_requests_total", REQ, "", "code_class"),
                    "{{code_class}}",
                )],
            ),
            panel(
                "Top routes by errors",
                "table",
                "short",
                "Routes with the most 5xx answers over the dashboard's time range.",
                vec![(
                    format!(
                        "topk(10, sum by (policy, route) (increase(sluice_requests_total{{{REQ},code_class=\"5xx\"}}[$__range])))"
                    ),
                    "{{policy}} / {{route}}",
                )],
            ),
            panel(
                "Governance decisions",
                "timeseries",
                "reqps",
                "Requests by the decision governance took: allowed, rate_limited, shed, breaker_open, fallback.",
                vec![(
                    rate("sluice_requests_total", REQ, "", "decision"),
                    "{{decision}}",
                )],
            ),
            panel(
                "Backend attempts by outcome",
                "timeseries",
                "reqps",
                "Attempts to reach each backend: success, http_5xx, connect_error, timeout, error.",
                vec![(
                    rate(
                        "sluice_upstream_requests_total",
                        POL,
                        "",
                        "policy, backend, outcome",
                    ),
                    "{{policy}} {{backend}} {{outcome}}",
                )],
            ),
            panel(
                "Requests in flight",
                "timeseries",
                "short",
                "Requests being served right now, per proxy.",
                vec![(
                    r#"sum by (instance) (sluice_inflight_requests_current{namespace=~"$namespace"})"#
                        .into(),
                    "{{instance}}",
                )],
            ),
        ],
    }
}

fn governance() -> Dashboard {
    Dashboard {
        file: "governance.json",
        uid: "sluice-governance",
        title: "Sluice / Governance",
        description: "What rate limits, breakers, concurrency limits, fallbacks and retries did.",
        panels: vec![
            panel(
                "Rate limited (enforced vs shadow)",
                "timeseries",
                "reqps",
                "Requests over a route's rate limit; mode=shadow ones were let through.",
                vec![(
                    rate("sluice_rate_limited_total", REQ, "", "policy, route, mode"),
                    "{{policy}} / {{route}} ({{mode}})",
                )],
            ),
            panel(
                "Shed (enforced vs shadow)",
                "timeseries",
                "reqps",
                "Requests shed by a concurrency limit, by priority class; mode=shadow ones were let through.",
                vec![(
                    rate(
                        "sluice_shed_total",
                        REQ,
                        "",
                        "policy, route, priority, mode",
                    ),
                    "{{policy}} / {{route}} {{priority}} ({{mode}})",
                )],
            ),
            panel(
                "Circuit breaker state",
                "timeseries",
                "short",
                "0 closed, 1 open, 2 half-open (worst proxy).",
                vec![(
                    format!("max by (policy, route) (sluice_circuit_breaker_state{{{REQ}}})"),
                    "{{policy}} / {{route}}",
                )],
            ),
            panel(
                "Breaker transitions and refusals",
                "timeseries",
                "short",
                "State changes (by state entered) and requests an open breaker refused.",
                vec![
                    (
                        format!(
                            "sum by (policy, route, to) (increase(sluice_circuit_breaker_transitions_total{{{REQ}}}[$__rate_interval]))"
                        ),
                        "{{policy}} / {{route}} -> {{to}}",
                    ),
                    (
                        rate(
                            "sluice_circuit_breaker_rejected_total",
                            REQ,
                            "",
                            "policy, route, mode",
                        ),
                        "{{policy}} / {{route}} refused ({{mode}})",
                    ),
                ],
            ),
            panel(
                "Fallbacks by cause",
                "timeseries",
                "reqps",
                "Responses served by a fallback: breaker-open, rate-limited, overloaded, upstream-error.",
                vec![(
                    rate(
                        "sluice_fallbacks_total",
                        REQ,
                        "",
                        "policy, route, cause, mode",
                    ),
                    "{{policy}} / {{route}} {{cause}} ({{mode}})",
                )],
            ),
            panel(
                "Retries and budget exhaustion",
                "timeseries",
                "reqps",
                "Retries made, and retries the retry budget refused (budget_exhausted).",
                vec![(
                    rate("sluice_retries_total", REQ, "", "policy, route, result"),
                    "{{policy}} / {{route}} {{result}}",
                )],
            ),
            panel(
                "Concurrency limit vs in flight",
                "timeseries",
                "short",
                "A route's current concurrency limit (fixed or adaptive) and the requests holding a slot.",
                vec![
                    (
                        format!("sum by (policy, route) (sluice_concurrency_limit{{{REQ}}})"),
                        "limit {{policy}} / {{route}}",
                    ),
                    (
                        format!("sum by (policy, route) (sluice_inflight_requests{{{REQ}}})"),
                        "in flight {{policy}} / {{route}}",
                    ),
                ],
            ),
            panel(
                "Keyed rate limits",
                "timeseries",
                "short",
                "Keys tracked by keyed rate limits, and requests that found the maxKeys cap reached.",
                vec![
                    (
                        format!("sum by (policy, route) (sluice_rate_limit_keys{{{REQ}}})"),
                        "keys {{policy}} / {{route}}",
                    ),
                    (
                        rate(
                            "sluice_rate_limit_overflow_total",
                            REQ,
                            "",
                            "policy, route",
                        ),
                        "overflow/s {{policy}} / {{route}}",
                    ),
                ],
            ),
            panel(
                "Global rate limits on the replicas' own buckets",
                "timeseries",
                "short",
                "Requests of a globalRateLimit decided by a replica's own bucket (whenUnreachable) instead of the bucket shared through Redis: Redis unreachable, or leases arriving too late. 0 when the shared bucket decides everything.",
                vec![(
                    rate(
                        "sluice_global_rate_limit_local_decisions_total",
                        REQ,
                        "",
                        "policy, route",
                    ),
                    "{{policy}} / {{route}}",
                )],
            ),
            panel(
                "Backend health and ejections",
                "timeseries",
                "short",
                "1 when a backend passes its health checks and is not ejected (worst proxy), and outlier-detection ejections.",
                vec![
                    (
                        format!("min by (policy, backend) (sluice_backend_healthy{{{POL}}})"),
                        "healthy {{policy}} {{backend}}",
                    ),
                    (
                        format!(
                            "sum by (policy, backend) (increase(sluice_backend_ejections_total{{{POL}}}[$__rate_interval]))"
                        ),
                        "ejections {{policy}} {{backend}}",
                    ),
                ],
            ),
            panel(
                "Backend error ratio",
                "timeseries",
                "percentunit",
                "Share of attempts to each backend that did not succeed (5xx, connect error, timeout).",
                vec![(
                    format!(
                        "1 - ({}) / ({})",
                        rate(
                            "sluice_upstream_requests_total",
                            POL,
                            r#"outcome="success""#,
                            "policy, backend"
                        ),
                        rate(
                            "sluice_upstream_requests_total",
                            POL,
                            "",
                            "policy, backend"
                        )
                    ),
                    "{{policy}} {{backend}}",
                )],
            ),
        ],
    }
}

fn slos() -> Dashboard {
    let sel = |slo: &str| format!(r#"{{namespace=~"$namespace",policy=~"$policy",slo="{slo}"}}"#);
    let objective = |slo: &str| format!(r#"{OBJECTIVE_RECORD}{{policy=~"$policy",slo="{slo}"}}"#);
    let budget = format!(r#"(1 - {OBJECTIVE_RECORD}{{policy=~"$policy"}})"#);
    let burn_targets = WINDOWS
        .iter()
        .map(|w| {
            (
                format!(
                    r#"{}{{namespace=~"$namespace",policy=~"$policy"}} / on (policy, slo) group_left () {budget}"#,
                    error_ratio_record(w)
                ),
                match *w {
                    "5m" => "{{policy}} {{slo}} 5m",
                    "30m" => "{{policy}} {{slo}} 30m",
                    "1h" => "{{policy}} {{slo}} 1h",
                    "6h" => "{{policy}} {{slo}} 6h",
                    _ => "{{policy}} {{slo}} 3d",
                },
            )
        })
        .collect();
    let alerts = BURN_ALERTS
        .iter()
        .map(|b| b.alert)
        .collect::<Vec<_>>()
        .join("|");
    Dashboard {
        file: "slos.json",
        uid: "sluice-slos",
        title: "Sluice / SLOs",
        description: "Service level indicators against each policy's objectives, error budgets and burn rates (from `sluice-cp slo-rules`).",
        panels: vec![
            panel(
                "Availability SLI (1h) vs objective",
                "timeseries",
                "percentunit",
                "Share of requests not answered 5xx over the last hour, and the policy's objective.",
                vec![
                    (
                        format!("1 - {}{}", error_ratio_record("1h"), sel("availability")),
                        "SLI {{policy}}",
                    ),
                    (objective("availability"), "objective {{policy}}"),
                ],
            ),
            panel(
                "Latency SLI (1h) vs objective",
                "timeseries",
                "percentunit",
                "Share of requests faster than the policy's latency threshold over the last hour, and the objective.",
                vec![
                    (
                        format!("1 - {}{}", error_ratio_record("1h"), sel("latency")),
                        "SLI {{policy}}",
                    ),
                    (objective("latency"), "objective {{policy}}"),
                ],
            ),
            panel(
                "Error budget remaining (30d)",
                "stat",
                "percentunit",
                "1 - (average hourly bad-event ratio over 30 days) / (1 - objective). Negative: the budget is spent.",
                vec![(
                    format!(
                        r#"1 - avg_over_time({}{{namespace=~"$namespace",policy=~"$policy"}}[30d]) / on (policy, slo) group_left () {budget}"#,
                        error_ratio_record("1h")
                    ),
                    "{{policy}} {{slo}}",
                )],
            ),
            panel(
                "Burn rate by window",
                "timeseries",
                "short",
                "Bad-event ratio divided by the error budget: 1 spends the budget in exactly the SLO period. Pages at 14.4 (1h and 5m) and 6 (6h and 30m); a ticket at 1 (3d and 6h).",
                burn_targets,
            ),
            panel(
                "Burn-rate alerts",
                "table",
                "short",
                "Error-budget alerts firing or pending now.",
                vec![(
                    format!(
                        r#"ALERTS{{alertname=~"{alerts}",namespace=~"$namespace",policy=~"$policy"}}"#
                    ),
                    "{{alertname}} {{policy}} {{slo}}",
                )],
            ),
        ],
    }
}

fn fleet() -> Dashboard {
    Dashboard {
        file: "proxy-fleet.json",
        uid: "sluice-proxy-fleet",
        title: "Sluice / Proxy fleet",
        description: "Policy versions, reloads, control-plane reachability and resources of every proxy.",
        panels: vec![
            panel(
                "Policy version per proxy",
                "table",
                "short",
                "The policy version (content hash) each proxy serves.",
                vec![(
                    r#"max by (namespace, instance, version) (sluice_policy_info{namespace=~"$namespace"})"#
                        .into(),
                    "{{instance}} {{version}}",
                )],
            ),
            panel(
                "Distinct policy versions",
                "timeseries",
                "short",
                "Policy versions served at once per namespace; above 1 for 10 minutes raises SluicePolicyVersionSkew.",
                vec![(
                    r#"count by (namespace) (count by (namespace, version) (sluice_policy_info{namespace=~"$namespace"} == 1))"#
                        .into(),
                    "{{namespace}}",
                )],
            ),
            panel(
                "Policy reloads",
                "timeseries",
                "short",
                "Policy loads by result (accepted, rejected, unchanged) and source.",
                vec![(
                    r#"sum by (result, source) (increase(sluice_policy_reloads_total{namespace=~"$namespace"}[$__rate_interval]))"#
                        .into(),
                    "{{result}} ({{source}})",
                )],
            ),
            panel(
                "Proxies up",
                "timeseries",
                "short",
                "Proxies Prometheus scrapes successfully, and those it cannot.",
                vec![
                    (
                        r#"sum(up{job="sluice-proxy",namespace=~"$namespace"} == 1) or vector(0)"#
                            .into(),
                        "up",
                    ),
                    (
                        r#"sum(up{job="sluice-proxy",namespace=~"$namespace"} == 0) or vector(0)"#
                            .into(),
                        "down",
                    ),
                ],
            ),
            panel(
                "Control-plane replicas up",
                "stat",
                "short",
                "Control-plane replicas Prometheus scrapes; proxies keep their last good policy while this is 0.",
                vec![(
                    r#"sum(up{job="sluice-control-plane"} == 1) or vector(0)"#.into(),
                    "replicas",
                )],
            ),
            panel(
                "Proxies connected to the control plane",
                "timeseries",
                "short",
                "Proxies holding a policy stream to the control plane, and those without one (they serve their last good policy).",
                vec![
                    (
                        r#"sum(sluice_control_plane_connected{namespace=~"$namespace"} == 1) or vector(0)"#
                            .into(),
                        "connected",
                    ),
                    (
                        r#"count(sluice_control_plane_connected{namespace=~"$namespace"} == 0) or vector(0)"#
                            .into(),
                        "not connected",
                    ),
                ],
            ),
            panel(
                "Proxies reaching Redis (global rate limits)",
                "timeseries",
                "short",
                "Proxies whose global rate limits share their buckets through Redis, those that cannot reach it (or run without --redis: each replica then keeps its own bucket), and failed round trips to Redis.",
                vec![
                    (
                        r#"sum(sluice_global_rate_limit_redis_up{namespace=~"$namespace"} == 1) or vector(0)"#
                            .into(),
                        "reaching Redis",
                    ),
                    (
                        r#"count(sluice_global_rate_limit_redis_up{namespace=~"$namespace"} == 0) or vector(0)"#
                            .into(),
                        "not reaching Redis",
                    ),
                    (
                        r#"sum(rate(sluice_global_rate_limit_syncs_total{namespace=~"$namespace",outcome="error"}[$__rate_interval])) or vector(0)"#
                            .into(),
                        "failed round trips/s",
                    ),
                ],
            ),
            panel(
                "Proxy CPU",
                "timeseries",
                "percentunit",
                "CPU time per second of each sluice-proxy process (its own process_cpu_seconds_total: no cAdvisor needed, outside Kubernetes too).",
                vec![(
                    r#"sum by (namespace, instance) (rate(process_cpu_seconds_total{job="sluice-proxy",namespace=~"$namespace"}[$__rate_interval]))"#
                        .into(),
                    "{{namespace}} {{instance}}",
                )],
            ),
            panel(
                "Proxy memory",
                "timeseries",
                "bytes",
                "Resident memory of each sluice-proxy process (its own process_resident_memory_bytes: no cAdvisor needed, outside Kubernetes too).",
                vec![(
                    r#"sum by (namespace, instance) (process_resident_memory_bytes{job="sluice-proxy",namespace=~"$namespace"})"#
                        .into(),
                    "{{namespace}} {{instance}}",
                )],
            ),
            panel(
                "Requests in flight per proxy",
                "timeseries",
                "short",
                "Requests being served right now, per proxy.",
                vec![(
                    r#"sum by (instance) (sluice_inflight_requests_current{namespace=~"$namespace"})"#
                        .into(),
                    "{{instance}}",
                )],
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dashboard_has_the_four_variables() {
        for d in all() {
            let json = d.to_json();
            let names: Vec<&str> = json["templating"]["list"]
                .as_array()
                .map(|l| l.iter().filter_map(|v| v["name"].as_str()).collect())
                .unwrap_or_default();
            assert_eq!(
                names,
                ["datasource", "namespace", "policy", "route"],
                "{}",
                d.file
            );
        }
    }

    #[test]
    fn every_panel_queries_the_datasource_variable() {
        for d in all() {
            let json = d.to_json();
            for p in json["panels"].as_array().into_iter().flatten() {
                assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", d.file);
                assert!(!p["targets"].as_array().is_none_or(Vec::is_empty));
            }
        }
    }

    #[test]
    fn latency_graphs_show_exemplars_and_nothing_else_asks_for_them() {
        let mut marked = 0;
        for d in all() {
            let json = d.to_json();
            for p in json["panels"].as_array().into_iter().flatten() {
                for t in p["targets"].as_array().into_iter().flatten() {
                    let plots_buckets = t["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains(DURATION_BUCKETS))
                        && t["range"] == true;
                    assert_eq!(t["exemplar"] == true, plots_buckets, "{}: {t}", d.file);
                    marked += usize::from(plots_buckets);
                }
            }
        }
        assert!(marked >= 3, "the mesh overview's p50, p95 and p99");
    }

    #[test]
    fn uids_and_files_are_unique() {
        let all = all();
        let mut uids: Vec<&str> = all.iter().map(|d| d.uid).collect();
        uids.sort_unstable();
        uids.dedup();
        assert_eq!(uids.len(), all.len());
    }
}
