//! Policy from the control plane: one gRPC stream (`PolicyDiscovery.StreamPolicies`)
//! on which every policy is a resource of its own. The proxy subscribes to what it
//! uses: the hosts its requests name (on demand, see [`crate::demand`]), its
//! inbound policy and declared dependencies, or everything (`--all-policies`).
//! Each update (policies added or changed, removed, hosts no policy owns) is
//! checked policy by policy: a policy that does not validate is refused alone, in
//! the answer, and the rest are applied through the same path as file reloads
//! ([`crate::source::apply`]: lossless, state carried over).
//!
//! When the control plane is unreachable the proxy keeps serving what it holds and
//! reconnects with jittered exponential backoff, telling the control plane what it
//! holds so only what changed is sent again. What it holds is persisted to
//! `--state-dir`, so a proxy restarted while the control plane is down starts from
//! it (and `/ready` names that source). Policies discovered on demand and left
//! without a request for the idle period are released.
//!
//! Applying an update blocks (building a runtime resolves backend names; persisting
//! writes a file), so the stream hands each one to tokio's blocking pool and waits
//! for it before reading the next: the reload order is the push order, and there is
//! still one writer.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::ShutdownWatch;
use sluice_policy::{Checked, PolicySet, TrafficPolicy};
use tokio::sync::mpsc;
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

/// Largest update accepted (the control plane's own limit).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// The first reconnect step; it doubles up to [`MAX_BACKOFF`], and each wait is drawn
/// at random below the current step ("full jitter") so a fleet does not reconnect in
/// lockstep.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// File name of the persisted policies inside `--state-dir`.
pub const STATE_FILE: &str = "last-good-policy.yaml";
/// Hosts sent in one subscription message.
const ASKS_PER_MESSAGE: usize = 256;
/// Most parts of one answer (each at most 1,000 policies): a bound on what the
/// proxy buffers before applying.
const MAX_PARTS: usize = 1000;

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
    /// Subscribe to every policy of the mesh instead of discovering on demand.
    pub all: bool,
    /// Policies held whatever their use, by identity (the inbound policy).
    pub policies: Vec<String>,
    /// Hosts held whatever their use (declared dependencies).
    pub hosts: Vec<String>,
}

/// The policies this proxy holds, by identity: each one's last good version.
#[derive(Default, Clone)]
struct Held {
    policies: BTreeMap<String, (String, TrafficPolicy)>,
}

impl Held {
    fn from_set(set: PolicySet) -> Held {
        Held {
            policies: set
                .policies
                .into_iter()
                .map(|p| {
                    let version = sluice_policy::policy_yaml(&p).1;
                    (p.id().to_string(), (version, p))
                })
                .collect(),
        }
    }

    fn set(&self) -> PolicySet {
        PolicySet {
            policies: self.policies.values().map(|(_, p)| p.clone()).collect(),
        }
    }

    fn versions(&self) -> HashMap<String, String> {
        self.policies
            .iter()
            .map(|(id, (v, _))| (id.clone(), v.clone()))
            .collect()
    }
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

async fn endpoint(url: &str, ca: Option<&Ca>) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        // No system roots are built in: the control plane's CA is named, never
        // guessed, so a certificate from anyone else's CA is refused.
        let pem = match ca {
            Some(Ca::File(path)) => tokio::fs::read(path).await?,
            Some(Ca::Pem(pem)) => pem.clone().into_bytes(),
            None => anyhow::bail!("{url} is https: name its CA with --ca-file or $SLUICE_CA_PEM"),
        };
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint)
}

/// A channel to the control plane at `url` (https:// checked against `ca`) and the
/// bearer token of `token_file` for every call. The token file is read on each
/// connection, so a rotated token is picked up by the next reconnect.
pub async fn connect(
    url: &str,
    ca: Option<&Ca>,
    token_file: Option<&Path>,
) -> anyhow::Result<(Channel, Bearer)> {
    let channel = endpoint(url, ca).await?.connect().await?;
    let token = match token_file {
        Some(path) => Some(tokio::fs::read_to_string(path).await?.trim().to_owned()),
        None => None,
    };
    let header = token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
    Ok((channel, Bearer(header)))
}

/// Writes what the proxy holds (multi-document YAML, after a comment naming where
/// it came from).
fn persist(dir: &Path, url: &str, yaml: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    std::fs::write(
        &tmp,
        format!("# sluice: the policies held from the control plane at {url}\n{yaml}"),
    )?;
    // Rename is atomic: a crash leaves the old file or the new one, never half.
    std::fs::rename(tmp, dir.join(STATE_FILE))
}

/// What became of one update: the policies refused (identity -> why).
struct Applied {
    refused: HashMap<String, String>,
}

/// Checks each policy of `update` on its own, then applies what the proxy holds
/// with the good ones in and the removed ones out. Blocking: building a runtime
/// resolves names, persisting writes a file.
fn take_update(
    shared: &Shared,
    url: &str,
    state_dir: Option<&Path>,
    held: &mut Held,
    update: &api::PolicyUpdate,
) -> Applied {
    let mut refused = HashMap::new();
    let mut next = held.clone();
    for id in &update.removed {
        next.policies.remove(id);
    }
    let mut warnings = Vec::new();
    let mut taken = Vec::new();
    for resource in &update.policies {
        let place = PathBuf::from(format!("control-plane:{}", resource.id));
        let checked = match sluice_policy::check_str(&place, &resource.yaml) {
            Ok(Checked {
                mut set,
                warnings: w,
            }) if set.policies.len() == 1 => {
                let policy = set.policies.remove(0);
                if policy.id().to_string() == resource.id {
                    warnings.extend(w);
                    Ok(policy)
                } else {
                    Err(format!(
                        "the resource {} holds policy {}",
                        resource.id,
                        policy.id()
                    ))
                }
            }
            Ok(c) => Err(format!(
                "the resource {} holds {} policies, not one",
                resource.id,
                c.set.policies.len()
            )),
            Err(errors) => Err(errors
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")),
        };
        match checked {
            Ok(policy) => {
                taken.push(resource.id.clone());
                next.policies
                    .insert(resource.id.clone(), (resource.version.clone(), policy));
            }
            Err(why) => {
                tracing::error!(
                    policy = resource.id.as_str(),
                    error = why.as_str(),
                    "policy rejected"
                );
                refused.insert(resource.id.clone(), why);
            }
        }
    }
    // The control plane gives every host one owner; a proxy may still hold an old
    // owner for a moment (its removal in a later update): the newcomer waits.
    let mut owners: HashMap<&str, &str> = HashMap::new();
    for (id, (_, policy)) in &next.policies {
        if taken.contains(id) {
            continue;
        }
        for host in &policy.hosts {
            owners.insert(host, id);
        }
    }
    let mut conflicted = Vec::new();
    for id in &taken {
        if let Some((_, policy)) = next.policies.get(id) {
            if let Some((host, owner)) = policy
                .hosts
                .iter()
                .find_map(|h| owners.get(h.as_str()).map(|o| (h, *o)))
            {
                conflicted.push((id.clone(), format!("host {host} is held by policy {owner}")));
            } else {
                for host in &policy.hosts {
                    owners.insert(host, id);
                }
            }
        }
    }
    for (id, why) in conflicted {
        match held.policies.get(&id) {
            Some(old) => next.policies.insert(id.clone(), old.clone()),
            None => next.policies.remove(&id),
        };
        refused.insert(id, why);
    }
    let label = format!("control-plane:{url}");
    let (result, errors) = apply(
        shared,
        Ok(Checked {
            set: next.set(),
            warnings,
        }),
        &label,
        "control-plane",
    );
    if result == ReloadResult::Rejected {
        // The runtime could not be built with them: every new one is refused, and
        // what was held stays.
        let why = errors.join("\n");
        for resource in &update.policies {
            refused
                .entry(resource.id.clone())
                .or_insert_with(|| why.clone());
        }
        return Applied { refused };
    }
    *held = next;
    if let Some(dir) = state_dir {
        if let Err(e) = persist(dir, url, &sluice_policy::to_yaml(&held.set())) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot persist the policy");
        }
    }
    Applied { refused }
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
        let checked = sluice_policy::check_str(&path, &text)
            .map_err(|e| e.0.iter().map(ToString::to_string).collect());
        let label = format!(
            "state:{} (saved while connected to {})",
            path.display(),
            self.url
        );
        let (result, _) = apply(&self.shared, checked, &label, "state");
        result == ReloadResult::Accepted
    }

    /// A channel to the control plane (TLS as configured) and the credentials every
    /// call carries: shared by the policy stream, the endpoints stream
    /// (`discovery`) and certificate requests (`issuer`).
    pub async fn connect(&self) -> anyhow::Result<(Channel, Bearer)> {
        connect(&self.url, self.ca.as_ref(), self.token_file.as_deref()).await
    }

    /// The first message of a stream: who this proxy is, what it wants, and what
    /// it holds already.
    fn subscribe(&self, held: &Held) -> api::PolicyRequest {
        let mut hosts = self.hosts.clone();
        if let Some(demand) = self.shared.demand.get() {
            // What it holds (after a restart, from the state file) it goes on
            // wanting, until it is released like anything discovered.
            let holding: Vec<String> = held
                .policies
                .iter()
                .filter(|(id, _)| !self.policies.contains(id))
                .flat_map(|(_, (_, p))| p.hosts.iter().cloned())
                .filter(|h| !self.hosts.contains(h))
                .collect();
            demand.hold(&holding);
            hosts.extend(demand.asked());
        }
        api::PolicyRequest {
            node_id: self.node_id.clone(),
            labels: self.labels.clone(),
            namespace: self.namespace.clone(),
            hosts_added: hosts,
            policies_added: self.policies.clone(),
            all: self.all,
            held: held.versions(),
            ..Default::default()
        }
    }

    /// One stream until it breaks; Ok(true) if at least one update arrived.
    async fn session(
        &self,
        held: &mut Held,
        asks: &mut Option<mpsc::Receiver<String>>,
    ) -> anyhow::Result<bool> {
        let (channel, bearer) = self.connect().await?;
        let mut client =
            api::policy_discovery_client::PolicyDiscoveryClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(4);
        tx.send(self.subscribe(held)).await?;
        let mut updates = client
            .stream_policies(ReceiverStream::new(rx))
            .await?
            .into_inner();
        self.shared.metrics.control_plane_connected.set(1);
        let demand = self.shared.demand.get();
        if let Some(demand) = demand {
            demand.set_connected(true);
        }
        tracing::info!(
            url = self.url.as_str(),
            node = self.node_id.as_str(),
            "connected to the control plane"
        );
        let idle = demand.map_or(Duration::from_secs(3600), |d| d.idle);
        let mut release = tokio::time::interval(idle.max(Duration::from_secs(1)));
        release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        release.reset();
        let mut received = false;
        // The parts of an answer not yet whole, and their nonces and policies.
        let mut pending = api::PolicyUpdate::default();
        let mut parts: Vec<(String, Vec<String>)> = Vec::new();
        let node = self.node_id.clone();
        let message = |m: api::PolicyRequest| api::PolicyRequest {
            node_id: node.clone(),
            ..m
        };
        // Ends when the stream breaks (an error) or the control plane ends it.
        loop {
            tokio::select! {
                update = updates.message() => {
                    let Some(part) = update? else { break };
                    received = true;
                    // A large answer comes in parts: applied together, once whole.
                    parts.push((
                        part.nonce.clone(),
                        part.policies.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
                    ));
                    anyhow::ensure!(
                        parts.len() <= MAX_PARTS,
                        "the control plane sent an answer in more than {MAX_PARTS} parts"
                    );
                    let more = part.more;
                    pending.policies.extend(part.policies);
                    pending.removed.extend(part.removed);
                    pending.unknown_hosts.extend(part.unknown_hosts);
                    if more {
                        continue;
                    }
                    let update = std::mem::take(&mut pending);
                    let unknown = update.unknown_hosts.clone();
                    // Building a runtime resolves backend names (blocking DNS) and
                    // persisting writes a file: neither may stall this runtime's
                    // threads. Awaiting each update before reading the next keeps
                    // the one writer and the order.
                    let (shared, url, state_dir, mut mine) = (
                        Arc::clone(&self.shared),
                        self.url.clone(),
                        self.state_dir.clone(),
                        std::mem::take(held),
                    );
                    let (applied, mine) = tokio::task::spawn_blocking(move || {
                        let applied = take_update(&shared, &url, state_dir.as_deref(), &mut mine, &update);
                        (applied, mine)
                    })
                    .await?;
                    *held = mine;
                    if let Some(demand) = demand {
                        let owned: Vec<String> = held
                            .policies
                            .values()
                            .flat_map(|(_, p)| p.hosts.iter().cloned())
                            .collect();
                        demand.owned(&owned);
                        demand.answered(&unknown, Instant::now());
                    }
                    // Each part is answered by its nonce, with its own refusals.
                    for (nonce, ids) in parts.drain(..) {
                        let refused = ids
                            .iter()
                            .filter_map(|id| Some((id.clone(), applied.refused.get(id)?.clone())))
                            .collect();
                        tx.send(message(api::PolicyRequest {
                            response_nonce: nonce,
                            refused,
                            ..Default::default()
                        }))
                        .await?;
                    }
                }
                Some(host) = recv(asks) => {
                    let mut hosts = vec![host];
                    if let Some(asks) = asks.as_mut() {
                        while hosts.len() < ASKS_PER_MESSAGE {
                            match asks.try_recv() {
                                Ok(h) => hosts.push(h),
                                Err(_) => break,
                            }
                        }
                    }
                    tx.send(message(api::PolicyRequest {
                        hosts_added: hosts,
                        ..Default::default()
                    }))
                    .await?;
                }
                _ = release.tick(), if demand.is_some() => {
                    let released = self.release(held, idle);
                    if !released.is_empty() {
                        tracing::info!(hosts = released.join(","), "releasing hosts left without requests");
                        tx.send(message(api::PolicyRequest {
                            hosts_removed: released,
                            ..Default::default()
                        }))
                        .await?;
                    }
                }
            }
        }
        Ok(received)
    }

    /// The hosts to release: those of policies discovered on demand that saw no
    /// request since the last call (so idle for between `idle` and twice that),
    /// and hosts no policy owns that were answered over `idle` ago. Declared
    /// dependencies and the inbound policy are never released.
    fn release(&self, held: &Held, idle: Duration) -> Vec<String> {
        let Some(demand) = self.shared.demand.get() else {
            return Vec::new();
        };
        let runtime = self.shared.runtime.load();
        let mut out = Vec::new();
        for policy in &runtime.policies {
            if self.policies.contains(&policy.name) {
                continue;
            }
            if policy.used.swap(false, Ordering::Relaxed) {
                continue;
            }
            let Some((_, held_policy)) = held.policies.get(&policy.name) else {
                continue;
            };
            let asked: Vec<String> = held_policy
                .hosts
                .iter()
                .filter(|h| demand.was_asked(h) && !self.hosts.contains(h))
                .cloned()
                .collect();
            out.extend(asked);
        }
        if let Some(before) = Instant::now().checked_sub(idle) {
            out.extend(demand.unknown_since(before));
        }
        demand.release(&out);
        out
    }

    /// What the proxy holds: the live snapshot's policies (after a restart, those
    /// of the state file).
    fn held_now(&self) -> Held {
        let runtime = self.shared.runtime.load();
        if runtime.loaded() {
            Held::from_set(runtime.set.clone())
        } else {
            Held::default()
        }
    }

    /// Follows the control plane until shutdown. `asks` are the hosts requests
    /// want (on demand; `None` with `--all-policies`).
    pub async fn run(self, mut asks: Option<mpsc::Receiver<String>>, mut shutdown: ShutdownWatch) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        let mut held = self.held_now();
        // Ends on shutdown; each iteration is one connection attempt.
        loop {
            if held.policies.is_empty() {
                // Lost with an apply that failed mid-way (it holds them while it
                // runs): what serves is what the proxy holds.
                held = self.held_now();
            }
            let outcome = tokio::select! {
                _ = shutdown.changed() => return,
                outcome = self.session(&mut held, &mut asks) => outcome,
            };
            self.shared.metrics.control_plane_connected.set(0);
            if let Some(demand) = self.shared.demand.get() {
                demand.set_connected(false);
                // Nobody answers now: whoever waits looks again and goes on.
                demand.answered(&[], Instant::now());
            }
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

/// The next host asked for, or never (no demand, or its senders are gone).
async fn recv(asks: &mut Option<mpsc::Receiver<String>>) -> Option<String> {
    match asks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
