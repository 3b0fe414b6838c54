//! Workload identities as SPIFFE IDs: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! the one URI a Sluice workload certificate carries (SPIFFE X.509-SVID form, as
//! Istio and Linkerd name Kubernetes workloads).
//!
//! One reading of the form for both sides: policy validation checks a backend's
//! expected identity with [`parse`] (and [`is_valid`] for what an author may
//! write), and the proxy reads its peers' certificates with [`parse`], so the two
//! never disagree on what an identity is.

/// The parts of a SPIFFE workload ID, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeId<'a> {
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// The form, as an error message says it.
pub const FORM: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>";

/// Splits `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`: exactly these segments, each
/// part non-empty. Only the shape: a certificate that chained to the mesh's roots
/// is trusted for its contents.
pub fn parse(id: &str) -> Option<SpiffeId<'_>> {
    let rest = id.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/');
    let (Some(trust_domain), Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let parts = [trust_domain, namespace, service_account];
    (!parts.iter().any(|p| p.is_empty())).then_some(SpiffeId {
        trust_domain,
        namespace,
        service_account,
    })
}

/// Whether a policy may name `id`: [`parse`]s, with a trust domain of lower-case
/// letters, digits, '.', '-' and '_' (the SPIFFE spec's), and a namespace and a
/// ServiceAccount that Kubernetes allows (a DNS-1123 label, a DNS-1123 subdomain),
/// so a typo is caught here rather than as a certificate that never matches.
pub fn is_valid(id: &str) -> bool {
    parse(id).is_some_and(|id| {
        id.trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && is_dns_label(id.namespace)
            && is_dns_subdomain(id.service_account)
    })
}

/// DNS-1123 subdomain, as Kubernetes requires of most object names
/// (ServiceAccounts among them): at most 253 characters, DNS-1123 labels joined
/// by '.'.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// DNS-1123 label, as Kubernetes requires of namespaces and object names: 1..=63
/// lower-case letters, digits and '-', not starting or ending with '-'.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_workload_id_into_its_parts() {
        assert_eq!(
            parse("spiffe://cluster.local/ns/shop/sa/reviews"),
            Some(SpiffeId {
                trust_domain: "cluster.local",
                namespace: "shop",
                service_account: "reviews",
            })
        );
    }

    #[test]
    fn refuses_what_is_not_a_workload_id() {
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
            assert_eq!(parse(bad), None, "{bad}");
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn a_policy_names_kubernetes_namespaces_and_accounts_only() {
        assert!(is_valid("spiffe://cluster.local/ns/shop/sa/reviews-v2"));
        for bad in [
            "spiffe://Cluster.Local/ns/shop/sa/reviews",
            "spiffe://cluster.local/ns/Shop/sa/reviews",
            "spiffe://cluster.local/ns/shop/sa/-reviews",
            "spiffe://cluster.local/ns/shop/sa/re_views",
        ] {
            assert!(parse(bad).is_some(), "{bad}");
            assert!(!is_valid(bad), "{bad}");
        }
    }
}
