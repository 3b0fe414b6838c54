//! Response heads from backends: parsed with httparse, relayed to clients in
//! canonical form.
//!
//! A backend is read leniently where that is unambiguous (a bare LF ends a line,
//! as RFC 9112 §2.2 allows; identical Content-Length repeats are one) and the
//! client always gets one form: CRLF line ends, an HTTP/1.1 status line, at most
//! one Content-Length and none beside Transfer-Encoding, no hop-by-hop fields.
//! What cannot be read one way (conflicting lengths, a bare CR, obs-fold) is
//! refused (the proxy answers 502).

use std::mem::MaybeUninit;

use crate::request::{names, nomination_dropped};
use crate::syntax::{bare_line_break, decimal_number, trim_ows};
use crate::{Refusal, MAX_FIELDS, MAX_HEAD};

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    UntilClose,
}

/// A parsed response head: its length in the buffer and what matters for relaying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The backend's connection cannot carry another exchange afterwards.
    pub close: bool,
    /// The head as received is already canonical and can be copied as is.
    verbatim: bool,
}

/// A response field about the backend's connection: the hop-by-hop set plus
/// `Upgrade` (an offer to switch the backend connection's protocol; the 101 that
/// would accept one is never relayed by the fast path).
fn is_hop_by_hop(name: &[u8]) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
}

fn parse_fields<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<(usize, httparse::Response<'h, 'b>)>, Refusal> {
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, fields)
    {
        Ok(httparse::Status::Complete(n)) => Ok(Some((n, resp))),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            Err(Refusal::too_large("response head too large"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            Err(Refusal::too_large("too many response header fields"))
        }
        Err(_) => Err(Refusal::bad("malformed response head")),
    }
}

/// Which fields of a response stay behind: hop-by-hop ones, those Connection names
/// (never framing fields), repeated Content-Lengths, and any Content-Length beside
/// Transfer-Encoding (RFC 9112 §6.3: the coding decides; relaying both would let
/// the client decide otherwise).
struct Dropper<'a, 'b> {
    fields: &'a [httparse::Header<'b>],
    coded: bool,
    length_seen: bool,
}

impl Dropper<'_, '_> {
    fn dropped(&mut self, name: &[u8]) -> bool {
        if name.eq_ignore_ascii_case(b"content-length") {
            let drop = self.coded || self.length_seen;
            self.length_seen = true;
            return drop;
        }
        is_hop_by_hop(name)
            || (nomination_dropped(name)
                && self
                    .fields
                    .iter()
                    .any(|c| c.name.eq_ignore_ascii_case("connection") && names(c.value, name)))
    }
}

impl ResponseHead {
    /// Appends the head as relayed to the client, without its final empty line (for
    /// more header lines). `buf` holds the head as received.
    pub fn write_relayed(&self, buf: &[u8], out: &mut Vec<u8>) {
        let head = buf.get(..self.len).unwrap_or(buf);
        if self.verbatim {
            out.extend_from_slice(head.strip_suffix(b"\r\n").unwrap_or(head));
            return;
        }
        let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
        // Parsed before with the same bytes, so this cannot fail; an empty head
        // (never relayed as such) would be the answer if it did.
        let Ok(Some((_, resp))) = parse_fields(head, &mut fields) else {
            return;
        };
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(&status_digits(resp.code.unwrap_or(502)));
        out.push(b' ');
        out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut dropper = Dropper {
            fields: resp.headers,
            coded: resp
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding")),
            length_seen: false,
        };
        for h in resp.headers.iter() {
            if dropper.dropped(h.name.as_bytes()) {
                continue;
            }
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A status code as its three digits (httparse reads exactly three).
fn status_digits(status: u16) -> [u8; 3] {
    let digit = |n: u16| b'0' + (n % 10) as u8;
    [digit(status / 100), digit(status / 10), digit(status)]
}

/// Parses a response head at the start of `buf`; `head_request`: it answers a HEAD.
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, Refusal> {
    // Uninitialized: httparse writes the fields it finds (filling 100 empty ones
    // first cost more than parsing a typical head).
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let Some((len, resp)) = parse_fields(buf, &mut fields)? else {
        return Ok(None);
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(Refusal::bad("malformed status line"));
    };
    let head = &buf[..len];
    // A bare CR is no line end to anyone; a bare LF is read as one (and rewritten).
    let bare_lf = match bare_line_break(head) {
        Some(i) if head[i] == b'\r' => return Err(Refusal::bad("bare CR in a response head")),
        found => found.is_some(),
    };
    let mut length = None;
    let mut lengths = 0;
    let mut chunked = None;
    let (mut close, mut keep_alive, mut drops) = (false, false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = decimal_number(h.value).ok_or(Refusal::bad("invalid content-length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(Refusal::bad("conflicting content-length"));
            }
            length = Some(n);
            lengths += 1;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked only when it is the last coding of the last field (RFC 9112 §6.3).
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            chunked = Some(trim_ows(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= has_token(h.value, "close");
            keep_alive |= has_token(h.value, "keep-alive");
            // Anything it names other than these options is a field to drop.
            drops |= h.value.split(|&b| b == b',').any(|t| {
                let t = trim_ows(t);
                !t.is_empty()
                    && !["close", "keep-alive", "upgrade"]
                        .iter()
                        .any(|o| t.eq_ignore_ascii_case(o.as_bytes()))
            });
        }
        drops |= is_hop_by_hop(name);
    }
    drops |= lengths > 1 || (lengths > 0 && chunked.is_some());
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    close |= minor == 0 && !keep_alive;
    close |= framing == Framing::UntilClose;
    let leading_lines = head.first().is_some_and(|&b| b == b'\r' || b == b'\n');
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        close,
        verbatim: !bare_lf && !leading_lines && minor == 1 && !drops,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str, head: bool) -> ResponseHead {
        parse_response(text.as_bytes(), head).unwrap().unwrap()
    }

    fn relayed(text: &str) -> String {
        let head = r(text, false);
        let mut out = Vec::new();
        head.write_relayed(text.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn framing() {
        let plain = r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false);
        assert_eq!(
            (plain.status, plain.framing, plain.close),
            (200, Framing::Length(3), false)
        );
        assert_eq!(plain.len, 38);
        assert_eq!(
            r(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false
            )
            .framing,
            Framing::Chunked
        );
        assert_eq!(
            r(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                false
            )
            .framing,
            Framing::UntilClose
        );
        let until = r("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((until.framing, until.close), (Framing::UntilClose, true));
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).framing,
            Framing::Empty
        );
        assert_eq!(
            r(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .framing,
            Framing::Empty
        );
        assert_eq!(
            r("HTTP/1.1 103 Early Hints\r\n\r\n", false).framing,
            Framing::Empty
        );
        assert!(r("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false).close);
        assert!(
            !r(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .close
        );
        assert!(
            r(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .close
        );
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n", false), Ok(None));
        assert!(parse_response(b"HTTP/1.1 2x0 OK\r\n\r\n", false).is_err());
    }

    #[test]
    fn ambiguous_responses_are_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        ] {
            assert!(parse_response(text.as_bytes(), false).is_err(), "{text:?}");
        }
    }

    #[test]
    fn relayed_heads_are_canonical() {
        // nginx's keep-alive answer: the common case.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"),
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\n"
        );
        let plain = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(relayed(plain), &plain[..plain.len() - 2]);
        // Every hop-by-hop field and those Connection names, an h2c upgrade offer.
        assert_eq!(
            relayed("HTTP/1.0 200 OK\r\nX-Private: p\r\nKeep-Alive: timeout=5\r\nA: 1\r\nConnection: Keep-Alive, X-Private, Upgrade\r\nUpgrade: h2c\r\nTE: trailers\r\nProxy-Connection: x\r\nContent-Length: 2\r\nB:\r\n\r\nok"),
            "HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 2\r\nB: \r\n"
        );
        // Framing is never dropped, whatever Connection names.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length, Transfer-Encoding\r\n\r\nhello"),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
        );
        // Bare LFs become CRLF; empty lines before the status line go.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\nA: 1\nConnection: close\n\n"),
            "HTTP/1.1 200 OK\r\nA: 1\r\n"
        );
        assert_eq!(
            relayed("\r\nHTTP/1.0 200 OK\r\nA: 1\r\n\n"),
            "HTTP/1.1 200 OK\r\nA: 1\r\n"
        );
        // One Content-Length, and none beside Transfer-Encoding.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc"),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
        );
        assert_eq!(
            relayed("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        );
        // Many hop-by-hop lines: all dropped (no bound on how many).
        let many = format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\n{}Content-Length: 0\r\n\r\n",
            (0..20)
                .map(|i| format!("x-{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            (0..20).map(|i| format!("x-{i}: v\r\n")).collect::<String>()
        );
        assert_eq!(relayed(&many), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n");
    }
}
