//! The Sluice control plane: policy validation today; serving, injection and
//! rules generation build on it.
#![forbid(unsafe_code)]

pub mod inject;
pub mod slo;
pub mod validate;
pub mod webhook;
