//! The endpoints of Kubernetes Services as the control plane pushes them
//! (`EndpointDiscovery.StreamEndpoints`, followed by `discovery`), and what a
//! `service:` backend makes of them.
//!
//! Why: a Service's ClusterIP (what its DNS name gives) is one address, so the
//! proxy would balance, check and eject one "endpoint" for all its pods, and a pod
//! on its way out would keep getting requests until kube-proxy noticed. The
//! control plane watches the Service's EndpointSlices and pushes each pod address
//! with its conditions; the proxy then balances over pods.
//!
//! Precedence: a `service:` backend whose Service has a pushed set takes its
//! endpoints from that set, and from nothing else (not DNS, even for a numeric
//! port), from the moment the set arrives. Without a set (file mode, where no set
//! ever arrives, or before the first one) it keeps the DNS behaviour: the
//! synthesized `NAME.NAMESPACE.svc.cluster.local` for a numeric port, no endpoint
//! for a named one.
//!
//! Conditions (EndpointSlice semantics): a `ready` endpoint takes traffic; one that
//! is `serving` but not ready (terminating, typically) is a *draining* member, used
//! only when no available endpoint of the set is left (see `endpoints`); one that
//! is neither is left out.
//!
//! Invariants: [`ServiceSets`] is an immutable value; the stream replaces it whole
//! (an update is applied entirely or, when malformed, not at all), so a reader never
//! sees half an update. A Service the control plane reports removed keeps an empty
//! set (its backend then has no endpoint rather than stale pods or a DNS fallback);
//! sets of Services no longer subscribed are dropped on resubscription, so the map
//! stays bounded by the policies.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sluice_policy::{Backend, ServicePort, ServiceRef};

use crate::endpoints::Member;

/// One address of a Service for one of its ports, with its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEndpoint {
    pub ip: IpAddr,
    pub service_port: u16,
    /// "" when the Service port is unnamed.
    pub service_port_name: String,
    /// Where the pod listens for that Service port.
    pub target_port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `namespace/name` of the pod, for /config_dump.
    pub pod: String,
    pub zone: String,
    /// The workload identity of a meshed pod (a checked SPIFFE ID): attempts to it
    /// speak mTLS and check its certificate names it.
    pub identity: Option<Arc<str>>,
}

/// Every endpoint of one Service, and the control plane's version of the set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceSet {
    pub version: u64,
    pub endpoints: Vec<PodEndpoint>,
}

impl ServiceSet {
    /// The members a backend on Service port `port` gets: `ip:target_port` of each
    /// entry for that port (by number, or by name), ready or draining; entries
    /// neither ready nor serving are left out (see the module doc).
    pub fn members(&self, port: &ServicePort) -> Vec<Member> {
        self.endpoints
            .iter()
            .filter(|e| match port {
                ServicePort::Number(n) => e.service_port == *n,
                ServicePort::Name(name) => e.service_port_name == *name,
            })
            .filter(|e| e.ready || e.serving)
            .map(|e| Member {
                addr: SocketAddr::new(e.ip, e.target_port),
                draining: !e.ready,
                identity: e.identity.clone(),
            })
            .collect()
    }
}

/// The key the control plane knows a Service by: `namespace/name`, the namespace
/// resolved as the model does ([`ServiceRef::namespace_in`]).
pub fn service_key(service: &ServiceRef, policy_namespace: Option<&str>) -> String {
    format!(
        "{}/{}",
        service.namespace_in(policy_namespace),
        service.name
    )
}

/// Every pushed set, by Service key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceSets {
    sets: BTreeMap<String, Arc<ServiceSet>>,
}

impl ServiceSets {
    pub fn get(&self, key: &str) -> Option<&ServiceSet> {
        self.sets.get(key).map(|s| &**s)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &ServiceSet)> {
        self.sets.iter().map(|(k, s)| (k.as_str(), &**s))
    }

    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// These sets after one update: `changed` replace theirs whole, `removed` ones
    /// become empty (keeping their last version).
    pub fn updated(&self, changed: Vec<(String, ServiceSet)>, removed: &[String]) -> ServiceSets {
        let mut sets = self.sets.clone();
        for (key, set) in changed {
            sets.insert(key, Arc::new(set));
        }
        for key in removed {
            let version = sets.get(key).map_or(0, |s| s.version);
            sets.insert(
                key.clone(),
                Arc::new(ServiceSet {
                    version,
                    endpoints: Vec::new(),
                }),
            );
        }
        ServiceSets { sets }
    }

    /// Only the sets of `wanted` Services (on resubscription).
    pub fn retained(&self, wanted: &BTreeSet<String>) -> ServiceSets {
        let mut sets = self.sets.clone();
        sets.retain(|key, _| wanted.contains(key));
        ServiceSets { sets }
    }

    /// The pushed members of `backend` (of a policy in `namespace`); `None` when it
    /// is no Service backend or its Service has no set yet.
    pub fn members(&self, backend: &Backend, namespace: Option<&str>) -> Option<Vec<Member>> {
        let service = backend.service.as_ref()?;
        let set = self.get(&service_key(service, namespace))?;
        Some(set.members(&service.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(last: u8, port: u16, name: &str, target: u16, ready: bool) -> PodEndpoint {
        PodEndpoint {
            ip: IpAddr::from([10, 0, 0, last]),
            service_port: port,
            service_port_name: name.into(),
            target_port: target,
            ready,
            serving: true,
            terminating: !ready,
            pod: format!("default/reviews-{last}"),
            zone: String::new(),
            identity: None,
        }
    }

    fn reviews(port: ServicePort) -> Backend {
        let service = ServiceRef {
            name: "reviews".into(),
            namespace: None,
            port,
        };
        Backend {
            address: service.address(Some("shop")),
            weight: 1,
            protocol: sluice_policy::Protocol::Http1,
            service: Some(service),
            tls: None,
        }
    }

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::from([10, 0, 0, last]), port)
    }

    fn sets() -> ServiceSets {
        let set = ServiceSet {
            version: 3,
            endpoints: vec![
                endpoint(1, 80, "http", 8080, true),
                endpoint(1, 9090, "metrics", 9091, true),
                endpoint(2, 80, "http", 8080, false),
            ],
        };
        ServiceSets::default().updated(vec![("shop/reviews".into(), set)], &[])
    }

    #[test]
    fn a_service_port_is_matched_by_number_or_by_name() {
        let by_number = sets().members(&reviews(ServicePort::Number(80)), Some("shop"));
        let by_name = sets().members(&reviews(ServicePort::Name("http".into())), Some("shop"));
        let expected = vec![
            Member::ready(addr(1, 8080)),
            Member {
                addr: addr(2, 8080),
                draining: true,
                identity: None,
            },
        ];
        assert_eq!(by_number, Some(expected.clone()));
        assert_eq!(by_name, Some(expected));
        let metrics = sets().members(&reviews(ServicePort::Name("metrics".into())), Some("shop"));
        assert_eq!(metrics, Some(vec![Member::ready(addr(1, 9091))]));
    }

    #[test]
    fn a_service_without_a_set_or_in_another_namespace_has_no_pushed_members() {
        assert_eq!(
            sets().members(&reviews(ServicePort::Number(80)), None),
            None,
            "without a namespace the Service is default/reviews"
        );
    }

    #[test]
    fn endpoints_neither_ready_nor_serving_are_left_out() {
        let mut gone = endpoint(3, 80, "http", 8080, false);
        gone.serving = false;
        let set = ServiceSet {
            version: 1,
            endpoints: vec![gone],
        };
        assert!(set.members(&ServicePort::Number(80)).is_empty());
    }

    #[test]
    fn a_removed_service_keeps_an_empty_set_and_resubscription_drops_unwanted_ones() {
        let after = sets().updated(Vec::new(), &["shop/reviews".to_owned()]);
        let set = after.get("shop/reviews").cloned().unwrap_or_default();
        assert_eq!((set.version, set.endpoints.len()), (3, 0));
        assert!(after.retained(&BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_service_named_without_namespace_lives_in_the_policys_or_default() {
        let service = reviews(ServicePort::Number(80)).service.unwrap_or_else(|| {
            panic!("a service backend");
        });
        assert_eq!(service_key(&service, Some("shop")), "shop/reviews");
        assert_eq!(service_key(&service, None), "default/reviews");
    }
}
