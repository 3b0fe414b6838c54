//! Who may call a workload: an inbound policy's `spec.mtls` and
//! `spec.authorization`, compiled for the request path.
//!
//! Built with the snapshot (off the request path): each rule's route names become
//! a table indexed by route, so a decision only compares the caller's namespace and
//! service account with the rules' lists, without allocating. Not stateful: a
//! snapshot's rules are simply the policy's, nothing is carried across reloads.
//!
//! Rules only allow; a caller no rule allows gets the policy's `default`. A caller
//! without an identity (plaintext) matches no rule. The effective mTLS mode is the
//! policy's, else the listener's mesh-wide default (`--mtls-mode`), which the
//! caller of [`Access::decide`] passes in.

use sluice_policy::{AuthorizationDefault, AuthorizationRule, MtlsMode, TrafficPolicy};

/// What an inbound policy says about a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// The effective mode is `strict` and the caller came without mTLS.
    MtlsRequired,
    /// No rule allows the caller on this route, and the default is `deny`.
    Denied,
}

/// One policy's mTLS mode and authorization, compiled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// The policy's own mode; `None`: the listener's default.
    pub mtls: Option<MtlsMode>,
    /// `None`: every caller may call every route.
    authorization: Option<Rules>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rules {
    default: AuthorizationDefault,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Who it names (validated: never nobody).
    from: AuthorizationRule,
    /// `routes[i]`: whether it covers route `i`; `None`: every route.
    routes: Option<Box<[bool]>>,
}

impl Access {
    pub fn new(policy: &TrafficPolicy) -> Access {
        let authorization = policy.authorization.as_ref().map(|a| Rules {
            default: a.default,
            rules: a
                .rules
                .iter()
                .map(|rule| Rule {
                    routes: rule.routes.as_ref().map(|names| {
                        // Names were checked against the policy's routes by validation.
                        policy
                            .routes
                            .iter()
                            .map(|r| names.contains(&r.name))
                            .collect()
                    }),
                    from: rule.clone(),
                })
                .collect(),
        });
        Access {
            mtls: policy.mtls,
            authorization,
        }
    }

    /// The mode in force: the policy's, else `default` (the listener's).
    pub fn mode(&self, default: MtlsMode) -> MtlsMode {
        self.mtls.unwrap_or(default)
    }

    /// The authorization's default, when the policy has one.
    pub fn default(&self) -> Option<AuthorizationDefault> {
        self.authorization.as_ref().map(|a| a.default)
    }

    /// Whether `caller` (`(namespace, service account)` of a verified mTLS peer,
    /// `None` for plaintext) may call route `route` (an index into the policy's
    /// routes), under the listener's default mode `mtls_default`.
    pub fn decide(
        &self,
        mtls_default: MtlsMode,
        caller: Option<(&str, &str)>,
        route: usize,
    ) -> Decision {
        if caller.is_none() && self.mode(mtls_default) == MtlsMode::Strict {
            return Decision::MtlsRequired;
        }
        let Some(authz) = &self.authorization else {
            return Decision::Allowed;
        };
        let allowed_by_rule = caller.is_some_and(|(namespace, account)| {
            authz.rules.iter().any(|rule| {
                rule.routes
                    .as_ref()
                    .is_none_or(|routes| routes.get(route).copied().unwrap_or(false))
                    && rule.from.names(namespace, account)
            })
        });
        match (allowed_by_rule, authz.default) {
            (true, _) | (false, AuthorizationDefault::Allow) => Decision::Allowed,
            (false, AuthorizationDefault::Deny) => Decision::Denied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(spec: &str) -> Access {
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: orders, namespace: shop}}\nspec:\n  routes:\n    - {{name: orders, match: {{pathPrefix: /orders}}}}\n    - {{name: health, match: {{path: /healthz}}}}\n{spec}"
        );
        let set = sluice_policy::parse_str(std::path::Path::new("p.yaml"), &yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        Access::new(&set.policies[0])
    }

    const ORDERS: usize = 0;
    const HEALTH: usize = 1;
    const FRONTEND: Option<(&str, &str)> = Some(("shop", "frontend"));

    #[test]
    fn without_authorization_everyone_is_allowed_unless_strict_refuses_plaintext() {
        let open = access("");
        assert_eq!(
            open.decide(MtlsMode::Permissive, None, ORDERS),
            Decision::Allowed
        );
        assert_eq!(
            open.decide(MtlsMode::Strict, None, ORDERS),
            Decision::MtlsRequired
        );
        assert_eq!(
            open.decide(MtlsMode::Strict, FRONTEND, ORDERS),
            Decision::Allowed
        );
        // The policy's own mode wins over the listener's.
        let permissive = access("  mtls: {mode: permissive}\n");
        assert_eq!(
            permissive.decide(MtlsMode::Strict, None, ORDERS),
            Decision::Allowed
        );
        let strict = access("  mtls: {mode: strict}\n");
        assert_eq!(
            strict.decide(MtlsMode::Permissive, None, ORDERS),
            Decision::MtlsRequired
        );
    }

    #[test]
    fn a_rule_allows_its_accounts_and_namespaces_on_its_routes_only() {
        let a = access(
            "  authorization:\n    rules:\n      - from: {serviceAccounts: [shop/frontend], namespaces: [ops]}\n        routes: [orders]\n      - from: {namespaces: [monitoring]}\n        routes: [health]\n",
        );
        let p = MtlsMode::Permissive;
        assert_eq!(a.decide(p, FRONTEND, ORDERS), Decision::Allowed);
        assert_eq!(a.decide(p, FRONTEND, HEALTH), Decision::Denied);
        assert_eq!(
            a.decide(p, Some(("ops", "anyone")), ORDERS),
            Decision::Allowed
        );
        assert_eq!(
            a.decide(p, Some(("shop", "checkout")), ORDERS),
            Decision::Denied
        );
        // The account's namespace alone is not the account.
        assert_eq!(
            a.decide(p, Some(("other", "frontend")), ORDERS),
            Decision::Denied
        );
        assert_eq!(
            a.decide(p, Some(("monitoring", "prom")), HEALTH),
            Decision::Allowed
        );
        assert_eq!(a.decide(p, None, ORDERS), Decision::Denied);
    }

    #[test]
    fn a_rule_without_routes_covers_every_route_and_default_allow_lets_anyone_in() {
        let a = access("  authorization:\n    rules: [{from: {namespaces: [ops]}}]\n");
        let p = MtlsMode::Permissive;
        assert_eq!(a.decide(p, Some(("ops", "x")), HEALTH), Decision::Allowed);
        assert_eq!(a.decide(p, FRONTEND, HEALTH), Decision::Denied);
        let allow = access("  authorization: {default: allow}\n");
        assert_eq!(allow.decide(p, None, ORDERS), Decision::Allowed);
        assert_eq!(allow.default(), Some(AuthorizationDefault::Allow));
    }
}
