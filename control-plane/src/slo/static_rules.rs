//! Alerts that hold for every Sluice deployment, whatever its policies: a breaker
//! stuck open, a rejected policy, proxies serving different policy versions, a proxy
//! Prometheus cannot scrape, no control plane, a proxy that cannot reach the Redis of
//! its global rate limits.
//!
//! Scrape jobs are expected to be named `sluice-proxy` and `sluice-control-plane`
//! (`k8s/monitoring/podmonitor.yaml` sets them); version skew is judged per
//! `namespace`, since the proxies of one namespace are served one policy set.

use super::rules::{self, Group, Rule};
use super::runbook;

/// Job label of the proxies' scrape target.
pub const PROXY_JOB: &str = "sluice-proxy";
/// Job label of the control plane's scrape target.
pub const CONTROL_PLANE_JOB: &str = "sluice-control-plane";

/// The static rules as a Prometheus rule file.
pub fn static_rules() -> String {
    rules::render(&static_groups())
}

/// The static rules as data.
pub fn static_groups() -> Vec<Group> {
    vec![Group {
        name: "sluice-static".into(),
        rules: vec![
            alert(
                "SluiceCircuitBreakerOpen",
                // Open (1) or half-open (2): a breaker whose probes keep failing goes
                // open -> half-open -> open and never reads closed in between.
                "max by (namespace, policy, route) (sluice_circuit_breaker_state) > 0",
                Some("5m"),
                "warning",
                "The circuit breaker of route {{ $labels.route }} (policy {{ $labels.policy }}) has not been closed for 5 minutes.",
                "Requests to this route are refused or served by its fallback. Check the route's backends.",
            ),
            alert(
                "SluicePolicyReloadRejected",
                // `increase` misses the first rejection (the series is born at 1), so a
                // series that did not exist 10 minutes ago counts too.
                "increase(sluice_policy_reloads_total{result=\"rejected\"}[10m]) > 0\nor\n(\n  sluice_policy_reloads_total{result=\"rejected\"}\n  unless\n  sluice_policy_reloads_total{result=\"rejected\"} offset 10m\n)",
                None,
                "warning",
                "Proxy {{ $labels.instance }} rejected a policy update; it keeps serving its last good policy.",
                "The proxy's stderr names the file, line and column of every error; `sluice-cp validate` shows the same.",
            ),
            alert(
                "SluicePolicyVersionSkew",
                "count by (namespace) (count by (namespace, version) (sluice_policy_info == 1)) > 1",
                Some("10m"),
                "warning",
                "Proxies in namespace {{ $labels.namespace }} serve {{ $value }} different policy versions.",
                "Some proxies did not apply the latest policy for 10 minutes: compare `sluice_policy_info` per instance and check their reload errors.",
            ),
            alert(
                "SluiceProxyNotScraped",
                &format!("up{{job=\"{PROXY_JOB}\"}} == 0"),
                Some("5m"),
                "warning",
                "Prometheus cannot scrape the Sluice proxy {{ $labels.instance }}.",
                "Its metrics, SLIs and alerts are blind for this pod: check the pod and its admin listener.",
            ),
            alert(
                "SluiceGlobalRateLimitRedisUnreachable",
                // Failed round trips tell a proxy given --redis from one without it
                // (whose gauge reads 0 too, and which never tries).
                "sluice_global_rate_limit_redis_up == 0\nand ignoring (outcome)\nincrease(sluice_global_rate_limit_syncs_total{outcome=\"error\"}[10m]) > 0",
                Some("5m"),
                "warning",
                "Proxy {{ $labels.instance }} cannot reach Redis: its global rate limits run on its own buckets.",
                "Each replica admits up to its whenUnreachable rate on its own, so together they may exceed the shared limit. Check the Redis named by --redis (sluice.dev/redis) and the proxy's stderr.",
            ),
            alert(
                "SluiceControlPlaneDown",
                &format!("absent(up{{job=\"{CONTROL_PLANE_JOB}\"}} == 1)"),
                Some("5m"),
                "critical",
                "No Sluice control-plane replica is up.",
                "Proxies keep serving their last good policy, but no policy change reaches them.",
            ),
        ],
    }]
}

fn alert(
    name: &str,
    expr: &str,
    for_: Option<&str>,
    severity: &str,
    summary: &str,
    description: &str,
) -> Rule {
    Rule::Alert {
        alert: name.into(),
        expr: expr.into(),
        for_: for_.map(Into::into),
        labels: vec![("severity".into(), severity.into())],
        annotations: vec![
            ("summary".into(), summary.into()),
            ("description".into(), description.into()),
            ("runbook_url".into(), runbook(name)),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_static_alert_has_a_runbook_and_a_severity() {
        let text = static_rules();
        for name in [
            "SluiceCircuitBreakerOpen",
            "SluicePolicyReloadRejected",
            "SluicePolicyVersionSkew",
            "SluiceProxyNotScraped",
            "SluiceControlPlaneDown",
            "SluiceGlobalRateLimitRedisUnreachable",
        ] {
            assert!(text.contains(&format!("- alert: \"{name}\"")), "{name}");
            assert!(text.contains(&format!(
                "\"runbook_url\": \"docs/runbooks.md#{}\"",
                name.to_ascii_lowercase()
            )));
        }
        assert_eq!(text.matches("\"severity\": ").count(), 6);
    }
}
