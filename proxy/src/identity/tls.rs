//! The proxy's own workload identity as TLS configurations: what the inbound side
//! accepts mTLS with, and what the outbound side connects to meshed peers with.
//!
//! Both sides are TLS 1.3 only and verify the other: a client certificate is
//! required and must chain to the trust roots; a server certificate must chain to
//! them *and* name the workload identity expected for the destination (its URI
//! SAN). Names other than the SPIFFE ID mean nothing here: the peer is dialled by
//! address, so there is no DNS name to check, and SNI is not sent.
//!
//! Rotation: [`Tls::install`] swaps in configurations built from new credentials in
//! one step; connections already established keep the session they negotiated
//! (nothing is dropped), new ones use the new certificate. Outbound
//! configurations are built per expected identity on first use and cached (at
//! most [`MAX_DESTINATIONS`]) with the credentials they were built from, so each
//! keeps its own session-resumption cache: a pool's reconnects resume instead of
//! doing full handshakes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::PeerIdentity;

/// Outbound configurations kept, one per expected identity (a proxy talks to few;
/// past this the cache starts over rather than grow).
pub const MAX_DESTINATIONS: usize = 1024;

/// Why credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no trust roots")]
    NoRoots,
    #[error("trust root: {0}")]
    Root(rustls::Error),
    #[error("the certificate names no workload identity (a spiffe:// URI SAN)")]
    NoIdentity,
    #[error("the certificate cannot be read: {0}")]
    Certificate(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The live identity: `None` until credentials are installed.
#[derive(Default, Debug)]
pub struct Tls {
    current: ArcSwapOption<Active>,
}

impl Tls {
    /// Builds configurations from `chain` (leaf first), `key` and `roots`, checks
    /// the leaf chains to the roots, and makes them the current ones.
    pub fn install(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Active>, TlsError> {
        let active = Arc::new(Active::new(chain, key, roots)?);
        self.current.store(Some(Arc::clone(&active)));
        Ok(active)
    }

    pub fn current(&self) -> Option<Arc<Active>> {
        self.current.load_full()
    }
}

/// Configurations built from one set of credentials.
pub struct Active {
    /// Who this proxy is.
    pub identity: PeerIdentity,
    pub not_after: SystemTime,
    acceptor: TlsAcceptor,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    connectors: Mutex<HashMap<Arc<str>, TlsConnector>>,
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Active")
            .field("identity", &self.identity.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Active {
    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let mut store = RootCertStore::empty();
        for root in roots {
            store.add(root).map_err(TlsError::Root)?;
        }
        if store.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let roots = Arc::new(store);
        let leaf = chain.first().ok_or(TlsError::NoIdentity)?;
        let (identity, not_after) = read_leaf(leaf)?;
        // Our own certificate must be one our peers accept: caught here, at load,
        // not as every peer's handshake failure.
        let parsed = ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Active {
            identity,
            not_after,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            provider,
            roots,
            chain,
            key,
            connectors: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts an mTLS connection (the ClientHello not yet read); returns it with
    /// the client's verified identity: `None` when its certificate names none, or
    /// names one of another trust domain (a roots bundle may hold a federated
    /// domain's root; authorization rules name this domain's accounts only).
    ///
    /// A resumed session skips certificate verification, so the expiry of the
    /// certificate it was made with is checked here: an expired one is refused.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<(
        tokio_rustls::server::TlsStream<TcpStream>,
        Option<PeerIdentity>,
    )> {
        let tls = self.acceptor.accept(tcp).await?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| read_leaf(leaf).ok());
        let peer = match leaf {
            Some((_, not_after)) if not_after < SystemTime::now() => {
                return Err(std::io::Error::other(
                    "the client's certificate has expired (resumed session)",
                ))
            }
            Some((id, _)) => (id.trust_domain() == self.identity.trust_domain()).then_some(id),
            None => None,
        };
        Ok((tls, peer))
    }

    /// Connects TLS over `tcp` to a peer that must prove it is `expected`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        expected: &Arc<str>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let connector = self.connector(expected).map_err(std::io::Error::other)?;
        let addr = tcp.peer_addr()?;
        // An IP name: no SNI is sent, and the session cache is per address.
        connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
    }

    fn connector(&self, expected: &Arc<str>) -> Result<TlsConnector, TlsError> {
        let mut connectors = self
            .connectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = connectors.get(expected) {
            return Ok(c.clone());
        }
        if connectors.len() >= MAX_DESTINATIONS {
            connectors.clear();
        }
        let verifier = Arc::new(MeshVerifier {
            expected: Arc::clone(expected),
            roots: Arc::clone(&self.roots),
            provider: Arc::clone(&self.provider),
        });
        let config = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        let connector = TlsConnector::from(Arc::new(config));
        connectors.insert(Arc::clone(expected), connector.clone());
        Ok(connector)
    }
}

/// A leaf's workload identity and expiry.
pub fn read_leaf(der: &CertificateDer<'_>) -> Result<(PeerIdentity, SystemTime), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .ok_or(TlsError::NoIdentity)?;
    // Exactly one spiffe URI (an X.509-SVID has one); several would be ambiguous.
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
            Some(*uri)
        }
        _ => None,
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => PeerIdentity::parse(id)
            .map(|id| (id, not_after))
            .map_err(|_| TlsError::NoIdentity),
        _ => Err(TlsError::NoIdentity),
    }
}

/// Checks a server certificate chains to the roots and names `expected`.
#[derive(Debug)]
struct MeshVerifier {
    expected: Arc<str>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MeshVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match read_leaf(end_entity) {
            Ok((id, _)) if *id.id == *self.expected => Ok(ServerCertVerified::assertion()),
            Ok((id, _)) => Err(rustls::Error::General(format!(
                "the peer is {id}, not {}",
                self.expected
            ))),
            Err(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    struct Root {
        der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn new_root() -> Root {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Root {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf with `uris` as its URI SANs, valid from `from` to `to` (seconds
    /// from now).
    fn leaf(
        root: &Root,
        uris: &[&str],
        (from, to): (i64, i64),
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(to);
        let cert = params.signed_by(&key, &root.issuer).unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone()], key)
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

    #[test]
    fn installs_a_workload_certificate_and_reads_its_identity() {
        let root = new_root();
        let (chain, key) = leaf(&root, &[ID], (-60, 3600));
        let tls = Tls::default();
        let active = tls.install(chain, key, vec![root.der.clone()]).unwrap();
        assert_eq!(&*active.identity.id, ID);
        assert!(tls.current().is_some());
    }

    #[test]
    fn refuses_certificates_that_would_fail_every_peer_and_keeps_the_current_one() {
        let root = new_root();
        let other = new_root();
        let tls = Tls::default();
        let (chain, key) = leaf(&root, &[ID], (-60, 3600));
        tls.install(chain, key, vec![root.der.clone()]).unwrap();
        let cases = [
            ("expired", leaf(&root, &[ID], (-120, -60)), &root),
            ("no identity", leaf(&root, &[], (-60, 3600)), &root),
            (
                "two identities",
                leaf(&root, &[ID, "spiffe://x/ns/a/sa/b"], (-60, 3600)),
                &root,
            ),
            ("another root", leaf(&other, &[ID], (-60, 3600)), &root),
        ];
        for (why, (chain, key), trusted) in cases {
            assert!(
                tls.install(chain, key, vec![trusted.der.clone()]).is_err(),
                "{why}"
            );
        }
        assert_eq!(
            &*tls.current().unwrap().identity.id,
            ID,
            "the last good one stays"
        );
        // A key that is not the certificate's.
        let (chain, _) = leaf(&root, &[ID], (-60, 3600));
        let (_, key) = leaf(&root, &[ID], (-60, 3600));
        assert!(tls.install(chain, key, vec![root.der.clone()]).is_err());
    }

    #[test]
    fn the_outbound_check_accepts_only_the_expected_workload() {
        let root = new_root();
        let (chain, _) = leaf(&root, &[ID], (-60, 3600));
        let verifier = |expected: &str, roots: &Root| MeshVerifier {
            expected: Arc::from(expected),
            roots: Arc::new({
                let mut store = RootCertStore::empty();
                store.add(roots.der.clone()).unwrap();
                store
            }),
            provider: provider(),
        };
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let check =
            |v: MeshVerifier| v.verify_server_cert(&chain[0], &[], &name, &[], UnixTime::now());
        assert!(check(verifier(ID, &root)).is_ok());
        assert!(check(verifier("spiffe://cluster.local/ns/shop/sa/ratings", &root)).is_err());
        assert!(check(verifier(ID, &new_root())).is_err(), "another root");
    }
}
