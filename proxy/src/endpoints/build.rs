//! Building an `Endpoints`: a backend's addresses (or a Service's members with their
//! conditions) become endpoints, its weight is split over them, and the state of
//! endpoints that remain (P2C, health, ejection, slow start) is carried over.

use super::*;

/// The address of an IP-literal host, which never goes to DNS.
pub fn literal(host: &str, port: u16) -> Option<SocketAddr> {
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, port))
}

/// The canonical form of a resolved set: sorted, deduplicated, capped at
/// [`MAX_ENDPOINTS_PER_BACKEND`], so that equal sets compare equal.
pub fn normalize(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    addrs.sort_unstable();
    addrs.dedup();
    addrs.truncate(MAX_ENDPOINTS_PER_BACKEND);
    addrs
}

/// [`normalize`] for members: an address listed twice is ready if either entry is.
pub fn normalize_members(mut members: Vec<Member>) -> Vec<Member> {
    // `false < true`: the ready entry of an address sorts first and survives dedup.
    members.sort_unstable();
    members.dedup_by_key(|m| m.addr);
    members.truncate(MAX_ENDPOINTS_PER_BACKEND);
    members
}

/// Every address of `host:port` from the system resolver, blocking; empty when the
/// name does not resolve.
pub(super) fn resolve_blocking(host: &str, port: u16) -> Vec<SocketAddr> {
    if let Some(addr) = literal(host, port) {
        return vec![addr];
    }
    (host, port)
        .to_socket_addrs()
        .map(|addrs| normalize(addrs.collect()))
        .unwrap_or_default()
}

pub(super) fn members(r: &Resolved) -> Vec<Member> {
    r.addrs
        .iter()
        .zip(&r.draining)
        .zip(&r.identities)
        .map(|((addr, draining), identity)| Member {
            addr: *addr,
            draining: *draining,
            identity: identity.clone(),
        })
        .collect()
}

/// An endpoint's share of its backend's `weight` (see the module doc): at least 1
/// while the backend has weight, so no endpoint of a live backend starves.
pub(super) fn split(weight: u32, endpoints: usize, scale: u64) -> u32 {
    if weight == 0 || endpoints == 0 {
        return 0;
    }
    let n = endpoints as u64;
    let share = (u64::from(weight).saturating_mul(scale) + n / 2) / n;
    u32::try_from(share.max(1)).unwrap_or(u32::MAX)
}

impl Endpoints {
    /// For a reload: each backend's addresses (and conditions) are the previous
    /// `Endpoints`' for the same backend, else resolved now; a Service on a named
    /// port has none until the control plane sends them. Blocking (the system
    /// resolver), so it runs where snapshots are built, never on an async task.
    pub fn new(rule: EndpointsRule, previous: Option<&Endpoints>, now: Instant) -> Self {
        let members = rule
            .backends
            .iter()
            .map(|b| {
                let label = b.address.to_string();
                match (
                    previous.and_then(|p| p.members_of(&label)),
                    b.dialable_address(),
                ) {
                    (Some(members), _) => members,
                    (None, Some(a)) => resolve_blocking(&a.host, a.port)
                        .into_iter()
                        .map(Member::ready)
                        .collect(),
                    (None, None) => Vec::new(),
                }
            })
            .collect();
        Self::build_members(rule, members, previous, now)
    }

    /// `rule`'s backends at `resolved` (one set per backend, in order; a missing set
    /// is empty), carrying the state of endpoints that remain from `previous`.
    pub fn build(
        rule: EndpointsRule,
        resolved: Vec<Vec<SocketAddr>>,
        previous: Option<&Endpoints>,
        now: Instant,
    ) -> Self {
        let members = resolved
            .into_iter()
            .map(|set| set.into_iter().map(Member::ready).collect())
            .collect();
        Self::build_members(rule, members, previous, now)
    }

    /// [`Self::build`] from members, which may be draining.
    pub fn build_members(
        rule: EndpointsRule,
        members: Vec<Vec<Member>>,
        previous: Option<&Endpoints>,
        now: Instant,
    ) -> Self {
        let mut members = members.into_iter();
        let resolved: Vec<Resolved> = rule
            .backends
            .iter()
            .map(|b| {
                let label = b.address.to_string();
                let upstream = previous
                    .and_then(|p| p.resolved.iter().find(|r| r.label == label))
                    .map_or_else(
                        || Arc::new(CounterCache::new(5)),
                        |r| Arc::clone(&r.upstream),
                    );
                let set = normalize_members(members.next().unwrap_or_default());
                Resolved {
                    addrs: set.iter().map(|m| m.addr).collect(),
                    draining: set.iter().map(|m| m.draining).collect(),
                    identities: set.iter().map(|m| m.identity.clone()).collect(),
                    label,
                    upstream,
                }
            })
            .collect();
        let max_weight = rule.backends.iter().map(|b| u64::from(b.weight)).max();
        let scale = (WEIGHT_SCALE / max_weight.unwrap_or(1).max(1)).max(1);
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        for (index, (backend, set)) in rule.backends.iter().zip(&resolved).enumerate() {
            // The one place an endpoint's expected identity is decided: the
            // backend's `tls.identity` when the policy pins one (a pod of
            // another service account behind the same Service, whoever created
            // it, then fails the handshake instead of being trusted), else the
            // member's own (the control plane's endpoints: its pod's account).
            let backend_identity: Option<Arc<str>> =
                backend.tls.as_ref().map(|t| Arc::from(t.identity.as_str()));
            let ready = set.draining.iter().filter(|d| !**d).count();
            let over = if ready > 0 { ready } else { set.addrs.len() };
            let weight = split(backend.weight, over, scale);
            let members = set.addrs.iter().zip(&set.draining).zip(&set.identities);
            for ((addr, draining), identity) in members {
                targets.push(Target {
                    backend: index,
                    label: set.label.clone(),
                    addr: *addr,
                    protocol: backend.protocol,
                    identity: backend_identity.clone().or_else(|| identity.clone()),
                    draining: *draining,
                    upstream: Arc::clone(&set.upstream),
                });
                weights.push(weight);
            }
        }
        // Where each endpoint was in `previous` (same backend label, same address).
        let from: Vec<Option<usize>> = match previous {
            None => vec![None; targets.len()],
            Some(p) => {
                let before: HashMap<(&str, SocketAddr), usize> = p
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(j, t)| ((t.label.as_str(), t.addr), j))
                    .collect();
                targets
                    .iter()
                    .map(|t| before.get(&(t.label.as_str(), t.addr)).copied())
                    .collect()
            }
        };
        let joined = from
            .iter()
            .map(|j| match (previous, j) {
                (None, _) => None,
                (Some(p), Some(j)) => p.joined.get(*j).copied().flatten(),
                (Some(_), None) => Some(now),
            })
            .collect();
        let picker = match &rule.load_balancer.algorithm {
            Algorithm::WeightedRoundRobin => Picker::RoundRobin(Balancer::new(
                &weights,
                rule.load_balancer.slow_start.is_some(),
            )),
            Algorithm::P2cEwma => match previous.map(|p| &p.picker) {
                Some(Picker::P2c(old)) => Picker::P2c(P2c::carried(&weights, now, old, &from)),
                _ => Picker::P2c(P2c::new(&weights, now)),
            },
            Algorithm::ConsistentHash { hash_on } => {
                let names: Vec<String> = targets
                    .iter()
                    .map(|t| format!("{}@{}", t.label, t.addr))
                    .collect();
                Picker::Hash {
                    key: hash_on.clone(),
                    ring: ArcSwap::from_pointee(Maglev::new(&names, &weights)),
                    names,
                    weights: Mutex::new(weights.clone()),
                }
            }
        };
        let n = targets.len();
        let health = rule.health_check.as_ref().map(|rule| {
            match previous.and_then(|p| {
                p.health
                    .as_ref()
                    .filter(|_| p.rule.health_check.as_ref() == Some(rule))
            }) {
                Some(old) => HealthState::carried(n, old, &from),
                None => HealthState::new(n, now),
            }
        });
        let outlier = rule.outlier_detection.as_ref().map(|rule| {
            match previous.and_then(|p| p.outlier.as_ref().filter(|o| o.rule() == rule)) {
                Some(old) => OutlierDetector::carried(old, n, &from),
                None => OutlierDetector::new(rule, n),
            }
        });
        let endpoints = Endpoints {
            always_available: rule.health_check.is_none()
                && rule.outlier_detection.is_none()
                && !targets.iter().any(|t| t.draining),
            speaks_h2c: rule.backends.iter().any(|b| b.protocol == Protocol::H2c),
            health,
            outlier,
            targets,
            resolved,
            weights,
            picker,
            joined,
            next_check: Mutex::new(match previous {
                Some(p) => *p.next_check.lock().unwrap_or_else(PoisonError::into_inner),
                None => now,
            }),
            rule,
        };
        endpoints.refresh(now);
        endpoints
    }

    /// A rebuild at `resolved` (one set per backend), or `None` when every backend
    /// already has exactly those addresses.
    pub fn with_resolved(&self, resolved: Vec<Vec<SocketAddr>>, now: Instant) -> Option<Endpoints> {
        let members = resolved
            .into_iter()
            .map(|set| set.into_iter().map(Member::ready).collect())
            .collect();
        self.with_members(members, now)
    }

    /// [`Self::with_resolved`] with conditions: a rebuild at `members` (one set per
    /// backend), or `None` when every backend already has exactly those, draining
    /// flags and identities included.
    pub fn with_members(&self, members: Vec<Vec<Member>>, now: Instant) -> Option<Endpoints> {
        let members: Vec<Vec<Member>> = members.into_iter().map(normalize_members).collect();
        let same = members.len() == self.resolved.len()
            && members.iter().zip(&self.resolved).all(|(new, old)| {
                new.len() == old.addrs.len()
                    && new
                        .iter()
                        .zip(old.addrs.iter().zip(&old.draining).zip(&old.identities))
                        .all(|(m, ((a, d), i))| {
                            m.addr == *a && m.draining == *d && m.identity == *i
                        })
            });
        if same {
            return None;
        }
        Some(Self::build_members(
            self.rule.clone(),
            members,
            Some(self),
            now,
        ))
    }
}
