//! `sluice-bench-load`: a fixed-rate HTTP/1.1 load for scenario benchmarks.
//!
//! Sends requests at `--rate` per second over keep-alive connections for the phases
//! given (`--phases before:5,during:10,after:10`), and prints one Markdown table row
//! per phase: requests, errors (non-2xx answers plus failed exchanges), error rate,
//! p50 and p99 latency. Phases are cut by time since start, so a script can change
//! the world (stop a backend) on the same schedule.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use sluice_demo::client::HttpClient;

#[derive(Parser)]
#[command(about = "Fixed-rate load with per-phase error rates and latency")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:15001")]
    target: SocketAddr,
    #[arg(long, default_value = "demo")]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Requests per second, all connections together.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// `name:seconds,...`
    #[arg(long, default_value = "run:10", value_parser = parse_phases)]
    phases: Phases,
    /// Label for the first column of the table.
    #[arg(long, default_value = "")]
    variant: String,
}

/// The phases in order, each a name and its length in seconds.
#[derive(Clone)]
struct Phases(Vec<(String, f64)>);

/// A malformed phase is a usage error (exit 64), not one silently skipped.
fn parse_phases(text: &str) -> Result<Phases, String> {
    text.split(',')
        .map(|phase| {
            phase
                .split_once(':')
                .and_then(|(name, secs)| Some((name.to_owned(), secs.parse().ok()?)))
                .filter(|(_, secs): &(String, f64)| secs.is_finite() && *secs >= 0.0)
                .ok_or_else(|| format!("expected name:seconds,..., got {phase:?}"))
        })
        .collect::<Result<_, _>>()
        .map(Phases)
}

/// One request: seconds since start, latency, whether it failed.
type Sample = (f64, Duration, bool);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Args = sluice_demo::cli::parse_args();
    let phases = &args.phases.0;
    let total: f64 = phases.iter().map(|(_, s)| s).sum();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let start = Instant::now();
    let interval =
        Duration::from_secs_f64(f64::from(args.connections) / f64::from(args.rate.max(1)));
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (samples, host, path, target) = (
            Arc::clone(&samples),
            args.host.clone(),
            args.path.clone(),
            args.target,
        );
        tasks.push(tokio::spawn(async move {
            let mut client: Option<HttpClient> = None;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // Bounded by the total phase time.
            while start.elapsed().as_secs_f64() < total {
                tick.tick().await;
                let sent = Instant::now();
                if client.is_none() {
                    client = HttpClient::connect(target).await.ok();
                }
                let failed = match client.as_mut() {
                    Some(c) => match c.request("GET", &host, &path, &[], b"").await {
                        Ok(r) => !(200..300).contains(&r.status),
                        Err(_) => {
                            client = None;
                            true
                        }
                    },
                    None => true,
                };
                let at = sent.duration_since(start).as_secs_f64();
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((at, sent.elapsed(), failed));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let samples = samples.lock().unwrap_or_else(PoisonError::into_inner);
    let mut from = 0.0;
    for (name, secs) in phases {
        let to = from + secs;
        let mut latencies: Vec<Duration> = Vec::new();
        let mut errors = 0usize;
        for (at, latency, failed) in samples.iter().filter(|(at, _, _)| *at >= from && *at < to) {
            let _ = at;
            latencies.push(*latency);
            errors += usize::from(*failed);
        }
        latencies.sort();
        let pct = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        let n = latencies.len();
        println!(
            "| {} | {name} | {n} | {errors} | {:.2}% | {:.1} ms | {:.1} ms |",
            args.variant,
            if n == 0 {
                0.0
            } else {
                errors as f64 * 100.0 / n as f64
            },
            pct(0.5),
            pct(0.99)
        );
        from = to;
    }
    Ok(())
}
