//! Programs for trying and measuring Sluice, and the fakes its tests run against:
//! none of this is linked into the proxy.
//!
//! - [`upstream`]: a small HTTP/1.1 backend that misbehaves on demand, served by
//!   `sluice-demo-upstream` and started in-process by the proxy's integration tests;
//! - [`client`]: a minimal keep-alive HTTP/1.1 client, used by `sluice-demo-load`,
//!   `sluice-bench-load` and the integration tests;
//! - [`cli`]: the binaries' exit codes (64 for a usage error), as the proxy's.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod upstream;
