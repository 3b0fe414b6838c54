//! The served policy: the current snapshot, the last [`HISTORY`] versions, the last
//! refused change, and which proxy runs which version.
//!
//! One `Store` owns all of it behind a mutex (every write goes through its methods,
//! so there is a single writer); new snapshots fan out to every subscriber through
//! a `watch` channel, which always holds the latest: a slow proxy skips intermediate
//! versions instead of queueing them.
//!
//! Invariants: versions only grow; unchanged content never makes a new version; a
//! refused change never replaces the served snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_policy::PolicySet;
use tokio::sync::watch;

use crate::api;
use crate::auth::Identity;

/// Versions kept in memory for `history` and `rollback`.
pub const HISTORY: usize = 20;
/// Most proxies tracked in status (disconnected ones are forgotten first).
pub const MAX_TRACKED_PROXIES: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    pub content_hash: String,
    pub yaml: String,
    pub source: String,
    pub accepted_at_ms: u64,
    pub policies: usize,
    pub rollback: bool,
}

impl Snapshot {
    pub fn to_api(&self, nonce: String) -> api::Snapshot {
        api::Snapshot {
            version: self.version,
            content_hash: self.content_hash.clone(),
            policies_yaml: self.yaml.clone(),
            nonce,
            source: self.source.clone(),
            accepted_at_ms: self.accepted_at_ms,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ProxyState {
    pub labels: BTreeMap<String, String>,
    pub namespace: String,
    /// Known from its token (TokenReview); empty otherwise.
    pub service_account: String,
    pub pod: String,
    /// How the proxy was recognised: loopback, static-token or token-review.
    pub authenticated_by: String,
    pub acked_version: u64,
    pub last_nack_error: String,
    pub last_nack_version: u64,
    pub connected_since_ms: u64,
    pub connected: bool,
    /// Streams currently open for this node id (a reconnect may overlap the old one).
    streams: u32,
    /// EndpointDiscovery: the version of each Service's set the proxy last ACKed
    /// (only Services it still wants: at most
    /// [`crate::endpoints::MAX_SERVICES_PER_SUBSCRIPTION`]).
    pub endpoint_versions: BTreeMap<String, u64>,
    pub last_endpoints_nack_error: String,
    /// What the NACKed update carried: `namespace/name@version` for a set,
    /// `namespace/name removed` for a removal.
    pub last_endpoints_nack: Vec<String>,
}

#[derive(Default)]
struct State {
    current: Option<Arc<Snapshot>>,
    history: VecDeque<Arc<Snapshot>>,
    /// The hash of what the source last offered (a rollback serves something else).
    source_hash: Option<String>,
    rejected: Vec<String>,
    proxies: BTreeMap<String, ProxyState>,
}

/// What happened to an offered change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    Accepted(u64),
    Unchanged,
    Rejected,
}

pub struct Store {
    state: Mutex<State>,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The same content hash the proxy reports as its policy version.
pub use sluice_policy::hash::content_hash;

impl Default for Store {
    fn default() -> Self {
        Store {
            state: Mutex::default(),
            tx: watch::channel(None).0,
        }
    }
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Receives every new snapshot (starting with the current one).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.lock().current.clone()
    }

    fn publish(
        &self,
        state: &mut State,
        yaml: String,
        hash: String,
        source: String,
        policies: usize,
        rollback: bool,
    ) -> u64 {
        let version = state.current.as_ref().map_or(0, |c| c.version) + 1;
        let snapshot = Arc::new(Snapshot {
            version,
            content_hash: hash,
            yaml,
            source,
            accepted_at_ms: now_ms(),
            policies,
            rollback,
        });
        state.history.push_back(Arc::clone(&snapshot));
        while state.history.len() > HISTORY {
            state.history.pop_front();
        }
        state.current = Some(Arc::clone(&snapshot));
        state.rejected.clear();
        self.tx.send_replace(Some(snapshot));
        version
    }

    /// A source's latest content: validated `set`, or its errors.
    pub fn offer(&self, result: Result<PolicySet, Vec<String>>, source: &str) -> Offer {
        let mut state = self.lock();
        match result {
            Err(errors) => {
                state.rejected = errors;
                Offer::Rejected
            }
            Ok(set) => {
                let yaml = sluice_policy::to_yaml(&set);
                let hash = content_hash(&yaml);
                let unchanged_source = state.source_hash.as_deref() == Some(hash.as_str());
                let serving_it = state
                    .current
                    .as_ref()
                    .is_some_and(|c| c.content_hash == hash);
                state.source_hash = Some(hash.clone());
                if unchanged_source || serving_it {
                    // Nothing new: a refused edit that was reverted is no longer
                    // refused, and a rollback stays in force until the source changes.
                    state.rejected.clear();
                    return Offer::Unchanged;
                }
                let version = self.publish(
                    &mut state,
                    yaml,
                    hash,
                    source.to_owned(),
                    set.policies.len(),
                    false,
                );
                Offer::Accepted(version)
            }
        }
    }

    /// Serves version `to` (0: the one before the current) again, as a new version
    /// marked as a rollback until the source changes.
    pub fn rollback(&self, to: u64) -> Result<Arc<Snapshot>, String> {
        let mut state = self.lock();
        let current = state.current.clone().ok_or("nothing is served yet")?;
        let target = if to == 0 {
            state
                .history
                .iter()
                .rev()
                .find(|s| s.content_hash != current.content_hash)
                .cloned()
                .ok_or("no earlier version with different content is kept")?
        } else {
            state
                .history
                .iter()
                .find(|s| s.version == to)
                .cloned()
                .ok_or_else(|| format!("version {to} is not in the last {HISTORY} versions"))?
        };
        if target.content_hash == current.content_hash {
            return Err(format!(
                "version {} has the content already served",
                target.version
            ));
        }
        let source = format!("rollback to version {}", target.version);
        self.publish(
            &mut state,
            target.yaml.clone(),
            target.content_hash.clone(),
            source,
            target.policies,
            true,
        );
        state
            .current
            .clone()
            .ok_or_else(|| "rollback lost".to_owned())
    }

    pub fn history(&self) -> Vec<Arc<Snapshot>> {
        self.lock().history.iter().cloned().collect()
    }

    pub fn rejected(&self) -> Vec<String> {
        self.lock().rejected.clone()
    }

    /// A proxy opened a stream: whether it was not connected before (a reconnect
    /// may overlap its old stream), for the count of connected proxies.
    pub fn connected(
        &self,
        node: &str,
        labels: BTreeMap<String, String>,
        namespace: String,
        version: u64,
        identity: &Identity,
    ) -> bool {
        let mut state = self.lock();
        if state.proxies.len() >= MAX_TRACKED_PROXIES && !state.proxies.contains_key(node) {
            let gone = state
                .proxies
                .iter()
                .find(|(_, p)| !p.connected)
                .map(|(k, _)| k.clone());
            match gone {
                Some(k) => {
                    state.proxies.remove(&k);
                }
                None => return false,
            }
        }
        let proxy = state.proxies.entry(node.to_owned()).or_default();
        proxy.labels = labels;
        // What the token says wins over what the proxy says.
        proxy.namespace = if identity.namespace.is_empty() {
            namespace
        } else {
            identity.namespace.clone()
        };
        proxy.service_account = identity.service_account.clone();
        proxy.pod = identity.pod.clone().unwrap_or_default();
        proxy.authenticated_by = identity.via.as_str().to_owned();
        proxy.acked_version = version;
        let newly = proxy.streams == 0;
        if newly {
            proxy.connected_since_ms = now_ms();
        }
        proxy.streams += 1;
        proxy.connected = true;
        newly
    }

    /// A proxy's stream ended: whether that was its last one.
    pub fn disconnected(&self, node: &str) -> bool {
        match self.lock().proxies.get_mut(node) {
            Some(p) if p.streams > 0 => {
                p.streams -= 1;
                p.connected = p.streams > 0;
                !p.connected
            }
            _ => false,
        }
    }

    pub fn acked(&self, node: &str, version: u64) {
        if let Some(p) = self.lock().proxies.get_mut(node) {
            p.acked_version = version;
        }
    }

    pub fn nacked(&self, node: &str, version: u64, error: String) {
        if let Some(p) = self.lock().proxies.get_mut(node) {
            p.last_nack_version = version;
            p.last_nack_error = error;
        }
    }

    /// The proxy's entry for endpoint state: its policy stream's, or a new one
    /// (a proxy may subscribe to endpoints first), unless the table is full.
    fn endpoint_entry<'a>(state: &'a mut State, node: &str) -> Option<&'a mut ProxyState> {
        if state.proxies.len() >= MAX_TRACKED_PROXIES && !state.proxies.contains_key(node) {
            return None;
        }
        Some(state.proxies.entry(node.to_owned()).or_default())
    }

    /// The proxy (re)subscribed to `wanted`: ACKed versions of other Services go.
    pub fn endpoints_wanted(&self, node: &str, wanted: &std::collections::BTreeSet<String>) {
        let mut state = self.lock();
        if let Some(p) = Self::endpoint_entry(&mut state, node) {
            p.endpoint_versions
                .retain(|service, _| wanted.contains(service));
        }
    }

    /// The proxy applied an endpoints update: these sets, and these Services gone.
    pub fn endpoints_acked(&self, node: &str, sets: &[(String, u64)], removed: &[String]) {
        let mut state = self.lock();
        if let Some(p) = Self::endpoint_entry(&mut state, node) {
            for (service, version) in sets {
                p.endpoint_versions.insert(service.clone(), *version);
            }
            for service in removed {
                p.endpoint_versions.remove(service);
            }
        }
    }

    /// The proxy refused an endpoints update carrying `sets` and `removed`.
    pub fn endpoints_nacked(
        &self,
        node: &str,
        sets: &[(String, u64)],
        removed: &[String],
        error: String,
    ) {
        let mut state = self.lock();
        if let Some(p) = Self::endpoint_entry(&mut state, node) {
            p.last_endpoints_nack_error = error;
            p.last_endpoints_nack = sets
                .iter()
                .map(|(s, v)| format!("{s}@{v}"))
                .chain(removed.iter().map(|s| format!("{s} removed")))
                .collect();
        }
    }

    pub fn status(&self) -> api::StatusResponse {
        let state = self.lock();
        let current = state.current.as_deref();
        api::StatusResponse {
            served_version: current.map_or(0, |c| c.version),
            served_source: current.map(|c| c.source.clone()).unwrap_or_default(),
            content_hash: current.map(|c| c.content_hash.clone()).unwrap_or_default(),
            rollback: current.is_some_and(|c| c.rollback),
            rejected_errors: state.rejected.clone(),
            proxies: state
                .proxies
                .iter()
                .map(|(id, p)| api::ProxyStatus {
                    node_id: id.clone(),
                    labels: p
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    namespace: p.namespace.clone(),
                    acked_version: p.acked_version,
                    last_nack_error: p.last_nack_error.clone(),
                    last_nack_version: p.last_nack_version,
                    connected_since_ms: p.connected_since_ms,
                    connected: p.connected,
                    service_account: p.service_account.clone(),
                    pod: p.pod.clone(),
                    authenticated_by: p.authenticated_by.clone(),
                    endpoint_versions: p
                        .endpoint_versions
                        .iter()
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                    last_endpoints_nack_error: p.last_endpoints_nack_error.clone(),
                    last_endpoints_nack: p.last_endpoints_nack.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn set(host: &str) -> PolicySet {
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shop}}\nspec: {{hosts: [{host}]}}\n"
        );
        sluice_policy::parse_str(Path::new("t.yaml"), &yaml).unwrap_or_default()
    }

    #[test]
    fn versions_grow_and_unchanged_content_makes_no_version() {
        let store = Store::default();
        assert_eq!(store.offer(Ok(set("a")), "dir"), Offer::Accepted(1));
        assert_eq!(store.offer(Ok(set("a")), "dir"), Offer::Unchanged);
        assert_eq!(store.offer(Ok(set("b")), "dir"), Offer::Accepted(2));
        assert_eq!(store.current().map(|c| c.version), Some(2));
    }

    #[test]
    fn a_rejected_change_keeps_the_served_version_and_is_reported() {
        let store = Store::default();
        store.offer(Ok(set("a")), "dir");
        assert_eq!(
            store.offer(Err(vec!["x.yaml:1:1: bad".into()]), "dir"),
            Offer::Rejected
        );
        assert_eq!(store.current().map(|c| c.version), Some(1));
        assert_eq!(
            store.status().rejected_errors,
            vec!["x.yaml:1:1: bad".to_owned()]
        );
        store.offer(Ok(set("b")), "dir");
        assert!(store.status().rejected_errors.is_empty());
    }

    #[test]
    fn keeps_the_last_twenty_versions() {
        let store = Store::default();
        for i in 0..30 {
            store.offer(Ok(set(&format!("h{i}"))), "dir");
        }
        let history = store.history();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history.first().map(|s| s.version), Some(11));
    }

    #[test]
    fn rollback_serves_an_earlier_version_as_a_new_one_until_the_source_changes() {
        let store = Store::default();
        store.offer(Ok(set("a")), "dir");
        store.offer(Ok(set("b")), "dir");
        let rolled = store.rollback(0).expect("rollback");
        assert_eq!((rolled.version, rolled.rollback), (3, true));
        assert_eq!(rolled.content_hash, store.history()[0].content_hash);
        assert!(store.status().rollback);
        // The source offering the same content again does not undo the rollback...
        assert_eq!(store.offer(Ok(set("b")), "dir"), Offer::Unchanged);
        // ...a new change does.
        assert_eq!(store.offer(Ok(set("c")), "dir"), Offer::Accepted(4));
        assert!(!store.status().rollback);
        assert!(store.rollback(99).is_err());
    }
}
