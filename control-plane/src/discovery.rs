//! The gRPC API (`PolicyDiscovery`): proxies subscribe to the policies they use
//! (by host, by identity, or all) and get each one as a resource of its own, then
//! every change of those, answering each update with the policies they refused;
//! the operator's calls (status, history, current, rollback) read and roll back
//! the [`Store`].
//!
//! Callers are checked in each call, not by an interceptor: a TokenReview is a
//! request to the Kubernetes API, and tonic's interceptors cannot wait. A proxy's
//! ServiceAccount token only subscribes, and only as its own pod and namespace.
//!
//! Invariants: a subscriber gets what it asked for at once (and an answer for every
//! host it asks about, owned or not), then only what changed in it: each update is
//! the difference between what the proxy holds and the latest served set, so a
//! slow proxy skips intermediate versions; every stream ends on shutdown.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::policy_discovery_server::PolicyDiscovery;
use crate::api::{self, PolicyRequest};
use crate::auth::{Authenticator, Identity, Via};
use crate::metrics::Metrics;
use crate::serve::MAX_NODE_ID;
use crate::store::{PolicyResource, Served, Store};
use sluice_policy::PolicyId;

/// The `PolicyDiscovery` service of one server.
pub(crate) struct Discovery {
    pub(crate) store: Arc<Store>,
    /// Each stream's nonces start at a multiple of 2^20 taken from here.
    pub(crate) nonce: AtomicU64,
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    pub(crate) auth: Arc<Authenticator>,
    /// ServiceAccounts (`namespace/name`) allowed the operator's calls.
    pub(crate) operators: Vec<String>,
    pub(crate) metrics: Metrics,
    /// The cluster, when the TrafficPolicy resources are the source: a policy's
    /// history and rollback are read from and written to it.
    pub(crate) kube: Option<kube::Client>,
}

impl Discovery {
    /// A policy's versions: for a TrafficPolicy resource, its status' accepted
    /// specs (the cluster's answer, the same from every replica); for a policy
    /// from a directory, the versions this replica served, oldest first.
    async fn policy_history(&self, id: &PolicyId) -> Result<Vec<api::HistoryEntry>, Status> {
        if let (Some(client), Some(_)) = (&self.kube, &id.namespace) {
            let accepted = crate::kubernetes::accepted_specs(client, id)
                .await
                .map_err(Status::not_found)?;
            return Ok(accepted
                .into_iter()
                .map(|a| api::HistoryEntry {
                    source: format!("kubernetes:{id} status.accepted"),
                    policies: 1,
                    policy_version: a.version,
                    generation: a.generation,
                    ..Default::default()
                })
                .collect());
        }
        let mut entries: Vec<api::HistoryEntry> = Vec::new();
        for s in self.store.history() {
            let Some(p) = s.policies.get(id) else {
                continue;
            };
            if entries
                .last()
                .is_some_and(|e| e.policy_version == p.version)
            {
                continue;
            }
            entries.push(api::HistoryEntry {
                version: s.version,
                content_hash: s.content_hash.clone(),
                source: s.source.clone(),
                accepted_at_ms: s.accepted_at_ms,
                policies: 1,
                policy_version: p.version.clone(),
                generation: p.generation,
            });
        }
        Ok(entries)
    }

    /// The operator's calls (status, history, rollback): the static token, a
    /// loopback caller, or a ServiceAccount named by `--operator`; never another
    /// ServiceAccount's token (every pod of the mesh has one, and none may roll
    /// the mesh back).
    async fn operator(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let identity = self.auth.authenticate(metadata).await?;
        match identity.via {
            Via::Loopback | Via::StaticToken => Ok(()),
            Via::TokenReview => {
                let subject = format!("{}/{}", identity.namespace, identity.service_account);
                if self.operators.contains(&subject) {
                    Ok(())
                } else {
                    Err(Status::permission_denied(format!(
                        "{subject} may only subscribe to policies; status, history and \
                         rollback take an --operator ServiceAccount's token or the \
                         control plane's --token-file token"
                    )))
                }
            }
        }
    }
}

/// Whether a subscriber is who its token says: the namespace it claims and its
/// node id (the pod, for injected sidecars) must be the token's, so no pod can
/// speak for another.
pub(crate) fn matches_identity(
    identity: &Identity,
    node: &str,
    namespace: &str,
) -> Result<(), Status> {
    if identity.via != Via::TokenReview {
        return Ok(());
    }
    if !namespace.is_empty() && namespace != identity.namespace {
        return Err(Status::permission_denied(format!(
            "the proxy says it is in namespace {namespace:?}, its token is for {:?}",
            identity.namespace
        )));
    }
    if let Some(pod) = identity.pod.as_deref().filter(|p| *p != node) {
        return Err(Status::permission_denied(format!(
            "node id {node:?} is not the token's pod {pod:?}: run the proxy with --node-id $(POD_NAME)"
        )));
    }
    Ok(())
}

/// Opens a subscription stream (policies or endpoints): the caller's identity, the
/// stream, and its first message, which must subscribe with a bounded node id.
pub(crate) async fn subscribe<T: prost::Message + Default>(
    auth: &Authenticator,
    request: Request<Streaming<T>>,
    node_id: impl Fn(&T) -> &str,
) -> Result<(Identity, Streaming<T>, T), Status> {
    let identity = auth.authenticate(request.metadata()).await?;
    let mut inbound = request.into_inner();
    let first = inbound.message().await?.ok_or_else(|| {
        Status::invalid_argument("the stream must start with a subscribe message")
    })?;
    let node = node_id(&first);
    if node.is_empty() || node.len() > MAX_NODE_ID {
        return Err(Status::invalid_argument(format!(
            "node_id must be 1..={MAX_NODE_ID} characters"
        )));
    }
    Ok((identity, inbound, first))
}

/// Most hosts, and most policies by identity, one stream may subscribe to (more
/// are ignored, with a warning): the proxy bounds its own wants below these.
pub const MAX_SUBSCRIBED: usize = 10_000;
/// Updates awaiting an answer whose contents are remembered (for status): the
/// parts of one large answer, and a few more.
const OUTSTANDING: usize = 256;
/// Most policies in one update, and most bytes of their YAML: a larger answer (a
/// proxy subscribing to every policy of a large mesh) goes in several parts, so no
/// message carries the mesh and none nears the 16 MiB message limit.
pub const MAX_UPDATE_POLICIES: usize = 1000;
pub const MAX_UPDATE_BYTES: usize = 4 * 1024 * 1024;

/// Splits an update into parts of at most [`MAX_UPDATE_POLICIES`] policies and
/// [`MAX_UPDATE_BYTES`] of YAML (a single larger policy is a part of its own); the
/// first part carries the removals and unknown hosts, every part but the last has
/// `more` set.
pub(crate) fn parts(mut update: api::PolicyUpdate) -> Vec<api::PolicyUpdate> {
    let policies = std::mem::take(&mut update.policies);
    let mut out = vec![update];
    let mut bytes = 0;
    for p in policies {
        let last = out.len() - 1;
        let size = p.yaml.len();
        let full = out[last].policies.len() >= MAX_UPDATE_POLICIES
            || (!out[last].policies.is_empty() && bytes + size > MAX_UPDATE_BYTES);
        if full {
            out[last].more = true;
            out.push(api::PolicyUpdate::default());
            bytes = 0;
        }
        bytes += size;
        if let Some(part) = out.last_mut() {
            part.policies.push(p);
        }
    }
    out
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<api::PolicyUpdate, Status>> + Send>>;

/// What one stream subscribes to and what its proxy holds.
#[derive(Default)]
pub(crate) struct Subscription {
    all: bool,
    hosts: BTreeSet<String>,
    policies: BTreeSet<PolicyId>,
    /// Hosts subscribed since the last update: each gets an answer, owned or not.
    asked: Vec<String>,
    /// What the proxy holds (or was sent): identity -> version.
    held: HashMap<PolicyId, String>,
}

impl Subscription {
    /// Applies a request's subscription changes; whether anything changed.
    fn change(&mut self, node: &str, m: &PolicyRequest) -> bool {
        let mut changed = false;
        for host in &m.hosts_removed {
            changed |= self.hosts.remove(&host.to_ascii_lowercase());
        }
        for id in &m.policies_removed {
            changed |= self.policies.remove(&PolicyId::parse(id));
        }
        let mut ignored = 0usize;
        for host in &m.hosts_added {
            let host = host.to_ascii_lowercase();
            if self.hosts.len() >= MAX_SUBSCRIBED && !self.hosts.contains(&host) {
                ignored += 1;
                continue;
            }
            self.asked.push(host.clone());
            self.hosts.insert(host);
            changed = true;
        }
        for id in &m.policies_added {
            if self.policies.len() >= MAX_SUBSCRIBED {
                ignored += 1;
                continue;
            }
            changed |= self.policies.insert(PolicyId::parse(id));
        }
        if ignored > 0 {
            tracing::warn!(
                node,
                ignored,
                limit = MAX_SUBSCRIBED,
                "a proxy subscribed to more hosts or policies than one stream may; the rest are ignored"
            );
        }
        changed
    }

    /// The update that brings the proxy from what it holds to what it wants of
    /// `served`; `None` when there is nothing to say.
    pub(crate) fn update(&mut self, served: &Served) -> Option<api::PolicyUpdate> {
        let mut wanted: BTreeMap<&PolicyId, &Arc<PolicyResource>> = BTreeMap::new();
        if self.all {
            wanted.extend(served.policies.iter());
        } else {
            for host in &self.hosts {
                if let Some((id, p)) = served
                    .hosts
                    .get(host)
                    .and_then(|id| served.policies.get_key_value(id))
                {
                    wanted.insert(id, p);
                }
            }
            for id in &self.policies {
                if let Some((id, p)) = served.policies.get_key_value(id) {
                    wanted.insert(id, p);
                }
            }
        }
        let mut update = api::PolicyUpdate::default();
        for (id, p) in &wanted {
            if self.held.get(*id) != Some(&p.version) {
                self.held.insert((*id).clone(), p.version.clone());
                update.policies.push(p.to_api());
            }
        }
        let gone: Vec<PolicyId> = self
            .held
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .cloned()
            .collect();
        for id in gone {
            self.held.remove(&id);
            update.removed.push(id.to_string());
        }
        for host in std::mem::take(&mut self.asked) {
            if !served.hosts.contains_key(&host) {
                update.unknown_hosts.push(host);
            }
        }
        let empty = update.policies.is_empty()
            && update.removed.is_empty()
            && update.unknown_hosts.is_empty();
        (!empty).then_some(update)
    }
}

#[tonic::async_trait]
impl PolicyDiscovery for Discovery {
    type StreamPoliciesStream = UpdateStream;

    async fn stream_policies(
        &self,
        request: Request<Streaming<PolicyRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let (identity, mut inbound, first) =
            subscribe(&self.auth, request, |m: &PolicyRequest| &m.node_id).await?;
        let node = first.node_id.clone();
        matches_identity(&identity, &node, &first.namespace)?;
        let labels: BTreeMap<String, String> = first.labels.clone().into_iter().collect();
        if self
            .store
            .connected(&node, labels, first.namespace.clone(), &identity)
        {
            self.metrics.proxies_connected.inc();
        }
        let mut subscription = Subscription {
            all: first.all,
            held: first
                .held
                .iter()
                .map(|(id, v)| (PolicyId::parse(id), v.clone()))
                .collect(),
            ..Subscription::default()
        };
        subscription.change(&node, &first);
        tracing::info!(
            node = node.as_str(),
            all = first.all,
            hosts = subscription.hosts.len(),
            policies = subscription.policies.len(),
            held = subscription.held.len(),
            namespace = identity.namespace.as_str(),
            service_account = identity.service_account.as_str(),
            authenticated_by = identity.via.as_str(),
            "proxy connected"
        );

        // A few updates in flight are plenty: each is computed against the latest set.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = Arc::clone(&self.store);
        let mut served = store.subscribe();
        let base = self.nonce.fetch_add(1 << 20, Ordering::Relaxed);
        let mut stopping = self.stopping.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut sent: u64 = 0;
            // Nonce -> what that update carried, for the status of the answer.
            let mut outstanding: VecDeque<(String, Vec<(String, String)>, Vec<String>)> =
                VecDeque::new();
            let mut dirty = true;
            let mut first_update = true;
            // Ends when the proxy hangs up or the server shuts down.
            loop {
                if dirty {
                    dirty = false;
                    store.subscription(
                        &node,
                        subscription.all,
                        subscription.hosts.len(),
                        subscription.policies.len(),
                    );
                    let now = served.borrow_and_update().clone();
                    // The first update is sent even when empty: it tells the proxy
                    // that it holds everything it asked for.
                    let update = subscription
                        .update(&now)
                        .or_else(|| first_update.then(api::PolicyUpdate::default));
                    let mut gone = false;
                    for mut update in update.map(parts).unwrap_or_default() {
                        first_update = false;
                        sent += 1;
                        update.nonce = format!("{:x}", base + sent);
                        let carried = update
                            .policies
                            .iter()
                            .map(|p| (p.id.clone(), p.version.clone()))
                            .collect();
                        outstanding.push_back((
                            update.nonce.clone(),
                            carried,
                            update.removed.clone(),
                        ));
                        if outstanding.len() > OUTSTANDING {
                            outstanding.pop_front();
                        }
                        if tx.send(Ok(update)).await.is_err() {
                            gone = true;
                            break;
                        }
                        metrics.pushes.inc();
                    }
                    if gone {
                        break;
                    }
                }
                tokio::select! {
                    _ = stopping.wait_for(|s| *s) => break,
                    changed = served.changed() => match changed {
                        Ok(()) => dirty = true,
                        Err(_) => break,
                    },
                    message = inbound.message() => match message {
                        Ok(Some(m)) => {
                            dirty |= subscription.change(&node, &m);
                            if m.response_nonce.is_empty() {
                                continue;
                            }
                            let Some(at) = outstanding.iter().position(|(n, _, _)| *n == m.response_nonce) else {
                                continue;
                            };
                            let Some((_, carried, removed)) = outstanding.remove(at) else {
                                continue;
                            };
                            let (refused, applied): (Vec<_>, Vec<_>) = carried
                                .into_iter()
                                .partition(|(id, _)| m.refused.contains_key(id));
                            store.policies_acked(&node, &applied, &removed);
                            if refused.is_empty() {
                                metrics.acks.inc();
                            } else {
                                metrics.nacks.inc();
                                let why: Vec<String> = refused
                                    .iter()
                                    .map(|(id, _)| format!("{id}: {}", m.refused[id]))
                                    .collect();
                                tracing::warn!(
                                    node = node.as_str(),
                                    refused = why.join("; "),
                                    "proxy refused policies"
                                );
                                store.policies_nacked(
                                    &node,
                                    refused.iter().map(|(id, v)| format!("{id}@{v}")).collect(),
                                    why.join("\n"),
                                );
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            if store.disconnected(&node) {
                metrics.proxies_connected.dec();
            }
            tracing::info!(node = node.as_str(), "proxy disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_status(
        &self,
        request: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        self.operator(request.metadata()).await?;
        Ok(Response::new(self.store.status()))
    }

    async fn get_current(
        &self,
        request: Request<api::CurrentRequest>,
    ) -> Result<Response<api::Snapshot>, Status> {
        self.operator(request.metadata()).await?;
        let current = self
            .store
            .current()
            .ok_or_else(|| Status::not_found("nothing is served yet"))?;
        Ok(Response::new(current.to_api()))
    }

    async fn get_history(
        &self,
        request: Request<api::HistoryRequest>,
    ) -> Result<Response<api::HistoryResponse>, Status> {
        self.operator(request.metadata()).await?;
        let policy = request.into_inner().policy;
        if !policy.is_empty() {
            return Ok(Response::new(api::HistoryResponse {
                entries: self.policy_history(&PolicyId::parse(&policy)).await?,
            }));
        }
        let entries = self
            .store
            .history()
            .iter()
            .map(|s| api::HistoryEntry {
                version: s.version,
                content_hash: s.content_hash.clone(),
                source: s.source.clone(),
                accepted_at_ms: s.accepted_at_ms,
                policies: s.policies.len() as u32,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(api::HistoryResponse { entries }))
    }

    async fn rollback(
        &self,
        request: Request<api::RollbackRequest>,
    ) -> Result<Response<api::RollbackResponse>, Status> {
        self.operator(request.metadata()).await?;
        let request = request.into_inner();
        if !request.policy.is_empty() {
            let id = PolicyId::parse(&request.policy);
            let Some(client) = &self.kube else {
                return Err(Status::failed_precondition(format!(
                    "policy {id} comes from a directory, the source of truth: restore its \
                     file (git revert); `sluice-cp rollback` without --policy serves an \
                     earlier set from this control plane"
                )));
            };
            let to = (!request.to_policy_version.is_empty())
                .then_some(request.to_policy_version.as_str());
            let (version, generation) = crate::kubernetes::restore_spec(client, &id, to)
                .await
                .map_err(Status::failed_precondition)?;
            tracing::warn!(policy = %id, version = version.as_str(), generation, "rolled back a policy");
            return Ok(Response::new(api::RollbackResponse {
                served: None,
                policy_version: version,
                generation,
            }));
        }
        let to = request.to_version;
        let served = self
            .store
            .rollback(to)
            .map_err(Status::failed_precondition)?;
        self.metrics.served(served.version);
        tracing::warn!(
            version = served.version,
            source = served.source.as_str(),
            "rolled back"
        );
        Ok(Response::new(api::RollbackResponse {
            served: Some(served.to_api()),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(i: usize, bytes: usize) -> api::PolicyResource {
        api::PolicyResource {
            id: format!("p{i}"),
            version: format!("v{i}"),
            yaml: "x".repeat(bytes),
            hosts: vec![format!("h{i}")],
        }
    }

    #[test]
    fn a_large_answer_goes_in_parts_the_first_with_removals_the_last_without_more() {
        let update = api::PolicyUpdate {
            policies: (0..2500).map(|i| resource(i, 10)).collect(),
            removed: vec!["gone".into()],
            unknown_hosts: vec!["nobody".into()],
            ..Default::default()
        };
        let parts = parts(update);
        let sizes: Vec<usize> = parts.iter().map(|p| p.policies.len()).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        let more: Vec<bool> = parts.iter().map(|p| p.more).collect();
        assert_eq!(more, [true, true, false]);
        assert_eq!(parts[0].removed, ["gone"]);
        assert_eq!(parts[0].unknown_hosts, ["nobody"]);
        assert!(parts[1].removed.is_empty() && parts[2].unknown_hosts.is_empty());
        assert_eq!(parts[2].policies[499].id, "p2499");
    }

    #[test]
    fn parts_stay_under_the_byte_bound_and_a_huge_policy_is_a_part_alone() {
        let update = api::PolicyUpdate {
            policies: vec![
                resource(0, MAX_UPDATE_BYTES / 2),
                resource(1, MAX_UPDATE_BYTES / 2),
                resource(2, 1),
                resource(3, MAX_UPDATE_BYTES + 1),
                resource(4, 1),
            ],
            ..Default::default()
        };
        let ids: Vec<Vec<String>> = parts(update)
            .iter()
            .map(|p| p.policies.iter().map(|r| r.id.clone()).collect())
            .collect();
        assert_eq!(ids, [vec!["p0", "p1"], vec!["p2"], vec!["p3"], vec!["p4"]]);
        // Small enough: one part, nothing more.
        let small = parts(api::PolicyUpdate {
            policies: vec![resource(0, 10)],
            ..Default::default()
        });
        assert_eq!((small.len(), small[0].more), (1, false));
    }
}
