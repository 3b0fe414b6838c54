//! With `serve --kubernetes`: the cluster's Services and EndpointSlices as the
//! [`EndpointStore`]'s endpoint sets.
//!
//! Lists and watches `v1` Services and `discovery.k8s.io/v1` EndpointSlices in all
//! namespaces (kube's watcher resumes a broken watch from the last resourceVersion
//! and retries failures with backoff, as [`crate::kubernetes::follow`] does for
//! TrafficPolicies). A Service's slices are those labelled
//! `kubernetes.io/service-name=<name>` in its namespace; a slice port serves the
//! Service port of the same name ("" for the single unnamed port).
//!
//! This task is the store's only writer. Only what it needs of each object is kept
//! (ports, addresses, conditions), not the objects. A Service without slices has an
//! empty set; slices without their Service are kept but serve nothing until it exists
//! (their ports cannot be resolved without it).
//!
//! When the control plane is the mesh's CA, each endpoint also carries the
//! identity its pod's certificate will name: meshed pods (labelled
//! `sluice.dev/proxy=injected`, and whose proxy asks for a certificate,
//! `--identity-from-control-plane`) are watched, and only their service accounts
//! kept (pod → identity), so memory follows the meshed pods, not the cluster.
//! A pod meshed without a certificate (injected before mTLS) gets no identity, so
//! its callers keep speaking plain to it. Nothing is published before the pods are
//! listed too: a set first sent without identities would have proxies connect in
//! plain text for a moment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;

use crate::endpoints::{merge, EndpointStore, ServicePort, Slice, SliceEndpoint, SlicePort};
use crate::metrics::Metrics;

/// The proxy flag that makes a pod's proxy get a certificate (see the injector).
pub const IDENTITY_FLAG: &str = "--identity-from-control-plane";
/// Most meshed pods whose identities are kept (beyond it, new ones get none and a
/// warning is logged: their callers speak plain to them).
pub const MAX_MESHED_PODS: usize = 200_000;

/// The identity of a meshed pod that gets a certificate from the control plane,
/// `spiffe://TD/ns/NS/sa/SA`; `None` for any other pod.
pub fn pod_identity(pod: &Pod, trust_domain: &str) -> Option<String> {
    let injected = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::inject::INJECTED_LABEL))
        .is_some_and(|v| v == "injected");
    let spec = pod.spec.as_ref()?;
    let certified = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name == crate::inject::PROXY_CONTAINER)
        .any(|c| c.args.iter().flatten().any(|a| a == IDENTITY_FLAG));
    if !(injected && certified) {
        return None;
    }
    let namespace = pod.metadata.namespace.as_deref()?;
    // The API server fills in "default"; an object without it means the same.
    let service_account = spec
        .service_account_name
        .as_deref()
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default");
    Some(crate::ca::spiffe_id(
        trust_domain,
        namespace,
        service_account,
    ))
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn key(namespace: Option<&String>, name: Option<&String>) -> String {
    format!(
        "{}/{}",
        namespace.map_or("", String::as_str),
        name.map_or("", String::as_str)
    )
}

fn tcp(protocol: Option<&String>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// The Service's TCP ports (the proxy speaks HTTP over TCP only).
pub fn service_ports(service: &Service) -> Vec<ServicePort> {
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter(|p| tcp(p.protocol.as_ref()))
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u32::try_from(p.port).ok()?,
            })
        })
        .collect()
}

/// What is kept of a slice, or `None` for one of no Service (no label) or of
/// hostnames (`addressType: FQDN`).
pub fn slice(object: &EndpointSlice) -> Option<Slice> {
    if object.address_type == "FQDN" {
        return None;
    }
    let service = object.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let ports = object
        .ports
        .iter()
        .flatten()
        .filter(|p| tcp(p.protocol.as_ref()))
        .filter_map(|p| {
            Some(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u32::try_from(p.port?).ok()?,
            })
        })
        .collect();
    let endpoints = object
        .endpoints
        .iter()
        .flatten()
        .filter_map(|e| {
            let conditions = e.conditions.clone().unwrap_or_default();
            // Unknown readiness counts as ready, as the API documents; serving
            // defaults to readiness.
            let ready = conditions.ready.unwrap_or(true);
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .map(|r| key(r.namespace.as_ref(), r.name.as_ref()))
                .unwrap_or_default();
            Some(SliceEndpoint {
                ip: e.addresses.first()?.clone(),
                ready,
                serving: conditions.serving.unwrap_or(ready),
                terminating: conditions.terminating.unwrap_or(false),
                pod,
                zone: e.zone.clone().unwrap_or_default(),
            })
        })
        .collect();
    Some(Slice {
        service: key(object.metadata.namespace.as_ref(), Some(service)),
        ports,
        endpoints,
    })
}

/// What the follower knows: every Service's ports and every slice, by key.
#[derive(Default)]
struct Index {
    services: BTreeMap<String, Vec<ServicePort>>,
    slices: BTreeMap<String, Slice>,
    /// Slice keys by Service key.
    by_service: BTreeMap<String, BTreeSet<String>>,
    /// Meshed pods' identities, by pod key (only with a CA).
    identities: BTreeMap<String, String>,
    /// Slice keys by the pod keys of their endpoints.
    by_pod: BTreeMap<String, BTreeSet<String>>,
}

impl Index {
    /// Sets (or with `None` removes) a Service; returns it as affected.
    fn service(&mut self, key: String, ports: Option<Vec<ServicePort>>) -> String {
        match ports {
            Some(p) => self.services.insert(key.clone(), p),
            None => self.services.remove(&key),
        };
        key
    }

    /// Sets (or removes) a slice; returns the Services affected (its old and new one).
    fn slice(&mut self, key: String, slice: Option<Slice>) -> Vec<String> {
        let mut affected = Vec::with_capacity(2);
        if let Some(old) = self.slices.remove(&key) {
            if let Some(keys) = self.by_service.get_mut(&old.service) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_service.remove(&old.service);
                }
            }
            for e in old.endpoints.iter().filter(|e| !e.pod.is_empty()) {
                if let Some(keys) = self.by_pod.get_mut(&e.pod) {
                    keys.remove(&key);
                    if keys.is_empty() {
                        self.by_pod.remove(&e.pod);
                    }
                }
            }
            affected.push(old.service);
        }
        if let Some(new) = slice {
            self.by_service
                .entry(new.service.clone())
                .or_default()
                .insert(key.clone());
            for e in new.endpoints.iter().filter(|e| !e.pod.is_empty()) {
                self.by_pod
                    .entry(e.pod.clone())
                    .or_default()
                    .insert(key.clone());
            }
            affected.push(new.service.clone());
            self.slices.insert(key, new);
        }
        affected
    }

    /// Sets (or with `None` removes) a pod's identity; returns the Services whose
    /// endpoints it is (none when its identity did not change).
    fn pod(&mut self, key: String, identity: Option<String>) -> Vec<String> {
        let changed = match identity {
            Some(id) if self.identities.get(&key) != Some(&id) => {
                if self.identities.len() >= MAX_MESHED_PODS && !self.identities.contains_key(&key) {
                    tracing::warn!(
                        pod = key.as_str(),
                        kept = MAX_MESHED_PODS,
                        "too many meshed pods: this one's callers are given no identity for it"
                    );
                    return Vec::new();
                }
                self.identities.insert(key.clone(), id);
                true
            }
            Some(_) => false,
            None => self.identities.remove(&key).is_some(),
        };
        if !changed {
            return Vec::new();
        }
        self.services_of_pod(&key)
    }

    fn services_of_pod(&self, pod: &str) -> Vec<String> {
        self.by_pod
            .get(pod)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .map(|s| s.service.clone())
            .collect()
    }

    /// Offers each affected Service's set to the store.
    fn publish(&self, store: &EndpointStore, metrics: &Metrics, affected: BTreeSet<String>) {
        for service in affected {
            let changed = match self.services.get(&service) {
                Some(ports) => {
                    let slices = self
                        .by_service
                        .get(&service)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| self.slices.get(k));
                    let mut endpoints = merge(ports, slices);
                    for e in &mut endpoints {
                        if let Some(id) = self.identities.get(&e.pod) {
                            e.identity.clone_from(id);
                        }
                    }
                    store.put(&service, endpoints).is_some()
                }
                None => store.remove(&service),
            };
            if changed {
                metrics.endpoint_set_changes.inc();
            }
        }
        metrics
            .endpoint_sets
            .set(i64::try_from(store.len()).unwrap_or(i64::MAX));
    }
}

/// A watcher event reduced to what the index keeps (the objects are dropped at once).
enum Change<T> {
    Init,
    InitApply(String, T),
    InitDone,
    Apply(String, T),
    Delete(String),
}

fn change<K: kube::Resource, T>(event: Event<K>, keep: impl Fn(&K) -> T) -> Change<T> {
    let key_of = |o: &K| key(o.meta().namespace.as_ref(), o.meta().name.as_ref());
    match event {
        Event::Init => Change::Init,
        Event::InitApply(o) => Change::InitApply(key_of(&o), keep(&o)),
        Event::InitDone => Change::InitDone,
        Event::Apply(o) => Change::Apply(key_of(&o), keep(&o)),
        Event::Delete(o) => Change::Delete(key_of(&o)),
    }
}

enum Update {
    Service(Result<Change<Vec<ServicePort>>, watcher::Error>),
    Slice(Result<Change<Option<Slice>>, watcher::Error>),
    Pod(Result<Change<Option<String>>, watcher::Error>),
}

/// Lists and watches Services and EndpointSlices until the streams end (never,
/// under normal operation: errors are retried with backoff); with a
/// `trust_domain` (the control plane is a CA), meshed pods too, for the
/// endpoints' identities.
pub async fn follow(
    store: Arc<EndpointStore>,
    client: kube::Client,
    metrics: Metrics,
    trust_domain: Option<String>,
) {
    let services = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Update::Service(e.map(|e| change(e, service_ports))));
    let slices = watcher::watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Update::Slice(e.map(|e| change(e, slice))));
    let mut events = futures::stream::select(services, slices).boxed();
    let mut pods_listed = trust_domain.is_none();
    if let Some(td) = trust_domain {
        let selector = format!("{}=injected", crate::inject::INJECTED_LABEL);
        let pods = watcher::watcher(
            Api::<Pod>::all(client),
            watcher::Config::default().labels(&selector),
        )
        .default_backoff()
        .map(move |e| Update::Pod(e.map(|e| change(e, |p| pod_identity(p, &td)))));
        events = futures::stream::select(events, pods).boxed();
    }
    let mut listing_pods: Option<BTreeMap<String, String>> = None;
    let mut index = Index::default();
    // A relist in progress: the objects listed so far (they replace the index's
    // at its end, so a Service deleted while the watch was down goes too).
    let mut listing_services: Option<BTreeMap<String, Vec<ServicePort>>> = None;
    let mut listing_slices: Option<BTreeMap<String, Slice>> = None;
    let (mut services_listed, mut slices_listed) = (false, false);
    while let Some(update) = events.next().await {
        let mut affected = BTreeSet::new();
        match update {
            Update::Service(Ok(event)) => match event {
                Change::Init => listing_services = Some(BTreeMap::new()),
                Change::InitApply(k, ports) => {
                    if let Some(list) = listing_services.as_mut() {
                        list.insert(k, ports);
                    }
                }
                Change::InitDone => {
                    let listed = listing_services.take().unwrap_or_default();
                    affected.extend(index.services.keys().cloned());
                    affected.extend(listed.keys().cloned());
                    index.services = listed;
                    services_listed = true;
                }
                Change::Apply(k, ports) => {
                    affected.insert(index.service(k, Some(ports)));
                }
                Change::Delete(k) => {
                    affected.insert(index.service(k, None));
                }
            },
            Update::Slice(Ok(event)) => match event {
                Change::Init => listing_slices = Some(BTreeMap::new()),
                Change::InitApply(k, kept) => {
                    if let (Some(list), Some(kept)) = (listing_slices.as_mut(), kept) {
                        list.insert(k, kept);
                    }
                }
                Change::InitDone => {
                    let listed = listing_slices.take().unwrap_or_default();
                    let old: Vec<String> = index.slices.keys().cloned().collect();
                    for k in old {
                        affected.extend(index.slice(k, None));
                    }
                    for (k, s) in listed {
                        affected.extend(index.slice(k, Some(s)));
                    }
                    slices_listed = true;
                }
                Change::Apply(k, kept) => affected.extend(index.slice(k, kept)),
                Change::Delete(k) => affected.extend(index.slice(k, None)),
            },
            Update::Pod(Ok(event)) => match event {
                Change::Init => listing_pods = Some(BTreeMap::new()),
                Change::InitApply(k, id) => {
                    if let (Some(list), Some(id)) = (listing_pods.as_mut(), id) {
                        list.insert(k, id);
                    }
                }
                Change::InitDone => {
                    let listed = listing_pods.take().unwrap_or_default();
                    let old: Vec<String> = index.identities.keys().cloned().collect();
                    for k in old {
                        if !listed.contains_key(&k) {
                            affected.extend(index.pod(k, None));
                        }
                    }
                    for (k, id) in listed {
                        affected.extend(index.pod(k, Some(id)));
                    }
                    pods_listed = true;
                }
                Change::Apply(k, id) => affected.extend(index.pod(k, id)),
                Change::Delete(k) => affected.extend(index.pod(k, None)),
            },
            // Retried with backoff by the watcher; the sets served stay as they were.
            Update::Service(Err(e)) | Update::Slice(Err(e)) | Update::Pod(Err(e)) => {
                metrics.endpoint_watch_restarts.inc();
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "kubernetes watch of Services, EndpointSlices or meshed Pods failed; retrying"
                );
            }
        }
        // Before both lists are complete a Service may look endpoint-less only
        // because its slices are not listed yet: publish nothing until then.
        if services_listed && slices_listed && pods_listed {
            if !store.synced() {
                affected.extend(index.services.keys().cloned());
            }
            index.publish(&store, &metrics, affected);
            store.mark_synced();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_a_slice_of_a_service_with_its_conditions() {
        let object: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "reviews-abc", "namespace": "shop",
                "labels": {SERVICE_NAME_LABEL: "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "targetRef": {"kind": "Pod", "namespace": "shop", "name": "reviews-0"}, "zone": "z1"},
                {"addresses": ["10.0.0.2"]},
            ],
        }))
        .expect("a slice");
        let kept = slice(&object).expect("kept");
        assert_eq!(kept.service, "shop/reviews");
        assert_eq!(
            kept.ports,
            [SlicePort {
                name: "http".into(),
                port: 8080
            }]
        );
        assert_eq!(
            kept.endpoints[0],
            SliceEndpoint {
                ip: "10.0.0.1".into(),
                ready: false,
                serving: true,
                terminating: true,
                pod: "shop/reviews-0".into(),
                zone: "z1".into(),
            }
        );
        // Unknown conditions: ready and serving, not terminating.
        assert!(kept.endpoints[1].ready && kept.endpoints[1].serving);
        assert!(!kept.endpoints[1].terminating);
    }

    #[test]
    fn a_slice_without_its_service_label_or_of_hostnames_is_ignored() {
        let unlabelled: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "shop"}, "addressType": "IPv4",
        }))
        .expect("a slice");
        assert_eq!(slice(&unlabelled), None);
        let fqdn: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "a"}},
            "addressType": "FQDN",
        }))
        .expect("a slice");
        assert_eq!(slice(&fqdn), None);
    }

    #[test]
    fn a_slice_moving_to_another_service_affects_both() {
        let mut index = Index::default();
        let of = |service: &str| Slice {
            service: service.into(),
            ..Slice::default()
        };
        assert_eq!(
            index.slice("shop/s1".into(), Some(of("shop/a"))),
            ["shop/a"]
        );
        assert_eq!(
            index.slice("shop/s1".into(), Some(of("shop/b"))),
            ["shop/a", "shop/b"]
        );
        assert!(!index.by_service.contains_key("shop/a"));
        assert_eq!(index.slice("shop/s1".into(), None), ["shop/b"]);
        assert!(index.by_service.is_empty());
    }

    #[test]
    fn only_meshed_pods_with_a_certificate_have_an_identity() {
        let pod = |labels: serde_json::Value, args: serde_json::Value, sa: Option<&str>| -> Pod {
            let mut spec = json!({"initContainers": [{"name": "sluice-proxy", "args": args}],
                "containers": [{"name": "app"}]});
            if let Some(sa) = sa {
                spec["serviceAccountName"] = json!(sa);
            }
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "shop", "labels": labels}, "spec": spec}))
            .unwrap()
        };
        let meshed = json!({"sluice.dev/proxy": "injected"});
        let certified = json!(["--identity-from-control-plane"]);
        assert_eq!(
            pod_identity(
                &pod(meshed.clone(), certified.clone(), Some("reviews")),
                "td"
            ),
            Some("spiffe://td/ns/shop/sa/reviews".into())
        );
        assert_eq!(
            pod_identity(&pod(meshed.clone(), certified.clone(), None), "td"),
            Some("spiffe://td/ns/shop/sa/default".into())
        );
        assert_eq!(
            pod_identity(&pod(meshed, json!(["--token-file", "t"]), None), "td"),
            None
        );
        assert_eq!(pod_identity(&pod(json!({}), certified, None), "td"), None);
    }

    #[test]
    fn a_pod_meshed_or_gone_affects_the_services_it_serves() {
        let mut index = Index::default();
        let mut s = slice(
            &serde_json::from_value(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "reviews-a", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "reviews"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.0.0.1"],
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": "reviews-0"}}],
            }))
            .unwrap(),
        )
        .unwrap();
        index.slice("shop/reviews-a".into(), Some(s.clone()));
        let id = Some("spiffe://td/ns/shop/sa/r".to_owned());
        assert_eq!(
            index.pod("shop/reviews-0".into(), id.clone()),
            ["shop/reviews"]
        );
        assert!(
            index.pod("shop/reviews-0".into(), id).is_empty(),
            "unchanged"
        );
        assert!(index.pod("shop/other".into(), None).is_empty());
        // The slice moves on: the pod no longer affects the Service.
        s.endpoints.clear();
        index.slice("shop/reviews-a".into(), Some(s));
        assert!(index.pod("shop/reviews-0".into(), None).is_empty());
        assert!(index.by_pod.is_empty());
    }
}
