//! Opaque TCP on the transparent listeners: connections that protocol detection
//! ([`crate::detect`]) found not to be HTTP, proxied byte for byte to where they
//! were going, under connection-level governance.
//!
//! Why: with iptables interception a database client's connection reaches the
//! proxy like any other; without this it would be parsed as HTTP and broken, and
//! every such port would need an annotation to skip interception. Now it reaches
//! its destination, counted, and a policy can bound it (`spec.tcp`).
//!
//! Where a connection goes follows the same rules as HTTP passthrough: outbound to
//! its original destination; inbound to the app on 127.0.0.1 at the original port
//! ([`Side::app_address`]), never to one of the proxy's own ports. Which policy
//! governs it: outbound, the policy whose backends include the destination
//! ([`Runtime::policy_by_backend`]); inbound, the listener's inbound policy. With
//! none, or a policy without `spec.tcp`, it is an ungoverned passthrough (counted
//! under `policy=""`).
//!
//! Before the first policy is loaded every opaque connection is closed (counted
//! `not_ready`), as HTTP is answered 503 then.
//!
//! Invariants: a refused connection is closed before anything is sent upstream;
//! a connection's limiter slot and its `sluice_tcp_active_connections` count are
//! held from admission until both directions are done, and given back exactly once
//! (drop guards); half-close is relayed (one side's FIN is passed on and the other
//! direction goes on, `copy_bidirectional`); a connection idle both ways for the
//! idle timeout is closed. Opaque connections are not part of the HTTP drain (a
//! pooled database connection would hold it for its whole timeout): they end with
//! the process.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus::{IntCounter, IntGauge};
use sluice_policy::{Mode, TcpLimits};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::accesslog::{TcpRecord, Timestamp};
use crate::conn::Conn;
use crate::detect::{sniff, Detection, Protocol, Sniffed};
use crate::exchange::{Direction, Side};
use crate::runtime::{PolicyRuntime, Runtime};
use crate::series::PolicySeries;
use crate::shared::Shared;
use crate::tcplimit::{Refused, TcpPermit};

/// What the listener goes on with after [`sort`]: an HTTP connection and the
/// bytes already read from it (`None`: the connection was taken, or is gone).
pub type ForHttp = Option<(Conn, BytesMut)>;

/// Longest wait for a meshed caller's TLS handshake to complete.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS record carrying a handshake message (a ClientHello
/// opens every TLS connection with one); no HTTP/1 method or HTTP/2 preface
/// starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

/// Sorts a new connection of a listener: with `detection` (transparent listeners),
/// one whose destination port is listed opaque, or whose first bytes are neither
/// HTTP/1 nor the HTTP/2 preface, is proxied here as opaque TCP and `None` is
/// returned once it is done; HTTP goes back to the caller with what was read.
/// Without `detection`, every connection is HTTP (nothing is read).
///
/// Before that, on inbound listeners of a proxy that has a workload identity, a
/// connection that opens with a TLS handshake record is a meshed caller: its mTLS
/// handshake is completed here (waiting at most `wait` for its first byte) and the
/// decrypted connection, with the caller's verified identity, is HTTP. Ports
/// listed opaque are not looked at (an app's own TLS goes through untouched).
pub async fn sort(
    shared: &Arc<Shared>,
    side: &Side,
    detection: Option<&Detection>,
    mut stream: TcpStream,
    original_dst: Option<SocketAddr>,
    wait: Duration,
) -> ForHttp {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let listed = match (detection, original_dst) {
        (Some(d), Some(dst)) => d.opaque_ports.contains(&dst.port()),
        _ => false,
    };
    let detected = |result: &str| {
        shared
            .metrics
            .protocol_detections
            .with_label_values(&[side.direction.as_str(), result])
            .inc();
    };
    // The client stayed silent for the whole wait already (no need to wait as
    // long again for detection: a server that speaks first is waiting too).
    let mut silent = false;
    if side.direction == Direction::Inbound && !listed {
        if let Some(identity) = shared.identity.current() {
            let mut first = [0u8; 1];
            match tokio::time::timeout(wait, stream.peek(&mut first)).await {
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(_)) if first[0] == TLS_HANDSHAKE => {
                    detected("mtls");
                    let accepted =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, identity.accept(stream)).await;
                    return match accepted {
                        Ok(Ok((tls, peer))) => Conn::server(tls, peer).ok().map(|c| (c, buf)),
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "mTLS handshake refused");
                            None
                        }
                        Err(_) => None,
                    };
                }
                Ok(Ok(_)) => {}
                // A silent client (a server that speaks first).
                Err(_) => silent = true,
            }
        }
    }
    let Some(detection) = detection else {
        return Some((Conn::Tcp(stream), buf));
    };
    if listed {
        detected("opaque_port");
    } else if silent && wait >= detection.timeout {
        detected(Sniffed::Silent.as_str());
    } else {
        let sniffed = sniff(&mut stream, &mut buf, detection.timeout).await;
        detected(sniffed.as_str());
        match sniffed {
            Sniffed::Closed => return None,
            Sniffed::Protocol(Protocol::Http1 | Protocol::Http2) => {
                return Some((Conn::Tcp(stream), buf))
            }
            Sniffed::Protocol(Protocol::Opaque) | Sniffed::Silent => {}
        }
    }
    proxy(
        shared,
        side,
        detection.idle_timeout,
        stream,
        original_dst,
        buf,
    )
    .await;
    None
}

/// How an admitted connection ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    IdleTimeout,
    Error,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::IdleTimeout => "idle_timeout",
            End::Error => "error",
        }
    }
}

/// Proxies one opaque connection (`first`: the bytes detection read from it).
pub async fn proxy(
    shared: &Arc<Shared>,
    side: &Side,
    idle_timeout: Duration,
    client: TcpStream,
    original_dst: Option<SocketAddr>,
    first: BytesMut,
) {
    let start = Instant::now();
    let direction = side.direction.as_str();
    let dst = match side.direction {
        Direction::Inbound => side.app_address(original_dst),
        Direction::Outbound => original_dst,
    };
    let port = dst.or(original_dst).map_or(0, |d| d.port());
    // Everything the connection needs from the snapshot is taken here, at
    // admission; the snapshot itself is not held for the connection's life (which
    // may be hours, across many reloads).
    let (admitted, policy, version, series, connect_timeout) = {
        let runtime = shared.runtime.load();
        let policy = governing_policy(&runtime, side, dst);
        if let Some(p) = policy {
            p.series.record(&shared.series);
        }
        let admitted = if !runtime.loaded() {
            // No policy yet (HTTP is answered 503 then): the limits a policy may
            // set are unknown, and the pod is not ready, so nothing is let through.
            Err("not_ready")
        } else if dst.is_none() {
            // Outbound without an original destination (a connection made to the
            // proxy itself), or inbound to one of the proxy's own ports.
            Err("no_destination")
        } else if plaintext_refused(side, policy) {
            Err("mtls_required")
        } else {
            admit(policy)
        };
        let limits = policy.and_then(|p| p.tcp.as_ref());
        (
            admitted,
            policy.map(|p| p.name.clone()),
            policy.map(|_| runtime.version.clone()),
            policy.map(|p| Arc::clone(&p.series)),
            limits.map_or(TcpLimits::DEFAULT_CONNECT_TIMEOUT, |l| {
                l.rule().connect_timeout
            }),
        )
    };
    let label = policy.as_deref().unwrap_or("");
    let metrics = &shared.metrics;
    let count = |outcome: &str| {
        metrics
            .tcp_connections
            .with_label_values(&[label, direction, outcome])
            .inc();
    };
    let log = |end: &str, received: u64, sent: u64| {
        shared.access_log.write_tcp(&TcpRecord {
            ts: Timestamp::now(),
            direction,
            policy: policy.as_deref(),
            port,
            end,
            bytes_received: received,
            bytes_sent: sent,
            duration: start.elapsed(),
            policy_version: version.as_deref(),
        });
    };
    // A connection closed unanswered: counted and logged (what detection read
    // from it is dropped).
    let refuse = |outcome: &str| {
        count(outcome);
        log(outcome, first.len() as u64, 0);
    };
    let (_permit, shadow_refusal) = match admitted {
        Ok(admission) => admission,
        Err(outcome) => return refuse(outcome),
    };
    if let Some(outcome) = shadow_refusal {
        count(outcome);
    }
    let Some(dst) = dst else {
        return refuse("no_destination");
    };
    let upstream = match tokio::time::timeout(connect_timeout, TcpStream::connect(dst)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(_)) | Err(_) => return refuse("connect_error"),
    };
    count("opened");
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let active = Active::new(metrics.tcp_active.with_label_values(&[direction]));
    let activity = Arc::new(Activity::new());
    let mut client = Counted {
        inner: client,
        bytes: 0,
        counter: metrics
            .tcp_bytes
            .with_label_values(&[label, direction, "received"]),
        activity: Arc::clone(&activity),
        series: series.clone(),
    };
    let mut upstream = Counted {
        inner: upstream,
        bytes: 0,
        counter: metrics
            .tcp_bytes
            .with_label_values(&[label, direction, "sent"]),
        activity: Arc::clone(&activity),
        series,
    };
    // What detection read goes first, counted as received from the client.
    client.bytes += first.len() as u64;
    client.counter.inc_by(first.len() as u64);
    let end = if upstream.inner.write_all(&first).await.is_err() {
        End::Error
    } else {
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                Ok(_) => End::Closed,
                Err(_) => End::Error,
            },
            () = idle(&activity, idle_timeout) => End::IdleTimeout,
        }
    };
    drop(active);
    log(end.as_str(), client.bytes, upstream.bytes);
}

/// `spec.tcp` of the governing policy, if any: the connection's slot (held until
/// it closes) and, in shadow mode, what would have refused it; or the outcome it
/// is refused with.
fn admit(
    policy: Option<&PolicyRuntime>,
) -> Result<(Option<TcpPermit>, Option<&'static str>), &'static str> {
    let Some(limits) = policy.and_then(|p| p.tcp.as_ref()) else {
        return Ok((None, None));
    };
    match limits.admit() {
        Ok(permit) => Ok((Some(permit), None)),
        // Shadow mode: counted as what would have happened, let through.
        Err(refused) if policy.is_some_and(|p| p.mode == Mode::Shadow) => Ok((
            None,
            Some(match refused {
                Refused::Limit => "shadow_refused_limit",
                Refused::Rate => "shadow_refused_rate",
            }),
        )),
        Err(refused) => Err(refused.as_str()),
    }
}

/// An inbound opaque connection is plaintext (a meshed caller's TLS is HTTP,
/// sorted before): `strict` mTLS (the policy's, else the listener's default)
/// refuses it (counted `mtls_required`); in shadow mode it is let through.
fn plaintext_refused(side: &Side, policy: Option<&PolicyRuntime>) -> bool {
    side.direction == Direction::Inbound
        && policy.map_or(side.mtls_default, |p| p.access.mode(side.mtls_default))
            == sluice_policy::MtlsMode::Strict
        && !policy.is_some_and(|p| p.mode == Mode::Shadow)
}

/// The policy governing a connection to `dst`: inbound, the listener's; outbound,
/// the one whose backends include `dst`.
fn governing_policy<'r>(
    runtime: &'r Runtime,
    side: &Side,
    dst: Option<SocketAddr>,
) -> Option<&'r PolicyRuntime> {
    let index = match side.direction {
        Direction::Inbound => runtime.policy_index(side.inbound_policy.as_deref()?),
        Direction::Outbound => runtime.policy_by_backend(dst?),
    }?;
    runtime.policies.get(index)
}

/// `sluice_tcp_active_connections`, held up while the guard lives.
struct Active(IntGauge);

impl Active {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Active(gauge)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// When a connection last moved a byte either way, in milliseconds since `base`
/// (tokio's clock, so tests can pause it).
struct Activity {
    base: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Returns once nothing has moved for `timeout`. Bounded: each pass either
/// returns or sleeps until a later deadline, which only traffic moves.
async fn idle(activity: &Activity, timeout: Duration) {
    loop {
        let deadline = activity.last() + timeout;
        if deadline <= tokio::time::Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream whose reads are counted (bytes, the metric, the activity time).
struct Counted {
    inner: TcpStream,
    bytes: u64,
    counter: IntCounter,
    activity: Arc<Activity>,
    /// The governing policy's series, marked used by traffic so that they are not
    /// expired under a busy long-lived connection (whose byte counter handles
    /// would then count into removed series). A connection silent for the whole
    /// `--metrics-idle` may still see its series expire; its later bytes are then
    /// not exported (the access-log line still has them).
    series: Option<Arc<PolicySeries>>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.bytes += n;
            this.counter.inc_by(n);
            this.activity.touch();
            if let Some(series) = &this.series {
                series.mark_used();
            }
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_idle_after_the_timeout() {
        let activity = Activity::new();
        let started = tokio::time::Instant::now();
        idle(&activity, Duration::from_secs(60)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_postpones_the_idle_timeout() {
        let activity = Arc::new(Activity::new());
        let toucher = Arc::clone(&activity);
        let started = tokio::time::Instant::now();
        let traffic = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(40)).await;
                toucher.touch();
            }
        });
        idle(&activity, Duration::from_secs(60)).await;
        // The last byte moved at 120 s; idle 60 s after it.
        assert_eq!(started.elapsed(), Duration::from_secs(180));
        drop(traffic.await);
    }
}
