//! The gRPC `EndpointDiscovery` service: a proxy names the Services its backends
//! use and gets each one's endpoint set, then every change of them.
//!
//! Callers are authenticated as for `StreamPolicies` (a proxy's ServiceAccount
//! token may subscribe, as its own pod only). Each stream runs one task that keeps
//! what it sent per Service; a change wakes it, and it sends a Service's set only
//! when its version differs from the one sent.
//!
//! Bounds: at most [`MAX_SERVICES_PER_SUBSCRIPTION`] Services per subscription
//! (more is refused); at most [`IN_FLIGHT`] updates queued per stream. While a
//! proxy is slow its changes wait as a set of Service names, so a Service that
//! changes many times is sent once, with its latest set.
//!
//! Invariants: the first update answers the subscription (the current set of every
//! wanted Service that exists, possibly none) and is sent only once every Service
//! and slice has been listed; `removed` names only Services the stream had sent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::endpoint_discovery_server::EndpointDiscovery;
use crate::api::{self, EndpointsRequest, EndpointsUpdate};
use crate::auth::Authenticator;
use crate::discovery::{matches_identity, subscribe};
use crate::endpoints::{Changes, EndpointStore, MAX_SERVICES_PER_SUBSCRIPTION};
use crate::metrics::Metrics;
use crate::store::Store;

/// Updates queued per stream before the stream waits (and coalesces).
pub const IN_FLIGHT: usize = 2;
/// Updates awaiting an ACK whose contents are remembered, per stream.
const OUTSTANDING: usize = 16;
/// Longest "namespace/name": a DNS-1123 namespace (63) and Service name (63).
const MAX_SERVICE_KEY: usize = 127;

/// The `EndpointDiscovery` service of one server.
pub(crate) struct Endpoints {
    /// Proxies' status (the ACKed endpoint versions are kept with it).
    pub(crate) store: Arc<Store>,
    pub(crate) endpoints: Arc<EndpointStore>,
    /// Each stream's nonces start at a multiple of 2^20 taken from here.
    pub(crate) nonce: AtomicU64,
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) metrics: Metrics,
}

/// One stream's view: what the proxy wants, what it was sent, what may have changed.
#[derive(Debug, Default)]
pub(crate) struct Subscription {
    wanted: BTreeSet<String>,
    /// The version sent per Service (the proxy has it, or will).
    sent: BTreeMap<String, u64>,
    /// Services to look at before the next update.
    pending: BTreeSet<String>,
    /// The store's change number last read.
    seen: u64,
    /// The first update went out.
    answered: bool,
}

/// The checked list of a subscribe or resubscribe.
fn wanted(services: Vec<String>) -> Result<BTreeSet<String>, Status> {
    if services.len() > MAX_SERVICES_PER_SUBSCRIPTION {
        return Err(Status::invalid_argument(format!(
            "{} Services named; at most {MAX_SERVICES_PER_SUBSCRIPTION} per subscription",
            services.len()
        )));
    }
    for s in &services {
        let valid = s.len() <= MAX_SERVICE_KEY
            && s.split_once('/').is_some_and(|(ns, name)| {
                !ns.is_empty() && !name.is_empty() && !name.contains('/')
            });
        if !valid {
            return Err(Status::invalid_argument(format!(
                "{s:?} is not a Service as \"namespace/name\""
            )));
        }
    }
    Ok(services.into_iter().collect())
}

impl Subscription {
    /// Starts at the store's change number `seen`: whatever changed before is read
    /// whole by the first update.
    pub(crate) fn new(seen: u64) -> Self {
        Subscription {
            seen,
            ..Subscription::default()
        }
    }

    /// The proxy's new list: Services added are looked up, Services dropped removed.
    pub(crate) fn resubscribe(&mut self, services: Vec<String>) -> Result<(), Status> {
        let new = wanted(services)?;
        self.pending.extend(new.difference(&self.wanted).cloned());
        self.pending.extend(self.wanted.difference(&new).cloned());
        self.wanted = new;
        Ok(())
    }

    pub(crate) fn wanted(&self) -> &BTreeSet<String> {
        &self.wanted
    }

    /// Notes the Services changed since last time that this stream wants.
    pub(crate) fn catch_up(&mut self, store: &EndpointStore) {
        let (seq, changes) = store.changed_since(self.seen);
        self.seen = seq;
        match changes {
            Changes::Any => self.pending.extend(self.wanted.iter().cloned()),
            Changes::Some(changed) => self
                .pending
                .extend(changed.into_iter().filter(|s| self.wanted.contains(s))),
        }
    }

    /// Whether [`Subscription::next_update`] may have something to send.
    pub(crate) fn has_work(&self) -> bool {
        !self.answered || !self.pending.is_empty()
    }

    /// The sets to send and the Services to remove, as of now; `None` when nothing
    /// changed for this stream (the first call always answers).
    pub(crate) fn next_update(
        &mut self,
        store: &EndpointStore,
    ) -> Option<(Vec<Arc<api::EndpointSet>>, Vec<String>)> {
        let (mut sets, mut removed) = (Vec::new(), Vec::new());
        for service in std::mem::take(&mut self.pending) {
            let current = self
                .wanted
                .contains(&service)
                .then(|| store.get(&service))
                .flatten();
            match current {
                Some(set) => {
                    if self.sent.get(&service) != Some(&set.version) {
                        self.sent.insert(service, set.version);
                        sets.push(set);
                    }
                }
                None => {
                    if self.sent.remove(&service).is_some() {
                        removed.push(service);
                    }
                }
            }
        }
        let first = !self.answered;
        self.answered = true;
        (first || !sets.is_empty() || !removed.is_empty()).then_some((sets, removed))
    }
}

/// What an update carried, to record its ACK or NACK.
struct Sent {
    nonce: String,
    sets: Vec<(String, u64)>,
    removed: Vec<String>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<EndpointsUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl EndpointDiscovery for Endpoints {
    type StreamEndpointsStream = UpdateStream;

    async fn stream_endpoints(
        &self,
        request: Request<Streaming<EndpointsRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let (identity, mut inbound, first) =
            subscribe(&self.auth, request, |m: &EndpointsRequest| &m.node_id).await?;
        let node = first.node_id.clone();
        matches_identity(&identity, &node, "")?;
        let mut changes = self.endpoints.subscribe();
        let mut sub = Subscription::new(*changes.borrow_and_update());
        // The first message subscribes whether or not it says `resubscribe`.
        sub.resubscribe(first.services)?;
        self.store.endpoints_wanted(&node, sub.wanted());
        tracing::info!(
            node = node.as_str(),
            services = sub.wanted().len(),
            authenticated_by = identity.via.as_str(),
            "proxy subscribed to endpoints"
        );

        let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        let (store, endpoints) = (Arc::clone(&self.store), Arc::clone(&self.endpoints));
        let base = self.nonce.fetch_add(1 << 20, Ordering::Relaxed);
        let mut stopping = self.stopping.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut sent_count: u64 = 0;
            let mut outstanding: VecDeque<Sent> = VecDeque::with_capacity(OUTSTANDING);
            // Ends when the proxy hangs up, breaks the protocol, or the server stops.
            loop {
                let may_send = sub.has_work() && endpoints.synced();
                tokio::select! {
                    // (The guard `wait_for` returns must not live across the awaits below.)
                    () = async { let _ = stopping.wait_for(|s| *s).await; } => break,
                    // Only with room in the queue: until then changes gather in
                    // `pending`, and the update built here has each one's latest set.
                    permit = tx.reserve(), if may_send => {
                        let Ok(permit) = permit else { break };
                        let Some((sets, removed)) = sub.next_update(&endpoints) else {
                            continue;
                        };
                        sent_count += 1;
                        let nonce = format!("{:x}", base + sent_count);
                        outstanding.push_back(Sent {
                            nonce: nonce.clone(),
                            sets: sets.iter().map(|s| (s.service.clone(), s.version)).collect(),
                            removed: removed.clone(),
                        });
                        if outstanding.len() > OUTSTANDING {
                            outstanding.pop_front();
                        }
                        permit.send(Ok(EndpointsUpdate {
                            nonce,
                            sets: sets.iter().map(|s| (**s).clone()).collect(),
                            removed,
                        }));
                        metrics.endpoint_updates.inc();
                    }
                    changed = changes.changed() => match changed {
                        Ok(()) => {
                            changes.borrow_and_update();
                            sub.catch_up(&endpoints);
                        }
                        Err(_) => break,
                    },
                    message = inbound.message() => match message {
                        Ok(Some(reply)) => {
                            let answered = outstanding
                                .iter()
                                .position(|s| s.nonce == reply.response_nonce)
                                .and_then(|i| outstanding.remove(i));
                            if let Some(mut answered) = answered {
                                if reply.error.is_empty() {
                                    // Not Services dropped since: their versions go.
                                    answered.sets.retain(|(s, _)| sub.wanted().contains(s));
                                    store.endpoints_acked(&node, &answered.sets, &answered.removed);
                                } else {
                                    metrics.endpoint_nacks.inc();
                                    tracing::warn!(
                                        node = node.as_str(),
                                        error = reply.error.as_str(),
                                        "proxy refused an endpoints update"
                                    );
                                    store.endpoints_nacked(
                                        &node,
                                        &answered.sets,
                                        &answered.removed,
                                        reply.error,
                                    );
                                }
                            }
                            if reply.resubscribe {
                                if let Err(refused) = sub.resubscribe(reply.services) {
                                    // Without waiting: a proxy that does not read
                                    // must not hold this task; ending it ends the
                                    // stream either way.
                                    let _ = tx.try_send(Err(refused));
                                    break;
                                }
                                store.endpoints_wanted(&node, sub.wanted());
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            tracing::info!(node = node.as_str(), "endpoints stream ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str) -> Vec<api::Endpoint> {
        vec![api::Endpoint {
            ip: ip.into(),
            ..Default::default()
        }]
    }

    fn names(
        update: &(Vec<Arc<api::EndpointSet>>, Vec<String>),
    ) -> (Vec<(String, u64)>, Vec<String>) {
        (
            update
                .0
                .iter()
                .map(|s| (s.service.clone(), s.version))
                .collect(),
            update.1.clone(),
        )
    }

    #[test]
    fn the_first_update_answers_even_when_nothing_wanted_exists() {
        let store = EndpointStore::default();
        let mut sub = Subscription::new(0);
        sub.resubscribe(vec!["shop/none".into()]).expect("valid");
        let first = sub.next_update(&store).expect("an answer");
        assert_eq!(names(&first), (vec![], vec![]));
        assert!(!sub.has_work());
        assert!(sub.next_update(&store).is_none());
    }

    #[test]
    fn a_service_changed_several_times_while_waiting_is_sent_once_with_its_latest_set() {
        let store = EndpointStore::default();
        let first = store.put("shop/a", at("10.0.0.1")).expect("new");
        let mut sub = Subscription::new(1);
        sub.resubscribe(vec!["shop/a".into()]).expect("valid");
        assert_eq!(
            names(&sub.next_update(&store).expect("first")).0,
            [("shop/a".into(), first)]
        );
        store.put("shop/a", at("10.0.0.2"));
        store.put("shop/b", at("10.0.0.9"));
        let last = store.put("shop/a", at("10.0.0.3")).expect("changed");
        sub.catch_up(&store);
        let update = sub.next_update(&store).expect("an update");
        assert_eq!(names(&update).0, [("shop/a".into(), last)]);
        assert_eq!(update.0[0].endpoints[0].ip, "10.0.0.3");
    }

    #[test]
    fn removed_names_services_gone_or_no_longer_wanted_that_were_sent() {
        let store = EndpointStore::default();
        store.put("shop/a", at("10.0.0.1"));
        store.put("shop/b", at("10.0.0.2"));
        let mut sub = Subscription::new(2);
        sub.resubscribe(vec!["shop/a".into(), "shop/b".into(), "shop/c".into()])
            .expect("valid");
        sub.next_update(&store);
        sub.resubscribe(vec!["shop/b".into(), "shop/c".into()])
            .expect("valid");
        assert_eq!(
            names(&sub.next_update(&store).expect("update")),
            (vec![], vec!["shop/a".into()])
        );
        store.remove("shop/b");
        store.remove("shop/c"); // never existed: nothing
        sub.catch_up(&store);
        assert_eq!(
            names(&sub.next_update(&store).expect("update")),
            (vec![], vec!["shop/b".into()])
        );
    }

    #[test]
    fn refuses_too_many_services_and_names_that_are_not_namespace_slash_name() {
        let mut sub = Subscription::new(0);
        let many = (0..=MAX_SERVICES_PER_SUBSCRIPTION)
            .map(|i| format!("ns/s{i}"))
            .collect();
        assert_eq!(
            sub.resubscribe(many).map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        for bad in ["reviews", "/reviews", "shop/", "a/b/c"] {
            assert!(sub.resubscribe(vec![bad.into()]).is_err(), "{bad}");
        }
    }
}
