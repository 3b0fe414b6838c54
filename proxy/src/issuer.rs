//! The proxy's client of the control plane's certificate authority
//! (`Identity.Certify`): a fresh ECDSA P-256 key made here (it never leaves the
//! proxy), a CSR for it, and the answer checked into [`Credentials`].
//!
//! The call goes over the same channel and with the same bearer token as the
//! policy stream ([`crate::control_plane::connect`]): in Kubernetes the projected
//! ServiceAccount token, which is what the certificate's identity is taken from.
//! The CSR names an identity only when one is asked for (`requested`), which a
//! control plane heeds for its static token with `--static-token-identities`
//! alone (tests and development); otherwise it is ignored there.
//!
//! [`Renewal::run`] keeps credentials fresh: a new key and certificate at two
//! thirds of the current one's life, retries with backoff on failure, and hands
//! each new set to whoever serves with it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::control_plane::api::identity_client::IdentityClient;
use crate::control_plane::api::CertifyRequest;
use crate::control_plane::{self, Bearer, Ca};
use crate::identity::credentials::{Credentials, CredentialsError};
use crate::identity::tls::Tls;

/// Why no certificate was had.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("cannot reach the control plane: {0}")]
    Connect(String),
    #[error("cannot make a key or CSR: {0}")]
    Key(String),
    /// The control plane said no (`PERMISSION_DENIED` and `UNAUTHENTICATED`
    /// say what to change; `FAILED_PRECONDITION`: it is no CA).
    #[error("the control plane refused the certificate: {}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    #[error("the control plane's answer: {0}")]
    Answer(#[from] CredentialsError),
    #[error("the control plane says the certificate is for {said}, but it names {names}")]
    IdentityMismatch { said: String, names: String },
    #[error("{0}")]
    Install(String),
}

/// A new key, a CSR for it, and the certificate the control plane signs for it.
pub async fn certify(
    channel: Channel,
    bearer: Bearer,
    requested: Option<&str>,
) -> Result<Credentials, IssueError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IssueError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = requested {
        let uri = id
            .try_into()
            .map_err(|e: rcgen::Error| IssueError::Key(format!("{id:?}: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| IssueError::Key(e.to_string()))?;
    let answer = IdentityClient::with_interceptor(channel, bearer)
        .certify(CertifyRequest { csr_pem })
        .await
        .map_err(IssueError::Refused)?
        .into_inner();
    let credentials = Credentials::from_pem(
        &answer.cert_chain_pem,
        &key.serialize_pem(),
        &answer.trust_roots_pem,
    )?;
    if credentials.identity != answer.identity {
        return Err(IssueError::IdentityMismatch {
            said: answer.identity,
            names: credentials.identity,
        });
    }
    Ok(credentials)
}

/// Connects to the control plane at `url` (as the policy stream does) and
/// [`certify`]s.
pub async fn certify_at(
    url: &str,
    ca: Option<&Ca>,
    token_file: Option<&std::path::Path>,
    requested: Option<&str>,
) -> Result<Credentials, IssueError> {
    let (channel, bearer) = control_plane::connect(url, ca, token_file)
        .await
        .map_err(|e| IssueError::Connect(format!("{url}: {e:#}")))?;
    certify(channel, bearer, requested).await
}

/// First wait after a failed request; doubles up to [`MAX_RETRY`].
pub const MIN_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(60);
/// The longest one request may take (connecting included): a control plane that
/// takes the call and never answers must not hold renewal while the certificate
/// runs out.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Keeps a workload certificate from the control plane fresh.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub url: String,
    pub ca: Option<Ca>,
    pub token_file: Option<PathBuf>,
    /// The identity to ask for (heeded only by a control plane that trusts the
    /// static token to name it).
    pub requested: Option<String>,
}

impl Renewal {
    /// One request, within [`REQUEST_TIMEOUT`].
    pub async fn once(&self) -> Result<Credentials, IssueError> {
        let request = certify_at(
            &self.url,
            self.ca.as_ref(),
            self.token_file.as_deref(),
            self.requested.as_deref(),
        );
        tokio::time::timeout(REQUEST_TIMEOUT, request)
            .await
            .unwrap_or_else(|_| {
                Err(IssueError::Connect(format!(
                    "{}: no answer within {REQUEST_TIMEOUT:?}",
                    self.url
                )))
            })
    }

    /// Asks for credentials, hands them to `issued`, and asks again at half
    /// of their life (less up to a tenth, so that proxies started together do not
    /// all ask at once), until `shutdown` turns true. A failure, of the request or
    /// of `issued` (credentials that do not install), is logged and retried with
    /// backoff; the credentials handed over last stay in use meanwhile.
    pub async fn run(
        self,
        mut issued: impl FnMut(Credentials) -> Result<(), String> + Send,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(MIN_RETRY, MAX_RETRY);
        loop {
            let installed = self.once().await.and_then(|credentials| {
                let now = SystemTime::now();
                let wait = credentials
                    .renew_at(now)
                    .duration_since(now)
                    .unwrap_or_default();
                let identity = credentials.identity.clone();
                issued(credentials).map_err(IssueError::Install)?;
                Ok((identity, wait))
            });
            let wait = match installed {
                Ok((identity, wait)) => {
                    backoff.reset();
                    let wait = jittered(wait);
                    tracing::info!(
                        identity = identity.as_str(),
                        renew_in_secs = wait.as_secs(),
                        "workload certificate issued"
                    );
                    wait.max(MIN_RETRY)
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        url = self.url.as_str(),
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "no workload certificate"
                    );
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }
}

/// `wait` less up to a tenth of it, from the clock's nanoseconds (no state, no
/// dependency: spreading renewals needs no good randomness).
fn jittered(wait: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    wait - wait / 10 * nanos / 1_000_000_000
}

/// `--identity-from-control-plane`: renews on a background service of its own and
/// installs each new set as the proxy's identity (`tls`, what both sides of mTLS
/// use from their next handshake on; established connections keep theirs).
pub struct RenewIdentity {
    pub renewal: Renewal,
    pub tls: Arc<Tls>,
}

#[async_trait::async_trait]
impl BackgroundService for RenewIdentity {
    async fn start(&self, shutdown: ShutdownWatch) {
        let tls = Arc::clone(&self.tls);
        self.renewal
            .clone()
            .run(
                move |c| {
                    // Checked already (Credentials::from_pem); this also checks
                    // the leaf chains to the roots the control plane named, and
                    // is valid now (a clock behind the control plane's is not).
                    tls.install(c.chain, c.key, c.roots)
                        .map(drop)
                        .map_err(|e| format!("the issued certificate does not install: {e}"))
                },
                shutdown,
            )
            .await;
    }
}
