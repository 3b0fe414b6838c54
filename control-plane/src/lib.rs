//! The Sluice control plane: policy validation today; serving, injection and
//! rules generation build on it.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod diff;
mod discovery;
mod endpoint_discovery;
pub mod endpoints;
pub mod inject;
pub mod kubernetes;
pub mod metrics;
pub mod serve;
pub mod services;
pub mod slo;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod validate;
pub mod webhook;
