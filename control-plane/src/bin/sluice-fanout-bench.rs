//! `sluice-fanout-bench`: how long one policy change takes to reach many proxies.
//!
//! Opens `--streams` subscriptions to a running `sluice-cp serve`, spread round-robin
//! over `--connections` HTTP/2 connections (one tonic `Channel` each), as many
//! simulated proxies in one process. Each subscribes to the `--host`s given (as a
//! proxy discovering them on demand would; none: every policy) and answers every
//! update at once, as a proxy that applied it would. Once every stream holds policy
//! `--policy-id` (by its own receipt and by the control plane's status) it prints
//! `ready ...`, waits for `--gate` to exist (so a script can measure the idle control
//! plane), then replaces `--policy-file` with `--new-content` and measures, from that
//! write:
//!
//! - when every stream received the policy's new version, each stream's receive
//!   latency, and what the update carried (policies and bytes: the changed policy
//!   only, not the mesh);
//! - when `GetStatus` first showed every subscriber holding it.
//!
//! The time includes the control plane's debounce of directory events (it waits for
//! 100 ms without one) and validation; `write_to_accepted_ms` (from the history's
//! `accepted_at_ms`) separates those from the push itself. Results are `key=value`
//! lines on stdout; then it prints `done` and waits for `--gate` to disappear before
//! hanging up.
//!
//! `--mode endpoints` measures an endpoint change instead (see `fanout/endpoints.rs`):
//! one pod of a Service turning unready, reaching every stream subscribed to it.
//!
//! A benchmark, not a test: it talks to loopback only, and every wait is bounded by
//! `--timeout`.
#![forbid(unsafe_code)]

#[path = "fanout/endpoints.rs"]
mod endpoints;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
use sluice_control_plane::api::{HistoryRequest, PolicyRequest, StatusRequest};
use sluice_control_plane::serve::MAX_MESSAGE_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Every simulated proxy's node id starts with this, so status can be filtered.
const NODE_PREFIX: &str = "fanout-bench-";
/// How often `GetStatus` is polled while waiting for ACKs.
const STATUS_POLL: Duration = Duration::from_millis(5);

#[derive(Parser)]
#[command(
    name = "sluice-fanout-bench",
    about = "Time for one policy change to reach N subscribed proxies"
)]
struct Args {
    /// The control plane's API; loopback only (`http://127.0.0.1:PORT`).
    #[arg(long, default_value = sluice_control_plane::cli::DEFAULT_SERVER)]
    server: String,
    /// Simulated proxies (one stream each).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// What changes: a policy file (`--server`, `--policy-file`, `--new-content`),
    /// or one endpoint of a Service (an in-process control plane on a fake API server).
    #[arg(long, value_enum, default_value_t = Mode::Policies)]
    mode: Mode,
    /// A policy file in the served directory, replaced to trigger the push.
    #[arg(long, required_if_eq("mode", "policies"))]
    policy_file: Option<PathBuf>,
    /// The content it is replaced with (must validate, and differ).
    #[arg(long, required_if_eq("mode", "policies"))]
    new_content: Option<PathBuf>,
    /// The policy (`namespace/name`, or `name`) the new content changes.
    #[arg(long, required_if_eq("mode", "policies"))]
    policy_id: Option<String>,
    /// A host every stream subscribes to (repeatable); none: every policy.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// `--mode endpoints`: pods of the measured Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// `--mode endpoints`: worker threads of the in-process control plane.
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// After `ready`, wait for this file to exist; after `done`, for it to go.
    #[arg(long)]
    gate: Option<PathBuf>,
    /// Bound on every wait, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Policies,
    Endpoints,
}

/// An update as one subscriber received it.
struct Receipt {
    stream: usize,
    /// The version of the measured policy it carried, if it did.
    version: Option<String>,
    at: Instant,
    /// Policies it carried, and their YAML's bytes.
    policies: usize,
    bytes: usize,
}

/// What a subscriber reports to the measuring task.
/// What a subscriber reports: a receipt (a snapshot's, or in `--mode endpoints`
/// an endpoint update's), or its failure.
enum Event<R> {
    Received(R),
    Failed { stream: usize, error: String },
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if args.streams == 0 || args.connections == 0 || args.connections > args.streams {
        eprintln!("sluice-fanout-bench: need 1 <= --connections <= --streams");
        return ExitCode::from(64);
    }
    if args.mode == Mode::Endpoints {
        if args.endpoints == 0 || args.endpoints > 1000 || args.server_threads == 0 {
            eprintln!(
                "sluice-fanout-bench: need 1 <= --endpoints <= 1000 (one slice) and --server-threads >= 1"
            );
            return ExitCode::from(64);
        }
        let options = endpoints::Options {
            streams: args.streams,
            connections: args.connections,
            endpoints: args.endpoints,
            server_threads: args.server_threads,
            timeout: Duration::from_secs(args.timeout),
        };
        return match endpoints::run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-fanout-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = check_loopback(&args.server) {
        eprintln!("sluice-fanout-bench: {e}");
        return ExitCode::from(64);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-fanout-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-fanout-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A benchmark that opens a thousand streams must not be pointed at someone else's
/// server by a typo.
fn check_loopback(server: &str) -> anyhow::Result<()> {
    let uri: tonic::codegen::http::Uri = server
        .parse()
        .map_err(|e| anyhow!("--server {server}: {e}"))?;
    let host = uri.host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if uri.scheme_str() != Some("http") || !loopback {
        bail!("--server {server}: expected http:// to a loopback address");
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let limit = Duration::from_secs(args.timeout);
    // Required by clap in this mode.
    let (Some(policy_file), Some(new_content), Some(policy_id)) =
        (&args.policy_file, &args.new_content, &args.policy_id)
    else {
        bail!("--policy-file, --new-content and --policy-id are required");
    };
    let endpoint = Endpoint::from_shared(args.server.clone())
        .map_err(|e| anyhow!("--server {}: {e}", args.server))?
        .connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        // `connect` (not lazy) gives each Channel its own HTTP/2 connection.
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("cannot reach {}", args.server))?,
        );
    }
    // Status polls on a connection of their own, so they do not queue behind pushes.
    let mut status = PolicyDiscoveryClient::new(endpoint.connect().await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let subscribing = Instant::now();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    for stream in 0..args.streams {
        let channel = channels[stream % args.connections].clone();
        let events = events_tx.clone();
        let (hosts, id) = (args.hosts.clone(), policy_id.clone());
        tokio::spawn(async move {
            if let Err(e) = subscriber(stream, channel, hosts, &id, &events).await {
                let _ = events.send(Event::Failed {
                    stream,
                    error: format!("{e:#}"),
                });
            }
        });
    }
    drop(events_tx);

    // Phase 1: every stream holds the measured policy and the server knows it.
    let mut latest: Vec<Option<String>> = vec![None; args.streams];
    let mut first_at: Vec<Option<Instant>> = vec![None; args.streams];
    let (mut first_policies, mut first_bytes) = (0, 0);
    let deadline = subscribing + limit;
    while latest.iter().any(Option::is_none) {
        let r = next_event(&mut events, deadline, "the measured policy").await?;
        if r.version.is_some() {
            latest[r.stream] = r.version;
            (first_policies, first_bytes) = (r.policies, r.bytes);
        }
    }
    let initial = latest[0].clone().unwrap_or_default();
    if let Some(stream) = latest.iter().position(|v| v.as_deref() != Some(&initial)) {
        bail!(
            "the policy changed while subscribing (stream {stream} got {:?} and stream 0 got {initial}); rerun on a quiet policy directory",
            latest[stream]
        );
    }
    wait_all_acked(&mut status, args.streams, policy_id, &initial, deadline).await?;
    println!(
        "ready streams={} connections={} policy={policy_id} version={initial} \
         first_update_policies={first_policies} first_update_bytes={first_bytes} \
         subscribe_all_acked_ms={:.1}",
        args.streams,
        args.connections,
        ms(subscribing.elapsed())
    );

    if let Some(gate) = &args.gate {
        wait_for_file(gate, true, limit).await?;
    }

    // Phase 2: change the policy, then time the fan-out from that write.
    let content = std::fs::read(new_content)
        .with_context(|| format!("--new-content {}", new_content.display()))?;
    let (written, written_unix) = replace(policy_file, &content)?;
    let deadline = written + limit;
    let mut new_version = String::new();
    let (mut update_policies, mut update_bytes) = (0, 0);
    while first_at.iter().any(Option::is_none) {
        let r = match next_event(&mut events, deadline, "the new version").await {
            Ok(e) => e,
            Err(e) => {
                let rejected = status
                    .get_status(StatusRequest {})
                    .await
                    .map(|r| r.into_inner().rejected_errors)
                    .unwrap_or_default();
                if rejected.is_empty() {
                    return Err(e);
                }
                bail!("{e}; the control plane rejected the change: {rejected:?}");
            }
        };
        let Some(version) = r.version.filter(|v| *v != initial) else {
            continue;
        };
        if first_at[r.stream].is_none() {
            first_at[r.stream] = Some(r.at);
            if new_version.is_empty() {
                (new_version, update_policies, update_bytes) = (version, r.policies, r.bytes);
            }
        }
    }
    let mut received: Vec<Duration> = first_at
        .iter()
        .flatten()
        .map(|at| at.duration_since(written))
        .collect();
    received.sort();
    let all_received = received.last().copied().unwrap_or_default();
    let all_acked =
        wait_all_acked(&mut status, args.streams, policy_id, &new_version, deadline).await?;
    let accepted_at_ms = status
        .get_history(HistoryRequest::default())
        .await?
        .into_inner()
        .entries
        .last()
        .map_or(0, |e| e.accepted_at_ms);

    let spread = all_received.saturating_sub(received.first().copied().unwrap_or_default());
    println!(
        "result streams={} connections={} policy={policy_id} version={new_version} \
         update_policies={update_policies} update_bytes={update_bytes} \
         write_to_accepted_ms={:.1} write_to_all_received_ms={:.1} write_to_all_acked_ms={:.1} \
         first_to_last_received_ms={:.1} receive_p50_ms={:.1} receive_p99_ms={:.1} receive_max_ms={:.1}",
        args.streams,
        args.connections,
        accepted_at_ms as f64 - written_unix.as_secs_f64() * 1000.0,
        ms(all_received),
        ms(all_acked.duration_since(written)),
        ms(spread),
        ms(percentile(&received, 0.50)),
        ms(percentile(&received, 0.99)),
        ms(all_received),
    );
    println!("done");
    if let Some(gate) = &args.gate {
        wait_for_file(gate, false, limit).await?;
    }
    Ok(())
}

/// One simulated proxy: subscribes to `hosts` (none: everything), then answers
/// every update as soon as it arrives, refusing nothing.
async fn subscriber(
    stream: usize,
    channel: Channel,
    hosts: Vec<String>,
    policy_id: &str,
    events: &mpsc::UnboundedSender<Event<Receipt>>,
) -> anyhow::Result<()> {
    let node_id = format!("{NODE_PREFIX}{stream}");
    let mut client =
        PolicyDiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(4);
    tx.send(PolicyRequest {
        node_id: node_id.clone(),
        namespace: "bench".into(),
        all: hosts.is_empty(),
        hosts_added: hosts,
        ..Default::default()
    })
    .await?;
    let mut updates = client
        .stream_policies(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(update) = updates.message().await? {
        let at = Instant::now();
        tx.send(PolicyRequest {
            node_id: node_id.clone(),
            response_nonce: update.nonce.clone(),
            ..Default::default()
        })
        .await?;
        let received = Event::Received(Receipt {
            stream,
            version: update
                .policies
                .iter()
                .find(|p| p.id == policy_id)
                .map(|p| p.version.clone()),
            at,
            policies: update.policies.len(),
            bytes: update.policies.iter().map(|p| p.yaml.len()).sum(),
        });
        if events.send(received).is_err() {
            return Ok(());
        }
    }
    bail!("the control plane ended the stream")
}

/// The next receipt; a subscriber failure or the deadline is an error.
async fn next_event<R>(
    events: &mut mpsc::UnboundedReceiver<Event<R>>,
    deadline: Instant,
    waiting_for: &str,
) -> anyhow::Result<R> {
    let event = tokio::time::timeout_at(deadline.into(), events.recv())
        .await
        .map_err(|_| anyhow!("timed out waiting for {waiting_for}"))?;
    match event {
        Some(Event::Received(receipt)) => Ok(receipt),
        Some(Event::Failed { stream, error }) => bail!("stream {stream}: {error}"),
        // Subscribers only end by reporting a failure, so this is not reached.
        None => bail!("every subscriber ended"),
    }
}

/// Polls `GetStatus` until every simulated proxy is connected and holds `version`
/// of policy `id`; returns when the answer showing it arrived.
async fn wait_all_acked(
    status: &mut PolicyDiscoveryClient<Channel>,
    streams: usize,
    id: &str,
    version: &str,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    loop {
        let proxies = status
            .get_status(StatusRequest {})
            .await?
            .into_inner()
            .proxies;
        let at = Instant::now();
        let acked = proxies
            .iter()
            .filter(|p| p.node_id.starts_with(NODE_PREFIX))
            .filter(|p| {
                p.connected && p.policy_versions.get(id).map(String::as_str) == Some(version)
            })
            .count();
        if acked >= streams {
            return Ok(at);
        }
        if at >= deadline {
            bail!("timed out: {acked} of {streams} proxies ACKed version {version} in status");
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// Replaces `path` atomically (write beside it, rename over it), as git-ops tools and
/// ConfigMap updates do, so the control plane never reads half a file. Returns when
/// the rename happened.
fn replace(path: &Path, content: &[u8]) -> anyhow::Result<(Instant, Duration)> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("--policy-file {} is not a file", path.display()))?;
    // Not `.yaml`: the control plane's watch ignores it until the rename.
    let staged = path.with_file_name(format!(".{}.fanout-bench", name.to_string_lossy()));
    std::fs::write(&staged, content).with_context(|| format!("writing {}", staged.display()))?;
    let written = Instant::now();
    let written_unix = SystemTime::now().duration_since(UNIX_EPOCH)?;
    std::fs::rename(&staged, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok((written, written_unix))
}

async fn wait_for_file(path: &Path, present: bool, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while path.exists() != present {
        if Instant::now() >= deadline {
            bail!(
                "timed out waiting for {} to {}",
                path.display(),
                if present { "appear" } else { "go" }
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
