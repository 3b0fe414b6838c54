//! The status writer against the fake API server: each TrafficPolicy gets the
//! `Accepted` condition published for it through the status subresource, once; a
//! deleted object or a failing API server does not stop it.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use serde_json::{json, Value};
use sluice_control_plane::metrics::Metrics;
use sluice_control_plane::status::{
    PolicyCondition, StatusWriter, REASON_ACCEPTED, REASON_INVALID,
};

const INVALID: &str = "kubernetes:shop/catalog:12:7: spec.routes[0].timeout: expected a duration like 2s, got \"soon\"";

fn condition(name: &str, generation: i64, accepted: bool, message: &str) -> PolicyCondition {
    PolicyCondition {
        namespace: "shop".into(),
        name: name.into(),
        generation,
        accepted,
        reason: if accepted {
            REASON_ACCEPTED
        } else {
            REASON_INVALID
        }
        .into(),
        message: message.into(),
        accepted_specs: Vec::new(),
    }
}

/// The fake holding `shop/api` and `shop/catalog`, and a writer talking to it.
async fn start() -> (Arc<FakeApiServer>, StatusWriter, Metrics) {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_policy("shop", "api", json!({"hosts": ["api"]}));
    fake.add_policy("shop", "catalog", json!({"hosts": ["catalog"]}));
    let (writer, metrics) = writer_for(&fake).await;
    (fake, writer, metrics)
}

/// A writer (a control-plane replica) talking to `fake`, with its own metrics.
async fn writer_for(fake: &Arc<FakeApiServer>) -> (StatusWriter, Metrics) {
    let (url, _) = fake.start().await;
    let client =
        kube::Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("kube client");
    let metrics = Metrics::register(prometheus::Registry::new()).expect("metrics");
    (StatusWriter::start(client, metrics.clone()), metrics)
}

/// Waits until `check` holds; the deadline only keeps a broken test from hanging.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `namespace/name`'s status as the fake holds it.
fn status(fake: &FakeApiServer, name: &str) -> Option<Value> {
    fake.policy("shop", name)?.get("status").cloned()
}

/// Whether the fake's `shop/name` has an `Accepted` condition saying `c`.
fn says(fake: &FakeApiServer, c: &PolicyCondition) -> bool {
    let Some(status) = status(fake, &c.name) else {
        return false;
    };
    let accepted = &status["conditions"][0];
    status["observedGeneration"] == c.generation
        && accepted["type"] == "Accepted"
        && accepted["status"] == if c.accepted { "True" } else { "False" }
        && accepted["reason"] == c.reason.as_str()
        && accepted["message"] == c.message.as_str()
        && accepted["observedGeneration"] == c.generation
        && accepted["lastTransitionTime"].is_string()
}

fn count(metrics: &Metrics, result: &str) -> u64 {
    let text = String::from_utf8(metrics.render().expect("render")).expect("utf-8");
    let series = format!("sluice_cp_status_writes_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

#[tokio::test]
async fn writes_each_policys_condition_once() {
    let (fake, writer, metrics) = start().await;
    let api = condition("api", 1, true, "");
    let catalog = condition("catalog", 1, false, INVALID);
    writer.publish(vec![(api.clone(), None), (catalog.clone(), None)]);
    eventually("both statuses", || {
        says(&fake, &api) && says(&fake, &catalog)
    })
    .await;

    let patches = fake.status_patches.lock().expect("lock").clone();
    assert_eq!(patches.len(), 2, "{patches:?}");
    for p in &patches {
        assert_eq!(p.content_type, "application/merge-patch+json");
        assert_eq!(p.field_manager.as_deref(), Some("sluice-cp"));
    }
    // The status subresource left the spec alone.
    assert_eq!(
        fake.policy("shop", "catalog").expect("catalog")["spec"],
        json!({"hosts": ["catalog"]})
    );

    // The same set again, before the watch shows the writes (the statuses as seen
    // are still none), then after: nothing more is written.
    let seq = writer.publish(vec![(api.clone(), None), (catalog.clone(), None)]);
    writer.attempted(seq).await;
    let seen = |name: &str| status(&fake, name);
    let seq = writer.publish(vec![(api, seen("api")), (catalog, seen("catalog"))]);
    writer.attempted(seq).await;
    assert_eq!(fake.status_patches.lock().expect("lock").len(), 2);
    assert_eq!(count(&metrics, "written"), 2);
}

#[tokio::test]
async fn a_second_replica_seeing_the_written_status_does_not_write_it_again() {
    let (fake, first, _) = start().await;
    let catalog = condition("catalog", 1, false, INVALID);
    first.publish(vec![(catalog.clone(), None)]);
    eventually("the status", || says(&fake, &catalog)).await;

    let (second, second_metrics) = writer_for(&fake).await;
    let seq = second.publish(vec![(catalog, status(&fake, "catalog"))]);
    second.attempted(seq).await;
    assert_eq!(fake.status_patches.lock().expect("lock").len(), 1);
    assert_eq!(count(&second_metrics, "written"), 0);
}

#[tokio::test]
async fn a_new_message_keeps_the_transition_time() {
    let (fake, writer, _) = start().await;
    let before = condition("catalog", 1, false, INVALID);
    writer.publish(vec![(before.clone(), None)]);
    eventually("the first status", || says(&fake, &before)).await;
    let since =
        status(&fake, "catalog").expect("status")["conditions"][0]["lastTransitionTime"].clone();

    let after = condition(
        "catalog",
        2,
        false,
        "kubernetes:shop/catalog:3:1: hosts: empty",
    );
    writer.publish(vec![(after.clone(), status(&fake, "catalog"))]);
    eventually("the second status", || says(&fake, &after)).await;
    let status = status(&fake, "catalog").expect("status");
    assert_eq!(status["conditions"][0]["lastTransitionTime"], since);
    assert_eq!(status["conditions"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_deleted_object_does_not_wedge_the_writer() {
    let (fake, writer, metrics) = start().await;
    assert!(fake.remove_policy("shop", "catalog"));
    let seq = writer.publish(vec![(condition("catalog", 1, false, INVALID), None)]);
    writer.attempted(seq).await;
    // A 404 is final: not retried.
    assert_eq!(fake.status_patches_of("shop", "catalog").len(), 1);
    assert_eq!(count(&metrics, "not_found"), 1);

    let api = condition("api", 1, true, "");
    writer.publish(vec![(api.clone(), None)]);
    eventually("api's status", || says(&fake, &api)).await;
}

#[tokio::test]
async fn a_failing_write_is_retried_until_written() {
    let (fake, writer, metrics) = start().await;
    *fake.failing_status_patches.lock().expect("lock") = 2;
    let api = condition("api", 1, true, "");
    writer.publish(vec![(api.clone(), None)]);
    eventually("api's status", || says(&fake, &api)).await;
    // The fake holds the status before the writer has its answer.
    eventually("the write counted", || count(&metrics, "written") == 1).await;
    assert_eq!(fake.status_patches_of("shop", "api").len(), 3);
    assert_eq!(count(&metrics, "error"), 2);
}

#[tokio::test]
async fn a_write_failing_every_try_is_retried_by_a_later_pass() {
    let (fake, writer, metrics) = start().await;
    let tries = usize::try_from(sluice_control_plane::status::ATTEMPTS).expect("small");
    *fake.failing_status_patches.lock().expect("lock") = tries;
    let api = condition("api", 1, true, "");
    // Published once: the write that follows the failed tries is the writer's own.
    writer.publish(vec![(api.clone(), None)]);
    eventually("api's status", || says(&fake, &api)).await;
    eventually("the write counted", || count(&metrics, "written") == 1).await;
    assert_eq!(fake.status_patches_of("shop", "api").len(), tries + 1);
    assert_eq!(
        count(&metrics, "error"),
        u64::try_from(tries).expect("small")
    );
}

/// The whole path in a cluster: the control plane follows the (fake) cluster's
/// TrafficPolicies and writes each one's condition. Two namespaces both have a
/// policy `api` (two policies, both served); a policy claiming another namespace's
/// Service name loses it (HostConflict) without stopping anyone; an invalid one
/// says where it is wrong.
#[tokio::test]
async fn namespaces_are_isolated_and_each_resource_says_why_it_is_not_served() {
    let fake = Arc::new(FakeApiServer::default());
    fake.add_policy(
        "a",
        "api",
        json!({"hosts": ["api.a.svc.cluster.local", "api.example"]}),
    );
    fake.add_policy("b", "api", json!({"hosts": ["api.b.svc.cluster.local"]}));
    fake.add_policy(
        "b",
        "squatter",
        json!({"hosts": ["api.a.svc.cluster.local", "squat.example"]}),
    );
    fake.add_policy(
        "b",
        "bad",
        json!({"hosts": ["bad.example"], "routes": [{"name": "r", "rateLimit": {"requestsPerSecond": 1, "burst": 0}}]}),
    );
    let (running, stop) = follower(&fake).await;
    let accepted = |ns: &str, name: &str| -> Option<(String, String, String)> {
        let object = fake.policy(ns, name)?;
        let c = object["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Accepted")?
            .clone();
        Some((
            c["status"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
            c["message"].as_str()?.to_owned(),
        ))
    };
    eventually("every resource's condition", || {
        [("a", "api"), ("b", "api"), ("b", "squatter"), ("b", "bad")]
            .iter()
            .all(|(ns, name)| accepted(ns, name).is_some())
    })
    .await;
    assert_eq!(accepted("a", "api").map(|c| c.0), Some("True".into()));
    assert_eq!(accepted("b", "api").map(|c| c.0), Some("True".into()));
    let (status, reason, message) = accepted("b", "squatter").expect("squatter");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "HostConflict")
    );
    assert!(
        message.contains("host api.a.svc.cluster.local belongs to policy a/api"),
        "{message}"
    );
    let (status, reason, message) = accepted("b", "bad").expect("bad");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(
        message.starts_with("kubernetes:b/bad:")
            && message.contains("spec.routes[0].rateLimit.burst: must be at least 1, got 0"),
        "{message}"
    );
    // Served: both `api`s; neither the loser nor the invalid one.
    let served: Vec<String> = running
        .store
        .served()
        .policies
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(served, ["a/api", "b/api"]);
    let _ = stop.send(());
}

/// A control plane following the fake cluster (no TokenReview: loopback is open).
async fn follower(
    fake: &Arc<FakeApiServer>,
) -> (
    sluice_control_plane::serve::Running,
    tokio::sync::oneshot::Sender<()>,
) {
    let (url, _) = fake.start().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = sluice_control_plane::serve::start(
        sluice_control_plane::serve::ServeConfig {
            policies: None,
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls: None,
            cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
            token_file: None,
            kubernetes: Some(kube::Config::new(url.parse().expect("url"))),
            token_review: None,
            operators: Vec::new(),
            telemetry: None,
            webhook: None,
            ca: None,
        },
        async {
            let _ = stopped.await;
        },
    )
    .await
    .expect("serve");
    (running, stop)
}

/// What a replica keeps is in the cluster: a replica that never saw a policy valid
/// serves the last spec that validated from its status, answers its history as the
/// first does, and a rollback through it writes that spec back into the resource.
#[tokio::test]
async fn replicas_agree_on_a_policys_last_good_spec_history_and_rollback() {
    use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
    use sluice_control_plane::api::{HistoryRequest, RollbackRequest};
    let good = json!({"hosts": ["api"], "routes": [{"name": "r", "rateLimit": {"requestsPerSecond": 5, "burst": 5}}]});
    let fake = Arc::new(FakeApiServer::default());
    fake.add_policy("shop", "api", good.clone());
    let (first, stop_first) = follower(&fake).await;
    let id = sluice_policy::PolicyId::parse("shop/api");
    let version = |running: &sluice_control_plane::serve::Running| {
        running
            .store
            .served()
            .policies
            .get(&id)
            .map(|p| p.version.clone())
    };
    eventually("the first replica serves it", || version(&first).is_some()).await;
    let good_version = version(&first).expect("served");
    eventually("its status keeps the accepted spec", || {
        fake.policy("shop", "api").is_some_and(|o| {
            o["status"]["accepted"][0]["version"] == good_version.as_str()
                && o["status"]["accepted"][0]["spec"] == good
        })
    })
    .await;

    // The spec turns invalid (edited while the first replica's watch says nothing).
    {
        let mut policies = fake.policies.lock().unwrap_or_else(|e| e.into_inner());
        let object = policies
            .iter_mut()
            .find(|p| p["metadata"]["name"] == "api")
            .expect("stored");
        object["spec"]["routes"][0]["rateLimit"]["burst"] = json!(0);
        object["metadata"]["generation"] = json!(2);
    }
    // A second replica starts: it never saw the spec valid, and serves it all the same.
    let (second, stop_second) = follower(&fake).await;
    eventually("the second replica lists it", || {
        !second.store.conditions().is_empty()
    })
    .await;
    assert_eq!(version(&second), Some(good_version.clone()));
    let condition = second.store.conditions()[&id].clone();
    assert_eq!((condition.accepted, condition.reason), (false, "Invalid"));

    // Both replicas give the same history (the cluster's)...
    let history = |addr: std::net::SocketAddr| async move {
        let mut client = PolicyDiscoveryClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        client
            .get_history(HistoryRequest {
                policy: "shop/api".into(),
            })
            .await
            .expect("history")
            .into_inner()
            .entries
            .into_iter()
            .map(|e| (e.policy_version, e.generation))
            .collect::<Vec<_>>()
    };
    let from_first = history(first.addr).await;
    assert_eq!(from_first, [(good_version.clone(), 1)]);
    assert_eq!(history(second.addr).await, from_first);

    // ...and a rollback through either writes the good spec back into the resource.
    let mut client = PolicyDiscoveryClient::connect(format!("http://{}", second.addr))
        .await
        .expect("connect");
    let rolled = client
        .rollback(RollbackRequest {
            policy: "shop/api".into(),
            ..Default::default()
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!(rolled.policy_version, good_version);
    assert_eq!(rolled.generation, 3);
    let object = fake.policy("shop", "api").expect("stored");
    assert_eq!(object["spec"], good);
    let _ = (stop_first.send(()), stop_second.send(()));
}
