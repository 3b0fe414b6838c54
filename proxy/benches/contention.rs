//! What the request path's shared structures cost when several worker threads use
//! them at once (issue 23): each operation a request performs on state shared by
//! every worker thread, run on 1, 2 and 4 threads together (4 is oversubscribed on
//! the 2-core bench machine: it shows queueing on a lock, not more parallelism).
//!
//! Each row reports the time per operation *per thread* (every thread's own
//! elapsed time over its own operations, averaged over the threads): with no
//! contention it stays flat as threads are added; a lock or a cache line bounced
//! between cores makes it grow. Results go to bench/RESULTS.md with the command.
//!
//! - the h1 upstream pool: a take and a put, as every proxied request does, each
//!   thread on its own connection to the same backend;
//! - the metrics of a settled request (`Observe` on the proxy's `Shared`: in flight
//!   up and down, the upstream attempt's counter, the route's duration histogram
//!   and request counter);
//! - a local rate limit decision (one bucket shared by every thread, as a route's is);
//! - a route's circuit breaker, admitting and recording a success while Closed;
//! - a balancer pick (smooth WRR), one with its finish under outlier detection,
//!   and a P2C pick with its finish (in-flight count up and down, the latency
//!   estimate);
//! - the references every request takes: to the proxy's shared state and to the
//!   live snapshot (on the `Arc`s, and on per-thread handles as the flow does);
//! - a whole request through the flow (everything above a request touches but the
//!   pool, and what the rows leave out), without sockets.

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use governor::clock::DefaultClock;
use sluice_policy::{Algorithm, Backend, LoadBalancer, MtlsMode, Protocol, RateLimit};
use sluice_proxy::breaker::CircuitBreaker;
use sluice_proxy::endpoints::{Endpoints, EndpointsRule};
use sluice_proxy::exchange::{
    Action, Direction, Event, Exchange, Observe, Outcome, Record, Request, Side,
};
use sluice_proxy::pool::Pool;
use sluice_proxy::ratelimit::RouteLimiter;
use sluice_proxy::runtime::Runtime;
use sluice_proxy::shard::{Handle, Handles};
use sluice_proxy::shared::Shared;
use sluice_proxy::verdict::Verdict;

/// Thread counts, with how each is labelled in the report.
const THREADS: [(usize, &str); 3] = [
    (1, "1 thread"),
    (2, "2 threads"),
    (4, "4 threads (oversubscribed on 2 cores)"),
];

/// Runs `op` `iters` times on each of `threads` threads, all started together
/// (after each thread's `setup`, untimed); the mean of the threads' own elapsed
/// times.
fn concurrently<S>(
    threads: usize,
    iters: u64,
    setup: impl Fn() -> S + Sync,
    op: impl Fn(&mut S) + Sync,
) -> Duration {
    let start = Barrier::new(threads);
    let total: Duration = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut state = setup();
                    start.wait();
                    let began = Instant::now();
                    for _ in 0..iters {
                        op(&mut state);
                    }
                    let elapsed = began.elapsed();
                    drop(state);
                    elapsed
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a bench thread"))
            .sum()
    });
    total / threads as u32
}

fn group(c: &mut Criterion, name: &str, mut run: impl FnMut(usize, u64) -> Duration) {
    let mut group = c.benchmark_group(name);
    for (threads, label) in THREADS {
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter_custom(|iters| run(threads, iters))
        });
    }
    group.finish();
}

/// A row whose operation keeps no per-thread state: `op` on 1, 2 and 4 threads at once.
fn shared_row(c: &mut Criterion, name: &str, op: impl Fn() + Sync) {
    group(c, name, |threads, iters| {
        concurrently(threads, iters, || (), |()| op())
    });
}

/// The upstream pool, as a proxied request uses it: take the idle connection to the
/// backend, put it back. Each thread runs a current-thread runtime (as a worker
/// thread does) holding its own connection.
///
/// The control row gives each thread a pool of its own: nothing shared, so how
/// far its per-thread time still grows with threads is the machine's (both cores
/// busy, a VM's vCPUs, other load), not contention.
fn pool(c: &mut Criterion) {
    pool_take_put(c, "contention/pool take+put", false);
    pool_take_put(
        c,
        "contention/pool take+put, a pool per thread (control)",
        true,
    );
}

fn pool_take_put(c: &mut Criterion, name: &str, private: bool) {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = backend.local_addr().expect("local address");
    group(c, name, |threads, iters| {
        // A pool per sample: each sample's threads are new ones, and a pool's
        // shards are claimed by the threads that use it (worker threads live as
        // long as the proxy; these would use up the shards).
        let shared = Pool::default();
        concurrently(
            threads,
            iters,
            || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let conn = {
                    let _entered = runtime.enter();
                    let std = std::net::TcpStream::connect(addr).expect("connect");
                    std.set_nonblocking(true).expect("non-blocking");
                    tokio::net::TcpStream::from_std(std).expect("register")
                };
                // Some thread's server end (whose does not matter), held open
                // while the connection is in use.
                let (held, _) = backend.accept().expect("accept");
                let own = private.then(Pool::default);
                let pool = own.as_ref().unwrap_or(&shared);
                let me = pool.worker();
                let _entered = runtime.enter();
                pool.put(me, addr, None, conn.into());
                (runtime, me, held, own)
            },
            |(runtime, me, _, own)| {
                let _entered = runtime.enter();
                let pool = own.as_ref().unwrap_or(&shared);
                let conn = pool.take(*me, addr, None).expect("the idle connection");
                pool.put(*me, addr, None, black_box(conn));
            },
        )
    });
}

struct BenchRequest;

impl Request for BenchRequest {
    fn method(&self) -> &str {
        "GET"
    }
    fn path(&self) -> &str {
        "/api/v1/items"
    }
    fn host(&self) -> &str {
        "bench"
    }
    fn header(&self, _: &str) -> Option<&[u8]> {
        None
    }
    fn client_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, 1]))
    }
    fn body_truncated(&self) -> bool {
        false
    }
}

/// A proxy's shared state (no access log) with bench/policy.yaml loaded as its live
/// snapshot. Panics if it does not load: a bench on no policy would measure nothing.
fn bench_proxy() -> Arc<Shared> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/policy.yaml");
    let text = std::fs::read_to_string(path).expect("bench/policy.yaml is readable");
    let set = sluice_policy::parse_str(Path::new("bench/policy.yaml"), &text)
        .expect("bench/policy.yaml is valid");
    let shared = Arc::new(Shared::new(false, false).expect("the proxy's metrics register"));
    let runtime = Runtime::build(set, "bench".into(), None, &shared.globals)
        .expect("bench/policy.yaml builds a snapshot");
    shared.runtime.store(Arc::new(runtime));
    shared
}

/// The metrics a proxied request updates, on bench/policy.yaml's busy route (no
/// access log: that is the access log's own concern).
fn metrics(c: &mut Criterion) {
    let shared = bench_proxy();
    let runtime = shared.runtime.load_full();
    let routed = runtime.route("bench", "GET", "/api/v1/items", |_| None);
    let sluice_proxy::runtime::Routed::Route { policy, route } = routed else {
        panic!("bench/policy.yaml routes GET bench/api/v1/items");
    };
    let policy = &runtime.policies[policy];
    let endpoints = policy.endpoints_of(route);
    let route = &policy.routes[route];
    let shared = Handle::new(shared);
    shared_row(c, "contention/request metrics", || {
        let ticket = shared.begin();
        shared.upstream(policy, endpoints, 0, Outcome::Success);
        shared.finished(&Record {
            req: &BenchRequest,
            policy: Some(policy),
            route: Some(route),
            status: 200,
            class_status: 200,
            grpc_status: None,
            elapsed: Duration::from_micros(350),
            verdict: Verdict::Allowed,
            shadow: None,
            fallback: None,
            backend: Some("127.0.0.1:18080"),
            attempts: 1,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            trace: None,
            // The common case: a request of no sampled trace.
            exemplar: None,
            policy_version: None,
            direction: Direction::Outbound,
        });
        shared.end(ticket);
    });
}

/// A route's token bucket: every thread draws from the same one.
fn limiter(c: &mut Criterion) {
    let rule = RateLimit {
        requests_per_second: 1e9,
        burst: 1_000_000,
        key: None,
    };
    let limiter = RouteLimiter::new(&rule, DefaultClock::default());
    shared_row(c, "contention/rate limit decision", || {
        black_box(limiter.check(black_box("")));
    });
}

fn endpoints(algorithm: Algorithm) -> Endpoints {
    endpoints_with(algorithm, None)
}

fn endpoints_with(
    algorithm: Algorithm,
    outlier_detection: Option<sluice_policy::OutlierDetection>,
) -> Endpoints {
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
    Endpoints::new(
        EndpointsRule {
            backends,
            load_balancer: LoadBalancer {
                algorithm,
                slow_start: None,
            },
            health_check: None,
            outlier_detection,
            namespace: None,
        },
        None,
        Instant::now(),
    )
}

/// A route's circuit breaker on a healthy route (bench/policy.yaml's `items` rule):
/// admitted while Closed, a success recorded.
fn breaker(c: &mut Criterion) {
    let rule = sluice_policy::CircuitBreaker {
        consecutive_failures: Some(50),
        error_ratio: Some(0.5),
        slow_call: None,
        window: Duration::from_secs(10),
        min_requests: 100,
        open_for: Duration::from_secs(5),
        half_open_requests: 5,
    };
    let breaker = CircuitBreaker::new(&rule, Instant::now());
    let latency = Duration::from_micros(350);
    shared_row(c, "contention/circuit breaker admit+record", || {
        let now = Instant::now();
        let (admission, _) = breaker.admit(now);
        black_box(breaker.record(now, admission, false, latency));
    });
}

/// A backend pick from one policy's endpoints, which every thread shares.
fn balancer(c: &mut Criterion) {
    let now = Instant::now();
    let wrr = endpoints(Algorithm::WeightedRoundRobin);
    shared_row(c, "contention/balancer pick (smooth WRR)", || {
        black_box(wrr.pick(now, b"", &[]));
    });
    // With outlier detection (Envoy's consecutive-5xx): every pick asks whether
    // each candidate is ejected, every response reports its outcome.
    let watched = endpoints_with(
        Algorithm::WeightedRoundRobin,
        Some(sluice_policy::OutlierDetection {
            consecutive_failures: 5,
            eject_for: Duration::from_secs(30),
            max_ejected_percent: 50,
        }),
    );
    let rtt = Duration::from_micros(350);
    shared_row(
        c,
        "contention/balancer pick+finish (smooth WRR, outlier detection)",
        || {
            if let Some(i) = watched.pick(now, b"", &[]) {
                watched.finish(i, now, rtt, false);
            }
        },
    );
    let p2c = endpoints(Algorithm::P2cEwma);
    shared_row(c, "contention/balancer pick+finish (P2C peak-EWMA)", || {
        if let Some(i) = p2c.pick(now, b"", &[]) {
            p2c.finish(i, now, rtt, false);
        }
    });
}

/// A whole request through the flow, as the h1 engine drives it minus the sockets:
/// arrived (routed on the live snapshot, admitted by the route's bucket and
/// breaker, a backend picked), the response head, finished (breaker, balancer and
/// metrics settled); every thread on bench/policy.yaml's busy route of one shared
/// proxy state. Whatever the rows above leave out (the snapshot's and the shared
/// state's reference counts, the breaker's window) shows here as the difference.
fn flow(c: &mut Criterion) {
    let shared = bench_proxy();
    let side = Side {
        direction: Direction::Outbound,
        inbound_policy: None,
        inbound_app: None,
        own_ports: Vec::new(),
        mtls_default: MtlsMode::Permissive,
    };
    let req = BenchRequest;
    let side = &side;
    let observers = Handles::new(&shared);
    let one = |shared: &Arc<Shared>| {
        let now = Instant::now();
        let mut exchange = Exchange::new(observers.mine(), now);
        let arrived = Event::Arrived {
            runtime: shared.snapshot(),
            side,
            original_dst: None,
            h2c: true,
            undiscovered: false,
        };
        let connect = exchange.on(&req, now, arrived);
        let head = Event::Response {
            status: 200,
            grpc_status: None,
        };
        let relay = exchange.on(&req, now, head);
        let finished = Event::Finished {
            status: 200,
            failed: false,
            grpc_status: None,
        };
        exchange.on(&req, now, finished);
        (connect, relay)
    };
    // The request is proxied, as on the busy route: not refused before any work.
    let (connect, relay) = one(&shared);
    assert!(
        matches!((&connect, &relay), (Action::Connect(_), Action::Relay)),
        "{connect:?} {relay:?}"
    );
    // What every request's exchange takes and drops: a reference to the shared
    // state and one to the live snapshot. Counted on their `Arc`s (as before the
    // per-thread handles: two adds and two subtracts on lines every thread
    // writes), and as the exchange takes them now (on the thread's own lines).
    shared_row(
        c,
        "contention/request references (state, snapshot), on the Arcs",
        || {
            let state = black_box(Arc::clone(&shared));
            let snapshot = black_box(shared.runtime.load_full());
            drop((state, snapshot));
        },
    );
    shared_row(
        c,
        "contention/request references (state, snapshot), per-thread handles",
        || {
            let state = black_box(observers.mine());
            let snapshot = black_box(shared.snapshot());
            drop((state, snapshot));
        },
    );
    shared_row(c, "contention/whole request flow", || {
        black_box(one(&shared));
    });
}

criterion_group!(contention, pool, metrics, limiter, breaker, balancer, flow);
criterion_main!(contention);
