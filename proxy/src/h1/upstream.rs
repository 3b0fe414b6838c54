//! The upstream side of an exchange on the fast path: connecting, sending with a
//! bound on each read and write, reading the response head (interim answers passed
//! on), relaying the body framed as the head says, and noticing a client that
//! leaves while it waits.

use std::time::Duration;

use bytes::BytesMut;
use pingora::ErrorType;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

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

pub(super) async fn within<T>(
    limit: Option<Duration>,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Broken> {
    match limit {
        Some(limit) => match tokio::time::timeout(limit, io).await {
            Ok(r) => r.map_err(|_| Broken::Io),
            Err(_) => Err(Broken::TimedOut),
        },
        None => io.await.map_err(|_| Broken::Io),
    }
}

/// Reads more into `buf`; EOF is [`Broken::Closed`].
pub(super) async fn fill(
    stream: &mut Conn,
    buf: &mut BytesMut,
    limit: Option<Duration>,
) -> Result<(), Broken> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    match within(limit, stream.read_buf(buf)).await? {
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
) -> Option<T> {
    if !watch {
        return Some(exchange.await);
    }
    tokio::pin!(exchange);
    tokio::select! {
        biased;
        done = &mut exchange => return Some(done),
        () = tokio::time::sleep(WATCH_CLIENT_AFTER) => {}
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
) -> Result<ResponseHead, Broken> {
    loop {
        fill(upstream, buf, limit).await?;
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
                fill(upstream, buf, limit).await.map_err(Relay::Upstream)?;
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
                fill(upstream, buf, limit).await.map_err(Relay::Upstream)?;
            }
        }
        Framing::UntilClose => {
            client.send(prefix).await.map_err(|_| Relay::Client)?;
            loop {
                if !buf.is_empty() {
                    client.send(buf).await.map_err(|_| Relay::Client)?;
                    buf.clear();
                }
                match fill(upstream, buf, limit).await {
                    Ok(()) => {}
                    Err(Broken::Closed) => return Ok(()),
                    Err(e) => return Err(Relay::Upstream(e)),
                }
            }
        }
    }
}
