//! REFERENCE HTTP/1.1 request parser for differential testing (std only).
//!
//! Slow but meant to be obviously correct: a literal reading of the ABNF of
//! RFC 9112 (HTTP/1.1), RFC 9110 (HTTP semantics) and RFC 3986 (URI), as
//! constrained by h1/POLICY.md ("the strict policy"), which is the
//! contract. One small function per ABNF rule, each commented with its section.
//!
//! Matchers named `match_*` take `(s, i)` and return the index just past what
//! they matched (or `None`); predicates named `is_*` test a whole slice.
//!
//! # Precedence (which status wins when several things are wrong)
//!
//! The head is consumed left to right, one line at a time; a line ends at the
//! first CRLF. The rule is "the first error in byte order wins", with errors
//! attributed as follows:
//!
//! 1. Positional errors, detected while a line is being scanned, at the byte
//!    where they become certain (earliest byte first):
//!    - (a) head limit (431): byte index 65536 would belong to the head, i.e.
//!      the first 65536 bytes (leading empty lines included) do not contain
//!      the end of the head. This is checked *before* asking whether the byte
//!      is available, so an incomplete head that already holds >= 65536 bytes
//!      is 431, not Incomplete (it can no longer end within the limit);
//!    - (b) bare LF (400) at the LF; bare CR (400) once the byte after the CR
//!      is available (a CR at the very end of the input is Incomplete);
//!    - (c) field-line length (431) at the 16385th byte of a field line's
//!      content (the CRLF is not counted);
//!    - (d) request-target length (414) at the 8193rd byte of the target,
//!      provided the line so far is `token SP` followed by no other SP (an
//!      invalid method is an earlier error, reported as 400 when the line
//!      completes).
//! 2. Content errors, checked when the line is complete (its CRLF seen):
//!    - request line: structure/method (400), target length (414), version
//!      (505 for a well-formed HTTP/D.D other than 1.0/1.1, else 400), then
//!      target form and bytes (400);
//!    - field line: field count (431 for the 101st) before its syntax (400),
//!      then the per-field rules (400): Host repeated / invalid / empty where
//!      the target carries an authority; Content-Length repeated / invalid /
//!      with Transfer-Encoding; Transfer-Encoding repeated / in HTTP/1.0 /
//!      with Content-Length / malformed.
//! 3. At the empty line ending the head: missing Host in HTTP/1.1 (400), then
//!    an unsupported-but-well-formed transfer coding list (501). 501 is thus
//!    only returned for a head that is otherwise acceptable.
//!
//! Consequences: a status, once returned for some input, is returned for every
//! extension of that input (prefix-stable); `Incomplete` is returned only when
//! the bytes present contain no error by the rules above. Errors *inside* a
//! line that is not yet complete (e.g. a NUL in a field value) are reported
//! only when its CRLF arrives (or a positional limit fires first).
//!
//! The chunked decoder follows the same scheme: the size line and each trailer
//! line are scanned for bare CR/LF and limits (positional), then their content
//! is checked when complete.

mod chunked;
mod grammar;
mod head;
mod lines;
mod streams;
#[cfg(test)]
mod tests;

pub use chunked::*;
pub use grammar::*;
pub use head::*;
pub use lines::*;
pub use streams::*;

// ---------------------------------------------------------------------------
// Limits (POLICY.md "Limits" and "Chunked request bodies")
// ---------------------------------------------------------------------------

/// Whole head, leading empty lines and final CRLF included (-> 431).
pub const MAX_HEAD: usize = 65536;
/// Field lines in the head (-> 431).
pub const MAX_FIELDS: usize = 100;
/// One field line, CRLF excluded (-> 431).
pub const MAX_FIELD_LINE: usize = 16384;
/// request-target (-> 414).
pub const MAX_TARGET: usize = 8192;
/// chunk size line, extensions included, CRLF excluded (-> 400).
pub const MAX_CHUNK_SIZE_LINE: usize = 4096;
/// trailer-section: its field lines with their CRLFs, final CRLF excluded (-> 400).
pub const MAX_TRAILER_SECTION: usize = 16384;

pub(crate) const CR: u8 = b'\r';
pub(crate) const LF: u8 = b'\n';
pub(crate) const SP: u8 = b' ';
pub(crate) const HTAB: u8 = b'\t';
pub(crate) const DQUOTE: u8 = b'"';

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No Content-Length, no Transfer-Encoding: body length 0 (RFC 9112 6.3 rule 7).
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Vec<u8>,
    /// As received.
    pub target: Vec<u8>,
    /// (1,0) or (1,1).
    pub version: (u8, u8),
    /// Names as received, values with OWS trimmed.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub framing: Framing,
    /// Effective authority: absolute-form's / authority-form's, else the Host
    /// value (empty when there is no Host field or it is empty).
    pub authority: Vec<u8>,
    /// The target as it must be forwarded: origin-form (path+query, "/" if the
    /// path is empty); "*" for asterisk-form; the authority for CONNECT.
    pub origin_path: Vec<u8>,
    /// Bytes of the head incl. leading empty lines and the final CRLF.
    pub head_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Status(u16),
    Incomplete,
}

/// A request with its body, as found in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub request: Request,
    /// Decoded body (chunk data concatenated, or the Content-Length bytes).
    pub body: Vec<u8>,
    /// Chunk data as received, one entry per chunk (empty unless chunked).
    pub chunks: Vec<Vec<u8>>,
    /// Trailer fields (names as received, values OWS-trimmed).
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of input used: head + body framing.
    pub len: usize,
}

/// Field lines: (name as received, value OWS-trimmed).
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

pub(crate) fn bad() -> Reject {
    Reject::Status(400)
}

pub(crate) fn status(code: u16) -> Reject {
    Reject::Status(code)
}
