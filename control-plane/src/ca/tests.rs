use super::*;

use rustls::pki_types::UnixTime;
use rustls::RootCertStore;

const TD: &str = "cluster.local";

fn now() -> SystemTime {
    SystemTime::now()
}

fn authority() -> (Authority, String) {
    let (cert, key) = generate_root(TD, now()).unwrap();
    let a = Authority::from_pem(&cert, &key, None, TD, DEFAULT_CERT_TTL, now()).unwrap();
    (a, cert)
}

/// A CSR for a fresh key, naming `uris` (what a proxy would never be trusted on).
fn csr(uris: &[&str]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn reviewed(ns: &str, sa: &str) -> auth::Identity {
    auth::Identity {
        namespace: ns.into(),
        service_account: sa.into(),
        pod: Some("p".into()),
        via: Via::TokenReview,
    }
}

fn anonymous(via: Via) -> auth::Identity {
    auth::Identity {
        namespace: String::new(),
        service_account: String::new(),
        pod: None,
        via,
    }
}

fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn uris_of(der: &CertificateDer<'_>) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
            other => format!("not a URI: {other:?}"),
        })
        .collect()
}

fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap())
}

/// Verifies `chain` against `root` for both client and server use, at `at`.
fn verify(chain: &[CertificateDer<'static>], root: &str, at: SystemTime) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    for r in ders(root) {
        roots.add(r).unwrap();
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    client
        .verify_client_cert(&chain[0], &chain[1..], unix_time(at))
        .map_err(|e| format!("as a client: {e}"))?;
    let parsed = rustls::server::ParsedCertificate::try_from(&chain[0]).unwrap();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        unix_time(at),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("as a server: {e}"))
}

#[test]
fn issued_certificate_chains_to_the_root_for_client_and_server_use() {
    let (a, root) = authority();
    let csr = Csr::parse(&csr(&[])).unwrap();
    let issued = a
        .sign(&csr, "spiffe://cluster.local/ns/shop/sa/reviews", now())
        .unwrap();
    let chain = ders(&issued.chain_pem);
    assert_eq!(chain.len(), 1, "a root signs directly: the leaf alone");
    verify(&chain, &root, now()).unwrap();
    assert_eq!(a.trust_roots_pem(), root);
}

#[test]
fn carries_exactly_the_spiffe_uri_and_leaf_extensions() {
    let (a, _) = authority();
    let issued = a
        .sign(
            &Csr::parse(&csr(&[])).unwrap(),
            "spiffe://cluster.local/ns/shop/sa/reviews",
            now(),
        )
        .unwrap();
    let der = &ders(&issued.chain_pem)[0];
    assert_eq!(
        uris_of(der),
        vec!["spiffe://cluster.local/ns/shop/sa/reviews"]
    );
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(!cert.is_ca());
    assert!(cert.subject().iter().next().is_none(), "empty subject");
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(
        san.critical,
        "the SAN is critical when the subject is empty"
    );
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
}

#[test]
fn the_identity_is_the_callers_even_when_the_csr_names_another() {
    let (a, _) = authority();
    let csr = Csr::parse(&csr(&["spiffe://cluster.local/ns/kube-system/sa/admin"])).unwrap();
    let id = identity_for(&reviewed("shop", "reviews"), &csr, TD, true).unwrap();
    assert_eq!(id, "spiffe://cluster.local/ns/shop/sa/reviews");
    let issued = a.sign(&csr, &id, now()).unwrap();
    assert_eq!(
        uris_of(&ders(&issued.chain_pem)[0]),
        vec!["spiffe://cluster.local/ns/shop/sa/reviews"]
    );
}

#[test]
fn callers_without_a_workload_get_no_certificate() {
    let csr = Csr::parse(&csr(&["spiffe://cluster.local/ns/shop/sa/reviews"])).unwrap();
    for (caller, opt_in) in [
        (anonymous(Via::Loopback), false),
        (anonymous(Via::Loopback), true),
        (anonymous(Via::StaticToken), false),
    ] {
        let status = identity_for(&caller, &csr, TD, opt_in).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{caller:?}");
        assert!(status.message().contains("no certificate"), "{status:?}");
    }
}

#[test]
fn static_token_callers_name_their_identity_only_when_opted_in_and_in_our_trust_domain() {
    let static_caller = anonymous(Via::StaticToken);
    let named = Csr::parse(&csr(&["spiffe://cluster.local/ns/shop/sa/reviews"])).unwrap();
    assert_eq!(
        identity_for(&static_caller, &named, TD, true).unwrap(),
        "spiffe://cluster.local/ns/shop/sa/reviews"
    );
    for uris in [
        &[][..],
        &["spiffe://other.domain/ns/shop/sa/reviews"],
        &["spiffe://cluster.local/ns/shop"],
        &["spiffe://cluster.local/ns/shop/sa/reviews/x"],
        &[
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/c/sa/d",
        ],
    ] {
        let status =
            identity_for(&static_caller, &Csr::parse(&csr(uris)).unwrap(), TD, true).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{uris:?}");
    }
}

#[test]
fn a_csr_whose_signature_does_not_verify_is_refused() {
    let pem = csr(&[]);
    let mut der = CertificateSigningRequestDerOwned::from_pem(&pem);
    // The signature is the DER's last bytes: flip one of them.
    let last = der.len() - 2;
    der[last] ^= 0x01;
    let forged = CertificateSigningRequestDerOwned::to_pem(&der);
    assert_eq!(Csr::parse(&forged).err(), Some(CsrError::BadSignature));
    assert_eq!(Csr::parse("hello").err(), Some(CsrError::Unparsable));
    assert_eq!(
        Csr::parse(&"x".repeat(MAX_CSR_BYTES + 1)).err(),
        Some(CsrError::TooLarge)
    );
}

/// The DER of a PEM CSR and back (just enough for the forgery test).
struct CertificateSigningRequestDerOwned;

impl CertificateSigningRequestDerOwned {
    fn from_pem(pem: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateSigningRequestDer;
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn to_pem(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
    }
}

#[test]
fn accepts_p384_keys_too() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p384 = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    assert!(Csr::parse(&p384).is_ok(), "P-384 is fine");
}

#[test]
fn the_certificate_lives_for_the_ttl_from_a_minute_ago() {
    let (cert, key) = generate_root(TD, now()).unwrap();
    let ttl = Duration::from_secs(3600);
    let a = Authority::from_pem(&cert, &key, None, TD, ttl, now()).unwrap();
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(unix(now()) as u64);
    let issued = a
        .sign(
            &Csr::parse(&csr(&[])).unwrap(),
            "spiffe://cluster.local/ns/a/sa/b",
            at,
        )
        .unwrap();
    assert_eq!(issued.not_after, at + ttl);
    let der = &ders(&issued.chain_pem)[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(der).unwrap();
    assert_eq!(
        parsed.validity().not_before.timestamp(),
        unix(at - CLOCK_SKEW)
    );
    assert_eq!(parsed.validity().not_after.timestamp(), unix(at + ttl));
    let chain = ders(&issued.chain_pem);
    verify(&chain, &cert, at + ttl - Duration::from_secs(1)).unwrap();
    verify(&chain, &cert, at - Duration::from_secs(30)).unwrap();
    assert!(verify(&chain, &cert, at + ttl + Duration::from_secs(1)).is_err());
    assert!(verify(&chain, &cert, at - CLOCK_SKEW - Duration::from_secs(1)).is_err());
}

#[test]
fn serials_differ_between_certificates() {
    let (a, _) = authority();
    let csr = Csr::parse(&csr(&[])).unwrap();
    let serial = |_| {
        let issued = a
            .sign(&csr, "spiffe://cluster.local/ns/a/sa/b", now())
            .unwrap();
        let der = ders(&issued.chain_pem).remove(0);
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        c.raw_serial().to_vec()
    };
    let (one, two) = (serial(1), serial(2));
    assert_ne!(one, two);
    assert_eq!(one.len(), 16);
}

#[test]
fn refuses_a_key_of_another_certificate_a_leaf_and_a_bundle_without_the_ca() {
    let (cert, key) = generate_root(TD, now()).unwrap();
    let (other_cert, other_key) = generate_root(TD, now()).unwrap();
    let load = |c: &str, k: &str, roots: Option<&str>| {
        Authority::from_pem(c, k, roots, TD, DEFAULT_CERT_TTL, now()).err()
    };
    assert!(matches!(
        load(&cert, &other_key, None),
        Some(CaError::KeyMismatch)
    ));
    assert!(matches!(
        load(&cert, &key, Some(&other_cert)),
        Some(CaError::TrustRoots(_))
    ));
    // During a rotation the bundle holds both roots.
    assert!(load(&cert, &key, Some(&format!("{other_cert}{cert}"))).is_none());
    let (a, _) = authority();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::default()
        .signed_by(&leaf_key, &a.issuer)
        .unwrap()
        .pem();
    assert!(matches!(
        load(&leaf, &leaf_key.serialize_pem(), None),
        Some(CaError::NotACa)
    ));
    assert!(matches!(
        Authority::from_pem(&cert, &key, None, "Cluster.Local", DEFAULT_CERT_TTL, now()),
        Err(CaError::TrustDomain(_))
    ));
    assert!(matches!(
        Authority::from_pem(&cert, &key, None, TD, Duration::from_millis(999), now()),
        Err(CaError::Ttl(_))
    ));
    assert!(matches!(
        Authority::from_pem(
            &cert,
            &key,
            None,
            TD,
            DEFAULT_CERT_TTL,
            now() + ROOT_VALIDITY * 2
        ),
        Err(CaError::Expired)
    ));
}

#[test]
fn an_intermediate_ca_is_sent_with_the_leaf_and_chains_to_its_root() {
    let (root_cert, root_key) = generate_root(TD, now()).unwrap();
    let root = Issuer::from_ca_cert_pem(&root_cert, KeyPair::from_pem(&root_key).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let inter = params.signed_by(&key, &root).unwrap().pem();
    assert!(matches!(
        Authority::from_pem(
            &inter,
            &key.serialize_pem(),
            None,
            TD,
            DEFAULT_CERT_TTL,
            now()
        ),
        Err(CaError::TrustRoots(_))
    ));
    let a = Authority::from_pem(
        &inter,
        &key.serialize_pem(),
        Some(&root_cert),
        TD,
        DEFAULT_CERT_TTL,
        now(),
    )
    .unwrap();
    let issued = a
        .sign(
            &Csr::parse(&csr(&[])).unwrap(),
            "spiffe://cluster.local/ns/a/sa/b",
            now(),
        )
        .unwrap();
    let chain = ders(&issued.chain_pem);
    assert_eq!(chain.len(), 2);
    verify(&chain, &root_cert, now()).unwrap();
}

#[test]
fn init_writes_a_root_once_and_never_over_an_existing_one() {
    let dir = std::env::temp_dir().join(format!("sluice-ca-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    init(&dir, TD).unwrap();
    let cert = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    let key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
    Authority::from_pem(&cert, &key, None, TD, DEFAULT_CERT_TTL, now()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(init(&dir, TD).unwrap_err().to_string().contains("exists"));
    assert_eq!(std::fs::read_to_string(dir.join("ca.crt")).unwrap(), cert);
    let _ = std::fs::remove_dir_all(&dir);
}
