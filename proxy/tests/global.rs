//! Global rate limits against a real Redis (`redis-server` from Debian, started by
//! each test on a loopback port of its own and stopped by its PID): the claim script's
//! arithmetic, two real proxies sharing one bucket, and a Redis outage and return.
//!
//! `scripts/setup` installs redis-server. Without it these tests fail under CI=true
//! and are skipped (with a message) elsewhere.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::{metrics, sample, start_with, upstream, HttpClient, ProxyProcess, TempDir};

/// A `redis-server` child on 127.0.0.1, killed (by its PID) on drop.
struct RedisServer {
    child: Child,
    port: u16,
    dir: TempDir,
}

/// The redis-server binary, or `None` (after saying so) when it is missing outside CI.
fn redis_binary() -> Option<PathBuf> {
    let found = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server is missing (scripts/setup installs it from Debian)"
        );
        eprintln!("SKIPPED: redis-server is missing (scripts/setup installs it)");
    }
    found
}

impl RedisServer {
    /// redis-server on a loopback port of its own. It cannot be given port 0 (to
    /// Redis that means no TCP at all), and a port probed free and released could
    /// be taken before it binds; so redis-server binds a drawn port itself, and
    /// when that port is taken it exits and another is drawn (bounded: 20 draws).
    /// Ports are drawn below Linux's ephemeral range (32768-60999), where no
    /// outgoing connection takes them.
    async fn start(binary: &PathBuf) -> RedisServer {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()))
            ^ u64::from(std::process::id());
        let start = NEXT.fetch_add(7919, Ordering::Relaxed).wrapping_add(seed);
        let mut why = String::new();
        for i in 0..20u64 {
            let port = 20_000 + (start.wrapping_add(i * 104_729) % 12_000) as u16;
            match Self::start_on(binary, port).await {
                Ok(server) => return server,
                Err(log) => why = log,
            }
        }
        panic!("redis-server found no free port in 20 draws; last log:\n{why}");
    }

    /// redis-server again on `port`, the one it had, where the proxies expect it;
    /// retried while something else briefly holds the port (bounded: 10 s).
    async fn restart(binary: &PathBuf, port: u16) -> RedisServer {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::start_on(binary, port).await {
                Ok(server) => return server,
                Err(log) => {
                    assert!(
                        Instant::now() < deadline,
                        "redis-server cannot bind port {port} again:\n{log}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Starts redis-server on `port` and waits until it answers (bounded: 10 s), or
    /// its log once it exits (the port is taken). The answer must come from this
    /// child (its `INFO` names the PID): another process holding the port could
    /// answer too.
    async fn start_on(binary: &PathBuf, port: u16) -> Result<RedisServer, String> {
        let dir = TempDir::new();
        let log_path = dir.path().join("redis.log");
        let log = std::fs::File::create(&log_path).expect("redis log");
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &dir.path().display().to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn redis-server: {e}"));
        let pid = format!("process_id:{}", child.id());
        let mut server = RedisServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(log);
            }
            if let Ok(mut con) = server.connection().await {
                let info: redis::RedisResult<String> =
                    redis::cmd("INFO").arg("server").query_async(&mut con).await;
                if info.is_ok_and(|info| info.lines().any(|l| l.trim() == pid)) {
                    return Ok(server);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server on port {port} did not answer within 10 s");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(format!("redis://{}/", self.addr()))?
            .get_multiplexed_async_connection()
            .await
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One call of the claim script: (granted, wait µs, whole tokens left).
async fn claim(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    (rate, burst): (f64, u32),
    want: i64,
    charge: u32,
) -> (i64, i64, i64) {
    redis::Script::new(sluice_proxy::globallimit::SCRIPT)
        .key(key)
        .arg(rate)
        .arg(burst)
        .arg(want)
        .arg(charge)
        .invoke_async(con)
        .await
        .expect("script")
}

#[tokio::test]
async fn the_claim_script_keeps_one_token_bucket_in_redis() {
    let Some(binary) = redis_binary() else { return };
    let redis = RedisServer::start(&binary).await;
    let mut con = redis.connection().await.expect("connect");
    // rate 0.001/s: no refill worth a token during the test.
    let bucket = (0.001, 10);
    assert_eq!(
        claim(&mut con, "b", bucket, 4, 0).await,
        (4, 0, 6),
        "a new bucket is full"
    );
    let (granted, wait, left) = claim(&mut con, "b", bucket, 10, 0).await;
    assert_eq!((granted, left), (6, 0), "only what is left is granted");
    assert!(
        (999_000_000..=1_000_000_000).contains(&wait),
        "one token in ~1000 s: {wait}"
    );
    assert_eq!(
        claim(&mut con, "b", bucket, -3, 0).await.2,
        3,
        "a returned lease refills it"
    );
    assert_eq!(
        claim(&mut con, "b", bucket, -30, 0).await.2,
        10,
        "never above the burst"
    );
    // Admissions made without a lease are charged, down to a debt of one burst:
    // from -10, one token is 11 tokens' refill (11000 s) away.
    let (granted, wait, left) = claim(&mut con, "b", bucket, 1, 25).await;
    assert_eq!((granted, left), (0, 0));
    assert!((10_990_000_000..=11_000_000_001).contains(&wait), "{wait}");
    // The state expires once the bucket would be full again: 20 tokens at 0.001/s
    // (20,000 s), plus a second.
    let ttl: i64 = redis::cmd("PTTL")
        .arg("b")
        .query_async(&mut con)
        .await
        .expect("pttl");
    assert!(
        (19_990_000..=20_001_000).contains(&ttl),
        "the state expires: {ttl}"
    );
    redis.stop();
}

fn policy(backend: SocketAddr, route: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: shop}}\nspec:\n  hosts: [shop]\n  backends:\n    - {{address: \"{backend}\"}}\n  routes:\n{route}"
    )
}

/// The statuses of `n` requests to `proxy`, in order (200 or 429 with Retry-After).
async fn statuses(proxy: &ProxyProcess, n: usize) -> Vec<u16> {
    statuses_paced(proxy, n, Duration::ZERO).await
}

/// [`statuses`] with `gap` between requests.
async fn statuses_paced(proxy: &ProxyProcess, n: usize, gap: Duration) -> Vec<u16> {
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        tokio::time::sleep(gap).await;
        let answer = client
            .request("GET", "shop", "/", &[], b"")
            .await
            .expect("answer");
        match answer.status {
            200 => {}
            429 => assert!(
                answer.header("retry-after").is_some(),
                "429 without retry-after"
            ),
            other => panic!("unexpected status {other}: {}", answer.text()),
        }
        out.push(answer.status);
    }
    out
}

/// A proxy serving `route` in front of `backend`, with its global limits in `redis`,
/// once it is connected (keep the directory alive with the proxy).
async fn sharing(redis: &RedisServer, backend: SocketAddr, route: &str) -> (TempDir, ProxyProcess) {
    let dir = TempDir::new();
    let proxy = start_with(&dir, &policy(backend, route), &["--redis", &redis.addr()]).await;
    wait_metric(&proxy, "sluice_global_rate_limit_redis_up", 1.0).await;
    (dir, proxy)
}

/// Sends `n` requests, each to the next of `proxies` in turn; counts the 200s.
async fn admitted(proxies: &[&ProxyProcess], n: usize) -> usize {
    let mut clients = Vec::new();
    for p in proxies {
        clients.push(HttpClient::connect(p.listen_addr()).await.expect("connect"));
    }
    let mut ok = 0;
    for i in 0..n {
        let client = &mut clients[i % proxies.len()];
        let answer = client
            .request("GET", "shop", "/", &[], b"")
            .await
            .expect("answer");
        match answer.status {
            200 => ok += 1,
            429 => assert!(
                answer.header("retry-after").is_some(),
                "429 without retry-after"
            ),
            other => panic!("unexpected status {other}: {}", answer.text()),
        }
    }
    ok
}

/// Waits (bounded) until `series` reads `value` on the proxy's /metrics.
async fn wait_metric(proxy: &ProxyProcess, series: &str, value: f64) {
    wait_metric_until(proxy, series, value, |v| v == value).await;
}

async fn wait_metric_until(
    proxy: &ProxyProcess,
    series: &str,
    value: f64,
    ok: impl Fn(f64) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(proxy).await;
        if ok(sample(&text, series)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never read {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_replicas_share_one_bucket() {
    let Some(binary) = redis_binary() else { return };
    let redis = RedisServer::start(&binary).await;
    let backend = upstream("a").await;
    // 10 tokens for both replicas together, refilling one per 100 s. Were the bucket
    // not shared, each would admit 10 (the own bucket's burst defaults to the shared
    // one's); here the own bucket is 1 so that only credit adds to the first 10.
    let route = "    - name: limited\n      globalRateLimit:\n        requestsPerSecond: 0.01\n        burst: 10\n        whenUnreachable: {requestsPerSecond: 0.01, burst: 1}\n";
    let (_dir_a, a) = sharing(&redis, backend.addr(), route).await;
    let (_dir_b, b) = sharing(&redis, backend.addr(), route).await;

    let ok = admitted(&[&a, &b], 40).await;
    // 10 from leases; a replica that has not heard yet that the bucket ran dry may
    // admit a little more on credit or from its own bucket.
    assert!(
        (10..=14).contains(&ok),
        "admitted {ok} of 40 across two replicas"
    );

    // Every admission, leased or not, is paid for in the one bucket: once the
    // replicas gave back what they did not spend (after a second idle), Redis holds
    // 10 - admitted tokens (a debt when negative; refill 0.01/s is below 0.1 here).
    let mut con = redis.connection().await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let tokens: Option<String> = redis::cmd("HGET")
            .arg("sluice:rl:shop:limited")
            .arg("tokens")
            .query_async(&mut con)
            .await
            .expect("hget");
        let tokens: f64 = tokens
            .as_deref()
            .unwrap_or("")
            .parse()
            .expect("the bucket lives in Redis");
        if (tokens - (10.0 - ok as f64)).abs() < 0.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis holds {tokens} tokens after {ok} admissions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in [&a, &b] {
        let text = metrics(p).await;
        assert!(
            sample(
                &text,
                "sluice_global_rate_limit_syncs_total{outcome=\"ok\"}"
            ) >= 1.0
        );
        assert!(
            sample(
                &text,
                "sluice_rate_limited_total{mode=\"enforce\",policy=\"shop\",route=\"limited\"}"
            ) >= 1.0
        );
    }
    drop((a, b));
    redis.stop();
}

#[tokio::test]
async fn an_unreachable_redis_leaves_each_replica_its_own_bucket_until_it_returns() {
    let Some(binary) = redis_binary() else { return };
    let redis = RedisServer::start(&binary).await;
    let port = redis.port;
    let backend = upstream("a").await;
    let route = "    - name: limited\n      globalRateLimit:\n        requestsPerSecond: 0.01\n        burst: 6\n        whenUnreachable: {requestsPerSecond: 0.01, burst: 4}\n";
    let (_dir, proxy) = sharing(&redis, backend.addr(), route).await;
    let local_series =
        "sluice_global_rate_limit_local_decisions_total{policy=\"shop\",route=\"limited\"}";

    // The shared bucket (paced requests, so claims are normally back before the
    // next): its 6 tokens go to the first 6 requests, none refused while it has
    // tokens; a stalled claim could let one or two more through on credit before
    // the share learns the bucket is dry.
    let shared = statuses_paced(&proxy, 10, Duration::from_millis(20)).await;
    let admitted = shared.iter().filter(|&&s| s == 200).count();
    assert!(
        shared[..6] == [200; 6] && admitted <= 8 && shared[9] == 429,
        "{shared:?}"
    );
    // Requests the own bucket decided while a lease was late (0 unless the machine
    // stalled): published each second by housekeeping, so read once it is steady.
    let mut before = sample(&metrics(&proxy).await, local_series);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let now = sample(&metrics(&proxy).await, local_series);
        if now == before {
            break;
        }
        before = now;
    }
    let before = before as usize;

    redis.stop();
    // The next ping (each second while no claim is due) finds Redis gone.
    wait_metric(&proxy, "sluice_global_rate_limit_redis_up", 0.0).await;
    // Still serving, still limited: the own bucket (4 tokens, no refill to speak of,
    // `before` of them already spent) decides.
    let outage = statuses(&proxy, 6).await;
    let admitted = outage.iter().filter(|&&s| s == 200).count();
    assert_eq!(
        admitted,
        4 - before.min(4),
        "own bucket: {outage:?}, {before} spent before"
    );
    wait_metric_until(&proxy, local_series, (before + 6) as f64, |v| {
        v >= (before + 6) as f64
    })
    .await;
    assert!(
        proxy.stderr().contains("redis unreachable"),
        "{}",
        proxy.stderr()
    );

    // Redis is back (empty: a new full bucket of 6); the proxy reconnects by itself
    // and forgets that the old bucket was dry. (Requests are paced here: a burst
    // faster than a claim's round trip would meet the own bucket, which the outage
    // emptied, for that round trip.)
    let redis = RedisServer::restart(&binary, port).await;
    wait_metric(&proxy, "sluice_global_rate_limit_redis_up", 1.0).await;
    let back = statuses_paced(&proxy, 10, Duration::from_millis(20)).await;
    let admitted = back.iter().filter(|&&s| s == 200).count();
    assert!((6..=7).contains(&admitted), "after the return: {back:?}");
    drop(proxy);
    redis.stop();
}

#[tokio::test]
async fn a_keyed_global_limit_keeps_one_shared_bucket_per_key() {
    let Some(binary) = redis_binary() else { return };
    let redis = RedisServer::start(&binary).await;
    let backend = upstream("a").await;
    let route = "    - name: limited\n      globalRateLimit: {requestsPerSecond: 0.01, burst: 3, key: \"header:x-tenant\", maxKeys: 10}\n";
    let (_dir, proxy) = sharing(&redis, backend.addr(), route).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");
    for tenant in ["acme", "globex"] {
        let mut out = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let answer = client
                .request("GET", "shop", "/", &[("x-tenant", tenant)], b"")
                .await
                .expect("answer");
            out.push(answer.status);
        }
        // Three tokens each (a stalled claim could let one more through on credit).
        let admitted = out.iter().filter(|&&s| s == 200).count();
        assert!(
            out[..3] == [200; 3] && admitted <= 4 && out[4] == 429,
            "{tenant}: a bucket of its own: {out:?}"
        );
    }
    let mut con = redis.connection().await.expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sluice:rl:shop:limited:*")
        .query_async(&mut con)
        .await
        .expect("keys");
    assert_eq!(
        keys.len(),
        2,
        "one bucket per tenant, named by a hash: {keys:?}"
    );
    assert!(keys
        .iter()
        .all(|k| !k.contains("acme") && !k.contains("globex")));
    // /config_dump shows the state: Redis reachable, the bucket's name, the keys.
    let dump = support::get(proxy.admin_addr(), "admin", "/config_dump")
        .await
        .expect("config_dump");
    let dump: serde_json::Value = serde_json::from_slice(&dump.body).expect("json");
    let global = &dump["globalRateLimits"];
    assert_eq!(global["redisConfigured"], true);
    assert_eq!(global["redisReachable"], true);
    assert_eq!(global["routes"][0]["redisKey"], "sluice:rl:shop:limited");
    assert_eq!(global["routes"][0]["trackedKeys"], 2);
    drop(proxy);
    redis.stop();
}
