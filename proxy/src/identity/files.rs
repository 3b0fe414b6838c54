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

/// The files' modification times and lengths: what [`Files::reload_if_changed`]
/// compares (a rewrite within one mtime tick usually changes a length).
pub type Stamp = [Option<(SystemTime, u64)>; 3];

/// What the reloads have seen: the files as last loaded, and as last refused.
#[derive(Debug, Default)]
pub struct Seen {
    loaded: Stamp,
    refused: Option<Stamp>,
}

impl Seen {
    /// The files as loaded at start.
    pub fn loaded(stamp: Stamp) -> Self {
        Seen {
            loaded: stamp,
            refused: None,
        }
    }
}

/// What a reload check did.
pub enum Reload {
    /// The files are as loaded last.
    Unchanged,
    Loaded(std::sync::Arc<Active>),
    /// They changed and do not load; `first`: this is news (the same files are
    /// tried again at every check, but reported once).
    Refused {
        error: String,
        first: bool,
    },
}

impl Files {
    pub fn stamp(&self) -> Stamp {
        [&self.cert, &self.key, &self.roots].map(|p| {
            std::fs::metadata(p)
                .and_then(|m| Ok((m.modified()?, m.len())))
                .ok()
        })
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

    /// Reloads when a file changed since it last loaded. A set that does not
    /// load is tried again at every check until it does (a certificate whose
    /// notBefore is a moment ahead of this clock loads a moment later; a renewal
    /// written in several steps loads once complete).
    pub fn reload_if_changed(&self, tls: &Tls, seen: &mut Seen) -> Reload {
        let now = self.stamp();
        if now == seen.loaded {
            return Reload::Unchanged;
        }
        match self.load(tls) {
            Ok(active) => {
                *seen = Seen::loaded(now);
                Reload::Loaded(active)
            }
            Err(error) => {
                let first = seen.refused != Some(now);
                seen.refused = Some(now);
                Reload::Refused { error, first }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    /// Writes a root and a workload certificate valid from `from` seconds from
    /// now into `dir`, as the three files.
    fn write_set(dir: &std::path::Path, issuer: &Issuer<'_, KeyPair>, root: &str, from: i64) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/reviews"
                .try_into()
                .unwrap(),
        )];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, issuer).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("roots.pem"), root).unwrap();
    }

    #[test]
    fn a_set_not_valid_yet_is_refused_once_then_loaded_when_it_becomes_valid() {
        let dir = std::env::temp_dir().join(format!(
            "sluice-identity-files-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_pem = root.self_signed(&root_key).unwrap().pem();
        let issuer = Issuer::new(root, root_key);
        let files = Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            roots: dir.join("roots.pem"),
        };
        let tls = Tls::default();
        write_set(&dir, &issuer, &root_pem, -60);
        files.load(&tls).unwrap();
        let mut seen = Seen::loaded(files.stamp());
        assert!(matches!(
            files.reload_if_changed(&tls, &mut seen),
            Reload::Unchanged
        ));

        // A renewal whose notBefore is a little ahead of this clock.
        write_set(&dir, &issuer, &root_pem, 2);
        let first = tls.current().unwrap();
        assert!(matches!(
            files.reload_if_changed(&tls, &mut seen),
            Reload::Refused { first: true, .. }
        ));
        assert!(matches!(
            files.reload_if_changed(&tls, &mut seen),
            Reload::Refused { first: false, .. }
        ));
        assert!(
            std::sync::Arc::ptr_eq(&first, &tls.current().unwrap()),
            "kept"
        );
        // Loaded once valid, without another change to the files (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            if let Reload::Loaded(_) = files.reload_if_changed(&tls, &mut seen) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never loaded");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(!std::sync::Arc::ptr_eq(&first, &tls.current().unwrap()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
