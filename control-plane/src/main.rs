//! `sluice-cp`: the control plane's command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Validate policy files or directories; prints one line per policy, or every error.
    Validate {
        /// Policy files or directories (every *.yaml / *.yml inside).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the JSON Schema of the TrafficPolicy format.
    Schema,
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
        /// Proxy image for pods without a `sluice.dev/proxy-image` annotation.
        #[arg(long)]
        image: Option<String>,
        /// Control-plane URL for pods without a `sluice.dev/policy-configmap`.
        #[arg(long)]
        control_plane: Option<String>,
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
        /// Proxy image for pods without a `sluice.dev/proxy-image` annotation.
        #[arg(long)]
        image: Option<String>,
        /// Control-plane URL for pods without a `sluice.dev/policy-configmap`.
        #[arg(long)]
        control_plane: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { paths } => sluice_control_plane::validate::run(&paths),
        Command::Schema => {
            print!("{}", sluice_policy::schema::json_schema());
            ExitCode::SUCCESS
        }
        Command::SloRules { path } => sluice_control_plane::slo::run(path),
        Command::Inject {
            file,
            image,
            control_plane,
        } => {
            let mut opts = sluice_control_plane::inject::InjectOptions::default();
            opts.image = image.unwrap_or(opts.image);
            opts.control_plane = control_plane.unwrap_or(opts.control_plane);
            sluice_control_plane::inject::run(&file, &opts)
        }
        Command::Webhook {
            listen,
            tls_cert,
            tls_key,
            image,
            control_plane,
        } => {
            let mut opts = sluice_control_plane::inject::InjectOptions::default();
            opts.image = image.unwrap_or(opts.image);
            opts.control_plane = control_plane.unwrap_or(opts.control_plane);
            sluice_control_plane::webhook::run(listen, &tls_cert, &tls_key, opts)
        }
    }
}
