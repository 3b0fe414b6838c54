//! `sluice-fanout-bench --mode endpoints`: how long one endpoint change (a pod
//! turning unready) takes to reach many proxies subscribed to its Service, and how
//! many bytes each one is sent.
//!
//! Runs everything on loopback in this process: the tests' fake Kubernetes API
//! server holding one Service (`bench/reviews`, `--endpoints` pods in one
//! EndpointSlice) and one hundred others; the control plane (`serve::start` with
//! `--kubernetes` on the fake) on a runtime of its own (`--server-threads`); and the
//! `--streams` subscribers over `--connections` HTTP/2 connections on another, each
//! wanting `bench/reviews` and ACKing every update on receipt. Once every stream
//! has the set (and status shows every ACK) it prints `ready ...`, then marks one
//! pod unready in the slice and measures, from that change at the fake:
//!
//! - when every stream received the new set, and each stream's receive latency;
//! - when `GetStatus` first showed every subscriber ACKed the new version;
//! - the bytes of the update each stream got (protobuf, as encoded on the wire
//!   before HTTP/2 and gRPC framing).
//!
//! The time includes the fake's watch event reaching the control plane's watcher
//! (the part a real API server would add its own latency to). Every wait is bounded
//! by `--timeout`.

#[path = "../../../tests/support/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fake_apiserver::{endpoint_slice, service, FakeApiServer};
use prost::Message;
use sluice_control_plane::api::endpoint_discovery_client::EndpointDiscoveryClient;
use sluice_control_plane::api::policy_discovery_client::PolicyDiscoveryClient;
use sluice_control_plane::api::{EndpointsRequest, StatusRequest};
use sluice_control_plane::serve::{start, ServeConfig, MAX_MESSAGE_BYTES};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{ms, next_event, percentile, NODE_PREFIX, STATUS_POLL};

const SERVICE: &str = "bench/reviews";
/// Services besides the measured one, none of them subscribed: the change must
/// not cost anything per unrelated Service.
const OTHER_SERVICES: usize = 100;

/// What to run.
pub struct Options {
    pub streams: usize,
    pub connections: usize,
    pub endpoints: usize,
    pub server_threads: usize,
    pub timeout: Duration,
}

/// An update as one subscriber received it.
struct Receipt {
    stream: usize,
    version: u64,
    at: Instant,
    bytes: usize,
}

type Event = super::Event<Receipt>;

fn pods(count: usize, unready: Option<usize>) -> Vec<(String, bool)> {
    (0..count)
        .map(|i| {
            let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
            (ip, Some(i) != unready)
        })
        .collect()
}

fn slice_of(pods: &[(String, bool)]) -> serde_json::Value {
    let endpoints: Vec<(&str, bool)> = pods.iter().map(|(ip, r)| (ip.as_str(), *r)).collect();
    endpoint_slice(
        "bench",
        "reviews-1",
        "reviews",
        &[("http", 8080)],
        &endpoints,
    )
}

/// The fake API server and the control plane on `server`'s runtime; the API's URL.
fn start_server(
    server: &tokio::runtime::Runtime,
    fake: &Arc<FakeApiServer>,
    options: &Options,
) -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>)> {
    fake.apply(service(
        "bench",
        "reviews",
        &[("http", 80, serde_json::json!("http"))],
    ));
    fake.apply(slice_of(&pods(options.endpoints, None)));
    for i in 0..OTHER_SERVICES {
        let name = format!("other-{i}");
        fake.apply(service(
            "bench",
            &name,
            &[("", 80, serde_json::json!(8080))],
        ));
        fake.apply(endpoint_slice(
            "bench",
            &format!("{name}-1"),
            &name,
            &[("", 8080)],
            &[("10.2.0.1", true)],
        ));
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let fake = Arc::clone(fake);
    let addr = server.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(fake.serve(listener));
        let config = ServeConfig {
            policies: None,
            listen: "127.0.0.1:0".parse()?,
            tls: None,
            cert_check_every: sluice_control_plane::tls::CERT_CHECK_EVERY,
            token_file: None,
            kubernetes: Some(kube::Config::new(url.parse()?)),
            token_review: None,
            operators: Vec::new(),
            telemetry: None,
            webhook: None,
            ca: None,
        };
        let running = start(config, async {
            let _ = stopped.await;
        })
        .await?;
        let addr = running.addr;
        // Serves on this runtime's workers until `stop`.
        tokio::spawn(running.wait());
        anyhow::Ok(addr)
    })?;
    Ok((format!("http://{addr}"), stop))
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.server_threads)
        .thread_name("control-plane")
        .enable_all()
        .build()?;
    let fake = Arc::new(FakeApiServer::default());
    let (url, stop) = start_server(&server, &fake, &options)?;
    let clients = tokio::runtime::Runtime::new()?;
    let measured = clients.block_on(measure(&options, &url, &fake));
    let _ = stop.send(());
    drop(clients);
    server.shutdown_timeout(Duration::from_secs(1));
    measured
}

async fn measure(options: &Options, url: &str, fake: &FakeApiServer) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_shared(url.to_owned())?.connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        channels.push(
            endpoint
                .connect()
                .await
                .context("cannot reach the control plane")?,
        );
    }
    let mut status = PolicyDiscoveryClient::new(endpoint.connect().await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let subscribing = Instant::now();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    for stream in 0..options.streams {
        let channel = channels[stream % options.connections].clone();
        let events = events_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = subscriber(stream, channel, &events).await {
                let _ = events.send(Event::Failed {
                    stream,
                    error: format!("{e:#}"),
                });
            }
        });
    }
    drop(events_tx);

    // Phase 1: every stream has the set, and the server knows it.
    let mut latest = vec![0u64; options.streams];
    let mut bytes = 0;
    let deadline = subscribing + options.timeout;
    while latest.contains(&0) {
        let r = next_event(&mut events, deadline, "the first set").await?;
        latest[r.stream] = r.version;
        bytes = r.bytes;
    }
    let initial = latest[0];
    wait_all_acked(&mut status, options.streams, initial, deadline).await?;
    println!(
        "ready mode=endpoints streams={} connections={} endpoints={} version={initial} update_bytes={bytes} subscribe_all_acked_ms={:.1}",
        options.streams,
        options.connections,
        options.endpoints,
        ms(subscribing.elapsed())
    );

    // Phase 2: one pod turns unready.
    let changed = Instant::now();
    fake.apply(slice_of(&pods(options.endpoints, Some(0))));
    let deadline = changed + options.timeout;
    let mut first_at: Vec<Option<Instant>> = vec![None; options.streams];
    let mut new_version = 0;
    while first_at.iter().any(Option::is_none) {
        let r = next_event(&mut events, deadline, "the changed set").await?;
        if r.version > initial && first_at[r.stream].is_none() {
            first_at[r.stream] = Some(r.at);
            (new_version, bytes) = (r.version, r.bytes);
        }
    }
    let mut received: Vec<Duration> = first_at
        .iter()
        .flatten()
        .map(|at| at.duration_since(changed))
        .collect();
    received.sort();
    let all_received = received.last().copied().unwrap_or_default();
    let all_acked = wait_all_acked(&mut status, options.streams, new_version, deadline).await?;
    println!(
        "result mode=endpoints streams={} connections={} endpoints={} version={new_version} update_bytes={bytes} \
         total_bytes={} change_to_all_received_ms={:.1} change_to_all_acked_ms={:.1} \
         first_to_last_received_ms={:.1} receive_p50_ms={:.1} receive_p99_ms={:.1} receive_max_ms={:.1}",
        options.streams,
        options.connections,
        options.endpoints,
        bytes * options.streams,
        ms(all_received),
        ms(all_acked.duration_since(changed)),
        ms(all_received.saturating_sub(received.first().copied().unwrap_or_default())),
        ms(percentile(&received, 0.50)),
        ms(percentile(&received, 0.99)),
        ms(all_received),
    );
    println!("done");
    Ok(())
}

/// One simulated proxy: wants the Service, ACKs every update as it arrives.
async fn subscriber(
    stream: usize,
    channel: Channel,
    events: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let node_id = format!("{NODE_PREFIX}{stream}");
    let mut client =
        EndpointDiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(4);
    tx.send(EndpointsRequest {
        node_id: node_id.clone(),
        services: vec![SERVICE.into()],
        resubscribe: true,
        ..Default::default()
    })
    .await?;
    let mut updates = client
        .stream_endpoints(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(update) = updates.message().await? {
        let at = Instant::now();
        tx.send(EndpointsRequest {
            node_id: node_id.clone(),
            response_nonce: update.nonce.clone(),
            ..Default::default()
        })
        .await?;
        let version = update
            .sets
            .iter()
            .find(|s| s.service == SERVICE)
            .map_or(0, |s| s.version);
        let received = Event::Received(Receipt {
            stream,
            version,
            at,
            bytes: update.encoded_len(),
        });
        if events.send(received).is_err() {
            return Ok(());
        }
    }
    bail!("the control plane ended the stream")
}

/// Polls `GetStatus` until every simulated proxy ACKed `version` of the Service.
async fn wait_all_acked(
    status: &mut PolicyDiscoveryClient<Channel>,
    streams: usize,
    version: u64,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    loop {
        let proxies = status
            .get_status(StatusRequest {})
            .await?
            .into_inner()
            .proxies;
        let at = Instant::now();
        let acked = proxies
            .iter()
            .filter(|p| p.node_id.starts_with(NODE_PREFIX))
            .filter(|p| {
                p.endpoint_versions
                    .get(SERVICE)
                    .is_some_and(|v| *v >= version)
            })
            .count();
        if acked >= streams {
            return Ok(at);
        }
        if at >= deadline {
            bail!("timed out: {acked} of {streams} proxies ACKed version {version} in status");
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}
