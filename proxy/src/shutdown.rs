//! Graceful shutdown: on SIGTERM stop accepting, let in-flight requests finish, exit 0.
//!
//! pingora closes its listeners on SIGTERM but then sleeps its whole grace period
//! even when nothing is in flight; a sidecar should leave as soon as it is drained
//! (Kubernetes waits for it). So SIGTERM also starts a drain monitor that exits once
//! the in-flight count has stayed at zero briefly, or when the drain timeout is up.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::shared::Shared;

/// How long the in-flight count must stay at zero to count as drained: covers a
/// request accepted just before the listener closed whose headers are still arriving.
const SETTLE: Duration = Duration::from_millis(200);
const POLL: Duration = Duration::from_millis(20);

pub struct DrainOnSigterm {
    pub shared: Arc<Shared>,
    pub drain_timeout: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSigterm {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; SIGTERM will not drain");
            return std::future::pending().await;
        };
        let signal = tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
        };
        if matches!(signal, ShutdownSignal::GracefulTerminate) {
            tracing::info!(inflight = self.shared.inflight.count(), "draining");
            let shared = Arc::clone(&self.shared);
            let timeout = self.drain_timeout;
            // A plain thread: pingora is about to shut the async runtimes down.
            let _ = std::thread::Builder::new()
                .name("drain".into())
                .spawn(move || drain_then_exit(&shared, timeout));
        }
        signal
    }
}

fn drain_then_exit(shared: &Shared, timeout: Duration) {
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    while started.elapsed() < timeout {
        if shared.inflight.count() == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= SETTLE {
                break;
            }
        } else {
            idle_since = None;
        }
        std::thread::sleep(POLL);
    }
    let left = shared.inflight.count();
    tracing::info!(
        inflight_dropped = left,
        drain_ms = started.elapsed().as_millis() as u64,
        "drained, exiting"
    );
    shared.access_log.flush();
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}
