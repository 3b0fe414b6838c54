//! The properties the fuzz targets (`fuzz/`) check on arbitrary input, and that
//! `cargo test` replays over the checked-in corpus (`h1/tests/corpus.rs`). Each
//! panics when the property fails.
//!
//! The anchor is [`crate::reference`], a slow, literal reading of RFC 9112 written
//! apart from the fast parser. The safety property is one-sided and absolute:
//! whatever Sluice accepts, the reference accepts and reads the same way, and what
//! Sluice forwards the reference reads the same way again (so two RFC-conforming
//! parsers cannot frame it differently). The other side — Sluice refuses only
//! what the reference refuses — guards against refusing good traffic.

use bytes::Bytes;

use crate::reference;
use crate::request::{Body, RequestHead};
use crate::response::parse_response;
use crate::stream::RequestStream;
use crate::syntax::bare_line_break;
use crate::ChunkedDecoder;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn framing(body: Body) -> reference::Framing {
    match body {
        Body::None => reference::Framing::None,
        Body::Length(n) => reference::Framing::Length(n),
        Body::Chunked => reference::Framing::Chunked,
    }
}

/// A request head: accepted ⇒ the reference reads the same message; forwarded
/// (with or without the connection's own fields) ⇒ the reference reads it as the
/// same request again, Sluice re-reads it to the same bytes (a fixed point).
pub fn request_head(data: &[u8]) {
    let mut head = RequestHead::default();
    let verdict = head.parse(data);
    let expected = reference::parse_head(data);
    let n = match verdict {
        Ok(Some(n)) => n,
        Ok(None) => {
            assert!(
                expected.is_err(),
                "incomplete for Sluice, complete for the reference: {:?}",
                text(data)
            );
            return;
        }
        Err(refusal) => {
            assert!(
                expected.is_err(),
                "refused ({refusal:?}) what the reference accepts: {:?}",
                text(data)
            );
            return;
        }
    };
    let expected = expected.unwrap_or_else(|e| {
        panic!(
            "accepted what the reference refuses ({e:?}): {:?}",
            text(data)
        )
    });
    assert_eq!(n, expected.head_len, "head length: {:?}", text(data));
    head.attach(Bytes::copy_from_slice(&data[..n]));
    assert_eq!(head.method().as_bytes(), expected.method);
    assert_eq!(head.target(), expected.target);
    assert_eq!((1, head.minor_version()), expected.version);
    assert_eq!(framing(head.body()), expected.framing);
    assert_eq!(head.host(), expected.authority);
    let fields: Vec<(Vec<u8>, Vec<u8>)> = head
        .fields()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(fields, expected.fields, "fields of {:?}", text(data));
    for keep in [true, false] {
        let mut out = Vec::new();
        head.write_forwarded(&mut out, keep);
        out.extend_from_slice(b"\r\n");
        let again = reference::parse_head(&out).unwrap_or_else(|e| {
            panic!(
                "forwarded {:?} as {:?}, which the reference refuses ({e:?})",
                text(data),
                text(&out)
            )
        });
        assert_eq!(again.head_len, out.len(), "{:?}", text(&out));
        assert_eq!(again.method, expected.method);
        assert_eq!(again.version, expected.version);
        assert_eq!(again.framing, expected.framing);
        assert_eq!(again.authority, expected.authority);
        assert_eq!(again.target, expected.origin_path);
        let mut reread = RequestHead::default();
        assert_eq!(reread.parse(&out), Ok(Some(out.len())));
        reread.attach(Bytes::from(out.clone()));
        let mut twice = Vec::new();
        reread.write_forwarded(&mut twice, keep);
        twice.extend_from_slice(b"\r\n");
        assert_eq!(text(&twice), text(&out), "not a fixed point");
        // With a field replaced (the proxy's own traceparent after the head): the
        // same request, that field gone, nothing else changed.
        let mut without = Vec::new();
        head.write_forwarded_without(&mut without, keep, Some("traceparent"));
        without.extend_from_slice(b"\r\n");
        let parsed = reference::parse_head(&without).unwrap_or_else(|e| {
            panic!(
                "forwarded {:?} without traceparent as {:?}, which the reference refuses ({e:?})",
                text(data),
                text(&without)
            )
        });
        assert_eq!(parsed.method, expected.method);
        assert_eq!(parsed.framing, expected.framing);
        assert_eq!(parsed.authority, expected.authority);
        assert_eq!(parsed.target, expected.origin_path);
        let kept: Vec<&(Vec<u8>, Vec<u8>)> = again
            .fields
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(b"traceparent"))
            .collect();
        assert_eq!(
            parsed.fields.iter().collect::<Vec<_>>(),
            kept,
            "{:?} without traceparent: {:?}",
            text(data),
            text(&without)
        );
    }
}

/// What a decoder made of a body: its canonical form and how much it used; the
/// refusal's status; or `None` while incomplete.
type Decoded = Result<Option<(Vec<u8>, usize)>, u16>;

fn decode(body: &[u8], step: usize) -> Decoded {
    let mut decoder = ChunkedDecoder::new(true);
    let mut out = Vec::new();
    let mut pending = Vec::new();
    let mut used = 0;
    for piece in body.chunks(step.max(1)) {
        pending.extend_from_slice(piece);
        let progress = decoder
            .transcode(&pending, &mut out)
            .map_err(|r| r.status)?;
        pending.drain(..progress.consumed);
        used += progress.consumed;
        if progress.done {
            return Ok(Some((out, used)));
        }
    }
    Ok(None)
}

/// A chunked body (the first byte picks how the rest is split into reads):
/// the split changes nothing; accepted ⇒ the reference decodes the same data,
/// trailers and length, and the canonical form decodes to them again.
pub fn chunked(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let whole = decode(body, body.len());
    let stepped = decode(body, usize::from(first % 16) + 1);
    assert_eq!(
        whole.as_ref().map(|o| o.is_some()),
        stepped.as_ref().map(|o| o.is_some()),
        "the split matters: {:?}",
        text(body)
    );
    if let (Ok(Some(a)), Ok(Some(b))) = (&whole, &stepped) {
        assert_eq!(a, b, "the split matters: {:?}", text(body));
    }
    let expected = reference::decode_chunked(body);
    match whole {
        Ok(Some((canonical, used))) => {
            let (data, trailers, len) = expected.unwrap_or_else(|e| {
                panic!(
                    "decoded what the reference refuses ({e:?}): {:?}",
                    text(body)
                )
            });
            assert_eq!(used, len, "{:?}", text(body));
            let (again, again_trailers, again_len) = reference::decode_chunked(&canonical)
                .unwrap_or_else(|e| {
                    panic!("canonical form refused ({e:?}): {:?}", text(&canonical))
                });
            assert_eq!(again, data);
            assert_eq!(again_trailers, trailers);
            assert_eq!(again_len, canonical.len());
            assert_eq!(
                decode(&canonical, canonical.len()),
                Ok(Some((canonical.clone(), canonical.len()))),
                "not a fixed point"
            );
        }
        Ok(None) => assert!(
            expected.is_err(),
            "incomplete for Sluice, complete for the reference: {:?}",
            text(body)
        ),
        Err(status) => assert!(
            expected.is_err(),
            "refused ({status}) what the reference decodes: {:?}",
            text(body)
        ),
    }
}

/// Protocol detection of a connection's first bytes: decides every input of
/// `MAX_LOOK` bytes or more, and never changes its mind as bytes arrive (what it
/// decided on a prefix it decides on the whole); HTTP/1 only for a request line
/// (`token SP`...) and HTTP/2 only for the whole preface.
pub fn detect(data: &[u8]) {
    use crate::detect::{classify, Protocol, H2_PREFACE, MAX_LOOK};
    let whole = classify(data);
    if data.len() >= MAX_LOOK {
        assert!(whole.is_some(), "{} bytes undecided", data.len());
    }
    // Every prefix up to 64 bytes, then every 61st: the decision is stable.
    let cuts = (0..=data.len().min(64)).chain((64..data.len()).step_by(61));
    for k in cuts {
        if let Some(early) = classify(&data[..k]) {
            assert_eq!(
                whole,
                Some(early),
                "decided {early:?} on {k} bytes of {:?}",
                text(data)
            );
        }
    }
    match whole {
        Some(Protocol::Http2) => assert!(data.starts_with(H2_PREFACE)),
        Some(Protocol::Http1) => {
            let method = data.iter().position(|&b| b == b' ').unwrap_or(0);
            assert!(
                method > 0 && crate::syntax::is_token(&data[..method]),
                "{:?}",
                text(data)
            );
        }
        _ => {}
    }
}

/// A response head from a backend (the first byte's low bit: it answers a HEAD):
/// relayed ⇒ CRLF only, at most one Content-Length and none beside
/// Transfer-Encoding, read the same way again, and a fixed point.
pub fn response_head(data: &[u8]) {
    let head_request = data.first().is_some_and(|b| b & 1 == 1);
    let Ok(Some(head)) = parse_response(data, head_request) else {
        return;
    };
    let mut out = Vec::new();
    head.write_relayed(data, &mut out);
    out.extend_from_slice(b"\r\n");
    assert_eq!(bare_line_break(&out), None, "{:?}", text(&out));
    let again = parse_response(&out, head_request)
        .unwrap_or_else(|e| panic!("relayed head refused ({e:?}): {:?}", text(&out)))
        .unwrap_or_else(|| panic!("relayed head incomplete: {:?}", text(&out)));
    assert_eq!(again.len, out.len());
    assert_eq!(again.status, head.status);
    assert_eq!(again.framing, head.framing);
    let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').collect();
    let named = |name: &str| {
        lines
            .iter()
            .filter(|l| {
                l.len() > name.len()
                    && l[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                    && l[name.len()] == b':'
            })
            .count()
    };
    assert!(named("content-length") <= 1, "{:?}", text(&out));
    assert!(
        named("content-length") == 0 || named("transfer-encoding") == 0,
        "{:?}",
        text(&out)
    );
    let mut twice = Vec::new();
    again.write_relayed(&out, &mut twice);
    twice.extend_from_slice(b"\r\n");
    assert_eq!(text(&twice), text(&out), "not a fixed point");
}

/// A client's byte stream (the first byte picks the read size), as pingora reads
/// it through the front: every message that goes through is read by the
/// reference from the converted stream exactly as from the original — same
/// requests, same bodies, in the same order — and the stream stops where the
/// reference stops.
pub fn request_stream(data: &[u8]) {
    if let Some((&first, input)) = data.split_first() {
        request_stream_read_by(input, usize::from(first % 32) + 1);
    }
}

/// [`request_stream`] with the client's bytes arriving `step` at a time.
pub fn request_stream_read_by(input: &[u8], step: usize) {
    let step = step.max(1);
    let mut stream = RequestStream::default();
    let mut out = Vec::new();
    let mut pending = Vec::new();
    'feed: for piece in input.chunks(step) {
        pending.extend_from_slice(piece);
        loop {
            match stream.convert(&pending, &mut out) {
                Ok(0) => break,
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(_) => break 'feed,
            }
            if stream.opaque() {
                break 'feed;
            }
        }
    }
    let (original, stop) = reference::parse_stream_messages(input);
    let (converted, _) = reference::parse_stream_messages(&out);
    // A protocol switch ends what is HTTP (the reference reads on regardless).
    let switch = original.iter().position(|m| {
        m.request.method == b"CONNECT"
            || m.request.fields.iter().any(|(n, v)| {
                n.eq_ignore_ascii_case(b"upgrade")
                    || (n.eq_ignore_ascii_case(b"connection")
                        && v.split(|&b| b == b',')
                            .any(|t| reference::trim_ows(t).eq_ignore_ascii_case(b"upgrade")))
            })
    });
    let original = match switch {
        Some(i) => &original[..=i],
        None => &original[..],
    };
    let converted = match switch {
        Some(i) => &converted[..converted.len().min(i + 1)],
        None => &converted[..],
    };
    assert!(
        converted.len() <= original.len(),
        "more requests came out than went in: {:?} -> {:?}",
        text(input),
        text(&out)
    );
    for (got, want) in converted.iter().zip(original) {
        assert_eq!(got.request.method, want.request.method);
        assert_eq!(got.request.version, want.request.version);
        assert_eq!(got.request.authority, want.request.authority);
        assert_eq!(got.request.target, want.request.origin_path);
        assert_eq!(got.request.framing, want.request.framing);
        assert_eq!(got.body, want.body, "{:?}", text(input));
    }
    if switch.is_none() {
        // Sluice went as far as the reference: every complete request came out,
        // and none where the reference stopped. (Where the reference refused a
        // line of a head that is not complete yet, Sluice may still be waiting
        // for the head's end: it checks whole heads. Nothing of it went out.)
        assert_eq!(
            converted.len(),
            original.len(),
            "requests lost or added: {:?} -> {:?} (the reference stopped at {stop:?})",
            text(input),
            text(&out)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::{self, Expect};

    /// Every case of the case file, through the front's stream converter: the
    /// expected outcome, and every property on its bytes.
    #[test]
    fn the_case_file_holds_on_the_stream_converter() {
        let cases = cases::parse(include_str!("../tests/requests.cases")).unwrap();
        assert!(cases.len() >= 300, "{} cases", cases.len());
        let mut failures = Vec::new();
        for case in &cases {
            let mut stream = RequestStream::default();
            let mut out = Vec::new();
            let mut pending = case.data.clone();
            let refused = loop {
                match stream.convert(&pending, &mut out) {
                    Ok(0) => break None,
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(r) => break Some(r),
                }
            };
            let (forwarded, _) = reference::parse_stream_messages(&out);
            let ok = match (&case.expect, refused) {
                (Expect::Reject(statuses), Some(r)) => {
                    statuses.contains(&r.refusal.status) && forwarded.is_empty()
                }
                (Expect::Forward(n), None) => forwarded.len() == *n,
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{}: expected {:?}, got {:?} after {} requests",
                    case.name,
                    case.expect,
                    refused.map(|r| r.refusal),
                    forwarded.len()
                ));
            }
            request_stream_read_by(&case.data, case.data.len());
            request_stream_read_by(&case.data, 7);
            request_head(&case.data);
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
