//! What the first bytes of a connection say it speaks: HTTP/2 (the connection
//! preface), HTTP/1 (a request line), or anything else (opaque TCP). The proxy's
//! transparent listeners decide with it before any HTTP parser reads a byte
//! (`sluice-proxy`'s `detect` module says why and when); it lives here, beside the
//! parsers, so the fuzz targets reach it (`properties::detect`).
//!
//! Invariants: it looks at no more than [`MAX_LOOK`] bytes, decides every input at
//! least that long, and never changes its mind: once it decides on some bytes, it
//! decides the same on every longer input that starts with them.

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes [`classify`] looks at, at most: any input this long is decided.
pub const MAX_LOOK: usize = 8 * 1024;
/// The longest method token taken for HTTP/1 (the registered ones are at most 17
/// bytes; extension methods rarely exceed a dozen).
pub const MAX_METHOD: usize = 32;
/// The HTTP/1 version prefix after the request target.
const HTTP1_VERSION: &[u8] = b"HTTP/1.";

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// What `bytes`, the first ones of a connection, say: `None` when it cannot tell
/// yet (never for `MAX_LOOK` bytes or more).
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let bounded = bytes.len() >= MAX_LOOK;
    let look = &bytes[..bytes.len().min(MAX_LOOK)];
    let undecided = if bounded { Some(Protocol::Http1) } else { None };
    // The method: a token, then one space.
    let Some(end) = look.iter().take(MAX_METHOD + 1).position(|&b| !is_tchar(b)) else {
        return if look.len() <= MAX_METHOD {
            None
        } else {
            Some(Protocol::Opaque)
        };
    };
    if end == 0 || look[end] != b' ' {
        return Some(Protocol::Opaque);
    }
    // The target: visible characters, then one space.
    let rest = &look[end + 1..];
    let Some(end) = rest.iter().position(|&b| !b.is_ascii_graphic()) else {
        return undecided;
    };
    if end == 0 || rest[end] != b' ' {
        return Some(Protocol::Opaque);
    }
    let version = &rest[end + 1..];
    let n = version.len().min(HTTP1_VERSION.len());
    if version[..n] != HTTP1_VERSION[..n] {
        return Some(Protocol::Opaque);
    }
    if n == HTTP1_VERSION.len() {
        return Some(Protocol::Http1);
    }
    undecided
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    crate::syntax::is_token(&[b])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzzed_property_holds_on_the_usual_first_bytes() {
        for data in [
            &b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"[..],
            H2_PREFACE,
            b"*1\r\n$4\r\nPING\r\n",
            b"get key\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
            b"PRI * HTTP/1.1\r\n",
            &[b'G'; MAX_LOOK + 1],
        ] {
            crate::properties::detect(data);
        }
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"get key\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET /"), None);
    }
}
