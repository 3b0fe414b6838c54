//! `sluice-cp`: the control plane's command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_control_plane::cli::parse_args;

#[derive(Parser)]
#[command(
    name = "sluice-cp",
    version,
    about = "Sluice control plane and policy tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How CLI commands reach a running control plane.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The control plane's API, `http://HOST:PORT` or `https://HOST:PORT`.
    #[arg(long, default_value = sluice_control_plane::cli::DEFAULT_SERVER)]
    server: String,
    /// File holding the bearer token (else $SLUICE_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https:// server.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

impl RemoteArgs {
    fn remote(self) -> sluice_control_plane::cli::Remote {
        sluice_control_plane::cli::Remote {
            server: self.server,
            token_file: self.token_file,
            ca_file: self.ca_file,
        }
    }
}

/// How `status` prints.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// A table for people.
    Text,
    /// One JSON document for scripts.
    Json,
}

/// How sidecars are injected (`inject`, `webhook`, `serve --webhook`).
#[derive(clap::Args)]
struct InjectArgs {
    /// Proxy image for pods without a `sluice.dev/proxy-image` annotation.
    #[arg(long)]
    image: Option<String>,
    /// Control-plane URL for pods without a `sluice.dev/policy-configmap`.
    #[arg(long)]
    control_plane: Option<String>,
    /// The control plane's CA (PEM, the ca.crt of its TLS Secret), given to the
    /// proxies that follow it; required to inject those.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// OTLP/gRPC collector proxies send their spans to, for pods without a
    /// `sluice.dev/otlp-endpoint` (e.g. http://otel-collector.monitoring.svc:4317);
    /// without either a pod's proxy does not trace.
    #[arg(long, value_name = "URL", value_parser = sluice_control_plane::inject::OtlpEndpoint::parse)]
    otlp_endpoint: Option<sluice_control_plane::inject::OtlpEndpoint>,
    /// Share of traces proxies sample (0 to 1), for pods without a
    /// `sluice.dev/trace-sample-ratio`; default: the proxy's own (0.01).
    #[arg(long, value_name = "RATIO", value_parser = sluice_control_plane::inject::SampleRatio::parse)]
    trace_sample_ratio: Option<sluice_control_plane::inject::SampleRatio>,
}

impl InjectArgs {
    fn options(self) -> Result<sluice_control_plane::inject::InjectOptions, ExitCode> {
        let mut opts = sluice_control_plane::inject::InjectOptions::default();
        opts.image = self.image.unwrap_or(opts.image);
        opts.control_plane = self.control_plane.unwrap_or(opts.control_plane);
        opts.otlp_endpoint = self.otlp_endpoint;
        opts.trace_sample_ratio = self.trace_sample_ratio;
        if let Some(path) = self.ca_file {
            opts.ca_pem = Some(std::fs::read_to_string(&path).map_err(|e| {
                eprintln!("sluice-cp: --ca-file {}: {e}", path.display());
                ExitCode::FAILURE
            })?);
        }
        Ok(opts)
    }
}

/// The operational log of the long-running commands (`serve`, `webhook`).
#[derive(clap::Args)]
struct LogArgs {
    /// What the log (JSON lines on stderr) writes, in RUST_LOG syntax: `warn`, or
    /// `info,kube=debug`.
    #[arg(
        long,
        env = "RUST_LOG",
        value_name = "FILTER",
        default_value = sluice_logging::DEFAULT_FILTER,
        value_parser = sluice_logging::parse_filter
    )]
    log_level: sluice_logging::LogFilter,
}

impl LogArgs {
    /// Installs the log; the error ends the command (before it serves anything).
    fn init(&self) -> Result<(), ExitCode> {
        sluice_logging::init(&self.log_level).map_err(|e| {
            eprintln!("sluice-cp: {e}");
            ExitCode::FAILURE
        })
    }
}

/// `serve` as the mesh's certificate authority (`Identity.Certify`).
#[derive(clap::Args)]
struct CaArgs {
    /// CA certificate (PEM) that signs workload certificates; in Kubernetes the
    /// tls.crt of the `sluice-ca` Secret (`sluice-cp ca init` makes one).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Its private key (PKCS#8 PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The roots proxies trust (PEM bundle; default: --ca-cert). Holds the old and
    /// the new root while the root rotates.
    #[arg(long, requires = "ca_cert")]
    trust_roots: Option<PathBuf>,
    /// The trust domain of workload identities
    /// (spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT).
    #[arg(
        long,
        default_value = sluice_control_plane::ca::DEFAULT_TRUST_DOMAIN,
        value_parser = sluice_control_plane::ca::parse_trust_domain
    )]
    trust_domain: String,
    /// How long a workload certificate is valid (5m to 720h).
    #[arg(long, default_value = "24h", value_parser = sluice_control_plane::ca::parse_ttl)]
    cert_ttl: std::time::Duration,
    /// Let callers holding the static --token-file token name their identity in
    /// the CSR's URI SAN. For tests and development outside Kubernetes only: the
    /// static token proves no workload.
    #[arg(long, requires_all = ["ca_cert", "token_file"])]
    static_token_identities: bool,
}

impl CaArgs {
    fn config(self) -> Option<sluice_control_plane::ca::CaConfig> {
        let (cert, key) = self.ca_cert.zip(self.ca_key)?;
        Some(sluice_control_plane::ca::CaConfig {
            cert,
            key,
            trust_roots: self.trust_roots,
            trust_domain: self.trust_domain,
            ttl: self.cert_ttl,
            static_token_identities: self.static_token_identities,
        })
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new root CA (ECDSA P-256, 10 years) as ca.crt and ca.key in DIR,
    /// for the `sluice-ca` Secret; never overwrites.
    Init {
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        #[arg(
            long,
            default_value = sluice_control_plane::ca::DEFAULT_TRUST_DOMAIN,
            value_parser = sluice_control_plane::ca::parse_trust_domain
        )]
        trust_domain: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Serve validated, versioned policy to every proxy (and optionally the webhook).
    Serve {
        /// Policy directory, watched for changes (git-ops, ConfigMap mounts).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// The gRPC API. Loopback is open to local processes; any other address
        /// requires --tls-cert, --tls-key and --token-file.
        #[arg(long, default_value = "127.0.0.1:15010")]
        listen: std::net::SocketAddr,
        /// PEM certificate for the API (off loopback) and the webhook.
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// File holding the bearer token proxies and the CLI must present.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Follow the cluster's TrafficPolicy resources (in-cluster config or
        /// $KUBECONFIG) instead of a directory.
        #[arg(long, conflicts_with = "policies")]
        kubernetes: bool,
        /// Recognise proxies by their projected ServiceAccount tokens, checked with
        /// the Kubernetes TokenReview API (the static --token-file, if given, is
        /// accepted too: for the CLI and proxies outside the cluster).
        #[arg(long, requires = "kubernetes")]
        token_review: bool,
        /// The audience proxies' tokens must be for (the sidecar's projected token).
        #[arg(long, default_value = sluice_control_plane::auth::DEFAULT_AUDIENCE)]
        token_audience: String,
        /// A ServiceAccount (`NAMESPACE/NAME`) whose token may make the operator's
        /// calls (status, history, diff, rollback); repeatable.
        #[arg(
            long = "operator",
            value_name = "NAMESPACE/NAME",
            requires = "token_review"
        )]
        operators: Vec<String>,
        /// Also serve the sidecar-injecting admission webhook (HTTPS) here.
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        webhook: Option<std::net::SocketAddr>,
        /// Serve /live, /ready and /metrics (plain HTTP) here, for the kubelet's
        /// probes and Prometheus (e.g. 0.0.0.0:15014).
        #[arg(long, value_name = "ADDR")]
        telemetry: Option<std::net::SocketAddr>,
        #[command(flatten)]
        inject: InjectArgs,
        #[command(flatten)]
        ca: Box<CaArgs>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// The mesh's certificate authority (see docs/mtls.md).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Each connected proxy and the version it runs; the served version and source.
    Status {
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// What applying PATH would change against the served version, route by route.
    Diff {
        /// Policy file or directory.
        path: PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// The served sets this control plane keeps (the last 20), or one policy's
    /// versions (`--policy NAMESPACE/NAME`; for a TrafficPolicy resource, the specs
    /// that validated as its status keeps them, the same from every replica).
    History {
        /// One policy's versions instead.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        policy: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Serve an earlier set again (default: the one before the served one), or
    /// with `--policy`, write an earlier spec of that TrafficPolicy that validated
    /// back into it (default: the newest that differs from its spec).
    Rollback {
        /// The set number (`--policy`: the policy's version) to go back to.
        #[arg(long)]
        to: Option<String>,
        /// Roll back this TrafficPolicy alone, in the cluster (every replica
        /// follows).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        policy: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Validate policy files or directories; prints one line per policy, or every error.
    Validate {
        /// Policy files or directories (every *.yaml / *.yml inside).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the JSON Schema of the TrafficPolicy format.
    Schema,
    /// Print the TrafficPolicy CustomResourceDefinition (as in k8s/base/crd.yaml).
    Crd,
    /// Print Prometheus recording and burn-rate alert rules for every policy with an `slo`.
    SloRules {
        /// Policy file or directory.
        path: PathBuf,
    },
    /// Print Kubernetes manifests with the Sluice sidecar added to every workload.
    Inject {
        /// Manifest file (multi-document YAML or a List); `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// Serve the sidecar-injecting admission webhook over HTTPS.
    Webhook {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: std::net::SocketAddr,
        /// PEM certificate chain the API server trusts (via the webhook's caBundle).
        #[arg(long)]
        tls_cert: PathBuf,
        /// PEM private key of that certificate.
        #[arg(long)]
        tls_key: PathBuf,
        #[command(flatten)]
        inject: InjectArgs,
        #[command(flatten)]
        log: LogArgs,
    },
}

fn main() -> ExitCode {
    let cli: Cli = parse_args();
    match cli.command {
        Command::Serve {
            policies,
            listen,
            tls_cert,
            tls_key,
            token_file,
            kubernetes,
            token_review,
            token_audience,
            operators,
            webhook,
            telemetry,
            inject,
            ca,
            log,
        } => {
            if let Err(code) = log.init() {
                return code;
            }
            // In a cluster the static token proves no workload: with it naming
            // identities, whoever leaks it can be any workload of the mesh.
            if ca.static_token_identities && token_review {
                eprintln!(
                    "sluice-cp: --static-token-identities cannot be used with --token-review: in a cluster, workloads prove who they are with their ServiceAccount tokens"
                );
                return ExitCode::from(sluice_control_plane::cli::EX_USAGE);
            }
            let inject = match inject.options() {
                Ok(opts) => opts,
                Err(code) => return code,
            };
            let tls = tls_cert.zip(tls_key);
            let webhook = webhook.zip(tls.clone()).map(|(listen, (cert, key))| {
                sluice_control_plane::serve::WebhookConfig {
                    listen,
                    cert,
                    key,
                    inject,
                }
            });
            sluice_control_plane::cli::serve(
                sluice_control_plane::serve::ServeConfig {
                    policies,
                    listen,
                    tls,
                    cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
                    token_file,
                    kubernetes: None,
                    token_review: token_review.then_some(token_audience),
                    operators,
                    telemetry,
                    webhook,
                    ca: ca.config(),
                },
                kubernetes,
            )
        }
        Command::Ca(CaCommand::Init {
            out_dir,
            trust_domain,
        }) => match sluice_control_plane::ca::init(&out_dir, &trust_domain) {
            Ok(()) => {
                println!(
                    "wrote {0}/ca.crt and {0}/ca.key (keep the key secret; see docs/mtls.md)",
                    out_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice-cp: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Crd => {
            print!("{}", sluice_control_plane::kubernetes::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Status { remote, output } => {
            sluice_control_plane::cli::status(&remote.remote(), output == Output::Json)
        }
        Command::Diff { path, remote } => sluice_control_plane::cli::diff(&path, &remote.remote()),
        Command::History { policy, remote } => {
            sluice_control_plane::cli::history(&remote.remote(), policy.as_deref())
        }
        Command::Rollback { to, policy, remote } => {
            sluice_control_plane::cli::rollback(&remote.remote(), policy.as_deref(), to.as_deref())
        }
        Command::Validate { paths } => sluice_control_plane::validate::run(&paths),
        Command::Schema => {
            print!("{}", sluice_policy::schema::json_schema());
            ExitCode::SUCCESS
        }
        Command::SloRules { path } => sluice_control_plane::slo::run(path),
        Command::Inject { file, inject } => match inject.options() {
            Ok(opts) => sluice_control_plane::inject::run(&file, &opts),
            Err(code) => code,
        },
        Command::Webhook {
            listen,
            tls_cert,
            tls_key,
            inject,
            log,
        } => {
            if let Err(code) = log.init() {
                return code;
            }
            match inject.options() {
                Ok(opts) => sluice_control_plane::webhook::run(listen, &tls_cert, &tls_key, opts),
                Err(code) => code,
            }
        }
    }
}
