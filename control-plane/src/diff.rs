//! `sluice-cp diff`: what applying a policy change would do, route by route, in
//! sentences a reviewer reads (not a YAML diff): "route orders: rate limit 100/s
//! (burst 50) -> 200/s (burst 50)".

use sluice_policy::{
    Algorithm, CircuitBreaker, Concurrency, Fallback, FallbackAction, GlobalRateLimit, PathMatch,
    PolicySet, RateLimit, Retries, Route, RouteMatch, TrafficPolicy,
};

fn dur(d: std::time::Duration) -> String {
    sluice_policy::duration::format(d)
}

fn matcher(m: &RouteMatch) -> String {
    let mut parts = vec![match &m.path {
        PathMatch::Any => "any path".to_owned(),
        PathMatch::Exact(p) => format!("path {p}"),
        PathMatch::Prefix(p) => format!("paths under {p}"),
    }];
    if !m.methods.is_empty() {
        parts.push(m.methods.join("/"));
    }
    for (k, v) in &m.headers {
        parts.push(format!("{k}: {v}"));
    }
    parts.join(", ")
}

fn rate_limit(r: &RateLimit) -> String {
    let mut s = format!("{}/s (burst {})", r.requests_per_second, r.burst);
    if let Some(k) = &r.key {
        s.push_str(&format!(" per {} (at most {} keys)", k.key, k.max_keys));
    }
    s
}

fn global_rate_limit(g: &GlobalRateLimit) -> String {
    format!(
        "{} across replicas; {}/s (burst {}) each while Redis is unreachable",
        rate_limit(&g.shared),
        g.when_unreachable.requests_per_second,
        g.when_unreachable.burst
    )
}

fn concurrency(c: &Concurrency) -> String {
    match c {
        Concurrency::Fixed { max } => format!("at most {max} in flight"),
        Concurrency::Adaptive { min, max } => format!("adaptive between {min} and {max}"),
    }
}

fn breaker(b: &CircuitBreaker) -> String {
    let mut triggers = Vec::new();
    if let Some(n) = b.consecutive_failures {
        triggers.push(format!("{n} failures in a row"));
    }
    if let Some(r) = b.error_ratio {
        triggers.push(format!("{}% errors", r * 100.0));
    }
    if let Some(s) = &b.slow_call {
        triggers.push(format!(
            "{}% slower than {}",
            s.ratio * 100.0,
            dur(s.threshold)
        ));
    }
    format!(
        "opens on {} (over {}, at least {} requests) for {}, {} probes",
        triggers.join(" or "),
        dur(b.window),
        b.min_requests,
        dur(b.open_for),
        b.half_open_requests
    )
}

fn fallback(f: &Fallback) -> String {
    let on: Vec<&str> = f.on.iter().map(|c| c.as_str()).collect();
    match &f.action {
        FallbackAction::Static { status, body, .. } => {
            format!(
                "static {status} ({} bytes) on {}",
                body.len(),
                on.join(", ")
            )
        }
        FallbackAction::Backend(a) => format!("backend {a} on {}", on.join(", ")),
    }
}

fn retries(r: &Retries) -> String {
    format!(
        "{} attempts on {:?}, budget {}% + {}/s",
        r.attempts,
        r.on,
        r.budget.ratio * 100.0,
        r.budget.min_per_second
    )
}

fn opt<T>(value: &Option<T>, show: impl Fn(&T) -> String) -> String {
    value.as_ref().map_or_else(|| "none".to_owned(), show)
}

fn change<T: PartialEq>(
    out: &mut Vec<String>,
    what: &str,
    old: &T,
    new: &T,
    show: impl Fn(&T) -> String,
) {
    if old != new {
        out.push(format!("{what}: {} -> {}", show(old), show(new)));
    }
}

fn route_changes(
    old: &Route,
    new: &Route,
    policy_mode: (sluice_policy::Mode, sluice_policy::Mode),
) -> Vec<String> {
    let mut out = Vec::new();
    change(&mut out, "match", &old.matcher, &new.matcher, matcher);
    change(&mut out, "timeout", &old.timeout, &new.timeout, |t| {
        opt(t, |d| dur(*d))
    });
    change(&mut out, "retries", &old.retries, &new.retries, |r| {
        opt(r, retries)
    });
    change(
        &mut out,
        "rate limit",
        &old.rate_limit,
        &new.rate_limit,
        |r| opt(r, rate_limit),
    );
    change(
        &mut out,
        "global rate limit",
        &old.global_rate_limit,
        &new.global_rate_limit,
        |g| opt(g, global_rate_limit),
    );
    change(
        &mut out,
        "concurrency",
        &old.concurrency,
        &new.concurrency,
        |c| opt(c, concurrency),
    );
    change(
        &mut out,
        "circuit breaker",
        &old.circuit_breaker,
        &new.circuit_breaker,
        |b| opt(b, breaker),
    );
    change(&mut out, "fallback", &old.fallback, &new.fallback, |f| {
        opt(f, fallback)
    });
    change(&mut out, "priority", &old.priority, &new.priority, |p| {
        opt(p, |p| {
            format!(
                "header {} sheds {} first",
                p.header,
                p.shed_first.join(", ")
            )
        })
    });
    let (old_mode, new_mode) = (
        old.effective_mode(policy_mode.0),
        new.effective_mode(policy_mode.1),
    );
    change(&mut out, "mode", &old_mode, &new_mode, |m| {
        m.as_str().to_owned()
    });
    out
}

fn policy_changes(old: &TrafficPolicy, new: &TrafficPolicy) -> Vec<String> {
    let mut out = Vec::new();
    change(&mut out, "hosts", &old.hosts, &new.hosts, |h| h.join(", "));
    change(&mut out, "mode", &old.mode, &new.mode, |m| {
        m.as_str().to_owned()
    });
    for b in &new.backends {
        match old.backends.iter().find(|o| o.address == b.address) {
            None => out.push(format!("backend {} added (weight {})", b.address, b.weight)),
            Some(o) if o.weight != b.weight => out.push(format!(
                "backend {} weight {} -> {}",
                b.address, o.weight, b.weight
            )),
            Some(o) if o.protocol != b.protocol => {
                out.push(format!("backend {} protocol changed", b.address))
            }
            Some(_) => {}
        }
    }
    for o in &old.backends {
        if !new.backends.iter().any(|b| b.address == o.address) {
            out.push(format!("backend {} removed", o.address));
        }
    }
    let algorithm = |a: &Algorithm| match a {
        Algorithm::WeightedRoundRobin => "weighted-round-robin".to_owned(),
        Algorithm::P2cEwma => "p2c-ewma".to_owned(),
        Algorithm::ConsistentHash { hash_on } => format!("consistent-hash on {hash_on}"),
    };
    change(
        &mut out,
        "load balancer",
        &old.load_balancer.algorithm,
        &new.load_balancer.algorithm,
        algorithm,
    );
    change(
        &mut out,
        "slow start",
        &old.load_balancer.slow_start,
        &new.load_balancer.slow_start,
        |s| opt(s, |d| dur(*d)),
    );
    change(
        &mut out,
        "health check",
        &old.health_check,
        &new.health_check,
        |h| opt(h, |h| format!("GET {} every {}", h.path, dur(h.interval))),
    );
    change(
        &mut out,
        "outlier detection",
        &old.outlier_detection,
        &new.outlier_detection,
        |o| {
            opt(o, |o| {
                format!(
                    "eject after {} failures for {}",
                    o.consecutive_failures,
                    dur(o.eject_for)
                )
            })
        },
    );
    change(&mut out, "SLO", &old.slo, &new.slo, |s| {
        opt(s, |s| {
            format!(
                "availability {}, latency {}",
                s.availability.map_or("none".to_owned(), |a| a.to_string()),
                s.latency.as_ref().map_or("none".to_owned(), |l| format!(
                    "{} under {}",
                    l.target,
                    dur(l.threshold)
                ))
            )
        })
    });
    for (i, r) in new.routes.iter().enumerate() {
        match old.routes.iter().position(|o| o.name == r.name) {
            None => out.push(format!(
                "route {} added (matches {})",
                r.name,
                matcher(&r.matcher)
            )),
            Some(j) => {
                if i != j {
                    out.push(format!(
                        "route {} moved from position {} to {}",
                        r.name,
                        j + 1,
                        i + 1
                    ));
                }
                for c in route_changes(&old.routes[j], r, (old.mode, new.mode)) {
                    out.push(format!("route {}: {c}", r.name));
                }
            }
        }
    }
    for o in &old.routes {
        if !new.routes.iter().any(|r| r.name == o.name) {
            out.push(format!("route {} removed", o.name));
        }
    }
    out
}

/// Every change from `old` to `new`, one sentence each; empty when equal.
pub fn diff(old: &PolicySet, new: &PolicySet) -> Vec<String> {
    let mut out = Vec::new();
    for p in &new.policies {
        match old.get(&p.name) {
            None => out.push(format!(
                "policy {} added ({} routes, hosts {})",
                p.name,
                p.routes.len(),
                p.hosts.join(", ")
            )),
            Some(o) => out.extend(
                policy_changes(o, p)
                    .into_iter()
                    .map(|c| format!("policy {}: {c}", p.name)),
            ),
        }
    }
    for o in &old.policies {
        if new.get(&o.name).is_none() {
            out.push(format!("policy {} removed", o.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(yaml: &str) -> PolicySet {
        match sluice_policy::parse_str(Path::new("t.yaml"), yaml) {
            Ok(set) => set,
            Err(e) => panic!("{e}"),
        }
    }

    const BASE: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec:\n  hosts: [shop]\n  backends: [{address: \"10.0.0.1:80\", weight: 1}]\n  routes:\n    - name: orders\n      rateLimit: {requestsPerSecond: 100, burst: 50}\n";

    #[test]
    fn describes_changes_route_by_route() {
        let old = load(BASE);
        let changed = BASE
            .replace("requestsPerSecond: 100", "requestsPerSecond: 200")
            .replace("weight: 1", "weight: 3");
        let new = load(&format!(
            "{changed}    - name: search\n      match: {{pathPrefix: /search}}\n"
        ));
        assert_eq!(
            diff(&old, &new),
            vec![
                "policy shop: backend 10.0.0.1:80 weight 1 -> 3".to_owned(),
                "policy shop: route orders: rate limit: 100/s (burst 50) -> 200/s (burst 50)"
                    .to_owned(),
                "policy shop: route search added (matches paths under /search)".to_owned(),
            ]
        );
        assert!(diff(&old, &old).is_empty());
        assert_eq!(
            diff(&new, &PolicySet::default()),
            vec!["policy shop removed".to_owned()]
        );
    }
}
