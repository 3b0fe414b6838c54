//! Generates the control-plane gRPC client from the protobuf the control plane
//! owns (`control-plane/proto/`), with protox (pure Rust, no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../control-plane/proto/sluice/v1/policy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../control-plane/proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
