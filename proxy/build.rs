//! Generates the control-plane gRPC client from the protobuf the control plane
//! owns (`control-plane/proto/`), with protox (pure Rust, no `protoc` needed);
//! and the client and server of the gRPC tests' service (`tests/proto/`), which
//! only the tests include.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../control-plane/proto/sluice/v1/policy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../control-plane/proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    // The OTLP trace service (the span exporter's client; the tests' receiver).
    let otlp = "proto/opentelemetry/proto/collector/trace/v1/trace_service.proto";
    println!("cargo:rerun-if-changed=proto/opentelemetry");
    let fds = protox::compile([otlp], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    let test_protos = [
        "tests/proto/echo.proto",
        "tests/proto/grpc/health/v1/health.proto",
    ];
    for proto in test_protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(test_protos, ["tests/proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
