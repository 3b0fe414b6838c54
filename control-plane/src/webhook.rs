//! The mutating admission webhook: `admission.k8s.io/v1` AdmissionReview in, the
//! sidecar as a JSONPatch out, over HTTPS (the API server calls webhooks over TLS
//! only).
//!
//! Which pods are sent here is the MutatingWebhookConfiguration's business (namespaces
//! labelled `sluice.dev/inject=enabled`, or pods labelled so); this side injects every
//! pod it is sent unless the pod opted out (`sluice.dev/inject: disabled`), runs on the
//! host network, or already has the proxy. The patch is [`inject::patch_for_pod`]'s,
//! the same code `sluice-cp inject` applies.
//!
//! Invariants: no request makes the server panic or hang. A body that is not an
//! AdmissionReview gets HTTP 400 with an AdmissionReview saying why; a body over
//! [`MAX_BODY_BYTES`] gets 413; a pod whose Sluice annotations are invalid is denied
//! with a message naming the annotation (the user asked for something that cannot
//! be done; admitting it silently would hide that). Connections are bounded in number
//! and in how long a handshake or a request may take.
//!
//! Certificate rotation ([`crate::tls`]): the certificate and key files are read
//! again every [`CERT_CHECK_EVERY`](crate::tls::CERT_CHECK_EVERY) and a renewed
//! pair serves the next handshakes; a webhook still serving an expired certificate
//! would stop every pod from being created.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::inject::{self, InjectOptions};
use crate::tls::{CertificateCheck, CertificateError, CertificateFiles};

/// The path the MutatingWebhookConfiguration calls.
pub const INJECT_PATH: &str = "/inject";
/// Largest AdmissionReview accepted: a pod's etcd limit is 1.5 MiB, and the review
/// carries the object once more on updates.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 256;
/// Time allowed for the TLS handshake, a request's headers, or its body.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const API_VERSION: &str = "admission.k8s.io/v1";

/// What the webhook answered an admission review (the label of
/// `sluice_cp_webhook_reviews_total`): with `failurePolicy: Ignore` a pod admitted
/// without its sidecar is otherwise silent, so operators count these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Patched,
    /// Admitted as is: not a pod creation, opted out, host network, already injected.
    Unchanged,
    /// Denied: the pod asks for something that cannot be done (a bad annotation).
    Refused,
    /// The request itself could not be used: not an AdmissionReview, too large or
    /// too slow (an HTTP error: the API server applies `failurePolicy`), or a pod
    /// that does not parse (denied).
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Unchanged => "unchanged",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
        }
    }
}

/// Told the outcome of every admission review (the control plane's metrics).
pub trait AdmissionObserver: Send + Sync {
    fn admitted(&self, outcome: Outcome);
}

impl AdmissionObserver for () {
    fn admitted(&self, _outcome: Outcome) {}
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] CertificateError),
}

/// A bound, not yet serving, webhook (tests bind to port 0 and read the address).
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    certificate: Arc<CertificateFiles>,
    cert_check_every: Duration,
    opts: Arc<InjectOptions>,
    observer: Arc<dyn AdmissionObserver>,
}

impl WebhookServer {
    /// Loads the certificate chain and key (PEM) and binds `addr`.
    pub async fn bind(
        addr: SocketAddr,
        cert_path: &Path,
        key_path: &Path,
        opts: InjectOptions,
    ) -> Result<Self, WebhookError> {
        let certificate = Arc::new(CertificateFiles::load(cert_path, key_path)?);
        let acceptor = tls_acceptor(Arc::clone(&certificate))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| WebhookError::Bind { addr, source })?;
        Ok(Self {
            listener,
            acceptor,
            certificate,
            cert_check_every: crate::tls::CERT_CHECK_EVERY,
            opts: Arc::new(opts),
            observer: Arc::new(()),
        })
    }

    /// Tells `observer` the outcome of every review.
    pub fn observed_by(mut self, observer: Arc<dyn AdmissionObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Checks the certificate files this often instead of
    /// [`CERT_CHECK_EVERY`](crate::tls::CERT_CHECK_EVERY).
    pub fn cert_check_every(mut self, every: Duration) -> Self {
        self.cert_check_every = every.max(Duration::from_millis(10));
        self
    }

    /// Reads the certificate files now and serves a changed pair that loads.
    pub fn check_certificate(&self) -> CertificateCheck {
        let check = self.certificate.check();
        match &check {
            CertificateCheck::Unchanged => {}
            CertificateCheck::Reloaded => tracing::info!(
                path = %self.certificate.cert_path().display(),
                "webhook: serving the new certificate"
            ),
            CertificateCheck::Kept(why) => {
                tracing::warn!(error = %why, "webhook: keeping the previous certificate");
            }
        }
        check
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then gives requests in flight a few seconds.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        if let Ok(addr) = self.local_addr() {
            tracing::info!(url = %format_args!("https://{addr}{INJECT_PATH}"), "webhook serving");
        }
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        let mut cert_check = tokio::time::interval(self.cert_check_every);
        cert_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        cert_check.reset();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = cert_check.tick() => {
                    self.check_certificate();
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => {
                    let Ok((tcp, _peer)) = accepted else {
                        // Out of file descriptors and the like: back off, do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        continue; // over the limit: dropping `tcp` closes it
                    };
                    let acceptor = self.acceptor.clone();
                    let opts = self.opts.clone();
                    let observer = Arc::clone(&self.observer);
                    connections.spawn(async move {
                        let _permit = permit;
                        serve_connection(tcp, acceptor, opts, observer).await;
                    });
                }
            }
        }
        let drain = async { while connections.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
    }
}

/// Binds and serves the webhook until `shutdown` completes.
pub async fn serve_webhook(
    addr: SocketAddr,
    cert_path: &Path,
    key_path: &Path,
    opts: InjectOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WebhookError> {
    let server = WebhookServer::bind(addr, cert_path, key_path, opts).await?;
    server.run(shutdown).await;
    Ok(())
}

fn tls_acceptor(certificate: Arc<CertificateFiles>) -> Result<TlsAcceptor, WebhookError> {
    let config = crate::tls::server_config(certificate, b"http/1.1")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    opts: Arc<InjectOptions>,
    observer: Arc<dyn AdmissionObserver>,
) {
    let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await else {
        return; // handshake failed or stalled
    };
    let service = hyper::service::service_fn(move |req| {
        let (opts, observer) = (opts.clone(), Arc::clone(&observer));
        async move { Ok::<_, Infallible>(handle(req, &opts, observer.as_ref()).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

async fn handle(
    req: Request<Incoming>,
    opts: &InjectOptions,
    observer: &dyn AdmissionObserver,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::POST, INJECT_PATH) => {}
        (_, INJECT_PATH) => return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n"),
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    let (status, review, outcome) = match tokio::time::timeout(IO_TIMEOUT, body).await {
        Ok(Ok(body)) => answer(&body.to_bytes(), opts),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => (
            StatusCode::PAYLOAD_TOO_LARGE,
            error_review(
                "",
                413,
                &format!("request body over {MAX_BODY_BYTES} bytes"),
            ),
            Outcome::Error,
        ),
        Ok(Err(e)) => (
            StatusCode::BAD_REQUEST,
            error_review("", 400, &format!("cannot read the request body: {e}")),
            Outcome::Error,
        ),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            error_review("", 408, "request body too slow"),
            Outcome::Error,
        ),
    };
    observer.admitted(outcome);
    let mut response = Response::new(Full::new(Bytes::from(review.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionReview {
    api_version: String,
    kind: String,
    request: Option<AdmissionRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionRequest {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    sub_resource: Option<String>,
    operation: String,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    kind: String,
}

/// Answers one AdmissionReview body: the HTTP status and the AdmissionReview to send.
/// Pure, so every case is testable without a socket.
pub fn review(body: &[u8], opts: &InjectOptions) -> (StatusCode, Value) {
    let (status, review, _) = answer(body, opts);
    (status, review)
}

/// [`review`], and what it came to.
pub fn answer(body: &[u8], opts: &InjectOptions) -> (StatusCode, Value, Outcome) {
    let parsed: AdmissionReview = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                error_review("", 400, &format!("not an AdmissionReview: {e}")),
                Outcome::Error,
            )
        }
    };
    let Some(request) = parsed.request.filter(|r| !r.uid.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            error_review("", 400, "the AdmissionReview has no request with a uid"),
            Outcome::Error,
        );
    };
    if parsed.api_version != API_VERSION || parsed.kind != "AdmissionReview" {
        return (
            StatusCode::BAD_REQUEST,
            error_review(
                &request.uid,
                400,
                &format!(
                    "expected {API_VERSION} AdmissionReview, got {} {}",
                    parsed.api_version, parsed.kind
                ),
            ),
            Outcome::Error,
        );
    }
    let uid = request.uid.as_str();
    // Only pod creation is injected; anything else this webhook is sent is admitted as is.
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    if !is_pod || request.operation != "CREATE" || request.sub_resource.is_some() {
        return (StatusCode::OK, allowed(uid, None), Outcome::Unchanged);
    }
    let Some(object) = request.object else {
        return (
            StatusCode::OK,
            denied(uid, "the request carries no pod"),
            Outcome::Error,
        );
    };
    let pod: Pod = match serde_json::from_value(object) {
        Ok(pod) => pod,
        Err(e) => {
            return (
                StatusCode::OK,
                denied(uid, &format!("not a valid pod: {e}")),
                Outcome::Error,
            )
        }
    };
    match inject::patch_for_pod(&pod, opts) {
        Ok(ops) if ops.is_empty() => (StatusCode::OK, allowed(uid, None), Outcome::Unchanged),
        Ok(ops) => match serde_json::to_vec(&ops) {
            Ok(patch) => (StatusCode::OK, allowed(uid, Some(&patch)), Outcome::Patched),
            Err(e) => (
                StatusCode::OK,
                denied(uid, &format!("internal error: {e}")),
                Outcome::Error,
            ),
        },
        Err(e) => (
            StatusCode::OK,
            denied(uid, &e.to_string()),
            Outcome::Refused,
        ),
    }
}

fn envelope(response: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response})
}

fn allowed(uid: &str, patch: Option<&[u8]>) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    envelope(response)
}

fn denied(uid: &str, message: &str) -> Value {
    error_review(uid, 400, message)
}

fn error_review(uid: &str, code: u16, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": code, "message": format!("sluice: {message}")},
    }))
}

/// `sluice-cp webhook`: serves until SIGTERM or Ctrl-C; exit 1 with the reason when
/// it cannot start.
pub fn run(
    listen: SocketAddr,
    cert: &Path,
    key: &Path,
    opts: InjectOptions,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sluice-cp webhook: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let served = runtime.block_on(serve_webhook(listen, cert, key, opts, terminated()));
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-cp webhook: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Completes on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
async fn terminated() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                () = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    ctrl_c.await;
}
