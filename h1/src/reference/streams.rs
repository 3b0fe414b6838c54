//! Messages, streams of them, and their canonical form.

use super::*;

// ---------------------------------------------------------------------------
// Messages and streams (RFC 9112 6.3 message body length; 9.3 pipelining)
// ---------------------------------------------------------------------------

/// Parses one request (head and body) at the start of `input`.
pub fn parse_message(input: &[u8]) -> Result<Message, Reject> {
    let request = parse_head(input)?;
    let rest = &input[request.head_len..];
    let (body, chunks, trailers, body_len) = match request.framing {
        Framing::None => (Vec::new(), Vec::new(), Vec::new(), 0),
        Framing::Length(n) => {
            let n = usize::try_from(n).map_err(|_| Reject::Incomplete)?;
            if rest.len() < n {
                return Err(Reject::Incomplete);
            }
            (rest[..n].to_vec(), Vec::new(), Vec::new(), n)
        }
        Framing::Chunked => {
            let (chunks, trailers, used) = decode_chunked_parts(rest)?;
            (chunks.concat(), chunks, trailers, used)
        }
    };
    let len = request.head_len + body_len;
    Ok(Message {
        request,
        body,
        chunks,
        trailers,
        len,
    })
}

/// Like `parse_stream`, with chunk boundaries and trailers kept.
/// Returns None as the second element iff the input ends exactly at a message
/// boundary; Some(Incomplete) if a partial message follows (leading CRLFs of a
/// next request included); Some(Status) at the first rejection.
pub fn parse_stream_messages(input: &[u8]) -> (Vec<Message>, Option<Reject>) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        match parse_message(&input[pos..]) {
            Ok(m) => {
                pos += m.len;
                out.push(m);
            }
            Err(r) => return (out, Some(r)),
        }
    }
    (out, None)
}

/// Parses a whole byte stream of pipelined requests into requests with their
/// (decoded) bodies, stopping at the first rejection (returned as the last
/// element) or at incomplete input (Some(Incomplete)); None iff the input ends
/// exactly after a complete request (or is empty). Connection persistence
/// (Connection: close, HTTP/1.0 without keep-alive) is NOT applied: see
/// `is_persistent`.
pub fn parse_stream(input: &[u8]) -> (Vec<(Request, Vec<u8>)>, Option<Reject>) {
    let (msgs, rej) = parse_stream_messages(input);
    (msgs.into_iter().map(|m| (m.request, m.body)).collect(), rej)
}

/// RFC 9112 9.3: does the connection persist after this request?
/// "close" in Connection -> no; else HTTP/1.1 -> yes; HTTP/1.0 -> only with
/// "keep-alive" in Connection. (Connection = #connection-option, token, ci.)
pub fn is_persistent(req: &Request) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for (n, v) in &req.fields {
        if n.eq_ignore_ascii_case(b"connection") {
            for opt in v.split(|&b| b == b',') {
                let opt = trim_ows(opt);
                close |= opt.eq_ignore_ascii_case(b"close");
                keep_alive |= opt.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    if close {
        false
    } else {
        req.version == (1, 1) || keep_alive
    }
}

// ---------------------------------------------------------------------------
// Canonical serialization
// ---------------------------------------------------------------------------

/// Accepted targets starting with "http://" / "https://" (any case) are
/// exactly the absolute-form ones (CONNECT can never accept them).
pub(crate) fn is_absolute_form_target(t: &[u8]) -> bool {
    strip_prefix_ci(t, b"http://").is_some() || strip_prefix_ci(t, b"https://").is_some()
}

pub(crate) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The canonical head (request line, fields, final CRLF).
pub fn canonical_head(req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&req.method);
    out.push(SP);
    out.extend_from_slice(&req.origin_path);
    out.extend_from_slice(if req.version == (1, 0) {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    if is_absolute_form_target(&req.target) {
        // RFC 9112 3.2.2: one Host = the target's authority, where the first
        // Host was, or first if there was none.
        let has_host = req
            .fields
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(b"host"));
        let mut host_written = false;
        if !has_host {
            push_field(&mut out, b"Host", &req.authority);
            host_written = true;
        }
        for (n, v) in &req.fields {
            if n.eq_ignore_ascii_case(b"host") {
                if !host_written {
                    push_field(&mut out, b"Host", &req.authority);
                    host_written = true;
                }
            } else {
                push_field(&mut out, n, v);
            }
        }
    } else {
        for (n, v) in &req.fields {
            push_field(&mut out, n, v);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

pub(crate) fn push_chunked(out: &mut Vec<u8>, chunks: &[&[u8]], trailers: &[(Vec<u8>, Vec<u8>)]) {
    for c in chunks.iter().filter(|c| !c.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (n, v) in trailers {
        push_field(out, n, v);
    }
    out.extend_from_slice(b"\r\n");
}

/// The canonical serialization a proxy must forward for an accepted request.
/// A chunked body is emitted as ONE chunk (none if empty), then last-chunk,
/// trailers and CRLF; a Content-Length body is copied; with Framing::None the
/// body argument is ignored.
pub fn canonical(req: &Request, body: &[u8], trailers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = canonical_head(req);
    match req.framing {
        Framing::None => {}
        Framing::Length(_) => out.extend_from_slice(body),
        Framing::Chunked => push_chunked(&mut out, &[body], trailers),
    }
    out
}

/// Same as `canonical`, but a chunked body keeps the received chunk boundaries
/// (each chunk re-framed canonically). For a Content-Length body the chunks
/// are concatenated.
pub fn canonical_with_chunks(
    req: &Request,
    chunks: &[Vec<u8>],
    trailers: &[(Vec<u8>, Vec<u8>)],
) -> Vec<u8> {
    let mut out = canonical_head(req);
    match req.framing {
        Framing::None => {}
        Framing::Length(_) => chunks.iter().for_each(|c| out.extend_from_slice(c)),
        Framing::Chunked => {
            let parts: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            push_chunked(&mut out, &parts, trailers)
        }
    }
    out
}

/// Canonical form of every accepted message of a stream (one chunk per body),
/// concatenated, plus the stream's stop reason as in `parse_stream`.
pub fn canonical_stream(input: &[u8]) -> (Vec<u8>, Option<Reject>) {
    let (msgs, rej) = parse_stream_messages(input);
    let mut out = Vec::new();
    for m in &msgs {
        out.extend_from_slice(&canonical(&m.request, &m.body, &m.trailers));
    }
    (out, rej)
}
