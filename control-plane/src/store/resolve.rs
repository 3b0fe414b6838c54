//! What is served, decided policy by policy from what the source says of each: the
//! pure part of the [`Store`](super::Store), so that two replicas given the same
//! source decide the same thing.
//!
//! - A valid policy serves its latest version; an invalid one keeps serving its
//!   last good version, if there is one, and blocks nobody else.
//! - A host claimed by several policies has one owner: for a Service name
//!   (`NAME.NAMESPACE.svc.cluster.local`), the policies in the Service's own
//!   namespace come first; then the oldest (Kubernetes' `creationTimestamp`; files
//!   have none and count as oldest); then the smaller `namespace/name`. A policy that
//!   loses any of its hosts is not served at all (half a policy would govern some of
//!   its names and not others), and its status says who owns the host. Losers free
//!   their other hosts, so the rule is applied again until nothing changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sluice_policy::PolicyId;

use super::PolicyResource;

/// Why a policy is (not) served, for its `Accepted` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub accepted: bool,
    /// `Accepted`, `Invalid` or `HostConflict`.
    pub reason: &'static str,
    /// The errors (file:line:column), the conflict, or the warnings.
    pub message: String,
    /// The generation the condition is about (Kubernetes' `metadata.generation`; 0
    /// for files).
    pub generation: i64,
}

/// What the source says of one policy now.
#[derive(Debug, Clone)]
pub struct Entry {
    pub generation: i64,
    /// `creationTimestamp` (RFC 3339, which sorts as time) or empty for files.
    pub created: String,
    /// The policy as offered, or its errors.
    pub candidate: Result<Arc<PolicyResource>, Vec<String>>,
    pub warnings: Vec<String>,
}

/// The owner's sort key for `host` among claimants: lower wins.
fn rank<'a>(host: &str, id: &'a PolicyId, entry: &'a Entry) -> (bool, &'a str, String) {
    let service_namespace = host
        .strip_suffix(".svc.cluster.local")
        .and_then(|rest| rest.split_once('.'))
        .map(|(_, namespace)| namespace);
    let in_service_namespace = match service_namespace {
        Some(ns) => id.namespace.as_deref() == Some(ns),
        None => false,
    };
    (
        !in_service_namespace,
        entry.created.as_str(),
        id.to_string(),
    )
}

/// The served policies (by identity) and every policy's condition.
pub fn resolve(
    entries: &BTreeMap<PolicyId, Entry>,
    last_good: &BTreeMap<PolicyId, Arc<PolicyResource>>,
) -> (
    BTreeMap<PolicyId, Arc<PolicyResource>>,
    BTreeMap<PolicyId, Condition>,
) {
    let mut conditions = BTreeMap::new();
    let mut candidates: BTreeMap<&PolicyId, Arc<PolicyResource>> = BTreeMap::new();
    for (id, entry) in entries {
        match &entry.candidate {
            Ok(resource) => {
                candidates.insert(id, Arc::clone(resource));
                conditions.insert(
                    id.clone(),
                    Condition {
                        accepted: true,
                        reason: "Accepted",
                        message: entry.warnings.join("\n"),
                        generation: entry.generation,
                    },
                );
            }
            Err(errors) => {
                let kept = last_good.get(id);
                if let Some(good) = kept {
                    candidates.insert(id, Arc::clone(good));
                }
                let serving = match kept {
                    Some(good) => format!(
                        "\n(still serving its last good version {} of generation {})",
                        good.version, good.generation
                    ),
                    None => "\n(not served: it has no good version)".to_owned(),
                };
                conditions.insert(
                    id.clone(),
                    Condition {
                        accepted: false,
                        reason: "Invalid",
                        message: format!("{}{serving}", errors.join("\n")),
                        generation: entry.generation,
                    },
                );
            }
        }
    }
    // Each round removes at least one policy or ends: bounded by their number.
    let mut losers: BTreeMap<&PolicyId, String> = BTreeMap::new();
    for _ in 0..=candidates.len() {
        let mut owners: HashMap<&str, &PolicyId> = HashMap::new();
        for (id, resource) in &candidates {
            if losers.contains_key(id) {
                continue;
            }
            let Some(entry) = entries.get(*id) else {
                continue;
            };
            for host in &resource.hosts {
                let better = match owners.get(host.as_str()) {
                    None => true,
                    Some(owner) => {
                        let owner_entry = &entries[*owner];
                        rank(host, id, entry) < rank(host, owner, owner_entry)
                    }
                };
                if better {
                    owners.insert(host, id);
                }
            }
        }
        let mut new_losers = Vec::new();
        for (id, resource) in &candidates {
            if losers.contains_key(id) {
                continue;
            }
            let lost: BTreeSet<(&str, &PolicyId)> = resource
                .hosts
                .iter()
                .filter_map(|h| {
                    let owner = owners.get(h.as_str())?;
                    (*owner != *id).then_some((h.as_str(), *owner))
                })
                .collect();
            if let Some((host, owner)) = lost.first() {
                new_losers.push((*id, *host, *owner));
            }
        }
        if new_losers.is_empty() {
            break;
        }
        // Only a loss to a policy that keeps its hosts is final: one that loses to a
        // policy itself losing this round may win once that one is out. A cycle of
        // losers (possible, since the namespace rule ranks per host) all go.
        let losing: BTreeSet<&PolicyId> = new_losers.iter().map(|(id, _, _)| *id).collect();
        let final_losses: Vec<_> = new_losers
            .iter()
            .filter(|(_, _, owner)| !losing.contains(owner))
            .collect();
        let out = if final_losses.is_empty() {
            new_losers.iter().collect()
        } else {
            final_losses
        };
        for (id, host, owner) in out {
            losers.insert(
                *id,
                format!(
                    "host {host} belongs to policy {owner} (the policy in a Service's own \
                     namespace owns its name, then the oldest policy): this policy is not \
                     served until the conflict is removed"
                ),
            );
        }
    }
    let mut served = BTreeMap::new();
    for (id, resource) in candidates {
        match losers.get(id) {
            Some(why) => {
                let generation = entries.get(id).map_or(0, |e| e.generation);
                conditions.insert(
                    id.clone(),
                    Condition {
                        accepted: false,
                        reason: "HostConflict",
                        message: why.clone(),
                        generation,
                    },
                );
            }
            None => {
                served.insert(id.clone(), resource);
            }
        }
    }
    (served, conditions)
}
