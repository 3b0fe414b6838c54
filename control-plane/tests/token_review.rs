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

mod through_the_api {
    use super::*;
    use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
    use sluice_control_plane::api::{PolicyRequest, StatusRequest};
    use sluice_control_plane::serve::{start, Running, ServeConfig};
    use tokio_stream::wrappers::ReceiverStream;

    /// The control plane following the fake cluster, recognising proxies by their
    /// tokens; `cli-secret` is its static token (for the CLI).
    async fn control_plane(
        fake: &Arc<FakeApiServer>,
    ) -> (Running, tokio::sync::oneshot::Sender<()>) {
        let (url, _) = fake.start().await;
        // One directory per control plane: tests run at once, and a token file
        // rewritten under another's feet reads as empty.
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "sluice-token-review-{}-{unique}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let token_file = dir.join("token");
        std::fs::write(&token_file, "cli-secret\n").expect("token");
        let config = ServeConfig {
            policies: None,
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls: None,
            cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
            token_file: Some(token_file),
            kubernetes: Some(kube::Config::new(url.parse().expect("url"))),
            token_review: Some("sluice".into()),
            operators: vec!["sluice-system/sluice-operator".into()],
            telemetry: None,
            webhook: None,
            ca: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = start(config, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
        (running, stop)
    }

    /// Subscribes as `node` in `namespace` with `token`: the call's outcome.
    async fn subscribe(
        running: &Running,
        token: &str,
        node: &str,
        namespace: &str,
    ) -> Result<(), tonic::Status> {
        let mut client = PolicyDiscoveryClient::connect(format!("http://{}", running.addr))
            .await
            .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(PolicyRequest {
            node_id: node.into(),
            namespace: namespace.into(),
            ..Default::default()
        })
        .await
        .expect("subscribe");
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let response = client.stream_policies(request).await.map(|_| ());
        // Keep the sender until the answer, so the stream is open when checked.
        drop(tx);
        response
    }

    #[tokio::test]
    async fn a_proxy_subscribes_with_its_token_and_status_shows_its_workload() {
        let fake = Arc::new(FakeApiServer::default());
        fake.add_token("good", "sluice", "shop", "reviews", "reviews-7d4b9-x2kqz");
        let (running, _stop) = control_plane(&fake).await;
        subscribe(&running, "good", "reviews-7d4b9-x2kqz", "shop")
            .await
            .expect("subscribed");
        let status = running.store.status();
        let proxy = status
            .proxies
            .iter()
            .find(|p| p.node_id == "reviews-7d4b9-x2kqz")
            .expect("listed");
        assert_eq!(proxy.namespace, "shop");
        assert_eq!(proxy.service_account, "reviews");
        assert_eq!(proxy.pod, "reviews-7d4b9-x2kqz");
        assert_eq!(proxy.authenticated_by, "token-review");
    }

    #[tokio::test]
    async fn forged_foreign_and_impersonating_proxies_are_refused() {
        let fake = Arc::new(FakeApiServer::default());
        fake.add_token("good", "sluice", "shop", "reviews", "reviews-1");
        fake.add_token(
            "for-the-api",
            "https://kubernetes.default.svc",
            "shop",
            "reviews",
            "reviews-1",
        );
        let (running, _stop) = control_plane(&fake).await;
        let code = |r: Result<(), tonic::Status>| r.expect_err("refused").code();
        assert_eq!(
            code(subscribe(&running, "forged", "reviews-1", "shop").await),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(subscribe(&running, "for-the-api", "reviews-1", "shop").await),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(subscribe(&running, "", "reviews-1", "shop").await),
            tonic::Code::Unauthenticated
        );
        // A real token speaking for another pod, or another namespace.
        assert_eq!(
            code(subscribe(&running, "good", "payments-1", "shop").await),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(subscribe(&running, "good", "reviews-1", "payments").await),
            tonic::Code::PermissionDenied
        );
        assert!(running.store.status().proxies.is_empty());
    }

    #[tokio::test]
    async fn a_proxys_token_does_not_open_the_operators_calls() {
        let fake = Arc::new(FakeApiServer::default());
        fake.add_token("good", "sluice", "shop", "reviews", "reviews-1");
        fake.add_token("ops", "sluice", "sluice-system", "sluice-operator", "");
        let (running, _stop) = control_plane(&fake).await;
        let mut client = PolicyDiscoveryClient::connect(format!("http://{}", running.addr))
            .await
            .expect("connect");
        let ask = |token: &str| {
            let mut request = tonic::Request::new(StatusRequest {});
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
            request
        };
        let refused = client.get_status(ask("good")).await.expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("--token-file"),
            "{}",
            refused.message()
        );
        client
            .get_status(ask("cli-secret"))
            .await
            .expect("the static token works");
        client
            .get_status(ask("ops"))
            .await
            .expect("an --operator ServiceAccount's token works");
    }
}
