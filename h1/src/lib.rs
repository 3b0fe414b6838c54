//! Sluice's HTTP/1.1 wire format, without I/O: strict parsing of what clients and
//! backends send, and the one canonical form Sluice forwards.
//!
//! Why a crate of its own: this is the code an attacker reads first. Request
//! smuggling lives in the gap between two parsers that frame the same bytes
//! differently, so Sluice refuses every request that RFC 9112 lets parsers read in
//! more than one way (bare LF, two Host fields, Content-Length beside
//! Transfer-Encoding, loose chunk framing ...) and forwards what it accepts in one
//! canonical form (CRLF, single SP, origin-form, one Host, at most one
//! Content-Length, canonical chunk framing). Kept free of tokio and pingora so it
//! is fuzzed on its own (`fuzz/`) against a literal reading of the RFC
//! ([`reference`], behind the `reference` feature).
//!
//! - [`request`]: request heads (strict) and their forwarded form.
//! - [`response`]: response heads from backends and their relayed form.
//! - [`chunked`]: the chunked coding, decoded strictly and re-encoded canonically.
//! - [`stream`]: a client's byte stream as a sequence of canonical requests (what
//!   the proxy's pingora engine reads).
//!
//! With the `reference` feature: [`reference`], the literal RFC reader, and
//! [`properties`], what the fuzz targets check against it.
//!
//! Every bound is a constant below; exceeding one is refused with the status it
//! names.
#![forbid(unsafe_code)]

#[cfg(any(test, feature = "reference"))]
pub mod cases;
pub mod chunked;
pub mod detect;
#[cfg(any(test, feature = "reference"))]
pub mod properties;
#[cfg(any(test, feature = "reference"))]
#[allow(dead_code)]
pub mod reference;
pub mod request;
pub mod response;
pub mod stream;
pub mod syntax;

pub use chunked::ChunkedDecoder;
pub use request::{Body, Form, RequestHead};
pub use response::{parse_response, Framing, ResponseHead};
pub use stream::RequestStream;

/// The longest request head (request line, fields, final CRLF): 431 beyond it.
/// Response heads have the same bound (502).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most field lines in a head: 431 beyond it.
pub const MAX_FIELDS: usize = 100;
/// The longest single field line (name, colon, value): 431 beyond it.
pub const MAX_FIELD_LINE: usize = 16 * 1024;
/// The longest request target: 414 beyond it.
pub const MAX_TARGET: usize = 8 * 1024;
/// The longest chunk-size line, extensions included: 400 beyond it.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The longest trailer section after the last chunk: 400 beyond it.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why a message is refused: the status a request gets (a backend's malformed
/// response is a 502 whatever this says) and a reason for the answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

impl Refusal {
    /// 400: the message cannot be read one way only.
    pub const fn bad(reason: &'static str) -> Self {
        Refusal {
            status: 400,
            reason,
        }
    }

    /// 431: a head or field beyond its bound.
    pub const fn too_large(reason: &'static str) -> Self {
        Refusal {
            status: 431,
            reason,
        }
    }
}
