//! Sluice's policy model, shared by the proxy and the control plane.
//!
//! A `TrafficPolicy` document is read in two layers: the serde `*Spec` types in
//! [`spec`] mirror the YAML and reject unknown fields; [`validate`] converts them
//! with `TryFrom` into the [`model`] types, which the data plane trusts without
//! re-checking. [`load`] reads files and directories and places every error at
//! `file:line:column` with its YAML path, and every warning of [`lint`] (valid, but
//! probably not meant, such as a route that can never match) the same way.
#![forbid(unsafe_code)]

pub mod duration;
pub mod error;
pub mod hash;
pub mod identity;
pub mod lint;
pub mod load;
pub mod model;
mod node;
pub mod schema;
pub mod spec;
mod unparse;
pub mod validate;
pub mod watch;

pub use error::{PolicyError, PolicyErrors, Problem};
pub use lint::{PolicyWarning, Warning};
pub use load::{
    check_each, check_file, check_path, check_paths, check_sources, check_str, load_path,
    load_paths, parse_sources, parse_str, read_paths, refuse_duplicates, Checked, Document,
};
pub use model::*;

/// Writes policies back as multi-document YAML in canonical form.
pub fn to_yaml(set: &PolicySet) -> String {
    let mut out = String::new();
    for policy in &set.policies {
        let spec = spec::TrafficPolicySpec::from(policy);
        out.push_str("---\n");
        // Serializing plain structs of strings and numbers cannot fail.
        out.push_str(&serde_saphyr::to_string(&spec).unwrap_or_default());
    }
    out
}

/// One policy alone as canonical YAML, and its version: the content hash of that
/// text. The control plane versions each policy it serves by it, and the proxy
/// reports the versions it holds by it, so both agree on every replica.
pub fn policy_yaml(policy: &TrafficPolicy) -> (String, String) {
    let yaml = to_yaml(&PolicySet {
        policies: vec![policy.clone()],
    });
    let version = hash::content_hash(&yaml);
    (yaml, version)
}
