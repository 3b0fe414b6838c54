//! The served policy, one resource per TrafficPolicy: what the source says of each
//! policy, each one's last good version, the served set that follows from them
//! ([`resolve`]), every policy's condition, the last [`HISTORY`] served sets, and
//! which proxy holds which version of what.
//!
//! One `Store` owns all of it behind a mutex (every write goes through its methods,
//! so there is a single writer). Each change of the served set is published as a
//! new [`Served`] through a `watch` channel, which always holds the latest: every
//! proxy's stream diffs it against what that proxy holds and sends only the
//! policies it wants that changed.
//!
//! Invariants: a policy's version is the content hash of its canonical YAML (the
//! same on every replica); an invalid policy never replaces its last good version
//! and blocks no other policy; unchanged content makes no new served set.

pub mod resolve;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_policy::{PolicyId, TrafficPolicy};
use tokio::sync::watch;

use crate::api;
use crate::auth::Identity;
pub use resolve::{Condition, Entry};

/// Served sets kept in memory for `history` and `rollback`.
pub const HISTORY: usize = 20;
/// Most proxies tracked in status (disconnected ones are forgotten first).
pub const MAX_TRACKED_PROXIES: usize = 100_000;
/// Most errors of documents without an identity kept for status.
pub const MAX_UNIDENTIFIED_ERRORS: usize = 100;

/// One policy as served: canonical YAML, versioned by its content hash.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyResource {
    pub id: PolicyId,
    /// Content hash of `yaml`: the same on every replica.
    pub version: String,
    /// The policy alone, as one canonical YAML document.
    pub yaml: String,
    pub hosts: Vec<String>,
    /// Kubernetes' `metadata.generation` of the resource; 0 for files.
    pub generation: i64,
    pub policy: TrafficPolicy,
}

impl PolicyResource {
    pub fn new(policy: TrafficPolicy, generation: i64) -> PolicyResource {
        let (yaml, version) = sluice_policy::policy_yaml(&policy);
        PolicyResource {
            id: policy.id(),
            version,
            hosts: policy.hosts.clone(),
            yaml,
            generation,
            policy,
        }
    }

    pub fn to_api(&self) -> api::PolicyResource {
        api::PolicyResource {
            id: self.id.to_string(),
            version: self.version.clone(),
            yaml: self.yaml.clone(),
            hosts: self.hosts.clone(),
        }
    }
}

/// What a source offers for one policy document.
#[derive(Debug, Clone)]
pub struct Offered {
    /// `None` for a text without any identity (not YAML, no `metadata.name`): its
    /// errors are reported, and the policies its file held keep their last good
    /// versions.
    pub id: Option<PolicyId>,
    /// Where it was read (a file, `kubernetes:namespace/name`).
    pub file: String,
    pub generation: i64,
    /// `creationTimestamp` (RFC 3339) for resources, empty for files.
    pub created: String,
    /// The policy with its warnings, or its errors (file:line:column).
    pub outcome: Result<(TrafficPolicy, Vec<String>), Vec<String>>,
    /// The last version that validated as the source itself keeps it (a
    /// TrafficPolicy's `status.accepted`), with its generation: served while the
    /// spec is invalid when this replica has no last good version of its own.
    pub seed: Option<(TrafficPolicy, i64)>,
}

impl Offered {
    /// Every document of a checked source, as files are offered (no generation).
    pub fn documents(documents: Vec<sluice_policy::Document>) -> Vec<Offered> {
        documents
            .into_iter()
            .map(|d| Offered {
                id: d.id,
                file: d.file.display().to_string(),
                generation: 0,
                created: String::new(),
                outcome: match d.outcome {
                    Ok((policy, warnings)) => {
                        Ok((policy, warnings.iter().map(ToString::to_string).collect()))
                    }
                    Err(errors) => Err(errors.iter().map(ToString::to_string).collect()),
                },
                seed: None,
            })
            .collect()
    }
}

/// The served set at one moment: what every proxy stream diffs against.
#[derive(Debug, Default)]
pub struct Served {
    /// Grows with every change (local to this replica: streams only compare it).
    pub revision: u64,
    pub policies: BTreeMap<PolicyId, Arc<PolicyResource>>,
    /// Host -> the policy that owns it.
    pub hosts: HashMap<String, PolicyId>,
}

impl Served {
    fn new(revision: u64, policies: BTreeMap<PolicyId, Arc<PolicyResource>>) -> Served {
        let hosts = policies
            .iter()
            .flat_map(|(id, p)| p.hosts.iter().map(move |h| (h.clone(), id.clone())))
            .collect();
        Served {
            revision,
            policies,
            hosts,
        }
    }

    /// Content hash over every served policy's identity and version: equal sets
    /// have equal hashes on every replica.
    pub fn content_hash(&self) -> String {
        let mut lines = String::new();
        for (id, p) in &self.policies {
            lines.push_str(&format!("{id} {}\n", p.version));
        }
        content_hash(&lines)
    }
}

/// One served set, as history keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// This replica's count of served sets (for `history` and `rollback --to`).
    pub version: u64,
    pub content_hash: String,
    pub source: String,
    pub accepted_at_ms: u64,
    pub policies: BTreeMap<PolicyId, Arc<PolicyResource>>,
    pub rollback: bool,
}

impl Snapshot {
    /// Every served policy as one multi-document YAML (for `diff`; never pushed to
    /// proxies, which get each policy on its own).
    pub fn yaml(&self) -> String {
        self.policies.values().map(|p| p.yaml.as_str()).collect()
    }

    pub fn to_api(&self) -> api::Snapshot {
        api::Snapshot {
            version: self.version,
            content_hash: self.content_hash.clone(),
            policies_yaml: self.yaml(),
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
    /// The version of each policy the proxy holds (ACKed), by identity.
    pub policy_versions: BTreeMap<String, String>,
    /// The last refused policy update: why, and `namespace/name@version` of each
    /// refused policy.
    pub last_nack_error: String,
    pub last_nack: Vec<String>,
    /// Its subscription: everything, or these many hosts and policies.
    pub all_policies: bool,
    pub hosts_wanted: u32,
    pub policies_wanted: u32,
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
    /// What the source says of each policy now.
    entries: BTreeMap<PolicyId, Entry>,
    /// Each policy's latest valid version (served while the source's is invalid).
    last_good: BTreeMap<PolicyId, Arc<PolicyResource>>,
    /// Errors of documents without an identity (a file that is not YAML).
    unidentified: Vec<String>,
    /// Where each policy was last read from.
    origins: BTreeMap<PolicyId, String>,
    conditions: BTreeMap<PolicyId, Condition>,
    /// The conditions the last change made new (for its log lines).
    changed: Vec<(PolicyId, Condition)>,
    current: Option<Arc<Snapshot>>,
    history: VecDeque<Arc<Snapshot>>,
    /// A hash of the source's word on every policy: a rollback holds until it changes.
    source_hash: Option<String>,
    proxies: BTreeMap<String, ProxyState>,
}

/// What happened to an offered change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// The served set changed: its new version number (some documents may have
    /// been refused all the same; see [`Store::rejected`]).
    Accepted(u64),
    Unchanged,
    /// Nothing served changed, and some offered documents were refused.
    Rejected,
}

pub struct Store {
    state: Mutex<State>,
    tx: watch::Sender<Arc<Served>>,
    /// Policies whose condition changed, for the status writer.
    conditions_tx: watch::Sender<u64>,
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
            tx: watch::channel(Arc::new(Served::default())).0,
            conditions_tx: watch::channel(0).0,
        }
    }
}

/// The hash of a source's word on every policy (versions and errors).
fn source_hash(entries: &BTreeMap<PolicyId, Entry>, unidentified: &[String]) -> String {
    let mut text = String::new();
    for (id, e) in entries {
        match &e.candidate {
            Ok(p) => text.push_str(&format!("{id} {}\n", p.version)),
            Err(errors) => text.push_str(&format!("{id} ! {}\n", errors.join(" "))),
        }
    }
    for e in unidentified {
        text.push_str(&format!("! {e}\n"));
    }
    content_hash(&text)
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Receives every new served set (starting with the current one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Served>> {
        self.tx.subscribe()
    }

    /// Ticks whenever a policy's condition changes (see [`Store::conditions`]).
    pub fn watch_conditions(&self) -> watch::Receiver<u64> {
        self.conditions_tx.subscribe()
    }

    /// The served set now.
    pub fn served(&self) -> Arc<Served> {
        self.tx.borrow().clone()
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.lock().current.clone()
    }

    /// Every policy's condition.
    pub fn conditions(&self) -> BTreeMap<PolicyId, Condition> {
        self.lock().conditions.clone()
    }

    /// Errors of documents without an identity (a file that is not YAML).
    pub fn unidentified(&self) -> Vec<String> {
        self.lock().unidentified.clone()
    }

    /// The conditions the last offered change made new.
    pub fn changed_conditions(&self) -> Vec<(PolicyId, Condition)> {
        self.lock().changed.clone()
    }

    fn publish(
        &self,
        state: &mut State,
        policies: BTreeMap<PolicyId, Arc<PolicyResource>>,
        source: String,
        rollback: bool,
    ) -> u64 {
        let version = state.current.as_ref().map_or(0, |c| c.version) + 1;
        let served = Served::new(version, policies);
        let snapshot = Arc::new(Snapshot {
            version,
            content_hash: served.content_hash(),
            source,
            accepted_at_ms: now_ms(),
            policies: served.policies.clone(),
            rollback,
        });
        state.history.push_back(Arc::clone(&snapshot));
        while state.history.len() > HISTORY {
            state.history.pop_front();
        }
        state.current = Some(snapshot);
        self.tx.send_replace(Arc::new(served));
        version
    }

    /// Replaces what `source` says of every policy (a directory read again, or a
    /// full list of the custom resources): policies it no longer names are gone.
    pub fn replace(&self, offered: Vec<Offered>, source: &str) -> Offer {
        let mut state = self.lock();
        let mut next = BTreeMap::new();
        let mut unidentified = Vec::new();
        let mut refused = false;
        // Files with a document that names no policy: what they held before is
        // kept (invalid, serving its last good version), not deleted.
        let mut unreadable: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in offered {
            refused |= o.outcome.is_err();
            if o.id.is_none() {
                if let Err(errors) = &o.outcome {
                    unreadable
                        .entry(o.file.clone())
                        .or_default()
                        .extend(errors.iter().cloned());
                }
            }
            if let Some(id) = &o.id {
                state.origins.insert(id.clone(), o.file.clone());
            }
            take(&mut next, &mut unidentified, o);
        }
        for (id, file) in &state.origins {
            let Some(errors) = unreadable.get(file) else {
                continue;
            };
            if next.contains_key(id) {
                continue;
            }
            if let Some(old) = state.entries.get(id) {
                next.insert(
                    id.clone(),
                    Entry {
                        candidate: Err(errors.clone()),
                        warnings: Vec::new(),
                        seed: None,
                        ..old.clone()
                    },
                );
            }
        }
        let kept: std::collections::BTreeSet<&PolicyId> = next.keys().collect();
        let origins = std::mem::take(&mut state.origins);
        state.origins = origins
            .into_iter()
            .filter(|(id, _)| kept.contains(id))
            .collect();
        state.entries = next;
        state.unidentified = unidentified;
        self.settle(&mut state, source, refused)
    }

    /// Changes what the source says of some policies only (a resource added,
    /// changed or deleted), leaving the others as they are.
    pub fn update(&self, offered: Vec<Offered>, removed: &[PolicyId], source: &str) -> Offer {
        let mut state = self.lock();
        let mut refused = false;
        for id in removed {
            state.entries.remove(id);
            state.origins.remove(id);
        }
        for o in &offered {
            if let Some(id) = &o.id {
                state.origins.insert(id.clone(), o.file.clone());
            }
        }
        let State {
            entries,
            unidentified,
            ..
        } = &mut *state;
        for o in offered {
            refused |= o.outcome.is_err();
            take(entries, unidentified, o);
        }
        unidentified.truncate(MAX_UNIDENTIFIED_ERRORS);
        self.settle(&mut state, source, refused)
    }

    /// After the entries changed: last good versions, the served set, conditions.
    fn settle(&self, state: &mut State, source: &str, refused: bool) -> Offer {
        let hash = source_hash(&state.entries, &state.unidentified);
        if state.source_hash.as_deref() == Some(hash.as_str()) {
            // Nothing new: a rollback stays in force until the source changes.
            state.changed.clear();
            return Offer::Unchanged;
        }
        state.source_hash = Some(hash);
        for (id, entry) in &state.entries {
            match (&entry.candidate, &entry.seed) {
                (Ok(resource), _) => {
                    state.last_good.insert(id.clone(), Arc::clone(resource));
                }
                (Err(_), Some(seed)) if !state.last_good.contains_key(id) => {
                    state.last_good.insert(id.clone(), Arc::clone(seed));
                }
                _ => {}
            }
        }
        let State {
            entries, last_good, ..
        } = &mut *state;
        last_good.retain(|id, _| entries.contains_key(id));
        let (served, conditions) = resolve::resolve(&state.entries, &state.last_good);
        state.changed = conditions
            .iter()
            .filter(|(id, c)| state.conditions.get(*id) != Some(*c))
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        if state.conditions != conditions {
            state.conditions = conditions;
            self.conditions_tx.send_modify(|n| *n += 1);
        }
        let same = state
            .current
            .as_ref()
            .is_some_and(|c| c.policies == served && !c.rollback);
        if same {
            return if refused {
                Offer::Rejected
            } else {
                Offer::Unchanged
            };
        }
        Offer::Accepted(self.publish(state, served, source.to_owned(), false))
    }

    /// Serves the set of version `to` (0: the one before the current) again, as a
    /// new version marked as a rollback until the source changes.
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
        self.publish(&mut state, target.policies.clone(), source, true);
        state
            .current
            .clone()
            .ok_or_else(|| "rollback lost".to_owned())
    }

    pub fn history(&self) -> Vec<Arc<Snapshot>> {
        self.lock().history.iter().cloned().collect()
    }

    /// Every refusal now: each invalid or conflicting policy's, and each
    /// unreadable document's.
    pub fn rejected(&self) -> Vec<String> {
        rejected_of(&self.lock())
    }

    /// A proxy opened a stream: whether it was not connected before (a reconnect
    /// may overlap its old stream), for the count of connected proxies.
    pub fn connected(
        &self,
        node: &str,
        labels: BTreeMap<String, String>,
        namespace: String,
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

    /// The proxy holds these policies now (ACKed) and no longer these.
    pub fn policies_acked(&self, node: &str, held: &[(String, String)], removed: &[String]) {
        if let Some(p) = self.lock().proxies.get_mut(node) {
            for (id, version) in held {
                p.policy_versions.insert(id.clone(), version.clone());
            }
            for id in removed {
                p.policy_versions.remove(id);
            }
        }
    }

    /// The proxy refused these policies (`namespace/name@version`), for `why`.
    pub fn policies_nacked(&self, node: &str, refused: Vec<String>, why: String) {
        if let Some(p) = self.lock().proxies.get_mut(node) {
            p.last_nack = refused;
            p.last_nack_error = why;
        }
    }

    /// What the proxy subscribes to now.
    pub fn subscription(&self, node: &str, all: bool, hosts: usize, policies: usize) {
        if let Some(p) = self.lock().proxies.get_mut(node) {
            p.all_policies = all;
            p.hosts_wanted = hosts as u32;
            p.policies_wanted = policies as u32;
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
        let rejected_errors = rejected_of(&state);
        api::StatusResponse {
            policies: current.map_or(0, |c| c.policies.len() as u32),
            served_version: current.map_or(0, |c| c.version),
            served_source: current.map(|c| c.source.clone()).unwrap_or_default(),
            content_hash: current.map(|c| c.content_hash.clone()).unwrap_or_default(),
            rollback: current.is_some_and(|c| c.rollback),
            rejected_errors,
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
                    last_nack_error: p.last_nack_error.clone(),
                    last_nack: p.last_nack.clone(),
                    policy_versions: p
                        .policy_versions
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    all_policies: p.all_policies,
                    hosts_wanted: p.hosts_wanted,
                    policies_wanted: p.policies_wanted,
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

/// Every refusal now: each invalid or conflicting policy's, and each unreadable
/// document's.
fn rejected_of(state: &State) -> Vec<String> {
    let mut out = state.unidentified.clone();
    for (id, c) in &state.conditions {
        if !c.accepted {
            let serving = match (&c.serving, c.reason) {
                (Some(version), _) => format!(" (still serving its last good version {version})"),
                (None, crate::status::REASON_INVALID) => {
                    " (not served: it has no good version)".to_owned()
                }
                (None, _) => String::new(),
            };
            out.push(format!("{id}: {}: {}{serving}", c.reason, c.message));
        }
    }
    out
}

/// Records one offered document in `entries` (or its errors in `unidentified`).
fn take(entries: &mut BTreeMap<PolicyId, Entry>, unidentified: &mut Vec<String>, o: Offered) {
    let Some(id) = o.id else {
        if let Err(errors) = o.outcome {
            unidentified.extend(errors);
        }
        return;
    };
    let (candidate, warnings) = match o.outcome {
        Ok((policy, warnings)) => (
            Ok(Arc::new(PolicyResource::new(policy, o.generation))),
            warnings,
        ),
        Err(errors) => (Err(errors), Vec::new()),
    };
    let seed = o
        .seed
        .map(|(policy, generation)| Arc::new(PolicyResource::new(policy, generation)));
    entries.insert(
        id,
        Entry {
            generation: o.generation,
            created: o.created,
            candidate,
            warnings,
            seed,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SHOP: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: shop}\nspec: {hosts: [shop]}\n";
    const CART: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: cart}\nspec: {hosts: [cart]}\n";

    fn offer(files: &[(&str, &str)]) -> Vec<Offered> {
        Offered::documents(sluice_policy::check_each(
            files.iter().map(|(f, t)| (Path::new(*f), *t)),
        ))
    }

    fn version_of(store: &Store, id: &str) -> Option<String> {
        store
            .served()
            .policies
            .get(&PolicyId::parse(id))
            .map(|p| p.version.clone())
    }

    #[test]
    fn versions_are_content_hashes_and_unchanged_content_makes_no_new_set() {
        let store = Store::default();
        assert_eq!(
            store.replace(offer(&[("s.yaml", SHOP)]), "dir"),
            Offer::Accepted(1)
        );
        let v = version_of(&store, "shop").expect("served");
        assert_eq!(
            v,
            sluice_policy::policy_yaml(&store.served().policies[&PolicyId::parse("shop")].policy).1
        );
        assert_eq!(
            store.replace(offer(&[("s.yaml", SHOP)]), "dir"),
            Offer::Unchanged
        );
        // Another replica reading the same source serves the same versions.
        let replica = Store::default();
        replica.replace(offer(&[("s.yaml", SHOP)]), "dir");
        assert_eq!(version_of(&replica, "shop"), Some(v));
        assert_eq!(
            replica.served().content_hash(),
            store.served().content_hash()
        );
    }

    #[test]
    fn a_file_that_is_no_longer_yaml_keeps_serving_what_it_held() {
        let store = Store::default();
        store.replace(offer(&[("s.yaml", SHOP), ("c.yaml", CART)]), "dir");
        let before = version_of(&store, "shop");
        assert_eq!(
            store.replace(offer(&[("s.yaml", "{{{"), ("c.yaml", CART)]), "dir"),
            Offer::Rejected
        );
        assert_eq!(version_of(&store, "shop"), before);
        let rejected = store.rejected();
        assert!(
            rejected.iter().any(|e| e.starts_with("s.yaml:")),
            "{rejected:?}"
        );
        assert!(
            rejected.iter().any(|e| e.starts_with("shop: Invalid: ")
                && e.contains("still serving its last good version")),
            "{rejected:?}"
        );
        // Removing the file removes its policy.
        store.replace(offer(&[("c.yaml", CART)]), "dir");
        assert_eq!(version_of(&store, "shop"), None);
        assert!(store.rejected().is_empty());
    }

    #[test]
    fn an_update_changes_one_policy_and_removal_removes_it() {
        let store = Store::default();
        store.replace(offer(&[("s.yaml", SHOP), ("c.yaml", CART)]), "kubernetes");
        let cart = version_of(&store, "cart");
        let changed = offer(&[("s.yaml", &SHOP.replace("[shop]", "[shop, shop.example]"))]);
        assert_eq!(store.update(changed, &[], "kubernetes"), Offer::Accepted(2));
        assert_eq!(version_of(&store, "cart"), cart);
        assert_eq!(
            store.served().hosts.get("shop.example"),
            Some(&PolicyId::parse("shop"))
        );
        store.update(Vec::new(), &[PolicyId::parse("cart")], "kubernetes");
        assert_eq!(version_of(&store, "cart"), None);
    }

    #[test]
    fn rollback_serves_an_earlier_set_until_the_source_changes() {
        let store = Store::default();
        store.replace(offer(&[("s.yaml", SHOP)]), "dir");
        let first = version_of(&store, "shop");
        store.replace(
            offer(&[("s.yaml", &SHOP.replace("[shop]", "[shop, b]"))]),
            "dir",
        );
        let rolled = store.rollback(0).expect("rollback");
        assert_eq!((rolled.version, rolled.rollback), (3, true));
        assert_eq!(version_of(&store, "shop"), first);
        // The same source again does not undo it; a change does.
        store.replace(
            offer(&[("s.yaml", &SHOP.replace("[shop]", "[shop, b]"))]),
            "dir",
        );
        assert_eq!(version_of(&store, "shop"), first);
        store.replace(
            offer(&[("s.yaml", &SHOP.replace("[shop]", "[shop, c]"))]),
            "dir",
        );
        assert!(!store.status().rollback);
        assert!(store.rollback(99).is_err());
    }

    #[test]
    fn keeps_the_last_twenty_sets() {
        let store = Store::default();
        for i in 0..30 {
            store.replace(
                offer(&[("s.yaml", &SHOP.replace("[shop]", &format!("[h{i}]")))]),
                "dir",
            );
        }
        let history = store.history();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history.first().map(|s| s.version), Some(11));
    }
}
