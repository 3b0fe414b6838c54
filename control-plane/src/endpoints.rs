//! Services' endpoints, apart from policies: each Kubernetes Service's current
//! [`api::EndpointSet`] (all its EndpointSlices merged, ports resolved against the
//! Service), with a version of its own.
//!
//! Why apart: pods come and go far more often than policies change. A pod becoming
//! unready must reach the proxies that call its Service in one small message, and
//! must not make a policy version (which every proxy would download whole).
//!
//! One [`EndpointStore`] per server; its single writer is the Kubernetes follower
//! ([`crate::services`]). Changes fan out through a `watch` channel holding the
//! latest change number, and a bounded log of which Service each change was about:
//! a stream that wakes late reads the Services changed since it last looked and sends
//! each one's *latest* set (a Service changing five times while a proxy is slow is
//! sent once). A stream further behind than the log rescans the Services it wants.
//!
//! Invariants: a Service's version is the content hash of its set (endpoints sorted,
//! so equal sets compare and hash equal): it changes with every change of the set
//! and never on an unchanged one, and two replicas following the same cluster give
//! the same set the same version.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::api;

/// Most Services one `StreamEndpoints` subscription may name; a longer list is
/// refused (no proxy's policies name that many backends).
pub const MAX_SERVICES_PER_SUBSCRIPTION: usize = 10_000;
/// Most endpoint entries kept per Service (Kubernetes caps a slice at 1,000
/// endpoints, not the slices of a Service); beyond it the rest is dropped and logged.
pub const MAX_ENDPOINTS_PER_SERVICE: usize = 20_000;
/// Changes remembered for streams catching up.
pub const CHANGE_LOG: usize = 4_096;

/// A port of a Service, as the Service declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// "" for the single unnamed port.
    pub name: String,
    pub port: u32,
}

/// A port of an EndpointSlice: the name of the Service port it serves and the port
/// the pods listen on (the Service port's `targetPort`, resolved per pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u32,
}

/// One endpoint of a slice (its first address: Kubernetes says they are fungible).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// "namespace/name" of the pod, or "".
    pub pod: String,
    pub zone: String,
}

/// What the store keeps of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Slice {
    /// The Service ("namespace/name") it belongs to.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// A Service's endpoints: one entry per endpoint and Service port, from every
/// slice, matching slice ports to Service ports by name. An address in two slices
/// (a pod moving between slices) counts once, its ready entry first.
pub fn merge<'a>(
    ports: &[ServicePort],
    slices: impl IntoIterator<Item = &'a Slice>,
) -> Vec<api::Endpoint> {
    let mut out = Vec::new();
    for slice in slices {
        for slice_port in &slice.ports {
            let Some(service_port) = ports.iter().find(|p| p.name == slice_port.name) else {
                continue; // a port the Service no longer has
            };
            for e in &slice.endpoints {
                out.push(api::Endpoint {
                    ip: e.ip.clone(),
                    service_port: service_port.port,
                    service_port_name: service_port.name.clone(),
                    target_port: slice_port.port,
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    pod: e.pod.clone(),
                    zone: e.zone.clone(),
                    // Filled in by whoever knows the pods ([`crate::services`]).
                    identity: String::new(),
                });
            }
        }
    }
    out.sort_by(|a, b| {
        (
            a.service_port,
            &a.ip,
            !a.ready,
            !a.serving,
            a.target_port,
            &a.pod,
        )
            .cmp(&(
                b.service_port,
                &b.ip,
                !b.ready,
                !b.serving,
                b.target_port,
                &b.pod,
            ))
    });
    out.dedup_by(|later, first| later.service_port == first.service_port && later.ip == first.ip);
    out
}

#[derive(Default)]
struct State {
    sets: BTreeMap<String, Arc<api::EndpointSet>>,
    /// `(change number, Service)`, oldest first, at most [`CHANGE_LOG`].
    log: VecDeque<(u64, String)>,
    /// The last change number.
    seq: u64,
    /// The last change number dropped from `log`.
    forgotten: u64,
    /// Every Service and slice has been listed once.
    synced: bool,
}

/// Every Service's endpoint set, and the changes since (see the module doc).
pub struct EndpointStore {
    state: Mutex<State>,
    tx: watch::Sender<u64>,
}

impl Default for EndpointStore {
    fn default() -> Self {
        EndpointStore {
            state: Mutex::default(),
            tx: watch::channel(0).0,
        }
    }
}

/// Services changed since a stream last looked.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// These (possibly none).
    Some(BTreeSet<String>),
    /// The stream is further behind than the log: any Service may have changed.
    Any,
}

impl EndpointStore {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes on every change (the value is the last change number).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    fn record(&self, state: &mut State, service: &str) {
        state.seq += 1;
        state.log.push_back((state.seq, service.to_owned()));
        while state.log.len() > CHANGE_LOG {
            if let Some((seq, _)) = state.log.pop_front() {
                state.forgotten = seq;
            }
        }
        self.tx.send_replace(state.seq);
    }

    /// `service`'s endpoints now: its new version if that changed its set.
    pub fn put(&self, service: &str, mut endpoints: Vec<api::Endpoint>) -> Option<u64> {
        if endpoints.len() > MAX_ENDPOINTS_PER_SERVICE {
            tracing::warn!(
                service,
                endpoints = endpoints.len(),
                kept = MAX_ENDPOINTS_PER_SERVICE,
                "too many endpoints for one Service; the rest is not served"
            );
            endpoints.truncate(MAX_ENDPOINTS_PER_SERVICE);
        }
        let mut state = self.lock();
        if state
            .sets
            .get(service)
            .is_some_and(|set| set.endpoints == endpoints)
        {
            return None;
        }
        let mut set = api::EndpointSet {
            service: service.to_owned(),
            version: 0,
            endpoints,
        };
        // The content hash of the set as it goes on the wire (0 means "none").
        let version = sluice_policy::hash::fnv1a64(&prost::Message::encode_to_vec(&set)).max(1);
        set.version = version;
        state.sets.insert(service.to_owned(), Arc::new(set));
        self.record(&mut state, service);
        Some(version)
    }

    /// `service` is gone: whether it was known.
    pub fn remove(&self, service: &str) -> bool {
        let mut state = self.lock();
        if state.sets.remove(service).is_none() {
            return false;
        }
        self.record(&mut state, service);
        true
    }

    /// Every Service and slice was listed: streams may answer their subscriptions
    /// (before, "no such Service" could just mean "not listed yet").
    pub fn mark_synced(&self) {
        let mut state = self.lock();
        if !state.synced {
            state.synced = true;
            state.seq += 1;
            self.tx.send_replace(state.seq);
        }
    }

    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    pub fn get(&self, service: &str) -> Option<Arc<api::EndpointSet>> {
        self.lock().sets.get(service).cloned()
    }

    /// Services known.
    pub fn len(&self) -> usize {
        self.lock().sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last change number, and the Services changed after `seen`.
    pub fn changed_since(&self, seen: u64) -> (u64, Changes) {
        let state = self.lock();
        if seen < state.forgotten {
            return (state.seq, Changes::Any);
        }
        let changed = state
            .log
            .iter()
            .filter(|(s, _)| *s > seen)
            .map(|(_, service)| service.clone())
            .collect();
        (state.seq, Changes::Some(changed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str, ready: bool) -> SliceEndpoint {
        SliceEndpoint {
            ip: ip.into(),
            ready,
            serving: ready,
            terminating: false,
            pod: String::new(),
            zone: String::new(),
        }
    }

    fn slice(ports: &[(&str, u32)], ips: &[(&str, bool)]) -> Slice {
        Slice {
            service: "shop/reviews".into(),
            ports: ports
                .iter()
                .map(|(name, port)| SlicePort {
                    name: (*name).into(),
                    port: *port,
                })
                .collect(),
            endpoints: ips.iter().map(|(ip, r)| endpoint(ip, *r)).collect(),
        }
    }

    #[test]
    fn slice_ports_resolve_to_service_ports_by_name() {
        let ports = [
            ServicePort {
                name: "http".into(),
                port: 80,
            },
            ServicePort {
                name: "admin".into(),
                port: 9000,
            },
        ];
        let merged = merge(
            &ports,
            [&slice(
                &[("http", 8080), ("gone", 1)],
                &[("10.0.0.1", true)],
            )],
        );
        assert_eq!(merged.len(), 1);
        assert_eq!(
            (
                merged[0].service_port,
                merged[0].service_port_name.as_str(),
                merged[0].target_port
            ),
            (80, "http", 8080)
        );
    }

    #[test]
    fn slices_merge_and_an_address_in_two_slices_counts_once_ready_first() {
        let ports = [ServicePort {
            name: String::new(),
            port: 80,
        }];
        let a = slice(&[("", 8080)], &[("10.0.0.2", false), ("10.0.0.1", true)]);
        let b = slice(&[("", 8080)], &[("10.0.0.2", true), ("10.0.0.3", true)]);
        let merged = merge(&ports, [&a, &b]);
        let ips: Vec<(&str, bool)> = merged.iter().map(|e| (e.ip.as_str(), e.ready)).collect();
        assert_eq!(
            ips,
            [("10.0.0.1", true), ("10.0.0.2", true), ("10.0.0.3", true)]
        );
    }

    #[test]
    fn versions_are_content_hashes_that_change_only_with_the_set() {
        let store = EndpointStore::default();
        let set = |ip: &str| {
            vec![api::Endpoint {
                ip: ip.into(),
                ..Default::default()
            }]
        };
        let a1 = store.put("shop/a", set("10.0.0.1")).expect("new");
        assert_eq!(store.put("shop/a", set("10.0.0.1")), None);
        let b1 = store.put("shop/b", set("10.0.0.1")).expect("new");
        assert_ne!(a1, b1, "the Service's name is part of its set");
        let a2 = store.put("shop/a", set("10.0.0.2")).expect("changed");
        assert_ne!(a1, a2);
        assert!(store.remove("shop/a"));
        assert!(!store.remove("shop/a"));
        let (seq, changes) = store.changed_since(1);
        assert_eq!(seq, 4);
        // Back again with the same pods: the same version, on any replica.
        assert_eq!(store.put("shop/a", set("10.0.0.1")), Some(a1));
        let replica = EndpointStore::default();
        assert_eq!(replica.put("shop/a", set("10.0.0.1")), Some(a1));
        assert_eq!(
            changes,
            Changes::Some(BTreeSet::from(["shop/a".into(), "shop/b".into()]))
        );
    }

    #[test]
    fn a_stream_behind_the_log_rescans() {
        let store = EndpointStore::default();
        for i in 0..=CHANGE_LOG as u64 + 1 {
            store.put(
                "shop/a",
                vec![api::Endpoint {
                    target_port: i as u32,
                    ..Default::default()
                }],
            );
        }
        assert_eq!(store.changed_since(0).1, Changes::Any);
        let (seq, _) = store.changed_since(0);
        assert_eq!(
            store.changed_since(seq - 1).1,
            Changes::Some(BTreeSet::from(["shop/a".into()]))
        );
        assert_eq!(store.changed_since(seq).1, Changes::Some(BTreeSet::new()));
    }
}
