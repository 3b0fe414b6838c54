//! `sluice-cp serve --telemetry ADDR`: plain HTTP for the kubelet's probes and for
//! Prometheus, and nothing else.
//!
//! - `/live`: 200 while the process runs (a liveness probe restarts a wedged one).
//! - `/ready`: 200 once the policy source has been read once and every listener
//!   asked for (the gRPC API, the webhook) is serving; 503 with every reason
//!   otherwise. A source that was read but refused still counts as read: the
//!   control plane then keeps its served version (or nothing), and an unready
//!   replica would also take the injection webhook out of service for the cluster.
//! - `/metrics`: [`Metrics`] in the Prometheus text format.
//!
//! Why a listener of its own: the API off loopback needs TLS and a token, and the
//! webhook speaks TLS with a certificate the kubelet does not trust; probes and
//! scrapes need neither, and nothing here reveals a policy or changes state.
//! Connections are bounded in number and in how long a request's head may take.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::metrics::Metrics;

/// Connections served at once (probes and a few scrapers); more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// Time allowed for a request's head.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/ready` waits for. Each part is set by the component it describes.
pub struct Readiness {
    state: Mutex<Parts>,
}

struct Parts {
    /// `None` once the source has been read; else why not yet.
    source: Option<String>,
    api: bool,
    /// `None` without a webhook.
    webhook: Option<bool>,
}

impl Readiness {
    /// Waits for the source (`source`: what it waits for, `None` when there is
    /// nothing to read), the API, and the webhook if there is one.
    pub fn new(source: Option<&str>, webhook: bool) -> Self {
        Readiness {
            state: Mutex::new(Parts {
                source: source.map(str::to_owned),
                api: false,
                webhook: webhook.then_some(false),
            }),
        }
    }

    fn parts(&self) -> std::sync::MutexGuard<'_, Parts> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The source has been read once (accepted or not).
    pub fn source_loaded(&self) {
        self.parts().source = None;
    }

    /// The source could not be read yet: `/ready` says why until it is.
    pub fn source_failed(&self, what: &str, why: &str) {
        let mut parts = self.parts();
        if parts.source.is_some() {
            parts.source = Some(format!("{what} (last attempt: {why})"));
        }
    }

    pub fn api_serving(&self, serving: bool) {
        self.parts().api = serving;
    }

    pub fn webhook_serving(&self, serving: bool) {
        let mut parts = self.parts();
        if parts.webhook.is_some() {
            parts.webhook = Some(serving);
        }
    }

    /// Ready, or every reason it is not.
    pub fn check(&self) -> Result<(), String> {
        let parts = self.parts();
        let mut why = Vec::new();
        if let Some(source) = &parts.source {
            why.push(source.clone());
        }
        if !parts.api {
            why.push("the gRPC API is not serving".to_owned());
        }
        if parts.webhook == Some(false) {
            why.push("the webhook is not serving".to_owned());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }
}

/// A bound, not yet serving, telemetry listener.
pub struct TelemetryServer {
    listener: TcpListener,
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

impl TelemetryServer {
    pub async fn bind(
        addr: SocketAddr,
        metrics: Metrics,
        readiness: Arc<Readiness>,
    ) -> std::io::Result<Self> {
        Ok(TelemetryServer {
            listener: TcpListener::bind(addr).await?,
            metrics,
            readiness,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes; requests in flight are dropped with it
    /// (a probe or a scrape is simply retried).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        if let Ok(addr) = self.local_addr() {
            tracing::info!(listen = %addr, "telemetry serving /live, /ready and /metrics");
        }
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        let shared = Arc::new((self.metrics, self.readiness));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => {
                    let Ok((tcp, _peer)) = accepted else {
                        // Out of file descriptors and the like: back off, do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                        continue; // over the limit: dropping `tcp` closes it
                    };
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let _permit = permit;
                        let service = hyper::service::service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, Infallible>(handle(&req, &shared.0, &shared.1)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(IO_TIMEOUT)
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
            }
        }
    }
}

fn handle(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/live" | "/ready" | "/metrics") {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: this listener serves /live, /ready and /metrics\n".into(),
        );
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match path {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match readiness.check() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n").into(),
            ),
        },
        _ => match metrics.render() {
            Ok(body) => reply(StatusCode::OK, "text/plain; version=0.0.4", body.into()),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot encode the metrics: {e}\n").into(),
            ),
        },
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_the_source_is_read_and_every_listener_serves() {
        let ready = Readiness::new(Some("the TrafficPolicy resources are not listed yet"), true);
        assert_eq!(
            ready.check(),
            Err(
                "the TrafficPolicy resources are not listed yet; the gRPC API is not serving; \
                 the webhook is not serving"
                    .into()
            )
        );
        ready.source_failed(
            "the TrafficPolicy resources are not listed yet",
            "connection refused",
        );
        ready.api_serving(true);
        ready.webhook_serving(true);
        assert_eq!(
            ready.check(),
            Err(
                "the TrafficPolicy resources are not listed yet (last attempt: connection refused)"
                    .into()
            )
        );
        ready.source_loaded();
        assert_eq!(ready.check(), Ok(()));
        // A failure after the first list does not make the replica unready.
        ready.source_failed("listing", "timeout");
        assert_eq!(ready.check(), Ok(()));
        ready.webhook_serving(false);
        assert_eq!(ready.check(), Err("the webhook is not serving".into()));
    }

    #[test]
    fn without_a_source_or_webhook_only_the_api_counts() {
        let ready = Readiness::new(None, false);
        assert!(ready.check().is_err());
        ready.api_serving(true);
        ready.webhook_serving(false);
        assert_eq!(ready.check(), Ok(()));
    }
}
