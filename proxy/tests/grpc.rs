//! gRPC through the proxy, with a real tonic client and real tonic servers: a
//! call's outcome is its grpc-status (a backend answering UNAVAILABLE opens the
//! breaker, and the client then gets UNAVAILABLE from the proxy itself, naming the
//! breaker), a limited route answers RESOURCE_EXHAUSTED, a client's grpc-timeout
//! bounds the call and goes upstream shortened, and `retries.on: [unavailable]`
//! reaches a second backend.

mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{log_lines, metrics_once, start_with, TempDir};
use tonic::{Code, Request, Response, Status};

mod pb {
    tonic::include_proto!("sluice.test");
}
mod health {
    tonic::include_proto!("grpc.health.v1");
}
use health::health_check_response::ServingStatus;
use health::health_server::{Health, HealthServer};
use health::{HealthCheckRequest, HealthCheckResponse};
use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::Msg;

/// A backend of the Echo service.
#[derive(Clone)]
struct Backend {
    name: &'static str,
    /// `Get` answers UNAVAILABLE (a backend in trouble).
    flaky: bool,
    calls: Arc<AtomicUsize>,
    /// What its health service says of `sluice.test.Echo`.
    serving: bool,
    health_checks: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Health for Backend {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.health_checks.fetch_add(1, Ordering::SeqCst);
        if request.into_inner().service != "sluice.test.Echo" {
            return Err(Status::not_found("unknown service"));
        }
        let status = match self.serving {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }
}

#[tonic::async_trait]
impl Echo for Backend {
    async fn get(&self, _: Request<Msg>) -> Result<Response<Msg>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.flaky {
            return Err(Status::unavailable(format!("{} is flaky", self.name)));
        }
        Ok(Response::new(Msg {
            text: self.name.into(),
        }))
    }

    async fn fail(&self, _: Request<Msg>) -> Result<Response<Msg>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unavailable(format!("{} is down", self.name)))
    }

    type StreamStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Msg, Status>> + Send>>;

    async fn stream(&self, _: Request<Msg>) -> Result<Response<Self::StreamStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let items = vec![
            Ok(Msg {
                text: self.name.into(),
            }),
            Err(Status::unavailable("gone mid-stream")),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// Serves `backend` on a free loopback port (h2c), for the test's life.
async fn serve(backend: Backend) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(backend.clone()))
            .add_service(HealthServer::new(backend))
            .serve_with_incoming(incoming),
    );
    addr
}

fn backend(name: &'static str, flaky: bool) -> Backend {
    Backend {
        name,
        flaky,
        calls: Arc::new(AtomicUsize::new(0)),
        serving: true,
        health_checks: Arc::new(AtomicUsize::new(0)),
    }
}

/// A client of the Echo service through the proxy, for host `grpc`.
async fn client(proxy: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .expect("endpoint")
        .origin("http://grpc".parse().expect("origin"))
        .connect()
        .await
        .expect("connect to the proxy");
    EchoClient::new(channel)
}

fn msg() -> Request<Msg> {
    Request::new(Msg { text: "hi".into() })
}

fn policy(backends: &[SocketAddr], routes: &str) -> String {
    let list: String = backends
        .iter()
        .map(|a| format!("    - {{address: \"{a}\", protocol: h2c}}\n"))
        .collect();
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: grpc}}\nspec:\n  hosts: [grpc]\n  loadBalancer: {{algorithm: weighted-round-robin}}\n  backends:\n{list}  routes:\n{routes}"
    )
}

#[tokio::test]
async fn unavailable_opens_the_breaker_and_the_client_then_gets_unavailable_from_the_proxy() {
    let down = backend("down", false);
    let addr = serve(down.clone()).await;
    let dir = TempDir::new();
    let yaml = policy(
        &[addr],
        "    - name: fail\n      match: {grpc: {service: sluice.test.Echo, method: Fail}}\n      circuitBreaker: {consecutiveFailures: 3, openFor: 60s}\n    - name: stream\n      match: {grpc: {service: sluice.test.Echo, method: Stream}}\n      circuitBreaker: {consecutiveFailures: 2, openFor: 60s}\n",
    );
    let proxy = start_with(&dir, &yaml, &["--h2c"]).await;
    let mut client = client(proxy.listen_addr()).await;
    for _ in 0..3 {
        let status = client.fail(msg()).await.expect_err("the backend fails");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "down is down");
    }
    let status = client.fail(msg()).await.expect_err("the breaker answers");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("circuit breaker"),
        "the proxy names the breaker: {status:?}"
    );
    assert_eq!(
        down.calls.load(Ordering::SeqCst),
        3,
        "the open breaker sent nothing"
    );

    // A status in the trailers (after a message) counts the same.
    for _ in 0..2 {
        let mut stream = client
            .stream(msg())
            .await
            .expect("stream starts")
            .into_inner();
        let first = stream.message().await.expect("a message");
        assert_eq!(first.map(|m| m.text).as_deref(), Some("down"));
        let end = stream.message().await.expect_err("then the failure");
        assert_eq!(end.code(), Code::Unavailable);
    }
    let status = client.stream(msg()).await.expect_err("the breaker answers");
    assert!(status.message().contains("circuit breaker"), "{status:?}");

    // Metrics class the failures by their gRPC status: 5xx, not 2xx.
    let text = metrics_once(
        &proxy,
        "sluice_requests_total{code_class=\"5xx\",decision=\"breaker_open\",direction=\"outbound\",policy=\"grpc\",route=\"fail\"}",
        1.0,
    )
    .await;
    assert!(
        text.contains("sluice_requests_total{code_class=\"5xx\",decision=\"allowed\",direction=\"outbound\",policy=\"grpc\",route=\"fail\"} 3"),
        "{text}"
    );
    // Outlier detection and the upstream counters see the failed calls as failures
    // (3 trailers-only, 2 in the trailers), not as successes.
    assert!(
        text.lines()
            .any(|l| l.starts_with("sluice_upstream_requests_total{")
                && l.contains("outcome=\"grpc_error\"")
                && l.ends_with(" 5")),
        "{text}"
    );
    // 3 failures, the refusal, 2 streams, the refusal.
    let log = log_lines(&proxy, 7).await;
    assert!(
        log.iter()
            .any(|l| l["route"] == "fail" && l["grpc_status"] == 14),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_limited_route_answers_resource_exhausted() {
    let ok = backend("ok", false);
    let addr = serve(ok.clone()).await;
    let dir = TempDir::new();
    let yaml = policy(
        &[addr],
        "    - name: get\n      match: {grpc: {service: sluice.test.Echo}}\n      rateLimit: {requestsPerSecond: 0.01, burst: 2}\n",
    );
    let proxy = start_with(&dir, &yaml, &["--h2c"]).await;
    let mut client = client(proxy.listen_addr()).await;
    for _ in 0..2 {
        let reply = client.get(msg()).await.expect("within the limit");
        assert_eq!(reply.into_inner().text, "ok");
    }
    let status = client.get(msg()).await.expect_err("limited");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("rate limit"), "{status:?}");
    assert_eq!(ok.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn retries_on_unavailable_reach_a_second_backend() {
    let flaky = backend("flaky", true);
    let good = backend("good", false);
    let addrs = [serve(flaky.clone()).await, serve(good.clone()).await];
    let dir = TempDir::new();
    let yaml = policy(
        &addrs,
        "    - name: get\n      match: {grpc: {service: sluice.test.Echo, method: Get}}\n      retries: {attempts: 1, on: [unavailable], budget: {ratio: 1.0, minPerSecond: 100}}\n",
    );
    let proxy = start_with(&dir, &yaml, &["--h2c"]).await;
    let mut client = client(proxy.listen_addr()).await;
    for i in 0..6 {
        let reply = client
            .get(msg())
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
        assert_eq!(reply.into_inner().text, "good");
    }
    assert!(
        flaky.calls.load(Ordering::SeqCst) >= 1,
        "round robin tried the flaky one"
    );
    assert_eq!(good.calls.load(Ordering::SeqCst), 6);
}

/// An h2c backend that never answers, and keeps the `grpc-timeout` it was sent.
async fn silent_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let timeout = req
                        .headers()
                        .get("grpc-timeout")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    seen.lock().expect("lock").push(timeout);
                    // Never answered, kept open until the connection goes.
                    held.push(respond);
                }
            });
        }
    });
    (addr, kept)
}

/// One unary call on a bare h2 connection (gRPC framing by hand), with
/// `grpc-timeout: 100m`: tonic's client would enforce that deadline itself, and
/// the test is whether the proxy does. The response head and trailers, merged,
/// and whether it was trailers-only (one HEADERS frame ending the stream).
async fn call_with_deadline(proxy: SocketAddr) -> (http::HeaderMap, bool) {
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut h2, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri("http://grpc/sluice.test.Echo/Get")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "100m")
        .body(())
        .expect("request");
    let (response, mut body) = h2.send_request(request, false).expect("send");
    // An empty message: not compressed, length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .expect("body");
    let response = response.await.expect("a response");
    let (head, mut body) = response.into_parts();
    assert_eq!(head.status, 200);
    let mut headers = head.headers;
    let trailers_only = body.is_end_stream();
    if !trailers_only {
        while let Some(chunk) = body.data().await {
            chunk.unwrap_or_else(|e| panic!("data after {headers:?}: {e}"));
        }
        if let Some(trailers) = body.trailers().await.expect("trailers") {
            headers.extend(trailers);
        }
    }
    (headers, trailers_only)
}

#[tokio::test]
async fn a_client_grpc_timeout_bounds_the_call_and_goes_upstream_shortened() {
    let (addr, seen) = silent_backend().await;
    let dir = TempDir::new();
    let yaml = policy(&[addr], "    - name: get\n      timeout: 30s\n");
    let proxy = start_with(&dir, &yaml, &["--h2c"]).await;
    let started = Instant::now();
    let (answer, trailers_only) = call_with_deadline(proxy.listen_addr()).await;
    assert!(trailers_only, "the proxy's own status is trailers-only");
    let took = started.elapsed();
    let header = |name: &str| answer.get(name).and_then(|v| v.to_str().ok());
    // DEADLINE_EXCEEDED, from the proxy itself.
    assert_eq!(header("grpc-status"), Some("4"), "{answer:?}");
    assert!(
        header("grpc-message").is_some_and(|m| m.contains("timeout")),
        "{answer:?}"
    );
    // Far from the route's 30 s: the client's 100 ms decided (generous bound).
    assert!(took < Duration::from_secs(10), "{took:?}");
    let sent = seen.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let forwarded = sluice_proxy::exchange::grpc::parse_timeout(sent[0].as_bytes())
        .unwrap_or_else(|| panic!("a grpc-timeout went upstream: {sent:?}"));
    assert!(
        forwarded <= Duration::from_millis(100) && forwarded > Duration::ZERO,
        "{forwarded:?}"
    );
}

#[tokio::test]
async fn a_grpc_health_check_takes_a_not_serving_backend_out_of_the_balance() {
    let serving = backend("serving", false);
    let draining = Backend {
        serving: false,
        ..backend("draining", false)
    };
    let addrs = [serve(serving.clone()).await, serve(draining.clone()).await];
    let list: String = addrs
        .iter()
        .map(|a| format!("    - {{address: \"{a}\", protocol: h2c}}\n"))
        .collect();
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: grpc}}\nspec:\n  hosts: [grpc]\n  backends:\n{list}  healthCheck: {{grpc: {{service: sluice.test.Echo}}, interval: 200ms, timeout: 150ms, unhealthyAfter: 1, healthyAfter: 1}}\n"
    );
    let dir = TempDir::new();
    let proxy = start_with(&dir, &yaml, &["--h2c"]).await;
    let mut client = client(proxy.listen_addr()).await;
    // Once the draining backend's check has failed, every call goes to the other
    // (bounded: 10 s; the checks run every 200 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(client.get(msg()).await.expect("a call").into_inner().text);
        }
        if names.iter().all(|n| n == "serving") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the draining backend still gets calls: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = draining.calls.load(Ordering::SeqCst);
    for _ in 0..10 {
        let reply = client.get(msg()).await.expect("a call");
        assert_eq!(reply.into_inner().text, "serving");
    }
    assert_eq!(draining.calls.load(Ordering::SeqCst), before);
    // Both were asked by the gRPC health protocol, over h2c.
    assert!(serving.health_checks.load(Ordering::SeqCst) >= 1);
    assert!(draining.health_checks.load(Ordering::SeqCst) >= 1);
}
