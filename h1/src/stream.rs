//! A client connection's bytes as a sequence of canonical requests: what the proxy
//! hands to a reader it does not own (pingora's HTTP/1 server), so that reader
//! only ever sees messages this crate has checked and re-framed.
//!
//! Each head is checked by [`RequestHead`] and forwarded in canonical form with its
//! connection fields (the reader serves this same connection); a body framed by
//! length passes as is, a chunked one is re-encoded canonically (its trailers
//! dropped: pingora discards request trailers anyway). After a request that asks to
//! switch protocols (Upgrade, CONNECT) the rest of the connection is opaque: its
//! reader either tunnels it or, if the switch was refused, must close.

use bytes::Bytes;

use crate::chunked::ChunkedDecoder;
use crate::request::{Body, Form, RequestHead};
use crate::Refusal;

#[derive(Debug)]
enum State {
    Head,
    Length(u64),
    Chunked(ChunkedDecoder),
    Opaque,
    Refused(Refused),
}

/// Why the stream stopped, and whether a head had gone out for the message that
/// was refused (then its reader is mid-request and must fail it; else the next
/// thing it reads would have been a head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    pub in_body: bool,
}

/// Converts a client's bytes, message by message.
#[derive(Debug)]
pub struct RequestStream {
    state: State,
    head: RequestHead,
    /// The message being converted switches protocols once its body is through.
    switching: bool,
}

impl Default for RequestStream {
    fn default() -> Self {
        RequestStream {
            state: State::Head,
            head: RequestHead::default(),
            switching: false,
        }
    }
}

impl RequestStream {
    /// The rest of the connection passes unchanged (after a protocol switch).
    pub fn opaque(&self) -> bool {
        matches!(self.state, State::Opaque)
    }

    /// Between messages: the next byte would start a head.
    pub fn at_head(&self) -> bool {
        matches!(self.state, State::Head)
    }

    /// The refusal that stopped the stream, if one did.
    pub fn refused(&self) -> Option<Refused> {
        match self.state {
            State::Refused(r) => Some(r),
            _ => None,
        }
    }

    fn after_message(&self) -> State {
        if self.switching {
            State::Opaque
        } else {
            State::Head
        }
    }

    /// Converts from the start of `input`, appending canonical bytes to `out`, and
    /// returns how many input bytes it used (0: more input is needed). It stops at
    /// the end of each head and of each body, so a caller that hands `out` on
    /// before calling again never gives its reader two messages in one read.
    pub fn convert(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Refused> {
        let in_body = !matches!(self.state, State::Head);
        match self.step(input, out) {
            Ok(n) => Ok(n),
            Err(refusal) => {
                let refused = Refused { refusal, in_body };
                self.state = State::Refused(refused);
                Err(refused)
            }
        }
    }

    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Refusal> {
        match &mut self.state {
            State::Refused(r) => Err(r.refusal),
            State::Opaque => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
            State::Head => {
                let Some(n) = self.head.parse(input)? else {
                    return Ok(0);
                };
                self.head.attach(Bytes::copy_from_slice(&input[..n]));
                self.head.write_forwarded(out, true);
                out.extend_from_slice(b"\r\n");
                self.switching = self.head.upgrade() || self.head.form() == Form::Authority;
                self.state = match self.head.body() {
                    Body::Length(left) if left > 0 => State::Length(left),
                    Body::Chunked => State::Chunked(ChunkedDecoder::new(false)),
                    _ => self.after_message(),
                };
                Ok(n)
            }
            State::Length(left) => {
                let take = (*left).min(input.len() as u64) as usize;
                out.extend_from_slice(&input[..take]);
                *left -= take as u64;
                if *left == 0 {
                    self.state = self.after_message();
                }
                Ok(take)
            }
            State::Chunked(decoder) => {
                let progress = decoder.transcode(input, out)?;
                if progress.done {
                    self.state = self.after_message();
                }
                Ok(progress.consumed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes as a reader would get them: the
    /// canonical bytes of each call, then the refusal if any.
    fn run(input: &[u8], step: usize) -> (Vec<Vec<u8>>, Option<Refused>) {
        let mut stream = RequestStream::default();
        let mut pending = Vec::new();
        let mut reads = Vec::new();
        for piece in input.chunks(step.max(1)) {
            pending.extend_from_slice(piece);
            loop {
                let mut out = Vec::new();
                match stream.convert(&pending, &mut out) {
                    Ok(0) if out.is_empty() => break,
                    Ok(n) => {
                        pending.drain(..n);
                        if !out.is_empty() {
                            reads.push(out);
                        }
                    }
                    Err(r) => return (reads, Some(r)),
                }
            }
        }
        (reads, None)
    }

    fn joined(reads: &[Vec<u8>]) -> String {
        String::from_utf8(reads.concat()).unwrap()
    }

    #[test]
    fn pipelined_requests_come_out_canonical_one_message_per_read() {
        let input = b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n003;x=y\r\nxyz\r\n0\r\nT: 1\r\n\r\nGET http://t/c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        for step in [1, 2, 7, input.len()] {
            let (reads, refused) = run(input, step);
            assert_eq!(refused, None);
            assert_eq!(
                joined(&reads),
                "POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\nGET /c HTTP/1.0\r\nConnection: keep-alive\r\nhost: t\r\n\r\n",
                "step {step}"
            );
        }
        // Whole input at once: head, body, head, body, head — never two messages in a read.
        let (reads, _) = run(input, input.len());
        assert_eq!(reads.len(), 5);
    }

    #[test]
    fn a_bad_head_is_refused_before_anything_of_it_goes_out() {
        let input =
            b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n";
        let (reads, refused) = run(input, input.len());
        assert_eq!(joined(&reads), "GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
        let refused = refused.unwrap();
        assert_eq!((refused.refusal.status, refused.in_body), (400, false));
    }

    #[test]
    fn bad_chunk_framing_is_refused_mid_body() {
        let input = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n";
        let (reads, refused) = run(input, input.len());
        assert_eq!(
            joined(&reads),
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            refused.map(|r| (r.refusal.status, r.in_body)),
            Some((400, true))
        );
    }

    #[test]
    fn after_an_upgrade_the_stream_is_opaque() {
        let input = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello GET / HTTP/1.1\n\n";
        let (reads, refused) = run(input, 3);
        assert_eq!(refused, None);
        assert!(reads
            .concat()
            .ends_with(b"\x81\x05hello GET / HTTP/1.1\n\n"));
    }
}
