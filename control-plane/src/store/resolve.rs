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
use crate::status::{REASON_ACCEPTED, REASON_HOST_CONFLICT, REASON_INVALID};

/// Why a policy is (not) served, for its `Accepted` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub accepted: bool,
    /// [`REASON_ACCEPTED`], [`REASON_INVALID`] or [`REASON_HOST_CONFLICT`]: the
    /// reasons the status writer puts on the resource.
    pub reason: &'static str,
    /// The errors (file:line:column), the conflict, or the warnings: from the
    /// source alone, so that every replica writes the same status.
    pub message: String,
    /// An invalid policy's last good version, still served (known to this replica).
    pub serving: Option<String>,
    /// The version of the source's spec when it is valid (served or not).
    pub valid_version: Option<String>,
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
    /// The last good version the source itself remembers (a TrafficPolicy's
    /// `status.accepted`), for an invalid candidate this replica never saw valid.
    pub seed: Option<Arc<PolicyResource>>,
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
                        reason: REASON_ACCEPTED,
                        message: entry.warnings.join("\n"),
                        generation: entry.generation,
                        serving: None,
                        valid_version: Some(resource.version.clone()),
                    },
                );
            }
            Err(errors) => {
                let kept = last_good.get(id);
                if let Some(good) = kept {
                    candidates.insert(id, Arc::clone(good));
                }
                conditions.insert(
                    id.clone(),
                    Condition {
                        accepted: false,
                        reason: REASON_INVALID,
                        message: errors.join("\n"),
                        generation: entry.generation,
                        serving: kept.map(|good| good.version.clone()),
                        valid_version: None,
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
                let entry = entries.get(id);
                let valid_version = entry
                    .and_then(|e| e.candidate.as_ref().ok())
                    .map(|r| r.version.clone());
                conditions.insert(
                    id.clone(),
                    Condition {
                        accepted: false,
                        reason: REASON_HOST_CONFLICT,
                        message: why.clone(),
                        generation: entry.map_or(0, |e| e.generation),
                        serving: None,
                        valid_version,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(id: &str, hosts: &[&str]) -> Arc<PolicyResource> {
        let id = PolicyId::parse(id);
        let ns = id
            .namespace
            .as_deref()
            .map(|n| format!(", namespace: {n}"))
            .unwrap_or_default();
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {}{ns}}}\nspec: {{hosts: [{}]}}\n",
            id.name,
            hosts.join(", ")
        );
        let set = sluice_policy::parse_str(std::path::Path::new("t.yaml"), &yaml).expect("valid");
        Arc::new(PolicyResource::new(set.policies[0].clone(), 1))
    }

    fn entry(resource: Arc<PolicyResource>, created: &str) -> Entry {
        Entry {
            generation: 1,
            created: created.into(),
            candidate: Ok(resource),
            warnings: Vec::new(),
            seed: None,
        }
    }

    fn served_ids(entries: &BTreeMap<PolicyId, Entry>) -> Vec<String> {
        resolve(entries, &BTreeMap::new())
            .0
            .keys()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_service_name_belongs_to_the_policy_in_the_services_namespace() {
        let mut entries = BTreeMap::new();
        // The squatter is older, but the name is b's Service's.
        let squatter = policy("a/squatter", &["api.b.svc.cluster.local"]);
        let owner = policy("b/api", &["api.b.svc.cluster.local"]);
        entries.insert(squatter.id.clone(), entry(squatter, "2026-01-01T00:00:00Z"));
        entries.insert(owner.id.clone(), entry(owner, "2026-06-01T00:00:00Z"));
        let (served, conditions) = resolve(&entries, &BTreeMap::new());
        assert_eq!(
            served.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["b/api"]
        );
        let lost = &conditions[&PolicyId::parse("a/squatter")];
        assert_eq!((lost.accepted, lost.reason), (false, "HostConflict"));
        assert!(
            lost.message.contains("belongs to policy b/api"),
            "{}",
            lost.message
        );
    }

    #[test]
    fn otherwise_the_oldest_wins_then_the_smaller_identity() {
        let mut entries = BTreeMap::new();
        let old = policy("z/old", &["shop.example"]);
        let new = policy("a/new", &["shop.example"]);
        entries.insert(old.id.clone(), entry(old, "2026-01-01T00:00:00Z"));
        entries.insert(new.id.clone(), entry(new, "2026-06-01T00:00:00Z"));
        assert_eq!(served_ids(&entries), ["z/old"]);
        // Same age (files have none): the smaller identity.
        for e in entries.values_mut() {
            e.created.clear();
        }
        assert_eq!(served_ids(&entries), ["a/new"]);
    }

    #[test]
    fn a_loser_frees_its_other_hosts_for_policies_it_would_have_beaten() {
        // b beats c on h2 (older), but b loses h1 to a: b is out, so c is served.
        let mut entries = BTreeMap::new();
        let a = policy("a", &["h1"]);
        let b = policy("b", &["h1", "h2"]);
        let c = policy("c", &["h2"]);
        entries.insert(a.id.clone(), entry(a, "2026-01-01T00:00:00Z"));
        entries.insert(b.id.clone(), entry(b, "2026-02-01T00:00:00Z"));
        entries.insert(c.id.clone(), entry(c, "2026-03-01T00:00:00Z"));
        assert_eq!(served_ids(&entries), ["a", "c"]);
    }

    #[test]
    fn an_invalid_policy_serves_its_last_good_version_and_says_why() {
        let good = policy("shop/api", &["api"]);
        let mut entries = BTreeMap::new();
        entries.insert(
            good.id.clone(),
            Entry {
                generation: 2,
                created: String::new(),
                candidate: Err(vec!["api.yaml:3:4: spec.mode: unknown".into()]),
                warnings: Vec::new(),
                seed: None,
            },
        );
        let last_good: BTreeMap<PolicyId, Arc<PolicyResource>> =
            [(good.id.clone(), Arc::clone(&good))].into();
        let (served, conditions) = resolve(&entries, &last_good);
        assert_eq!(served.get(&good.id), Some(&good));
        let c = &conditions[&good.id];
        assert_eq!((c.accepted, c.reason, c.generation), (false, "Invalid", 2));
        assert_eq!(c.message, "api.yaml:3:4: spec.mode: unknown");
        assert_eq!(c.serving.as_deref(), Some(good.version.as_str()));
        // Without a good version: nothing served, nobody else affected.
        let (served, _) = resolve(&entries, &BTreeMap::new());
        assert!(served.is_empty());
    }
}
