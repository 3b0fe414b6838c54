//! `sluice-cp validate PATH...`: the same checks the proxy and the control plane
//! apply, run ahead of time (in CI, in a pre-commit hook).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use sluice_policy::{Algorithm, Checked, TrafficPolicy};

/// Validates every path together (names and hosts must be unique across all of
/// them, as they would be when served). Exit 0 when valid, 1 otherwise; warnings
/// (valid, but probably not meant) go to stderr and do not change the exit code.
pub fn run(paths: &[PathBuf]) -> ExitCode {
    match sluice_policy::check_paths(paths) {
        Ok(Checked { set, warnings }) => {
            let mut err = std::io::stderr().lock();
            for warning in &warnings {
                let _ = writeln!(err, "{warning}");
            }
            let mut out = std::io::stdout().lock();
            for policy in &set.policies {
                let _ = writeln!(out, "{}", summary(policy));
            }
            let _ = writeln!(
                out,
                "{} valid {}",
                set.policies.len(),
                plural(set.policies.len(), "policy", "policies")
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            let _ = writeln!(std::io::stderr().lock(), "{errors}");
            ExitCode::from(1)
        }
    }
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// `demo: valid, 4 hosts, 3 backends (weighted-round-robin), 5 routes, mode enforce`;
/// routes with backends of their own are counted: `2 routes (1 with backends of its own)`;
/// `spec.mtls` and `spec.authorization` follow when set (`, mtls strict,
/// authorization: 2 rules, default deny`).
pub fn summary(p: &TrafficPolicy) -> String {
    let algorithm = match &p.load_balancer.algorithm {
        Algorithm::WeightedRoundRobin => "weighted-round-robin".to_owned(),
        Algorithm::P2cEwma => "p2c-ewma".to_owned(),
        Algorithm::ConsistentHash { hash_on } => format!("consistent-hash on {hash_on}"),
    };
    let own = p.routes.iter().filter(|r| r.backends.is_some()).count();
    let own = if own == 0 {
        String::new()
    } else {
        format!(
            " ({own} with backends of {})",
            plural(own, "its own", "their own")
        )
    };
    let mtls = p
        .mtls
        .map(|m| format!(", mtls {}", m.as_str()))
        .unwrap_or_default();
    let authorization = p
        .authorization
        .as_ref()
        .map(|a| {
            format!(
                ", authorization: {} {}, default {}",
                a.rules.len(),
                plural(a.rules.len(), "rule", "rules"),
                a.default.as_str()
            )
        })
        .unwrap_or_default();
    format!(
        "{}: valid, {} {}, {} {} ({algorithm}), {} {}{own}, mode {}{mtls}{authorization}",
        p.name,
        p.hosts.len(),
        plural(p.hosts.len(), "host", "hosts"),
        p.backends.len(),
        plural(p.backends.len(), "backend", "backends"),
        p.routes.len(),
        plural(p.routes.len(), "route", "routes"),
        p.mode.as_str()
    )
}
