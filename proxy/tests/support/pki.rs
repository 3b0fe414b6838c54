//! Certificates for the mTLS tests: a root, and workload certificates it signs
//! (`spiffe://cluster.local/ns/NS/sa/SA` URI SANs), written as the files the
//! proxy's `--identity-cert`, `--identity-key` and `--trust-roots` read.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::support::TempDir;

/// A root of trust.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("root key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("root");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A workload certificate for `spiffe://cluster.local/ns/{ns}/sa/{sa}`, valid
    /// from a minute ago for `life`: (chain PEM, key PEM).
    pub fn workload(&self, ns: &str, sa: &str, life: Duration) -> (String, String) {
        self.workload_in("cluster.local", ns, sa, life)
    }

    /// Like [`Ca::workload`], in trust domain `domain`.
    pub fn workload_in(
        &self,
        domain: &str,
        ns: &str,
        sa: &str,
        life: Duration,
    ) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        let id = format!("spiffe://{domain}/ns/{ns}/sa/{sa}");
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().expect("uri"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + life;
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a workload's files into `dir` (replacing them atomically, as a
    /// renewal would) and returns the proxy's flags for them.
    pub fn write_identity(&self, dir: &TempDir, ns: &str, sa: &str, life: Duration) -> Vec<String> {
        let (cert, key) = self.workload(ns, sa, life);
        let write = |name: &str, contents: &str| -> PathBuf {
            let tmp = dir.path().join(format!(".{name}.tmp"));
            std::fs::write(&tmp, contents).expect("write");
            let path = dir.path().join(name);
            std::fs::rename(&tmp, &path).expect("rename");
            path
        };
        // Key first: the proxy reloads when any file changes, and a new
        // certificate with the old key would not load (it retries next change).
        let key = write(&format!("{sa}.key"), &key);
        let cert = write(&format!("{sa}.crt"), &cert);
        let roots = write("roots.pem", &self.pem);
        vec![
            "--identity-cert".into(),
            cert.display().to_string(),
            "--identity-key".into(),
            key.display().to_string(),
            "--trust-roots".into(),
            roots.display().to_string(),
        ]
    }
}
