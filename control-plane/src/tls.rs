//! Serving certificates that follow their files: loaded at start (a pair that does
//! not load stops the start), then read again on every check; a changed pair that
//! loads serves the next handshakes, one that does not (unreadable, not PEM, a key
//! of another certificate, e.g. caught between the two files' updates) is
//! reported and the previous pair keeps serving. cert-manager and Kubernetes Secret
//! volumes replace the files in place before the old certificate expires.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the certificate and key files are checked for a new pair.
pub const CERT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A certificate or key that cannot be used, and which file it came from.
#[derive(Debug, thiserror::Error)]
#[error("cannot load TLS {what} from {path}: {message}")]
pub struct CertificateError {
    pub what: &'static str,
    pub path: String,
    pub message: String,
}

/// The serving certificate and key, as last loaded from their files.
#[derive(Debug)]
pub struct CertificateFiles {
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    /// What handshakes get.
    current: std::sync::RwLock<Arc<CertifiedKey>>,
    /// The files' bytes at the last check, loaded or not: a change is acted on (and
    /// a bad pair reported) once.
    seen: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

/// What a check of the certificate files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateCheck {
    Unchanged,
    Reloaded,
    /// A changed pair that does not load: the previous one keeps serving.
    Kept(String),
}

impl CertificateFiles {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertificateError> {
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let key = certified_key(cert_path, key_path, &cert_pem, &key_pem)?;
        Ok(CertificateFiles {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: std::sync::RwLock::new(Arc::new(key)),
            seen: std::sync::Mutex::new((cert_pem, key_pem)),
        })
    }

    /// Reads the files again and serves a changed pair that loads.
    pub fn check(&self) -> CertificateCheck {
        let (cert_pem, key_pem) = match read_pair(&self.cert_path, &self.key_path) {
            Ok(pair) => pair,
            // Unreadable now (e.g. mid-rotation): looked at again next time.
            Err(e) => return CertificateCheck::Kept(e.to_string()),
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.0 == cert_pem && seen.1 == key_pem {
            return CertificateCheck::Unchanged;
        }
        let loaded = certified_key(&self.cert_path, &self.key_path, &cert_pem, &key_pem);
        *seen = (cert_pem, key_pem);
        match loaded {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                CertificateCheck::Reloaded
            }
            Err(e) => CertificateCheck::Kept(e.to_string()),
        }
    }
}

impl CertificateFiles {
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), CertificateError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|e| CertificateError {
            what,
            path: path.display().to_string(),
            message: e.to_string(),
        })
    };
    Ok((read("certificate", cert_path)?, read("key", key_path)?))
}

/// The certificate chain and key from their PEM bytes, checked to belong together.
fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, CertificateError> {
    let tls_err = |what, path: &Path, message: String| CertificateError {
        what,
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err("certificate", cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(tls_err(
            "certificate",
            cert_path,
            "no certificate in it".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| tls_err("key", key_path, e.to_string()))?;
    CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| tls_err("certificate and key", cert_path, e.to_string()))
}

/// A rustls server configuration whose certificate comes from `files`, offering
/// one application protocol (ALPN).
pub fn server_config(
    files: Arc<CertificateFiles>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, CertificateError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let path = files.cert_path().display().to_string();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CertificateError {
            what: "configuration",
            path,
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(files);
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::{CertificateCheck, CertificateFiles};

    /// A bad pair (a key of another certificate, garbage) is reported and not
    /// taken; a good one is, once; unchanged files are not reloaded.
    #[test]
    fn certificate_checks_take_only_a_good_new_pair() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        let first = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let second = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        std::fs::write(&cert_path, first.cert.pem()).expect("write");
        std::fs::write(&key_path, first.signing_key.serialize_pem()).expect("write");
        let files = CertificateFiles::load(&cert_path, &key_path).expect("loads");
        let served = |files: &CertificateFiles| {
            files.current.read().expect("lock").cert[0]
                .as_ref()
                .to_vec()
        };
        assert_eq!(files.check(), CertificateCheck::Unchanged);
        // The new certificate before its key: they do not match, the old pair stays.
        std::fs::write(&cert_path, second.cert.pem()).expect("write");
        assert!(
            matches!(files.check(), CertificateCheck::Kept(ref why) if why.contains("certificate and key")),
            "a mismatched pair is refused"
        );
        assert_eq!(served(&files), first.cert.der().as_ref());
        std::fs::write(&key_path, second.signing_key.serialize_pem()).expect("write");
        assert_eq!(files.check(), CertificateCheck::Reloaded);
        assert_eq!(served(&files), second.cert.der().as_ref());
        assert_eq!(files.check(), CertificateCheck::Unchanged);
        std::fs::write(&cert_path, "not a certificate").expect("write");
        assert!(matches!(files.check(), CertificateCheck::Kept(_)));
        assert_eq!(served(&files), second.cert.der().as_ref());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
