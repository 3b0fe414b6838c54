//! `sluice-proxy`: parse the command line, load the policy, run the listeners.
//! Bad flags or unusable addresses exit with code 64 and a clear message.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use clap::Parser;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use prometheus::Registry;
use sluice_proxy::accesslog::event;
use sluice_proxy::admin::Admin;
use sluice_proxy::metrics::Metrics;
use sluice_proxy::proxy::{Shared, SluiceProxy};
use sluice_proxy::shutdown::DrainOnSigterm;
use sluice_proxy::source::FileSource;
use sluice_proxy::trace::IdGenerator;

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "sluice-proxy", version, about = "Sluice data-plane proxy")]
struct Args {
    /// Policy file or directory (every *.yaml / *.yml), watched for changes.
    #[arg(long)]
    policy: PathBuf,
    /// The HTTP listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    listen: SocketAddr,
    /// The admin listener: /live /ready /metrics /config_dump.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
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
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    sluice_policy::duration::parse(text)
        .ok_or_else(|| format!("expected a duration such as 10s, got {text:?}"))
}

/// Binding early turns "address in use" into a clear exit instead of a panic inside
/// pingora's listener task; the socket is released again for pingora to bind.
fn check_bindable(addr: SocketAddr, what: &str) -> Result<(), String> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}

/// Every second: publish route gauges (breaker state, concurrency limit and in-flight,
/// keyed-limiter sizes and overflow); every 10 s forget refilled rate-limit keys.
struct Housekeeping {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            n += 1;
            let Some(runtime) = self.shared.runtime.load_full() else {
                continue;
            };
            let metrics = &self.shared.metrics;
            for route in runtime.routes() {
                let labels = [route.policy.as_str(), route.name.as_str()];
                if let Some(breaker) = &route.breaker {
                    metrics
                        .breaker_state
                        .with_label_values(&labels)
                        .set(breaker.state().gauge());
                }
                if let Some(limiter) = &route.concurrency {
                    metrics
                        .concurrency_limit
                        .with_label_values(&labels)
                        .set(i64::from(limiter.limit()));
                    metrics
                        .route_inflight
                        .with_label_values(&labels)
                        .set(i64::from(limiter.inflight()));
                }
                let Some(limiter) = &route.limiter else {
                    continue;
                };
                if limiter.key().is_none() {
                    continue;
                }
                if n.is_multiple_of(10) {
                    limiter.sweep();
                }
                metrics
                    .rate_limit_keys
                    .with_label_values(&labels)
                    .set(limiter.tracked_keys() as i64);
                let overflowed = limiter.take_overflowed();
                if overflowed > 0 {
                    metrics
                        .rate_limit_overflow
                        .with_label_values(&labels)
                        .inc_by(overflowed);
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    for (addr, what) in [(args.listen, "--listen"), (args.admin, "--admin")] {
        if let Err(e) = check_bindable(addr, what) {
            eprintln!("sluice-proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    }
    if !args.policy.exists() {
        eprintln!(
            "sluice-proxy: --policy {}: no such file or directory",
            args.policy.display()
        );
        return ExitCode::from(EX_USAGE);
    }

    let runtime = Arc::new(ArcSwapOption::empty());
    let metrics = match Metrics::register(Registry::new(), Arc::clone(&runtime)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("sluice-proxy: metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared {
        runtime,
        metrics,
        ids: IdGenerator::default(),
        inflight: AtomicUsize::new(0),
        access_log: !args.no_access_log,
    });

    let source = FileSource {
        shared: Arc::clone(&shared),
        path: args.policy.clone(),
    };
    // An invalid policy at start is logged and leaves /ready at 503 until a valid
    // one is written: the pod gets no traffic, and fixing the ConfigMap recovers it.
    source.reload();
    let _watcher = match source.watch() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("sluice-proxy: cannot watch {}: {e}", args.policy.display());
            return ExitCode::from(EX_USAGE);
        }
    };

    let drain_secs = args.drain_timeout.as_secs().max(1);
    let conf = ServerConf {
        threads: args.threads.max(1),
        grace_period_seconds: Some(drain_secs),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut outbound = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        SluiceProxy {
            shared: Arc::clone(&shared),
            direction: "outbound",
        },
        "outbound",
    );
    outbound.add_tcp(&args.listen.to_string());
    server.add_service(outbound);

    let mut admin = Service::new(
        "admin".to_owned(),
        Admin {
            shared: Arc::clone(&shared),
        },
    );
    admin.add_tcp(&args.admin.to_string());
    admin.threads = Some(1);
    server.add_service(admin);
    server.add_service(background_service(
        "housekeeping",
        Housekeeping {
            shared: Arc::clone(&shared),
        },
    ));

    event(
        "info",
        "listening",
        serde_json::json!({"listen": args.listen.to_string(), "admin": args.admin.to_string(), "policy": args.policy.display().to_string()}),
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSigterm {
            shared,
            drain_timeout: args.drain_timeout,
        }),
    });
    ExitCode::SUCCESS
}
