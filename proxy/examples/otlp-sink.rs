//! An OTLP/gRPC trace receiver that takes every batch (the collector stand-in of
//! bench/tracing.sh and of the demo): `TraceService/Export` from the official
//! definitions (proxy/proto/), answering success. With `--print`, one JSON line
//! per span on stdout (trace and span ids in hex, parent, name, kind, status code,
//! string and integer attributes).
//!
//! Usage: `otlp-sink --listen 127.0.0.1:4317 [--print]`; prints `listening ADDR`
//! on stderr once bound (port 0 picks one).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sluice_proxy::otlp::proto::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use sluice_proxy::otlp::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use sluice_proxy::otlp::proto::common::v1::any_value;

struct Sink {
    print: bool,
    spans: Arc<AtomicU64>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        for rs in &req.resource_spans {
            for ss in &rs.scope_spans {
                self.spans
                    .fetch_add(ss.spans.len() as u64, Ordering::Relaxed);
                if !self.print {
                    continue;
                }
                for s in &ss.spans {
                    let attributes: serde_json::Map<String, serde_json::Value> = s
                        .attributes
                        .iter()
                        .filter_map(|kv| {
                            let v = match kv.value.as_ref()?.value.as_ref()? {
                                any_value::Value::StringValue(s) => serde_json::json!(s),
                                any_value::Value::IntValue(i) => serde_json::json!(i),
                                _ => return None,
                            };
                            Some((kv.key.clone(), v))
                        })
                        .collect();
                    let line = serde_json::json!({
                        "trace_id": hex(&s.trace_id),
                        "span_id": hex(&s.span_id),
                        "parent_span_id": hex(&s.parent_span_id),
                        "name": s.name,
                        "kind": s.kind,
                        "status": s.status.as_ref().map_or(0, |st| st.code),
                        "attributes": attributes,
                    });
                    println!("{line}");
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:4317".parse()?;
    let mut print = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen ADDR")?.parse()?,
            "--print" => print = true,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("listening {}", listener.local_addr()?);
    let spans = Arc::new(AtomicU64::new(0));
    let sink = Sink {
        print,
        spans: Arc::clone(&spans),
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    eprintln!("spans {}", spans.load(Ordering::Relaxed));
    Ok(())
}
