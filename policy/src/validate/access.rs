//! `spec.mtls`, `spec.authorization` and `backends[].tls`: who may call, and who a
//! meshed backend must be.
//!
//! A rule whose `from` names nobody (no `serviceAccounts`, no `namespaces`) is an
//! error rather than a rule that matches nobody: it can only be a mistake (a
//! forgotten list, or an attempt at "everyone", which is `default: allow`). For the
//! same reason `routes: []` is an error (absent means every route).

use super::{is_dns_label, Checker};
use crate::error::{did_you_mean, Problem};
use crate::identity;
use crate::model::*;
use crate::spec::*;

pub(super) fn mtls(spec: &MtlsSpec) -> MtlsMode {
    match spec.mode {
        MtlsModeSpec::Strict => MtlsMode::Strict,
        MtlsModeSpec::Permissive => MtlsMode::Permissive,
    }
}

/// `spec.authorization`, whose rules may name `routes` (the policy's, validated).
pub(super) fn authorization(
    c: &mut Checker,
    spec: &AuthorizationSpec,
    routes: &[Route],
) -> Authorization {
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            authorization_rule(c, &format!("spec.authorization.rules[{i}]"), rule, routes)
        })
        .collect();
    Authorization {
        default: match spec.default {
            Some(AuthorizationDefaultSpec::Allow) => AuthorizationDefault::Allow,
            Some(AuthorizationDefaultSpec::Deny) | None => AuthorizationDefault::Deny,
        },
        rules,
    }
}

fn authorization_rule(
    c: &mut Checker,
    at: &str,
    rule: &AuthorizationRuleSpec,
    routes: &[Route],
) -> AuthorizationRule {
    let from = &rule.from;
    if from.service_accounts.is_empty() && from.namespaces.is_empty() {
        c.fail(format!("{at}.from"), Problem::NoCallers);
    }
    let mut service_accounts = Vec::with_capacity(from.service_accounts.len());
    for (i, text) in from.service_accounts.iter().enumerate() {
        match service_account(text) {
            Some(sa) if !service_accounts.contains(&sa) => service_accounts.push(sa),
            Some(_) => {}
            None => c.fail(
                format!("{at}.from.serviceAccounts[{i}]"),
                Problem::BadValue {
                    expected: "a ServiceAccount as `namespace/name` (a DNS-1123 label: \
                               lower-case letters, digits and '-', at most 63; then a \
                               DNS-1123 subdomain: such labels joined by '.')"
                        .into(),
                    got: text.clone(),
                },
            ),
        }
    }
    let mut namespaces: Vec<String> = Vec::with_capacity(from.namespaces.len());
    for (i, ns) in from.namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            c.fail(
                format!("{at}.from.namespaces[{i}]"),
                Problem::BadValue {
                    expected: "a namespace (a DNS-1123 label: lower-case letters, digits and \
                               '-', at most 63)"
                        .into(),
                    got: ns.clone(),
                },
            );
        } else if !namespaces.contains(ns) {
            namespaces.push(ns.clone());
        }
    }
    let routes = rule.routes.as_ref().map(|names| {
        if names.is_empty() {
            c.fail(format!("{at}.routes"), Problem::Empty);
        }
        let mut listed: Vec<String> = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if !routes.iter().any(|r| r.name == *name) {
                c.fail(
                    format!("{at}.routes[{i}]"),
                    Problem::UnknownRoute {
                        route: name.clone(),
                        suggestion: did_you_mean(name, routes.iter().map(|r| r.name.as_str())),
                    },
                );
            } else if !listed.contains(name) {
                listed.push(name.clone());
            }
        }
        listed
    });
    AuthorizationRule {
        service_accounts,
        namespaces,
        routes,
    }
}

/// `namespace/name`: a DNS-1123 label, then a DNS-1123 subdomain (Kubernetes'
/// rules for a namespace and a ServiceAccount's name).
fn service_account(text: &str) -> Option<ServiceAccount> {
    let (namespace, name) = text.split_once('/')?;
    let subdomain = crate::identity::is_dns_subdomain(name);
    (is_dns_label(namespace) && subdomain).then(|| ServiceAccount {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// `backends[i].tls` at `at`.
pub(super) fn backend_tls(c: &mut Checker, at: &str, spec: &BackendTlsSpec) -> BackendTls {
    if !identity::is_valid(&spec.identity) {
        c.fail(
            format!("{at}.identity"),
            Problem::BadValue {
                expected: format!(
                    "a workload identity, {} (namespace: a DNS-1123 label; service account: a DNS-1123 subdomain)",
                    identity::FORM
                ),
                got: spec.identity.clone(),
            },
        );
    }
    BackendTls {
        identity: spec.identity.clone(),
    }
}
