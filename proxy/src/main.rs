//! `sluice-proxy`: parse the command line, load the policy, run the listeners.
//! Bad flags or unusable addresses exit with code 64 (`EX_USAGE`) and a message
//! naming the flag; failures while running exit with 1 (README, "Exit codes").
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use sluice_proxy::admin::{Admin, AdminListener, Scope};
use sluice_proxy::cli::{parse_args, EX_USAGE};
use sluice_proxy::control_plane::ControlPlaneSource;
use sluice_proxy::demand::Demand;
use sluice_proxy::exchange::{Direction, Side};
use sluice_proxy::globallimit;
use sluice_proxy::listeners::{write_ready_file, Bound, Listeners};
use sluice_proxy::phases::SluiceProxy;
use sluice_proxy::shared::Shared;
use sluice_proxy::shutdown::DrainOnSigterm;
use sluice_proxy::source::FileSource;
use sluice_proxy::tasks::{
    health_checks, housekeeping, Every, FollowControlPlane, ResolveBackends, SyncGlobalLimits,
};

/// The process allocator; a stateless handle, the one `static` the binary has.
/// glibc's malloc spends ~18% of a request's CPU here (profile in bench/RESULTS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(clap::Parser)]
#[command(
    name = "sluice-proxy",
    version,
    about = "Sluice data-plane proxy",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Policy file or directory (every *.yaml / *.yml), watched for changes.
    #[arg(
        long,
        required_unless_present = "control_plane",
        conflicts_with = "control_plane"
    )]
    policy: Option<PathBuf>,
    /// Follow the control plane instead of a file: `http://HOST:PORT` or `https://...`.
    #[arg(long)]
    control_plane: Option<String>,
    /// This proxy's name in the control plane's status (default: $POD_NAME, else $HOSTNAME).
    #[arg(long)]
    node_id: Option<String>,
    /// Namespace reported to the control plane (default: $POD_NAMESPACE).
    #[arg(long)]
    namespace: Option<String>,
    /// A label reported to the control plane, `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where the last good control-plane snapshot is kept, so a restart while the
    /// control plane is down still starts with a policy.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// With --control-plane: hold every policy of the mesh instead of discovering
    /// them on demand (by the Host of the first request for each).
    #[arg(long, requires = "control_plane")]
    all_policies: bool,
    /// A host whose policy is held from the start and never released (a declared
    /// dependency; repeatable). With --transparent, a service reached by its
    /// address without a Host its policy names must be declared.
    #[arg(long = "dependency", value_name = "HOST", requires = "control_plane")]
    dependencies: Vec<String>,
    /// How long a request for a host no held policy owns waits for the control
    /// plane's answer before it is answered as unowned.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    discovery_timeout: Duration,
    /// A policy discovered on demand, or a host no policy owns, is released after
    /// this long without a request (and twice this at most).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    policy_idle: Duration,
    /// File holding the bearer token for the control plane.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https:// control plane.
    #[arg(long, conflicts_with = "ca_pem")]
    ca_file: Option<PathBuf>,
    /// The same CA as PEM text (injected sidecars get it in $SLUICE_CA_PEM: a pod
    /// cannot mount a ConfigMap of the control plane's namespace).
    #[arg(long, env = "SLUICE_CA_PEM", hide_env_values = true)]
    ca_pem: Option<String>,
    /// Get this workload's certificate (mTLS, docs/mtls.md) from the control plane's
    /// CA, with the --token-file token, and renew it before it expires.
    #[arg(long, requires = "control_plane", conflicts_with = "identity_cert")]
    identity_from_control_plane: bool,
    /// The identity to ask for (spiffe://TD/ns/NS/sa/SA); only a control plane with
    /// --static-token-identities heeds it (tests, development), others take the
    /// identity from the token.
    #[arg(
        long,
        value_name = "SPIFFE_ID",
        requires = "identity_from_control_plane"
    )]
    identity_request: Option<String>,
    /// The HTTP listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    listen: SocketAddr,
    /// The admin listener: /live /ready /metrics /config_dump.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// A listener for probes and Prometheus (/live, /ready and /metrics only), for
    /// the pod IP, while the admin listener stays on loopback.
    #[arg(long)]
    telemetry: Option<SocketAddr>,
    /// Once every listener is bound, write their addresses here as JSON (`{"listen":
    /// "127.0.0.1:40123", "admin": ...}`, replaced atomically): how a test or a
    /// script learns the ports of listeners given port 0.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Worker threads for the proxy listener.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Longest wait for in-flight requests after SIGTERM (keep it under the pod's
    /// terminationGracePeriodSeconds, 30 s by default).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Turn the JSON access log on stdout off.
    #[arg(long)]
    no_access_log: bool,
    /// Record a span per request (and per attempt at a backend) and export them
    /// over OTLP/gRPC to this collector, `http://HOST:PORT` (usually port 4317) or
    /// `https://...` (with --otlp-ca-file). Tracing is off without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL", value_parser = parse_otlp_endpoint)]
    otlp_endpoint: Option<String>,
    /// The CA certificate (PEM) an `https://` --otlp-endpoint is checked against.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_CERTIFICATE",
        value_name = "PATH",
        requires = "otlp_endpoint"
    )]
    otlp_ca_file: Option<PathBuf>,
    /// The share of traces started here that are sampled at the head (0 to 1). A
    /// caller's sampled flag is followed whatever this says, and every refused,
    /// failed, retried or fallback request is exported anyway.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 0.01, value_parser = parse_ratio)]
    trace_sample_ratio: f64,
    /// Also accept HTTP/2 with prior knowledge (h2c) on the listeners: served by
    /// Sluice's h2 engine (docs/http2.md), or pingora's with `--engine pingora`.
    /// Transparent listeners accept it without this flag (`--engine h1`). The first
    /// 24 bytes of each connection tell, without a timeout, so a client that sends
    /// less than that and waits is not answered until it sends more.
    #[arg(long)]
    h2c: bool,
    /// The inbound sidecar listener: everything arriving here goes to `--app` under
    /// the policy named by `--inbound-policy` (its limits protect the app).
    #[arg(long)]
    inbound: Option<SocketAddr>,
    /// The local application the inbound listener delivers to (with
    /// `--transparent`, the port each connection was for is used instead).
    #[arg(long)]
    app: Option<SocketAddr>,
    /// The policy governing inbound traffic; without it (or while it is not
    /// loaded) inbound traffic reaches the app ungoverned and is counted.
    #[arg(long)]
    inbound_policy: Option<String>,
    /// Sidecar interception (iptables REDIRECT): recover each connection's original
    /// destination. Outbound requests no policy claims by Host are matched by that
    /// address against the policies' backends, else forwarded to it untouched;
    /// inbound requests go to the app on 127.0.0.1 at their original port.
    #[arg(long)]
    transparent: bool,
    /// With --transparent: destination ports whose connections are opaque TCP
    /// without waiting for the client to speak (server-speaks-first protocols:
    /// SMTP, MySQL, PostgreSQL, Redis...), comma-separated. Connections to other
    /// ports are HTTP/1, HTTP/2 or opaque by their first bytes.
    #[arg(long, value_delimiter = ',', default_value = sluice_proxy::detect::DEFAULT_OPAQUE_PORTS)]
    opaque_ports: Vec<u16>,
    /// With --transparent: how long to wait for a client's first bytes before its
    /// connection is taken for opaque TCP whose server speaks first.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    detect_timeout: Duration,
    /// With --transparent: close an opaque TCP connection idle this long both ways.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    tcp_idle_timeout: Duration,
    /// The HTTP engine of the listeners: `h1`, Sluice's own HTTP/1.1 fast path, which
    /// hands everything else (h2c, upgrades, chunked request bodies, HTTP/1.0, ...)
    /// to pingora; or `pingora` for every request.
    #[arg(long, value_enum, default_value_t = EngineArg::H1)]
    engine: EngineArg,
    /// `--engine h1`: disconnect a client idle this long between requests (or
    /// sending a request head slower than this).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// The Redis (`host:port`, or a `redis://[:PASSWORD@]host:port[/DB]` URL) holding
    /// the buckets of routes' `globalRateLimit`, shared by every replica. Without it
    /// those limits use each replica's own bucket (`whenUnreachable`).
    #[arg(long, env = "SLUICE_REDIS", value_parser = parse_redis)]
    redis: Option<String>,
    /// Longest wait for Redis (connecting, and each claim round trip) before it
    /// counts as unreachable. Requests never wait on Redis.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    redis_timeout: Duration,
    /// How long a route or a policy keeps its metric series without traffic. Series
    /// appear at a route's first request and are removed after this long without
    /// one (checked every second); a route used again starts them afresh, which
    /// `rate()` reads as a counter reset. The default is `metrics::ROUTE_SERIES_IDLE`.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    metrics_idle: Duration,
    /// The DNS server (`IP:PORT`) that backend names are re-resolved through, instead
    /// of the ones in /etc/resolv.conf (which the first resolution of a name, when a
    /// policy loads, still uses).
    #[arg(long, value_name = "ADDR")]
    dns_server: Option<SocketAddr>,
    /// This proxy's workload identity for mTLS with other Sluice proxies: its
    /// certificate chain (PEM, leaf first; the leaf names a
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` URI). Re-read when it changes.
    /// Needs `--identity-key` and `--trust-roots`.
    #[arg(long, value_name = "PATH", requires_all = ["identity_key", "trust_roots"])]
    identity_cert: Option<PathBuf>,
    /// The private key of `--identity-cert` (PEM).
    #[arg(long, value_name = "PATH", requires = "identity_cert")]
    identity_key: Option<PathBuf>,
    /// The roots peers' certificates must chain to (PEM; several during a root
    /// rotation).
    #[arg(long, value_name = "PATH", requires = "identity_cert")]
    trust_roots: Option<PathBuf>,
    /// What an inbound listener does with plaintext callers when their policy
    /// does not say (`spec.mtls.mode`): `permissive` serves them beside mTLS
    /// ones, `strict` refuses them.
    #[arg(long, value_enum, default_value_t = MtlsArg::Permissive)]
    mtls_mode: MtlsArg,
    /// What the operational log (JSON lines on stderr) writes, in RUST_LOG syntax:
    /// `warn`, or `info,sluice_proxy=debug`.
    #[arg(
        long,
        env = "RUST_LOG",
        value_name = "FILTER",
        default_value = sluice_logging::DEFAULT_FILTER,
        value_parser = sluice_logging::parse_filter
    )]
    log_level: sluice_logging::LogFilter,
}

/// An OTLP/gRPC endpoint: an absolute http:// or https:// URL with a host.
fn parse_otlp_endpoint(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("{s:?}: expected http://HOST:PORT or https://HOST:PORT"))?;
    if rest.split('/').next().is_none_or(str::is_empty) {
        return Err(format!("{s:?}: no host"));
    }
    tonic::transport::Endpoint::from_shared(s.to_owned())
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?}: {e}"))
}

/// A ratio in [0, 1].
fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: expected a number from 0 to 1")),
    }
}

/// Whether `url` is `https://`, or plain HTTP to a loopback address.
fn url_is_https_or_loopback(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How often the identity files are checked for a renewal (a stat of each).
const IDENTITY_FILES_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MtlsArg {
    Strict,
    Permissive,
}

impl MtlsArg {
    fn mode(self) -> sluice_policy::MtlsMode {
        match self {
            MtlsArg::Strict => sluice_policy::MtlsMode::Strict,
            MtlsArg::Permissive => sluice_policy::MtlsMode::Permissive,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EngineArg {
    H1,
    Pingora,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Install the pod's iptables rules redirecting TCP to the proxy (the init step).
    InitIptables {
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// The proxy's uid: its own connections are never redirected.
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// Comma-separated ports whose outbound traffic is not intercepted.
        #[arg(long, value_delimiter = ',')]
        skip_outbound_ports: Vec<u16>,
        /// Comma-separated ports whose inbound traffic is not intercepted.
        #[arg(long, value_delimiter = ',')]
        skip_inbound_ports: Vec<u16>,
        /// Comma-separated CIDRs whose outbound traffic is not intercepted.
        #[arg(long, value_delimiter = ',')]
        skip_outbound_cidrs: Vec<String>,
        /// The iptables binary.
        #[arg(long, default_value = "iptables")]
        iptables: String,
        /// Print the commands instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
}

fn init_iptables(sub: Sub) -> ExitCode {
    let Sub::InitIptables {
        outbound_port,
        inbound_port,
        proxy_uid,
        admin_port,
        skip_outbound_ports,
        skip_inbound_ports,
        skip_outbound_cidrs,
        iptables,
        dry_run,
    } = sub;
    let cfg = sluice_proxy::iptables::InterceptConfig {
        outbound_port,
        inbound_port,
        proxy_uid,
        admin_port,
        skip_outbound_ports,
        skip_inbound_ports,
        skip_outbound_cidrs,
    };
    if let Err(e) = cfg.check() {
        eprintln!("sluice-proxy init-iptables: {e}");
        return ExitCode::from(EX_USAGE);
    }
    if dry_run {
        for rule in sluice_proxy::iptables::rules(&cfg) {
            println!("{iptables} {}", rule.join(" "));
        }
        return ExitCode::SUCCESS;
    }
    match sluice_proxy::iptables::apply(&cfg, &iptables) {
        Ok(()) => {
            tracing::info!(
                outbound_port,
                inbound_port,
                proxy_uid,
                "iptables interception installed"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice-proxy init-iptables: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

/// `host:port` (a name or an IP literal, `[v6]:port` for IPv6), or a `redis://` URL
/// (`redis://:PASSWORD@host:port/DB`, for a Redis that wants AUTH).
fn parse_redis(text: &str) -> Result<String, String> {
    if text.starts_with("redis://") {
        return redis::Client::open(text)
            .map(|_| text.to_owned())
            .map_err(|e| format!("{}: {e}", globallimit::redacted(text)));
    }
    sluice_policy::validate::parse_address(text)
        .map(|a| a.to_string())
        .ok_or_else(|| format!("expected host:port or a redis:// URL, got {text:?}"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    sluice_policy::duration::parse(text)
        .ok_or_else(|| format!("expected a duration such as 10s, got {text:?}"))
}

/// Serves `flow` on `socket` with the engine the flags choose.
fn add_listener(server: &mut Server, args: &Args, flow: SluiceProxy, socket: Bound) {
    let name = flow.side.direction.as_str();
    let mut h2c = pingora::apps::HttpServerOptions::default();
    h2c.h2c = args.h2c;
    // Both engines listen through Sluice's HTTP/1 front: with `--engine h1` it
    // serves requests itself and hands the rest to pingora; with `--engine
    // pingora` it hands every connection over, through the same strict checks
    // (front.rs), so the engines accept exactly the same requests.
    // pingora gets two instances: one without h2c for HTTP/1 connections (its h2c
    // check would wait for 24 bytes the front already read), one with it for
    // connections opening with the HTTP/2 preface.
    let conf = &server.configuration;
    let pingora = pingora::proxy::http_proxy(conf, flow.clone());
    let pingora_h2c = args.h2c.then(|| {
        let mut proxy = pingora::proxy::http_proxy(conf, flow.clone());
        proxy.server_options = Some(h2c);
        proxy
    });
    let mut service = background_service(
        name,
        sluice_proxy::h1::Listener::new(
            flow,
            socket,
            pingora,
            pingora_h2c,
            args.idle_timeout,
            matches!(args.engine, EngineArg::H1),
        ),
    );
    service.threads = Some(args.threads.max(1));
    server.add_service(service);
}

fn main() -> ExitCode {
    let mut args: Args = parse_args();
    if let Err(e) = sluice_logging::init(&args.log_level) {
        eprintln!("sluice-proxy: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(sub) = args.command.take() {
        return init_iptables(sub);
    }
    // Checked before anything is bound or started: a usage error changes nothing.
    if args.inbound.is_some() && args.app.is_none() && !args.transparent {
        eprintln!(
            "sluice-proxy: --inbound needs --app (or --transparent, which delivers to the original port)"
        );
        return ExitCode::from(EX_USAGE);
    }
    // The control plane's answer carries the trust roots this proxy will trust:
    // over plaintext anyone on the path could hand it theirs.
    if let (true, Some(url)) = (args.identity_from_control_plane, &args.control_plane) {
        if !url_is_https_or_loopback(url) {
            eprintln!(
                "sluice-proxy: --identity-from-control-plane needs an https:// --control-plane (or one on loopback): its answer names the roots this proxy trusts"
            );
            return ExitCode::from(EX_USAGE);
        }
    }
    let listeners = match Listeners::bind(args.listen, args.admin, args.telemetry, args.inbound) {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("sluice-proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let bound = listeners.addrs();
    if let Some(policy) = args.policy.as_ref().filter(|p| !p.exists()) {
        eprintln!(
            "sluice-proxy: --policy {}: no such file or directory",
            policy.display()
        );
        return ExitCode::from(EX_USAGE);
    }
    let node_id = args
        .node_id
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("sluice-proxy-{}", std::process::id()));

    let otlp_ca = match &args.otlp_ca_file {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                eprintln!("sluice-proxy: --otlp-ca-file {}: {e}", path.display());
                return ExitCode::from(EX_USAGE);
            }
        },
        None => None,
    };
    if let (Some(url), None) = (&args.otlp_endpoint, &otlp_ca) {
        if url.starts_with("https://") {
            eprintln!("sluice-proxy: --otlp-endpoint {url} is https: name its CA with --otlp-ca-file (or $OTEL_EXPORTER_OTLP_CERTIFICATE)");
            return ExitCode::from(EX_USAGE);
        }
    }
    let (tracer, spans) = match &args.otlp_endpoint {
        Some(_) => {
            let (queue, rx) = sluice_proxy::trace::SpanQueue::new(sluice_proxy::trace::SPAN_QUEUE);
            let sampler = sluice_proxy::trace::Sampler::new(args.trace_sample_ratio);
            (
                Some(sluice_proxy::trace::Tracer { sampler, queue }),
                Some(rx),
            )
        }
        None => (None, None),
    };
    let shared = match Shared::new(!args.no_access_log, args.redis.is_some()) {
        Ok(shared) => {
            let shared = shared.with_metrics_idle(args.metrics_idle);
            Arc::new(match tracer {
                Some(tracer) => shared.with_tracer(tracer),
                None => shared,
            })
        }
        Err(e) => {
            eprintln!("sluice-proxy: metrics: {e}");
            return ExitCode::FAILURE;
        }
    };

    // The identity files must load at start (like a bad flag, a broken set is
    // fixed before the proxy runs); later changes are picked up by `identity-files`.
    let identity_files = match (&args.identity_cert, &args.identity_key, &args.trust_roots) {
        (Some(cert), Some(key), Some(roots)) => {
            let files = sluice_proxy::identity::files::Files {
                cert: cert.clone(),
                key: key.clone(),
                roots: roots.clone(),
            };
            match files.load(&shared.identity) {
                Ok(active) => {
                    tracing::info!(identity = %active.identity, "workload identity loaded")
                }
                Err(e) => {
                    eprintln!("sluice-proxy: --identity-cert: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            }
            Some(files)
        }
        _ => None,
    };

    // An invalid policy at start is logged and leaves /ready at 503 until a valid
    // one arrives: the pod gets no traffic, and fixing the source recovers it.
    let mut _watcher = None;
    let mut control_plane = None;
    if let Some(path) = &args.policy {
        let source = FileSource {
            shared: Arc::clone(&shared),
            path: path.clone(),
        };
        source.reload();
        match source.watch() {
            Ok(w) => _watcher = Some(w),
            Err(e) => {
                eprintln!("sluice-proxy: cannot watch {}: {e}", path.display());
                return ExitCode::from(EX_USAGE);
            }
        }
    }
    let mut asks = None;
    if let Some(url) = &args.control_plane {
        let namespace = args
            .namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_default();
        if !args.all_policies {
            let (demand, rx) = Demand::new(args.discovery_timeout, args.policy_idle);
            let _ = shared.demand.set(demand);
            asks = Some(rx);
        }
        // The inbound policy is this pod's namespace's.
        let inbound: Vec<String> = args
            .inbound_policy
            .iter()
            .map(|name| {
                if name.contains('/') || namespace.is_empty() {
                    name.clone()
                } else {
                    format!("{namespace}/{name}")
                }
            })
            .collect();
        let source = ControlPlaneSource {
            shared: Arc::clone(&shared),
            url: url.clone(),
            node_id: node_id.clone(),
            namespace,
            labels: args.labels.iter().cloned().collect(),
            state_dir: args.state_dir.clone(),
            token_file: args.token_file.clone(),
            ca: match (&args.ca_file, &args.ca_pem) {
                (Some(file), _) => Some(sluice_proxy::control_plane::Ca::File(file.clone())),
                (None, Some(pem)) => Some(sluice_proxy::control_plane::Ca::Pem(pem.clone())),
                (None, None) => None,
            },
            all: args.all_policies,
            policies: inbound,
            hosts: args
                .dependencies
                .iter()
                .map(|h| sluice_policy::validate::host_without_port(h).to_ascii_lowercase())
                .collect(),
        };
        source.restore();
        control_plane = Some(source);
    }

    let drain_secs = args.drain_timeout.as_secs().max(1);
    let conf = ServerConf {
        threads: args.threads.max(1),
        // One current-thread runtime per worker thread (Envoy's and nginx's model:
        // a connection stays on its thread); work stealing buys nothing at the
        // default of one thread and costs cross-thread wake-ups (~3% req/s here).
        work_stealing: false,
        grace_period_seconds: Some(drain_secs),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let own_ports: Vec<u16> = bound.iter().map(|(_, addr)| addr.port()).collect();
    let detect = args.transparent.then(|| sluice_proxy::detect::Detection {
        opaque_ports: args.opaque_ports.clone(),
        timeout: args.detect_timeout,
        idle_timeout: args.tcp_idle_timeout,
    });
    let outbound = SluiceProxy::new(
        Arc::clone(&shared),
        Side {
            direction: Direction::Outbound,
            inbound_policy: None,
            inbound_app: None,
            own_ports: own_ports.clone(),
            mtls_default: args.mtls_mode.mode(),
        },
        args.transparent,
        detect.clone(),
    );
    let Listeners {
        listen,
        admin,
        telemetry,
        inbound,
    } = listeners;
    let served: Vec<SocketAddr> = [Some(listen.addr), inbound.as_ref().map(|b| b.addr)]
        .into_iter()
        .flatten()
        .collect();
    add_listener(&mut server, &args, outbound, listen);
    if let Some(inbound_socket) = inbound {
        let inbound = SluiceProxy::new(
            Arc::clone(&shared),
            Side {
                direction: Direction::Inbound,
                inbound_policy: args.inbound_policy.clone(),
                inbound_app: args.app,
                own_ports,
                mtls_default: args.mtls_mode.mode(),
            },
            args.transparent,
            detect,
        );
        add_listener(&mut server, &args, inbound, inbound_socket);
    }
    for (name, bound, scope) in [
        ("admin", Some(admin), Scope::Full),
        ("telemetry", telemetry, Scope::Telemetry),
    ] {
        let Some(bound) = bound else { continue };
        let admin = Admin {
            needs_identity: args.identity_from_control_plane,
            shared: Arc::clone(&shared),
            listeners: served.clone(),
            scope,
        };
        server.add_service(background_service(
            name,
            AdminListener::new(admin, bound.socket),
        ));
    }
    let log = Arc::clone(&shared);
    server.add_service(background_service(
        "access-log",
        Every {
            period: sluice_proxy::accesslog::FLUSH_EVERY,
            job: move || log.access_log.flush(),
        },
    ));
    if let Some(files) = identity_files {
        use sluice_proxy::identity::files::{Reload, Seen};
        let (tls, seen) = (
            Arc::clone(&shared),
            std::sync::Mutex::new(Seen::loaded(files.stamp())),
        );
        server.add_service(background_service(
            "identity-files",
            Every {
                period: IDENTITY_FILES_EVERY,
                job: move || {
                    let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    match files.reload_if_changed(&tls.identity, &mut seen) {
                        Reload::Loaded(active) => {
                            tracing::info!(identity = %active.identity, "workload identity renewed")
                        }
                        Reload::Refused { error, first: true } => {
                            tracing::error!(error = %error, "workload identity files do not load; keeping the current identity and trying again every second")
                        }
                        Reload::Refused { first: false, .. } | Reload::Unchanged => {}
                    }
                },
            },
        ));
    }
    if let (Some(endpoint), Some(rx)) = (&args.otlp_endpoint, spans) {
        let resource = sluice_proxy::otlp::Config::resource_from(
            std::env::var("OTEL_SERVICE_NAME").ok().as_deref(),
            std::env::var("OTEL_RESOURCE_ATTRIBUTES").ok().as_deref(),
        );
        tracing::info!(
            endpoint,
            ratio = args.trace_sample_ratio,
            "exporting spans over OTLP"
        );
        server.add_service(background_service(
            "otlp-export",
            sluice_proxy::otlp::ExportSpans {
                config: sluice_proxy::otlp::Config {
                    endpoint: endpoint.clone(),
                    ca_pem: otlp_ca,
                    resource,
                },
                spans: std::sync::Mutex::new(Some(rx)),
                exported: shared.metrics.trace_spans_exported.clone(),
                failed: shared.metrics.trace_spans_dropped_export_failed.clone(),
            },
        ));
    }
    let checks = Arc::clone(&shared);
    server.add_service(background_service(
        "health-checks",
        Every {
            period: Duration::from_millis(100),
            job: move || health_checks(&checks),
        },
    ));
    let (house, seconds) = (Arc::clone(&shared), AtomicU64::new(0));
    server.add_service(background_service(
        "housekeeping",
        Every {
            period: Duration::from_secs(1),
            job: move || {
                let n = seconds.fetch_add(1, Ordering::Relaxed) + 1;
                housekeeping(&house, n, Instant::now());
            },
        },
    ));
    server.add_service(background_service(
        "resolve-backends",
        ResolveBackends {
            shared: Arc::clone(&shared),
            dns_server: args.dns_server,
        },
    ));
    if let Some(redis) = args.redis.clone() {
        server.add_service(background_service(
            "global-rate-limits",
            SyncGlobalLimits {
                shared: Arc::clone(&shared),
                redis,
                timeout: args.redis_timeout,
            },
        ));
    }
    // The workload's certificate from the control plane's CA, kept fresh.
    if let (true, Some(source)) = (args.identity_from_control_plane, &control_plane) {
        server.add_service(background_service(
            "identity",
            sluice_proxy::issuer::RenewIdentity {
                renewal: sluice_proxy::issuer::Renewal {
                    url: source.url.clone(),
                    ca: source.ca.clone(),
                    token_file: source.token_file.clone(),
                    requested: args.identity_request.clone(),
                },
                tls: Arc::clone(&shared.identity),
            },
        ));
    }
    if let Some(source) = control_plane {
        // Service backends' pods: a stream of its own beside the policy stream, on
        // its own background runtime (a slow policy apply does not delay it).
        server.add_service(background_service(
            "control-plane-endpoints",
            sluice_proxy::discovery::FollowEndpoints {
                source: source.clone(),
            },
        ));
        server.add_service(background_service(
            "control-plane",
            FollowControlPlane(std::sync::Mutex::new(Some((source, asks)))),
        ));
    }

    for (listener, addr) in &bound {
        tracing::info!(listener, addr = %addr, "listening");
    }
    if let Some(path) = &args.ready_file {
        if let Err(e) = write_ready_file(path, &bound) {
            eprintln!("sluice-proxy: --ready-file {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(
        policy = args.policy.as_ref().map(|p| p.display().to_string()),
        control_plane = args.control_plane.as_deref(),
        node_id,
        "started"
    );
    let flush_at_exit = Arc::clone(&shared);
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSigterm {
            shared,
            drain_timeout: args.drain_timeout,
        }),
    });
    flush_at_exit.access_log.flush();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Args;

    #[test]
    fn metrics_idle_defaults_to_route_series_idle() {
        let args = Args::try_parse_from(["sluice-proxy", "--policy", "p.yaml"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args.metrics_idle, sluice_proxy::metrics::ROUTE_SERIES_IDLE);
    }

    #[test]
    fn detection_defaults_match_the_documented_ones() {
        let args = Args::try_parse_from(["sluice-proxy", "--policy", "p.yaml"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            args.opaque_ports,
            [25, 587, 3306, 4444, 5432, 6379, 9300, 11211]
        );
        assert_eq!(
            args.detect_timeout,
            sluice_proxy::detect::DEFAULT_DETECT_TIMEOUT
        );
        assert_eq!(
            args.tcp_idle_timeout,
            sluice_proxy::detect::DEFAULT_TCP_IDLE_TIMEOUT
        );
    }
}
