//! HTTP/1 responses as HTTP/2 ones: the head without connection fields and
//! framing (HTTP/2 frames itself, RFC 9113 §8.2.2), a chunked body as data and
//! trailers (gRPC's `grpc-status` from an HTTP/1 backend reaches the client).

use bytes::{Bytes, BytesMut};
use sluice_h1::{Framing, ResponseHead};

use super::upstream::is_hop_by_hop;

/// An HTTP/1 response head as an HTTP/2 one: hop-by-hop fields, those
/// `Connection` names, and framing fields stay behind (HTTP/2 frames itself).
pub(super) fn translate(buf: &[u8], head: &ResponseHead) -> http::response::Parts {
    let mut response = http::Response::new(());
    *response.status_mut() =
        http::StatusCode::from_u16(head.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; sluice_h1::MAX_FIELDS];
    let mut parsed = httparse::Response::new(&mut []);
    // Parsed before with the same bytes by sluice_h1: cannot fail here.
    let _ = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        &buf[..head.len],
        &mut fields,
    );
    let nominated: Vec<&[u8]> = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(sluice_h1::syntax::trim_ows)
        .collect();
    let keep_length = matches!(head.framing, Framing::Length(_) | Framing::Empty);
    let mut length_seen = false;
    let headers = response.headers_mut();
    for h in parsed.headers.iter() {
        let Ok(name) = http::HeaderName::from_bytes(h.name.as_bytes()) else {
            continue;
        };
        if is_hop_by_hop(&name)
            || name == http::header::TE
            || nominated
                .iter()
                .any(|n| n.eq_ignore_ascii_case(h.name.as_bytes()))
        {
            continue;
        }
        if name == http::header::CONTENT_LENGTH {
            if !keep_length || length_seen {
                continue;
            }
            length_seen = true;
        }
        if let Ok(value) = http::HeaderValue::from_bytes(h.value) {
            headers.append(name, value);
        }
    }
    response.into_parts().0
}

/// Splits canonical chunked encoding (as `ChunkedDecoder` writes it: whole lines,
/// data in between) into data and trailers.
#[derive(Default)]
pub(super) struct Dechunk {
    /// Data bytes of the current chunk still to come.
    left: usize,
    /// The CRLF after chunk data is next.
    data_end: bool,
    /// In the trailer section.
    pub(super) trailers: Option<http::HeaderMap>,
    done: bool,
}

impl Dechunk {
    /// Takes what `canon` holds whole: data out into `data`; partial lines stay.
    pub(super) fn take(&mut self, canon: &mut BytesMut, data: &mut Vec<Bytes>) {
        // Bounded: each pass consumes bytes of `canon` or stops.
        while !canon.is_empty() && !self.done {
            if self.left > 0 {
                let n = self.left.min(canon.len());
                data.push(canon.split_to(n).freeze());
                self.left -= n;
                continue;
            }
            let Some(end) = canon.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let line = canon.split_to(end + 2);
            let line = &line[..end];
            if self.data_end {
                self.data_end = false;
            } else if let Some(trailers) = self.trailers.as_mut() {
                if line.is_empty() {
                    self.done = true;
                } else if let Some(colon) = line.iter().position(|&b| b == b':') {
                    let (name, value) = (
                        &line[..colon],
                        sluice_h1::syntax::trim_ows(&line[colon + 1..]),
                    );
                    if let (Ok(name), Ok(value)) = (
                        http::HeaderName::from_bytes(name),
                        http::HeaderValue::from_bytes(value),
                    ) {
                        trailers.append(name, value);
                    }
                }
            } else {
                let size = sluice_h1::syntax::hex_number(line).unwrap_or(0) as usize;
                if size == 0 {
                    self.trailers = Some(http::HeaderMap::new());
                } else {
                    self.left = size;
                    self.data_end = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_h1::{parse_response, ChunkedDecoder};

    /// Decodes `wire` (chunked, as a backend sent it) fed in pieces of `step` bytes.
    fn dechunk(wire: &[u8], step: usize) -> (Vec<u8>, Option<http::HeaderMap>) {
        let mut decoder = ChunkedDecoder::new(true);
        let (mut input, mut canon, mut pending) = (Vec::new(), Vec::new(), BytesMut::new());
        let mut dechunk = Dechunk::default();
        let mut data = Vec::new();
        for piece in wire.chunks(step) {
            input.extend_from_slice(piece);
            let progress = decoder
                .transcode(&input, &mut canon)
                .expect("valid chunking");
            input.drain(..progress.consumed);
            pending.extend_from_slice(&canon);
            canon.clear();
            dechunk.take(&mut pending, &mut data);
            if progress.done {
                break;
            }
        }
        let body = data.iter().flat_map(|b| b.iter().copied()).collect();
        (body, dechunk.trailers.filter(|t| !t.is_empty()))
    }

    #[test]
    fn chunked_bodies_become_data_and_trailers_whatever_the_pieces() {
        let wire = b"5;ext=1\r\nhello\r\n006\r\n world\r\n0\r\ngrpc-status: 0\r\nx-a:  b \r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, trailers) = dechunk(wire, step);
            assert_eq!(body, b"hello world", "step {step}");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-a"], "b");
        }
    }

    #[test]
    fn translated_heads_leave_connection_fields_and_framing_behind() {
        let wire = b"HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nKeep-Alive: timeout=5\r\nX-Private: p\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nUpgrade: h2c\r\nX-Kept: k\r\n\r\n";
        let head = parse_response(wire, false).expect("valid").expect("whole");
        let parts = translate(wire, &head);
        assert_eq!(parts.status, 200);
        let names: Vec<&str> = parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);

        let wire = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
        let head = parse_response(wire, false).expect("valid").expect("whole");
        let parts = translate(wire, &head);
        assert_eq!(parts.status, 404);
        assert_eq!(parts.headers.get_all("content-length").iter().count(), 1);
    }

    #[test]
    fn a_chunked_body_without_trailers_has_none() {
        let (body, trailers) = dechunk(b"3\r\nabc\r\n0\r\n\r\n", 4);
        assert_eq!(body, b"abc");
        assert!(trailers.is_none());
    }
}
