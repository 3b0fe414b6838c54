//! `sluice-cp diff`: what applying a policy change would do, route by route, in
//! sentences a reviewer reads (not a YAML diff): "route orders: rate limit 100/s
//! (burst 50) -> 200/s (burst 50)".

use sluice_policy::{
    Algorithm, Backend, CircuitBreaker, Concurrency, Fallback, FallbackAction, GlobalRateLimit,
    PathMatch, PolicySet, RateLimit, Retries, Route, RouteMatch, TrafficPolicy,
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

/// A backend as its author named it: the Service (`reviews-v1`, `reviews.shop`,
/// with `:port` only when the list names the Service twice), else the address.
fn backend_name(b: &Backend, list: &[Backend]) -> String {
    match &b.service {
        Some(s) => {
            let twice = list
                .iter()
                .filter(|o| {
                    o.service
                        .as_ref()
                        .is_some_and(|x| x.to_string() == s.to_string())
                })
                .count()
                > 1;
            if twice {
                format!("{s}:{}", s.port)
            } else {
                s.to_string()
            }
        }
        None => b.address.to_string(),
    }
}

/// A backend's share of the traffic, as a percentage to one decimal.
fn share(b: &Backend, list: &[Backend]) -> String {
    let total: u64 = list.iter().map(|x| u64::from(x.weight)).sum();
    if total == 0 {
        return "0%".into();
    }
    let tenths = (u64::from(b.weight) * 1000 + total / 2) / total;
    if tenths.is_multiple_of(10) {
        format!("{}%", tenths / 10)
    } else {
        format!("{}.{}%", tenths / 10, tenths % 10)
    }
}

/// The same backend in both lists: the same address, and for a Service reached by
/// a named port (no number in its address) the same port name.
fn same_backend(a: &Backend, b: &Backend) -> bool {
    a.address == b.address
        && a.service.as_ref().map(|s| &s.port) == b.service.as_ref().map(|s| &s.port)
}

/// How a split changed, in shares of the traffic rather than raw weights (a
/// reviewer asks "how much goes to the canary now"); a weight change that moves
/// no traffic (a lone backend) is still named, by its weight.
fn backend_changes(old: &[Backend], new: &[Backend]) -> Vec<String> {
    let mut out = Vec::new();
    for b in new {
        let name = backend_name(b, new);
        match old.iter().find(|o| same_backend(o, b)) {
            None => out.push(format!("backend {name} added ({})", share(b, new))),
            Some(o) => {
                let (before, after) = (share(o, old), share(b, new));
                if before != after {
                    out.push(format!("backends {name}: {before} -> {after}"));
                } else if o.weight != b.weight {
                    out.push(format!(
                        "backend {name} weight {} -> {}",
                        o.weight, b.weight
                    ));
                }
                if o.protocol != b.protocol {
                    out.push(format!("backend {name} protocol changed"));
                }
            }
        }
    }
    for o in old {
        if !new.iter().any(|b| same_backend(o, b)) {
            out.push(format!("backend {} removed", backend_name(o, old)));
        }
    }
    out
}

/// A whole list, for a route that gains or loses backends of its own.
fn split(list: &[Backend]) -> String {
    list.iter()
        .map(|b| format!("{} ({})", backend_name(b, list), share(b, list)))
        .collect::<Vec<_>>()
        .join(", ")
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
    match (&old.backends, &new.backends) {
        (Some(before), Some(after)) => out.extend(backend_changes(before, after)),
        (None, Some(after)) => out.push(format!("backends: the policy's -> {}", split(after))),
        (Some(before), None) => out.push(format!("backends: {} -> the policy's", split(before))),
        (None, None) => {}
    }
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
    out.extend(backend_changes(&old.backends, &new.backends));
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

    const SPLIT: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  backends:\n    - {service: reviews-v1, port: 9080, weight: 90}\n    - {service: reviews-v2, port: 9080, weight: 10}\n  routes:\n    - name: canary\n      match: {headers: {x-canary: \"true\"}}\n      backends:\n        - {service: reviews-v2, port: 9080, weight: 10}\n        - {service: reviews-v3, port: 9080, weight: 30}\n    - name: default\n";

    #[test]
    fn describes_a_changed_split_in_shares_of_the_traffic() {
        let old = load(SPLIT);
        let new = load(
            &SPLIT
                .replace("reviews-v2, port: 9080, weight: 10}\n        -", "reviews-v2, port: 9080, weight: 25}\n        -")
                .replace("weight: 30", "weight: 75")
                .replace("weight: 90", "weight: 75")
                .replace("weight: 10}\n  routes", "weight: 25}\n    - {address: \"legacy.example.com:8080\", weight: 0}\n  routes"),
        );
        assert_eq!(
            diff(&old, &new),
            vec![
                "policy reviews: backends reviews-v1: 90% -> 75%".to_owned(),
                "policy reviews: backends reviews-v2: 10% -> 25%".to_owned(),
                "policy reviews: backend legacy.example.com:8080 added (0%)".to_owned(),
                "policy reviews: route canary: backend reviews-v2 weight 10 -> 25".to_owned(),
                "policy reviews: route canary: backend reviews-v3 weight 30 -> 75".to_owned(),
            ]
        );
        let own = load(&SPLIT.replace(
            "    - name: default\n",
            "    - name: default\n      backends: [{service: reviews-v1, port: http}]\n",
        ));
        assert_eq!(
            diff(&old, &own),
            vec![
                "policy reviews: route default: backends: the policy's -> reviews-v1 (100%)"
                    .to_owned()
            ]
        );
        let moved = load(&SPLIT.replace(
            "reviews-v3, port: 9080, weight: 30",
            "reviews-v4, port: 9080, weight: 30",
        ));
        assert_eq!(
            diff(&old, &moved),
            vec![
                "policy reviews: route canary: backend reviews-v4 added (75%)".to_owned(),
                "policy reviews: route canary: backend reviews-v3 removed".to_owned(),
            ]
        );
    }

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
