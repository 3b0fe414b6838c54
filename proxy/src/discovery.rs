//! The Services' endpoints from the control plane: one gRPC stream
//! (`EndpointDiscovery.StreamEndpoints`) beside the policy stream, to the same
//! control plane with the same TLS and token ([`ControlPlaneSource::connect`]).
//!
//! It subscribes with the Services (`namespace/name`) that the live snapshot's
//! `service:` backends reference (the policies' and their routes' own), and
//! resubscribes when a reload changes that list (checked every
//! [`RESUBSCRIBE_EVERY`]). Each update is checked whole: a malformed one is NACKed
//! with the reason and changes nothing; a good one replaces the sets it names in
//! `Shared::services`, is ACKed by its nonce, and is swapped into the live
//! snapshot's endpoints at once by the same path as DNS answers
//! ([`crate::shared::apply_resolved`]: a compare-and-swap of a copy in which only the
//! changed sets are rebuilt, remaining endpoints keeping their state). The resolver
//! job repeats that comparison every second, so an update whose swap lost a race
//! with a reload still lands.
//!
//! When the stream breaks the proxy reconnects with jittered backoff, and the sets
//! stay: endpoints are only ever changed by an update, never by an outage (as with
//! DNS, the last good set keeps serving). See `services` for what a set means to a
//! backend, and for the precedence of pushed sets over DNS.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::control_plane::{api, ControlPlaneSource, MAX_BACKOFF, MAX_MESSAGE_BYTES, MIN_BACKOFF};
use crate::resolve::Names;
use crate::runtime::Runtime;
use crate::services::{service_key, PodEndpoint, ServiceSet};
use crate::shared::{apply_resolved, Shared};

/// How often the stream compares the live snapshot's Services with its
/// subscription (a reload may have added or removed a `service:` backend).
pub const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(1);

/// The Services (`namespace/name`) the `service:` backends of `runtime` reference,
/// its policies' and their routes' own.
pub fn subscribed(runtime: &Runtime) -> BTreeSet<String> {
    runtime
        .policies
        .iter()
        .flat_map(|p| p.all_endpoints())
        .flat_map(|e| {
            let namespace = e.rule().namespace.as_deref();
            e.rule()
                .backends
                .iter()
                .filter_map(move |b| Some(service_key(b.service.as_ref()?, namespace)))
        })
        .collect()
}

/// A pushed update as the sets it replaces and the Services it removes; `Err` with
/// a user-facing reason when any part of it is malformed.
pub type Parsed = (Vec<(String, ServiceSet)>, Vec<String>);

fn check_key(key: &str) -> Result<(), String> {
    match key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(()),
        _ => Err(format!("service {key:?} is not \"namespace/name\"")),
    }
}

fn port(value: u32, field: &str, service: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("service {service:?}: {field} {value} is not a port (1..=65535)"))
}

fn endpoint(service: &str, e: &api::Endpoint) -> Result<PodEndpoint, String> {
    let ip: IpAddr =
        e.ip.parse()
            .map_err(|_| format!("service {service:?}: {:?} is not an IP address", e.ip))?;
    Ok(PodEndpoint {
        ip,
        service_port: port(e.service_port, "servicePort", service)?,
        service_port_name: e.service_port_name.clone(),
        target_port: port(e.target_port, "targetPort", service)?,
        ready: e.ready,
        serving: e.serving,
        terminating: e.terminating,
        pod: e.pod.clone(),
        zone: e.zone.clone(),
        identity: match e.identity.as_str() {
            "" => None,
            id => Some(
                crate::identity::PeerIdentity::parse(id)
                    .map_err(|bad| format!("service {service:?}: {bad}"))?
                    .id,
            ),
        },
    })
}

/// Checks an update whole (see [`Parsed`]).
pub fn parse_update(update: &api::EndpointsUpdate) -> Result<Parsed, String> {
    let mut sets = Vec::with_capacity(update.sets.len());
    for set in &update.sets {
        check_key(&set.service)?;
        let endpoints = set
            .endpoints
            .iter()
            .map(|e| endpoint(&set.service, e))
            .collect::<Result<Vec<_>, _>>()?;
        sets.push((
            set.service.clone(),
            ServiceSet {
                version: set.version,
                endpoints,
            },
        ));
    }
    for key in &update.removed {
        check_key(key)?;
    }
    Ok((sets, update.removed.clone()))
}

/// Applies one update (stores its sets, swaps them into the live snapshot); returns
/// the error text of its NACK, empty for an ACK.
pub fn take_update(shared: &Shared, update: &api::EndpointsUpdate) -> String {
    match parse_update(update) {
        Err(reason) => {
            tracing::warn!(
                nonce = update.nonce.as_str(),
                reason = reason.as_str(),
                "endpoint update refused; keeping the previous sets"
            );
            shared
                .metrics
                .endpoint_updates
                .with_label_values(&["nack"])
                .inc();
            reason
        }
        Ok((sets, removed)) => {
            for (service, set) in &sets {
                let ready = set.endpoints.iter().filter(|e| e.ready).count();
                tracing::info!(
                    service = service.as_str(),
                    version = set.version,
                    endpoints = set.endpoints.len(),
                    ready,
                    "service endpoints changed"
                );
            }
            let next = shared.services.load().updated(sets, &removed);
            shared.services.store(Arc::new(next));
            // No DNS answers here: named backends keep their addresses, Service
            // backends take the new sets.
            apply_resolved(shared, &Names::default(), Instant::now());
            shared
                .metrics
                .endpoint_updates
                .with_label_values(&["ack"])
                .inc();
            String::new()
        }
    }
}

/// Follows `EndpointDiscovery.StreamEndpoints` of the control plane `source` names.
pub struct FollowEndpoints {
    pub source: ControlPlaneSource,
}

impl FollowEndpoints {
    /// Subscribes to `wanted`, dropping the sets of Services no longer wanted.
    fn subscription(&self, wanted: &BTreeSet<String>) -> api::EndpointsRequest {
        let shared = &self.source.shared;
        let kept = shared.services.load().retained(wanted);
        shared.services.store(Arc::new(kept));
        api::EndpointsRequest {
            node_id: self.source.node_id.clone(),
            services: wanted.iter().cloned().collect(),
            resubscribe: true,
            response_nonce: String::new(),
            error: String::new(),
        }
    }

    /// One stream until it breaks; Ok(true) if at least one update arrived.
    async fn session(&self) -> anyhow::Result<bool> {
        let shared = &self.source.shared;
        let (channel, bearer) = self.source.connect().await?;
        let mut client = api::endpoint_discovery_client::EndpointDiscoveryClient::with_interceptor(
            channel, bearer,
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut wanted = subscribed(&shared.runtime.load());
        tx.send(self.subscription(&wanted)).await?;
        let mut updates = client
            .stream_endpoints(ReceiverStream::new(rx))
            .await?
            .into_inner();
        shared.metrics.endpoints_stream_connected.set(1);
        tracing::info!(
            url = self.source.url.as_str(),
            services = wanted.len(),
            "endpoints stream connected"
        );
        let mut received = false;
        let mut tick = tokio::time::interval(RESUBSCRIBE_EVERY);
        // Ends with the stream (closed or broken); each turn handles one update or
        // one subscription check.
        loop {
            tokio::select! {
                update = updates.message() => {
                    let Some(update) = update? else {
                        return Ok(received);
                    };
                    received = true;
                    let error = take_update(shared, &update);
                    tx.send(api::EndpointsRequest {
                        node_id: self.source.node_id.clone(),
                        services: Vec::new(),
                        resubscribe: false,
                        response_nonce: update.nonce,
                        error,
                    })
                    .await?;
                }
                _ = tick.tick() => {
                    let now_wanted = subscribed(&shared.runtime.load());
                    if now_wanted != wanted {
                        wanted = now_wanted;
                        tracing::info!(services = wanted.len(), "endpoints resubscribed");
                        tx.send(self.subscription(&wanted)).await?;
                    }
                }
            }
        }
    }

    /// Follows the stream until shutdown, reconnecting with backoff.
    pub async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        let mut told_unimplemented = false;
        // Ends on shutdown; each iteration is one connection attempt.
        loop {
            let outcome = tokio::select! {
                _ = shutdown.changed() => return,
                outcome = self.session() => outcome,
            };
            self.source.shared.metrics.endpoints_stream_connected.set(0);
            let unimplemented = outcome
                .as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<tonic::Status>())
                .is_some_and(|s| s.code() == tonic::Code::Unimplemented);
            match outcome {
                Ok(true) => backoff.reset(),
                Ok(false) => {}
                // A control plane older than the endpoint stream: said once, not at
                // every retry (it may be upgraded, so the proxy keeps asking).
                Err(_) if unimplemented => {
                    if !std::mem::replace(&mut told_unimplemented, true) {
                        tracing::info!(
                            url = self.source.url.as_str(),
                            "the control plane serves no endpoint stream; Service backends use DNS"
                        );
                    }
                }
                Err(e) => tracing::warn!(
                    url = self.source.url.as_str(),
                    error = format!("{e:#}"),
                    retry_in_ms = backoff.step().as_millis() as u64,
                    "endpoints stream broken; serving the last endpoint sets"
                ),
            }
            let wait = backoff.next_wait();
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[async_trait]
impl BackgroundService for FollowEndpoints {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await;
    }
}

#[cfg(test)]
mod tests;
