//! A proxy's own workload credentials: its certificate chain, the private key, the
//! trust roots peers' certificates must chain to, and what the leaf says (its
//! SPIFFE ID and expiry).
//!
//! Two sources make them: files (`--identity-cert`, `--identity-key`,
//! `--trust-roots`) and the control plane's CA ([`super::issuer`]); both go
//! through [`Credentials::from_pem`], so whatever the source, a `Credentials`
//! holds a key that matches its leaf and a leaf with exactly one SPIFFE URI SAN
//! (the X.509-SVID rule), and never an empty chain or empty roots.

use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::PeerIdentity;

/// A workload's certificate, key and trust roots, checked for consistency.
#[derive(Debug)]
pub struct Credentials {
    /// The leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The roots a peer's chain must end in (several while a root rotates).
    pub roots: Vec<CertificateDer<'static>>,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// The leaf's SPIFFE ID (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    pub identity: String,
}

/// Why PEM text does not make credentials; each names the part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("the certificate chain holds no PEM CERTIFICATE")]
    NoCertificate,
    #[error("the certificate chain: {0}")]
    BadCertificate(String),
    #[error("the private key: {0}")]
    BadKey(String),
    #[error("the private key does not belong to the leaf certificate")]
    KeyMismatch,
    #[error("the trust roots hold no PEM CERTIFICATE")]
    NoRoots,
    #[error("the trust roots: {0}")]
    BadRoots(String),
    #[error(
        "the leaf certificate must name exactly one workload identity \
         (URI SAN spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>), it names {0}"
    )]
    Identity(String),
}

fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// The leaf's notAfter and its one SPIFFE URI SAN (the reader mTLS uses for
/// peers' certificates, so both agree).
fn read_leaf(leaf: &CertificateDer<'_>) -> Result<(SystemTime, String), CredentialsError> {
    match super::tls::read_leaf(leaf) {
        Ok((identity, not_after)) => Ok((not_after, identity.id.to_string())),
        Err(super::tls::TlsError::NoIdentity) => {
            Err(CredentialsError::Identity("none or several".into()))
        }
        Err(e) => Err(CredentialsError::BadCertificate(format!("the leaf: {e}"))),
    }
}

impl Credentials {
    /// Parses and checks PEM: the chain (leaf first), its private key (PKCS#8,
    /// SEC1 or PKCS#1) and the trust roots.
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        roots_pem: &str,
    ) -> Result<Credentials, CredentialsError> {
        let chain = certificates(chain_pem).map_err(CredentialsError::BadCertificate)?;
        let leaf = chain.first().ok_or(CredentialsError::NoCertificate)?;
        let (not_after, identity) = read_leaf(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CredentialsError::BadKey(e.to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| CredentialsError::BadKey(e.to_string()))?;
        match rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(CredentialsError::KeyMismatch)
            }
            // A key whose public half rustls cannot derive is checked at the
            // first handshake instead.
            Err(rustls::Error::InconsistentKeys(_)) => {}
            Err(e) => return Err(CredentialsError::BadCertificate(e.to_string())),
        }
        let roots = certificates(roots_pem).map_err(CredentialsError::BadRoots)?;
        if roots.is_empty() {
            return Err(CredentialsError::NoRoots);
        }
        for (i, root) in roots.iter().enumerate() {
            x509_parser::parse_x509_certificate(root)
                .map_err(|e| CredentialsError::BadRoots(format!("certificate {}: {e}", i + 1)))?;
        }
        Ok(Credentials {
            chain,
            key,
            roots,
            not_after,
            identity,
        })
    }

    /// The identity, parsed (it always parses: [`Credentials::from_pem`] checked it).
    pub fn peer_identity(&self) -> PeerIdentity {
        PeerIdentity::parse(&self.identity).expect("checked by from_pem")
    }

    /// When to ask for the next certificate: half-way from `now` to expiry (a
    /// day's certificate is renewed after 12 hours, leaving as long again for
    /// retries while the control plane is away), at once when it has expired.
    pub fn renew_at(&self, now: SystemTime) -> SystemTime {
        match self.not_after.duration_since(now) {
            Ok(left) => now + left / 2,
            Err(_) => now,
        }
    }
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            not_after: self.not_after,
            identity: self.identity.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, SanType,
    };
    use std::time::Duration;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(ca: &Ca, uris: &[&str]) -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap();
        (params.signed_by(&key, &ca.issuer).unwrap().pem(), key)
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

    #[test]
    fn reads_identity_and_expiry_of_the_leaf() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &[ID]);
        let c = Credentials::from_pem(&cert, &key.serialize_pem(), &ca.pem).unwrap();
        assert_eq!(c.identity, ID);
        assert_eq!(c.peer_identity().service_account(), "reviews");
        assert_eq!(
            c.not_after,
            SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)
        );
        assert_eq!((c.chain.len(), c.roots.len()), (1, 1));
    }

    #[test]
    fn refuses_a_key_of_another_certificate() {
        let ca = ca();
        let (cert, _) = leaf(&ca, &[ID]);
        let other = KeyPair::generate().unwrap();
        assert_eq!(
            Credentials::from_pem(&cert, &other.serialize_pem(), &ca.pem).unwrap_err(),
            CredentialsError::KeyMismatch
        );
    }

    #[test]
    fn refuses_leaves_without_exactly_one_workload_identity() {
        let ca = ca();
        for uris in [
            &[][..],
            &[ID, "spiffe://cluster.local/ns/a/sa/b"],
            &["https://x/y"],
        ] {
            let (cert, key) = leaf(&ca, uris);
            assert!(
                matches!(
                    Credentials::from_pem(&cert, &key.serialize_pem(), &ca.pem),
                    Err(CredentialsError::Identity(_))
                ),
                "{uris:?}"
            );
        }
    }

    #[test]
    fn refuses_empty_chain_key_or_roots() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &[ID]);
        let key = key.serialize_pem();
        assert_eq!(
            Credentials::from_pem("", &key, &ca.pem).unwrap_err(),
            CredentialsError::NoCertificate
        );
        assert!(matches!(
            Credentials::from_pem(&cert, "", &ca.pem),
            Err(CredentialsError::BadKey(_))
        ));
        assert_eq!(
            Credentials::from_pem(&cert, &key, "").unwrap_err(),
            CredentialsError::NoRoots
        );
    }

    #[test]
    fn renews_at_half_the_remaining_life() {
        let ca = ca();
        let (cert, key) = leaf(&ca, &[ID]);
        let c = Credentials::from_pem(&cert, &key.serialize_pem(), &ca.pem).unwrap();
        let now = c.not_after - Duration::from_secs(24 * 3600);
        assert_eq!(c.renew_at(now), now + Duration::from_secs(12 * 3600));
        assert_eq!(
            c.renew_at(c.not_after + Duration::from_secs(1)),
            c.not_after + Duration::from_secs(1)
        );
    }
}
