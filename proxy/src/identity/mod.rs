//! Workload identities: who a meshed peer is, as its certificate says.
//!
//! A Sluice proxy's certificate carries one URI SAN,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` (SPIFFE X.509-SVID
//! form): the Kubernetes ServiceAccount the workload runs as. The inbound side
//! learns the caller's identity from the client certificate of an mTLS connection
//! ([`PeerIdentity`]) and authorizes on it; the outbound side checks the server's
//! against the one expected for the destination.

pub mod files;
pub mod tls;

use std::fmt;
use std::sync::Arc;

pub mod credentials;

/// A verified peer's workload identity (from a certificate that chained to the
/// trust roots).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The whole SPIFFE ID, as the certificate says it.
    pub id: Arc<str>,
    /// Where `/ns/` and `/sa/` are in `id` (namespace, service account).
    ns: (usize, usize),
    sa: (usize, usize),
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a workload identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
pub struct NotAnIdentity(pub String);

impl PeerIdentity {
    /// Parses `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; every part non-empty.
    /// The form is `sluice_policy::identity`'s, the one policy validation checks a
    /// backend's expected identity with, so the two sides never disagree.
    pub fn parse(id: &str) -> Result<Self, NotAnIdentity> {
        let parts =
            sluice_policy::identity::parse(id).ok_or_else(|| NotAnIdentity(id.to_owned()))?;
        let (domain, ns, sa) = (parts.trust_domain, parts.namespace, parts.service_account);
        let ns_start = "spiffe://".len() + domain.len() + "/ns/".len();
        let sa_start = ns_start + ns.len() + "/sa/".len();
        Ok(PeerIdentity {
            id: Arc::from(id),
            ns: (ns_start, ns_start + ns.len()),
            sa: (sa_start, sa_start + sa.len()),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.id[self.ns.0..self.ns.1]
    }

    /// What comes between `spiffe://` and `/ns/`.
    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.ns.0 - "/ns/".len()]
    }

    pub fn service_account(&self) -> &str {
        &self.id[self.sa.0..self.sa.1]
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_and_service_account() {
        let id = PeerIdentity::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "frontend");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/frontend");
    }

    #[test]
    fn refuses_what_is_not_a_workload_identity() {
        for bad in [
            "",
            "spiffe://cluster.local",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/sa/b/ns/a",
            "https://td/ns/a/sa/b",
        ] {
            assert!(PeerIdentity::parse(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Certificates are the peer's to write: whatever a URI SAN holds, parsing
        /// never panics, and what it accepts reads back as the parts the policy
        /// crate sees in it.
        #[test]
        fn any_uri_parses_safely_and_consistently(
            id in "(spiffe://)?[a-z.]{0,6}(/ns/)?[a-z0-9/-]{0,6}(/sa/)?[a-z0-9/-]{0,6}|\\PC{0,40}"
        ) {
            if let Ok(peer) = PeerIdentity::parse(&id) {
                let parts = sluice_policy::identity::parse(&id).expect("same rule");
                proptest::prop_assert_eq!(peer.namespace(), parts.namespace);
                proptest::prop_assert_eq!(peer.service_account(), parts.service_account);
                proptest::prop_assert_eq!(
                    format!("spiffe://{}/ns/{}/sa/{}", parts.trust_domain, peer.namespace(), peer.service_account()),
                    id
                );
            }
        }
    }
}
