//! The span exporter: OTLP over gRPC (`opentelemetry.proto.collector.trace.v1.
//! TraceService/Export`, from the official definitions in `proxy/proto/`), off the
//! request path. Requests put finished spans on a bounded queue
//! ([`crate::trace::SpanQueue`], never waited on); this task takes them in batches
//! of up to [`MAX_BATCH`], waiting at most [`BATCH_DELAY`] for a batch to fill, and
//! sends each batch once, within [`EXPORT_TIMEOUT`]. A batch the collector does not
//! take (down, slow, refusing) is dropped and counted
//! (`sluice_trace_spans_dropped_total{reason="export_failed"}`): no retries, so a
//! dead collector costs one failed call per batch and never memory; meanwhile
//! requests keep queueing, and drop what does not fit (`reason="queue_full"`).

use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::IntCounter;
use tokio::sync::mpsc::Receiver;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::trace::{SpanData, SpanKind, Value};

/// The OTLP protobuf types and the trace service's client.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.common.v1");
        }
    }
    pub mod resource {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.resource.v1");
        }
    }
    pub mod trace {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.trace.v1");
        }
    }
    pub mod collector {
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
            }
        }
    }
}

use proto::collector::trace::v1::trace_service_client::TraceServiceClient;
use proto::collector::trace::v1::ExportTraceServiceRequest;
use proto::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use proto::resource::v1::Resource;
use proto::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};

/// Spans per export call at most (OpenTelemetry SDKs' default batch size).
pub const MAX_BATCH: usize = 512;
/// How long a batch waits to fill after its first span.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// One export call's time limit, connecting included.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where spans go and who they are from.
#[derive(Debug, Clone)]
pub struct Config {
    /// `http://host:port` or `https://host:port` (OTLP/gRPC, usually port 4317).
    pub endpoint: String,
    /// PEM CA certificate for an `https://` endpoint.
    pub ca_pem: Option<Vec<u8>>,
    /// The resource: `service.name` and the rest (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource: Vec<(String, String)>,
}

impl Config {
    /// The resource attributes: `service.name` (`OTEL_SERVICE_NAME`, else
    /// `sluice-proxy`), then `OTEL_RESOURCE_ATTRIBUTES`' `key=value` pairs (comma
    /// separated, percent-encoded values), the proxy's version.
    pub fn resource_from(
        service_name: Option<&str>,
        attributes: Option<&str>,
    ) -> Vec<(String, String)> {
        let mut resource = vec![(
            "service.name".to_owned(),
            service_name
                .filter(|s| !s.is_empty())
                .unwrap_or("sluice-proxy")
                .to_owned(),
        )];
        for pair in attributes.unwrap_or("").split(',') {
            let Some((key, value)) = pair.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), percent_decode(value.trim()));
            if key.is_empty() || key == "service.name" && service_name.is_some() {
                continue;
            }
            match resource.iter_mut().find(|(k, _)| k == key) {
                Some(kv) => kv.1 = value,
                None => resource.push((key.to_owned(), value)),
            }
        }
        resource.push((
            "service.version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ));
        resource
    }
}

/// `%XX` escapes decoded (the W3C Baggage form `OTEL_RESOURCE_ATTRIBUTES` uses);
/// anything malformed is kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// The export request for `spans` from `resource`.
pub fn request(resource: &[(String, String)], spans: Vec<SpanData>) -> ExportTraceServiceRequest {
    let text = |v: String| AnyValue {
        value: Some(any_value::Value::StringValue(v)),
    };
    let kv = |key: &str, value: AnyValue| KeyValue {
        key: key.to_owned(),
        value: Some(value),
        ..KeyValue::default()
    };
    let spans = spans
        .into_iter()
        .map(|s| Span {
            trace_id: s.trace_id.to_be_bytes().to_vec(),
            span_id: s.span_id.to_be_bytes().to_vec(),
            parent_span_id: match s.parent_span_id {
                0 => Vec::new(),
                p => p.to_be_bytes().to_vec(),
            },
            // W3C trace flags: exported spans are sampled ones.
            flags: 1,
            name: s.name,
            kind: match s.kind {
                SpanKind::Server => span::SpanKind::Server,
                SpanKind::Client => span::SpanKind::Client,
            } as i32,
            start_time_unix_nano: s.start_unix_nanos,
            end_time_unix_nano: s.end_unix_nanos,
            attributes: s
                .attributes
                .into_iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::Str(s) => text(s),
                        Value::Int(i) => AnyValue {
                            value: Some(any_value::Value::IntValue(i)),
                        },
                    };
                    kv(k, value)
                })
                .collect(),
            status: Some(match s.error {
                Some(message) => Status {
                    message,
                    code: status::StatusCode::Error as i32,
                },
                None => Status::default(),
            }),
            ..Span::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource
                    .iter()
                    .map(|(k, v)| kv(k, text(v.clone())))
                    .collect(),
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "sluice-proxy".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..InstrumentationScope::default()
                }),
                spans,
                schema_url: "https://opentelemetry.io/schemas/1.26.0".to_owned(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The exporter as a pingora background service.
pub struct ExportSpans {
    pub config: Config,
    pub spans: std::sync::Mutex<Option<Receiver<SpanData>>>,
    pub exported: IntCounter,
    pub failed: IntCounter,
}

impl ExportSpans {
    /// Exports until the queue closes or `shutdown` says so (then what is queued
    /// goes in one last batch).
    pub async fn run(&self, mut rx: Receiver<SpanData>, mut shutdown: ShutdownWatch) {
        let mut endpoint = match Endpoint::from_shared(self.config.endpoint.clone()) {
            Ok(e) => e.connect_timeout(EXPORT_TIMEOUT).timeout(EXPORT_TIMEOUT),
            Err(e) => {
                tracing::error!(endpoint = self.config.endpoint, error = %e, "OTLP endpoint is not a URL; spans are not exported");
                return;
            }
        };
        if let Some(pem) = &self.config.ca_pem {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint = match endpoint.tls_config(tls) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "OTLP endpoint's TLS settings; spans are not exported");
                    return;
                }
            };
        }
        // Connected on first use and again after a failure, by the channel itself.
        let mut client = TraceServiceClient::new(endpoint.connect_lazy());
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut failing = false;
        loop {
            let closing = tokio::select! {
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return;
                    }
                    false
                }
                _ = shutdown.changed() => true,
            };
            if !closing {
                // Let the batch fill, for at most BATCH_DELAY.
                let fill = async {
                    while batch.len() < MAX_BATCH {
                        let room = MAX_BATCH - batch.len();
                        if rx.recv_many(&mut batch, room).await == 0 {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(BATCH_DELAY, fill).await;
            } else {
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(span) => batch.push(span),
                        Err(_) => break,
                    }
                }
            }
            let n = batch.len() as u64;
            let req = request(&self.config.resource, std::mem::take(&mut batch));
            match client.export(req).await {
                Ok(answer) => {
                    let rejected = answer
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                        .min(n);
                    self.exported.inc_by(n - rejected);
                    self.failed.inc_by(rejected);
                    if failing {
                        tracing::info!(
                            endpoint = self.config.endpoint,
                            "OTLP collector takes spans again"
                        );
                        failing = false;
                    }
                }
                Err(e) => {
                    self.failed.inc_by(n);
                    if !failing {
                        // Once per outage, not per batch.
                        tracing::warn!(endpoint = self.config.endpoint, error = %e, "OTLP export failed; spans are dropped until the collector answers");
                        failing = true;
                    }
                }
            }
            batch = Vec::with_capacity(MAX_BATCH);
            if closing {
                return;
            }
        }
    }
}

#[async_trait]
impl BackgroundService for ExportSpans {
    async fn start(&self, shutdown: ShutdownWatch) {
        let rx = self
            .spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(rx) = rx {
            self.run(rx, shutdown).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_names_the_service_and_takes_the_environments_attributes() {
        let r = Config::resource_from(
            Some("checkout"),
            Some("k8s.pod.name=checkout-1, k8s.namespace.name=shop,service.name=ignored,team=a%2Cb,broken"),
        );
        let get = |k: &str| r.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("service.name"), Some("checkout"));
        assert_eq!(get("k8s.pod.name"), Some("checkout-1"));
        assert_eq!(get("k8s.namespace.name"), Some("shop"));
        assert_eq!(get("team"), Some("a,b"));
        assert_eq!(get("broken"), None);
        let default = Config::resource_from(None, Some("service.name=from-attributes"));
        assert_eq!(
            default[0],
            ("service.name".into(), "from-attributes".into())
        );
        assert_eq!(Config::resource_from(None, None)[0].1, "sluice-proxy");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn spans_become_otlp_with_ids_in_big_endian_bytes_and_an_error_status() {
        let span = SpanData {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            parent_span_id: 0,
            name: "GET all".into(),
            kind: SpanKind::Server,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: vec![
                ("sluice.decision", Value::Str("shed".into())),
                ("http.response.status_code", Value::Int(503)),
            ],
            error: Some("shed".into()),
        };
        let req = request(&Config::resource_from(None, None), vec![span]);
        let s = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            s.trace_id,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(s.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(s.parent_span_id.is_empty(), "a root span has none");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        let status = s.status.as_ref().unwrap();
        assert_eq!(status.code, status::StatusCode::Error as i32);
        assert_eq!(status.message, "shed");
        assert_eq!(s.attributes.len(), 2);
        assert_eq!(
            s.attributes[1].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(503))
        );
    }
}
