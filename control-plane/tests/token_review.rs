//! Proxies' ServiceAccount tokens checked by the Kubernetes TokenReview API,
//! against a fake API server that answers as kube-apiserver does.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::Arc;

use fake_apiserver::FakeApiServer;
use sluice_control_plane::auth::{Authenticator, TokenReviewer, Via};
use tonic::metadata::MetadataMap;

fn bearer(token: &str) -> MetadataMap {
    let mut md = MetadataMap::new();
    md.insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    md
}

async fn reviewer(fake: &Arc<FakeApiServer>) -> Authenticator {
    let (url, _) = fake.start().await;
    let client =
        kube::Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("client");
    Authenticator::Kubernetes(Box::new(TokenReviewer::new(
        client,
        "sluice",
        Some("cli-secret".into()),
        Box::new(()),
    )))
}

#[tokio::test]
async fn a_projected_token_for_sluice_names_the_proxys_namespace_and_service_account() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token("good", "sluice", "shop", "reviews", "reviews-7d4b9-x2kqz");
    let auth = reviewer(&fake).await;
    let identity = auth
        .authenticate(&bearer("good"))
        .await
        .expect("authenticated");
    assert_eq!(
        (
            identity.namespace.as_str(),
            identity.service_account.as_str()
        ),
        ("shop", "reviews")
    );
    assert_eq!(identity.pod.as_deref(), Some("reviews-7d4b9-x2kqz"));
    assert_eq!(identity.via, Via::TokenReview);
    // The review asked for Sluice's audience, and a second call is answered from
    // the cache.
    auth.authenticate(&bearer("good")).await.expect("again");
    let reviews = fake.reviews.lock().unwrap().clone();
    assert_eq!(
        reviews,
        vec![("good".to_string(), vec!["sluice".to_string()])]
    );
}

#[tokio::test]
async fn tokens_for_another_audience_forged_or_missing_are_refused_with_what_to_change() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token(
        "for-the-api",
        "https://kubernetes.default.svc",
        "shop",
        "reviews",
        "p",
    );
    let auth = reviewer(&fake).await;
    let refused = |result: Result<_, tonic::Status>| {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        status.message().to_owned()
    };
    let other = refused(auth.authenticate(&bearer("for-the-api")).await);
    assert!(
        other.contains("is invalid for the target audiences"),
        "{other}"
    );
    assert!(other.contains("audience \"sluice\""), "{other}");
    let forged = refused(auth.authenticate(&bearer("eyJhbGciOiJub25lIn0.e30.")).await);
    assert!(forged.contains("invalid bearer token"), "{forged}");
    let none = refused(auth.authenticate(&MetadataMap::new()).await);
    assert!(none.contains("--token-file"), "{none}");
    // The static token still works beside TokenReview (the CLI, proxies outside
    // the cluster), without a review.
    let cli = auth
        .authenticate(&bearer("cli-secret"))
        .await
        .expect("static");
    assert_eq!(cli.via, Via::StaticToken);
    assert_eq!(fake.reviews.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_control_plane_not_allowed_to_review_says_which_permission_it_lacks() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_token("good", "sluice", "shop", "reviews", "p");
    *fake.forbid_reviews.lock().unwrap() = true;
    let auth = reviewer(&fake).await;
    let status = auth
        .authenticate(&bearer("good"))
        .await
        .expect_err("unavailable");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status
            .message()
            .contains("tokenreviews.authentication.k8s.io"),
        "{}",
        status.message()
    );
}
