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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;

use crate::endpoints::{merge, EndpointStore, ServicePort, Slice, SliceEndpoint, SlicePort};
use crate::metrics::Metrics;

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
            affected.push(old.service);
        }
        if let Some(new) = slice {
            self.by_service
                .entry(new.service.clone())
                .or_default()
                .insert(key.clone());
            affected.push(new.service.clone());
            self.slices.insert(key, new);
        }
        affected
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
                    store.put(&service, merge(ports, slices)).is_some()
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
}

/// Lists and watches Services and EndpointSlices until the streams end (never,
/// under normal operation: errors are retried with backoff).
pub async fn follow(store: Arc<EndpointStore>, client: kube::Client, metrics: Metrics) {
    let services = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Update::Service(e.map(|e| change(e, service_ports))));
    let slices = watcher::watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Update::Slice(e.map(|e| change(e, slice))));
    let mut events = futures::stream::select(services, slices).boxed();
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
            // Retried with backoff by the watcher; the sets served stay as they were.
            Update::Service(Err(e)) | Update::Slice(Err(e)) => {
                metrics.endpoint_watch_restarts.inc();
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "kubernetes watch of Services or EndpointSlices failed; retrying"
                );
            }
        }
        // Before both lists are complete a Service may look endpoint-less only
        // because its slices are not listed yet: publish nothing until then.
        if services_listed && slices_listed {
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
}
