//! A workload identity from files (`--identity-cert`, `--identity-key`,
//! `--trust-roots`): outside Kubernetes, or with certificates another tool issues
//! (cert-manager's CSI driver, SPIRE's helper). The files are read at start and
//! again whenever one of them changes, so a renewed certificate is used without a
//! restart; a set that does not load (a half-written renewal, a key that does not
//! match) is reported and the current identity kept.

use std::path::PathBuf;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::tls::{Active, Tls};

/// Where the identity's files are.
#[derive(Debug, Clone)]
pub struct Files {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The trust roots peers' certificates must chain to (PEM, one or several:
    /// during a root rotation, the old and the new).
    pub roots: PathBuf,
}

/// The files' modification times: what [`Files::reload_if_changed`] compares.
pub type Stamp = [Option<SystemTime>; 3];

impl Files {
    pub fn stamp(&self) -> Stamp {
        [&self.cert, &self.key, &self.roots]
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }

    /// Reads the three files and installs them as `tls`'s identity.
    pub fn load(&self, tls: &Tls) -> Result<std::sync::Arc<Active>, String> {
        let named = |path: &PathBuf, e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect())
            .map_err(|e| named(&self.cert, &e))?;
        if chain.is_empty() {
            return Err(named(&self.cert, &"no certificate"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| named(&self.key, &e))?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.roots)
            .and_then(|certs| certs.collect())
            .map_err(|e| named(&self.roots, &e))?;
        tls.install(chain, key, roots)
            .map_err(|e| named(&self.cert, &e))
    }

    /// Reloads when a file changed since `seen` (which is updated); `None` when
    /// nothing changed.
    pub fn reload_if_changed(
        &self,
        tls: &Tls,
        seen: &mut Stamp,
    ) -> Option<Result<std::sync::Arc<Active>, String>> {
        let now = self.stamp();
        if now == *seen {
            return None;
        }
        *seen = now;
        Some(self.load(tls))
    }
}
