//! Policy from a file or directory, applied at start and on every change.
//!
//! The watch is on the *directory* (the file's parent, or the policy directory itself)
//! because editors and Kubernetes replace files rather than write them in place: a
//! ConfigMap mount swaps its `..data` symlink, an editor renames a temp file over
//! the original. Only create/modify/remove/rename events of policy files or of the
//! `..`-prefixed ConfigMap entries count; inotify's access events (our own reads)
//! are ignored, which is what keeps a reload from triggering the next one. Events
//! are debounced so one save is one reload.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use sluice_policy::watch::{is_policy_entry, settle};
use sluice_policy::Checked;

use crate::runtime::Runtime;
use crate::shared::Shared;

/// Quiet time after the last event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A stream of events never delays a reload longer than this.
pub const MAX_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Accepted,
    Unchanged,
    Rejected,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Accepted => "accepted",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Rejected => "rejected",
        }
    }
}

/// Builds a runtime from an already checked policy (`checked` carries the checker's
/// errors, or the set and its warnings) and swaps it in: the one path every new
/// policy takes into the proxy, from any source (file, control plane, persisted
/// state). A policy the checker or the build refused leaves the current one
/// serving; an applied one with warnings is logged with them. Returns the result
/// and, when rejected, the errors.
///
/// Blocking: the build resolves backend names (`to_socket_addrs`), so async callers
/// run it on tokio's blocking pool. Calls must not overlap: the current runtime is
/// read, then replaced, without a compare-and-swap (each source is one writer: the
/// file watch thread, or the control-plane stream awaiting one snapshot at a time).
pub fn apply(
    shared: &Shared,
    checked: Result<Checked, Vec<String>>,
    label: &str,
    kind: &str,
) -> (ReloadResult, Vec<String>) {
    let current = shared.runtime.load_full();
    let built = checked.and_then(|Checked { set, warnings }| {
        Runtime::build(set, label.to_owned(), Some(&current), &shared.globals)
            .map(|runtime| (runtime, warnings))
            .map_err(|e| vec![e.to_string()])
    });
    let (result, errors) = match built {
        Err(errors) => {
            for e in &errors {
                tracing::error!(error = e.as_str(), source = label, "policy rejected");
            }
            (ReloadResult::Rejected, errors)
        }
        Ok((next, _)) if current.loaded() && current.version == next.version => {
            (ReloadResult::Unchanged, Vec::new())
        }
        Ok((next, warnings)) => {
            let metrics = &shared.metrics;
            if current.loaded() {
                let _ = metrics
                    .policy_info
                    .remove_label_values(&[current.version.as_str()]);
            }
            metrics
                .policy_info
                .with_label_values(&[next.version.as_str()])
                .set(1);
            tracing::info!(
                version = next.version.as_str(),
                previous = current.loaded().then_some(current.version.as_str()),
                policies = next.policies.len(),
                source = label,
                "policy applied"
            );
            if !warnings.is_empty() {
                // Served as written all the same; whoever wrote it should hear that
                // part of it will never apply.
                let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
                tracing::warn!(
                    version = next.version.as_str(),
                    warnings = %warnings.join("; "),
                    source = label,
                    "policy applied with warnings"
                );
            }
            if !shared.globals.configured() {
                // Accepted all the same: each replica keeps its own bucket, which is
                // what the limit falls back to whenever Redis cannot be reached.
                let routes: Vec<String> = next
                    .routes()
                    .filter(|r| r.global.is_some())
                    .map(|r| format!("{}/{}", r.policy, r.name))
                    .collect();
                if !routes.is_empty() {
                    tracing::warn!(
                        routes = routes.join(", "),
                        "globalRateLimit without --redis: these routes use each replica's own bucket"
                    );
                }
            }
            shared.install(next);
            (ReloadResult::Accepted, Vec::new())
        }
    };
    shared
        .metrics
        .policy_reloads
        .with_label_values(&[result.as_str(), kind])
        .inc();
    (result, errors)
}

pub struct FileSource {
    pub shared: Arc<Shared>,
    pub path: PathBuf,
}

impl FileSource {
    fn label(&self) -> String {
        format!("file:{}", self.path.display())
    }

    /// Loads, validates and swaps in the policy. A rejected policy leaves the
    /// current one serving.
    pub fn reload(&self) -> ReloadResult {
        let checked = sluice_policy::check_path(&self.path)
            .map_err(|errors| errors.0.iter().map(ToString::to_string).collect::<Vec<_>>());
        apply(&self.shared, checked, &self.label(), "file").0
    }

    /// Starts watching; the returned watcher must be kept alive. Changes are applied
    /// on a dedicated thread, off the request path.
    pub fn watch(self) -> notify::Result<notify::RecommendedWatcher> {
        let (tx, rx) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(tx)?;
        let is_dir = self.path.is_dir();
        let dir = if is_dir {
            self.path.clone()
        } else {
            self.path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        };
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let file_name = (!is_dir)
            .then(|| self.path.file_name().map(|n| n.to_owned()))
            .flatten();
        std::thread::Builder::new()
            .name("policy-watch".into())
            .spawn(move || {
                let relevant = |e: &notify::Result<notify::Event>| {
                    e.as_ref().is_ok_and(|e| {
                        matches!(
                            e.kind,
                            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                        ) && e.paths.iter().any(|p| {
                            p.file_name()
                                .is_some_and(|n| is_policy_entry(n, file_name.as_deref()))
                        })
                    })
                };
                // Ends when the watcher (and so the sender) is dropped.
                while let Ok(first) = rx.recv() {
                    if !relevant(&first) {
                        continue;
                    }
                    if !settle(&rx, relevant, DEBOUNCE, MAX_DELAY) {
                        return;
                    }
                    self.reload();
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(watcher)
    }
}
