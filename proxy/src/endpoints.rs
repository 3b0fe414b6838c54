//! A policy's backends as the proxy sees them: addresses, the picking algorithm and
//! its state (smooth WRR position, peak-EWMA latencies, the Maglev table), active
//! health, passive outlier ejection and slow start, behind one `pick`.
//!
//! A pick skips backends already tried for this request, unhealthy and ejected ones;
//! when that leaves nothing it allows an already-tried backend (a retry), and when
//! still nothing, it ignores health and ejection altogether (Envoy's *panic mode*:
//! sending to a possibly-bad backend beats failing every request when the checks
//! themselves are wrong).
//!
//! The whole `Endpoints` carries over a reload while its rule (backends, balancer,
//! health check, outlier detection) is unchanged; when the backend set changes, the
//! backends that stay keep their slow-start progress and new ones start ramping.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sluice_policy::{
    Algorithm, Backend, HealthCheck, Key, LoadBalancer, OutlierDetection, Protocol,
};

use crate::balancer::{Balancer, BalancerRule};
use crate::hashring::Maglev;
use crate::health::{Health, HealthState};
use crate::metrics::CounterCache;
use crate::outlier::OutlierDetector;
use crate::p2c::P2c;
use crate::slowstart;

/// Everything a policy says about its backends: the carry-over key.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointsRule {
    pub backends: Vec<Backend>,
    pub load_balancer: LoadBalancer,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
}

/// A backend as the proxy dials it.
pub struct Target {
    /// `host:port` as written in the policy: the metrics label.
    pub label: String,
    /// Resolved when the snapshot was built; `None` if the name did not resolve.
    pub addr: Option<SocketAddr>,
    pub protocol: Protocol,
    /// `sluice_upstream_requests_total` handles, by outcome.
    pub upstream: CounterCache,
}

enum Picker {
    RoundRobin(Balancer),
    P2c(P2c),
    Hash {
        key: Key,
        ring: ArcSwap<Maglev>,
        weights: Mutex<Vec<u32>>,
    },
}

pub struct Endpoints {
    rule: EndpointsRule,
    pub targets: Vec<Target>,
    picker: Picker,
    health: Option<HealthState>,
    outlier: Option<OutlierDetector>,
    /// When a backend joined by a reload (slow start); `None` for the first set.
    joined: Vec<Option<Instant>>,
    random: AtomicU64,
    next_check: Mutex<Instant>,
    /// Every target resolved and no health checks or outlier detection: every backend
    /// is always available, so a pick only has to avoid the ones already tried.
    always_available: bool,
    /// Some backend speaks h2c (the h1 engine hands such requests to pingora).
    pub speaks_h2c: bool,
}

impl Endpoints {
    /// Blocking: resolves every backend's name (`to_socket_addrs`, the system
    /// resolver), so it runs where snapshots are built, never on an async task.
    pub fn new(rule: EndpointsRule, previous: Option<&Endpoints>, now: Instant) -> Self {
        let targets: Vec<Target> = rule
            .backends
            .iter()
            .map(|b| Target {
                label: b.address.to_string(),
                addr: (b.address.host.as_str(), b.address.port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut addrs| addrs.next()),
                protocol: b.protocol,
                upstream: CounterCache::new(5),
            })
            .collect();
        let joined = targets
            .iter()
            .map(|t| match previous {
                None => None,
                Some(p) => match p.targets.iter().position(|old| old.label == t.label) {
                    Some(j) => p.joined.get(j).copied().flatten(),
                    None => Some(now),
                },
            })
            .collect();
        let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
        let picker = match &rule.load_balancer.algorithm {
            Algorithm::WeightedRoundRobin => Picker::RoundRobin(Balancer::new(BalancerRule {
                backends: rule.backends.clone(),
                load_balancer: rule.load_balancer.clone(),
            })),
            Algorithm::P2cEwma => Picker::P2c(P2c::new(&weights, now)),
            Algorithm::ConsistentHash { hash_on } => Picker::Hash {
                key: hash_on.clone(),
                ring: ArcSwap::from_pointee(Maglev::new(
                    &targets.iter().map(|t| t.label.clone()).collect::<Vec<_>>(),
                    &weights,
                )),
                weights: Mutex::new(weights.clone()),
            },
        };
        // P2C's candidate draws only need to differ between processes, not be secret.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5eed, |d| d.as_nanos() as u64);
        let always_available = targets.iter().all(|t| t.addr.is_some())
            && rule.health_check.is_none()
            && rule.outlier_detection.is_none();
        let speaks_h2c = targets.iter().any(|t| t.protocol == Protocol::H2c);
        let endpoints = Endpoints {
            always_available,
            speaks_h2c,
            health: rule
                .health_check
                .as_ref()
                .map(|_| HealthState::new(targets.len(), now)),
            outlier: rule
                .outlier_detection
                .as_ref()
                .map(|o| OutlierDetector::new(o, targets.len())),
            targets,
            picker,
            joined,
            random: AtomicU64::new(seed),
            next_check: Mutex::new(now),
            rule,
        };
        endpoints.refresh(now);
        endpoints
    }

    pub fn rule(&self) -> &EndpointsRule {
        &self.rule
    }

    /// What requests are hashed on, for consistent hashing.
    pub fn hash_key(&self) -> Option<&Key> {
        match &self.picker {
            Picker::Hash { key, .. } => Some(key),
            _ => None,
        }
    }

    #[inline]
    pub fn is_healthy(&self, index: usize) -> bool {
        self.health.as_ref().is_none_or(|h| h.is_healthy(index))
    }

    #[inline]
    pub fn is_ejected(&self, index: usize, now: Instant) -> bool {
        self.outlier
            .as_ref()
            .is_some_and(|o| o.is_ejected(index, now))
    }

    #[inline]
    fn dialable(&self, index: usize) -> bool {
        self.targets.get(index).is_some_and(|t| t.addr.is_some())
    }

    #[inline]
    fn available(&self, index: usize, now: Instant) -> bool {
        self.dialable(index) && self.is_healthy(index) && !self.is_ejected(index, now)
    }

    /// splitmix64 over a shared counter. The counter moves by a plain load and
    /// store, not an atomic add: the `lock xadd` was a third of a P2C pick (perf,
    /// bench/RESULTS.md), and two threads racing here can only draw the same number,
    /// which costs a balancer nothing (both requests see the same two candidates).
    fn random(&self) -> u64 {
        let mut z = self
            .random
            .load(Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.random.store(z, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick_with(&self, key: &[u8], allowed: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.picker {
            Picker::RoundRobin(b) => b.pick(|i| !allowed(i)),
            Picker::P2c(p) => p.pick(&mut || self.random(), |i| !allowed(i)),
            Picker::Hash { ring, .. } => ring.load().pick_skipping(key, |i| !allowed(i)),
        }
    }

    /// The backend for the next attempt of a request (see the module doc for the
    /// order of preferences). `key` is the consistent-hash key (empty otherwise).
    pub fn pick(&self, now: Instant, key: &[u8], tried: &[usize]) -> Option<usize> {
        if self.always_available {
            // The same order of preferences, with "available" and "dialable" true.
            return self
                .pick_with(key, |i| !tried.contains(&i))
                .or_else(|| self.pick_with(key, |_| true));
        }
        self.pick_with(key, |i| !tried.contains(&i) && self.available(i, now))
            .or_else(|| self.pick_with(key, |i| self.available(i, now)))
            .or_else(|| self.pick_with(key, |i| self.dialable(i) && !tried.contains(&i)))
            .or_else(|| self.pick_with(key, |i| self.dialable(i)))
    }

    /// Whether a backend not yet tried could still take the request.
    pub fn untried_left(&self, tried: &[usize]) -> bool {
        (0..self.targets.len()).any(|i| self.dialable(i) && !tried.contains(&i))
    }

    /// Attempts begun and not yet ended or abandoned, all backends (P2C counts
    /// them; other pickers do not, so 0).
    pub fn pending_total(&self) -> u32 {
        match &self.picker {
            Picker::P2c(p) => (0..p.len()).map(|i| p.pending(i)).sum(),
            _ => 0,
        }
    }

    /// An attempt at `index` starts (P2C's pending count).
    pub fn begin(&self, index: usize) {
        if let Picker::P2c(p) = &self.picker {
            p.start(index);
        }
    }

    /// An attempt at `index` was abandoned after `rtt` (the client left): P2C's
    /// pending count drops and `rtt` is a latency sample (a lower bound), but it is
    /// no outcome for outlier detection.
    pub fn abandon(&self, index: usize, now: Instant, rtt: Duration) {
        if let Picker::P2c(p) = &self.picker {
            p.end(index, now, rtt);
        }
    }

    /// An attempt at `index` ended after `rtt`; `failed` is a connect error, timeout,
    /// reset or 5xx. Returns true when this outcome ejected the backend.
    pub fn finish(&self, index: usize, now: Instant, rtt: Duration, failed: bool) -> bool {
        if let Picker::P2c(p) = &self.picker {
            p.end(index, now, rtt);
        }
        self.outlier
            .as_ref()
            .is_some_and(|o| o.record(index, failed, now))
    }

    /// Applies slow start: each backend's weight ramps over `slowStart` after it
    /// joined (by a reload) or became healthy again. Called every second, off the
    /// request path.
    pub fn refresh(&self, now: Instant) {
        let Some(window) = self.rule.load_balancer.slow_start else {
            return;
        };
        let weights: Vec<u32> = self
            .rule
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let recovered = self.health.as_ref().and_then(|h| h.healthy_since(i));
                let since = match (self.joined.get(i).copied().flatten(), recovered) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                slowstart::effective_weight(b.weight, since, now, Some(window))
            })
            .collect();
        match &self.picker {
            Picker::RoundRobin(b) => b.set_weights(&weights),
            Picker::P2c(p) => {
                for (i, w) in weights.iter().enumerate() {
                    p.set_weight(i, *w);
                }
            }
            Picker::Hash {
                ring,
                weights: current,
                ..
            } => {
                let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
                if *current != weights {
                    let names: Vec<String> = self.targets.iter().map(|t| t.label.clone()).collect();
                    ring.store(std::sync::Arc::new(Maglev::new(&names, &weights)));
                    *current = weights;
                }
            }
        }
    }

    /// The health-check rule when a round of checks is due (and schedules the next).
    pub fn health_check_due(&self, now: Instant) -> Option<&HealthCheck> {
        let rule = self.rule.health_check.as_ref()?;
        let mut next = self
            .next_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now < *next {
            return None;
        }
        *next = now + rule.interval;
        Some(rule)
    }

    /// Records one active check; returns the new health on a change.
    pub fn record_check(&self, index: usize, ok: bool, now: Instant) -> Option<Health> {
        let (health, rule) = (self.health.as_ref()?, self.rule.health_check.as_ref()?);
        health.record_check(index, ok, rule, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::Address;

    fn backend(port: u16, weight: u32) -> Backend {
        Backend {
            address: Address {
                host: "127.0.0.1".into(),
                port,
            },
            weight,
            protocol: Protocol::Http1,
            service: None,
        }
    }

    fn rule(
        backends: Vec<Backend>,
        algorithm: Algorithm,
        slow_start: Option<Duration>,
    ) -> EndpointsRule {
        EndpointsRule {
            backends,
            load_balancer: LoadBalancer {
                algorithm,
                slow_start,
            },
            health_check: None,
            outlier_detection: None,
        }
    }

    fn share(e: &Endpoints, now: Instant, picks: usize, index: usize) -> f64 {
        let hits = (0..picks)
            .filter(|_| e.pick(now, b"", &[]) == Some(index))
            .count();
        hits as f64 / picks as f64
    }

    #[test]
    fn without_checks_a_pick_avoids_tried_backends_and_still_answers_when_all_were_tried() {
        let now = Instant::now();
        for algorithm in [
            Algorithm::WeightedRoundRobin,
            Algorithm::P2cEwma,
            Algorithm::ConsistentHash {
                hash_on: Key::Header("x-user".into()),
            },
        ] {
            let e = Endpoints::new(
                rule(
                    vec![backend(1, 1), backend(2, 1), backend(3, 1)],
                    algorithm,
                    None,
                ),
                None,
                now,
            );
            assert!(e.always_available);
            for _ in 0..30 {
                assert_eq!(e.pick(now, b"k", &[0, 2]), Some(1));
                assert!(e.pick(now, b"k", &[0, 1, 2]).is_some());
            }
        }
        // Health checks turn the shortcut off: an unhealthy backend is avoided.
        let mut checked = rule(
            vec![backend(1, 1), backend(2, 1)],
            Algorithm::WeightedRoundRobin,
            None,
        );
        checked.health_check = Some(HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_after: 1,
            healthy_after: 1,
        });
        let e = Endpoints::new(checked, None, now);
        assert!(!e.always_available);
        e.record_check(1, false, now);
        for _ in 0..10 {
            assert_eq!(e.pick(now, b"", &[]), Some(0));
        }
    }

    #[test]
    fn a_backend_added_by_a_reload_ramps_up_over_slow_start() {
        let t0 = Instant::now();
        let window = Some(Duration::from_secs(100));
        let first = Endpoints::new(
            rule(vec![backend(1, 100)], Algorithm::WeightedRoundRobin, window),
            None,
            t0,
        );
        let both = rule(
            vec![backend(1, 100), backend(2, 100)],
            Algorithm::WeightedRoundRobin,
            window,
        );
        let second = Endpoints::new(both, Some(&first), t0);
        // Just joined: the floor (10%) of its weight; halfway: half; after: all.
        let at = |secs: u64| {
            let now = t0 + Duration::from_secs(secs);
            second.refresh(now);
            share(&second, now, 2000, 1)
        };
        assert!((at(0) - 10.0 / 110.0).abs() < 0.01, "{}", at(0));
        assert!((at(50) - 50.0 / 150.0).abs() < 0.01, "{}", at(50));
        assert!((at(100) - 0.5).abs() < 0.01, "{}", at(100));
    }

    #[test]
    fn p2c_prefers_the_faster_of_two_backends() {
        let now = Instant::now();
        let e = Endpoints::new(
            rule(vec![backend(1, 1), backend(2, 1)], Algorithm::P2cEwma, None),
            None,
            now,
        );
        for _ in 0..20 {
            e.begin(0);
            e.finish(0, now, Duration::from_millis(1), false);
            e.begin(1);
            e.finish(1, now, Duration::from_millis(80), false);
        }
        assert!(share(&e, now, 1000, 0) > 0.9);
    }

    #[test]
    fn consistent_hash_keeps_a_key_on_its_backend_and_skips_tried_ones() {
        let now = Instant::now();
        let hash = Algorithm::ConsistentHash {
            hash_on: Key::Header("x-user-id".into()),
        };
        let e = Endpoints::new(
            rule(
                vec![backend(1, 1), backend(2, 1), backend(3, 1)],
                hash,
                None,
            ),
            None,
            now,
        );
        let first = e.pick(now, b"alice", &[]).unwrap_or(99);
        for _ in 0..50 {
            assert_eq!(e.pick(now, b"alice", &[]), Some(first));
        }
        let next = e.pick(now, b"alice", &[first]).unwrap_or(99);
        assert_ne!(next, first);
    }

    #[test]
    fn unhealthy_backends_get_no_traffic_and_return_when_healthy() {
        let now = Instant::now();
        let mut r = rule(
            vec![backend(1, 1), backend(2, 1)],
            Algorithm::WeightedRoundRobin,
            None,
        );
        let check = HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_after: 2,
            healthy_after: 1,
        };
        r.health_check = Some(check);
        let e = Endpoints::new(r, None, now);
        assert_eq!(e.record_check(1, false, now), None);
        assert_eq!(e.record_check(1, false, now), Some(Health::Unhealthy));
        for _ in 0..20 {
            assert_eq!(e.pick(now, b"", &[]), Some(0));
        }
        assert_eq!(e.record_check(1, true, now), Some(Health::Healthy));
        assert!((share(&e, now, 100, 1) - 0.5).abs() < 0.05);
    }

    #[test]
    fn all_backends_unhealthy_falls_back_to_panic_mode() {
        let now = Instant::now();
        let mut r = rule(vec![backend(1, 1)], Algorithm::WeightedRoundRobin, None);
        r.outlier_detection = Some(OutlierDetection {
            consecutive_failures: 1,
            eject_for: Duration::from_secs(30),
            max_ejected_percent: 100,
        });
        let e = Endpoints::new(r, None, now);
        assert!(e.finish(0, now, Duration::from_millis(1), true));
        assert!(e.is_ejected(0, now));
        assert_eq!(
            e.pick(now, b"", &[]),
            Some(0),
            "better a suspect backend than none"
        );
    }

    #[test]
    fn health_checks_are_due_once_per_interval() {
        let now = Instant::now();
        let mut r = rule(vec![backend(1, 1)], Algorithm::WeightedRoundRobin, None);
        r.health_check = Some(HealthCheck {
            path: "/healthz".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_after: 1,
            healthy_after: 1,
        });
        let e = Endpoints::new(r, None, now);
        assert!(e.health_check_due(now).is_some());
        assert!(e.health_check_due(now + Duration::from_secs(4)).is_none());
        assert!(e.health_check_due(now + Duration::from_secs(5)).is_some());
    }
}
