//! The control plane as the mesh's certificate authority: proxies send a CSR
//! (`Identity.Certify`) and get a short-lived certificate for their workload
//! identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Why the control plane: it already knows who a proxy is (the projected
//! ServiceAccount token, checked with TokenReview, [`crate::auth`]), so the
//! identity a certificate carries is the one the Kubernetes API vouched for, with
//! no second enrolment protocol and no agent per node.
//!
//! Invariants:
//! - The identity comes from the authenticated caller alone. The CSR contributes
//!   its public key (after its self-signature is verified); its subject and SANs
//!   are ignored. The one exception is explicit: with `--static-token-identities`
//!   a caller holding the static `--token-file` token may name the identity in
//!   the CSR's URI SAN (tests and development outside Kubernetes, where nothing
//!   else names a workload).
//! - A caller with no workload (a loopback listener, the static token without
//!   that flag) gets no certificate.
//! - The configured CA signs leaves directly; the chain answered is the leaf,
//!   plus the CA certificate when it is an intermediate (not self-signed).
//! - Leaves: the URI SAN only (critical, the subject is empty), digitalSignature,
//!   serverAuth + clientAuth, cA false, a random 127-bit serial, valid from one
//!   minute ago (clock skew) for `--cert-ttl`.
//!
//! Rotation of the root is documented in `docs/mtls.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tonic::{Request, Response, Status};

use crate::api::identity_server::Identity as IdentityApi;
use crate::api::{CertifyRequest, CertifyResponse};
use crate::auth::{self, Authenticator, Via};
use crate::metrics::Metrics;

/// The trust domain of identities unless `--trust-domain` says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// How long a leaf is valid unless `--cert-ttl` says otherwise: a day, so a
/// rotated root reaches every proxy within one.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest and longest `--cert-ttl`.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(5 * 60);
pub const MAX_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far back a leaf's notBefore is set, for peers whose clocks run behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Largest CSR accepted (a P-256 CSR is about 500 bytes of PEM).
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// How long a root made by `sluice-cp ca init` is valid: ten years.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The `result` of a certificate request (`sluice_cp_certificate_requests_total`).
pub const CERTIFY_RESULTS: [&str; 4] = ["issued", "refused", "invalid", "error"];

/// `serve --ca-cert/--ca-key/...`: where the CA comes from and what it issues.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The roots proxies trust (PEM bundle); the CA certificate when absent.
    pub trust_roots: Option<PathBuf>,
    pub trust_domain: String,
    pub ttl: Duration,
    /// Static-token callers may name their identity in the CSR (tests, dev).
    pub static_token_identities: bool,
}

/// Why the CA cannot start; each names the file or flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("--ca-cert: {0}")]
    Certificate(String),
    #[error("--ca-key: {0} (a PKCS#8 PEM \"PRIVATE KEY\", as `sluice-cp ca init` writes)")]
    Key(String),
    #[error("--ca-key is not the key of --ca-cert")]
    KeyMismatch,
    #[error("--ca-cert is not a CA certificate (basicConstraints cA is not true)")]
    NotACa,
    #[error("--ca-cert is outside its validity period")]
    Expired,
    #[error("--trust-roots: {0}")]
    TrustRoots(String),
    #[error("--trust-domain {0:?}: lower-case letters, digits, '.', '-' and '_' only, not empty")]
    TrustDomain(String),
    #[error(
        "--cert-ttl {0:?} is outside 1s..720h (a day is the default; peers' trust follows it)"
    )]
    Ttl(Duration),
}

/// Why a CSR is refused (the caller's to fix: `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    #[error("the CSR does not parse as a PEM PKCS#10 request")]
    Unparsable,
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    #[error("the CSR's key is {0}: use ECDSA P-256 or P-384, or Ed25519")]
    UnsupportedKey(String),
    #[error("the CSR is refused: {0}")]
    Other(String),
}

/// A checked CSR: its public key, and the URI SANs it asks for (which only a
/// `--static-token-identities` caller's identity is taken from).
pub struct Csr {
    params: CertificateSigningRequestParams,
}

impl Csr {
    /// Parses the PEM and verifies the request's self-signature.
    pub fn parse(pem: &str) -> Result<Csr, CsrError> {
        if pem.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge);
        }
        let params = CertificateSigningRequestParams::from_pem(pem).map_err(|e| match e {
            rcgen::Error::CouldNotParseCertificationRequest => CsrError::Unparsable,
            rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
            rcgen::Error::UnsupportedSignatureAlgorithm => {
                CsrError::UnsupportedKey("of an unsupported algorithm".into())
            }
            other => CsrError::Other(other.to_string()),
        })?;
        let alg = params.public_key.algorithm();
        if ![
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ]
        .contains(&alg)
        {
            return Err(CsrError::UnsupportedKey(format!("{alg:?}")));
        }
        Ok(Csr { params })
    }

    /// The URI SANs the request names.
    pub fn uris(&self) -> Vec<&str> {
        self.params
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// What was issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, then the CA certificate when it is an intermediate.
    pub chain_pem: String,
    pub not_after: SystemTime,
    pub identity: String,
}

/// A loaded CA: signs leaves for identities of its trust domain.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Appended to every leaf: the CA certificate when it is an intermediate.
    chain_tail_pem: String,
    trust_roots_pem: String,
    trust_domain: String,
    ttl: Duration,
    /// The CA certificate's notAfter (Unix seconds), for the metric.
    ca_not_after: i64,
}

fn check_trust_domain(td: &str) -> Result<(), CaError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(CaError::TrustDomain(td.to_owned()))
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

impl Authority {
    /// A CA from PEM text: its certificate, its PKCS#8 key, and the roots proxies
    /// are to trust (the CA certificate when `None`; a bundle given must hold it or
    /// the root it chains to, which is the operator's to get right, and at least
    /// one certificate).
    pub fn from_pem(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        trust_roots_pem: Option<&str>,
        trust_domain: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Authority, CaError> {
        check_trust_domain(trust_domain)?;
        // The CLI keeps users to MIN_CERT_TTL and more (`parse_ttl`); built in
        // code, a CA may issue for seconds, so that tests can watch renewals.
        if !(Duration::from_secs(1)..=MAX_CERT_TTL).contains(&ttl) {
            return Err(CaError::Ttl(ttl));
        }
        let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        if !cert.is_ca() {
            return Err(CaError::NotACa);
        }
        let validity = cert.validity();
        let now_unix = unix(now);
        if now_unix < validity.not_before.timestamp() || now_unix > validity.not_after.timestamp() {
            return Err(CaError::Expired);
        }
        let key = KeyPair::from_pem(ca_key_pem).map_err(|e| CaError::Key(e.to_string()))?;
        if key.subject_public_key_info() != cert.tbs_certificate.subject_pki.raw {
            return Err(CaError::KeyMismatch);
        }
        let self_signed = cert.subject() == cert.issuer();
        let ca_not_after = validity.not_after.timestamp();
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        let trust_roots_pem = match trust_roots_pem {
            Some(bundle) => {
                let roots = CertificateDer::pem_slice_iter(bundle.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| CaError::TrustRoots(e.to_string()))?;
                if roots.is_empty() {
                    return Err(CaError::TrustRoots("no PEM CERTIFICATE in it".into()));
                }
                if self_signed && !roots.contains(&ca_der) {
                    return Err(CaError::TrustRoots(
                        "the bundle does not hold --ca-cert, so proxies would refuse the \
                         certificates it signs (keep the old and the new root in it while \
                         rotating)"
                            .into(),
                    ));
                }
                bundle.to_owned()
            }
            None if self_signed => ca_cert_pem.to_owned(),
            None => {
                return Err(CaError::TrustRoots(
                    "--ca-cert is an intermediate: name the root(s) it chains to".into(),
                ))
            }
        };
        Ok(Authority {
            issuer,
            chain_tail_pem: if self_signed {
                String::new()
            } else {
                pem_of(&ca_der)
            },
            trust_roots_pem,
            trust_domain: trust_domain.to_owned(),
            ttl,
            ca_not_after,
        })
    }

    /// Reads `config`'s files.
    pub fn load(config: &CaConfig) -> Result<Authority, CaError> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Read {
                flag,
                path: path.display().to_string(),
                source,
            })
        };
        let cert = read("--ca-cert", &config.cert)?;
        let key = read("--ca-key", &config.key)?;
        let roots = match &config.trust_roots {
            Some(path) => Some(read("--trust-roots", path)?),
            None => None,
        };
        Authority::from_pem(
            &cert,
            &key,
            roots.as_deref(),
            &config.trust_domain,
            config.ttl,
            SystemTime::now(),
        )
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn trust_roots_pem(&self) -> &str {
        &self.trust_roots_pem
    }

    /// The CA certificate's notAfter, Unix seconds.
    pub fn ca_not_after_unix(&self) -> i64 {
        self.ca_not_after
    }

    /// The SPIFFE ID of a workload of this trust domain.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        spiffe_id(&self.trust_domain, namespace, service_account)
    }

    /// Signs a leaf for `identity` with the CSR's public key, valid from
    /// `now - CLOCK_SKEW` to `now + ttl`.
    pub fn sign(&self, csr: &Csr, identity: &str, now: SystemTime) -> Result<Issued, String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .try_into()
                .map_err(|e: rcgen::Error| e.to_string())?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = (now - CLOCK_SKEW).into();
        let not_after = now + self.ttl;
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&csr.params.public_key, &self.issuer)
            .map_err(|e| e.to_string())?;
        // Whole seconds: what the certificate says.
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(unix(not_after).max(0) as u64);
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.chain_tail_pem),
            not_after,
            identity: identity.to_owned(),
        })
    }
}

/// `--cert-ttl`: a duration (`24h`, `90m`) within [`MIN_CERT_TTL`]..=[`MAX_CERT_TTL`].
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = sluice_policy::duration::parse(text)
        .ok_or_else(|| format!("expected a duration such as 24h, got {text:?}"))?;
    if (MIN_CERT_TTL..=MAX_CERT_TTL).contains(&ttl) {
        Ok(ttl)
    } else {
        Err(format!("{text} is outside 5m..720h"))
    }
}

/// `--trust-domain`: lower-case letters, digits, '.', '-' and '_'.
pub fn parse_trust_domain(text: &str) -> Result<String, String> {
    check_trust_domain(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.to_string())
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// 16 random bytes, positive and of fixed length (RFC 5280: at most 20 octets,
/// CA/B: at least 64 bits of randomness).
fn random_serial() -> Result<SerialNumber, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness for a serial number".to_owned())?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Whether `id` is a workload identity of `trust_domain`, by the rule policies
/// and proxies use ([`sluice_policy::identity`]).
fn is_workload_identity(id: &str, trust_domain: &str) -> bool {
    sluice_policy::identity::is_valid(id)
        && sluice_policy::identity::parse(id).is_some_and(|p| p.trust_domain == trust_domain)
}

/// The identity a caller's certificate is for, or why it gets none.
pub fn identity_for(
    caller: &auth::Identity,
    csr: &Csr,
    trust_domain: &str,
    static_token_identities: bool,
) -> Result<String, Status> {
    match caller.via {
        Via::TokenReview => Ok(spiffe_id(
            trust_domain,
            &caller.namespace,
            &caller.service_account,
        )),
        Via::StaticToken if static_token_identities => match csr.uris().as_slice() {
            [one] if is_workload_identity(one, trust_domain) => Ok((*one).to_owned()),
            _ => Err(Status::invalid_argument(format!(
                "with --static-token-identities the CSR names the identity: exactly one URI \
                 SAN spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>"
            ))),
        },
        Via::StaticToken => Err(Status::permission_denied(
            "the static token names no workload, so it gets no certificate: present the pod's \
             projected ServiceAccount token (--token-review), or start the control plane with \
             --static-token-identities (tests and development only)",
        )),
        Via::Loopback => Err(Status::permission_denied(
            "an unauthenticated (loopback) caller names no workload, so it gets no certificate: \
             present a ServiceAccount token to a control plane with --token-review, or the \
             static token to one with --token-file and --static-token-identities",
        )),
    }
}

/// `Identity.Certify`.
pub struct IdentityService {
    /// `None` when the control plane was started without `--ca-cert`.
    pub authority: Option<Arc<Authority>>,
    pub auth: Arc<Authenticator>,
    pub static_token_identities: bool,
    pub metrics: Metrics,
}

impl IdentityService {
    async fn certify_inner(&self, request: Request<CertifyRequest>) -> Result<Issued, Status> {
        let Some(authority) = &self.authority else {
            self.metrics.certified("error");
            return Err(Status::failed_precondition(
                "this control plane is not a certificate authority: start it with --ca-cert and \
                 --ca-key",
            ));
        };
        let caller = match self.auth.authenticate(request.metadata()).await {
            Ok(caller) => caller,
            Err(status) => {
                self.metrics.certified("refused");
                return Err(status);
            }
        };
        let csr = match Csr::parse(&request.get_ref().csr_pem) {
            Ok(csr) => csr,
            Err(e) => {
                self.metrics.certified("invalid");
                return Err(Status::invalid_argument(e.to_string()));
            }
        };
        let identity = match identity_for(
            &caller,
            &csr,
            authority.trust_domain(),
            self.static_token_identities,
        ) {
            Ok(identity) => identity,
            Err(status) => {
                let result = if status.code() == tonic::Code::InvalidArgument {
                    "invalid"
                } else {
                    "refused"
                };
                self.metrics.certified(result);
                return Err(status);
            }
        };
        match authority.sign(&csr, &identity, SystemTime::now()) {
            Ok(issued) => {
                self.metrics.certified("issued");
                tracing::info!(
                    identity = identity.as_str(),
                    pod = caller.pod.as_deref().unwrap_or(""),
                    authenticated_by = caller.via.as_str(),
                    "certificate issued"
                );
                Ok(issued)
            }
            Err(why) => {
                self.metrics.certified("error");
                tracing::error!(
                    identity = identity.as_str(),
                    error = why.as_str(),
                    "cannot sign"
                );
                Err(Status::internal(format!(
                    "cannot sign the certificate: {why}"
                )))
            }
        }
    }
}

#[tonic::async_trait]
impl IdentityApi for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let issued = self.certify_inner(request).await?;
        let trust_roots_pem = self
            .authority
            .as_ref()
            .map(|a| a.trust_roots_pem().to_owned())
            .unwrap_or_default();
        Ok(Response::new(CertifyResponse {
            cert_chain_pem: issued.chain_pem,
            trust_roots_pem,
            not_after_unix: unix(issued.not_after),
            identity: issued.identity,
        }))
    }
}

/// A new root CA (ECDSA P-256, valid [`ROOT_VALIDITY`]): its certificate and its
/// PKCS#8 key, as PEM. `sluice-cp ca init` writes them for the CA Secret.
pub fn generate_root(trust_domain: &str, now: SystemTime) -> Result<(String, String), CaError> {
    check_trust_domain(trust_domain)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sluice");
    dn.push(
        DnType::CommonName,
        format!("Sluice root CA for {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial().map_err(CaError::Certificate)?);
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Certificate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `sluice-cp ca init --out-dir DIR`: writes `ca.crt` and `ca.key` (mode 0600),
/// refusing to overwrite either.
pub fn init(out_dir: &Path, trust_domain: &str) -> anyhow::Result<()> {
    let (cert, key) = generate_root(trust_domain, SystemTime::now())?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| anyhow::anyhow!("--out-dir {}: {e}", out_dir.display()))?;
    let (cert_path, key_path) = (out_dir.join("ca.crt"), out_dir.join("ca.key"));
    for path in [&cert_path, &key_path] {
        anyhow::ensure!(
            !path.exists(),
            "{} exists: a CA is not replaced by accident (remove it, or see docs/mtls.md on \
             rotation)",
            path.display()
        );
    }
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
        file.write_all(key.as_bytes())?;
    }
    std::fs::write(&cert_path, cert)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?;
    Ok(())
}

#[cfg(test)]
#[path = "ca/tests.rs"]
mod tests;
