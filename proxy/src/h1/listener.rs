//! The fast path's listeners: each a pingora background service (so it shares
//! pingora's runtimes, worker threads and shutdown) that accepts connections and
//! serves each on a worker thread's runtime.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;

use super::Engine;
use crate::phases::SluiceProxy;
use crate::pool::Pool;

/// How often idle upstream connections are checked for expiry and closure.
const POOL_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// One listener served by the fast path, as a pingora background service (so it
/// shares pingora's runtimes, worker threads and shutdown).
pub struct Listener {
    inner: Arc<Engine>,
    /// Bound by `main` before anything starts (`crate::listeners`); taken once,
    /// when the service starts.
    socket: Mutex<Option<std::net::TcpListener>>,
}

impl Listener {
    /// Serves `flow` on `socket` (bound, non-blocking); connections the fast path does not serve go to
    /// `pingora`; those opening with the HTTP/2 preface to the h2 engine (with
    /// `pingora_h2c` given, or on a transparent listener; with `--engine pingora`,
    /// to `pingora_h2c`). A client
    /// idle for `idle_timeout` between requests is disconnected.
    pub fn new(
        flow: SluiceProxy,
        socket: crate::listeners::Bound,
        pingora: HttpProxy<SluiceProxy>,
        pingora_h2c: Option<HttpProxy<SluiceProxy>>,
        idle_timeout: Duration,
        fast_path: bool,
    ) -> Self {
        // The h2 engine takes the preface with `--h2c`, on transparent listeners
        // always (intercepted clients speak what they speak), and on inbound ones
        // (a meshed caller speaks HTTP/2 inside mTLS when its backend does).
        let inbound = flow.side.direction == crate::exchange::Direction::Inbound;
        // Inbound, whatever the engine: pingora's h2 does not show a stream its
        // connection's mTLS identity, so HTTP/2 inside mTLS is always Sluice's.
        let h2 = ((fast_path && (pingora_h2c.is_some() || flow.transparent)) || inbound)
            .then(|| crate::h2::Engine::new(flow.clone(), idle_timeout));
        Listener {
            inner: Arc::new(Engine {
                h2,
                h2c: fast_path
                    .then(|| crate::h2::H2Backends::new(Arc::clone(&flow.shared.identity))),
                flow,
                listen: socket.addr,
                pingora: Arc::new(pingora),
                pingora_h2c: pingora_h2c.map(Arc::new),
                pool: Pool::default(),
                idle_timeout,
                fast_path,
            }),
            socket: Mutex::new(Some(socket.socket)),
        }
    }
}

#[async_trait]
impl BackgroundService for Listener {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(socket) = socket else { return };
        let listener = match TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(
                    listen = %self.inner.listen,
                    error = &e as &dyn std::error::Error,
                    "cannot listen"
                );
                std::process::exit(1);
            }
        };
        let mut sweep = tokio::time::interval(POOL_SWEEP_EVERY);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = sweep.tick() => {
                    self.inner.pool.sweep(Instant::now());
                    if let Some(h2) = &self.inner.h2 {
                        h2.sweep(Instant::now());
                    }
                    if let Some(h2c) = &self.inner.h2c {
                        h2c.sweep(Instant::now());
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return } else { continue }
                }
            };
            let Ok((stream, peer)) = accepted else {
                // EMFILE and the like: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let engine = Arc::clone(&self.inner);
            let shutdown = shutdown.clone();
            let worker = less_busy(
                pingora_runtime::current_handle(),
                pingora_runtime::current_handle(),
            );
            place(&worker, stream, move |stream| async move {
                engine.serve(stream, peer, shutdown).await;
            });
        }
    }
}

/// Of two randomly drawn worker runtimes, the one with fewer live tasks (each
/// worker thread runs its own single-threaded runtime, and a connection is
/// served where it is placed for its whole life). One random draw spreads 256
/// connections over 4 threads binomially (a spread of +-7 each, and the busiest
/// thread sets the pace); the less busy of two keeps the spread to about one,
/// for two atomic loads per connection (the "power of two choices").
fn less_busy(a: Handle, b: Handle) -> Handle {
    if b.metrics().num_alive_tasks() < a.metrics().num_alive_tasks() {
        b
    } else {
        a
    }
}

/// Serves an accepted connection on `worker`, with its socket registered with
/// that worker's reactor. Why: tokio registers a socket with the reactor of the
/// runtime that accepted it (the listener's), and keeps delivering its
/// readiness there wherever the task that reads it runs: every read and write
/// readiness of a connection placed on another thread went through the
/// listener thread's epoll and then a cross-thread wake-up (an eventfd write
/// and a futex): 0.67 extra system calls per request at 2 threads, 0.85 at 4,
/// and one thread doing every connection's epoll work (bench/RESULTS.md,
/// "Connections registered with the listener's reactor"). Moving it costs two
/// epoll_ctl calls per connection, not per request.
fn place<F, Fut>(worker: &Handle, stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Deregisters it from this runtime's reactor (it stays non-blocking).
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "accepted connection lost"
            );
            return;
        }
    };
    worker.spawn(async move {
        // Inside the worker's runtime: registered with its reactor.
        match TcpStream::from_std(stream) {
            Ok(stream) => serve(stream).await,
            Err(e) => {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "accepted connection lost"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::runtime::{Builder, Runtime};

    use super::{less_busy, place};

    fn runtime() -> Runtime {
        Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// The accepting runtime is dropped once it has placed the connection: a
    /// socket still registered with its reactor would never be readable again
    /// (the old placement), one registered with the worker's is served.
    #[test]
    fn a_placed_connection_is_driven_by_its_worker_runtime() {
        let worker = runtime();
        let handle = worker.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker_thread = std::thread::spawn(move || {
            worker.block_on(async {
                let _ = stopped.await;
            })
        });

        let accepting = runtime();
        let mut client = accepting.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            place(&handle, stream, |mut stream| async move {
                let mut asked = [0u8; 5];
                if stream.read_exact(&mut asked).await.is_ok() && &asked == b"hello" {
                    let _ = stream.write_all(b"world").await;
                }
            });
            client
        });
        drop(accepting);

        client.write_all(b"hello").unwrap();
        // A generous deadline: a failure shows as an error or end of stream.
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut answer = [0u8; 5];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"world");
        stop.send(()).unwrap();
        worker_thread.join().unwrap();
    }

    /// 1024 connections placed from one worker, as the accept loop does, over 4
    /// worker runtimes of pingora's: within 12 of each other (runs gave ranges of
    /// 0-3; at 256 connections a CI run under load once gave 6, so the margin). One
    /// random runtime per connection, the old placement, spreads them binomially:
    /// ranges of 26-45 in the same runs.
    #[test]
    fn connections_are_spread_evenly_over_pingora_s_worker_runtimes() {
        let runtime = pingora_runtime::Runtime::new_no_steal(4, "placement-test");
        let pingora_runtime::Runtime::NoSteal(workers) = &runtime else {
            panic!("a no-steal runtime");
        };
        let (hold, held) = tokio::sync::watch::channel(());
        let (placed, all_placed) = std::sync::mpsc::channel();
        workers.get_runtime_at(0).spawn(async move {
            for _ in 0..1024 {
                let worker = less_busy(
                    pingora_runtime::current_handle(),
                    pingora_runtime::current_handle(),
                );
                let mut held = held.clone();
                worker.spawn(async move {
                    let _ = held.changed().await;
                });
            }
            placed.send(()).unwrap();
        });
        all_placed.recv_timeout(Duration::from_secs(60)).unwrap();
        let alive: Vec<usize> = (0..4)
            .map(|i| workers.get_runtime_at(i).metrics().num_alive_tasks())
            .collect();
        // Worker 0 may still count the placing task.
        let placed_total: usize = alive.iter().sum();
        assert!((1024..=1025).contains(&placed_total), "{alive:?}");
        let (least, most) = (alive.iter().min().unwrap(), alive.iter().max().unwrap());
        assert!(most - least <= 12, "uneven: {alive:?}");
        drop(hold);
        runtime.shutdown_timeout(Duration::from_secs(10));
    }

    #[test]
    fn the_runtime_with_fewer_live_tasks_is_chosen_whichever_is_drawn_first() {
        let idle = runtime();
        let busy = runtime();
        let (_hold, held) = tokio::sync::watch::channel(());
        for _ in 0..3 {
            let mut held = held.clone();
            busy.spawn(async move {
                let _ = held.changed().await;
            });
        }
        assert_eq!(busy.metrics().num_alive_tasks(), 3);
        let chosen = less_busy(idle.handle().clone(), busy.handle().clone());
        assert_eq!(chosen.metrics().num_alive_tasks(), 0);
        let chosen = less_busy(busy.handle().clone(), idle.handle().clone());
        assert_eq!(chosen.metrics().num_alive_tasks(), 0);
    }
}
