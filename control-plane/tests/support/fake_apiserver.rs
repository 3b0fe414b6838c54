//! A fake Kubernetes API server for tests and for `scripts/k8s-test` (as the program
//! `examples/fake-apiserver.rs`): plain HTTP, answering what the control plane asks
//! of a real one.
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: looks the token up in its
//!   table and answers as kube-apiserver does (201 either way; `authenticated`,
//!   `audiences`, the ServiceAccount user and its pod, or an `error`). A token is
//!   authenticated only when the review asks for its audience.
//! - `GET …/trafficpolicies` (list, then watch): the TrafficPolicy objects it was
//!   given, and a watch that stays open with nothing to say.
//! - `PATCH /apis/sluice.dev/v1alpha1/namespaces/NS/trafficpolicies/NAME/status` with
//!   `application/merge-patch+json`: merges the patch's `status` into the stored
//!   object (nothing else of it changes, as with the real status subresource), gives
//!   it a new resourceVersion and answers the object; 404 for an object it does not
//!   hold, 415 for another patch type. Every such PATCH is recorded
//!   ([`StatusPatch`]); no watch event follows (the policy watch has none).
//! - `GET /api/v1/services`, `GET /apis/discovery.k8s.io/v1/endpointslices` and
//!   `GET /api/v1/pods` (list, then watch; a label selector is not applied): the
//!   Services, EndpointSlices and Pods it holds; a test changes
//!   them with [`FakeApiServer::apply`] and [`FakeApiServer::delete`], and each
//!   change is an event on the open watches (a watch from resourceVersion N first
//!   gets every change after N, as the real one does).
//! - Anything else: 404 with a `Status`.
//!
//! Every TokenReview asked is recorded, so a test can check the audience sent.

// Each user (tests, the proxy's tests, the example program) uses its own subset.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Who a token belongs to in the fake's table.
#[derive(Debug, Clone)]
pub struct Account {
    pub audience: String,
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
}

/// The fake's state: its token table, and the reviews it was asked.
#[derive(Default)]
pub struct FakeApiServer {
    pub tokens: Mutex<HashMap<String, Account>>,
    /// `(token, audiences)` of every TokenReview asked.
    pub reviews: Mutex<Vec<(String, Vec<String>)>>,
    /// Answer TokenReviews with 403, as an API server does for a control plane
    /// whose ClusterRole lacks `create tokenreviews`.
    pub forbid_reviews: Mutex<bool>,
    /// The TrafficPolicy objects the list returns.
    pub policies: Mutex<Vec<Value>>,
    /// Answer this many more TrafficPolicy lists and watches with 500, as an API
    /// server that is restarting does.
    pub failing_policy_requests: Mutex<usize>,
    /// Answer this many more TrafficPolicy status PATCHes with 500.
    pub failing_status_patches: Mutex<usize>,
    /// Every TrafficPolicy status PATCH asked, oldest first.
    pub status_patches: Mutex<Vec<StatusPatch>>,
    /// Services and EndpointSlices, and their changes.
    pub objects: Mutex<Objects>,
    /// Wakes the open watches after a change.
    changed: tokio::sync::Notify,
}

/// One PATCH of a TrafficPolicy's status, as asked (answered or not).
#[derive(Debug, Clone, PartialEq)]
pub struct StatusPatch {
    pub namespace: String,
    pub name: String,
    pub content_type: String,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// The body, `Null` if it was not JSON.
    pub patch: Value,
}

/// The kinds of object the fake lists and watches with events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
}

impl Kind {
    fn of_path(path: &str) -> Option<Kind> {
        if path.ends_with("/services") {
            Some(Kind::Service)
        } else if path.ends_with("/endpointslices") {
            Some(Kind::EndpointSlice)
        } else if path.ends_with("/pods") {
            Some(Kind::Pod)
        } else {
            None
        }
    }

    fn list(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::Pod => ("v1", "PodList"),
        }
    }
}

/// The objects with events, and every change (at most [`MAX_EVENTS`] kept).
#[derive(Default)]
pub struct Objects {
    /// The last resourceVersion given out.
    rv: u64,
    items: BTreeMap<(Kind, String, String), Value>,
    /// `(resourceVersion, kind, watch event line)`, oldest first.
    events: Vec<(u64, Kind, String)>,
}

/// Changes a test makes are few; the bound only keeps a runaway test finite.
const MAX_EVENTS: usize = 100_000;

/// A Service `namespace/name` with `ports` as `(name, port, targetPort)`.
pub fn service(namespace: &str, name: &str, ports: &[(&str, u16, Value)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port_name, port, target)| {
            json!({"name": port_name, "port": port, "targetPort": target, "protocol": "TCP"})
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-svc-{namespace}-{name}")},
        "spec": {"ports": ports, "type": "ClusterIP"},
    })
}

/// A Pod `namespace/name` running as `service_account`; `meshed` gives it the
/// injector's label and a proxy that asks the control plane for its certificate.
pub fn pod(namespace: &str, name: &str, service_account: &str, meshed: bool) -> Value {
    let (labels, containers) = if meshed {
        (
            json!({"app": "x", "sluice.dev/proxy": "injected"}),
            json!([{"name": "sluice-proxy", "image": "sluice",
                "args": ["--token-file", "/var/run/secrets/sluice/token", "--identity-from-control-plane"],
                "restartPolicy": "Always"}]),
        )
    } else {
        (json!({"app": "x"}), json!([]))
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-pod-{namespace}-{name}"),
            "labels": labels},
        "spec": {"serviceAccountName": service_account, "initContainers": containers,
            "containers": [{"name": "app", "image": "app"}]},
    })
}

/// An EndpointSlice `namespace/slice` of Service `service`: `ports` as `(name,
/// port)`, `endpoints` as `(ip, ready)` (pod `<service>-<last octet>`; an unready
/// one is neither serving nor terminating).
pub fn endpoint_slice(
    namespace: &str,
    slice: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[(&str, bool)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| json!({"name": name, "port": port, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| {
            let pod = format!("{service}-{}", ip.rsplit(['.', ':']).next().unwrap_or(ip));
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
                "zone": "zone-a",
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice, "namespace": namespace, "uid": format!("uid-eps-{namespace}-{slice}"),
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

impl FakeApiServer {
    /// Adds `token` for `namespace/service_account` (pod `pod`), valid for `audience`.
    pub fn add_token(
        &self,
        token: &str,
        audience: &str,
        namespace: &str,
        service_account: &str,
        pod: &str,
    ) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                token.into(),
                Account {
                    audience: audience.into(),
                    namespace: namespace.into(),
                    service_account: service_account.into(),
                    pod: pod.into(),
                },
            );
    }

    /// Adds a TrafficPolicy (`spec` as JSON) named `namespace/name` to the list.
    pub fn add_policy(&self, namespace: &str, name: &str, spec: Value) {
        let mut policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        let rv = (policies.len() + 1).to_string();
        policies.push(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv, "generation": 1, "uid": format!("uid-{namespace}-{name}")},
            "spec": spec,
        }));
    }

    /// The TrafficPolicy `namespace/name` as stored now (its status included).
    pub fn policy(&self, namespace: &str, name: &str) -> Option<Value> {
        self.policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|p| is_named(p, namespace, name))
            .cloned()
    }

    /// A PUT of the TrafficPolicy `namespace/name`: its spec replaced (status kept, as
    /// the main resource of an object with a status subresource ignores it), a new
    /// resourceVersion and generation. A stale resourceVersion is a 409.
    fn replace_policy(&self, namespace: &str, name: &str, body: &[u8]) -> (u16, Value) {
        let Ok(sent) = serde_json::from_slice::<Value>(body) else {
            return (
                400,
                json!({"kind": "Status", "status": "Failure", "code": 400, "reason": "BadRequest"}),
            );
        };
        let mut policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        let next_rv = policy_resource_version(&policies) + 1;
        let Some(stored) = policies.iter_mut().find(|p| is_named(p, namespace, name)) else {
            return (
                404,
                json!({"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound"}),
            );
        };
        let current_rv = stored["metadata"]["resourceVersion"].clone();
        if sent["metadata"]["resourceVersion"] != current_rv {
            return (
                409,
                json!({"kind": "Status", "status": "Failure", "code": 409, "reason": "Conflict",
                "message": "the object has been modified; please apply your changes to the latest version"}),
            );
        }
        stored["spec"] = sent["spec"].clone();
        stored["metadata"]["resourceVersion"] = json!(next_rv.to_string());
        let generation = stored["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        stored["metadata"]["generation"] = json!(generation);
        (200, stored.clone())
    }

    /// Removes the TrafficPolicy `namespace/name`; false if it did not exist.
    pub fn remove_policy(&self, namespace: &str, name: &str) -> bool {
        let mut policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        let before = policies.len();
        policies.retain(|p| !is_named(p, namespace, name));
        policies.len() < before
    }

    /// The status PATCHes asked for `namespace/name`.
    pub fn status_patches_of(&self, namespace: &str, name: &str) -> Vec<StatusPatch> {
        self.status_patches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| p.namespace == namespace && p.name == name)
            .cloned()
            .collect()
    }

    /// Answers a PATCH of `namespace/name`'s status, as the status subresource does.
    fn patch_policy_status(
        &self,
        namespace: &str,
        name: &str,
        content_type: &str,
        query: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let patch: Option<Value> = serde_json::from_slice(body).ok();
        let field_manager = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("fieldManager="))
            .map(str::to_owned);
        self.status_patches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(StatusPatch {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                content_type: content_type.to_owned(),
                field_manager,
                patch: patch.clone().unwrap_or(Value::Null),
            });
        let failure = |code: u16, reason: &str, message: String| {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code});
            (code, status)
        };
        {
            let mut failing = self
                .failing_status_patches
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *failing > 0 {
                *failing -= 1;
                return failure(
                    500,
                    "InternalError",
                    "etcdserver: request timed out (fake API server)".into(),
                );
            }
        }
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        if media_type != "application/merge-patch+json" {
            return failure(
                415,
                "UnsupportedMediaType",
                format!("the fake API server takes merge patches only, not {content_type:?}"),
            );
        }
        let Some(patch) = patch else {
            return failure(400, "BadRequest", "the patch is not JSON".into());
        };
        let mut policies = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        let next_rv = policy_resource_version(&policies) + 1;
        let Some(object) = policies.iter_mut().find(|p| is_named(p, namespace, name)) else {
            let mut answer = failure(
                404,
                "NotFound",
                format!("trafficpolicies.sluice.dev \"{name}\" not found"),
            );
            answer.1["details"] =
                json!({"name": name, "group": "sluice.dev", "kind": "trafficpolicies"});
            return answer;
        };
        // The status subresource takes the patch's status and ignores the rest.
        let mut patched = object.clone();
        merge_patch(&mut patched, &patch);
        match patched.get("status") {
            Some(status) => object["status"] = status.clone(),
            None => {
                if let Some(o) = object.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        object["metadata"]["resourceVersion"] = json!(next_rv.to_string());
        (200, object.clone())
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, objects: &mut Objects, kind: Kind, event: &str, object: &Value) {
        let line = format!("{}\n", json!({"type": event, "object": object}));
        objects.events.push((objects.rv, kind, line));
        if objects.events.len() > MAX_EVENTS {
            objects.events.remove(0);
        }
        self.changed.notify_waiters();
    }

    /// Creates or replaces a Service, EndpointSlice or Pod (by its metadata's namespace
    /// and name), as `kubectl apply` would: an ADDED or MODIFIED event.
    pub fn apply(&self, mut object: Value) {
        let kind = match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("Pod") => Kind::Pod,
            other => panic!("the fake keeps Services, EndpointSlices and Pods, not {other:?}"),
        };
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let mut objects = self.objects();
        objects.rv += 1;
        object["metadata"]["resourceVersion"] = json!(objects.rv.to_string());
        let event = match objects.items.insert((kind, ns, name), object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        self.record(&mut objects, kind, event, &object);
    }

    /// Deletes a Service or EndpointSlice: a DELETED event; false if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut objects = self.objects();
        let Some(mut object) = objects
            .items
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        objects.rv += 1;
        object["metadata"]["resourceVersion"] = json!(objects.rv.to_string());
        self.record(&mut objects, kind, "DELETED", &object);
        true
    }

    fn list(&self, kind: Kind) -> Value {
        let objects = self.objects();
        let items: Vec<&Value> = objects
            .items
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v)
            .collect();
        let (api_version, list_kind) = kind.list();
        json!({"apiVersion": api_version, "kind": list_kind,
            "metadata": {"resourceVersion": objects.rv.to_string()}, "items": items})
    }

    /// Streams the changes of `kind` after resourceVersion `from`, until the client
    /// goes (bounded by the connection's life).
    async fn watch(&self, stream: &mut TcpStream, kind: Kind, mut from: u64) {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        loop {
            // Registered before looking, so a change between the look and the wait
            // still wakes it.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lines: Vec<(u64, String)> = self
                .objects()
                .events
                .iter()
                .filter(|(rv, k, _)| *k == kind && *rv > from)
                .map(|(rv, _, line)| (*rv, line.clone()))
                .collect();
            for (rv, line) in lines {
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                from = rv;
            }
            notified.await;
        }
    }

    /// Whether to fail this TrafficPolicy request (one of `failing_policy_requests`).
    fn fail_policy_request(&self) -> bool {
        let mut failing = self
            .failing_policy_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let fail = *failing > 0;
        *failing = failing.saturating_sub(1);
        fail
    }

    /// Serves on `listener` until the runtime ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        while let Ok((stream, _)) = listener.accept().await {
            let fake = Arc::clone(&self);
            tokio::spawn(async move { fake.connection(stream).await });
        }
    }

    /// Binds 127.0.0.1:0, serves in the background; the URL to give kube.
    pub async fn start(self: &Arc<Self>) -> (String, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(Arc::clone(self).serve(listener));
        (format!("http://{addr}"), addr)
    }

    async fn connection(&self, mut stream: TcpStream) {
        // Bounded: one request per pass until the client closes.
        while let Some((line, head, body)) = read_request(&mut stream).await {
            let mut words = line.split(' ');
            let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            let ok = if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
                let (status, answer) = self.review(&body);
                respond(&mut stream, status, &answer).await
            } else if method == "GET"
                && path.ends_with("/trafficpolicies")
                && self.fail_policy_request()
            {
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcdserver: leader changed (fake API server)", "reason": "InternalError", "code": 500});
                respond(&mut stream, 500, &status).await
            } else if let (true, Some(kind)) = (method == "GET", Kind::of_path(path)) {
                if target.contains("watch=") {
                    let from = target
                        .split(['?', '&'])
                        .find_map(|kv| kv.strip_prefix("resourceVersion="))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    self.watch(&mut stream, kind, from).await;
                    false
                } else {
                    respond(&mut stream, 200, &self.list(kind)).await
                }
            } else if method == "GET"
                && path.ends_with("/trafficpolicies")
                && target.contains("watch=")
            {
                // An open watch with nothing to report (kube resumes it if it ends).
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                let _ = stream.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                false
            } else if method == "GET" && path.ends_with("/trafficpolicies") {
                let items = self
                    .policies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let rv = policy_resource_version(&items) + 1;
                let list = json!({
                    "apiVersion": "sluice.dev/v1alpha1", "kind": "TrafficPolicyList",
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items,
                });
                respond(&mut stream, 200, &list).await
            } else if let (true, Some((namespace, name))) = (method == "GET", policy_path(path)) {
                match self.policy(namespace, name) {
                    Some(object) => respond(&mut stream, 200, &object).await,
                    None => {
                        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": format!("trafficpolicies {name:?} not found"), "reason": "NotFound", "code": 404});
                        respond(&mut stream, 404, &status).await
                    }
                }
            } else if let (true, Some((namespace, name))) = (method == "PUT", policy_path(path)) {
                let (status, answer) = self.replace_policy(namespace, name, &body);
                respond(&mut stream, status, &answer).await
            } else if let (true, Some((namespace, name))) =
                (method == "PATCH", policy_status_path(path))
            {
                let query = target.split_once('?').map_or("", |(_, q)| q);
                let content_type = header(&head, "content-type").unwrap_or_default();
                let (status, answer) =
                    self.patch_policy_status(namespace, name, &content_type, query, &body);
                respond(&mut stream, status, &answer).await
            } else {
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": format!("{path} not found (fake API server)"), "reason": "NotFound", "code": 404});
                respond(&mut stream, 404, &status).await
            };
            if !ok {
                return;
            }
        }
    }

    /// A TokenReview's answer, as kube-apiserver gives it.
    fn review(&self, body: &[u8]) -> (u16, Value) {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let token = request["spec"]["token"].as_str().unwrap_or("").to_owned();
        let audiences: Vec<String> = request["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        self.reviews
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((token.clone(), audiences.clone()));
        if *self
            .forbid_reviews
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            return (
                403,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:sluice-system:sluice-control-plane\" cannot create resource \"tokenreviews\"",
                "reason": "Forbidden", "code": 403}),
            );
        }
        let account = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&token)
            .cloned();
        let spec = json!({"token": token, "audiences": audiences});
        let status = match account {
            Some(a) if audiences.is_empty() || audiences.contains(&a.audience) => json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{}:{}", a.namespace, a.service_account),
                    "uid": "00000000-0000-0000-0000-000000000001",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", a.namespace), "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/pod-name": [a.pod]},
                },
                "audiences": if audiences.is_empty() { vec![a.audience.clone()] } else { audiences.clone() },
            }),
            Some(a) => json!({"user": {}, "error": format!(
                "[invalid bearer token, token audiences [\"{}\"] is invalid for the target audiences {:?}]",
                a.audience, audiences)}),
            None => {
                json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
            }
        };
        (
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"creationTimestamp": null}, "spec": spec, "status": status}),
        )
    }
}

fn is_named(object: &Value, namespace: &str, name: &str) -> bool {
    object["metadata"]["namespace"].as_str() == Some(namespace)
        && object["metadata"]["name"].as_str() == Some(name)
}

/// The highest resourceVersion among `policies`, or their count if higher (the
/// list's version was always above every object's).
fn policy_resource_version(policies: &[Value]) -> u64 {
    policies
        .iter()
        .filter_map(|p| p["metadata"]["resourceVersion"].as_str()?.parse().ok())
        .max()
        .unwrap_or(0)
        .max(policies.len() as u64)
}

/// `(namespace, name)` of `/apis/sluice.dev/v1alpha1/namespaces/NS/trafficpolicies/NAME/status`.
/// `/apis/sluice.dev/v1alpha1/namespaces/NS/trafficpolicies/NAME` -> (NS, NAME).
fn policy_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/apis/sluice.dev/v1alpha1/namespaces/")?;
    let (namespace, name) = rest.split_once("/trafficpolicies/")?;
    let plain = |s: &str| !s.is_empty() && !s.contains('/');
    (plain(namespace) && plain(name)).then_some((namespace, name))
}

fn policy_status_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/apis/sluice.dev/v1alpha1/namespaces/")?;
    let (namespace, rest) = rest.split_once("/trafficpolicies/")?;
    let name = rest.strip_suffix("/status")?;
    let plain = |s: &str| !s.is_empty() && !s.contains('/');
    (plain(namespace) && plain(name)).then_some((namespace, name))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything
/// else (a list included) replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(object) = target {
        for (key, value) in fields {
            if value.is_null() {
                object.remove(key);
            } else {
                merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The value of header `name` in a request head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, value) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// Reads one request: its request line, head and body (by Content-Length). Bounded:
/// a head of at most 64 KiB, a body of at most 1 MiB.
async fn read_request(stream: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(1024 * 1024);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = head.lines().next().unwrap_or("").to_owned();
    Some((line, head, buf[head_end..head_end + length].to_vec()))
}

async fn respond(stream: &mut TcpStream, status: u16, body: &Value) -> bool {
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        415 => "Unsupported Media Type",
        500 => "Internal Server Error",
        _ => "Not Found",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .is_ok()
}
