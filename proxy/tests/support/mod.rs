//! Shared helpers for the proxy's integration tests: a minimal HTTP/1.1 client, raw
//! socket exchanges, fake HTTP/1.1 and h2c backends, temporary directories, and
//! [`ProxyProcess`], which runs the real `sluice-proxy` binary on port 0 and reads
//! its bound addresses, access log and stderr.
//!
//! The client is hand-rolled on tokio and `httparse` so tests see the wire exactly:
//! keep-alive is explicit (one [`HttpClient`] is one connection, never silently
//! reconnected) and nothing is retried or rewritten behind the test's back.
//!
//! Ports are never probed: a port found free and released can be taken by another
//! process before the proxy binds it. Every listener is given port 0 and the proxy
//! reports what it got (`--ready-file`); in-process servers bind port 0 and hand
//! their bound socket on.
//!
//! Every wait is bounded: a request gives up after 10 s, a raw exchange after 5 s,
//! bound listeners and readiness after 15 s; a test that fails does so with the
//! proxy's stderr in hand.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

pub mod http2;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[allow(unused_imports)] // each test file uses its own subset
pub use sluice_demo::client::{get, HttpClient};

const RAW_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Most bytes `send_raw` keeps.
const MAX_RAW_BYTES: usize = 1024 * 1024;

/// Writes `bytes` as they are, then returns everything read until the peer closes or
/// 5 s pass. The write side stays open, so a well-formed request should carry
/// `Connection: close` or the call takes the full 5 s. A reset after some bytes arrived
/// returns those bytes.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    let deadline = tokio::time::Instant::now() + RAW_TIMEOUT;
    let mut received = Vec::new();
    // Ends at EOF, at the deadline, or at the size cap.
    while received.len() < MAX_RAW_BYTES {
        received.reserve(8 * 1024);
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut received)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(_)) => {}
            Ok(Err(_)) if !received.is_empty() => break,
            Ok(Err(err)) => return Err(err),
        }
    }
    Ok(received)
}

/// A loopback address that refuses connections for as long as the returned socket
/// lives: bound to port 0 but never listening, so nothing else can take the port
/// and start answering on it (a dead backend, without probing for a free port).
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(([127, 0, 0, 1], 0).into())
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("local address");
    (socket, addr)
}

/// A fresh directory under cargo's per-target scratch space, removed on drop — unless
/// the test is panicking, in which case it is kept and its path printed for inspection.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        // Unique across tests in this process (counter) and across runs (pid, clock).
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "sluice-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes (or replaces) file `name` in this directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
            return;
        }
        // Best effort: a leftover directory under target/ harms nothing.
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The real `sluice-proxy` binary, its listeners on loopback port 0, killed on drop.
pub struct ProxyProcess {
    /// Behind a mutex so `&self` methods can reap it: once reaped, its PID may be
    /// reused, so every signal is sent while holding this lock and only to a child
    /// known to be unreaped.
    child: Mutex<Child>,
    pid: u32,
    /// The bound address of each listener, by flag name (`listen`, `admin`,
    /// `inbound`, `telemetry`), as the proxy wrote them to its `--ready-file`.
    bound: HashMap<String, SocketAddr>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    dir: TempDir,
}

impl ProxyProcess {
    /// Starts `sluice-proxy --policy <policy> --listen 127.0.0.1:0 --admin
    /// 127.0.0.1:0 <extra_args>`, with stdout and stderr captured to files, and
    /// waits until its listeners are bound (other listeners in `extra_args` should
    /// be given `127.0.0.1:0` too; [`ProxyProcess::addr`] tells where they are).
    /// Call [`ProxyProcess::wait_ready`] before sending traffic.
    pub fn start(policy: impl AsRef<Path>, extra_args: &[&str]) -> Self {
        let mut args = vec!["--policy".to_owned(), policy.as_ref().display().to_string()];
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        Self::start_args(&args)
    }

    /// Starts `sluice-proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 <args>` (the
    /// caller names the policy source) and waits until its listeners are bound.
    pub fn start_args(args: &[String]) -> Self {
        let dir = TempDir::new();
        let ready_file = dir.path().join("ready.json");
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let create = |path: &Path| {
            File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
        };
        // SLUICE_TEST_ENGINE=pingora runs a suite against pingora's engine instead of
        // the default (scripts/test runs the HTTP suites on both).
        let engine: Vec<String> = match std::env::var("SLUICE_TEST_ENGINE") {
            Ok(engine) if !args.iter().any(|a| a == "--engine") => vec!["--engine".into(), engine],
            _ => Vec::new(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-proxy"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready_file)
            .args(&engine)
            .args(args)
            .stdin(Stdio::null())
            .stdout(create(&stdout_path))
            .stderr(create(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sluice-proxy: {e}"));
        let bound = match wait_bound(&mut child, &ready_file) {
            Ok(bound) => bound,
            Err(why) => {
                // Our own unreaped child: its PID is still its own.
                let _ = child.kill();
                let _ = child.wait();
                panic!("sluice-proxy {why}; stderr:\n{}", read_lossy(&stderr_path));
            }
        };
        Self {
            pid: child.id(),
            child: Mutex::new(child),
            bound,
            stdout_path,
            stderr_path,
            dir,
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.addr("listen")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addr("admin")
    }

    /// The bound address of the listener given by flag `--<name>`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .bound
            .get(name)
            .unwrap_or_else(|| panic!("sluice-proxy has no {name} listener: {:?}", self.bound))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The scratch directory holding the captured output; tests may keep files here.
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// Polls `GET /ready` on the admin address until it answers 200. Panics with the
    /// proxy's stderr if that takes over 15 s or the proxy exits first.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        // Bounded by the deadline.
        loop {
            if let Some(status) = self.exit_status() {
                panic!(
                    "sluice-proxy exited ({status}) before it was ready; stderr:\n{}",
                    self.stderr()
                );
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                panic!(
                    "sluice-proxy not ready after {READY_TIMEOUT:?} on {}; stderr:\n{}",
                    self.admin_addr(),
                    self.stderr()
                );
            }
            let probe = get(self.admin_addr(), "127.0.0.1", "/ready");
            if let Ok(Ok(response)) = tokio::time::timeout(remaining, probe).await {
                if response.status == 200 {
                    return;
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Sends SIGTERM. Panics if the proxy has already exited.
    pub fn sigterm(&self) {
        let mut child = self.lock_child();
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "sigterm: sluice-proxy already exited ({status}); stderr:\n{}",
                self.stderr()
            );
        }
        // The child is unreaped while we hold the lock, so the PID is still its own.
        let killed = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill: {e}"));
        assert!(killed.success(), "kill -TERM {} failed: {killed}", self.pid);
    }

    /// Waits up to `timeout` for the proxy to exit. Async so that in-process fake
    /// upstreams on the same runtime keep serving while the proxy drains.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        // Bounded by the deadline.
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Everything the proxy wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything the proxy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The JSON access-log records on stdout so far. A last line still being written
    /// (no newline yet) is left for the next call; any other line that is not JSON
    /// fails the test, since stdout is meant to carry only the access log.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let stdout = self.stdout();
        let complete = stdout.rsplit_once('\n').map_or("", |(done, _)| done);
        complete
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"))
            })
            .collect()
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.lock_child().try_wait().ok().flatten()
    }

    fn lock_child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Ok(None) = child.try_wait() {
            // SIGKILL to our own unreaped child, then reap it so no zombie is left.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded: 15 s) for the proxy's `--ready-file`: the address each listener
/// got. It blocks the caller's thread, briefly: the proxy binds and writes the file
/// before it serves anything, waiting on nothing a test runs in-process.
fn wait_bound(child: &mut Child, ready_file: &Path) -> Result<HashMap<String, SocketAddr>, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    // Bounded by the deadline.
    loop {
        // Written whole and renamed into place: present means complete.
        if let Ok(text) = fs::read_to_string(ready_file) {
            return serde_json::from_str(&text).map_err(|e| {
                format!("wrote a --ready-file that is not an address map ({e}): {text}")
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}) before binding its listeners"));
        }
        if Instant::now() >= deadline {
            return Err(format!("bound no listeners within {READY_TIMEOUT:?}"));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

// Helpers shared by the proxy test files.

pub async fn metrics(proxy: &ProxyProcess) -> String {
    get(proxy.admin_addr(), "admin", "/metrics")
        .await
        .expect("scrape")
        .text()
}

/// The value of the sample whose line starts with `series` (name and labels), or 0.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Scrapes until `series` reaches `value` (metrics of a request are recorded after
/// its response is sent), then returns the scrape; bounded: 10 s.
pub async fn metrics_once(proxy: &ProxyProcess, series: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(proxy).await;
        if sample(&m, series) >= value || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn version(proxy: &ProxyProcess) -> String {
    let dump = get(proxy.admin_addr(), "admin", "/config_dump")
        .await
        .expect("config_dump");
    let json: serde_json::Value = serde_json::from_slice(&dump.body).expect("json dump");
    json["version"].as_str().unwrap_or_default().to_owned()
}

/// Polls until the served version differs from `old` (bounded: 10 s).
pub async fn wait_new_version(proxy: &ProxyProcess, old: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = version(proxy).await;
        if v != old {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "policy was not reloaded within 10 s: {}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replaces the policy file atomically, as editors and Kubernetes do.
pub fn replace(dir: &TempDir, yaml: &str) {
    let tmp = dir.write(".policy.yaml.tmp", yaml);
    std::fs::rename(&tmp, dir.path().join("policy.yaml")).expect("rename policy");
}

/// The access log once it has at least `n` lines: a line is written after its
/// response, so a client can be a moment ahead of the log (bounded: 10 s).
pub async fn log_lines(proxy: &ProxyProcess, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = proxy.access_log();
        if log.len() >= n || Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fake backend on a free loopback port (keep it alive: dropping it stops it).
pub async fn upstream(name: &str) -> sluice_demo::upstream::Upstream {
    upstream_with_latency(name, Duration::ZERO).await
}

/// A fake backend that waits `latency` before each answer.
pub async fn upstream_with_latency(
    name: &str,
    latency: Duration,
) -> sluice_demo::upstream::Upstream {
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut config = sluice_demo::upstream::UpstreamConfig::new(name);
    config.latency = latency;
    sluice_demo::upstream::Upstream::start(any, config)
        .await
        .unwrap_or_else(|e| panic!("upstream {name}: {e}"))
}

/// A minimal h2c server answering every stream 200 with its own name.
pub async fn h2c_backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // Bounded by the test's life: the runtime ends with the test.
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let resp = http::Response::builder()
                        .status(200)
                        .header("x-upstream", name)
                        .body(())
                        .expect("response");
                    if let Ok(mut stream) = respond.send_response(resp, false) {
                        let _ = stream.send_data(bytes::Bytes::from_static(b"h2c backend\n"), true);
                    }
                }
            });
        }
    });
    addr
}

/// The proxy serving `yaml` (written to `dir/policy.yaml`), once ready.
pub async fn start(dir: &TempDir, yaml: &str) -> ProxyProcess {
    start_with(dir, yaml, &[]).await
}

/// Like [`start`], with extra command-line arguments.
pub async fn start_with(dir: &TempDir, yaml: &str, extra: &[&str]) -> ProxyProcess {
    let path = dir.write("policy.yaml", yaml);
    let proxy = ProxyProcess::start(&path, extra);
    proxy.wait_ready().await;
    proxy
}
