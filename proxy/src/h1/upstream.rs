//! The upstream side of an exchange on the fast path: connecting, sending with a
//! bound on each read and write, reading the response head (interim answers passed
//! on), relaying the body framed as the head says, and noticing a client that
//! leaves while it waits.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use pingora::ErrorType;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::conn::{Conn, Writer};

use sluice_h1::{parse_response, ChunkedDecoder, Framing, ResponseHead};

/// Where an exchange with a backend failed.
pub(super) enum Broken {
    Io,
    TimedOut,
    Closed,
    BadResponse,
}

impl Broken {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Broken::Io => ErrorType::ReadError.as_str(),
            Broken::TimedOut => ErrorType::ReadTimedout.as_str(),
            Broken::Closed => ErrorType::ConnectionClosed.as_str(),
            Broken::BadResponse => ErrorType::InvalidHTTPHeader.as_str(),
        }
    }
}

/// A timer kept by a client connection from one request to the next: for its
/// upstream reads' and writes' limit (`io_timeout`), and for when to start watching
/// whether the client left ([`WATCH_CLIENT_AFTER`]).
///
/// Why not a fresh `timeout()` or `sleep()` each time: tokio moves a registered
/// timer to a later deadline with one atomic operation (the wheel entry is fixed up
/// when the earlier deadline passes), where a fresh one was put in the timer wheel
/// and taken out again under the driver's lock, per read (2% of a proxied request's
/// instructions, bench/RESULTS.md, issue 23). Deadlines here only move later, except
/// after one fired (a timeout, or a request slower than the watch), which registers
/// the timer anew: the cost a fresh one always had. A deadline left armed after its
/// request wakes the connection's task once, for nothing, if no later request moved
/// it on (an idle connection, 100 ms or `io_timeout` after its last request).
pub(super) struct Timer(Pin<Box<Sleep>>);

impl Timer {
    pub(super) fn new() -> Self {
        // Never waited on before a `reset`: the first deadline is any.
        Timer(Box::pin(tokio::time::sleep(Duration::ZERO)))
    }

    /// Restarts the timer to fire after `after`; `false` when that is beyond what
    /// an `Instant` holds (then it is not armed: wait without it).
    fn reset(&mut self, after: Duration) -> bool {
        match Instant::now().checked_add(after) {
            Some(deadline) => {
                self.0.as_mut().reset(deadline);
                true
            }
            None => false,
        }
    }

    /// Runs `io` for at most `limit` (`None`: no limit).
    pub(super) async fn within<T>(
        &mut self,
        limit: Option<Duration>,
        io: impl Future<Output = std::io::Result<T>>,
    ) -> Result<T, Broken> {
        tokio::pin!(io);
        // Whether the timer runs: decided when the first try did not finish. Most
        // writes, and reads whose bytes are in, finish on it and need no timer (nor
        // the clock read that arms it). `io` is polled once per wake-up, first.
        let mut armed = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = io.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(|_| Broken::Io));
            }
            let armed = *armed.get_or_insert_with(|| limit.is_some_and(|l| self.reset(l)));
            if armed && self.0.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Broken::TimedOut));
            }
            Poll::Pending
        })
        .await
    }
}

/// Room made before reading a head (a response's here, a request's in
/// `Client::read_more`): a page. A head and a small body fit, and a keep-alive
/// connection keeps its buffers between requests: at 256 connections 16 KB ones
/// (on both sides) made the proxy's peak RSS 29.5 MB, 4 KB ones 22.8 MB
/// (bench/RESULTS.md).
pub(super) const HEAD_ROOM: usize = 4 * 1024;
/// Room made before each read of a body being relayed: larger reads, fewer system
/// calls; only a connection that relays a large body grows its buffer to it.
pub(super) const BODY_ROOM: usize = 16 * 1024;

/// Reads more into `buf`, with at least `room` free when less than a page was;
/// EOF is [`Broken::Closed`].
pub(super) async fn fill(
    stream: &mut Conn,
    buf: &mut BytesMut,
    room: usize,
    limit: Option<Duration>,
    timer: &mut Timer,
) -> Result<(), Broken> {
    if buf.capacity() - buf.len() < HEAD_ROOM {
        buf.reserve(room);
    }
    match timer.within(limit, stream.read_buf(buf)).await? {
        0 => Err(Broken::Closed),
        _ => Ok(()),
    }
}

/// How long a request waits for its response head before Sluice starts watching
/// whether its client is still there. Watching costs a syscall (a peek, which also
/// clears tokio's stale read readiness left by reading the request), so requests
/// answered sooner do not pay it; a slow backend's work for a client that left is
/// abandoned within this much.
pub(super) const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(100);

/// Runs `exchange`; `None` when the client closes or resets its connection first
/// (watched only when `watch`). A half-close counts as leaving, as in nginx (499)
/// and Envoy, which do not keep half-closed HTTP/1 clients either.
pub(super) async fn unless_client_leaves<T>(
    exchange: impl std::future::Future<Output = T>,
    watch: bool,
    client: &TcpStream,
    timer: &mut Timer,
) -> Option<T> {
    if !watch || !timer.reset(WATCH_CLIENT_AFTER) {
        return Some(exchange.await);
    }
    tokio::pin!(exchange);
    tokio::select! {
        biased;
        done = &mut exchange => return Some(done),
        () = timer.0.as_mut() => {}
    }
    tokio::select! {
        biased;
        done = &mut exchange => Some(done),
        () = client_gone(client) => None,
    }
}

/// Resolves when the client has closed or reset its connection. A client that
/// sends more (a pipelined request) is not watched further: its bytes stay in the
/// socket for the next request, and a close after them is noticed at the write.
pub(super) async fn client_gone(client: &TcpStream) {
    let mut probe = [0u8; 1];
    match client.peek(&mut probe).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Reads a response head into `buf`, passing interim (1xx) responses on to the client.
pub(super) async fn read_response_head(
    upstream: &mut Conn,
    buf: &mut BytesMut,
    head_request: bool,
    limit: Option<Duration>,
    client: &mut Writer<'_>,
    timer: &mut Timer,
) -> Result<ResponseHead, Broken> {
    loop {
        fill(upstream, buf, HEAD_ROOM, limit, timer).await?;
        loop {
            match parse_response(buf, head_request) {
                Ok(Some(head)) if (100..200).contains(&head.status) && head.status != 101 => {
                    // Rare (103 Early Hints): its own buffer.
                    let mut interim = Vec::with_capacity(head.len);
                    head.write_relayed(buf, &mut interim);
                    interim.extend_from_slice(b"\r\n");
                    client.send(&interim).await.map_err(|_| Broken::Io)?;
                    bytes::Buf::advance(buf, head.len);
                }
                Ok(Some(head)) if head.status == 101 => return Err(Broken::BadResponse),
                Ok(Some(head)) => return Ok(head),
                Ok(None) => break,
                Err(_) => return Err(Broken::BadResponse),
            }
            if buf.is_empty() {
                break;
            }
        }
    }
}

pub(super) enum Relay {
    /// The client went away.
    Client,
    Upstream(Broken),
}

/// Writes `prefix` (the response head) and the body framed by `framing` from
/// `buf`/`upstream` to `client`. On success the body was relayed whole and `buf`
/// holds whatever the backend sent beyond it.
pub(super) async fn relay_body(
    upstream: &mut Conn,
    buf: &mut BytesMut,
    client: &mut Conn,
    framing: Framing,
    prefix: &mut Vec<u8>,
    limit: Option<Duration>,
    timer: &mut Timer,
) -> Result<(), Relay> {
    match framing {
        Framing::Empty => client.send(prefix).await.map_err(|_| Relay::Client),
        Framing::Length(total) => {
            let mut left = total;
            let take = left.min(buf.len() as u64) as usize;
            prefix.extend_from_slice(&buf[..take]);
            bytes::Buf::advance(buf, take);
            left -= take as u64;
            client.send(prefix).await.map_err(|_| Relay::Client)?;
            while left > 0 {
                fill(upstream, buf, BODY_ROOM, limit, timer)
                    .await
                    .map_err(Relay::Upstream)?;
                let take = left.min(buf.len() as u64) as usize;
                client.send(&buf[..take]).await.map_err(|_| Relay::Client)?;
                bytes::Buf::advance(buf, take);
                left -= take as u64;
            }
            Ok(())
        }
        Framing::Chunked => {
            // Re-encoded as it passes: the client gets canonical chunk framing
            // whatever extensions or leading zeros the backend used.
            let mut decoder = ChunkedDecoder::new(true);
            let mut pending = std::mem::take(prefix);
            loop {
                let progress = decoder
                    .transcode(buf, &mut pending)
                    .map_err(|_| Relay::Upstream(Broken::BadResponse))?;
                let (n, done) = (progress.consumed, progress.done);
                bytes::Buf::advance(buf, n);
                if done || !pending.is_empty() {
                    client.send(&pending).await.map_err(|_| Relay::Client)?;
                    pending.clear();
                }
                if done {
                    *prefix = pending;
                    return Ok(());
                }
                fill(upstream, buf, BODY_ROOM, limit, timer)
                    .await
                    .map_err(Relay::Upstream)?;
            }
        }
        Framing::UntilClose => {
            client.send(prefix).await.map_err(|_| Relay::Client)?;
            loop {
                if !buf.is_empty() {
                    client.send(buf).await.map_err(|_| Relay::Client)?;
                    buf.clear();
                }
                match fill(upstream, buf, BODY_ROOM, limit, timer).await {
                    Ok(()) => {}
                    Err(Broken::Closed) => return Ok(()),
                    Err(e) => return Err(Relay::Upstream(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused time: the clock moves only when every task waits, straight to the next
    // deadline, so the limits below are exact and nothing waits in real time.
    #[tokio::test(start_paused = true)]
    async fn a_kept_timer_bounds_each_wait_from_its_own_start() {
        let mut timer = Timer::new();
        let limit = Some(Duration::from_millis(200));
        // Five waits of 150 ms: longer together than the limit, none alone. The
        // timer moved later each time must not fire at an earlier deadline.
        for _ in 0..5 {
            let io = async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok(())
            };
            assert!(timer.within(limit, io).await.is_ok());
        }
        // A wait that never ends is cut at the limit; fired, the timer serves again.
        for _ in 0..2 {
            let start = Instant::now();
            let never = std::future::pending::<std::io::Result<()>>();
            assert!(matches!(
                timer.within(limit, never).await,
                Err(Broken::TimedOut)
            ));
            let waited = start.elapsed();
            assert!(
                waited >= Duration::from_millis(200) && waited < Duration::from_millis(205),
                "{waited:?}"
            );
        }
        assert!(timer.within(limit, async { Ok(()) }).await.is_ok());
        // No limit, or one beyond what an Instant holds: not armed.
        assert!(timer.within(None, async { Ok(()) }).await.is_ok());
        assert!(timer
            .within(Some(Duration::MAX), async { Ok(()) })
            .await
            .is_ok());
        let failed = async { Err::<(), _>(std::io::Error::other("reset")) };
        assert!(matches!(timer.within(limit, failed).await, Err(Broken::Io)));
    }
}
