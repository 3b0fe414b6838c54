//! A policy's backends as the proxy sees them: every address of every backend as an
//! *endpoint*, the picking algorithm and its state (smooth WRR position, peak-EWMA
//! latencies, the Maglev table), active health, passive outlier ejection and slow
//! start, behind one `pick` by endpoint index.
//!
//! A pick skips endpoints already tried for this request, unhealthy and ejected ones;
//! when that leaves nothing it allows an already-tried endpoint (a retry), and when
//! still nothing, it ignores health and ejection altogether (Envoy's *panic mode*:
//! sending to a possibly-bad endpoint beats failing every request when the checks
//! themselves are wrong).
//!
//! Endpoints, not backends: a backend `api:8080` whose name has five A records is
//! five endpoints, so balancing, slow start, health checks and outlier ejection see
//! pods, not names. A backend's `weight` is its *share*, split evenly over its
//! endpoints: each gets `round(weight * scale / n)`, with `scale` chosen per policy
//! so the heaviest backend's weight becomes about [`WEIGHT_SCALE`], which keeps the
//! rounding well under 1% of a backend's share for up to hundreds of endpoints (90/10
//! over 3 and 7 endpoints stays 90/10 with every algorithm). The label (`host:port`
//! as written) and the upstream counters stay per backend, so metric series remain
//! bounded by configuration. A backend whose name resolved to nothing has no endpoint.
//!
//! Where addresses come from: [`Endpoints::new`] (a reload) takes each backend's
//! addresses from the previous `Endpoints` when it had the same backend, and
//! otherwise resolves the name at once, blocking (the system resolver, every
//! address; IP literals are parsed, never looked up), as snapshots are built off the
//! async path. Afterwards the resolver job (`tasks::resolve_backends`) keeps them
//! current: [`Endpoints::with_resolved`] rebuilds the set from new addresses. A
//! Service backend's endpoints may instead come from the control plane (see
//! `services`), with their conditions: [`Endpoints::with_members`] rebuilds from
//! [`Member`]s, each of which may be *draining* (a pod that still serves but is not
//! ready). A draining endpoint counts as unavailable, like an unhealthy one: it gets
//! new requests only in the fallback of the pick order, when no available endpoint
//! of the set is left. A backend's weight is split over its ready endpoints only (so
//! a draining pod does not dilute its backend's share), or over all when none is.
//!
//! Carry-over: the whole `Endpoints` carries over a reload while its rule (backends,
//! balancer, health check, outlier detection) is unchanged. When it is rebuilt (a
//! changed rule, or changed addresses), an endpoint that remains (same backend label,
//! same address) keeps its state: its P2C estimate and pending count, its health and
//! outlier state (shared with the old set, so requests still in flight there settle
//! into the same state) and its slow-start ramp; Maglev tables are built from
//! endpoint names, so keys of remaining endpoints mostly stay where they were. New
//! endpoints ramp up over slow start (when configured); removed ones drop out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sluice_policy::{
    Algorithm, Backend, HealthCheck, Key, LoadBalancer, OutlierDetection, Protocol,
};

use crate::balancer::Balancer;
use crate::hashring::Maglev;
use crate::health::{Health, HealthState};
use crate::metrics::CounterCache;
use crate::outlier::OutlierDetector;
use crate::p2c::P2c;
use crate::slowstart;

/// The heaviest backend's weight is scaled to about this before it is split over
/// its endpoints: large enough that rounding a share to an integer costs under 1%
/// while a backend has fewer than `weight * scale / 50` endpoints, small enough that
/// the sum over [`MAX_ENDPOINTS_PER_BACKEND`] endpoints of many backends stays far
/// from the pickers' integer limits (P2C sums in `u64`; WRR and Maglev reduce and
/// scale weights themselves).
pub const WEIGHT_SCALE: u64 = 1 << 20;

/// The most addresses one backend contributes (the lowest, once sorted): bounds the
/// balancers' tables (WRR and Maglev index endpoints with `u16`) and the Maglev
/// build time whatever a DNS answer holds.
pub const MAX_ENDPOINTS_PER_BACKEND: usize = 256;

/// Everything a policy says about its backends: the carry-over key.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointsRule {
    pub backends: Vec<Backend>,
    pub load_balancer: LoadBalancer,
    pub health_check: Option<HealthCheck>,
    pub outlier_detection: Option<OutlierDetection>,
    /// The policy's namespace: where a Service backend named without one lives.
    pub namespace: Option<String>,
}

/// One address of a backend and whether it is draining (still serving, not ready:
/// it takes new requests only when nothing available is left), and the workload
/// identity of a meshed pod (from the control plane's endpoints).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub addr: SocketAddr,
    pub draining: bool,
    pub identity: Option<Arc<str>>,
}

impl Member {
    /// A ready address (DNS answers and IP literals are always ready).
    pub fn ready(addr: SocketAddr) -> Self {
        Member {
            addr,
            draining: false,
            identity: None,
        }
    }
}

/// One address of a backend, as the proxy dials it.
pub struct Target {
    /// The backend it belongs to: an index into the rule's backends.
    pub backend: usize,
    /// The backend's `host:port` as written in the policy: the metrics label.
    pub label: String,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// A meshed endpoint's workload identity: attempts speak mTLS to it and check
    /// the certificate names it.
    pub identity: Option<Arc<str>>,
    /// Not ready (see [`Member`]): unavailable to a pick while something else is.
    pub draining: bool,
    /// `sluice_upstream_requests_total` handles, by outcome: the backend's, shared
    /// by its endpoints (one series per backend).
    pub upstream: Arc<CounterCache>,
}

/// A backend's resolved addresses and its upstream counters.
struct Resolved {
    label: String,
    /// Sorted, deduplicated, at most [`MAX_ENDPOINTS_PER_BACKEND`] ([`normalize`]).
    addrs: Vec<SocketAddr>,
    /// Per address of `addrs`, whether it is draining.
    draining: Vec<bool>,
    /// Per address of `addrs`, the identity of its pod when it is meshed.
    identities: Vec<Option<Arc<str>>>,
    upstream: Arc<CounterCache>,
}

enum Picker {
    RoundRobin(Balancer),
    P2c(P2c),
    Hash {
        key: Key,
        /// One per endpoint, `label@addr`: what the table is built from.
        names: Vec<String>,
        ring: ArcSwap<Maglev>,
        weights: Mutex<Vec<u32>>,
    },
}

pub struct Endpoints {
    rule: EndpointsRule,
    pub targets: Vec<Target>,
    /// One per backend of the rule, in its order.
    resolved: Vec<Resolved>,
    /// Each endpoint's share of its backend's weight, before slow start.
    weights: Vec<u32>,
    picker: Picker,
    health: Option<HealthState>,
    outlier: Option<OutlierDetector>,
    /// When an endpoint joined (a reload or a DNS change; slow start); `None` for the
    /// first set.
    joined: Vec<Option<Instant>>,
    next_check: Mutex<Instant>,
    /// No health checks, outlier detection or draining endpoint: every endpoint is
    /// always available, so a pick only has to avoid the ones already tried.
    always_available: bool,
    /// Some backend speaks h2c (the h1 engine hands such requests to pingora).
    pub speaks_h2c: bool,
}

impl Endpoints {
    pub fn rule(&self) -> &EndpointsRule {
        &self.rule
    }

    /// Backend `index`'s addresses (sorted); empty when it resolved to nothing.
    pub fn backend_addresses(&self, index: usize) -> &[SocketAddr] {
        self.resolved.get(index).map_or(&[], |r| r.addrs.as_slice())
    }

    /// Backend `index`'s addresses with their conditions.
    pub fn backend_members(&self, index: usize) -> Vec<Member> {
        self.resolved.get(index).map_or_else(Vec::new, members)
    }

    /// The members of the backend labelled `label`, if there is one.
    pub fn members_of(&self, label: &str) -> Option<Vec<Member>> {
        self.resolved.iter().find(|r| r.label == label).map(members)
    }

    /// How many of backend `index`'s endpoints are ready (not draining).
    pub fn ready_count(&self, index: usize) -> usize {
        self.resolved
            .get(index)
            .map_or(0, |r| r.draining.iter().filter(|d| !**d).count())
    }

    /// The addresses of the backend labelled `label` (`host:port`), if there is one.
    pub fn addresses_of(&self, label: &str) -> Option<&[SocketAddr]> {
        self.resolved
            .iter()
            .find(|r| r.label == label)
            .map(|r| r.addrs.as_slice())
    }

    /// Each backend's label and addresses, in the rule's order.
    pub fn backends(&self) -> impl Iterator<Item = (&str, &[SocketAddr])> {
        self.resolved
            .iter()
            .map(|r| (r.label.as_str(), r.addrs.as_slice()))
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
        index < self.targets.len()
    }

    /// Dialable, not draining, healthy and not ejected: what a pick prefers.
    #[inline]
    fn available(&self, index: usize, now: Instant) -> bool {
        self.targets.get(index).is_some_and(|t| !t.draining)
            && self.is_healthy(index)
            && !self.is_ejected(index, now)
    }

    fn pick_with(&self, key: &[u8], allowed: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.picker {
            Picker::RoundRobin(b) => b.pick(|i| !allowed(i)),
            Picker::P2c(p) => p.pick(&mut || p.random_bits(), |i| !allowed(i)),
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

    /// Applies slow start: each endpoint's weight ramps over `slowStart` after it
    /// joined (by a reload or a DNS change) or became healthy again. Called every
    /// second, off the request path.
    pub fn refresh(&self, now: Instant) {
        let Some(window) = self.rule.load_balancer.slow_start else {
            return;
        };
        let weights: Vec<u32> = self
            .weights
            .iter()
            .enumerate()
            .map(|(i, weight)| {
                let recovered = self.health.as_ref().and_then(|h| h.healthy_since(i));
                let since = match (self.joined.get(i).copied().flatten(), recovered) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                slowstart::effective_weight(*weight, since, now, Some(window))
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
                names,
                weights: current,
                ..
            } => {
                let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
                if *current != weights {
                    ring.store(Arc::new(Maglev::new(names, &weights)));
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

mod build;
#[cfg(test)]
mod tests;

use build::members;
pub use build::{literal, normalize, normalize_members};
