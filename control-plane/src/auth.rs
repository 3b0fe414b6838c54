//! Who is calling the control plane's API: the bearer token a proxy presents,
//! checked by the Kubernetes TokenReview API (a projected ServiceAccount token for
//! the audience `sluice`), or compared with a static token outside Kubernetes.
//!
//! Why TokenReview: a projected token is short-lived, bound to its pod, rotated by
//! the kubelet, and names the workload (`system:serviceaccount:NS:SA`), so the
//! control plane knows a proxy's namespace and service account from the API
//! server, not from what the proxy says about itself. That identity is kept with
//! the proxy's status (`sluice-cp status`), and is what later work scopes the
//! policies a proxy receives and the certificates it is issued by.
//!
//! Invariants: a token is accepted only if the API server says it is
//! authenticated, for the audience asked, and belongs to a ServiceAccount; a
//! refusal says what to change. Positive answers are cached for at most
//! [`CACHE_FOR`] (keyed by the token's SHA-256, at most [`CACHE_ENTRIES`]), so a
//! fleet reconnecting after a restart does not send one review per stream.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::Api;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// The audience a proxy's projected token is for, unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "sluice";
/// How long a positive review is trusted without asking again.
pub const CACHE_FOR: Duration = Duration::from_secs(60);
/// The most reviews remembered (beyond it, the oldest go).
pub const CACHE_ENTRIES: usize = 10_000;

/// How a caller was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A loopback listener without a token: the local proxy or CLI.
    Loopback,
    /// The static `--token-file` token (outside Kubernetes).
    StaticToken,
    /// A ServiceAccount token the Kubernetes API vouched for.
    TokenReview,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Loopback => "loopback",
            Via::StaticToken => "static-token",
            Via::TokenReview => "token-review",
        }
    }
}

/// Who a caller is. Namespace and service account are known only through
/// TokenReview; the other ways leave them empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to, when the API server says.
    pub pod: Option<String>,
    pub via: Via,
}

impl Identity {
    fn anonymous(via: Via) -> Self {
        Identity {
            namespace: String::new(),
            service_account: String::new(),
            pod: None,
            via,
        }
    }
}

/// The outcome counts, for the control plane's metrics.
pub trait ReviewObserver: Send + Sync {
    fn reviewed(&self, result: &'static str);
}

impl ReviewObserver for () {
    fn reviewed(&self, _result: &'static str) {}
}

/// Checks callers' bearer tokens.
pub enum Authenticator {
    /// Anyone (a loopback listener without a token).
    Open,
    /// One shared secret.
    Static(String),
    /// ServiceAccount tokens through TokenReview; the static token, if any, is
    /// accepted too (the CLI and proxies outside the cluster).
    Kubernetes(Box<TokenReviewer>),
}

/// Asks the Kubernetes API who a token belongs to.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    static_token: Option<String>,
    cache: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    observer: Box<dyn ReviewObserver>,
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        audience: impl Into<String>,
        static_token: Option<String>,
        observer: Box<dyn ReviewObserver>,
    ) -> Self {
        TokenReviewer {
            api: Api::all(client),
            audience: audience.into(),
            static_token,
            cache: Mutex::new(HashMap::new()),
            observer,
        }
    }

    fn cached(&self, key: &[u8; 32], now: Instant) -> Option<Identity> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| now.duration_since(*at) < CACHE_FOR)
            .map(|(identity, _)| identity.clone())
    }

    fn remember(&self, key: [u8; 32], identity: &Identity, now: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (_, at)| now.duration_since(*at) < CACHE_FOR);
        if cache.len() >= CACHE_ENTRIES {
            if let Some(oldest) = cache.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (identity.clone(), now));
    }

    async fn review(&self, token: &str) -> Result<Identity, Status> {
        let key = sha256(token.as_bytes());
        let now = Instant::now();
        if let Some(identity) = self.cached(&key, now) {
            return Ok(identity);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = match self.api.create(&PostParams::default(), &review).await {
            Ok(answer) => answer,
            Err(e) => {
                self.observer.reviewed("error");
                return Err(Status::unavailable(format!(
                    "cannot review the token with the Kubernetes API: {e} (the control plane's \
                     ClusterRole needs create on tokenreviews.authentication.k8s.io)"
                )));
            }
        };
        match identity_of(&answer, &self.audience) {
            Ok(identity) => {
                self.observer.reviewed("authenticated");
                self.remember(key, &identity, now);
                Ok(identity)
            }
            Err(why) => {
                self.observer.reviewed("refused");
                Err(Status::unauthenticated(format!(
                    "the Kubernetes TokenReview refused the token: {why}; present a projected \
                     ServiceAccount token with audience \"{}\" (--token-file)",
                    self.audience
                )))
            }
        }
    }
}

/// What a TokenReview answer says: the identity, or why the token is refused.
pub fn identity_of(answer: &TokenReview, audience: &str) -> Result<Identity, String> {
    let status = answer.status.as_ref().ok_or("no status in the answer")?;
    if status.authenticated != Some(true) {
        return Err(status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".into()));
    }
    // The answer must name our audience. Without audiences, an authenticated
    // answer means the token is good for the API server's own audience: any
    // automounted or legacy Secret token, which now would mint a workload
    // certificate. Every supported API server names them when asked (we ask).
    let ours = status
        .audiences
        .as_ref()
        .is_some_and(|audiences| audiences.iter().any(|a| a == audience));
    if !ours {
        return Err(format!("the token is not for the audience \"{audience}\""));
    }
    let user = status.user.as_ref().ok_or("no user in the answer")?;
    let name = user.username.as_deref().unwrap_or("");
    let mut parts = name
        .strip_prefix("system:serviceaccount:")
        .map(|r| r.split(':'));
    let (Some(namespace), Some(service_account), None) = (
        parts.as_mut().and_then(Iterator::next),
        parts.as_mut().and_then(Iterator::next),
        parts.as_mut().and_then(Iterator::next),
    ) else {
        return Err(format!("{name:?} is not a ServiceAccount"));
    };
    if namespace.is_empty() || service_account.is_empty() {
        return Err(format!("{name:?} is not a ServiceAccount"));
    }
    let pod = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get("authentication.kubernetes.io/pod-name"))
        .and_then(|names| names.first())
        .cloned();
    Ok(Identity {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod,
        via: Via::TokenReview,
    })
}

/// The bearer token of a call, if it has one.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares in time independent of where the inputs differ (the token is a secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl Authenticator {
    /// Who is calling, or why they may not.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Identity, Status> {
        let token = bearer(metadata);
        match self {
            Authenticator::Open => Ok(Identity::anonymous(Via::Loopback)),
            Authenticator::Static(expected) => match token {
                Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => {
                    Ok(Identity::anonymous(Via::StaticToken))
                }
                Some(_) => Err(Status::unauthenticated("wrong bearer token")),
                None => Err(Status::unauthenticated(
                    "a bearer token is required (the proxy's --token-file)",
                )),
            },
            Authenticator::Kubernetes(reviewer) => {
                let Some(token) = token.filter(|t| !t.is_empty()) else {
                    return Err(Status::unauthenticated(
                        "a bearer token is required: run the proxy with --token-file (injected \
                         sidecars mount their ServiceAccount token at /var/run/secrets/sluice/token)",
                    ));
                };
                if let Some(expected) = &reviewer.static_token {
                    if constant_time_eq(token.as_bytes(), expected.as_bytes()) {
                        return Ok(Identity::anonymous(Via::StaticToken));
                    }
                }
                reviewer.review(token).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
    use std::collections::BTreeMap;

    fn answer(authenticated: bool, username: &str, audiences: Option<&[&str]>) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
                error: (!authenticated).then(|| "invalid bearer token".into()),
                user: Some(UserInfo {
                    username: Some(username.into()),
                    extra: Some(BTreeMap::from([(
                        "authentication.kubernetes.io/pod-name".to_string(),
                        vec!["app-7d4b9-x2kqz".to_string()],
                    )])),
                    ..UserInfo::default()
                }),
            }),
            ..TokenReview::default()
        }
    }

    #[test]
    fn a_service_account_token_for_our_audience_names_its_workload() {
        let identity = identity_of(
            &answer(
                true,
                "system:serviceaccount:shop:reviews",
                Some(&["sluice"]),
            ),
            "sluice",
        )
        .unwrap();
        assert_eq!(
            identity,
            Identity {
                namespace: "shop".into(),
                service_account: "reviews".into(),
                pod: Some("app-7d4b9-x2kqz".into()),
                via: Via::TokenReview,
            }
        );
    }

    #[test]
    fn refuses_unauthenticated_other_audiences_and_users_that_are_not_service_accounts() {
        let refused = |a: TokenReview| identity_of(&a, "sluice").unwrap_err();
        assert_eq!(
            refused(answer(false, "", Some(&["sluice"]))),
            "invalid bearer token"
        );
        assert!(refused(answer(
            true,
            "system:serviceaccount:shop:reviews",
            Some(&["https://kubernetes.default.svc"])
        ))
        .contains("audience"));
        assert!(
            refused(answer(true, "alice@example.com", Some(&["sluice"])))
                .contains("not a ServiceAccount")
        );
        assert!(refused(answer(
            true,
            "system:serviceaccount:shop",
            Some(&["sluice"])
        ))
        .contains("not a ServiceAccount"));
        assert!(refused(answer(
            true,
            "system:serviceaccount:a:b:c",
            Some(&["sluice"])
        ))
        .contains("not a ServiceAccount"));
        assert!(identity_of(&TokenReview::default(), "sluice").is_err());
        // No audiences in the answer: the token is the API server's, not ours.
        assert!(
            refused(answer(true, "system:serviceaccount:shop:reviews", None)).contains("audience")
        );
    }

    #[tokio::test]
    async fn static_tokens_compare_exactly() {
        let auth = Authenticator::Static("s3cret".into());
        let mut md = MetadataMap::new();
        assert!(auth.authenticate(&md).await.is_err());
        md.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(auth.authenticate(&md).await.unwrap().via, Via::StaticToken);
        md.insert("authorization", "Bearer s3cre".parse().unwrap());
        assert!(auth.authenticate(&md).await.is_err());
        assert!(Authenticator::Open
            .authenticate(&MetadataMap::new())
            .await
            .is_ok());
    }
}
