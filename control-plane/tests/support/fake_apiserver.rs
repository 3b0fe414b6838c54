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
//! - `GET /api/v1/services` and `GET /apis/discovery.k8s.io/v1/endpointslices`
//!   (list, then watch): the Services and EndpointSlices it holds; a test changes
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
    /// Services and EndpointSlices, and their changes.
    pub objects: Mutex<Objects>,
    /// Wakes the open watches after a change.
    changed: tokio::sync::Notify,
}

/// The kinds of object the fake lists and watches with events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn of_path(path: &str) -> Option<Kind> {
        if path.ends_with("/services") {
            Some(Kind::Service)
        } else if path.ends_with("/endpointslices") {
            Some(Kind::EndpointSlice)
        } else {
            None
        }
    }

    fn list(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
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
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv, "uid": format!("uid-{namespace}-{name}")},
            "spec": spec,
        }));
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

    /// Creates or replaces a Service or EndpointSlice (by its metadata's namespace
    /// and name), as `kubectl apply` would: an ADDED or MODIFIED event.
    pub fn apply(&self, mut object: Value) {
        let kind = match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            other => panic!("the fake keeps Services and EndpointSlices, not {other:?}"),
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
        while let Some((line, body)) = read_request(&mut stream).await {
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
                let list = json!({
                    "apiVersion": "sluice.dev/v1alpha1", "kind": "TrafficPolicyList",
                    "metadata": {"resourceVersion": (items.len() + 1).to_string()}, "items": items,
                });
                respond(&mut stream, 200, &list).await
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

/// Reads one request: its request line and body (by Content-Length). Bounded: a
/// head of at most 64 KiB, a body of at most 1 MiB.
async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
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
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
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
    Some((line, buf[head_end..head_end + length].to_vec()))
}

async fn respond(stream: &mut TcpStream, status: u16, body: &Value) -> bool {
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        201 => "Created",
        403 => "Forbidden",
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
