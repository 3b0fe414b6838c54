//! The committed observability assets are exactly what the generators produce from
//! `policies/`: rules in `dashboards/`, dashboards JSON, and their Kubernetes wrappers
//! in `k8s/monitoring/`. Regenerate with
//! `BLESS=1 cargo test -p sluice-control-plane --test observability_assets`.
//!
//! Also checks `docs/metrics.md` documents exactly the metrics the proxy and the
//! control plane register.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sluice_control_plane::slo::{self, dashboards, k8s};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn expected_assets() -> Vec<(PathBuf, String)> {
    let root = root();
    let set = sluice_policy::load_path(&root.join("policies")).unwrap_or_else(|e| panic!("{e}"));
    let mut assets = vec![
        (root.join("dashboards/slo-rules.yaml"), slo::slo_rules(&set)),
        (
            root.join("dashboards/static-rules.yaml"),
            slo::static_rules(),
        ),
    ];
    let all = dashboards::all();
    for d in &all {
        let text = d.render().expect("dashboard JSON");
        assets.push((root.join("dashboards").join(d.file), text));
    }
    let mut groups = slo::slo_groups(&set);
    groups.extend(slo::static_groups());
    assets.push((
        root.join("k8s/monitoring/prometheus-rule.yaml"),
        k8s::prometheus_rule(&groups),
    ));
    assets.push((
        root.join("k8s/monitoring/grafana-dashboards.yaml"),
        k8s::grafana_config_maps(&all).expect("dashboards JSON"),
    ));
    assets
}

#[test]
fn committed_rules_dashboards_and_manifests_are_fresh() {
    let bless = std::env::var_os("BLESS").is_some();
    let mut stale = Vec::new();
    for (path, expected) in expected_assets() {
        if bless {
            std::fs::write(&path, &expected).expect("write asset");
            continue;
        }
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        if actual != expected {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale (regenerate with BLESS=1 cargo test -p sluice-control-plane --test observability_assets): {stale:?}"
    );
}

/// Metric names registered by the proxy and the control plane: the `"sluice_..."`
/// string literals of `proxy/src/metrics.rs` and `control-plane/src/metrics.rs`,
/// where each `Metrics::register` names every metric.
fn registered_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["proxy/src/metrics.rs", "control-plane/src/metrics.rs"] {
        let source = std::fs::read_to_string(root().join(file)).expect(file);
        names.extend(
            source
                .split('"')
                .skip(1)
                .step_by(2)
                .filter(|s| {
                    s.starts_with("sluice_")
                        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
                .map(str::to_owned),
        );
    }
    names
}

/// Metric names documented: the first backticked cell of each table row of
/// `docs/metrics.md`'s metric table.
fn documented_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).expect("docs/metrics.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("sluice_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn metrics_doc_lists_exactly_the_registered_metrics() {
    let registered = registered_metrics();
    assert!(registered.len() >= 15, "{registered:?}");
    let documented = documented_metrics();
    let missing: Vec<_> = registered.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&registered).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/metrics.md is out of date: undocumented {missing:?}, not registered {unknown:?}"
    );
}

#[test]
fn rules_and_dashboards_use_only_registered_metrics() {
    let registered = registered_metrics();
    let mut used = BTreeSet::new();
    for (_, text) in expected_assets() {
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if word.starts_with("sluice_") {
                used.insert(word.to_owned());
            }
        }
    }
    let known = |m: &str| {
        registered.contains(m)
            || ["_bucket", "_count", "_sum"]
                .iter()
                .any(|s| m.strip_suffix(s).is_some_and(|b| registered.contains(b)))
    };
    let unknown: Vec<_> = used.iter().filter(|m| !known(m)).collect();
    assert!(
        unknown.is_empty(),
        "not registered by the proxy or the control plane: {unknown:?}"
    );
}
