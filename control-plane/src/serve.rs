//! `sluice-cp serve`: the policy server.
//!
//! Sources feed the [`Store`]: a policy directory watched with `notify` (git-ops,
//! ConfigMap mounts) and, with `--kubernetes`, the `TrafficPolicy` custom resources.
//! Every change is validated with the `policy` crate; an invalid one is refused as a
//! whole and the served version stays. Proxies subscribe over gRPC
//! (`PolicyDiscovery.StreamPolicies`, in [`crate::discovery`]) and get every
//! accepted snapshot, answering each with an ACK or a NACK.
//!
//! Security: on a loopback address the API is open to local processes (the
//! sidecar's own node); on any other address it refuses to start without TLS and a
//! bearer token, and refuses requests without the token.
//!
//! Every listener asked for (the API, `--webhook`, `--telemetry`) is bound before
//! anything serves, so a port in use or a certificate that does not load stops the
//! start; and [`Running::wait`] ends with an error when the API or the webhook stops
//! before shutdown, so `serve` never runs on with half of itself.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use sluice_policy::watch::{is_policy_entry, settle};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;

use crate::api::endpoint_discovery_server::EndpointDiscoveryServer;
use crate::api::identity_server::IdentityServer;
use crate::api::policy_discovery_server::PolicyDiscoveryServer;
use crate::auth::{Authenticator, TokenReviewer};
use crate::ca::{Authority, CaConfig, IdentityService};
use crate::discovery::Discovery;
use crate::endpoint_discovery::Endpoints;
use crate::endpoints::EndpointStore;
use crate::inject::InjectOptions;
use crate::metrics::Metrics;
use crate::store::{Offer, Offered, Store};
use crate::telemetry::{Readiness, TelemetryServer};
use crate::tls::{self, CertificateCheck, CertificateFiles};
use crate::webhook::WebhookServer;

/// Largest gRPC message either side accepts (a snapshot is every policy as YAML).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Longest node id accepted.
pub const MAX_NODE_ID: usize = 253;

pub struct ServeConfig {
    pub policies: Option<PathBuf>,
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How often the `tls` files are read again for a renewed pair
    /// ([`crate::tls::CERT_CHECK_EVERY`] outside tests).
    pub cert_check_every: Duration,
    pub token_file: Option<PathBuf>,
    /// Follow the TrafficPolicy custom resources of this cluster (instead of, or
    /// with no, `policies` directory).
    pub kubernetes: Option<kube::Config>,
    /// Recognise proxies by their ServiceAccount tokens for this audience, through
    /// the Kubernetes TokenReview API (needs `kubernetes`).
    pub token_review: Option<String>,
    /// ServiceAccounts (`namespace/name`) whose tokens may make the operator's calls
    /// (status, history, diff, rollback), besides the static token.
    pub operators: Vec<String>,
    /// Serve `/live`, `/ready` and `/metrics` over plain HTTP here.
    pub telemetry: Option<SocketAddr>,
    /// Also serve the sidecar-injecting admission webhook.
    pub webhook: Option<WebhookConfig>,
    /// Be the mesh's certificate authority (`Identity.Certify`, [`crate::ca`]).
    pub ca: Option<CaConfig>,
}

/// `serve --webhook`: where, with which certificate, injecting what.
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub inject: InjectOptions,
}

/// A [`ServeConfig`] that cannot be served as given: the operator has to change
/// the arguments (exit code 64), unlike a failure while starting (exit code 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error(
        "--listen {listen} is not a loopback address: it needs --tls-cert, --tls-key and \
         a way to check callers (--token-review in Kubernetes, --token-file elsewhere); \
         add {missing}, or listen on 127.0.0.1:{port}",
        missing = missing.join(", "),
        port = listen.port()
    )]
    Unprotected {
        listen: SocketAddr,
        /// The flags that are absent, in the order of the message.
        missing: Vec<&'static str>,
    },
    #[error("--kubernetes and --policies are two sources of truth: remove one of them")]
    TwoSources,
    #[error("--token-review asks the Kubernetes API who a token belongs to: add --kubernetes")]
    ReviewWithoutKubernetes,
}

impl ServeConfig {
    /// The checks that need no file, network or cluster: a failing one is the
    /// operator's to fix in the arguments.
    pub fn check(&self) -> Result<(), UsageError> {
        if !self.listen.ip().is_loopback() {
            let missing: Vec<&'static str> = [
                (self.tls.is_none(), "--tls-cert"),
                (self.tls.is_none(), "--tls-key"),
                (
                    self.token_file.is_none() && self.token_review.is_none(),
                    "--token-review or --token-file",
                ),
            ]
            .into_iter()
            .filter_map(|(absent, flag)| absent.then_some(flag))
            .collect();
            if !missing.is_empty() {
                return Err(UsageError::Unprotected {
                    listen: self.listen,
                    missing,
                });
            }
        }
        if self.kubernetes.is_some() && self.policies.is_some() {
            return Err(UsageError::TwoSources);
        }

        Ok(())
    }
}

/// A running server (for `main` and for in-process tests).
pub struct Running {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    /// Services' endpoint sets (empty without `--kubernetes`).
    pub endpoints: Arc<EndpointStore>,
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// The metrics `/metrics` serves (for tests without `--telemetry`).
    pub metrics: Metrics,
    /// Where `--telemetry` and `--webhook` were bound.
    pub telemetry: Option<SocketAddr>,
    pub webhook: Option<SocketAddr>,
    webhook_task: Option<tokio::task::JoinHandle<()>>,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Keeps the directory watch alive.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Running {
    /// Serves until shutdown. An error when the API fails, or when the webhook
    /// stops before shutdown: the process must not run on without it, because the
    /// cluster would then create pods without their sidecar.
    pub async fn wait(self) -> anyhow::Result<()> {
        let Running {
            mut task,
            webhook_task,
            stopping,
            _watcher,
            ..
        } = self;
        let Some(mut hook) = webhook_task else {
            return Ok(task.await??);
        };
        tokio::select! {
            api = &mut task => api??,
            ended = &mut hook => {
                if !*stopping.borrow() {
                    let why = match ended {
                        Ok(()) => "it stopped serving".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!(error = why.as_str(), "the webhook failed; exiting");
                    anyhow::bail!("the webhook failed: {why}");
                }
                return Ok(task.await??);
            }
        }
        // Shutting down: the webhook answers the requests in flight first.
        hook.await?;
        Ok(())
    }
}

/// Completes once `stopping` turns true.
async fn until_stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// TLS handshakes at once on the API listener; more connections are closed at accept.
const MAX_HANDSHAKES: usize = 256;
/// Time a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS connections for the gRPC server. Handshakes run concurrently (a slow client
/// cannot hold up the others), at most [`MAX_HANDSHAKES`] at once, each within
/// [`HANDSHAKE_TIMEOUT`]; the certificate files are checked every `check_every`
/// and a renewed pair serves the next handshakes. Ends when the server drops the
/// stream.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    files: Arc<CertificateFiles>,
    check_every: Duration,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let mut check = tokio::time::interval(check_every.max(Duration::from_millis(10)));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();
        loop {
            tokio::select! {
                () = ready.closed() => break,
                _ = check.tick() => match files.check() {
                    CertificateCheck::Unchanged => {}
                    CertificateCheck::Reloaded => tracing::info!(
                        path = %files.cert_path().display(),
                        "serving the new certificate"
                    ),
                    CertificateCheck::Kept(why) => tracing::warn!(
                        error = %why,
                        "keeping the previous certificate"
                    ),
                },
                accepted = listener.accept() => {
                    let Ok((tcp, _peer)) = accepted else {
                        // Out of file descriptors and the like: back off, do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                        continue; // over the limit: dropping `tcp` closes it
                    };
                    let (acceptor, ready) = (acceptor.clone(), ready.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                        if let Ok(Ok(tls)) = handshake.await {
                            let _ = ready.send(Ok(tls)).await;
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(incoming)
}

/// Validates the config, binds every listener, loads the sources and starts serving.
pub async fn start(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    config.check()?;
    let token = match &config.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
            let token = text.trim().to_owned();
            anyhow::ensure!(
                !token.is_empty(),
                "--token-file {} is empty",
                path.display()
            );
            Some(token)
        }
        None => None,
    };
    let client = match config.kubernetes.clone() {
        Some(kube_config) => Some(kube::Client::try_from(kube_config)?),
        None => None,
    };
    if config.token_review.is_some() && client.is_none() {
        return Err(UsageError::ReviewWithoutKubernetes.into());
    }
    let metrics = Metrics::register(prometheus::Registry::new())?;
    let waiting_for = match (&config.policies, &client) {
        (Some(_), _) => Some("the policy directory has not been read yet"),
        (None, Some(_)) => Some(crate::kubernetes::NOT_LISTED),
        (None, None) => None,
    };
    let readiness = Arc::new(Readiness::new(waiting_for, config.webhook.is_some()));

    // Every listener first: nothing serves unless all of them can.
    let telemetry = match config.telemetry {
        Some(addr) => Some(
            TelemetryServer::bind(addr, metrics.clone(), Arc::clone(&readiness))
                .await
                .map_err(|e| anyhow::anyhow!("--telemetry {addr}: cannot listen: {e}"))?,
        ),
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: cannot listen: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let tls = match &config.tls {
        Some((cert, key)) => {
            let files = Arc::new(CertificateFiles::load(cert, key)?);
            let server = tls::server_config(Arc::clone(&files), b"h2")?;
            Some((TlsAcceptor::from(Arc::new(server)), files))
        }
        None => None,
    };
    let webhook = match config.webhook {
        Some(hook) => Some(
            WebhookServer::bind(hook.listen, &hook.cert, &hook.key, hook.inject)
                .await
                .map_err(|e| anyhow::anyhow!("--webhook {}: {e}", hook.listen))?
                .observed_by(Arc::new(metrics.clone())),
        ),
        None => None,
    };

    let authority = match &config.ca {
        Some(ca) => {
            let authority = Authority::load(ca)?;
            metrics.ca_not_after.set(authority.ca_not_after_unix());
            tracing::info!(
                trust_domain = authority.trust_domain(),
                ttl_secs = ca.ttl.as_secs(),
                "issuing workload certificates"
            );
            Some(Arc::new(authority))
        }
        None => None,
    };

    let store = Arc::new(Store::default());
    let watcher = match &config.policies {
        Some(dir) => {
            let source = DirSource::default();
            source.load(&store, dir, &metrics);
            readiness.source_loaded();
            Some(watch_dir(
                source,
                Arc::clone(&store),
                dir.clone(),
                metrics.clone(),
            )?)
        }
        None => None,
    };
    let endpoints = Arc::new(EndpointStore::default());
    match &client {
        Some(client) => {
            tokio::spawn(crate::kubernetes::follow(
                Arc::clone(&store),
                client.clone(),
                metrics.clone(),
                Arc::clone(&readiness),
            ));
            tokio::spawn(crate::services::follow(
                Arc::clone(&endpoints),
                client.clone(),
                metrics.clone(),
                // Endpoints name their pods' identities only when this control
                // plane issues them.
                config.ca.as_ref().map(|ca| ca.trust_domain.clone()),
            ));
        }
        // No cluster, no Services: subscriptions are answered at once, empty.
        None => endpoints.mark_synced(),
    }
    let kube_client = client.clone();
    let auth = Arc::new(match (&config.token_review, client, token) {
        (Some(audience), Some(client), static_token) => {
            Authenticator::Kubernetes(Box::new(TokenReviewer::new(
                client,
                audience.clone(),
                static_token,
                Box::new(metrics.clone()),
            )))
        }
        (_, _, Some(token)) => Authenticator::Static(token),
        _ => Authenticator::Open,
    });
    let mut builder = Server::builder();
    // Open streams end on shutdown too (proxies reconnect elsewhere); without this
    // a graceful stop would wait for them forever.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let endpoint_service = EndpointDiscoveryServer::new(Endpoints {
        store: Arc::clone(&store),
        endpoints: Arc::clone(&endpoints),
        nonce: AtomicU64::new(0),
        stopping: stopping.clone(),
        auth: Arc::clone(&auth),
        metrics: metrics.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let identity_service = IdentityServer::new(IdentityService {
        authority,
        auth: Arc::clone(&auth),
        static_token_identities: config
            .ca
            .as_ref()
            .is_some_and(|c| c.static_token_identities),
        metrics: metrics.clone(),
    });
    let service = PolicyDiscoveryServer::new(Discovery {
        store: Arc::clone(&store),
        nonce: AtomicU64::new(0),
        stopping: stopping.clone(),
        auth,
        operators: config.operators.clone(),
        metrics: metrics.clone(),
        kube: kube_client,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = builder
        .add_service(service)
        .add_service(endpoint_service)
        .add_service(identity_service);
    let stopped = until_stopped(stopping.clone());
    type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let serving: Serving = match tls {
        Some((acceptor, files)) => {
            let incoming = tls_incoming(listener, acceptor, files, config.cert_check_every);
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        None => {
            Box::pin(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped))
        }
    };
    readiness.api_serving(true);
    let task = {
        let readiness = Arc::clone(&readiness);
        tokio::spawn(async move {
            let served = serving.await;
            readiness.api_serving(false);
            served
        })
    };
    tracing::info!(listen = %addr, tls = config.tls.is_some(), "serving");
    let webhook_addr = webhook.as_ref().and_then(|w| w.local_addr().ok());
    let webhook_task = webhook.map(|server| {
        readiness.webhook_serving(true);
        let (readiness, stopped) = (Arc::clone(&readiness), until_stopped(stopping.clone()));
        tokio::spawn(async move {
            server.run(stopped).await;
            readiness.webhook_serving(false);
        })
    });
    let telemetry_addr = telemetry.as_ref().and_then(|t| t.local_addr().ok());
    if let Some(server) = telemetry {
        tokio::spawn(server.run(until_stopped(stopping.clone())));
    }
    Ok(Running {
        addr,
        store,
        endpoints,
        task,
        metrics,
        telemetry: telemetry_addr,
        webhook: webhook_addr,
        webhook_task,
        stopping,
        _watcher: watcher,
    })
}

fn source_label(dir: &Path) -> String {
    format!("dir:{}", dir.display())
}

/// A policy directory as a source: read whole on every change, but only the files
/// whose text changed are checked again (a one-policy edit in a directory of
/// 10,000 policies checks that file's, not the mesh's).
#[derive(Default)]
pub struct DirSource {
    /// Each file's text hash and its checked documents.
    cache: std::sync::Mutex<
        std::collections::HashMap<PathBuf, (String, Vec<sluice_policy::Document>)>,
    >,
}

impl DirSource {
    /// Reads the directory and offers every policy in it to the store, each on its
    /// own: an invalid file refuses only its own policies.
    pub fn load(&self, store: &Store, dir: &Path, metrics: &Metrics) -> Offer {
        let (sources, unreadable) = sluice_policy::read_paths(&[dir.to_owned()]);
        let mut documents: Vec<sluice_policy::Document> = unreadable
            .into_iter()
            .map(|e| sluice_policy::Document {
                file: e.file.clone(),
                id: None,
                name_at: (0, 0),
                outcome: Err(vec![e]),
            })
            .collect();
        {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut next = std::collections::HashMap::with_capacity(sources.len());
            for (file, text) in &sources {
                let hash = sluice_policy::hash::content_hash(text);
                let checked = match cache.remove(file) {
                    Some((h, docs)) if h == hash => docs,
                    _ => sluice_policy::check_file(file, text),
                };
                documents.extend(checked.iter().cloned());
                next.insert(file.clone(), (hash, checked));
            }
            // Files gone from the directory leave the cache with it.
            *cache = next;
        }
        sluice_policy::refuse_duplicates(&mut documents);
        let source = source_label(dir);
        let offer = store.replace(Offered::documents(documents), &source);
        report(store, metrics, &offer, &source);
        offer
    }
}

/// Counts and logs what became of an offered change.
pub(crate) fn report(store: &Store, metrics: &Metrics, offer: &Offer, source: &str) {
    metrics.offered(offer);
    match offer {
        Offer::Accepted(v) => {
            tracing::info!(
                version = v,
                source,
                policies = store.served().policies.len(),
                "policy accepted"
            );
        }
        Offer::Rejected | Offer::Unchanged => {}
    }
    if *offer != Offer::Unchanged {
        for e in store.unidentified() {
            tracing::error!(error = e.as_str(), "policy rejected");
        }
        for (id, c) in store.changed_conditions() {
            if !c.accepted {
                tracing::error!(policy = %id, reason = c.reason, error = c.message.as_str(), "policy rejected");
            } else if !c.message.is_empty() {
                // Served as written all the same; whoever wrote it should hear
                // that part of it will never apply.
                tracing::warn!(policy = %id, warnings = c.message.as_str(), "policy accepted with warnings");
            }
        }
    }
}

/// Watches the directory like the proxy does (create/modify/remove of policy files
/// and ConfigMap `..` entries, debounced), reloading on a thread of its own.
fn watch_dir(
    source: DirSource,
    store: Arc<Store>,
    dir: PathBuf,
    metrics: Metrics,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx)?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    std::thread::Builder::new()
        .name("policy-dir-watch".into())
        .spawn(move || {
            let relevant = |e: &notify::Result<notify::Event>| {
                e.as_ref().is_ok_and(|e| {
                    matches!(
                        e.kind,
                        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                    ) && e
                        .paths
                        .iter()
                        .any(|p| p.file_name().is_some_and(|n| is_policy_entry(n, None)))
                })
            };
            // Ends when the watcher is dropped.
            while let Ok(first) = rx.recv() {
                if !relevant(&first) {
                    continue;
                }
                if !settle(
                    &rx,
                    relevant,
                    Duration::from_millis(100),
                    Duration::from_millis(500),
                ) {
                    return;
                }
                source.load(&store, &dir, &metrics);
            }
        })?;
    Ok(watcher)
}
