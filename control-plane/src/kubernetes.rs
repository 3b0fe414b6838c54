//! Kubernetes: the `TrafficPolicy` CustomResourceDefinition, generated from the same
//! Rust types that parse policy files, and the custom resources as a policy source.
//!
//! The Kubernetes API is the store: every control-plane replica lists and watches
//! `trafficpolicies.sluice.dev` (kube's watcher resumes a broken watch from the last
//! resourceVersion) and offers each resource to the [`Store`] on its own, validated
//! with the `policy` crate: an invalid resource refuses only itself (it keeps its
//! last good version) and a change re-checks that resource only. Identity is
//! `namespace/name`, so two namespaces may both have a policy `api`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::{json, Map, Value};
use sluice_policy::spec::PolicyBodySpec;
use sluice_policy::PolicyId;

use crate::metrics::Metrics;
use crate::serve::report;
use crate::status::{AcceptedSpec, DesiredSet, PolicyCondition, StatusWriter};
use crate::store::{Offered, Store};
use crate::telemetry::Readiness;

pub const GROUP: &str = "sluice.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "TrafficPolicy";
pub const PLURAL: &str = "trafficpolicies";
/// The source label of what the resources offer.
const SOURCE: &str = "kubernetes";
/// Why `/ready` waits, until the first list of the resources completes.
pub const NOT_LISTED: &str = "the TrafficPolicy resources have not been listed yet";

/// Rewrites a schemars schema into a Kubernetes *structural* schema: `$ref`s
/// inlined, nullable types expressed with `nullable`, and the JSON-Schema-only
/// keywords (`$schema`, `title`, `additionalProperties: false`) dropped.
fn structural(schema: &Value, defs: &Map<String, Value>, depth: usize) -> Value {
    // The policy types are not recursive; the bound only guards against a cycle.
    if depth > 32 {
        return json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    }
    let Value::Object(object) = schema else {
        return schema.clone();
    };
    if let Some(target) = object.get("$ref").and_then(Value::as_str) {
        let name = target.rsplit('/').next().unwrap_or_default();
        let mut inlined = match defs.get(name) {
            Some(def) => structural(def, defs, depth + 1),
            None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        };
        if let (Value::Object(out), Some(d)) = (&mut inlined, object.get("description")) {
            out.insert("description".into(), d.clone());
        }
        return inlined;
    }
    let nullable_of = |variants: &Vec<Value>| -> Option<Value> {
        let (nulls, others): (Vec<&Value>, Vec<&Value>) = variants
            .iter()
            .partition(|v| v.get("type").and_then(Value::as_str) == Some("null"));
        (nulls.len() == 1 && others.len() == 1).then(|| others[0].clone())
    };
    let mut out = Map::new();
    for (key, value) in object {
        match key.as_str() {
            "$schema" | "title" | "$defs" | "default" => {}
            "additionalProperties" if value == &Value::Bool(false) => {}
            "type" => match value {
                Value::Array(types) => {
                    let real: Vec<&Value> = types
                        .iter()
                        .filter(|t| t.as_str() != Some("null"))
                        .collect();
                    if let Some(t) = real.first() {
                        out.insert("type".into(), (*t).clone());
                    }
                    if real.len() < types.len() {
                        out.insert("nullable".into(), Value::Bool(true));
                    }
                }
                other => {
                    out.insert("type".into(), other.clone());
                }
            },
            "anyOf" | "oneOf" => match value.as_array().and_then(nullable_of) {
                Some(inner) => {
                    if let Value::Object(inner) = structural(&inner, defs, depth + 1) {
                        out.extend(inner);
                    }
                    out.insert("nullable".into(), Value::Bool(true));
                }
                None => {
                    let items: Vec<Value> = value
                        .as_array()
                        .map(|a| a.iter().map(|v| structural(v, defs, depth + 1)).collect())
                        .unwrap_or_default();
                    let types: Vec<&str> = items
                        .iter()
                        .filter_map(|i| i.get("type").and_then(Value::as_str))
                        .collect();
                    if items.len() == 2 && types == ["integer", "string"] {
                        // A port by number or name: a structural schema allows a
                        // union of types only as Kubernetes' own IntOrString.
                        out.insert("x-kubernetes-int-or-string".into(), Value::Bool(true));
                        let plain = json!([{"type": "integer"}, {"type": "string"}]);
                        out.insert(key.clone(), plain);
                    } else {
                        out.insert(key.clone(), Value::Array(items));
                    }
                }
            },
            "properties" => {
                let props: Map<String, Value> = value
                    .as_object()
                    .map(|p| {
                        p.iter()
                            .map(|(k, v)| (k.clone(), structural(v, defs, depth + 1)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.insert(key.clone(), Value::Object(props));
            }
            "items" | "additionalProperties" => {
                out.insert(key.clone(), structural(value, defs, depth + 1));
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(out)
}

/// The schema of `status`: what [`crate::status`] writes, its conditions as
/// Kubernetes' own `metav1.Condition` (the schema `controller-gen` emits for it), so
/// `kubectl wait --for=condition=Accepted` and generic tooling read them.
fn status_schema() -> Value {
    json!({
        "type": "object",
        "description": "Written by the control plane: whether it accepted this policy, and why not.",
        "properties": {
            "observedGeneration": {
                "type": "integer", "format": "int64", "minimum": 0,
                "description": "The metadata.generation the status is about.",
            },
            "conditions": {
                "type": "array",
                "maxItems": 8,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "description": "`Accepted`: True, or False with reason `Invalid` (the message lists the errors) or `HostConflict`.",
                "items": {
                    "type": "object",
                    "required": ["type", "status", "reason", "message", "lastTransitionTime"],
                    "properties": {
                        "type": {
                            "type": "string", "maxLength": 316,
                            "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
                        },
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {
                            "type": "string", "minLength": 1, "maxLength": 1024,
                            "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                        },
                        "message": {"type": "string", "maxLength": 32768},
                        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                    },
                },
            },
            "accepted": {
                "type": "array",
                "maxItems": crate::status::ACCEPTED_KEPT,
                "description": "The last specs that validated, newest first: what an invalid spec is served as meanwhile (on every control-plane replica, after any restart), and what `sluice-cp rollback --policy` can restore.",
                "items": {
                    "type": "object",
                    "required": ["generation", "version", "spec"],
                    "properties": {
                        "generation": {"type": "integer", "format": "int64", "minimum": 0},
                        "version": {"type": "string", "maxLength": 64},
                        "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    },
                },
            },
        },
    })
}

/// The CRD as YAML, as committed at `k8s/base/crd.yaml`.
pub fn crd_yaml() -> String {
    let root = serde_json::to_value(schemars::schema_for!(PolicyBodySpec)).unwrap_or_default();
    let defs = root
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let spec = structural(&root, &defs, 0);
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{PLURAL}.{GROUP}")},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": format!("{KIND}List"),
                "plural": PLURAL,
                "singular": "trafficpolicy",
                "shortNames": ["tp"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Everything that governs one service's traffic (see the README's policy reference).",
                    "required": ["spec"],
                    "properties": {"spec": spec, "status": status_schema()},
                }},
                // Status is written only through its subresource, so the control
                // plane cannot touch a spec, and a status write does not bump the
                // generation.
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"},
                    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
                    {"name": "Accepted", "type": "string",
                        "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
                    {"name": "Reason", "type": "string",
                        "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].reason"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    });
    let body = serde_saphyr::to_string(&crd).unwrap_or_default();
    format!("# Generated by `sluice-cp crd` from the policy crate's types; do not edit.\n{body}")
}

/// A custom resource as the policy document it stands for (the API server already
/// dropped unknown fields; the policy crate checks the values).
fn document(object: &DynamicObject) -> Value {
    let mut metadata = Map::new();
    if let Some(name) = &object.metadata.name {
        metadata.insert("name".into(), name.clone().into());
    }
    if let Some(ns) = &object.metadata.namespace {
        metadata.insert("namespace".into(), ns.clone().into());
    }
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": metadata,
        "spec": object.data.get("spec").cloned().unwrap_or(Value::Object(Map::new())),
    })
}

/// The identity of a resource.
fn id_of(object: &DynamicObject) -> PolicyId {
    PolicyId {
        namespace: object.metadata.namespace.clone(),
        name: object.metadata.name.clone().unwrap_or_default(),
    }
}

/// One resource as the store takes it: checked on its own, with its generation and
/// age (the host-conflict rule prefers the oldest).
fn offered(object: &DynamicObject) -> Offered {
    let id = id_of(object);
    let text = serde_saphyr::to_string(&document(object)).unwrap_or_default();
    let file = format!("kubernetes:{id}");
    let checked = sluice_policy::check_each([(Path::new(&file), text.as_str())]).pop();
    let outcome = match checked {
        Some(d) => Offered::documents(vec![d]).remove(0).outcome,
        None => Err(vec![format!("{file}: the resource has no policy document")]),
    };
    // Invalid now: the last spec that validated, as the resource's status keeps it.
    let seed = outcome.as_ref().err().and_then(|_| {
        let last = AcceptedSpec::list_of(object.data.get("status"))
            .into_iter()
            .next()?;
        let mut earlier = object.clone();
        earlier.data["spec"] = last.spec;
        let text = serde_saphyr::to_string(&document(&earlier)).ok()?;
        let (policy, _) = sluice_policy::check_each([(Path::new(&file), text.as_str())])
            .pop()?
            .outcome
            .ok()?;
        Some((policy, last.generation))
    });
    Offered {
        id: Some(id),
        seed,
        file,
        generation: object.metadata.generation.unwrap_or(0),
        created: object
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        outcome,
    }
}

/// The TrafficPolicy `namespace/name`, read now.
async fn get_policy(client: &kube::Client, id: &PolicyId) -> Result<DynamicObject, String> {
    let namespace = id
        .namespace
        .as_deref()
        .ok_or_else(|| format!("{id}: a TrafficPolicy resource is named namespace/name"))?;
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
    let resource = ApiResource::from_gvk_with_plural(&gvk, PLURAL);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    api.get(&id.name).await.map_err(|e| format!("{id}: {e}"))
}

/// The specs of TrafficPolicy `id` that validated, newest first (its status), the
/// same on every replica.
pub async fn accepted_specs(
    client: &kube::Client,
    id: &PolicyId,
) -> Result<Vec<AcceptedSpec>, String> {
    let object = get_policy(client, id).await?;
    Ok(AcceptedSpec::list_of(object.data.get("status")))
}

/// Writes an earlier spec of TrafficPolicy `id` that validated back into it (`to`:
/// that version; else the newest whose spec differs from the current one): a
/// change of the source, which every replica then serves. Returns the version
/// restored and the resource's new generation. The write carries the read's
/// resourceVersion, so a concurrent edit makes it fail rather than be lost.
pub async fn restore_spec(
    client: &kube::Client,
    id: &PolicyId,
    to: Option<&str>,
) -> Result<(String, i64), String> {
    let mut object = get_policy(client, id).await?;
    let accepted = AcceptedSpec::list_of(object.data.get("status"));
    let current = object.data.get("spec").cloned().unwrap_or(Value::Null);
    let target = match to {
        Some(version) => accepted
            .iter()
            .find(|a| a.version == version)
            .ok_or_else(|| {
                let kept: Vec<&str> = accepted.iter().map(|a| a.version.as_str()).collect();
                format!("{id}: version {version} is not among its last accepted specs {kept:?}")
            })?,
        None => accepted.iter().find(|a| a.spec != current).ok_or_else(|| {
            format!("{id}: no earlier accepted spec that differs from its spec is kept")
        })?,
    };
    if target.spec == current {
        return Err(format!(
            "{id}: version {} is its spec already",
            target.version
        ));
    }
    let version = target.version.clone();
    object.data["spec"] = target.spec.clone();
    if let Some(map) = object.data.as_object_mut() {
        map.remove("status");
    }
    let namespace = id.namespace.clone().unwrap_or_default();
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
    let resource = ApiResource::from_gvk_with_plural(&gvk, PLURAL);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let written = api
        .replace(&id.name, &kube::api::PostParams::default(), &object)
        .await
        .map_err(|e| format!("{id}: {e}"))?;
    Ok((version, written.metadata.generation.unwrap_or(0)))
}

/// Every resource's `Accepted` condition as the store decided it, with the status
/// the resource shows now (the writer skips what is already there).
fn desired(store: &Store, objects: &BTreeMap<PolicyId, DynamicObject>) -> DesiredSet {
    store
        .conditions()
        .into_iter()
        .filter_map(|(id, c)| {
            let object = objects.get(&id)?;
            let status = object.data.get("status");
            let kept = AcceptedSpec::list_of(status);
            // A spec that validates goes in front of the specs that did before:
            // decided from the object alone, the same on every replica.
            let accepted_specs = match (&c.valid_version, object.data.get("spec")) {
                (Some(version), Some(spec)) => AcceptedSpec::push(
                    AcceptedSpec {
                        generation: c.generation,
                        version: version.clone(),
                        spec: spec.clone(),
                    },
                    &kept,
                ),
                _ => kept,
            };
            let condition = PolicyCondition {
                namespace: id.namespace.clone()?,
                name: id.name,
                generation: c.generation,
                accepted: c.accepted,
                reason: c.reason.to_owned(),
                message: c.message,
                accepted_specs,
            };
            Some((condition, status.cloned()))
        })
        .collect()
}

/// Lists and watches the TrafficPolicies of `client` until the stream ends (never,
/// under normal operation: errors are retried with backoff). The source counts as
/// read for `/ready` once the first list completes, accepted or refused. Each
/// resource's `status.conditions` says whether it is served and why not.
pub async fn follow(
    store: Arc<Store>,
    client: kube::Client,
    metrics: Metrics,
    readiness: Arc<Readiness>,
) {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
    let resource = ApiResource::from_gvk_with_plural(&gvk, PLURAL);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let writer = StatusWriter::start(client, metrics.clone());
    let mut objects: BTreeMap<PolicyId, DynamicObject> = BTreeMap::new();
    let mut relisting: Option<BTreeMap<PolicyId, DynamicObject>> = None;
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relisting = Some(BTreeMap::new()),
            Ok(Event::InitApply(o)) => {
                if let Some(list) = relisting.as_mut() {
                    list.insert(id_of(&o), o);
                }
            }
            Ok(Event::InitDone) => {
                objects = relisting.take().unwrap_or_default();
                let offer = store.replace(objects.values().map(offered).collect(), SOURCE);
                report(&store, &metrics, &offer, SOURCE);
                writer.publish(desired(&store, &objects));
                readiness.source_loaded();
            }
            Ok(Event::Apply(o)) => {
                let id = id_of(&o);
                // Our own status writes come back as changes: the spec is the same,
                // so there is nothing to check again.
                let same_spec = objects.get(&id).is_some_and(|before| {
                    before.metadata.generation == o.metadata.generation
                        && before.data.get("spec") == o.data.get("spec")
                });
                let changed = offered(&o);
                objects.insert(id, o);
                if same_spec {
                    continue;
                }
                let offer = store.update(vec![changed], &[], SOURCE);
                report(&store, &metrics, &offer, SOURCE);
                writer.publish(desired(&store, &objects));
            }
            Ok(Event::Delete(o)) => {
                let id = id_of(&o);
                objects.remove(&id);
                let offer = store.update(Vec::new(), &[id], SOURCE);
                report(&store, &metrics, &offer, SOURCE);
                writer.publish(desired(&store, &objects));
            }
            // A watch the API server closed is resumed without an error and is not
            // counted: that happens every few minutes. An error is a list or watch
            // that failed, retried with backoff.
            Err(e) => {
                metrics.watch_restarts.inc();
                readiness.source_failed(NOT_LISTED, &e.to_string());
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "kubernetes watch failed; retrying"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_schema_is_structural() {
        let yaml = crd_yaml();
        for forbidden in ["$ref", "$defs", "additionalProperties: false", "- 'null'"] {
            assert!(!yaml.contains(forbidden), "CRD contains {forbidden:?}");
        }
        // A `type` given as a list of types (a union); a `type:` opening a mapping is
        // the condition's property named `type`.
        let lines: Vec<&str> = yaml.lines().collect();
        for pair in lines.windows(2) {
            let is_list = pair[1].trim_start().starts_with("- ");
            assert!(
                !(pair[0].trim_end().ends_with("type:") && is_list),
                "CRD has a list of types: {pair:?}"
            );
        }
        assert!(yaml.contains("requestsPerSecond:"));
        assert!(yaml.contains("x-kubernetes-int-or-string: true"));
        assert!(yaml.contains("nullable: true"));
    }

    #[test]
    fn the_crd_has_a_status_subresource_and_shows_the_accepted_condition() {
        let yaml = crd_yaml();
        assert!(yaml.contains("subresources:\n      status: {}\n"), "{yaml}");
        for column in ["name: Accepted", "name: Reason"] {
            assert!(yaml.contains(column), "{yaml}");
        }
        assert!(yaml.contains(r#".status.conditions[?(@.type=="Accepted")].reason"#));
    }

    #[test]
    fn the_status_schema_holds_what_the_status_writer_writes() {
        use crate::status::{status_patch, PolicyCondition, REASON_INVALID};
        let schema = status_schema();
        let patch = status_patch(
            None,
            &PolicyCondition {
                namespace: "shop".into(),
                name: "api".into(),
                generation: 3,
                accepted: false,
                reason: REASON_INVALID.into(),
                message: "kubernetes:shop/api:12:7: spec.routes[0].timeout: bad".into(),
                accepted_specs: Vec::new(),
            },
            "2025-01-01T00:00:00Z",
        );
        let status = patch["status"].as_object().expect("status");
        for key in status.keys() {
            assert!(schema["properties"].get(key).is_some(), "{key}");
        }
        let items = &schema["properties"]["conditions"]["items"];
        let condition = status["conditions"][0].as_object().expect("condition");
        for key in condition.keys() {
            assert!(items["properties"].get(key).is_some(), "{key}");
        }
        for required in items["required"].as_array().expect("required") {
            assert!(condition.contains_key(required.as_str().unwrap_or_default()));
        }
    }
}
