//! Idle HTTP/1 upstream connections of the h1 and h2 engines: one process-wide
//! `Mutex` over a map from (worker thread, backend, expected identity) to a list of
//! idle connections. The expected identity is in the key so that a connection
//! made in plaintext, or verified as another workload, is never handed to an
//! attempt that requires mTLS with this one (a policy can change in between). Every worker thread
//! shares that one lock: a proxied request takes it in [`Pool::take`] before it
//! connects and again in [`Pool::put`] when its connection can be reused, and
//! [`Pool::sweep`] holds it while it walks every list.
//!
//! The thread in the key, not the structure, is what keeps a connection on the
//! runtime that opened it (each worker thread runs its own current-thread runtime,
//! and a socket belongs to the reactor it was registered with): threads share the
//! lock, never a connection. Returning one is a push onto a Vec under the lock, after
//! dropping that list's expired ones (no task, no timer per connection).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Instant;

use fnv::FnvHashMap;

use crate::conn::Conn;
use crate::exchange::UPSTREAM_IDLE_TIMEOUT;

/// The most idle connections kept per worker thread and backend.
pub const MAX_IDLE_PER_BACKEND: usize = 128;

type Idle = Vec<(Conn, Instant)>;
/// A worker thread, a backend, and the workload identity its connections were
/// verified as (`None`: plaintext).
pub type Key = (ThreadId, SocketAddr, Option<Arc<str>>);

#[derive(Default)]
pub struct Pool {
    idle: Mutex<FnvHashMap<Key, Idle>>,
}

/// Still open and silent: a backend that closed its end (or sent unasked-for
/// bytes) shows as readable. On TCP, `try_read` consults the readiness the reactor
/// already has, so an idle connection costs no system call here; through TLS the
/// socket is peeked, not read (its bytes belong to the session).
fn usable(stream: &Conn) -> bool {
    match stream {
        Conn::Tcp(s) => {
            let mut probe = [0u8; 1];
            matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
        Conn::Tls { .. } => stream.idle_usable(),
    }
}

impl Pool {
    /// The most recently returned usable connection to `addr` of `thread`; the
    /// expired or closed ones popped on the way are dropped.
    pub fn take(&self, thread: ThreadId, addr: SocketAddr, tls: Option<&Arc<str>>) -> Option<Conn> {
        let key = (thread, addr, tls.cloned());
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&key)?;
        let now = Instant::now();
        while let Some((stream, since)) = list.pop() {
            if now.saturating_duration_since(since) < UPSTREAM_IDLE_TIMEOUT && usable(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps `stream` (verified as `tls`, or plaintext) for the next request to
    /// `addr` on `thread`.
    pub fn put(&self, thread: ThreadId, addr: SocketAddr, tls: Option<&Arc<str>>, stream: Conn) {
        let key = (thread, addr, tls.cloned());
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        // Oldest first: drop the expired ones at the front, and the oldest when full.
        let expired = list
            .iter()
            .take_while(|(_, since)| now.saturating_duration_since(*since) >= UPSTREAM_IDLE_TIMEOUT)
            .count();
        list.drain(..expired);
        if list.len() >= MAX_IDLE_PER_BACKEND {
            list.remove(0);
        }
        list.push((stream, now));
    }

    /// Drops idle connections that expired or that their backend closed, in every
    /// list (run periodically: `take` and `put` only clean the list they touch, so a
    /// backend that gets no more traffic would keep its idle connections open).
    pub fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        for list in idle.values_mut() {
            list.retain(|(stream, since)| {
                now.saturating_duration_since(*since) < UPSTREAM_IDLE_TIMEOUT && usable(stream)
            });
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Idle connections held, all threads and backends.
    pub fn idle(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn reuses_open_connections_and_drops_closed_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::default();
        let me = std::thread::current().id();
        assert!(pool.take(me, addr, None).is_none());

        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        pool.put(me, addr, None, client.into());
        assert_eq!(pool.idle(), 1);
        let client = pool
            .take(me, addr, None)
            .expect("an open idle connection is reused");
        assert_eq!(pool.idle(), 0);

        // The backend closes: the connection must not be handed out again.
        pool.put(me, addr, None, client);
        let mut server = server;
        server.shutdown().await.unwrap();
        drop(server);
        // Let the reactor see the FIN (bounded wait).
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let idle = pool.idle.lock().unwrap();
            let readable = idle.values().flatten().all(|(s, _)| !usable(s));
            if readable {
                break;
            }
        }
        assert!(pool.take(me, addr, None).is_none());
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn a_sweep_drops_closed_and_expired_connections_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::default();
        let me = std::thread::current().id();
        let open = TcpStream::connect(addr).await.unwrap();
        let (_open_server, _) = listener.accept().await.unwrap();
        let closing = TcpStream::connect(addr).await.unwrap();
        let (closing_server, _) = listener.accept().await.unwrap();
        pool.put(me, addr, None, open.into());
        pool.put(me, addr, None, closing.into());
        drop(closing_server);
        // Bounded wait for the reactor to see the FIN.
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            pool.sweep(Instant::now());
            if pool.idle() == 1 {
                break;
            }
        }
        assert_eq!(
            pool.idle(),
            1,
            "the closed connection is swept, the open one kept"
        );
        pool.sweep(Instant::now() + UPSTREAM_IDLE_TIMEOUT);
        assert_eq!(pool.idle(), 0, "an expired connection is swept");
    }

    #[tokio::test]
    async fn bounded_per_backend() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::default();
        let mut servers = Vec::new();
        for _ in 0..MAX_IDLE_PER_BACKEND + 3 {
            let client = TcpStream::connect(addr).await.unwrap();
            servers.push(listener.accept().await.unwrap());
            pool.put(std::thread::current().id(), addr, None, client.into());
        }
        assert_eq!(pool.idle(), MAX_IDLE_PER_BACKEND);
    }
}
