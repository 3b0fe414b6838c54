//! `sluice-demo-load`: the demo's traffic and its live table.
//!
//! Drives a steady mix of requests through the proxy (one route per mechanism of
//! `policies/demo.yaml`) and every few seconds prints, per route, what the proxy's
//! own `/metrics` says happened: requests, 2xx, 429, 5xx, shadow decisions, p99.
//! Reading the proxy's metrics rather than counting client-side shows the numbers an
//! operator would see in Grafana.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use sluice_demo::client::{get, HttpClient};

#[derive(Parser)]
#[command(about = "Drive demo traffic through sluice-proxy and print a live table")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:15001")]
    proxy: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Host header, selecting the policy; the table shows the policy of that name.
    #[arg(long, default_value = "demo")]
    host: String,
    /// Total requests per second across all routes.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds between tables.
    #[arg(long, default_value_t = 3)]
    interval: u64,
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration: u64,
}

/// Every `INCIDENT_PERIOD`, the checkout backend "fails" for `INCIDENT_LENGTH`: its
/// requests ask the demo upstream to answer 503, so the breaker opens, the fallback
/// answers, and the half-open probes close it again once the incident is over.
const INCIDENT_PERIOD: Duration = Duration::from_secs(30);
const INCIDENT_LENGTH: Duration = Duration::from_secs(8);
const INCIDENT_START: Duration = Duration::from_secs(10);

fn incident(elapsed: Duration) -> bool {
    let phase = Duration::from_nanos((elapsed.as_nanos() % INCIDENT_PERIOD.as_nanos()) as u64);
    phase >= INCIDENT_START && phase < INCIDENT_START + INCIDENT_LENGTH
}

/// One step of the traffic mix: path and an optional user id header.
const MIX: [(&str, bool); 13] = [
    ("/catalog/items", false),
    ("/catalog/items", false),
    ("/catalog/search", false),
    ("/users/me", true),
    ("/users/me", true),
    ("/users/orders", true),
    ("/checkout/cart", false),
    ("/checkout/pay", false),
    ("/search?q=shoes", false),
    ("/search?q=socks", false),
    ("/reviews/1", false),
    ("/reviews/2", false),
    ("/", false),
];
const WORKERS: u32 = 8;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Args = sluice_demo::cli::parse_args();
    let stop = Arc::new(AtomicBool::new(false));
    let per_worker = Duration::from_secs_f64(f64::from(WORKERS) / f64::from(args.rate.max(1)));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (stop, host, addr) = (Arc::clone(&stop), args.host.clone(), args.proxy);
        workers.push(tokio::spawn(async move {
            let mut client: Option<HttpClient> = None;
            let mut tick = tokio::time::interval(per_worker);
            let mut n = w as usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let (path, keyed) = MIX[n % MIX.len()];
                let user = format!("user-{}", n % 7);
                let mut headers: Vec<(&str, &str)> = if keyed {
                    vec![("x-user-id", user.as_str())]
                } else {
                    vec![]
                };
                if path.starts_with("/checkout") && incident(started.elapsed()) {
                    headers.push(("x-demo-status", "503"));
                }
                if client.is_none() {
                    client = HttpClient::connect(addr).await.ok();
                }
                if let Some(c) = client.as_mut() {
                    if c.request("GET", &host, path, &headers, b"").await.is_err() {
                        client = None;
                    }
                }
            }
        }));
    }

    println!(
        "driving ~{} req/s through http://{} (Host: {}); metrics at http://{}/metrics, policy at http://{}/config_dump",
        args.rate, args.proxy, args.host, args.admin, args.admin
    );
    let mut before = scrape(args.admin, &args.host).await.unwrap_or_default();
    loop {
        let wait = tokio::time::sleep(Duration::from_secs(args.interval.max(1)));
        tokio::select! {
            _ = wait => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let now = scrape(args.admin, &args.host)
            .await
            .context("scraping the proxy's /metrics")?;
        if incident(started.elapsed()) {
            println!("\n-- incident: checkout's backend answers 503; its breaker opens and the fallback answers --");
        }
        print_table(&before, &now, args.interval.max(1));
        before = now;
        if args.duration > 0 && started.elapsed() >= Duration::from_secs(args.duration) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    Ok(())
}

/// Per route: counters by status class and decision, histogram buckets.
#[derive(Default, Clone)]
struct RouteStats {
    by_class: BTreeMap<String, f64>,
    rate_limited: f64,
    shadow_limited: f64,
    fallbacks: f64,
    breaker: Option<f64>,
    buckets: Vec<(f64, f64)>,
}

/// The routes of policy `policy`, from the proxy's `/metrics`.
async fn scrape(admin: SocketAddr, policy: &str) -> anyhow::Result<BTreeMap<String, RouteStats>> {
    let text = get(admin, "admin", "/metrics").await?.text();
    let mut routes: BTreeMap<String, RouteStats> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let labels: BTreeMap<&str, &str> = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        let Some(route) = labels.get("route").filter(|r| !r.is_empty()) else {
            continue;
        };
        if labels.get("policy") != Some(&policy) {
            continue;
        }
        let stats = routes.entry((*route).to_owned()).or_default();
        match name {
            "sluice_requests_total" => {
                *stats
                    .by_class
                    .entry(labels.get("code_class").copied().unwrap_or("").to_owned())
                    .or_default() += value;
            }
            "sluice_rate_limited_total" if labels.get("mode") == Some(&"shadow") => {
                stats.shadow_limited += value
            }
            "sluice_rate_limited_total" => stats.rate_limited += value,
            "sluice_fallbacks_total" if labels.get("mode") == Some(&"enforce") => {
                stats.fallbacks += value
            }
            "sluice_circuit_breaker_state" => stats.breaker = Some(value),
            "sluice_request_duration_seconds_bucket" => {
                let le = labels
                    .get("le")
                    .and_then(|l| l.parse::<f64>().ok())
                    .unwrap_or(f64::INFINITY);
                stats.buckets.push((le, value));
            }
            _ => {}
        }
    }
    Ok(routes)
}

/// The 99th percentile from cumulative bucket deltas (upper bound of its bucket).
fn p99(before: &[(f64, f64)], now: &[(f64, f64)]) -> Option<f64> {
    let deltas: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, v)| {
            (
                *le,
                v - before
                    .iter()
                    .find(|(b, _)| b == le)
                    .map_or(0.0, |(_, x)| *x),
            )
        })
        .collect();
    let total = deltas.last().map(|(_, v)| *v).filter(|t| *t > 0.0)?;
    deltas
        .iter()
        .find(|(_, v)| *v >= total * 0.99)
        .map(|(le, _)| *le)
}

fn print_table(
    before: &BTreeMap<String, RouteStats>,
    now: &BTreeMap<String, RouteStats>,
    secs: u64,
) {
    println!();
    println!(
        "{:<10} {:>8} {:>7} {:>7} {:>7} {:>9} {:>8} {:>10} {:>10}",
        "route", "req/s", "2xx", "429", "5xx", "fallback", "shadow", "p99", "breaker"
    );
    for (route, stats) in now {
        let old = before.get(route).cloned().unwrap_or_default();
        let delta = |class: &str| {
            stats.by_class.get(class).copied().unwrap_or(0.0)
                - old.by_class.get(class).copied().unwrap_or(0.0)
        };
        let total: f64 = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"]
            .iter()
            .map(|c| delta(c))
            .sum();
        let limited = stats.rate_limited - old.rate_limited;
        let p99 = match p99(&old.buckets, &stats.buckets) {
            Some(s) if s.is_finite() => format!("<{:.1}ms", s * 1000.0),
            Some(_) => ">120s".to_owned(),
            None => "-".to_owned(),
        };
        let breaker = match stats.breaker.map(|v| v as i64) {
            Some(1) => "open",
            Some(2) => "half-open",
            Some(_) => "closed",
            None => "-",
        };
        println!(
            "{:<10} {:>8.1} {:>7} {:>7} {:>7} {:>9} {:>8} {:>10} {:>10}",
            route,
            total / secs as f64,
            delta("2xx"),
            limited,
            delta("5xx"),
            stats.fallbacks - old.fallbacks,
            stats.shadow_limited - old.shadow_limited,
            p99,
            breaker
        );
    }
}
