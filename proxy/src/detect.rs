//! Protocol detection on the transparent listeners: what the first bytes of a
//! connection say it speaks — HTTP/2 (the connection preface), HTTP/1 (a request
//! line), or anything else ("opaque" TCP: a database, TLS, a message broker).
//!
//! Why: with iptables interception every TCP connection of the pod reaches the
//! proxy, not only HTTP. A connection the HTTP engines cannot read must still reach
//! where it was going, so the listener tells the protocols apart before parsing
//! and hands opaque ones to [`crate::opaque`] (as Linkerd does).
//!
//! How: [`classify`] (in `sluice_h1`, so the fuzz targets reach it) is a pure function of the bytes received so far that either
//! decides or asks for more. It looks at a bounded prefix ([`MAX_LOOK`]) and never
//! changes its mind: once it decides on some bytes, it decides the same on any
//! longer input that starts with them (property-tested below, and fuzzed:
//! `sluice_h1::properties::detect`). [`sniff`] reads
//! until it decides, for at most the detection timeout: a client that sends nothing
//! (MySQL, SMTP, where the server speaks first) is opaque when it expires.
//!
//! HTTP/1 is recognised by its request line, `token SP visible-chars SP HTTP/1.`,
//! not by the method alone, so that text protocols that also start with a word and
//! a space (memcached's `get key`, Redis inline commands) are opaque. A request line
//! longer than [`MAX_LOOK`] that still looks like one is HTTP/1: the HTTP engine
//! answers it (414/400) as it would without detection.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

pub use sluice_h1::detect::{classify, Protocol, H2_PREFACE, MAX_LOOK};

/// How the listener treats connections before the HTTP engines parse them
/// (only on `--transparent` listeners).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// Destination ports that are opaque without looking (`--opaque-ports`):
    /// server-speaks-first protocols, where waiting for the client would only add
    /// the timeout to every connection.
    pub opaque_ports: Vec<u16>,
    /// How long to wait for the client's first bytes (`--detect-timeout`).
    pub timeout: Duration,
    /// An opaque connection idle this long both ways is closed (`--tcp-idle-timeout`).
    pub idle_timeout: Duration,
}

/// Linkerd's default opaque ports: SMTP (25, 587), MySQL (3306, 4444 for Galera),
/// PostgreSQL (5432), Redis (6379), Elasticsearch transport (9300), memcached
/// (11211). Server-speaks-first, or never HTTP.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";
/// Default `--detect-timeout`. Shorter than Linkerd's 10 s: a client that has not
/// spoken after a second is very likely waiting for a server banner, and every such
/// connection on a port not listed as opaque waits this long. Misreading a slow
/// HTTP client as opaque is safe (it still reaches its destination, ungoverned).
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `--tcp-idle-timeout`, Envoy's `tcp_proxy` default: long enough for
/// pooled database connections, short enough that abandoned ones are reclaimed.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// What [`sniff`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Protocol(Protocol),
    /// The client sent nothing for the whole timeout: opaque, its server speaks
    /// first (told apart so that it can be counted: the port is worth listing).
    Silent,
    /// The client left (or failed) before sending anything.
    Closed,
}

impl Sniffed {
    /// The `result` label of `sluice_protocol_detections_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Sniffed::Protocol(Protocol::Http1) => "http1",
            Sniffed::Protocol(Protocol::Http2) => "http2",
            Sniffed::Protocol(Protocol::Opaque) => "opaque",
            Sniffed::Silent => "timeout",
            Sniffed::Closed => "closed",
        }
    }

    /// Every `result` label value (and `opaque_port`, for connections to a listed
    /// port, which are not sniffed).
    pub const RESULTS: [&'static str; 6] = [
        "http1",
        "http2",
        "opaque",
        "timeout",
        "closed",
        "opaque_port",
    ];
}

/// Reads the first bytes of a connection into `buf` until [`classify`] decides,
/// for at most `timeout`. Silence until then is [`Sniffed::Silent`], opaque (the
/// server speaks first); a partial HTTP-looking prefix then is HTTP/1 (the HTTP engine's
/// own timeouts apply from there); a client that closes mid-way after sending
/// something is opaque (its bytes are delivered as they are).
pub async fn sniff<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Sniffed {
    let deadline = tokio::time::Instant::now() + timeout;
    // Bounded: every pass that does not return reads at least one byte, and
    // `classify` decides by MAX_LOOK bytes.
    loop {
        if let Some(protocol) = classify(buf) {
            return Sniffed::Protocol(protocol);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4 * 1024);
        }
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) if buf.is_empty() => return Sniffed::Closed,
            Ok(_) => return Sniffed::Protocol(Protocol::Opaque),
            Err(_) if buf.is_empty() => return Sniffed::Silent,
            Err(_) => return Sniffed::Protocol(Protocol::Http1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recognises_http1_request_lines() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /orders?id=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HEAD http://shop/ HTTP/1.0\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT db:5432 HTTP/1.1\r\n",
            b"PRI /not-the-preface HTTP/1.1\r\n",
        ] {
            assert_eq!(classify(line), Some(Protocol::Http1), "{line:?}");
        }
    }

    #[test]
    fn recognises_the_http2_preface_whole_only() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        for n in 0..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), None, "{n} bytes");
        }
    }

    #[test]
    fn everything_else_is_opaque() {
        for first in [
            &b"*1\r\n$4\r\nPING\r\n"[..],        // Redis (RESP)
            b"PING\r\n",                         // Redis inline command
            b"get key\r\n",                      // memcached text protocol
            b"\x16\x03\x01\x02\x00\x01\x00",     // TLS ClientHello
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"GET /\r\n",                        // HTTP/0.9
            b"GET / HTTP/2.0\r\n",
            b"GET  / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
        ] {
            assert_eq!(classify(first), Some(Protocol::Opaque), "{first:?}");
        }
        let long_method = [b'A'; sluice_h1::detect::MAX_METHOD + 1];
        assert_eq!(classify(&long_method), Some(Protocol::Opaque));
    }

    #[test]
    fn waits_for_more_of_a_partial_request_line() {
        for partial in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"GET /a",
            b"GET /a ",
            b"GET /a HTTP/1",
        ] {
            assert_eq!(classify(partial), None, "{partial:?}");
        }
    }

    #[test]
    fn a_request_line_longer_than_the_look_is_http1() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_LOOK, b'a');
        assert_eq!(classify(&line), Some(Protocol::Http1));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_until_the_timeout_is_opaque() {
        let (mut client, _server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let sniffed = sniff(&mut client, &mut buf, Duration::from_secs(1)).await;
        assert_eq!(sniffed, Sniffed::Silent);
        assert!(buf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn reads_a_request_line_sent_in_pieces_and_keeps_the_bytes() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in [&b"GE"[..], b"T /x HT", b"TP/1.1\r\n\r\n"] {
                let _ = server.write_all(piece).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            server
        });
        let mut buf = BytesMut::new();
        let sniffed = sniff(&mut client, &mut buf, Duration::from_secs(1)).await;
        assert_eq!(sniffed, Sniffed::Protocol(Protocol::Http1));
        assert!(b"GET /x HTTP/1.1\r\n\r\n".starts_with(&buf));
        assert!(buf.starts_with(b"GET /x HTTP/1."));
        drop(writer.await);
    }

    #[tokio::test]
    async fn a_client_that_leaves_silently_is_closed() {
        let (mut client, server) = tokio::io::duplex(64);
        drop(server);
        let mut buf = BytesMut::new();
        let sniffed = sniff(&mut client, &mut buf, Duration::from_secs(1)).await;
        assert_eq!(sniffed, Sniffed::Closed);
    }

    fn request_line() -> impl Strategy<Value = Vec<u8>> {
        ("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32}", "[!-~]{1,200}", 0u8..=9).prop_map(
            |(method, target, minor)| format!("{method} {target} HTTP/1.{minor}\r\n").into_bytes(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Every prefix of a request line waits or says HTTP/1 (never opaque), and
        /// the whole line is HTTP/1 (unless it is the preface's own first line).
        #[test]
        fn request_lines_and_their_prefixes_are_never_opaque(line in request_line()) {
            prop_assume!(!line.starts_with(b"PRI * HTTP/2"));
            for n in 0..=line.len() {
                prop_assert_ne!(classify(&line[..n]), Some(Protocol::Opaque));
            }
            prop_assert_eq!(classify(&line), Some(Protocol::Http1));
        }

        /// Once decided, more bytes never change the decision.
        #[test]
        fn a_decision_is_final(
            first in prop::collection::vec(any::<u8>(), 0..64),
            more in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            if let Some(decided) = classify(&first) {
                let mut longer = first.clone();
                longer.extend_from_slice(&more);
                prop_assert_eq!(classify(&longer), Some(decided));
            }
        }

        /// A decided request line stays decided whatever follows it.
        #[test]
        fn a_decided_request_line_is_final(
            line in request_line(),
            more in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assume!(!line.starts_with(b"PRI * HTTP/2"));
            let mut longer = line.clone();
            longer.extend_from_slice(&more);
            prop_assert_eq!(classify(&longer), Some(Protocol::Http1));
        }

        /// Anything of MAX_LOOK bytes or more is decided.
        #[test]
        fn the_look_is_bounded(fill in any::<u8>(), prefix in request_line()) {
            let mut bytes = prefix[..prefix.len().min(20)].to_vec();
            bytes.resize(MAX_LOOK, fill);
            prop_assert!(classify(&bytes).is_some());
        }
    }
}
