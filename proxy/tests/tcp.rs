//! Beyond request/response HTTP, through the real `sluice-proxy` on loopback:
//! WebSocket upgrades (handshake and frames both ways, on both engines), and
//! protocol detection with opaque TCP on a `--transparent` listener.
//!
//! Transparent interception needs iptables (scripts/netns-test does it for real);
//! on plain loopback a connection to a `--transparent` listener has no original
//! destination, and the inbound listener then delivers to `--app` — the same
//! path an intercepted connection takes, minus the port it was for. That is what
//! these tests use: detection, opaque forwarding, `spec.tcp` and the metrics are
//! the real ones.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::{metrics, sample, start_with, ProxyProcess, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every wait in these tests gives up after this (a generous deadline, never a
/// measured time).
const PATIENCE: Duration = Duration::from_secs(10);
/// The RFC 6455 GUID the accept key is derived with.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn ws_accept(key: &str) -> String {
    let digest = sha1_smol::Sha1::from(format!("{key}{WS_GUID}")).digest();
    base64::engine::general_purpose::STANDARD.encode(digest.bytes())
}

/// Reads until `done` says the bytes so far are enough (or PATIENCE passes, or EOF).
async fn read_until(stream: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut got = Vec::new();
    // Bounded by the deadline and by EOF.
    while !done(&got) {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
    got
}

fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// One WebSocket frame: FIN set, `opcode`, masked with `mask` when given.
fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(masked | n as u8),
        n => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Parses one frame at the start of `bytes`: (opcode, payload, length), unmasked.
fn parse_frame(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&b0, &b1) = (bytes.first()?, bytes.get(1)?);
    let (mut at, mut len) = (2usize, usize::from(b1 & 0x7f));
    if len == 126 {
        len = usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]));
        at = 4;
    }
    let key = if b1 & 0x80 != 0 {
        let key: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let payload = bytes.get(at..at + len)?;
    let payload = match key {
        Some(k) => payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ k[i % 4])
            .collect(),
        None => payload.to_vec(),
    };
    Some((b0 & 0x0f, payload, at + len))
}

/// A WebSocket echo server: checks the handshake, answers 101 with the accept key,
/// then echoes every text frame (unmasked, as a server sends) until a close frame.
async fn ws_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // Bounded by the test's life: the runtime ends with the test.
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = read_until(&mut stream, |b| head_end(b).is_some()).await;
                let Some(end) = head_end(&buf) else { return };
                let raw = String::from_utf8_lossy(&buf[..end]).into_owned();
                let head = raw.to_ascii_lowercase();
                // The key is case-sensitive base64: taken from the head as sent.
                let key = raw
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.trim()
                            .eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| value.trim().to_owned())
                    })
                    .unwrap_or_default();
                if !head.contains("upgrade: websocket") || key.is_empty() {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    ws_accept(&key)
                );
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                buf.drain(..end);
                // Bounded: each pass consumes a frame or reads more, until EOF or close.
                loop {
                    match parse_frame(&buf) {
                        Some((opcode, payload, used)) => {
                            buf.drain(..used);
                            if opcode == 0x8 {
                                let _ = stream.write_all(&ws_frame(0x8, &payload, None)).await;
                                return;
                            }
                            if stream
                                .write_all(&ws_frame(opcode, &payload, None))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        None => {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Opens a WebSocket through `addr` (Host `ws`), sends masked text frames and
/// checks each comes back; then closes. Panics with what it saw otherwise.
async fn websocket_echo_through(addr: SocketAddr, what: &str) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let key = base64::engine::general_purpose::STANDARD.encode(*b"sluice-test-key!");
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let got = read_until(&mut stream, |b| head_end(b).is_some()).await;
    let end = head_end(&got).unwrap_or_else(|| {
        panic!(
            "{what}: no response head: {:?}",
            String::from_utf8_lossy(&got)
        )
    });
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{what}: {head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            ws_accept(&key).to_ascii_lowercase()
        )),
        "{what}: {head}"
    );
    let mut rest = got[end..].to_vec();
    for (i, text) in ["hello", "through the proxy", &"x".repeat(300)]
        .iter()
        .enumerate()
    {
        let mask = [0x11, 0x22, 0x33, i as u8];
        stream
            .write_all(&ws_frame(0x1, text.as_bytes(), Some(mask)))
            .await
            .expect("frame");
        let more = read_until(&mut stream, |b| {
            let mut all = rest.clone();
            all.extend_from_slice(b);
            parse_frame(&all).is_some()
        })
        .await;
        rest.extend_from_slice(&more);
        let (opcode, payload, used) =
            parse_frame(&rest).unwrap_or_else(|| panic!("{what}: no echo of frame {i}: {rest:?}"));
        rest.drain(..used);
        assert_eq!(opcode, 0x1, "{what}");
        assert_eq!(payload, text.as_bytes(), "{what}");
    }
    stream
        .write_all(&ws_frame(0x8, &[0x03, 0xe8], Some([1, 2, 3, 4])))
        .await
        .expect("close");
    let more = read_until(&mut stream, |b| parse_frame(b).is_some()).await;
    rest.extend_from_slice(&more);
    assert_eq!(
        parse_frame(&rest).map(|f| f.0),
        Some(0x8),
        "{what}: close echoed"
    );
}

#[tokio::test]
async fn websocket_upgrades_echo_frames_both_ways_on_both_engines() {
    let server = ws_echo_server().await;
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: ws}}\nspec:\n  hosts: [ws]\n  backends:\n    - address: {server}\n"
    );
    let app = server.to_string();
    for engine in ["h1", "pingora"] {
        let dir = TempDir::new();
        // The outbound listener routes by Host; the transparent inbound listener
        // detects HTTP/1 first and delivers to the app.
        let proxy = start_with(
            &dir,
            &yaml,
            &[
                "--engine",
                engine,
                "--transparent",
                "--inbound",
                "127.0.0.1:0",
                "--app",
                &app,
            ],
        )
        .await;
        websocket_echo_through(proxy.listen_addr(), &format!("{engine}, outbound")).await;
        websocket_echo_through(proxy.addr("inbound"), &format!("{engine}, inbound")).await;
    }
}

/// A Redis-like server: answers each `PING` with `+PONG` (RESP), counting
/// connections.
async fn resp_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        // Bounded by the test's life.
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // Bounded: ends at EOF or error.
                loop {
                    let mut chunk = [0u8; 1024];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(i) = buf.windows(6).position(|w| w == b"PING\r\n") {
                        buf.drain(..i + 6);
                        if stream.write_all(b"+PONG\r\n").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// A server that speaks first (an SMTP-like banner), then echoes what it gets.
async fn banner_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // Bounded by the test's life.
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream
                    .write_all(b"220 sluice-test ESMTP\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

const RESP_PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// A proxy with a transparent inbound listener delivering to `app` under the
/// policy `db` (whose `spec.tcp` is `tcp`, after the `spec` lines `extra`).
async fn transparent_proxy(dir: &TempDir, app: SocketAddr, tcp: &str) -> ProxyProcess {
    transparent_proxy_with(dir, app, "", tcp).await
}

async fn transparent_proxy_with(
    dir: &TempDir,
    app: SocketAddr,
    extra: &str,
    tcp: &str,
) -> ProxyProcess {
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: db}}\nspec:\n{extra}  tcp: {tcp}\n"
    );
    let app = app.to_string();
    start_with(
        dir,
        &yaml,
        &[
            "--transparent",
            "--inbound",
            "127.0.0.1:0",
            "--app",
            &app,
            "--inbound-policy",
            "db",
            "--detect-timeout",
            "200ms",
        ],
    )
    .await
}

/// Scrapes until `series` is `value` (bounded by PATIENCE), then returns the scrape.
async fn metrics_at(proxy: &ProxyProcess, series: &str, value: f64) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = metrics(proxy).await;
        if sample(&m, series) == value || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn opaque_tcp_reaches_the_app_and_is_counted() {
    let (app, _) = resp_server().await;
    let dir = TempDir::new();
    let proxy = transparent_proxy(&dir, app, "{connectTimeout: 2s}").await;
    let mut client = TcpStream::connect(proxy.addr("inbound"))
        .await
        .expect("connect");
    for _ in 0..3 {
        client.write_all(RESP_PING).await.expect("ping");
        let got = read_until(&mut client, |b| b.ends_with(b"\r\n")).await;
        assert_eq!(got, b"+PONG\r\n");
    }
    drop(client);
    let opened =
        r#"sluice_tcp_connections_total{direction="inbound",outcome="opened",policy="db"}"#;
    let received = r#"sluice_tcp_bytes_total{direction="inbound",policy="db",side="received"}"#;
    let sent = r#"sluice_tcp_bytes_total{direction="inbound",policy="db",side="sent"}"#;
    let active = r#"sluice_tcp_active_connections{direction="inbound"}"#;
    let m = metrics_at(&proxy, active, 0.0).await;
    assert_eq!(sample(&m, opened), 1.0, "{m}");
    let detected = r#"sluice_protocol_detections_total{direction="inbound",result="opaque"}"#;
    assert_eq!(sample(&m, detected), 1.0, "{m}");
    assert_eq!(sample(&m, received), (3 * RESP_PING.len()) as f64, "{m}");
    assert_eq!(sample(&m, sent), (3 * b"+PONG\r\n".len()) as f64, "{m}");
    let log = support::log_lines(&proxy, 1).await;
    let line = log
        .iter()
        .find(|l| l["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("no tcp line: {log:?}"));
    assert_eq!(line["policy"], "db");
    assert_eq!(line["direction"], "inbound");
    assert_eq!(line["end"], "closed");
    assert_eq!(line["bytes_sent"], 3 * 7);
}

#[tokio::test]
async fn strict_mtls_closes_inbound_plaintext_tcp() {
    let (app, connections) = resp_server().await;
    let dir = TempDir::new();
    let proxy = transparent_proxy_with(&dir, app, "  mtls: {mode: strict}\n", "{}").await;
    let mut client = TcpStream::connect(proxy.addr("inbound"))
        .await
        .expect("connect");
    client.write_all(RESP_PING).await.expect("ping");
    let got = read_until(&mut client, |b| b.ends_with(b"\r\n")).await;
    assert!(got.is_empty(), "a plaintext caller got {got:?}");
    let refused =
        r#"sluice_tcp_connections_total{direction="inbound",outcome="mtls_required",policy="db"}"#;
    let m = metrics_at(&proxy, refused, 1.0).await;
    assert_eq!(sample(&m, refused), 1.0, "{m}");
    assert_eq!(
        connections.load(Ordering::Relaxed),
        0,
        "the app saw nothing"
    );
}

#[tokio::test]
async fn a_server_that_speaks_first_is_reached_after_the_detect_timeout() {
    let app = banner_server().await;
    let dir = TempDir::new();
    let proxy = transparent_proxy(&dir, app, "{maxConnections: 10}").await;
    let mut client = TcpStream::connect(proxy.addr("inbound"))
        .await
        .expect("connect");
    // The client says nothing: detection gives up waiting, and the banner comes.
    let banner = read_until(&mut client, |b| b.ends_with(b"\r\n")).await;
    assert_eq!(banner, b"220 sluice-test ESMTP\r\n");
    client.write_all(b"EHLO client\r\n").await.expect("write");
    let echoed = read_until(&mut client, |b| b.ends_with(b"\r\n")).await;
    assert_eq!(echoed, b"EHLO client\r\n");
    // Half-close: the client's FIN reaches the server, whose close comes back.
    client.shutdown().await.expect("shutdown");
    let rest = read_until(&mut client, |_| false).await;
    assert!(rest.is_empty(), "{rest:?}");
    let timeout = r#"sluice_protocol_detections_total{direction="inbound",result="timeout"}"#;
    assert_eq!(sample(&metrics(&proxy).await, timeout), 1.0);
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_unanswered() {
    let (app, connections) = resp_server().await;
    let dir = TempDir::new();
    let proxy = transparent_proxy(&dir, app, "{maxConnections: 1}").await;
    let inbound = proxy.addr("inbound");
    let mut first = TcpStream::connect(inbound).await.expect("connect");
    first.write_all(RESP_PING).await.expect("ping");
    assert_eq!(
        read_until(&mut first, |b| b.ends_with(b"\r\n")).await,
        b"+PONG\r\n"
    );
    // The first holds the only slot: the second is closed, and never reaches the app.
    let mut second = TcpStream::connect(inbound).await.expect("connect");
    second.write_all(RESP_PING).await.expect("ping");
    let got = read_until(&mut second, |_| false).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    let refused =
        r#"sluice_tcp_connections_total{direction="inbound",outcome="refused_limit",policy="db"}"#;
    let m = metrics_at(&proxy, refused, 1.0).await;
    assert_eq!(sample(&m, refused), 1.0, "{m}");
    let log = support::log_lines(&proxy, 1).await;
    let line = log
        .iter()
        .find(|l| l["end"] == "refused_limit")
        .unwrap_or_else(|| panic!("no refused line: {log:?}"));
    assert_eq!(line["policy"], "db");
    assert_eq!(line["bytes_received"], RESP_PING.len());
    assert_eq!(line["bytes_sent"], 0);
    // Once the first closes, its slot is given back.
    drop(first);
    let active = r#"sluice_tcp_active_connections{direction="inbound"}"#;
    metrics_at(&proxy, active, 0.0).await;
    let mut third = TcpStream::connect(inbound).await.expect("connect");
    third.write_all(RESP_PING).await.expect("ping");
    assert_eq!(
        read_until(&mut third, |b| b.ends_with(b"\r\n")).await,
        b"+PONG\r\n"
    );
}

#[tokio::test]
async fn http_on_a_transparent_listener_is_still_http() {
    let app = support::upstream("app").await;
    let dir = TempDir::new();
    let proxy = transparent_proxy(&dir, app.addr(), "{maxConnections: 1}").await;
    let got = support::get(proxy.addr("inbound"), "app", "/hello")
        .await
        .expect("request");
    assert_eq!(got.status, 200);
    assert_eq!(got.text().trim_end(), "app GET /hello");
    let log = support::log_lines(&proxy, 1).await;
    assert!(log.iter().all(|l| l["protocol"] != "tcp"), "{log:?}");
    let detected = r#"sluice_protocol_detections_total{direction="inbound",result="http1"}"#;
    assert_eq!(sample(&metrics(&proxy).await, detected), 1.0);
}

#[tokio::test]
async fn opaque_tcp_with_nowhere_to_go_is_closed_and_counted() {
    let (app, _) = resp_server().await;
    let dir = TempDir::new();
    let proxy = transparent_proxy(&dir, app, "{maxConnections: 1}").await;
    // The outbound listener, connected to directly: no original destination.
    let mut client = TcpStream::connect(proxy.listen_addr())
        .await
        .expect("connect");
    client.write_all(RESP_PING).await.expect("ping");
    let got = read_until(&mut client, |_| false).await;
    assert!(got.is_empty(), "{got:?}");
    let series =
        r#"sluice_tcp_connections_total{direction="outbound",outcome="no_destination",policy=""}"#;
    let m = metrics_at(&proxy, series, 1.0).await;
    assert_eq!(sample(&m, series), 1.0, "{m}");
}

/// Sends a PING on a new connection to `addr`: whether PONG came back.
async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(RESP_PING).await.is_err() {
        return false;
    }
    read_until(&mut stream, |b| b.ends_with(b"\r\n")).await == b"+PONG\r\n"
}

#[tokio::test]
async fn connections_over_the_connection_rate_are_closed() {
    let (app, connections) = resp_server().await;
    let dir = TempDir::new();
    // Two at once, then one per 1000 s: nothing refills during the test.
    let proxy = transparent_proxy(&dir, app, "{connectionsPerSecond: 0.001, burst: 2}").await;
    let inbound = proxy.addr("inbound");
    assert!(ping(inbound).await);
    assert!(ping(inbound).await);
    assert!(
        !ping(inbound).await,
        "the third connection is over the rate"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    let refused =
        r#"sluice_tcp_connections_total{direction="inbound",outcome="refused_rate",policy="db"}"#;
    let m = metrics_at(&proxy, refused, 1.0).await;
    assert_eq!(sample(&m, refused), 1.0, "{m}");
}

#[tokio::test]
async fn shadow_mode_counts_what_it_would_refuse_and_lets_it_through() {
    let (app, connections) = resp_server().await;
    let dir = TempDir::new();
    let proxy = transparent_proxy_with(&dir, app, "  mode: shadow\n", "{maxConnections: 1}").await;
    let inbound = proxy.addr("inbound");
    let mut first = TcpStream::connect(inbound).await.expect("connect");
    first.write_all(RESP_PING).await.expect("ping");
    assert_eq!(
        read_until(&mut first, |b| b.ends_with(b"\r\n")).await,
        b"+PONG\r\n"
    );
    assert!(ping(inbound).await, "shadow mode refuses nothing");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    let shadow = r#"sluice_tcp_connections_total{direction="inbound",outcome="shadow_refused_limit",policy="db"}"#;
    let m = metrics_at(&proxy, shadow, 1.0).await;
    assert_eq!(sample(&m, shadow), 1.0, "{m}");
}

#[tokio::test]
async fn opaque_tcp_is_closed_until_a_policy_is_loaded() {
    let (app, connections) = resp_server().await;
    let dir = TempDir::new();
    // An invalid policy at start: the proxy runs, not ready, with no policy.
    let path = dir.write(
        "policy.yaml",
        "apiVersion: sluice.dev/v1alpha1\nkind: Nonsense\n",
    );
    let app = app.to_string();
    let proxy = ProxyProcess::start(
        &path,
        &["--transparent", "--inbound", "127.0.0.1:0", "--app", &app],
    );
    assert!(!ping(proxy.addr("inbound")).await);
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    let series =
        r#"sluice_tcp_connections_total{direction="inbound",outcome="not_ready",policy=""}"#;
    let m = metrics_at(&proxy, series, 1.0).await;
    assert_eq!(sample(&m, series), 1.0, "{m}");
}
