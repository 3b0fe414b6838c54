//! A connection the engines read and write: plain TCP, or mTLS between meshed
//! proxies (either side of it).
//!
//! Why an enum and not a trait object: the plaintext path is the hot one, and a
//! match costs it nothing measurable; engines keep the TCP-level operations they
//! need (peeking for a client that left, the original destination, no-delay) on
//! [`Conn::tcp`], whatever is layered above.
//!
//! Writes through TLS are encrypted into records that may sit in the session until
//! the socket takes them, so a message is complete only after a flush:
//! [`Conn::send`] is `write_all` then `flush` (a no-op on TCP).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pingora::ErrorType;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::identity::tls::Tls as Identity;
use crate::identity::PeerIdentity;

type Tls = tokio_rustls::TlsStream<TcpStream>;

/// The longest a closing TLS connection waits to send its close_notify.
pub const CLOSE_NOTIFY_WAIT: Duration = Duration::from_secs(1);

pub enum Conn {
    Tcp(TcpStream),
    Tls {
        tls: Box<Tls>,
        /// The same socket, duplicated, so that the client can be watched for
        /// leaving (a peek) while the session is borrowed for writing.
        watch: TcpStream,
        /// The verified peer (a client's certificate; inbound only).
        peer: Option<PeerIdentity>,
    },
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Tcp(s) => f.debug_tuple("Tcp").field(s).finish(),
            Conn::Tls { watch, peer, .. } => f
                .debug_struct("Tls")
                .field("socket", watch)
                .field("peer", peer)
                .finish_non_exhaustive(),
        }
    }
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Self {
        Conn::Tcp(s)
    }
}

/// A new TCP connection to a backend, or why there is none (in pingora's terms,
/// which the error answers and metrics use for every engine).
pub async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, ErrorType> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(ErrorType::ConnectRefused)
        }
        Ok(Err(_)) => Err(ErrorType::ConnectError),
        Err(_) => Err(ErrorType::ConnectTimedout),
    }
}

/// A new connection to a backend within `limit`: TCP, then mTLS when `tls` names
/// the workload identity the peer must prove (with this proxy's own identity; a
/// proxy that has none yet cannot reach meshed peers, and says so).
pub async fn dial(
    addr: SocketAddr,
    tls: Option<&Arc<str>>,
    identity: &Identity,
    limit: Duration,
) -> Result<Conn, ErrorType> {
    let start = Instant::now();
    let Some(expected) = tls else {
        return connect(addr, limit).await.map(Conn::Tcp);
    };
    let Some(active) = identity.current() else {
        tracing::warn!(%addr, expected = %expected, "no workload identity yet: cannot connect with mTLS");
        return Err(ErrorType::TLSHandshakeFailure);
    };
    let tcp = connect(addr, limit).await?;
    let left = limit.saturating_sub(start.elapsed());
    match tokio::time::timeout(left, active.connect(tcp, expected)).await {
        Ok(Ok(tls)) => Conn::client(tls).map_err(|_| ErrorType::ConnectError),
        Ok(Err(e)) => {
            tracing::warn!(%addr, expected = %expected, error = %e, "mTLS handshake failed");
            Err(ErrorType::TLSHandshakeFailure)
        }
        Err(_) => Err(ErrorType::TLSHandshakeTimedout),
    }
}

/// A duplicate of `tcp`'s socket, registered with the runtime on its own.
fn duplicate(tcp: &TcpStream) -> io::Result<TcpStream> {
    let fd = socket2::SockRef::from(tcp).try_clone()?;
    let std: std::net::TcpStream = fd.into();
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

impl Conn {
    /// An accepted (server-side) mTLS connection.
    pub fn server(
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        peer: Option<PeerIdentity>,
    ) -> io::Result<Self> {
        let watch = duplicate(tls.get_ref().0)?;
        Ok(Conn::Tls {
            tls: Box::new(tokio_rustls::TlsStream::Server(tls)),
            watch,
            peer,
        })
    }

    /// A connected (client-side) mTLS connection to a verified peer.
    pub fn client(tls: tokio_rustls::client::TlsStream<TcpStream>) -> io::Result<Self> {
        let watch = duplicate(tls.get_ref().0)?;
        Ok(Conn::Tls {
            tls: Box::new(tokio_rustls::TlsStream::Client(tls)),
            watch,
            peer: None,
        })
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Tcp(s) => s,
            Conn::Tls { watch, .. } => watch,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls { .. })
    }

    /// The client's verified workload identity (mTLS, inbound).
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        match self {
            Conn::Tcp(_) => None,
            Conn::Tls { peer, .. } => peer.as_ref(),
        }
    }

    /// Writes the whole of `bytes` and pushes it onto the socket.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(bytes).await,
            Conn::Tls { tls, .. } => {
                tls.write_all(bytes).await?;
                tls.flush().await
            }
        }
    }

    /// Ends the connection: through TLS, with a close_notify first, so that a
    /// response framed by the close is not mistaken for a truncated one (bounded:
    /// a peer that does not read gets [`CLOSE_NOTIFY_WAIT`]). TCP is just dropped.
    pub async fn close(mut self) {
        if let Conn::Tls { tls, .. } = &mut self {
            let _ = tokio::time::timeout(CLOSE_NOTIFY_WAIT, tls.shutdown()).await;
        }
    }

    /// The socket to watch for the peer leaving, and a writer, at once.
    pub fn split(&mut self) -> (&TcpStream, Writer<'_>) {
        match self {
            Conn::Tcp(s) => (&*s, Writer::Tcp(&*s)),
            Conn::Tls { tls, watch, .. } => (watch, Writer::Tls(tls)),
        }
    }

    /// An idle pooled connection is usable when the peer has neither closed it nor
    /// sent anything unasked (nothing is readable). Through TLS, the session's own
    /// socket is asked first: when the reactor knows it is not readable (the last
    /// read drained it), no system call is made; otherwise it is peeked.
    pub fn idle_usable(&self) -> bool {
        if let Conn::Tls { tls, .. } = self {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if tls.get_ref().0.poll_read_ready(&mut cx).is_pending() {
                return true;
            }
        }
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(self.tcp()).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

impl Conn {
    /// The connection as pingora reads it: TCP as it is, TLS as a virtual socket.
    pub fn into_pingora(self) -> pingora::protocols::l4::stream::Stream {
        match self {
            Conn::Tcp(s) => s.into(),
            tls => pingora::protocols::l4::virt::VirtualSocketStream::new(Box::new(Virtual(tls)))
                .into(),
        }
    }
}

/// A TLS connection handed to pingora (whose streams are TCP, Unix or virtual).
#[derive(Debug)]
struct Virtual(Conn);

impl pingora::protocols::l4::virt::VirtualSocket for Virtual {
    fn set_socket_option(
        &self,
        opt: pingora::protocols::l4::virt::VirtualSockOpt,
    ) -> io::Result<()> {
        match opt {
            pingora::protocols::l4::virt::VirtualSockOpt::NoDelay => self.0.tcp().set_nodelay(true),
            // Keep-alive probes: the socket's own settings stand.
            _ => Ok(()),
        }
    }
}

impl AsyncRead for Virtual {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Virtual {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The writing half of [`Conn::split`].
pub enum Writer<'a> {
    /// Written through a shared reference (readiness, then `try_write`), as
    /// tokio's own split halves do.
    Tcp(&'a TcpStream),
    Tls(&'a mut Tls),
}

impl Writer<'_> {
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Writer::Tcp(s) => {
                let mut rest = bytes;
                // Bounded: each pass writes something or waits for room.
                while !rest.is_empty() {
                    s.writable().await?;
                    match s.try_write(rest) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => rest = &rest[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Writer::Tls(tls) => {
                tls.write_all(bytes).await?;
                tls.flush().await
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls { tls, .. } => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls { tls, .. } => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls { tls, .. } => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Tls { tls, .. } => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls { tls, .. } => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls { tls, .. } => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
