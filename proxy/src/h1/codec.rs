//! HTTP/1.1 message heads and body framing for the fast path: parsed with httparse
//! in place, kept as ranges into the received bytes (no header map, no copies).

use std::ops::Range;

use bytes::Bytes;

/// The longest request or response head accepted (431 / 502 beyond it).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields a head may have.
pub const MAX_HEADERS: usize = 100;

/// Why a head could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    Malformed,
    TooLarge,
}

/// A parsed request head: the bytes as received and where each part is.
#[derive(Default)]
pub struct RequestHead {
    pub bytes: Bytes,
    method: Range<usize>,
    /// The request target up to `?`.
    path: Range<usize>,
    pub minor_version: u8,
    headers: Vec<(Range<usize>, Range<usize>)>,
    pub content_length: Option<u64>,
    pub transfer_encoding: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Upgrade`, `Expect` or a CONNECT: not for the fast path.
    pub special: bool,
    /// The request target is a path (origin form), not `http://host/...` or `*`.
    pub origin_form: bool,
    /// Has hop-by-hop fields (RFC 9110 §7.6.1) that must not be forwarded.
    hop_by_hop: bool,
}

/// Fields that describe one connection, never forwarded (with those `Connection` names).
const HOP_BY_HOP: [&str; 4] = ["connection", "keep-alive", "proxy-connection", "te"];

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Whether a field that a `Connection` field names is left out when forwarding.
/// Framing fields and Host never are: a message whose `Connection` names them keeps
/// them, so what goes on is framed as Sluice parsed it (forwarding a body without
/// the Content-Length that delimits it would smuggle it in as another message).
fn nomination_dropped(name: &[u8]) -> bool {
    !["content-length", "transfer-encoding", "host"]
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
}

/// A head without its final empty line (CRLF, or a bare LF, which httparse also
/// accepts), so more lines can follow; the last field line keeps its own ending.
fn without_final_empty_line(head: &[u8]) -> &[u8] {
    let head = head.strip_suffix(b"\n").unwrap_or(head);
    head.strip_suffix(b"\r").unwrap_or(head)
}

/// How many empty-line bytes precede the start line (httparse skips them).
fn leading_empty_lines(head: &[u8]) -> usize {
    head.iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count()
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn parse_length(value: &[u8]) -> Result<u64, HeadError> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Malformed);
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(HeadError::Malformed)
    })
}

/// One more Content-Length value: repeats must agree (RFC 9110 §8.6).
fn merge_length(seen: Option<u64>, value: &[u8]) -> Result<Option<u64>, HeadError> {
    let n = parse_length(value)?;
    match seen {
        Some(m) if m != n => Err(HeadError::Malformed),
        _ => Ok(Some(n)),
    }
}

impl RequestHead {
    /// Parses the head at the start of `buf`. `Ok(None)`: incomplete so far.
    /// On success the flags describe `buf[..n]`; the accessors that read the head's
    /// bytes (method, path, header) need them handed over first with [`Self::attach`].
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<usize>, HeadError> {
        // The previous head's bytes go: an accessor called before `attach` sees an
        // empty head, never stale ranges into another request.
        self.bytes = Bytes::new();
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let n = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        };
        if n > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
            return Err(HeadError::Malformed);
        };
        self.method = offset(buf, method.as_bytes());
        let start = offset(buf, target.as_bytes()).start;
        self.path = start..start + target.find('?').unwrap_or(target.len());
        self.minor_version = minor;
        self.origin_form = target.starts_with('/');
        self.headers.clear();
        self.content_length = None;
        self.transfer_encoding = false;
        self.close = false;
        self.hop_by_hop = false;
        self.special = method == "CONNECT";
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                self.content_length = merge_length(self.content_length, h.value)?;
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                self.transfer_encoding = true;
            } else if name.eq_ignore_ascii_case(b"connection") {
                self.close |= has_token(h.value, "close");
                self.special |= has_token(h.value, "upgrade");
            } else if name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"expect")
            {
                self.special = true;
            }
            self.hop_by_hop |= HOP_BY_HOP
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_bytes()));
            self.headers.push((offset(buf, name), offset(buf, h.value)));
        }
        Ok(Some(n))
    }

    /// Takes the head's bytes (exactly the `n` bytes [`Self::parse`] reported).
    pub fn attach(&mut self, bytes: Bytes) {
        self.bytes = bytes;
    }

    fn str(&self, range: &Range<usize>) -> &str {
        self.bytes
            .get(range.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    pub fn method(&self) -> &str {
        self.str(&self.method)
    }

    pub fn path(&self) -> &str {
        self.str(&self.path)
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find_map(|(n, v)| {
            let field = self.bytes.get(n.clone())?;
            field
                .eq_ignore_ascii_case(name.as_bytes())
                .then(|| self.bytes.get(v.clone()))
                .flatten()
        })
    }

    /// Appends the head as it goes upstream, without its final empty line (for
    /// more header lines): as received, less the hop-by-hop fields.
    pub fn write_forwarded(&self, out: &mut Vec<u8>) {
        let head = without_final_empty_line(&self.bytes);
        let head = head.get(leading_empty_lines(head)..).unwrap_or(head);
        if !self.hop_by_hop {
            out.extend_from_slice(head);
            return;
        }
        let line_end = head
            .iter()
            .position(|&b| b == b'\n')
            .map_or(head.len(), |i| i + 1);
        out.extend_from_slice(&head[..line_end]);
        let field = |r: &Range<usize>| self.bytes.get(r.clone()).unwrap_or(b"");
        let nominated = |name: &[u8]| {
            nomination_dropped(name)
                && self.headers.iter().any(|(n, v)| {
                    field(n).eq_ignore_ascii_case(b"connection")
                        && field(v)
                            .split(|&b| b == b',')
                            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
                })
        };
        for (n, v) in &self.headers {
            let name = field(n);
            let hop = HOP_BY_HOP
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_bytes()));
            if !hop && !nominated(name) {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                out.extend_from_slice(field(v));
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

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

/// The most hop-by-hop lines a response may have (more is refused as malformed: a 502).
const MAX_DROPPED: usize = 8;

/// A parsed response head: its length in the buffer and what matters for relaying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The connection cannot carry another exchange afterwards.
    pub close: bool,
    /// An HTTP/1.0 status line (relayed as HTTP/1.1: the client speaks 1.1 to Sluice).
    http10: bool,
    /// The lines (CRLF included) of hop-by-hop fields, which describe the backend's
    /// connection and are not relayed (RFC 9110 §7.6.1), in order.
    dropped: [(u32, u32); MAX_DROPPED],
    dropped_len: u8,
}

impl ResponseHead {
    /// Appends the head as relayed to the client, without its final empty line (for
    /// more header lines): `buf` holds the head as received; the status line says
    /// HTTP/1.1 and the hop-by-hop lines are left out.
    pub fn write_relayed(&self, buf: &[u8], out: &mut Vec<u8>) {
        let head = without_final_empty_line(buf.get(..self.len).unwrap_or(buf));
        let mut at = leading_empty_lines(head);
        if self.http10 {
            out.extend_from_slice(b"HTTP/1.1");
            at += b"HTTP/1.0".len();
        }
        for &(start, end) in &self.dropped[..usize::from(self.dropped_len)] {
            out.extend_from_slice(head.get(at..start as usize).unwrap_or(b""));
            at = end as usize;
        }
        out.extend_from_slice(head.get(at..).unwrap_or(b""));
    }
}

/// Parses a response head at the start of `buf`; `head_request`: it answers a HEAD.
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(HeadError::Malformed);
    };
    let mut length = None;
    let mut chunked = None;
    let (mut close, mut keep_alive) = (false, false);
    // Whether some field must stay behind, and whether `Connection` names fields
    // of its own (beyond the options close / keep-alive / upgrade).
    let (mut hop_by_hop, mut nominates) = (false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            length = merge_length(length, h.value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked only when it is the last coding (RFC 9112 §6.3).
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= has_token(h.value, "close");
            keep_alive |= has_token(h.value, "keep-alive");
            nominates |= h.value.split(|&b| b == b',').any(|t| {
                let t = t.trim_ascii();
                !t.is_empty()
                    && !["close", "keep-alive", "upgrade"]
                        .iter()
                        .any(|o| t.eq_ignore_ascii_case(o.as_bytes()))
            });
        }
        hop_by_hop |= is_hop_by_hop_response_field(name);
    }
    let mut dropped = [(0u32, 0u32); MAX_DROPPED];
    let mut dropped_len = 0u8;
    if hop_by_hop || nominates {
        let nominated = |name: &[u8]| {
            nominates
                && nomination_dropped(name)
                && resp.headers.iter().any(|c| {
                    c.name.eq_ignore_ascii_case("connection")
                        && c.value
                            .split(|&b| b == b',')
                            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
                })
        };
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            if !is_hop_by_hop_response_field(name) && !nominated(name) {
                continue;
            }
            let slot = dropped
                .get_mut(usize::from(dropped_len))
                .ok_or(HeadError::Malformed)?;
            // The line runs from the name to its LF (a value cannot hold one).
            let start = offset(buf, name).start;
            let end = buf
                .get(start..len)
                .and_then(|line| line.iter().position(|&b| b == b'\n'))
                .map_or(len, |i| start + i + 1);
            *slot = (start as u32, end as u32);
            dropped_len += 1;
        }
    }
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
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        close,
        http10: minor == 0,
        dropped,
        dropped_len,
    }))
}

/// A response field about the backend's connection: the request's hop-by-hop set
/// plus `Upgrade` (an offer to switch the backend connection's protocol; the 101
/// that would accept one is never relayed by the fast path).
fn is_hop_by_hop_response_field(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"upgrade")
        || HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Finds where a chunked body ends while its bytes stream past unchanged.
#[derive(Debug, Default)]
pub struct ChunkScanner {
    /// Bytes of chunk data (plus its CRLF) still to pass before the next size line.
    data_left: u64,
    /// After the last chunk: in the trailer section.
    trailers: bool,
    /// Trailer bytes seen, bounded.
    trailer_bytes: usize,
}

/// The longest trailer section accepted after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

impl ChunkScanner {
    /// Scans `buf`: `Ok((n, done))`, the first `n` bytes belong to the body and
    /// `done` says the body ends there. Bytes after `n` wait for more input
    /// (an incomplete size or trailer line), unless `done`.
    pub fn scan(&mut self, buf: &[u8]) -> Result<(usize, bool), HeadError> {
        let mut pos = 0;
        loop {
            if self.data_left > 0 {
                let take = self.data_left.min((buf.len() - pos) as u64);
                pos += take as usize;
                self.data_left -= take;
                if self.data_left > 0 {
                    return Ok((pos, false));
                }
            }
            let rest = &buf[pos..];
            if self.trailers {
                // Lines until an empty one.
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                    self.trailer_bytes += rest.len();
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(HeadError::TooLarge);
                    }
                    return Ok((pos, false));
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok((pos, true));
                }
                self.trailer_bytes += eol + 2;
                if self.trailer_bytes > MAX_TRAILERS {
                    return Err(HeadError::TooLarge);
                }
                continue;
            }
            match httparse::parse_chunk_size(rest) {
                Ok(httparse::Status::Complete((n, 0))) => {
                    pos += n;
                    self.trailers = true;
                }
                Ok(httparse::Status::Complete((n, size))) => {
                    pos += n;
                    self.data_left = size.checked_add(2).ok_or(HeadError::Malformed)?;
                }
                Ok(httparse::Status::Partial) if rest.len() > 4096 => {
                    return Err(HeadError::Malformed)
                }
                Ok(httparse::Status::Partial) => return Ok((pos, false)),
                Err(_) => return Err(HeadError::Malformed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<RequestHead, HeadError> {
        let mut head = RequestHead::default();
        let n = head.parse(text.as_bytes())?.expect("complete head");
        head.attach(Bytes::copy_from_slice(&text.as_bytes()[..n]));
        Ok(head)
    }

    #[test]
    fn request_parts_and_headers() {
        let head = parsed("GET /a/b?x=1 HTTP/1.1\r\nHost: api\r\nX-Key: k1\r\n\r\nrest").unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.path(), "/a/b");
        assert!(head.origin_form);
        assert_eq!(head.header("host"), Some(&b"api"[..]));
        assert_eq!(head.header("x-key"), Some(&b"k1"[..]));
        assert_eq!(head.header("missing"), None);
        assert_eq!(head.content_length, None);
        assert!(!head.close && !head.special && !head.transfer_encoding);
        let mut out = Vec::new();
        head.write_forwarded(&mut out);
        assert_eq!(out, b"GET /a/b?x=1 HTTP/1.1\r\nHost: api\r\nX-Key: k1\r\n");
    }

    #[test]
    fn request_flags() {
        let head =
            parsed("POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!(head.content_length, Some(5));
        assert!(head.close);
        let head =
            parsed("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(head.special);
        let head = parsed("POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert!(head.special);
        let head = parsed("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(head.transfer_encoding);
        let head = parsed("GET http://a/b HTTP/1.1\r\n\r\n").unwrap();
        assert!(!head.origin_form);
    }

    #[test]
    fn hop_by_hop_fields_stay_behind() {
        let head = parsed(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: 5\r\nX-Private: p\r\nX-Kept: k\r\n\r\n",
        )
        .unwrap();
        let mut out = Vec::new();
        head.write_forwarded(&mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: a\r\nX-Kept: k\r\n");
        let forwarded = |text: &str| {
            let mut out = Vec::new();
            parsed(text).unwrap().write_forwarded(&mut out);
            String::from_utf8(out).unwrap()
        };
        // Framing and Host stay whatever Connection names: a body forwarded without
        // its Content-Length would reach the backend as a second request.
        assert_eq!(
            forwarded("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: content-length, host, x-p\r\nx-p: 1\r\n\r\n"),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        );
        // Bare LFs and empty lines before the request line.
        assert_eq!(
            forwarded("GET / HTTP/1.1\nHost: a\n\n"),
            "GET / HTTP/1.1\nHost: a\n"
        );
        assert_eq!(
            forwarded("\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: x\r\nx: 1\r\n\r\n"),
            "GET / HTTP/1.1\r\nHost: a\r\n"
        );
    }

    #[test]
    fn bad_requests() {
        assert_eq!(
            parsed("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").err(),
            Some(HeadError::Malformed)
        );
        assert_eq!(
            parsed("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").err(),
            Some(HeadError::Malformed)
        );
        assert_eq!(
            parsed("GET /\x01 HTTP/1.1\r\n\r\n").err(),
            Some(HeadError::Malformed)
        );
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parsed(&many).err(), Some(HeadError::TooLarge));
        let mut head = RequestHead::default();
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(head.parse(long.as_bytes()), Err(HeadError::TooLarge));
        assert_eq!(head.parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
    }

    #[test]
    fn response_framing() {
        let r = |text: &str, head: bool| parse_response(text.as_bytes(), head).unwrap().unwrap();
        let plain = r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false);
        assert_eq!(
            (plain.status, plain.framing, plain.close),
            (200, Framing::Length(3), false)
        );
        assert_eq!(plain.len, 38);
        let chunked = r(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(chunked.framing, Framing::Chunked);
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
        assert_eq!(
            parse_response(b"HTTP/1.1 2x0 OK\r\n\r\n", false).err(),
            Some(HeadError::Malformed)
        );
    }

    #[test]
    fn relayed_heads_lose_the_backends_connection_fields() {
        let relayed = |text: &str| {
            let head = parse_response(text.as_bytes(), false).unwrap().unwrap();
            let mut out = Vec::new();
            head.write_relayed(text.as_bytes(), &mut out);
            String::from_utf8(out).unwrap()
        };
        // nginx's keep-alive answer: the common case.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"),
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\n"
        );
        // Untouched when there is nothing to drop.
        let plain = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(relayed(plain), &plain[..plain.len() - 2]);
        // Every hop-by-hop field and those Connection names (anywhere in the head),
        // an h2c upgrade offer; end-to-end fields and their order stay.
        assert_eq!(
            relayed(
                "HTTP/1.0 200 OK\r\nX-Private: p\r\nKeep-Alive: timeout=5\r\nA: 1\r\nConnection: Keep-Alive, X-Private, Upgrade\r\nUpgrade: h2c\r\nTE: trailers\r\nProxy-Connection: x\r\nContent-Length: 2\r\nB:\r\n\r\nok"
            ),
            "HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 2\r\nB:\r\n"
        );
        // Framing is never dropped, whatever Connection names.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length, Transfer-Encoding\r\n\r\nhello"),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
        );
        // Bare LFs (httparse accepts them) and empty lines before the status line.
        assert_eq!(
            relayed("HTTP/1.1 200 OK\nA: 1\nConnection: close\n\n"),
            "HTTP/1.1 200 OK\nA: 1\n"
        );
        assert_eq!(
            relayed("\r\nHTTP/1.0 200 OK\r\nA: 1\r\n\n"),
            "HTTP/1.1 200 OK\r\nA: 1\r\n"
        );
        // More hop-by-hop lines than the bound: refused (a 502), not relayed.
        let many = format!(
            "HTTP/1.1 200 OK\r\nConnection: {}\r\n{}\r\n",
            (0..8)
                .map(|i| format!("x-{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            (0..8).map(|i| format!("x-{i}: v\r\n")).collect::<String>()
        );
        assert_eq!(
            parse_response(many.as_bytes(), false).err(),
            Some(HeadError::Malformed)
        );
    }

    #[test]
    fn chunk_scanner_finds_the_end_across_splits() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: t\r\n\r\nNEXT";
        let end = body.len() - 4;
        // Every split point: feed the first part, then the rest after what was consumed.
        for split in 0..body.len() {
            let mut scanner = ChunkScanner::default();
            let (n, done) = scanner.scan(&body[..split]).unwrap();
            assert!(!done || n == end, "split {split}");
            if done {
                continue;
            }
            let mut pending = body[n..split].to_vec();
            pending.extend_from_slice(&body[split..]);
            let (m, done) = scanner.scan(&pending).unwrap();
            assert!(done, "split {split}");
            assert_eq!(n + m, end, "split {split}");
        }
    }

    #[test]
    fn chunk_scanner_rejects_garbage() {
        assert!(ChunkScanner::default().scan(b"zz\r\n").is_err());
        let huge = format!("1{}\r\n", "0".repeat(20));
        assert!(ChunkScanner::default().scan(huge.as_bytes()).is_err());
    }
}
