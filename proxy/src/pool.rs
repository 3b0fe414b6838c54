//! Idle HTTP/1 upstream connections of the h1 and h2 engines, kept per worker
//! thread: each thread that uses the pool claims a shard of its own (a lock and a
//! map from (backend, expected identity) to a list of idle connections), so a
//! proxied request's [`Pool::take`] before it connects and [`Pool::put`] when its
//! connection can be reused take a lock no other thread takes, on a cache line no
//! other thread writes. Why: with one process-wide lock, taken twice per request,
//! every worker thread queued behind the others and the lock's line bounced between
//! cores on every request (issue 23; bench/RESULTS.md, "Contention across threads").
//!
//! The expected identity is in the key so that a connection made in plaintext, or
//! verified as another workload, is never handed to an attempt that requires mTLS
//! with this one (a policy can change in between).
//!
//! Each worker thread runs its own current-thread runtime and a socket belongs to
//! the reactor it was registered with, so a connection must only ever be taken on
//! the thread that opened it. The thread is in the key, not only in the choice of
//! shard: a thread beyond the [`SHARDS`] that claim one of their own shares the
//! overflow shard, and still only ever gets its own connections back. A caller
//! finds its shard once per client connection ([`Pool::worker`]), not per request.
//!
//! Returning a connection is a push onto a Vec under the shard's lock, after
//! dropping that list's expired ones (no task, no timer per connection).
//! [`Pool::sweep`] (every 10 s, from the listener's task) locks the shards one at a
//! time: the only time a worker may find its shard's lock taken.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::ThreadId;
use std::time::Instant;

use fnv::FnvHashMap;

use crate::conn::Conn;
use crate::exchange::UPSTREAM_IDLE_TIMEOUT;

/// The most idle connections kept per worker thread and backend.
pub const MAX_IDLE_PER_BACKEND: usize = 128;

/// Worker threads that get a shard of their own; more share one overflow shard
/// (correct, only contended). Pingora runs one worker thread per configured
/// thread, far fewer than this on a sidecar; each shard costs 128 bytes empty.
pub const SHARDS: usize = 64;

type Idle = Vec<(Conn, Instant)>;
/// A worker thread, a backend, and the workload identity its connections were
/// verified as (`None`: plaintext).
pub type Key = (ThreadId, SocketAddr, Option<Arc<str>>);

/// The idle connections to one backend from one thread, by expected identity (a
/// list rather than a map: a backend is almost always reached one way).
type Lists = Vec<(Option<Arc<str>>, Idle)>;

/// One thread's idle connections (several threads' in the overflow shard), on a
/// cache line of its own: 128 bytes, since adjacent-line prefetch pairs 64-byte
/// lines on x86.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    idle: Mutex<FnvHashMap<(ThreadId, SocketAddr), Lists>>,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, FnvHashMap<(ThreadId, SocketAddr), Lists>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A worker thread as one pool knows it: the thread, and its shard. Found once
/// per client connection ([`Pool::worker`]) and used on that thread only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    thread: ThreadId,
    shard: usize,
}

pub struct Pool {
    /// `SHARDS` threads' own shards.
    shards: Box<[Shard]>,
    /// The threads beyond those, together.
    overflow: Shard,
    /// Which thread claimed each of the first `SHARDS` shards, claimed in order:
    /// written once each, then only read (no line here is written per request).
    owners: Box<[OnceLock<ThreadId>]>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            overflow: Shard::default(),
            owners: (0..SHARDS).map(|_| OnceLock::new()).collect(),
        }
    }
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

fn same_identity(a: Option<&Arc<str>>, b: Option<&Arc<str>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        _ => false,
    }
}

impl Pool {
    /// The calling thread, with its shard: claims the next free one the first time
    /// the thread asks, the overflow shard when none is left.
    pub fn worker(&self) -> Worker {
        let thread = std::thread::current().id();
        for (shard, owner) in self.owners.iter().enumerate() {
            // Claimed in order: the first free one ends the claimed ones.
            match owner.get() {
                Some(t) if *t == thread => return Worker { thread, shard },
                Some(_) => continue,
                None => {
                    if *owner.get_or_init(|| thread) == thread {
                        return Worker { thread, shard };
                    }
                }
            }
        }
        Worker {
            thread,
            shard: SHARDS,
        }
    }

    fn shard(&self, worker: Worker) -> MutexGuard<'_, FnvHashMap<(ThreadId, SocketAddr), Lists>> {
        // Out of range: the overflow shard (`SHARDS`).
        self.shards
            .get(worker.shard)
            .unwrap_or(&self.overflow)
            .lock()
    }

    /// The most recently returned usable connection to `addr` of `worker`'s
    /// thread; the expired or closed ones popped on the way are dropped.
    pub fn take(&self, worker: Worker, addr: SocketAddr, tls: Option<&Arc<str>>) -> Option<Conn> {
        let mut idle = self.shard(worker);
        let lists = idle.get_mut(&(worker.thread, addr))?;
        let (_, list) = lists
            .iter_mut()
            .find(|(identity, _)| same_identity(identity.as_ref(), tls))?;
        let now = Instant::now();
        while let Some((stream, since)) = list.pop() {
            if now.saturating_duration_since(since) < UPSTREAM_IDLE_TIMEOUT && usable(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps `stream` (verified as `tls`, or plaintext) for the next request to
    /// `addr` on `worker`'s thread.
    pub fn put(&self, worker: Worker, addr: SocketAddr, tls: Option<&Arc<str>>, stream: Conn) {
        let now = Instant::now();
        let mut idle = self.shard(worker);
        let lists = idle.entry((worker.thread, addr)).or_default();
        let at = match lists
            .iter()
            .position(|(identity, _)| same_identity(identity.as_ref(), tls))
        {
            Some(at) => at,
            None => {
                lists.push((tls.cloned(), Vec::new()));
                lists.len() - 1
            }
        };
        let Some((_, list)) = lists.get_mut(at) else {
            return;
        };
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
    /// list of every shard (run periodically: `take` and `put` only clean the list
    /// they touch, so a backend that gets no more traffic would keep its idle
    /// connections open). One shard locked at a time.
    pub fn sweep(&self, now: Instant) {
        for shard in self.shards.iter().chain([&self.overflow]) {
            let mut idle = shard.lock();
            for lists in idle.values_mut() {
                for (_, list) in lists.iter_mut() {
                    list.retain(|(stream, since)| {
                        now.saturating_duration_since(*since) < UPSTREAM_IDLE_TIMEOUT
                            && usable(stream)
                    });
                }
                lists.retain(|(_, list)| !list.is_empty());
            }
            idle.retain(|_, lists| !lists.is_empty());
        }
    }

    /// Idle connections held, all threads and backends.
    pub fn idle(&self) -> usize {
        self.shards
            .iter()
            .chain([&self.overflow])
            .map(|s| {
                s.lock()
                    .values()
                    .flatten()
                    .map(|(_, list)| list.len())
                    .sum::<usize>()
            })
            .sum()
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
        let me = pool.worker();
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
            let idle = pool.shard(me);
            let readable = idle
                .values()
                .flatten()
                .flat_map(|(_, list)| list)
                .all(|(s, _)| !usable(s));
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
        let me = pool.worker();
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
        let me = pool.worker();
        let mut servers = Vec::new();
        for _ in 0..MAX_IDLE_PER_BACKEND + 3 {
            let client = TcpStream::connect(addr).await.unwrap();
            servers.push(listener.accept().await.unwrap());
            pool.put(me, addr, None, client.into());
        }
        assert_eq!(pool.idle(), MAX_IDLE_PER_BACKEND);
    }

    #[tokio::test]
    async fn hands_a_connection_only_to_an_attempt_expecting_its_identity() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::default();
        let me = pool.worker();
        let verified: Arc<str> = "spiffe://cluster.local/ns/a/sa/a".into();
        let client = TcpStream::connect(addr).await.unwrap();
        let (_server, _) = listener.accept().await.unwrap();
        pool.put(me, addr, Some(&verified), client.into());
        assert!(pool.take(me, addr, None).is_none(), "not to plaintext");
        let other: Arc<str> = "spiffe://cluster.local/ns/b/sa/b".into();
        assert!(
            pool.take(me, addr, Some(&other)).is_none(),
            "not to another"
        );
        // Equal, not the same allocation (a reloaded policy's copy).
        let same: Arc<str> = (*verified).into();
        assert!(pool.take(me, addr, Some(&same)).is_some());
    }

    #[test]
    fn each_thread_claims_a_shard_of_its_own_and_keeps_it() {
        let pool = Pool::default();
        let me = pool.worker();
        assert_eq!(pool.worker(), me, "asked again, the same shard");
        let others: Vec<Worker> = std::thread::scope(|s| {
            (0..3)
                .map(|_| s.spawn(|| pool.worker()))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect()
        });
        let mut shards: Vec<usize> = others.iter().map(|w| w.shard).collect();
        shards.push(me.shard);
        shards.sort_unstable();
        assert_eq!(shards, [0, 1, 2, 3]);
    }

    #[test]
    fn threads_beyond_the_shards_share_the_overflow_and_only_their_own_connections() {
        let pool = Pool::default();
        let workers: Vec<Worker> = std::thread::scope(|s| {
            (0..SHARDS + 2)
                .map(|_| s.spawn(|| pool.worker()))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect()
        });
        let overflow: Vec<&Worker> = workers.iter().filter(|w| w.shard == SHARDS).collect();
        assert_eq!(overflow.len(), 2);
        // One overflow thread's connection, as the other looks for one.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = TcpStream::connect(addr).await.unwrap();
            let (_server, _) = listener.accept().await.unwrap();
            pool.put(*overflow[0], addr, None, client.into());
            assert!(pool.take(*overflow[1], addr, None).is_none());
            assert!(pool.take(*overflow[0], addr, None).is_some());
        });
    }
}
