//! The fast path's listeners: each a pingora background service (so it shares
//! pingora's runtimes, worker threads and shutdown) that accepts connections and
//! serves each on a worker thread's runtime.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::net::TcpListener;

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
            // A random worker thread's runtime (each is single-threaded).
            pingora_runtime::current_handle().spawn(async move {
                engine.serve(stream, peer, shutdown).await;
            });
        }
    }
}
