//! Who may call a workload: mutual TLS (`spec.mtls`) and authorization by workload
//! identity (`spec.authorization`), and the identity a meshed backend must prove
//! (`backends[].tls`).
//!
//! Identities are Kubernetes ServiceAccounts, as an mTLS caller's certificate names
//! them (`spiffe://<trust-domain>/ns/<namespace>/sa/<name>`, see
//! [`crate::identity`]). Rules only allow; whoever no rule allows gets the
//! policy's `default`. A plaintext caller has no identity, so no rule allows it.

use std::fmt;

/// Whether an inbound policy's callers must come over mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MtlsMode {
    /// Plaintext callers are refused.
    Strict,
    /// mTLS and plaintext callers are both served (the mesh-wide default, so that
    /// workloads can join the mesh one at a time).
    #[default]
    Permissive,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
    }
}

/// `spec.authorization`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authorization {
    /// What a caller no rule allows gets.
    pub default: AuthorizationDefault,
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AuthorizationDefault {
    Allow,
    /// Listing who may call means nobody else may: the default when not written.
    #[default]
    Deny,
}

impl AuthorizationDefault {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthorizationDefault::Allow => "allow",
            AuthorizationDefault::Deny => "deny",
        }
    }
}

/// Callers that are one of `service_accounts`, or in one of `namespaces`, may
/// call `routes`. Never matches nobody: at least one account or namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthorizationRule {
    pub service_accounts: Vec<ServiceAccount>,
    /// DNS-1123 labels.
    pub namespaces: Vec<String>,
    /// Names of the policy's routes (each exists, none listed twice); `None`:
    /// every route.
    pub routes: Option<Vec<String>>,
}

impl AuthorizationRule {
    /// Whether the caller `namespace/service_account` is one this rule names.
    pub fn names(&self, namespace: &str, service_account: &str) -> bool {
        self.namespaces.iter().any(|n| n == namespace)
            || self
                .service_accounts
                .iter()
                .any(|sa| sa.namespace == namespace && sa.name == service_account)
    }
}

/// A Kubernetes ServiceAccount: `namespace/name`, both DNS-1123 labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `backends[].tls`: the backend is a meshed workload, reached over mTLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendTls {
    /// The SPIFFE ID its certificate must name (valid: see
    /// [`crate::identity::parse`]).
    pub identity: String,
}
