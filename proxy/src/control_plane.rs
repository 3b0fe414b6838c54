//! Policy from the control plane: one gRPC stream (`PolicyDiscovery.StreamPolicies`)
//! that subscribes with this proxy's node id, applies every pushed snapshot through
//! the same path as file reloads ([`crate::source::apply`]: lossless, state carried
//! over) and answers each with an ACK or a NACK carrying the errors.
//!
//! When the control plane is unreachable the proxy keeps serving its last good
//! policy and reconnects with jittered exponential backoff. Each applied snapshot is
//! persisted to `--state-dir`, so a proxy restarted while the control plane is down
//! starts from it (and `/ready` names that source).
//!
//! Applying a snapshot blocks (building a runtime resolves backend names; persisting
//! writes a file), so the stream hands each one to tokio's blocking pool and waits
//! for it before reading the next: the reload order is the push order, and there is
//! still one writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pingora::server::ShutdownWatch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::backoff::Backoff;
use crate::shared::Shared;
use crate::source::{apply, ReloadResult};

/// The generated client API.
#[allow(clippy::all, missing_docs)]
pub mod api {
    tonic::include_proto!("sluice.v1");
}

/// Largest snapshot accepted (the control plane's own limit).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// The first reconnect step; it doubles up to [`MAX_BACKOFF`], and each wait is drawn
/// at random below the current step ("full jitter") so a fleet does not reconnect in
/// lockstep.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// File name of the persisted snapshot inside `--state-dir`.
pub const STATE_FILE: &str = "last-good-policy.yaml";

#[derive(Clone)]
pub struct ControlPlaneSource {
    pub shared: Arc<Shared>,
    pub url: String,
    pub node_id: String,
    pub namespace: String,
    pub labels: HashMap<String, String>,
    pub state_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// The CA an https:// control plane's certificate is checked against.
    pub ca: Option<Ca>,
}

/// Where the control plane's CA comes from.
#[derive(Debug, Clone)]
pub enum Ca {
    File(PathBuf),
    Pem(String),
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The persisted form: a comment line with the version, then the policy YAML.
fn persist(dir: &Path, version: u64, yaml: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    std::fs::write(
        &tmp,
        format!("# sluice control-plane version {version}\n{yaml}"),
    )?;
    // Rename is atomic: a crash leaves the old file or the new one, never half.
    std::fs::rename(tmp, dir.join(STATE_FILE))
}

fn restored_version(text: &str) -> Option<u64> {
    text.lines()
        .next()?
        .strip_prefix("# sluice control-plane version ")?
        .trim()
        .parse()
        .ok()
}

/// The control-plane version of the serving runtime; 0 before any.
fn serving_version(shared: &Shared) -> u64 {
    shared.runtime.load().control_plane_version.unwrap_or(0)
}

/// Checks, applies and persists one pushed snapshot; returns the version and error
/// text its ACK or NACK carries. Blocking: building a runtime resolves names.
fn take_snapshot(
    shared: &Shared,
    url: &str,
    state_dir: Option<&Path>,
    snapshot: &api::Snapshot,
) -> (u64, String) {
    let label = format!("control-plane:{url} version {}", snapshot.version);
    let name = PathBuf::from(format!("control-plane version {}", snapshot.version));
    let checked = sluice_policy::check_str(&name, &snapshot.policies_yaml)
        .map_err(|e| e.0.iter().map(ToString::to_string).collect());
    let (result, errors) = apply(
        shared,
        checked,
        &label,
        "control-plane",
        Some(snapshot.version),
    );
    match result {
        ReloadResult::Rejected => (serving_version(shared), errors.join("\n")),
        ReloadResult::Accepted | ReloadResult::Unchanged => {
            // Unchanged content under a new number is still that number.
            if result == ReloadResult::Unchanged {
                adopt_version(shared, url, snapshot.version);
            }
            if let Some(dir) = state_dir {
                if let Err(e) = persist(dir, snapshot.version, &snapshot.policies_yaml) {
                    tracing::warn!(
                        dir = %dir.display(),
                        error = %e,
                        "cannot persist the policy"
                    );
                }
            }
            (snapshot.version, String::new())
        }
    }
}

/// Records `version` as the control-plane version of the (unchanged) runtime.
/// Blocking, like every runtime build.
fn adopt_version(shared: &Shared, url: &str, version: u64) {
    let current = shared.runtime.load_full();
    if !current.loaded() || current.control_plane_version == Some(version) {
        return;
    }
    // Runtime is immutable; rebuilding from the same set carries every component
    // over, so only the version number changes.
    let set = current.set.clone();
    let label = format!("control-plane:{url} version {version}");
    if let Ok(mut next) =
        crate::runtime::Runtime::build(set, label, Some(&current), &shared.globals)
    {
        next.control_plane_version = Some(version);
        shared.install(next);
    }
}

impl ControlPlaneSource {
    /// Applies the persisted snapshot, if any; true when one was applied.
    pub fn restore(&self) -> bool {
        let Some(dir) = &self.state_dir else {
            return false;
        };
        let path = dir.join(STATE_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return false;
        };
        let version = restored_version(&text);
        let checked = sluice_policy::check_str(&path, &text)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect());
        let label = format!(
            "state:{} (control-plane version {}, saved while connected to {})",
            path.display(),
            version.unwrap_or(0),
            self.url
        );
        let (result, _) = apply(&self.shared, checked, &label, "state", version);
        result == ReloadResult::Accepted
    }

    async fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        if self.url.starts_with("https://") {
            // No system roots are built in: the control plane's CA is named, never
            // guessed, so a certificate from anyone else's CA is refused.
            let pem = match &self.ca {
                Some(Ca::File(path)) => tokio::fs::read(path).await?,
                Some(Ca::Pem(pem)) => pem.clone().into_bytes(),
                None => anyhow::bail!(
                    "{} is https: name its CA with --ca-file or $SLUICE_CA_PEM",
                    self.url
                ),
            };
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint)
    }

    /// A channel to the control plane (TLS as configured) and the credentials every
    /// call carries: shared by the policy stream and the endpoints stream
    /// (`discovery`). The token file is read on each connection, so a rotated
    /// token is picked up by the next reconnect.
    pub async fn connect(&self) -> anyhow::Result<(Channel, Bearer)> {
        let channel = self.endpoint().await?.connect().await?;
        let token = match &self.token_file {
            Some(path) => Some(tokio::fs::read_to_string(path).await?.trim().to_owned()),
            None => None,
        };
        let header = token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
        Ok((channel, Bearer(header)))
    }

    /// One stream until it breaks; Ok(true) if at least one snapshot arrived.
    async fn session(&self) -> anyhow::Result<bool> {
        let (channel, bearer) = self.connect().await?;
        let mut client =
            api::policy_discovery_client::PolicyDiscoveryClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(api::DiscoveryRequest {
            node_id: self.node_id.clone(),
            labels: self.labels.clone(),
            namespace: self.namespace.clone(),
            version: serving_version(&self.shared),
            response_nonce: String::new(),
            error: String::new(),
        })
        .await?;
        let mut snapshots = client
            .stream_policies(ReceiverStream::new(rx))
            .await?
            .into_inner();
        self.shared.metrics.control_plane_connected.set(1);
        tracing::info!(
            url = self.url.as_str(),
            node = self.node_id.as_str(),
            "connected to the control plane"
        );
        let mut received = false;
        while let Some(mut snapshot) = snapshots.message().await? {
            received = true;
            let nonce = std::mem::take(&mut snapshot.nonce);
            // Building a runtime resolves backend names (blocking DNS) and persisting
            // writes a file: neither may stall this runtime's threads. Awaiting each
            // snapshot before reading the next keeps the one writer and the order.
            let (shared, url, state_dir) = (
                Arc::clone(&self.shared),
                self.url.clone(),
                self.state_dir.clone(),
            );
            let (version, error) = tokio::task::spawn_blocking(move || {
                take_snapshot(&shared, &url, state_dir.as_deref(), &snapshot)
            })
            .await?;
            tx.send(api::DiscoveryRequest {
                node_id: self.node_id.clone(),
                labels: HashMap::new(),
                namespace: String::new(),
                version,
                response_nonce: nonce,
                error,
            })
            .await?;
        }
        Ok(received)
    }

    /// Follows the control plane until shutdown.
    pub async fn run(self, mut shutdown: ShutdownWatch) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        // Ends on shutdown; each iteration is one connection attempt.
        loop {
            let outcome = tokio::select! {
                _ = shutdown.changed() => return,
                outcome = self.session() => outcome,
            };
            self.shared.metrics.control_plane_connected.set(0);
            match outcome {
                Ok(true) => backoff.reset(),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    url = self.url.as_str(),
                    error = format!("{e:#}"),
                    retry_in_ms = backoff.step().as_millis() as u64,
                    "control plane unreachable; serving the last good policy"
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
