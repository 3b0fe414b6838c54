//! Per-decision costs of the request path's components (criterion):
//! a token-bucket check (local, and global from a lease), a route match against a
//! ten-route policy, a balancer pick for each algorithm, and an access-log line
//! (issue 23). Results go to
//! bench/RESULTS.md with the command.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::DefaultClock;
use sluice_policy::{
    Algorithm, Backend, GlobalRateLimit, Key, KeyedLimit, LoadBalancer, Protocol, RateLimit,
};
use sluice_proxy::endpoints::{Endpoints, EndpointsRule};
use sluice_proxy::globallimit::{self, GlobalLimiter, GlobalLimits, Outcome};
use sluice_proxy::ratelimit::RouteLimiter;
use sluice_proxy::runtime::Runtime;

fn limiter(c: &mut Criterion) {
    let rule = RateLimit {
        requests_per_second: 1e9,
        burst: 1_000_000,
        key: None,
    };
    let limiter = RouteLimiter::new(&rule, DefaultClock::default());
    c.bench_function("rate limit decision (one bucket)", |b| {
        b.iter(|| black_box(limiter.check(black_box(""))))
    });

    // Per key, 1,000 keys in rotation (all tracked: maxKeys 10,000), as the request
    // path calls it (the key already extracted into a String).
    let keyed = RouteLimiter::new(
        &RateLimit {
            key: Some(KeyedLimit {
                key: Key::Header("x-user-id".into()),
                max_keys: 10_000,
            }),
            ..rule
        },
        DefaultClock::default(),
    );
    let keys: Vec<String> = (0..1_000).map(|i| format!("user-{i}")).collect();
    let mut next = keys.iter().cycle();
    c.bench_function("rate limit decision (1,000 keys)", |b| {
        b.iter(|| {
            let key = next.next().map_or("", String::as_str);
            black_box(keyed.check_owned(&key.to_owned()))
        })
    });
}

/// A global limit's decision as requests see it: a token taken from the lease
/// (Redis is not on this path). Leases of 1,000,000 tokens are refilled between
/// timed runs, so the spent-lease path (credit, the own bucket) stays out.
fn global_limiter(c: &mut Criterion) {
    const LEASE: u64 = 1_000_000;
    let shared = RateLimit {
        requests_per_second: 1e9,
        burst: 2 * LEASE as u32,
        key: None,
    };
    let rule = GlobalRateLimit {
        when_unreachable: shared.clone(),
        shared,
    };
    let hub = GlobalLimits::new(true);
    hub.set_reachable(true);
    let limiter = GlobalLimiter::new(&rule, None, "bench", "items", hub, None);
    let now = Instant::now();
    // The first claim asks for what was spent: spend a lease's worth on credit and
    // the own bucket (both generous here), then each refill asks for what the last
    // timed run spent.
    for _ in 0..LEASE {
        limiter.check("", now);
    }
    let refill = || {
        let mut ops = Vec::new();
        limiter.collect(now, 16, false, &mut ops);
        for op in &ops {
            globallimit::settle(op, 0, Outcome::Done(op.want, 0, 0));
        }
    };
    refill();
    c.bench_function("global rate limit decision (from the lease)", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut done = 0;
            while done < iters {
                // A claim is wanted once less than half the last lease (itself at
                // least half of LEASE) is left: runs of LEASE / 4 never find it empty.
                let n = (iters - done).min(LEASE / 4);
                let start = Instant::now();
                for _ in 0..n {
                    black_box(limiter.check(black_box(""), now));
                }
                total += start.elapsed();
                done += n;
                refill();
            }
            total
        })
    });
}

fn route_match(c: &mut Criterion) {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/policy.yaml"))
            .unwrap_or_default();
    let Ok(set) = sluice_policy::parse_str(Path::new("bench/policy.yaml"), &text) else {
        return;
    };
    let Ok(runtime) = Runtime::build(
        set,
        "bench".into(),
        None,
        &sluice_proxy::globallimit::GlobalLimits::new(false),
    ) else {
        return;
    };
    let headers: [(&str, &[u8]); 1] = [("user-agent", b"wrk")];
    c.bench_function("route match (8th of 10 routes)", |b| {
        b.iter(|| {
            black_box(runtime.route(
                black_box("bench"),
                "GET",
                black_box("/api/v1/items"),
                |name| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v),
            ))
        })
    });
}

fn balancer(c: &mut Criterion) {
    let backends: Vec<Backend> = (0..5u16)
        .map(|i| Backend {
            address: sluice_policy::Address {
                host: "127.0.0.1".into(),
                port: 9000 + i,
            },
            weight: u32::from(i) + 1,
            protocol: Protocol::Http1,
            service: None,
            tls: None,
        })
        .collect();
    let now = Instant::now();
    for (name, algorithm) in [
        (
            "balancer pick (smooth WRR, 5 backends)",
            Algorithm::WeightedRoundRobin,
        ),
        (
            "balancer pick (P2C peak-EWMA, 5 backends)",
            Algorithm::P2cEwma,
        ),
        (
            "balancer pick (Maglev, 5 backends)",
            Algorithm::ConsistentHash {
                hash_on: Key::Header("x-user-id".into()),
            },
        ),
    ] {
        let p2c = matches!(algorithm, Algorithm::P2cEwma);
        let endpoints = Endpoints::new(
            EndpointsRule {
                backends: backends.clone(),
                load_balancer: LoadBalancer {
                    algorithm,
                    slow_start: None,
                },
                health_check: None,
                outlier_detection: None,
                namespace: None,
            },
            None,
            now,
        );
        c.bench_function(name, |b| {
            b.iter(|| black_box(endpoints.pick(now, black_box(b"user-42"), &[])))
        });
        if p2c {
            // As under traffic: every backend has answered, at a different
            // millisecond, with a different latency (so the comparison scales one
            // estimate to the other's age instead of finding them equal).
            for i in 0..backends.len() {
                let at = now + std::time::Duration::from_millis(i as u64 * 7);
                let rtt = std::time::Duration::from_micros(300 + i as u64 * 50);
                endpoints.finish(i, at, rtt, false);
            }
            c.bench_function("balancer pick (P2C peak-EWMA, 5 backends, answered)", |b| {
                b.iter(|| black_box(endpoints.pick(now, black_box(b"user-42"), &[])))
            });
        }
    }
}

/// An access-log line as the request path pays for it: the clock read, the
/// encoding and the append, with the flush task's drain (into a sink, every 1,000
/// lines: about what one flush period holds at 50k requests/s) amortised in.
fn access_log(c: &mut Criterion) {
    use sluice_proxy::accesslog::{AccessLog, AccessRecord, TcpRecord, Timestamp};
    use std::time::Duration;

    let record = |ts| AccessRecord {
        ts,
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        method: "GET",
        host: "bench",
        path: "/api/v1/items",
        policy: Some("bench"),
        route: Some("items"),
        backend: Some("127.0.0.1:18080"),
        status: 200,
        grpc_status: None,
        duration: Duration::from_micros(734),
        decision: "allowed",
        shadow_decision: None,
        fallback: None,
        attempts: 1,
        policy_version: Some("3f2a9c1b7d4e"),
        direction: "outbound",
        peer: None,
    };
    let mut group = c.benchmark_group("access_log");
    let mut out = Vec::with_capacity(1024);
    group.bench_function("encode a request line", |b| {
        b.iter(|| {
            out.clear();
            record(Timestamp(std::time::SystemTime::UNIX_EPOCH)).encode(&mut out);
            black_box(&out);
        })
    });
    let log = AccessLog::new(
        true,
        prometheus::IntCounter::new("d", "d").expect("counter"),
    );
    group.bench_function("write a request line (clock, encode, append, drain)", |b| {
        let mut n = 0u32;
        b.iter(|| {
            log.write(black_box(&record(Timestamp::now())));
            n += 1;
            if n == 1_000 {
                n = 0;
                log.flush_to(&mut std::io::sink());
            }
        })
    });
    // The same with a second thread writing lines all the while (another worker):
    // what sharing the log between workers costs.
    group.bench_function("write a request line, a second thread writing too", |b| {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                // It drains its share too, as the flush task would.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..1_000 {
                        log.write(&record(Timestamp::now()));
                    }
                    log.flush_to(&mut std::io::sink());
                }
            });
            let mut n = 0u32;
            b.iter(|| {
                log.write(black_box(&record(Timestamp::now())));
                n += 1;
                if n == 1_000 {
                    n = 0;
                    log.flush_to(&mut std::io::sink());
                }
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    });
    group.bench_function("write a TCP line (clock, encode, append, drain)", |b| {
        let mut n = 0u32;
        b.iter(|| {
            log.write_tcp(black_box(&TcpRecord {
                ts: Timestamp::now(),
                direction: "outbound",
                policy: Some("bench/db"),
                port: 5432,
                end: "closed",
                bytes_received: 1234,
                bytes_sent: 56789,
                duration: Duration::from_millis(1500),
                policy_version: Some("3f2a9c1b7d4e"),
            }));
            n += 1;
            if n == 1_000 {
                n = 0;
                log.flush_to(&mut std::io::sink());
            }
        })
    });
    group.finish();
}

criterion_group!(
    components,
    limiter,
    global_limiter,
    route_match,
    balancer,
    access_log
);
criterion_main!(components);
