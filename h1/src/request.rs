//! Request heads: parsed in place (httparse finds the parts, then every rule of
//! RFC 9112 that two parsers could read differently is checked here), kept as
//! ranges into the received bytes, and forwarded in canonical form.
//!
//! Invariant: a head this module accepts, written by [`RequestHead::write_forwarded`],
//! is read the same way by any parser that follows RFC 9112: CRLF line ends, single
//! spaces in the request line, an origin-form target (or `*`, or CONNECT's
//! authority), exactly one Host, at most one Content-Length, and Transfer-Encoding
//! only as the single coding `chunked` without a Content-Length.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::Bytes;

use crate::syntax::{
    bare_line_break, decimal_number, is_authority, is_path_and_query, is_token, lf_without_cr,
    trim_ows,
};
use crate::{Refusal, MAX_FIELDS, MAX_FIELD_LINE, MAX_HEAD, MAX_TARGET};

/// The form of the request target (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    /// `/path?query`: what a client sends to an origin server.
    #[default]
    Origin,
    /// `http://authority/path?query`: what a client sends to a proxy. The authority
    /// is the target's host, whatever Host says (RFC 9112 §3.2.2).
    Absolute,
    /// `*`, OPTIONS only.
    Asterisk,
    /// `host:port`, CONNECT only.
    Authority,
}

/// How the request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    /// No Content-Length and no Transfer-Encoding: the request ends with its head.
    #[default]
    None,
    Length(u64),
    Chunked,
}

/// Fields that describe one connection (RFC 9110 §7.6.1), not forwarded to backends.
const HOP_BY_HOP: [&str; 4] = ["connection", "keep-alive", "proxy-connection", "te"];

/// A parsed request head: the bytes as received and where each part is.
#[derive(Default)]
pub struct RequestHead {
    bytes: Bytes,
    /// Where the request line starts (after ignored empty lines).
    start: usize,
    method: Range<usize>,
    target: Range<usize>,
    /// The target as forwarded in origin-form: the whole target, or an
    /// absolute-form target's path and query (empty means "/").
    forward: Range<usize>,
    /// The length of `forward`'s path (up to `?`).
    path_len: usize,
    /// Absolute-form: the target's authority.
    authority: Option<Range<usize>>,
    /// The Host field's value.
    host: Option<Range<usize>>,
    form: Form,
    minor_version: u8,
    fields: Vec<(Range<usize>, Range<usize>)>,
    body: Body,
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    expect: bool,
    /// Has fields that `write_forwarded` leaves out without `keep_connection`.
    hop_by_hop: bool,
    /// A Connection field names Host or a framing field, which Sluice never
    /// drops: the name goes from what is forwarded, so no later hop drops them.
    nominates_kept: bool,
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
}

fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether a field that a `Connection` field names is left out when forwarding.
/// Framing fields and Host never are: a message whose `Connection` names them keeps
/// them, so what goes on is framed as Sluice parsed it (forwarding a body without
/// the Content-Length that delimits it would smuggle it in as another message).
pub fn nomination_dropped(name: &[u8]) -> bool {
    !["content-length", "transfer-encoding", "host"]
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
}

/// Whether `value` (a Connection field) names `name`.
pub fn names(value: &[u8], name: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim_ows(t).eq_ignore_ascii_case(name))
}

/// A version httparse refused: `HTTP/d.d` well-formed but not 1.x is 505, anything
/// else in its place is 400.
fn version_refusal(buf: &[u8]) -> Refusal {
    let line_end = buf
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(buf.len());
    let line = &buf[..line_end];
    // Exactly method SP target SP version: a space inside the target is a
    // malformed line, whatever its last word looks like.
    let mut parts = line.split(|&b| b == b' ');
    let version = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(version), None) => version,
        _ => b"",
    };
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Refusal {
                status: 505,
                reason: "HTTP version not supported",
            }
        }
        _ => Refusal::bad("malformed request line"),
    }
}

/// What a Transfer-Encoding value means for a request (RFC 9112 §6.1, §6.3): only
/// the single coding `chunked` is served. A valid list that ends in `chunked` asks
/// for codings Sluice does not decode (501); anything else cannot be framed (400).
fn transfer_coding(value: &[u8]) -> Result<Body, Refusal> {
    let value = trim_ows(value);
    if value.eq_ignore_ascii_case(b"chunked") {
        return Ok(Body::Chunked);
    }
    let codings: Vec<&[u8]> = value.split(|&b| b == b',').map(trim_ows).collect();
    let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
    // A coding may carry parameters (`gzip;q=1`): its name is what must be a token.
    let well_formed = codings.iter().all(|c| {
        let name = c.split(|&b| b == b';').next().unwrap_or(b"");
        is_token(trim_ows(name))
    });
    let last_only = codings.last().is_some_and(|c| chunked(c))
        && codings.iter().filter(|c| chunked(c)).count() == 1;
    if well_formed && last_only {
        Err(Refusal {
            status: 501,
            reason: "transfer codings other than chunked are not implemented",
        })
    } else {
        Err(Refusal::bad("transfer-encoding is not chunked"))
    }
}

impl RequestHead {
    /// Parses the head at the start of `buf`. `Ok(None)`: incomplete so far (and
    /// nothing seen yet is refused). On success the accessors that read the head's
    /// bytes need them handed over first with [`Self::attach`]; the flags and
    /// framing are set already.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<usize>, Refusal> {
        // The previous head's bytes go: an accessor called before `attach` sees an
        // empty head, never stale ranges into another request.
        self.bytes = Bytes::new();
        // Left uninitialized: httparse writes the fields it finds, and filling 100
        // empty ones first cost more than parsing a typical head.
        let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut []);
        let n = match req.parse_with_uninit_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEAD {
                    return Err(Refusal::too_large("request head too large"));
                }
                // httparse reads a bare LF as a line end; refuse it as soon as it
                // arrives rather than when the head completes (a CR at the very end
                // may yet be followed by its LF).
                let seen = buf.strip_suffix(b"\r").unwrap_or(buf);
                if bare_line_break(seen).is_some() {
                    return Err(Refusal::bad("bare LF or CR in the head"));
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal::too_large("too many header fields"))
            }
            Err(httparse::Error::Version) => return Err(version_refusal(buf)),
            Err(_) => return Err(Refusal::bad("malformed head")),
        };
        if n > MAX_HEAD {
            return Err(Refusal::too_large("request head too large"));
        }
        // httparse accepts LF alone as a line end (RFC 9112 §2.2 lets a recipient
        // do so); a backend that does not would see other lines, other requests.
        // (A CR not followed by LF httparse refuses itself; the fuzz target
        // h1_request_head holds this against the reference reader.)
        if lf_without_cr(&buf[..n]) {
            return Err(Refusal::bad("bare LF or CR in the head"));
        }
        let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
            return Err(Refusal::bad("malformed request line"));
        };
        self.method = offset(buf, method.as_bytes());
        self.start = self.method.start;
        self.target = offset(buf, target.as_bytes());
        self.minor_version = minor;
        self.read_target(method.as_bytes(), target.as_bytes())?;
        self.read_fields(buf, req.headers)?;
        Ok(Some(n))
    }

    /// The request target's form, and what is forwarded and routed by.
    fn read_target(&mut self, method: &[u8], target: &[u8]) -> Result<(), Refusal> {
        if target.len() > MAX_TARGET {
            return Err(Refusal {
                status: 414,
                reason: "request target too long",
            });
        }
        let bad_target = Refusal::bad("invalid request target");
        let connect = method == b"CONNECT";
        self.authority = None;
        self.forward = self.target.clone();
        if connect {
            // CONNECT names a host and port, nothing else (RFC 9112 §3.2.3).
            let port = target.rsplit(|&b| b == b':').next().unwrap_or(b"");
            let has_port =
                target.contains(&b':') && !port.is_empty() && port.iter().all(u8::is_ascii_digit);
            if !has_port || !is_authority(target, true) {
                return Err(bad_target);
            }
            self.form = Form::Authority;
            self.path_len = 0;
            return Ok(());
        }
        if target == b"*" {
            if method != b"OPTIONS" {
                return Err(bad_target);
            }
            self.form = Form::Asterisk;
            self.path_len = 1;
            return Ok(());
        }
        if target.first() == Some(&b'/') {
            if !is_path_and_query(target) {
                return Err(bad_target);
            }
            self.form = Form::Origin;
        } else {
            let rest = strip_prefix_ignore_case(target, b"http://")
                .or_else(|| strip_prefix_ignore_case(target, b"https://"))
                .ok_or(bad_target)?;
            let end = rest
                .iter()
                .position(|&b| b == b'/' || b == b'?')
                .unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            if !is_authority(authority, true) || !is_path_and_query(path) {
                return Err(bad_target);
            }
            let at = self.target.end - rest.len();
            self.authority = Some(at..at + authority.len());
            self.forward = at + authority.len()..self.target.end;
            self.form = Form::Absolute;
        }
        let forward = &target[target.len() - self.forward.len()..];
        self.path_len = forward
            .iter()
            .position(|&b| b == b'?')
            .unwrap_or(forward.len());
        Ok(())
    }

    /// The fields: framing, Host, connection options; every rule that decides how
    /// the message is framed or routed.
    fn read_fields(&mut self, buf: &[u8], fields: &[httparse::Header<'_>]) -> Result<(), Refusal> {
        self.fields.clear();
        self.host = None;
        self.body = Body::None;
        self.close = false;
        self.keep_alive = false;
        self.upgrade = false;
        self.expect = false;
        self.hop_by_hop = false;
        self.nominates_kept = false;
        let (mut hosts, mut lengths, mut codings) = (0, 0, 0);
        let mut length = None;
        let mut coding: &[u8] = b"";
        let mut nominates = false;
        for h in fields {
            let name = h.name.as_bytes();
            let value = h.value;
            let range = (offset(buf, name), offset(buf, value));
            if range.1.end - range.0.start > MAX_FIELD_LINE {
                return Err(Refusal::too_large("header field too large"));
            }
            if name.contains(&b'_') && underscored_framing(name) {
                return Err(Refusal::bad("a framing field's name with an underscore"));
            }
            if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
                self.host = Some(range.1.clone());
            } else if name.eq_ignore_ascii_case(b"content-length") {
                lengths += 1;
                length = Some(decimal_number(value).ok_or(Refusal::bad("invalid content-length"))?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                codings += 1;
                coding = value;
            } else if name.eq_ignore_ascii_case(b"connection") {
                self.close |= has_token(value, "close");
                self.keep_alive |= has_token(value, "keep-alive");
                self.upgrade |= has_token(value, "upgrade");
                self.nominates_kept |= value
                    .split(|&b| b == b',')
                    .any(|t| !nomination_dropped(trim_ows(t)));
                nominates |= value.split(|&b| b == b',').any(|t| {
                    let t = trim_ows(t);
                    !t.is_empty()
                        && !is_hop_by_hop(t)
                        && nomination_dropped(t)
                        && !t.eq_ignore_ascii_case(b"close")
                        && !t.eq_ignore_ascii_case(b"upgrade")
                });
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else if name.eq_ignore_ascii_case(b"expect") {
                self.expect = true;
            }
            self.hop_by_hop |= is_hop_by_hop(name);
            self.fields.push(range);
        }
        self.hop_by_hop |= nominates;
        // RFC 9112 §3.2: one Host, valid; HTTP/1.0 may have none.
        if hosts > 1 {
            return Err(Refusal::bad("more than one host field"));
        }
        if hosts == 0 && self.minor_version == 1 {
            return Err(Refusal::bad("no host field"));
        }
        if let Some(host) = &self.host {
            if !is_authority(&buf[host.clone()], false) {
                return Err(Refusal::bad("invalid host"));
            }
        }
        // RFC 9112 §6.3 and RFC 9110 §8.6: one way to find the body's end.
        if lengths > 1 {
            return Err(Refusal::bad("more than one content-length field"));
        }
        if codings > 0 {
            if codings > 1 {
                return Err(Refusal::bad("more than one transfer-encoding field"));
            }
            if lengths > 0 {
                return Err(Refusal::bad("both transfer-encoding and content-length"));
            }
            if self.minor_version == 0 {
                return Err(Refusal::bad("transfer-encoding in an HTTP/1.0 request"));
            }
            self.body = transfer_coding(coding)?;
        } else if let Some(n) = length {
            self.body = Body::Length(n);
        }
        Ok(())
    }

    /// Takes the head's bytes (exactly the `n` bytes [`Self::parse`] reported).
    pub fn attach(&mut self, bytes: Bytes) {
        self.bytes = bytes;
    }

    /// The head's bytes as received (after [`Self::attach`]).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    fn get(&self, range: &Range<usize>) -> &[u8] {
        self.bytes.get(range.clone()).unwrap_or(b"")
    }

    fn str(&self, range: &Range<usize>) -> &str {
        std::str::from_utf8(self.get(range)).unwrap_or("")
    }

    pub fn method(&self) -> &str {
        self.str(&self.method)
    }

    /// The target as received.
    pub fn target(&self) -> &[u8] {
        self.get(&self.target)
    }

    /// The path requests are routed by: the origin-form path without its query
    /// (an absolute-form target's path; "/" when it has none; "*" for OPTIONS *).
    pub fn path(&self) -> &str {
        let path = self.forward.start..self.forward.start + self.path_len;
        match self.form {
            Form::Absolute if path.is_empty() => "/",
            Form::Authority => "",
            _ => self.str(&path),
        }
    }

    /// The host requests are routed by: an absolute-form (or CONNECT) target's authority, else
    /// the Host field's value ("" for an HTTP/1.0 request without one).
    pub fn host(&self) -> &[u8] {
        if self.form == Form::Authority {
            // CONNECT's target is the authority it asks for.
            return self.get(&self.target);
        }
        match (&self.authority, &self.host) {
            (Some(authority), _) => self.get(authority),
            (None, Some(host)) => self.get(host),
            (None, None) => b"",
        }
    }

    pub fn form(&self) -> Form {
        self.form
    }

    pub fn minor_version(&self) -> u8 {
        self.minor_version
    }

    pub fn body(&self) -> Body {
        self.body
    }

    /// The client's connection ends after this request: `Connection: close`, or
    /// HTTP/1.0 without `Connection: keep-alive`.
    pub fn close(&self) -> bool {
        self.close || (self.minor_version == 0 && !self.keep_alive)
    }

    /// Asks to switch protocols (`Upgrade`, or `Connection: upgrade`).
    pub fn upgrade(&self) -> bool {
        self.upgrade
    }

    /// Carries `Expect` (100-continue).
    pub fn expect(&self) -> bool {
        self.expect
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find_map(|(n, v)| {
            self.get(n)
                .eq_ignore_ascii_case(name.as_bytes())
                .then(|| self.get(v))
        })
    }

    /// The fields as received (names as sent, values without surrounding whitespace).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|(n, v)| (self.get(n), self.get(v)))
    }

    /// Whether a field is left out of the forwarded head: hop-by-hop fields and
    /// those Connection names (never framing fields or Host).
    fn dropped(&self, name: &[u8]) -> bool {
        is_hop_by_hop(name)
            || (nomination_dropped(name)
                && self.fields.iter().any(|(n, v)| {
                    self.get(n).eq_ignore_ascii_case(b"connection") && names(self.get(v), name)
                }))
    }

    /// Appends the head in canonical form, without its final empty line (so more
    /// field lines can follow). `keep_connection`: keep the hop-by-hop fields (for
    /// a reader that serves this same client connection); else they stay behind.
    ///
    /// A head that is canonical already (origin-form, nothing to leave out) is
    /// copied as received: every line of it was checked to end in CRLF.
    pub fn write_forwarded(&self, out: &mut Vec<u8>, keep_connection: bool) {
        self.write_forwarded_without(out, keep_connection, None);
    }

    /// [`Self::write_forwarded`], leaving out every `replaced` field (any case):
    /// one the caller writes itself after the head (a proxy's own `traceparent`).
    pub fn write_forwarded_without(
        &self,
        out: &mut Vec<u8>,
        keep_connection: bool,
        replaced: Option<&str>,
    ) {
        let head = self.bytes.get(self.start..).unwrap_or(b"");
        let verbatim = if keep_connection {
            !self.nominates_kept
        } else {
            !self.hop_by_hop
        };
        let replaced = replaced.filter(|name| self.header(name).is_some());
        if self.form == Form::Origin && verbatim && replaced.is_none() {
            out.extend_from_slice(head.strip_suffix(b"\r\n").unwrap_or(head));
            return;
        }
        out.extend_from_slice(self.get(&self.method));
        out.push(b' ');
        match self.form {
            Form::Absolute if self.forward.is_empty() => out.push(b'/'),
            Form::Absolute if self.get(&self.forward).first() == Some(&b'?') => {
                out.push(b'/');
                out.extend_from_slice(self.get(&self.forward));
            }
            _ => out.extend_from_slice(self.get(&self.forward)),
        }
        out.extend_from_slice(if self.minor_version == 0 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        let mut host_written = false;
        for (n, v) in &self.fields {
            let name = self.get(n);
            if !keep_connection && self.dropped(name) {
                continue;
            }
            if replaced.is_some_and(|r| name.eq_ignore_ascii_case(r.as_bytes())) {
                continue;
            }
            if name.eq_ignore_ascii_case(b"connection") && self.nominates_kept {
                // Kept for the next reader of this connection, without the names
                // of fields Sluice forwards whatever Connection says.
                let kept: Vec<&[u8]> = self
                    .get(v)
                    .split(|&b| b == b',')
                    .map(trim_ows)
                    .filter(|t| !t.is_empty() && nomination_dropped(t))
                    .collect();
                if !kept.is_empty() {
                    out.extend_from_slice(name);
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(&kept.join(&b", "[..]));
                    out.extend_from_slice(b"\r\n");
                }
                continue;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            match &self.authority {
                // RFC 9112 §3.2.2: the target's authority is the host.
                Some(authority) if name.eq_ignore_ascii_case(b"host") => {
                    out.extend_from_slice(self.get(authority));
                    host_written = true;
                }
                _ => out.extend_from_slice(self.get(v)),
            }
            out.extend_from_slice(b"\r\n");
        }
        if let (Some(authority), false) = (&self.authority, host_written) {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(self.get(authority));
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// `Content_Length` or `Transfer_Encoding` (any case): a backend that reads `_` as
/// `-` (CGI and the servers that follow it map both to `_`) would see a second
/// framing field Sluice did not frame by.
fn underscored_framing(name: &[u8]) -> bool {
    let dashed = |f: &str| {
        name.len() == f.len()
            && name
                .iter()
                .zip(f.bytes())
                .all(|(&n, f)| n.to_ascii_lowercase() == f || (n == b'_' && f == b'-'))
    };
    dashed("content-length") || dashed("transfer-encoding")
}

impl std::fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHead")
            .field("method", &self.method())
            .field("form", &self.form())
            .field("body", &self.body())
            .finish_non_exhaustive()
    }
}

fn strip_prefix_ignore_case<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &bytes[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &[u8]) -> Result<RequestHead, Refusal> {
        let mut head = RequestHead::default();
        let n = head.parse(text)?.expect("complete head");
        head.attach(Bytes::copy_from_slice(&text[..n]));
        Ok(head)
    }

    fn forwarded(text: &[u8], keep: bool) -> String {
        let mut out = Vec::new();
        parsed(text).unwrap().write_forwarded(&mut out, keep);
        String::from_utf8(out).unwrap()
    }

    fn status(text: &[u8]) -> u16 {
        parsed(text).err().map_or(200, |r| r.status)
    }

    #[test]
    fn a_replaced_field_is_left_out_in_any_case_and_only_when_present() {
        let text = b"GET /a HTTP/1.1\r\nHost: api\r\nTraceParent: 00-x\r\nX-Key: k1\r\ntraceparent: 00-y\r\n\r\n";
        let mut out = Vec::new();
        parsed(text)
            .unwrap()
            .write_forwarded_without(&mut out, false, Some("traceparent"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a HTTP/1.1\r\nHost: api\r\nX-Key: k1\r\n"
        );
        // Absent: the head goes as it would without the name.
        let plain = b"GET /a HTTP/1.1\r\nHost: api\r\n\r\n";
        let mut out = Vec::new();
        parsed(plain)
            .unwrap()
            .write_forwarded_without(&mut out, false, Some("traceparent"));
        assert_eq!(String::from_utf8(out).unwrap(), forwarded(plain, false));
    }

    #[test]
    fn request_parts_and_headers() {
        let head = parsed(b"GET /a/b?x=1 HTTP/1.1\r\nHost: api\r\nX-Key: k1\r\n\r\nrest").unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.path(), "/a/b");
        assert_eq!(head.form(), Form::Origin);
        assert_eq!(head.host(), b"api");
        assert_eq!(head.header("x-key"), Some(&b"k1"[..]));
        assert_eq!(head.header("missing"), None);
        assert_eq!(head.body(), Body::None);
        assert!(!head.close() && !head.upgrade() && !head.expect());
        assert_eq!(
            forwarded(
                b"GET /a/b?x=1 HTTP/1.1\r\nHost: api\r\nX-Key: k1\r\n\r\n",
                false
            ),
            "GET /a/b?x=1 HTTP/1.1\r\nHost: api\r\nX-Key: k1\r\n"
        );
    }

    #[test]
    fn request_flags() {
        let head =
            parsed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert_eq!(head.body(), Body::Length(5));
        assert!(head.close());
        let head = parsed(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap();
        assert!(head.upgrade());
        let head = parsed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert!(head.expect());
        let head =
            parsed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(head.body(), Body::Chunked);
        assert!(parsed(b"GET / HTTP/1.0\r\n\r\n").unwrap().close());
        assert!(!parsed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .close());
    }

    #[test]
    fn hop_by_hop_fields_stay_behind_unless_kept() {
        let text = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: 5\r\nX-Private: p\r\nX-Kept: k\r\n\r\n";
        assert_eq!(
            forwarded(text, false),
            "GET / HTTP/1.1\r\nHost: a\r\nX-Kept: k\r\n"
        );
        assert_eq!(
            forwarded(text, true),
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: 5\r\nX-Private: p\r\nX-Kept: k\r\n"
        );
        // Framing and Host stay whatever Connection names: a body forwarded without
        // its Content-Length would reach the backend as a second request.
        assert_eq!(
            forwarded(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: content-length, host, x-p\r\nx-p: 1\r\n\r\n", false),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        );
        // Kept for the same connection's next reader, Connection loses the names
        // of fields that are never dropped (it would drop Host or the framing).
        assert_eq!(
            forwarded(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close, Host, content-length\r\n\r\n", true),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n"
        );
        assert_eq!(
            forwarded(
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Host\r\n\r\n",
                true
            ),
            "GET / HTTP/1.1\r\nHost: a\r\n"
        );
        // Empty lines before the request line are not forwarded.
        assert_eq!(
            forwarded(
                b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: x\r\nx: 1\r\n\r\n",
                false
            ),
            "GET / HTTP/1.1\r\nHost: a\r\n"
        );
        assert_eq!(
            forwarded(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", false),
            "GET / HTTP/1.1\r\nHost: a\r\n"
        );
    }

    #[test]
    fn refuses_bare_line_ends_anywhere() {
        for text in [
            &b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"POST / HTTP/1.1\r\nHost: t\r\nX-A: 1\nContent-Length: 35\r\n\r\n",
            b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        ] {
            assert_eq!(status(text), 400, "{:?}", String::from_utf8_lossy(text));
        }
        // Promptly: a bare LF in an incomplete head is refused before the head ends.
        let mut head = RequestHead::default();
        assert_eq!(
            head.parse(b"GET / HTTP/1.1\nHost").map_err(|r| r.status),
            Err(400)
        );
        assert_eq!(head.parse(b"GET / HTTP/1.1\r"), Ok(None));
    }

    #[test]
    fn host_rules() {
        assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\nhOST: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"), 200);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"), 200);
        assert_eq!(status(b"GET / HTTP/1.0\r\n\r\n"), 200);
        assert_eq!(status(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            400
        );
        for value in ["-1", "+1", "5, 5", "1 2", "0x5", "", "18446744073709551616"] {
            let text = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(status(text.as_bytes()), 400, "{value}");
        }
        let head = parsed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:  007 \r\n\r\n").unwrap();
        assert_eq!(head.body(), Body::Length(7));
    }

    #[test]
    fn transfer_encoding_rules() {
        let te = |value: &str| {
            status(
                format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {value}\r\n\r\n")
                    .as_bytes(),
            )
        };
        assert_eq!(te("chunked"), 200);
        assert_eq!(te("CHUNKED"), 200);
        assert_eq!(te("gzip, chunked"), 501);
        for bad in [
            "chunked, chunked",
            "chunked, gzip",
            "identity",
            "xchunked",
            "",
            "chunked;x=1",
            "\"chunked\"",
            "chunked ,",
            "gzip",
        ] {
            assert_eq!(te(bad), 400, "{bad}");
        }
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        // Whitespace before the colon, obs-fold: httparse refuses them for requests.
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: a\r\nX: 1\r\n chunked\r\n\r\n"),
            400
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\n Host: a\r\n\r\n"), 400);
    }

    #[test]
    fn targets_by_form() {
        assert_eq!(status(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET a HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(
            status(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
            200
        );
        assert_eq!(status(b"CONNECT /a HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT a HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_TARGET)
        );
        assert_eq!(status(long.as_bytes()), 414);
    }

    #[test]
    fn absolute_form_takes_its_authority_from_the_target() {
        let head =
            parsed(b"GET http://t:8080/abs?q=1 HTTP/1.1\r\nHost: other\r\nX: 1\r\n\r\n").unwrap();
        assert_eq!(head.form(), Form::Absolute);
        assert_eq!(head.host(), b"t:8080");
        assert_eq!(head.path(), "/abs");
        assert_eq!(
            forwarded(
                b"GET http://t:8080/abs?q=1 HTTP/1.1\r\nHost: other\r\nX: 1\r\n\r\n",
                false
            ),
            "GET /abs?q=1 HTTP/1.1\r\nHost: t:8080\r\nX: 1\r\n"
        );
        assert_eq!(
            forwarded(b"GET HTTP://t HTTP/1.1\r\nHost: t\r\n\r\n", false),
            "GET / HTTP/1.1\r\nHost: t\r\n"
        );
        assert_eq!(
            forwarded(b"GET http://t?x HTTP/1.0\r\n\r\n", true),
            "GET /?x HTTP/1.0\r\nhost: t\r\n"
        );
        assert_eq!(
            parsed(b"GET http://t?x HTTP/1.0\r\n\r\n").unwrap().path(),
            "/"
        );
    }

    #[test]
    fn versions() {
        assert_eq!(status(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status(b"GET / http/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET /\r\n\r\n"), 400);
        assert_eq!(status(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
    }

    #[test]
    fn limits() {
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_FIELDS)
        );
        assert_eq!(status(many.as_bytes()), 431);
        let most = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_FIELDS - 1)
        );
        assert_eq!(status(most.as_bytes()), 200);
        let wide = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nx: {}\r\n\r\n",
            "b".repeat(MAX_FIELD_LINE)
        );
        assert_eq!(status(wide.as_bytes()), 431);
        let mut head = RequestHead::default();
        let long = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}",
            "x: y\r\n".repeat(MAX_HEAD / 6 + 1)
        );
        assert_eq!(head.parse(long.as_bytes()).map_err(|r| r.status), Err(431));
        assert_eq!(head.parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let values = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            format!("x: {}\r\n", "y".repeat(1000)).repeat(70)
        );
        assert_eq!(status(values.as_bytes()), 431);
    }

    #[test]
    fn field_values_with_controls_are_refused() {
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n"),
            200
        );
    }
}
