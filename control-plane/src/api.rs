//! The generated gRPC API (`proto/sluice/v1/policy.proto`).
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sluice.v1");
