//! The strict front of pingora's HTTP/1 server: the client connection as pingora
//! reads it, converted by [`sluice_h1::RequestStream`] so that pingora's own
//! (lenient) parser only ever sees canonical messages that Sluice checked.
//!
//! Why: pingora accepts what RFC 9112 lets parsers read more than one way (an
//! empty chunk-size line as the last chunk, loose chunk extensions, `chunked,
//! chunked` ...). Everything pingora serves on an HTTP/1 connection — hand-offs
//! from the fast path, or every connection with `--engine pingora` — passes
//! through here, so both engines accept exactly the same requests.
//!
//! A refused message never reaches pingora as such:
//! - a refused *head* becomes [`REFUSAL_HEAD`], a request of Sluice's own that
//!   [`refusal`] recognises (by the stream, not by anything a client can send), so
//!   pingora answers it in order, after any response still being written, with
//!   the refusal's status, and closes;
//! - a refused *body* (bad chunk framing) fails pingora's read with an error, and
//!   pingora's `fail_to_proxy` answers with the refusal's status unless a response
//!   has started (then the connection is just closed).
//!
//! Reads never return bytes of two messages at once, so pingora never holds a
//! pipelined request it did not mean to read (it keeps them across keep-alive
//! reuses when pipelining is on, which the phases turn on).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use sluice_h1::stream::Refused;
use sluice_h1::{Refusal, RequestStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::exchange::Exchange;
use crate::identity::PeerIdentity;
use crate::shard::Handle;
use crate::shared::Shared;

/// What pingora reads in place of a refused head. Its values matter to no one:
/// [`refusal`] knows it by the stream's state, and nothing follows it.
pub const REFUSAL_HEAD: &[u8] =
    b"GET / HTTP/1.1\r\nhost: refused.sluice.invalid\r\nconnection: close\r\n\r\n";

/// How much is read from the client at once.
const READ_CHUNK: usize = 16 * 1024;

/// An exchange the fast path routed and handed over with its connection (its
/// backends speak h2c), for pingora's phases to go on with instead of routing
/// the request again, maybe on a newer snapshot.
#[derive(Default)]
struct Handed(std::sync::Mutex<Option<Exchange<Handle<Shared>>>>);

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handed")
    }
}

/// A client connection with its request side converted.
#[derive(Debug)]
pub struct Front {
    inner: L4Stream,
    /// Client bytes not yet converted.
    raw: BytesMut,
    /// Converted bytes not yet read by pingora.
    ready: BytesMut,
    stream: RequestStream,
    /// The client closed its side.
    eof: bool,
    /// [`REFUSAL_HEAD`] was handed out.
    refusal_sent: bool,
    handed: Handed,
    /// The client's verified workload identity (an mTLS connection).
    peer_identity: Option<PeerIdentity>,
}

impl Front {
    /// `read`: bytes already read from the client (they come first).
    pub fn new(inner: L4Stream, read: &[u8]) -> Self {
        Front {
            inner,
            raw: BytesMut::from(read),
            ready: BytesMut::new(),
            stream: RequestStream::default(),
            eof: false,
            refusal_sent: false,
            handed: Handed::default(),
            peer_identity: None,
        }
    }

    /// The client proved this identity (mTLS): every request on the connection
    /// is the identity's.
    pub fn with_peer_identity(mut self, peer: Option<PeerIdentity>) -> Self {
        self.peer_identity = peer;
        self
    }

    /// The first request's exchange, already routed by the fast path.
    pub fn with_exchange(self, exchange: Exchange<Handle<Shared>>) -> Self {
        *self.handed.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(exchange);
        self
    }

    /// The refusal pingora's phases are to answer: the stream refused, and what
    /// pingora is reading now is the refusal itself (the head Sluice put in place
    /// of the refused one) or the body it failed on.
    pub fn refused(&self) -> Option<Refused> {
        self.stream
            .refused()
            .filter(|r| r.in_body || self.refusal_sent)
    }

    /// Converts until there is something for pingora, more input is needed, or
    /// the stream refused.
    fn convert(&mut self) {
        let mut out = Vec::new();
        while self.ready.is_empty() && !self.raw.is_empty() {
            match self.stream.convert(&self.raw, &mut out) {
                Ok(used) => {
                    self.raw.advance(used);
                    self.ready.extend_from_slice(&out);
                    out.clear();
                    if used == 0 {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }
}

/// The refusal the phases must answer on this session's connection, if any.
pub fn refusal(stream: Option<&pingora::protocols::Stream>) -> Option<Refused> {
    stream?.as_any().downcast_ref::<Front>()?.refused()
}

/// The verified workload identity of this session's client, if it came over mTLS.
pub fn peer_identity(stream: Option<&pingora::protocols::Stream>) -> Option<&PeerIdentity> {
    stream?
        .as_any()
        .downcast_ref::<Front>()?
        .peer_identity
        .as_ref()
}

/// The exchange the fast path handed over with this connection, once.
pub fn take_exchange(
    stream: Option<&pingora::protocols::Stream>,
) -> Option<Exchange<Handle<Shared>>> {
    let front = stream?.as_any().downcast_ref::<Front>()?;
    front
        .handed
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// The body of a refusal: what was wrong, for whoever reads it.
pub fn refusal_body(refusal: Refusal) -> String {
    let reason = http::StatusCode::from_u16(refusal.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!(
        "sluice: {}: {}\n",
        reason.to_ascii_lowercase(),
        refusal.reason
    )
}

impl AsyncRead for Front {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Bounded: each pass hands out bytes, returns, or reads more from the
        // client (which returns Pending when there is nothing).
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(refused) = this.stream.refused() {
                if refused.in_body {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        refused.refusal.reason,
                    )));
                }
                if !this.refusal_sent {
                    this.refusal_sent = true;
                    this.ready.extend_from_slice(REFUSAL_HEAD);
                    continue;
                }
                // Nothing follows the refusal.
                return Poll::Ready(Ok(()));
            }
            if this.stream.opaque() && this.raw.is_empty() {
                // A tunnel: straight through.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let before = this.raw.len();
            this.convert();
            if !this.ready.is_empty() || this.stream.refused().is_some() {
                continue;
            }
            if this.raw.len() < before {
                continue;
            }
            if this.eof {
                // What is left is an incomplete message: pingora sees the end.
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => this.raw.extend_from_slice(read.filled()),
            }
        }
    }
}

impl AsyncWrite for Front {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Front {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut self.inner).await;
    }
}

impl UniqueID for Front {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Front {}

/// Peeking would read past the conversion: not offered.
#[async_trait]
impl Peek for Front {}

impl GetTimingDigest for Front {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Front {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Front {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}
