//! [`StatusWriter`]: the task that writes the published conditions to the objects'
//! status subresource, so the policy source never waits on the API server.
//!
//! A pass takes the latest published set, plans a write for each object
//! [`needs_write`] says needs one, and sends them [`MAX_CONCURRENT_WRITES`] at a time.
//! A write that failed every try makes a later pass (backing off up to
//! [`MAX_RETRY_DELAY`]) try again without a new set. The task remembers each status it
//! wrote with the status the source had seen then: until the watch shows the write,
//! the source keeps publishing the old status, and the remembered one is judged
//! instead, so nothing is written twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::Value;
use tokio::sync::watch;

use super::{needs_write, status_patch, PolicyCondition};
use crate::kubernetes::{GROUP, KIND, PLURAL, VERSION};
use crate::metrics::Metrics;

/// The field manager of every status write (`kubectl get -o yaml --show-managed-fields`).
pub const FIELD_MANAGER: &str = "sluice-cp";
/// Status writes in flight at once: a change of many policies (a namespace applied)
/// must not open a burst of requests against the API server.
pub const MAX_CONCURRENT_WRITES: usize = 4;
/// Tries per write within one pass; then the write waits for the next pass.
pub const ATTEMPTS: u32 = 3;
/// The wait before a write's second try; it doubles for each further try.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// The wait before a pass that retries what the last one could not write: it starts
/// at one second and doubles up to this, until a pass writes everything.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The time now as Kubernetes writes it (`metav1.Time`: RFC 3339, whole seconds, UTC).
fn now() -> String {
    k8s_openapi::jiff::fmt::strtime::format(
        "%Y-%m-%dT%H:%M:%SZ",
        k8s_openapi::jiff::Timestamp::now(),
    )
    .unwrap_or_default()
}

/// Every object's desired condition with its `status` as the source last saw it.
pub type DesiredSet = Vec<(PolicyCondition, Option<Value>)>;

/// The latest set published, numbered so a caller can wait for a pass over it.
struct Published {
    seq: u64,
    desired: Arc<DesiredSet>,
}

/// Writes the published conditions to the TrafficPolicy objects' status in the
/// background; dropping it stops the task after its current pass.
pub struct StatusWriter {
    published: watch::Sender<Published>,
    passes: watch::Receiver<u64>,
}

impl StatusWriter {
    /// Starts the writing task on the current tokio runtime.
    pub fn start(client: kube::Client, metrics: Metrics) -> StatusWriter {
        let (published, receiver) = watch::channel(Published {
            seq: 0,
            desired: Arc::new(Vec::new()),
        });
        let (passes_tx, passes) = watch::channel(0);
        let task = Task {
            client,
            metrics,
            memory: HashMap::new(),
        };
        tokio::spawn(task.run(receiver, passes_tx));
        StatusWriter { published, passes }
    }

    /// Replaces the desired set (the whole set: an object left out is forgotten) and
    /// returns its number for [`StatusWriter::attempted`]. Never waits: a set not yet
    /// written when the next is published is skipped.
    pub fn publish(&self, desired: DesiredSet) -> u64 {
        let mut seq = 0;
        self.published.send_modify(|p| {
            p.seq += 1;
            p.desired = Arc::new(desired);
            seq = p.seq;
        });
        seq
    }

    /// Waits until the task has made a pass over set `seq` or a later one: each write
    /// done, found unnecessary, or failed for now (it is retried by a later pass).
    pub async fn attempted(&self, seq: u64) {
        let mut passes = self.passes.clone();
        // An error means the task ended: nothing more will be attempted.
        let _ = passes.wait_for(|done| *done >= seq).await;
    }
}

/// A write the task remembers, until the object leaves the published set.
struct Written {
    /// The status the source had seen when this was written.
    seen: Option<Value>,
    /// The status written.
    status: Value,
}

/// How one write ended.
enum Outcome {
    Written(Value),
    /// The object was deleted meanwhile; its deletion comes through the watch.
    Gone,
    Failed,
}

struct Task {
    client: kube::Client,
    metrics: Metrics,
    memory: HashMap<(String, String), Written>,
}

/// One planned write: the object, its status as seen, and the patch.
struct Write {
    condition: PolicyCondition,
    seen: Option<Value>,
    patch: Value,
}

impl Task {
    async fn run(mut self, mut published: watch::Receiver<Published>, passes: watch::Sender<u64>) {
        let first_retry = Duration::from_secs(1);
        let mut retry = first_retry;
        loop {
            let (seq, desired) = {
                let p = published.borrow_and_update();
                (p.seq, Arc::clone(&p.desired))
            };
            let complete = seq == 0 || self.pass(&desired).await;
            passes.send_replace(seq);
            if complete {
                retry = first_retry;
                if published.changed().await.is_err() {
                    return;
                }
            } else {
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(MAX_RETRY_DELAY);
            }
        }
    }

    /// Writes what `desired` needs; true if everything needed was written.
    async fn pass(&mut self, desired: &DesiredSet) -> bool {
        // One entry per object; should the source name one twice, its last wins.
        let desired: BTreeMap<(String, String), &(PolicyCondition, Option<Value>)> = desired
            .iter()
            .map(|d| ((d.0.namespace.clone(), d.0.name.clone()), d))
            .collect();
        self.memory.retain(|key, _| desired.contains_key(key));
        let now = now();
        let writes: Vec<Write> = desired
            .iter()
            .filter_map(|(key, (condition, seen))| {
                // Until the watch shows the status written, it still shows what it
                // showed before the write: judge by what was written instead.
                let current = match self.memory.get(key) {
                    Some(w) if w.seen == *seen => Some(&w.status),
                    _ => seen.as_ref(),
                };
                needs_write(current, condition).then(|| Write {
                    condition: condition.clone(),
                    seen: seen.clone(),
                    patch: status_patch(current, condition, &now),
                })
            })
            .collect();
        let (client, metrics) = (&self.client, &self.metrics);
        let outcomes: Vec<(Write, Outcome)> = futures::stream::iter(writes)
            .map(|w| async move {
                let outcome = write(client, metrics, &w).await;
                (w, outcome)
            })
            .buffer_unordered(MAX_CONCURRENT_WRITES)
            .collect()
            .await;
        let mut complete = true;
        for (w, outcome) in outcomes {
            let key = (w.condition.namespace, w.condition.name);
            match outcome {
                Outcome::Written(status) => {
                    self.memory.insert(
                        key,
                        Written {
                            seen: w.seen,
                            status,
                        },
                    );
                }
                Outcome::Gone => {
                    self.memory.remove(&key);
                }
                Outcome::Failed => complete = false,
            }
        }
        complete
    }
}

/// Whether an API error will not change by asking again (a 404 is handled apart).
/// 401 is retried: the client refreshes an expired token on the next request.
fn permanent(code: u16) -> bool {
    (400..500).contains(&code) && ![401, 408, 409, 429].contains(&code)
}

/// Patches one object's status, retrying transient errors [`ATTEMPTS`] times.
async fn write(client: &kube::Client, metrics: &Metrics, w: &Write) -> Outcome {
    let (namespace, name) = (&w.condition.namespace, &w.condition.name);
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
    let resource = ApiResource::from_gvk_with_plural(&gvk, PLURAL);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let mut delay = FIRST_RETRY_DELAY;
    for attempt in 1..=ATTEMPTS {
        let error = match api
            .patch_status(name, &params, &Patch::Merge(&w.patch))
            .await
        {
            Ok(_) => {
                metrics.status_written("written");
                return Outcome::Written(w.patch["status"].clone());
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                metrics.status_written("not_found");
                tracing::debug!(
                    namespace,
                    name,
                    "TrafficPolicy deleted before its status was written"
                );
                return Outcome::Gone;
            }
            Err(kube::Error::Api(status)) if permanent(status.code) => {
                metrics.status_written("refused");
                // Typically RBAC (patch on trafficpolicies/status) or a status the
                // CRD's schema refuses: asking again at once cannot help.
                tracing::warn!(
                    namespace,
                    name,
                    code = status.code,
                    error = status.message.as_str(),
                    "the API server refused a TrafficPolicy status write; retried later"
                );
                return Outcome::Failed;
            }
            Err(e) => e,
        };
        metrics.status_written("error");
        if attempt == ATTEMPTS {
            tracing::warn!(
                namespace,
                name,
                error = &error as &dyn std::error::Error,
                "TrafficPolicy status write failed; retried later"
            );
            return Outcome::Failed;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    Outcome::Failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_the_client_errors_that_asking_again_cannot_fix() {
        assert!(permanent(403) && permanent(422) && permanent(400));
        assert!(!permanent(409) && !permanent(429) && !permanent(500) && !permanent(401));
    }
}
