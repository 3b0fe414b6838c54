//! The gRPC API (`PolicyDiscovery`): proxies subscribe and get every accepted
//! snapshot, answering each with an ACK or a NACK; the operator's calls (status,
//! history, current, rollback) read and roll back the [`Store`].
//!
//! Callers are checked in each call, not by an interceptor: a TokenReview is a
//! request to the Kubernetes API, and tonic's interceptors cannot wait. A proxy's
//! ServiceAccount token only subscribes, and only as its own pod and namespace.
//!
//! Invariants: a subscriber gets the current snapshot at once, then only the latest
//! one (a slow proxy skips intermediate versions); every stream ends on shutdown.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::policy_discovery_server::PolicyDiscovery;
use crate::api::{self, DiscoveryRequest};
use crate::auth::{Authenticator, Identity, Via};
use crate::metrics::Metrics;
use crate::serve::MAX_NODE_ID;
use crate::store::Store;

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
}

impl Discovery {
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

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<api::Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyDiscovery for Discovery {
    type StreamPoliciesStream = SnapshotStream;

    async fn stream_policies(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let (identity, mut inbound, first) =
            subscribe(&self.auth, request, |m: &DiscoveryRequest| &m.node_id).await?;
        let node = first.node_id.clone();
        matches_identity(&identity, &node, &first.namespace)?;
        let labels: BTreeMap<String, String> = first.labels.into_iter().collect();
        if self
            .store
            .connected(&node, labels, first.namespace, first.version, &identity)
        {
            self.metrics.proxies_connected.inc();
        }
        tracing::info!(
            node = node.as_str(),
            version = first.version,
            namespace = identity.namespace.as_str(),
            service_account = identity.service_account.as_str(),
            authenticated_by = identity.via.as_str(),
            "proxy connected"
        );

        // A few snapshots in flight are plenty: the watch always holds the latest.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let store = Arc::clone(&self.store);
        let mut snapshots = store.subscribe();
        let base = self.nonce.fetch_add(1 << 20, Ordering::Relaxed);
        let mut stopping = self.stopping.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut sent: u64 = 0;
            let mut outstanding: Vec<(String, u64)> = Vec::new();
            let mut next = snapshots.borrow_and_update().clone();
            // Ends when the proxy hangs up or the server shuts down.
            loop {
                if let Some(snapshot) = next.take() {
                    sent += 1;
                    let nonce = format!("{:x}", base + sent);
                    outstanding.push((nonce.clone(), snapshot.version));
                    if outstanding.len() > 8 {
                        outstanding.remove(0);
                    }
                    if tx.send(Ok(snapshot.to_api(nonce))).await.is_err() {
                        break;
                    }
                    metrics.pushes.inc();
                }
                tokio::select! {
                    _ = stopping.wait_for(|s| *s) => break,
                    changed = snapshots.changed() => match changed {
                        Ok(()) => next = snapshots.borrow_and_update().clone(),
                        Err(_) => break,
                    },
                    message = inbound.message() => match message {
                        Ok(Some(reply)) => {
                            let version = outstanding
                                .iter()
                                .find(|(n, _)| *n == reply.response_nonce)
                                .map_or(reply.version, |(_, v)| *v);
                            if reply.error.is_empty() {
                                metrics.acks.inc();
                                store.acked(&node, reply.version);
                            } else {
                                metrics.nacks.inc();
                                tracing::warn!(
                                    node = node.as_str(),
                                    version,
                                    error = reply.error.as_str(),
                                    "proxy refused a snapshot"
                                );
                                store.nacked(&node, version, reply.error);
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
        Ok(Response::new(current.to_api(String::new())))
    }

    async fn get_history(
        &self,
        request: Request<api::HistoryRequest>,
    ) -> Result<Response<api::HistoryResponse>, Status> {
        self.operator(request.metadata()).await?;
        let entries = self
            .store
            .history()
            .iter()
            .map(|s| api::HistoryEntry {
                version: s.version,
                content_hash: s.content_hash.clone(),
                source: s.source.clone(),
                accepted_at_ms: s.accepted_at_ms,
                policies: s.policies as u32,
            })
            .collect();
        Ok(Response::new(api::HistoryResponse { entries }))
    }

    async fn rollback(
        &self,
        request: Request<api::RollbackRequest>,
    ) -> Result<Response<api::RollbackResponse>, Status> {
        self.operator(request.metadata()).await?;
        let to = request.into_inner().to_version;
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
            served: Some(served.to_api(String::new())),
        }))
    }
}
