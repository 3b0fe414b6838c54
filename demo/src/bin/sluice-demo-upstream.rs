//! `sluice-demo-upstream`: a demo backend for trying Sluice by hand and in demos.
//!
//! It serves [`sluice_demo::upstream`] on one address until SIGINT or SIGTERM, so
//! a demo can run a few named backends (`--name a`, `--name b`) and watch the proxy
//! balance, retry and break circuits between them. Per-request behaviour is steered with
//! the `x-demo-status` and `x-demo-delay-ms` request headers.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_demo::upstream::{Upstream, UpstreamConfig};
use tokio::signal::unix::{signal, SignalKind};

/// Demo HTTP/1.1 backend for Sluice.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Name sent back in the `x-upstream` header and the response body.
    #[arg(long)]
    name: String,
    /// Latency added before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of requests answered 503, from 0.0 to 1.0 (deterministic, evenly spread).
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio)]
    fail_ratio: f64,
}

fn parse_ratio(value: &str) -> Result<f64, String> {
    let ratio: f64 = value
        .parse()
        .map_err(|_| format!("expected a number from 0.0 to 1.0, got {value:?}"))?;
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(format!("expected a number from 0.0 to 1.0, got {ratio}"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = sluice_demo::cli::parse_args();
    let config = UpstreamConfig {
        name: args.name,
        latency: Duration::from_millis(args.latency_ms),
        fail_ratio: args.fail_ratio,
    };
    let upstream = Upstream::start(args.listen, config)
        .await
        .with_context(|| format!("cannot serve on {}", args.listen))?;
    eprintln!(
        "sluice-demo-upstream {:?} listening on {}",
        upstream.name(),
        upstream.addr()
    );
    wait_for_shutdown_signal().await?;
    eprintln!(
        "sluice-demo-upstream {:?} stopping after {} requests",
        upstream.name(),
        upstream.requests()
    );
    upstream.shutdown().await;
    Ok(())
}

async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT"),
        _ = terminate.recv() => Ok(()),
    }
}
