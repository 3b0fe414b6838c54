//! gRPC as the flow sees it: which requests are gRPC calls, their deadline
//! (`grpc-timeout`), what their `grpc-status` means for governance, and the form
//! of the proxy's own answers to them.
//!
//! A gRPC call's outcome is its `grpc-status` (in the trailers, or in the head of
//! a trailers-only response), not the HTTP status, which is 200 for failed calls
//! too. gRPC clients read refusals only as gRPC statuses: a 429 or a 503 reaches
//! the application as an opaque transport error, so every answer of the proxy's
//! own to a gRPC call is trailers-only: HTTP 200, `content-type:
//! application/grpc`, `grpc-status` and `grpc-message` (grpc/doc/PROTOCOL-HTTP2.md).

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use sluice_policy::GrpcCode;

use super::Reply;

pub use crate::runtime::is_grpc;

/// The `grpc-status` in a response head or its trailers, when it is a number (what
/// both engines report in `Event::Response` and `Event::Finished`).
pub fn status_of(headers: &http::HeaderMap) -> Option<u32> {
    let value = headers.get("grpc-status")?;
    std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()
}

/// A `grpc-timeout` value (`TimeoutValue TimeoutUnit`: at most 8 digits, then one
/// of `H M S m u n`); `None` when malformed (the call then has no deadline of its
/// own, as gRPC servers treat it).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value: the finest unit whose value fits in 8 digits,
/// rounded down (the server must not think it has more time than it has).
pub fn format_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let value = nanos / per;
        if value <= MAX {
            return format!("{value}{unit}");
        }
    }
    format!("{MAX}H")
}

/// A `grpc-message`: percent-encoded as the protocol asks (every byte outside
/// printable ASCII, and `%`), without the trailing newline of the text answers.
pub fn encode_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.trim_end().bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The gRPC status a client gets for an HTTP status, as gRPC's own mapping does
/// (grpc/doc/http-grpc-status-mapping.md).
pub fn code_for_http(status: u16) -> GrpcCode {
    match status {
        200..=299 => GrpcCode::Ok,
        400 => GrpcCode::Internal,
        401 => GrpcCode::Unauthenticated,
        403 => GrpcCode::PermissionDenied,
        404 => GrpcCode::Unimplemented,
        429 | 502..=504 => GrpcCode::Unavailable,
        _ => GrpcCode::Unknown,
    }
}

/// The status a gRPC call is classed by in metrics (`code_class`) and the SLO
/// rules: `OK` is a 2xx; a code the route counts as a failure a 5xx (504 for
/// `DEADLINE_EXCEEDED`, 503 for `UNAVAILABLE`, else 500); any other code is the
/// caller's problem, a 4xx (429 for `RESOURCE_EXHAUSTED`, else 400). The mapping
/// is in docs/grpc.md.
pub fn class_status(code: GrpcCode, failures: &[GrpcCode]) -> u16 {
    match code {
        GrpcCode::Ok => 200,
        code if failures.contains(&code) => match code {
            GrpcCode::DeadlineExceeded => 504,
            GrpcCode::Unavailable => 503,
            _ => 500,
        },
        GrpcCode::ResourceExhausted => 429,
        _ => 400,
    }
}

impl Reply {
    /// The same answer as a gRPC client reads it: trailers-only, with the reply's
    /// gRPC status and its text as `grpc-message`; the advisory fields
    /// (`retry-after`, `ratelimit-*`, `x-sluice-fallback`) stay.
    pub fn into_grpc(self) -> Reply {
        let message = match &self.grpc_message {
            Some(m) => encode_message(m),
            None => encode_message(&String::from_utf8_lossy(&self.body)),
        };
        let mut headers: Vec<(Cow<'static, str>, String)> = self
            .headers
            .into_iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("content-type"))
            .collect();
        headers.push(("grpc-status".into(), (self.grpc as u32).to_string()));
        if !message.is_empty() {
            headers.push(("grpc-message".into(), message));
        }
        Reply {
            status: 200,
            content_type: Some("application/grpc"),
            headers,
            body: Bytes::new(),
            close: false,
            grpc: self.grpc,
            grpc_message: None,
        }
    }

    /// Whether this is a gRPC trailers-only answer (written as one HEADERS frame
    /// that ends the stream, no body).
    pub fn is_grpc(&self) -> bool {
        self.content_type == Some("application/grpc")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_is_a_number_or_nothing() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_of(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(status_of(&headers), Some(14));
        headers.insert("grpc-status", http::HeaderValue::from_static("unavailable"));
        assert_eq!(status_of(&headers), None);
    }

    #[test]
    fn grpc_content_types() {
        for yes in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"Application/GRPC;charset=utf-8",
        ] {
            assert!(is_grpc(Some(yes)), "{yes:?}");
        }
        for no in [
            &b"application/grpc-web"[..],
            b"application/json",
            b"application/grp",
        ] {
            assert!(!is_grpc(Some(no)), "{no:?}");
        }
        assert!(!is_grpc(None));
    }

    #[test]
    fn timeouts_parse_and_format_both_ways() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            &b""[..],
            b"m",
            b"100",
            b"100x",
            b"123456789m",
            b"-1m",
            b"1.5S",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(format_timeout(Duration::from_millis(95)), "95000000n");
        assert_eq!(format_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(format_timeout(Duration::from_secs(3600)), "3600000m");
        for ms in [1u64, 99, 100, 1_000, 86_400_000, 10_000_000_000] {
            let d = Duration::from_millis(ms);
            let back = parse_timeout(format_timeout(d).as_bytes()).expect("parses");
            assert!(
                back <= d && d - back < d / 1000 + Duration::from_nanos(1),
                "{ms}"
            );
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("rate limit 100%\n"), "rate limit 100%25");
        assert_eq!(encode_message("caf\u{e9}"), "caf%C3%A9");
    }

    #[test]
    fn classes_follow_the_route_failures() {
        let failures = GrpcCode::FAILURES;
        assert_eq!(class_status(GrpcCode::Ok, &failures), 200);
        assert_eq!(class_status(GrpcCode::Unavailable, &failures), 503);
        assert_eq!(class_status(GrpcCode::NotFound, &failures), 400);
        assert_eq!(class_status(GrpcCode::ResourceExhausted, &[]), 429);
        assert_eq!(class_status(GrpcCode::ResourceExhausted, &failures), 500);
    }
}
