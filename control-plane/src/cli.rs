//! The control-plane commands that talk to a running server: `serve` itself,
//! `status`, `diff`, `history` and `rollback`. Errors end the command with a clear
//! message and exit code 1, or [`EX_USAGE`] (64) for bad arguments.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::api::policy_discovery_client::PolicyDiscoveryClient;
use crate::api::{self, CurrentRequest, HistoryRequest, RollbackRequest, StatusRequest};
use crate::serve::{self, ServeConfig, MAX_MESSAGE_BYTES};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:15010";

/// The exit code of a usage error (`EX_USAGE` from BSD's sysexits.h): a bad,
/// missing or conflicting flag, or a configuration refused before starting. clap's
/// own code is 2; 64 is what Sluice documents, so scripts and Kubernetes events can
/// tell "fix the arguments" (64) from "it failed while running" (1).
pub const EX_USAGE: u8 = 64;

/// Parses the process's arguments, or exits: 0 after `--help`/`--version` (printed
/// to stdout), [`EX_USAGE`] after any other error (clap's message on stderr, which
/// names the flag). Call it first in `main`, before anything needs dropping.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // `use_stderr` is false exactly for the help and version displays.
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(i32::from(code));
        }
    }
}

/// How to reach the server.
pub struct Remote {
    pub server: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

/// Adds the bearer token to a call.
pub type AddToken = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

/// A client that adds the bearer token to every call.
pub type Client = PolicyDiscoveryClient<InterceptedService<Channel, AddToken>>;

/// Connects to `remote.server` (`http://` or `https://`), with the token if given.
pub async fn connect(remote: &Remote) -> anyhow::Result<Client> {
    let mut endpoint = Endpoint::from_shared(remote.server.clone())
        .map_err(|e| anyhow::anyhow!("--server {}: {e}", remote.server))?
        .connect_timeout(std::time::Duration::from_secs(5));
    if remote.server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &remote.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the control plane at {}: {e}", remote.server))?;
    let token = match &remote.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("SLUICE_TOKEN").ok(),
    };
    let header = token
        .map(|t| format!("Bearer {t}").parse::<tonic::metadata::MetadataValue<_>>())
        .transpose()
        .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
    let add_token: AddToken = Box::new(move |mut req: Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    Ok(PolicyDiscoveryClient::with_interceptor(channel, add_token)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Ends a command: 0, or the error on stderr with [`EX_USAGE`] when it is a
/// [`serve::UsageError`] and 1 otherwise.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "sluice-cp: {e:#}");
            if e.is::<serve::UsageError>() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `sluice-cp serve`: the API (and the webhook and telemetry, when asked) until
/// SIGTERM / SIGINT; exit code 1 when any of them cannot start or stops early.
pub fn serve(mut config: ServeConfig, kubernetes: bool) -> ExitCode {
    // Before looking for a cluster: a usage error is reported as such even where
    // there is none. (`--kubernetes` with `--policies` is clap's to refuse.)
    if let Err(e) = config.check() {
        return finish(Err(e.into()));
    }
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            if kubernetes {
                config.kubernetes = Some(kube::Config::infer().await.map_err(|e| {
                    anyhow::anyhow!("--kubernetes: no cluster configuration found: {e}")
                })?);
            }
            let (stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("shutting down");
                let _ = stop.send(true);
            });
            let mut stopped = stopped;
            let running = serve::start(config, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await?;
            running.wait().await
        })
    }))
}

fn ms_to_rfc3339(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[derive(Serialize)]
struct StatusJson<'a> {
    served_version: u64,
    served_source: &'a str,
    content_hash: &'a str,
    rollback: bool,
    rejected_errors: &'a [String],
    proxies: Vec<ProxyJson<'a>>,
}

#[derive(Serialize)]
struct ProxyJson<'a> {
    node_id: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    pod: &'a str,
    authenticated_by: &'a str,
    labels: std::collections::BTreeMap<&'a str, &'a str>,
    /// The version of each policy the proxy holds.
    policy_versions: std::collections::BTreeMap<&'a str, &'a str>,
    /// Its subscription: every policy, or hosts and policies by identity.
    all_policies: bool,
    hosts_wanted: u32,
    policies_wanted: u32,
    connected: bool,
    connected_since: String,
    last_nack: &'a [String],
    last_nack_error: &'a str,
    /// The ACKed version of each Service's endpoint set.
    endpoint_versions: std::collections::BTreeMap<&'a str, u64>,
    last_endpoints_nack_error: &'a str,
    last_endpoints_nack: &'a [String],
}

/// `sluice-cp status`.
pub fn status(remote: &Remote, json: bool) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let mut client = connect(remote).await?;
            let s = client.get_status(StatusRequest {}).await?.into_inner();
            let mut out = std::io::stdout().lock();
            if json {
                let view = StatusJson {
                    served_version: s.served_version,
                    served_source: &s.served_source,
                    content_hash: &s.content_hash,
                    rollback: s.rollback,
                    rejected_errors: &s.rejected_errors,
                    proxies: s.proxies.iter().map(proxy_json).collect(),
                };
                writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
                return Ok(());
            }
            print_status(&mut out, &s)?;
            Ok(())
        })
    }))
}

fn proxy_json(p: &api::ProxyStatus) -> ProxyJson<'_> {
    ProxyJson {
        node_id: &p.node_id,
        namespace: &p.namespace,
        service_account: &p.service_account,
        pod: &p.pod,
        authenticated_by: &p.authenticated_by,
        labels: p
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        policy_versions: p
            .policy_versions
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        all_policies: p.all_policies,
        hosts_wanted: p.hosts_wanted,
        policies_wanted: p.policies_wanted,
        connected: p.connected,
        connected_since: ms_to_rfc3339(p.connected_since_ms),
        last_nack: &p.last_nack,
        last_nack_error: &p.last_nack_error,
        endpoint_versions: p
            .endpoint_versions
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect(),
        last_endpoints_nack_error: &p.last_endpoints_nack_error,
        last_endpoints_nack: &p.last_endpoints_nack,
    }
}

/// Services shown per proxy in the text status (`--output json` has them all).
const SHOWN_SERVICES: usize = 8;

/// The proxy's endpoint sets, on indented lines under its row: the ACKed version
/// of each Service (`shop/reviews@7`), and its last endpoints NACK if any.
fn print_endpoints(out: &mut impl Write, p: &api::ProxyStatus) -> std::io::Result<()> {
    if !p.endpoint_versions.is_empty() {
        let mut services: Vec<(&String, &u64)> = p.endpoint_versions.iter().collect();
        services.sort();
        let shown: Vec<String> = services
            .iter()
            .take(SHOWN_SERVICES)
            .map(|(s, v)| format!("{s}@{v}"))
            .collect();
        let more = services.len().saturating_sub(SHOWN_SERVICES);
        let tail = if more > 0 {
            format!(" (and {more} more; --output json lists all)")
        } else {
            String::new()
        };
        writeln!(out, "  endpoints acked: {}{tail}", shown.join(" "))?;
    }
    if !p.last_endpoints_nack_error.is_empty() {
        let of = if p.last_endpoints_nack.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.last_endpoints_nack.join(", "))
        };
        writeln!(out, "  endpoints NACK: {}{of}", p.last_endpoints_nack_error)?;
    }
    Ok(())
}

fn print_status(out: &mut impl Write, s: &api::StatusResponse) -> std::io::Result<()> {
    if s.served_version == 0 {
        writeln!(out, "serving nothing yet")?;
    } else {
        writeln!(
            out,
            "serving version {} ({}, {} policies) from {}{}",
            s.served_version,
            s.content_hash,
            s.policies,
            s.served_source,
            if s.rollback { " [rollback]" } else { "" }
        )?;
    }
    if !s.rejected_errors.is_empty() {
        writeln!(out, "refused:")?;
        for e in &s.rejected_errors {
            writeln!(out, "  {e}")?;
        }
    }
    writeln!(
        out,
        "{:<32} {:<16} {:<20} {:>8} {:<12} {:>10} {:<21} LAST NACK",
        "NODE", "NAMESPACE", "SERVICE-ACCOUNT", "POLICIES", "WANTS", "CONNECTED", "SINCE"
    )?;
    for p in &s.proxies {
        let nack = if p.last_nack_error.is_empty() {
            "-".to_owned()
        } else {
            format!("{}: {}", p.last_nack.join(", "), p.last_nack_error)
        };
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        writeln!(
            out,
            "{:<32} {:<16} {:<20} {:>8} {:<12} {:>10} {:<21} {nack}",
            p.node_id,
            or_dash(&p.namespace),
            or_dash(&p.service_account),
            p.policy_versions.len(),
            if p.all_policies {
                "all".to_owned()
            } else {
                format!("{}h {}p", p.hosts_wanted, p.policies_wanted)
            },
            if p.connected { "yes" } else { "no" },
            ms_to_rfc3339(p.connected_since_ms)
        )?;
        print_endpoints(out, p)?;
    }
    Ok(())
}

/// `sluice-cp diff PATH`.
pub fn diff(path: &Path, remote: &Remote) -> ExitCode {
    let proposed = match sluice_policy::load_path(path) {
        Ok(set) => set,
        Err(errors) => {
            let _ = writeln!(std::io::stderr(), "{errors}");
            return ExitCode::FAILURE;
        }
    };
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let mut client = connect(remote).await?;
            let served = match client.get_current(CurrentRequest {}).await {
                Ok(s) => {
                    let s = s.into_inner();
                    sluice_policy::parse_str(
                        Path::new(&format!("served version {}", s.version)),
                        &s.policies_yaml,
                    )
                    .map_err(|e| anyhow::anyhow!("the served policy does not parse: {e}"))?
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    sluice_policy::PolicySet::default()
                }
                Err(status) => return Err(status.into()),
            };
            let changes = crate::diff::diff(&served, &proposed);
            let mut out = std::io::stdout().lock();
            if changes.is_empty() {
                writeln!(out, "no changes")?;
            }
            for c in changes {
                writeln!(out, "{c}")?;
            }
            Ok(())
        })
    }))
}

/// `sluice-cp history [--policy NAMESPACE/NAME]`.
pub fn history(remote: &Remote, policy: Option<&str>) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let mut client = connect(remote).await?;
            let h = client
                .get_history(HistoryRequest {
                    policy: policy.unwrap_or_default().to_owned(),
                })
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            if policy.is_some() {
                writeln!(
                    out,
                    "{:<17} {:>10} {:<21} SOURCE",
                    "VERSION", "GENERATION", "SERVED"
                )?;
                for e in h.entries {
                    let served = if e.accepted_at_ms == 0 {
                        "-".to_owned()
                    } else {
                        ms_to_rfc3339(e.accepted_at_ms)
                    };
                    writeln!(
                        out,
                        "{:<17} {:>10} {:<21} {}",
                        e.policy_version, e.generation, served, e.source
                    )?;
                }
                return Ok(());
            }
            writeln!(
                out,
                "{:>8} {:<17} {:<21} {:>8} SOURCE",
                "VERSION", "HASH", "ACCEPTED", "POLICIES"
            )?;
            for e in h.entries {
                writeln!(
                    out,
                    "{:>8} {:<17} {:<21} {:>8} {}",
                    e.version,
                    e.content_hash,
                    ms_to_rfc3339(e.accepted_at_ms),
                    e.policies,
                    e.source
                )?;
            }
            Ok(())
        })
    }))
}

/// `sluice-cp rollback [--to VERSION]`, or `--policy NAMESPACE/NAME [--to VERSION]`.
pub fn rollback(remote: &Remote, policy: Option<&str>, to: Option<&str>) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let request = match policy {
                Some(policy) => RollbackRequest {
                    policy: policy.to_owned(),
                    to_policy_version: to.unwrap_or_default().to_owned(),
                    ..Default::default()
                },
                None => RollbackRequest {
                    to_version: match to {
                        Some(v) => v
                            .parse()
                            .map_err(|_| anyhow::anyhow!("--to {v}: a set's number, like 3"))?,
                        None => 0,
                    },
                    ..Default::default()
                },
            };
            let mut client = connect(remote).await?;
            let r = client
                .rollback(request)
                .await
                .map_err(|s| anyhow::anyhow!("rollback refused: {}", s.message()))?
                .into_inner();
            if let Some(policy) = policy {
                writeln!(
                    std::io::stdout(),
                    "{policy} has version {} again (generation {})",
                    r.policy_version,
                    r.generation
                )?;
                return Ok(());
            }
            let served = r
                .served
                .ok_or_else(|| anyhow::anyhow!("the server returned no snapshot"))?;
            writeln!(
                std::io::stdout(),
                "now serving version {} ({})",
                served.version,
                served.source
            )?;
            Ok(())
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_each_proxys_acked_endpoint_sets_and_its_last_endpoints_nack() {
        let proxy = api::ProxyStatus {
            node_id: "client-0".into(),
            connected: true,
            endpoint_versions: (0..10).map(|i| (format!("shop/s{i}"), i)).collect(),
            last_endpoints_nack_error: "no port 80".into(),
            last_endpoints_nack: vec!["shop/s1@4".into()],
            ..Default::default()
        };
        let status = api::StatusResponse {
            served_version: 3,
            proxies: vec![proxy],
            ..Default::default()
        };
        let mut out = Vec::new();
        print_status(&mut out, &status).expect("printed");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("client-0 "), "{text}");
        assert_eq!(
            lines[3],
            "  endpoints acked: shop/s0@0 shop/s1@1 shop/s2@2 shop/s3@3 shop/s4@4 shop/s5@5 \
             shop/s6@6 shop/s7@7 (and 2 more; --output json lists all)"
        );
        assert_eq!(lines[4], "  endpoints NACK: no port 80 (shop/s1@4)");
    }
}
