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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { paths } => sluice_control_plane::validate::run(&paths),
        Command::Schema => {
            print!("{}", sluice_policy::schema::json_schema());
            ExitCode::SUCCESS
        }
    }
}
