//! The chunked transfer coding (RFC 9112 §7.1), decoded strictly and re-encoded in
//! canonical form as it streams through.
//!
//! Strict: every line ends in CRLF; a chunk size is hex digits (any number of
//! leading zeros, a value within 64 bits) followed by nothing but well-formed
//! extensions; chunk data is followed by exactly CRLF; trailer fields are field
//! lines. Anything else is refused as soon as the bytes that make it so arrive,
//! never after waiting for more.
//!
//! Canonical: `{size:x}\r\n`, data, `\r\n` per chunk; `0\r\n`, trailer fields as
//! `name: value\r\n` (when kept), `\r\n`. Extensions never go on: nothing in
//! Sluice reads them, and they are where parsers disagree most.

use crate::syntax::{hex_number, is_field_value, is_token, trim_ows};
use crate::{Refusal, MAX_CHUNK_LINE, MAX_TRAILERS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// In chunk data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer field lines until an empty line.
    Trailers,
    Done,
}

/// Decodes one chunked body from successive slices of input.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: State,
    keep_trailers: bool,
    trailer_bytes: usize,
}

/// What one call consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes used; the rest (an incomplete line) is to be passed again with more.
    pub consumed: usize,
    /// The body ended at `consumed`.
    pub done: bool,
}

fn malformed() -> Refusal {
    Refusal::bad("malformed chunked encoding")
}

/// Appends `n` in lowercase hex without leading zeros.
pub fn push_hex(out: &mut Vec<u8>, n: u64) {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[((n >> (i * 4)) & 0xf) as usize]);
    }
}

/// `BWS` (RFC 9110 §5.6.3): optional whitespace where the grammar tolerates it.
fn skip_bws(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &bytes[n..]
}

/// `quoted-string` at the start of `bytes`: the rest after it.
fn quoted_string(bytes: &[u8]) -> Option<&[u8]> {
    let mut i = 1;
    if bytes.first() != Some(&b'"') {
        return None;
    }
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Some(&bytes[i + 1..]),
            // quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
            b'\\' => match bytes.get(i + 1) {
                Some(&c) if c == b'\t' || c >= 0x20 && c != 0x7f => i += 2,
                _ => return None,
            },
            // qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
    None
}

/// The token at the start of `bytes`: (token, rest).
fn token(bytes: &[u8]) -> (&[u8], &[u8]) {
    let n = bytes
        .iter()
        .take_while(|&&b| is_token(std::slice::from_ref(&b)))
        .count();
    bytes.split_at(n)
}

/// `chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )`, the whole of
/// `bytes`. Whitespace is BWS only where the grammar has it: before ";" and around
/// "="; after the last name or value it is not ("5;a=b " is refused).
fn is_chunk_ext(mut bytes: &[u8]) -> bool {
    loop {
        if bytes.is_empty() {
            return true;
        }
        let Some(rest) = skip_bws(bytes).strip_prefix(b";") else {
            return false;
        };
        let (name, rest) = token(skip_bws(rest));
        if name.is_empty() {
            return false;
        }
        bytes = match skip_bws(rest).strip_prefix(b"=") {
            Some(value) => {
                let value = skip_bws(value);
                if value.first() == Some(&b'"') {
                    match quoted_string(value) {
                        Some(rest) => rest,
                        None => return false,
                    }
                } else {
                    let (v, rest) = token(value);
                    if v.is_empty() {
                        return false;
                    }
                    rest
                }
            }
            None => rest,
        };
    }
}

/// A chunk-size line without its CRLF: the size.
fn chunk_size(line: &[u8]) -> Result<u64, Refusal> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (size, ext) = line.split_at(digits);
    // Whitespace right after the size is BWS only when an extension follows
    // ("5 ;a" is fine, "5 " is not: RFC 9112 §7.1.1).
    if !ext.is_empty() && skip_bws(ext).first() != Some(&b';') {
        return Err(malformed());
    }
    if !is_chunk_ext(ext) {
        return Err(malformed());
    }
    hex_number(size).ok_or(malformed())
}

/// Whether an incomplete size line can still become a valid one. Keeps a client
/// that sends garbage from being waited for (the line bound would end it, but
/// only after MAX_CHUNK_LINE bytes).
fn could_be_size_line(partial: &[u8]) -> bool {
    let digits = partial.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &partial[digits..];
    if rest.is_empty() {
        return true;
    }
    // The size must have at least one digit, and then only BWS or ";" may follow;
    // a CR may only be the last byte so far.
    if digits == 0 {
        return false;
    }
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    if rest.contains(&b'\r') || rest.contains(&b'\n') {
        return false;
    }
    let after_ws = skip_bws(rest);
    after_ws.is_empty() || after_ws[0] == b';'
}

impl ChunkedDecoder {
    /// `keep_trailers`: re-encode trailer fields (else they are checked and dropped).
    pub fn new(keep_trailers: bool) -> Self {
        ChunkedDecoder {
            keep_trailers,
            ..ChunkedDecoder::default()
        }
    }

    /// The body ended.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending the canonical encoding of what it decoded to
    /// `out`. Stops at the end of the body; bytes after it are not consumed.
    pub fn transcode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, Refusal> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                State::Done => {
                    return Ok(Progress {
                        consumed: pos,
                        done: true,
                    })
                }
                State::Data(left) => {
                    let take = left.min(rest.len() as u64) as usize;
                    out.extend_from_slice(&rest[..take]);
                    pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    if left > 0 {
                        return Ok(Progress {
                            consumed: pos,
                            done: false,
                        });
                    }
                }
                State::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        out.extend_from_slice(b"\r\n");
                        pos += 2;
                        self.state = State::Size;
                    }
                    [] | [b'\r'] => {
                        return Ok(Progress {
                            consumed: pos,
                            done: false,
                        })
                    }
                    _ => return Err(Refusal::bad("chunk data not followed by CRLF")),
                },
                State::Size | State::Trailers => {
                    let Some(line) = self.line(rest)? else {
                        return Ok(Progress {
                            consumed: pos,
                            done: false,
                        });
                    };
                    pos += line.len() + 2;
                    if self.state == State::Size {
                        let size = chunk_size(line)?;
                        push_hex(out, size);
                        out.extend_from_slice(b"\r\n");
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::Data(size)
                        };
                    } else if line.is_empty() {
                        out.extend_from_slice(b"\r\n");
                        self.state = State::Done;
                    } else {
                        self.trailer(line, out)?;
                    }
                }
            }
        }
    }

    /// The next complete line of `rest` without its CRLF; `None` while incomplete
    /// (and still possibly valid).
    fn line<'a>(&mut self, rest: &'a [u8]) -> Result<Option<&'a [u8]>, Refusal> {
        let bound = if self.state == State::Size {
            MAX_CHUNK_LINE
        } else {
            MAX_TRAILERS - self.trailer_bytes
        };
        match rest.iter().position(|&b| b == b'\n') {
            Some(lf) if lf > bound => Err(Refusal::bad("chunk line too long")),
            Some(lf) => {
                let line = rest[..lf]
                    .strip_suffix(b"\r")
                    .ok_or(Refusal::bad("bare LF in chunked encoding"))?;
                if line.contains(&b'\r') {
                    return Err(Refusal::bad("bare CR in chunked encoding"));
                }
                Ok(Some(line))
            }
            None if rest.len() > bound => Err(Refusal::bad("chunk line too long")),
            None if self.state == State::Size && !could_be_size_line(rest) => Err(malformed()),
            None => {
                let seen = rest.strip_suffix(b"\r").unwrap_or(rest);
                if seen.contains(&b'\r') {
                    return Err(Refusal::bad("bare CR in chunked encoding"));
                }
                Ok(None)
            }
        }
    }

    /// One trailer field line: checked as a head's field line, re-encoded if kept.
    fn trailer(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        self.trailer_bytes += line.len() + 2;
        if self.trailer_bytes > MAX_TRAILERS {
            return Err(Refusal::bad("trailer section too large"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Refusal::bad("malformed trailer field"))?;
        let (name, value) = (&line[..colon], trim_ows(&line[colon + 1..]));
        if !is_token(name) || !is_field_value(value) {
            return Err(Refusal::bad("malformed trailer field"));
        }
        if self.keep_trailers {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole body at once: (canonical output, consumed).
    fn transcode(body: &[u8], keep: bool) -> Result<(String, usize), Refusal> {
        let mut decoder = ChunkedDecoder::new(keep);
        let mut out = Vec::new();
        let p = decoder.transcode(body, &mut out)?;
        assert!(p.done, "incomplete: {:?}", String::from_utf8_lossy(body));
        Ok((String::from_utf8(out).unwrap(), p.consumed))
    }

    fn refused(body: &[u8]) -> bool {
        let mut out = Vec::new();
        ChunkedDecoder::new(true).transcode(body, &mut out).is_err()
    }

    #[test]
    fn canonical_form() {
        let body =
            b"5;ext=1\r\nhello\r\n006 ; a = \"q \\\" d\" ; b\r\n world\r\n0\r\nX-T: t \r\n\r\nNEXT";
        let (out, consumed) = transcode(body, true).unwrap();
        assert_eq!(out, "5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: t\r\n\r\n");
        assert_eq!(consumed, body.len() - 4);
        let (out, _) = transcode(body, false).unwrap();
        assert_eq!(out, "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
        let (out, _) =
            transcode(b"00000000000000000000A\r\n0123456789\r\n000\r\n\r\n", true).unwrap();
        assert_eq!(out, "a\r\n0123456789\r\n0\r\n\r\n");
    }

    #[test]
    fn every_split_gives_the_same_result() {
        let body = b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nTrailer: t\r\n\r\nNEXT";
        let whole = transcode(body, true).unwrap();
        for split in 0..body.len() {
            let mut decoder = ChunkedDecoder::new(true);
            let mut out = Vec::new();
            let first = decoder.transcode(&body[..split], &mut out).unwrap();
            let mut pending = body[first.consumed..split].to_vec();
            pending.extend_from_slice(&body[split..]);
            let second = decoder.transcode(&pending, &mut out).unwrap();
            assert!(second.done, "split {split}");
            assert_eq!(first.consumed + second.consumed, whole.1, "split {split}");
            assert_eq!(String::from_utf8(out).unwrap(), whole.0, "split {split}");
        }
    }

    #[test]
    fn refuses_loose_framing() {
        for body in [
            &b"\r\n"[..],                // empty size line
            b"5 \r\nhello\r\n0\r\n\r\n", // whitespace after the size
            b"5\t\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n", // whitespace before it
            b"5\nhello\r\n0\r\n\r\n",    // bare LF
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",      // data not followed by CRLF
            b"5;\r\nhello\r\n0\r\n\r\n",   // extension without a name
            b"5;a=\r\nhello\r\n0\r\n\r\n", // without a value
            b"5;a b\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\r\nhello\r\n0\r\n\r\n", // unterminated quote
            b"5;a=b c\r\nhello\r\n0\r\n\r\n",
            b"5;a=b \r\nhello\r\n0\r\n\r\n",
            b"5;a \r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\n",
            b"zz\r\n",
            b"10000000000000000\r\n", // 17 significant digits
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\nX : t\r\n\r\n",
            b"0\r\nX: a\x00b\r\n\r\n",
            b"0\r\n\n",
            b"5\rx\nhello",
        ] {
            assert!(refused(body), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn refuses_garbage_before_the_line_ends() {
        // No LF yet, but nothing can make these valid: refused now, not after a wait.
        for partial in [&b"zz"[..], b"5 x", b"5\rx", b";", b"5 ;a\r "] {
            assert!(refused(partial), "{:?}", String::from_utf8_lossy(partial));
        }
        let mut out = Vec::new();
        let mut d = ChunkedDecoder::new(true);
        assert_eq!(
            d.transcode(b"00000005 ;a=b\r", &mut out).unwrap(),
            Progress {
                consumed: 0,
                done: false
            }
        );
    }

    #[test]
    fn bounds() {
        let long = format!("5;{}=1\r\nhello\r\n0\r\n\r\n", "a".repeat(MAX_CHUNK_LINE));
        assert!(refused(long.as_bytes()));
        assert!(refused(
            format!("5;{}", "a".repeat(MAX_CHUNK_LINE + 1)).as_bytes()
        ));
        let trailers = format!("0\r\n{}\r\n", "x: y\r\n".repeat(MAX_TRAILERS / 6 + 1));
        assert!(refused(trailers.as_bytes()));
    }

    proptest::proptest! {
        /// Any chunks, in any extension and zero-padding dress, read in any
        /// pieces: the data comes out whole, in the canonical form.
        #[test]
        fn any_body_in_any_reads_decodes_to_its_data(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..40), 0..8),
            zeros in 0usize..20,
            ext in proptest::bool::ANY,
            step in 1usize..64,
        ) {
            let mut body = Vec::new();
            let mut canonical = Vec::new();
            for chunk in &chunks {
                body.extend(format!("{}{:X}{}\r\n", "0".repeat(zeros), chunk.len(), if ext { ";a=\"b\"" } else { "" }).bytes());
                body.extend_from_slice(chunk);
                body.extend_from_slice(b"\r\n");
                canonical.extend(format!("{:x}\r\n", chunk.len()).bytes());
                canonical.extend_from_slice(chunk);
                canonical.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\n");
            canonical.extend_from_slice(b"0\r\n\r\n");
            let mut decoder = ChunkedDecoder::new(true);
            let mut out = Vec::new();
            let mut pending = Vec::new();
            let mut done = false;
            for piece in body.chunks(step) {
                pending.extend_from_slice(piece);
                let p = decoder.transcode(&pending, &mut out).unwrap();
                pending.drain(..p.consumed);
                done = p.done;
            }
            proptest::prop_assert!(done);
            proptest::prop_assert_eq!(out, canonical);
        }
    }

    #[test]
    fn hex() {
        for (n, text) in [
            (0, "0"),
            (1, "1"),
            (255, "ff"),
            (4096, "1000"),
            (u64::MAX, "ffffffffffffffff"),
        ] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, text.as_bytes());
        }
    }
}
