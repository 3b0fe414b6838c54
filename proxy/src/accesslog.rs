//! One JSON line per request on stdout. (Operational logs go to stderr through
//! `tracing`, sluice-logging; the two share the `ts` format, [`Timestamp`].)
//!
//! Lines are encoded by hand straight into a shared buffer (no intermediate
//! `String`, no serializer: serde_json's generic path was ~4% of a proxied request's
//! CPU, bench/RESULTS.md). The request path only appends: a background task writes
//! the buffer out every [`FLUSH_EVERY`] (Envoy's file access log has a flush thread
//! too), so a slow disk or pipe never stalls a worker in the middle of serving
//! requests (each 64 KiB write there added to the p99). Only when the writer falls
//! behind by [`MAX_BUFFERED`] does a request write (back-pressure, nothing is lost).
//! Lines never interleave; at most `FLUSH_EVERY` of lines is lost if the process is
//! killed outright (a drain flushes).

use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// RFC 3339 UTC time with milliseconds, as in the operational log.
pub use sluice_logging::Timestamp;

/// What the access log says about one request.
pub struct AccessRecord<'a> {
    pub ts: Timestamp,
    pub trace_id: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub policy: Option<&'a str>,
    pub route: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub status: u16,
    /// A gRPC call's `grpc-status` (the field is left out for other requests).
    pub grpc_status: Option<u32>,
    /// Written in milliseconds with microsecond precision.
    pub duration: std::time::Duration,
    pub decision: &'a str,
    /// What shadow mode would have done (`rate_limited`, ...), when it would have acted.
    pub shadow_decision: Option<&'a str>,
    /// The cause a fallback was served for, when one was.
    pub fallback: Option<&'a str>,
    pub attempts: u32,
    pub policy_version: Option<&'a str>,
    pub direction: &'a str,
    /// The caller's workload identity (SPIFFE ID) when it came over mTLS; `null`
    /// for plaintext.
    pub peer: Option<&'a str>,
}

/// Buffered bytes at which a request writes them itself (the flush task is behind).
pub const MAX_BUFFERED: usize = 2 * 1024 * 1024;
/// Longest a line waits in the buffer (the flush task's period): at 70k requests/s
/// and ~350 bytes a line, about 0.5 MB per flush.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// The access log of one proxy (off with `--no-access-log`).
pub struct AccessLog {
    enabled: bool,
    buffer: Mutex<Vec<u8>>,
    /// The flush task's side of the double buffer: swapped with `buffer` under its
    /// lock, written out after the lock is released.
    spare: Mutex<Vec<u8>>,
}

impl AccessLog {
    pub fn new(enabled: bool) -> Self {
        AccessLog {
            enabled,
            buffer: Mutex::new(Vec::with_capacity(64 * 1024)),
            spare: Mutex::new(Vec::with_capacity(64 * 1024)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Appends `record` as one line. Errors (a closed stdout) are dropped: the access
    /// log must never fail a request.
    pub fn write(&self, record: &AccessRecord<'_>) {
        self.append(|out| record.encode(out));
    }

    /// Appends the line of a closed opaque TCP connection.
    pub fn write_tcp(&self, record: &TcpRecord<'_>) {
        self.append(|out| record.encode(out));
    }

    fn append(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        if !self.enabled {
            return;
        }
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        encode(&mut buffer);
        buffer.push(b'\n');
        if buffer.len() >= MAX_BUFFERED {
            let _ = std::io::stdout().lock().write_all(&buffer);
            buffer.clear();
        }
    }

    /// Writes out whatever is buffered, holding the request path's lock only for
    /// the swap.
    pub fn flush(&self) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
            if buffer.is_empty() {
                return;
            }
            std::mem::swap(&mut *buffer, &mut *spare);
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&spare);
        let _ = out.flush();
        spare.clear();
    }
}

impl AccessRecord<'_> {
    /// Appends the record as one JSON object (field order as declared).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        self.ts.encode(out);
        out.push(b'"');
        let text = |out: &mut Vec<u8>, name: &str, value: Option<&str>| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            match value {
                Some(v) => json_string(out, v),
                None => out.extend_from_slice(b"null"),
            }
        };
        let mut digits = itoa::Buffer::new();
        text(out, "trace_id", Some(self.trace_id));
        text(out, "method", Some(self.method));
        text(out, "host", Some(self.host));
        text(out, "path", Some(self.path));
        text(out, "policy", self.policy);
        text(out, "route", self.route);
        text(out, "backend", self.backend);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(digits.format(self.status).as_bytes());
        if let Some(code) = self.grpc_status {
            out.extend_from_slice(b",\"grpc_status\":");
            out.extend_from_slice(digits.format(code).as_bytes());
        }
        let micros = self.duration.as_micros();
        out.extend_from_slice(b",\"duration_ms\":");
        out.extend_from_slice(digits.format(micros / 1000).as_bytes());
        out.push(b'.');
        let frac = (micros % 1000) as u16;
        out.extend_from_slice(&[
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        text(out, "decision", Some(self.decision));
        text(out, "shadow_decision", self.shadow_decision);
        text(out, "fallback", self.fallback);
        out.extend_from_slice(b",\"attempts\":");
        out.extend_from_slice(digits.format(self.attempts).as_bytes());
        text(out, "policy_version", self.policy_version);
        text(out, "direction", Some(self.direction));
        text(out, "peer", self.peer);
        out.push(b'}');
    }
}

/// What the access log says about one opaque TCP connection, when it closes.
/// `"protocol":"tcp"` tells these lines from request lines (which have no such
/// field); byte counts are as the client sees them, like `sluice_tcp_bytes_total`.
pub struct TcpRecord<'a> {
    pub ts: Timestamp,
    pub direction: &'a str,
    pub policy: Option<&'a str>,
    /// The destination's port (never its address: the log stays free of IPs it
    /// does not need, and a port names the service).
    pub port: u16,
    /// How it ended: `closed` (both sides finished), `idle_timeout`, `error`; or
    /// why it was closed unanswered, as `sluice_tcp_connections_total`'s outcome
    /// (`refused_limit`, `refused_rate`, `connect_error`, `no_destination`,
    /// `not_ready`).
    pub end: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: std::time::Duration,
    pub policy_version: Option<&'a str>,
}

impl TcpRecord<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b"{\"ts\":\"");
        self.ts.encode(out);
        out.extend_from_slice(b"\",\"protocol\":\"tcp\",\"direction\":");
        json_string(out, self.direction);
        out.extend_from_slice(b",\"policy\":");
        match self.policy {
            Some(p) => json_string(out, p),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"port\":");
        out.extend_from_slice(digits.format(self.port).as_bytes());
        out.extend_from_slice(b",\"end\":");
        json_string(out, self.end);
        out.extend_from_slice(b",\"bytes_received\":");
        out.extend_from_slice(digits.format(self.bytes_received).as_bytes());
        out.extend_from_slice(b",\"bytes_sent\":");
        out.extend_from_slice(digits.format(self.bytes_sent).as_bytes());
        out.extend_from_slice(b",\"duration_ms\":");
        out.extend_from_slice(digits.format(self.duration.as_millis()).as_bytes());
        out.extend_from_slice(b",\"policy_version\":");
        match self.policy_version {
            Some(v) => json_string(out, v),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }
}

/// A JSON string literal: copied as is when nothing needs escaping (the usual case
/// for methods, hosts, paths and names), else escaped by serde_json.
fn json_string(out: &mut Vec<u8>, value: &str) {
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn records_are_valid_json_with_every_field() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        for path in ["/plain", "/quote\"back\\slash", "/ctl\u{1}\n\t", "/ünï€😀"] {
            let record = AccessRecord {
                ts: Timestamp(t),
                trace_id: "0af7651916cd43dd8448eb211c80319c",
                method: "GET",
                host: "shop",
                path,
                policy: Some("shop"),
                route: None,
                backend: Some("10.0.0.1:80"),
                status: 200,
                grpc_status: None,
                duration: Duration::from_micros(12_345_678),
                decision: "allowed",
                shadow_decision: None,
                fallback: Some("rate-limited"),
                attempts: 2,
                policy_version: Some("abc"),
                direction: "outbound",
                peer: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
            };
            let mut out = Vec::new();
            record.encode(&mut out);
            let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(v["ts"], "2026-11-18T11:06:40.123Z");
            assert_eq!(v["path"], path);
            assert_eq!(v["route"], serde_json::Value::Null);
            assert_eq!(v["status"], 200);
            assert_eq!(v["duration_ms"].as_f64(), Some(12_345.678));
            assert_eq!(v["attempts"], 2);
            assert_eq!(v["fallback"], "rate-limited");
            assert_eq!(v["direction"], "outbound");
            assert_eq!(v["peer"], "spiffe://cluster.local/ns/shop/sa/frontend");
            assert_eq!(v.as_object().map(|o| o.len()), Some(17));
        }
        let mut out = Vec::new();
        let short = AccessRecord {
            duration: Duration::from_micros(7),
            ..sample()
        };
        short.encode(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["duration_ms"].as_f64(), Some(0.007));
    }

    #[test]
    fn tcp_records_are_valid_json() {
        let record = TcpRecord {
            ts: Timestamp(SystemTime::UNIX_EPOCH),
            direction: "outbound",
            policy: Some("shop/db"),
            port: 5432,
            end: "closed",
            bytes_received: 12,
            bytes_sent: 3400,
            duration: Duration::from_millis(1500),
            policy_version: None,
        };
        let mut out = Vec::new();
        record.encode(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["protocol"], "tcp");
        assert_eq!(v["policy"], "shop/db");
        assert_eq!(v["port"], 5432);
        assert_eq!(v["bytes_sent"], 3400);
        assert_eq!(v["duration_ms"], 1500);
        assert_eq!(v["policy_version"], serde_json::Value::Null);
    }

    fn sample() -> AccessRecord<'static> {
        AccessRecord {
            ts: Timestamp(SystemTime::UNIX_EPOCH),
            trace_id: "",
            method: "GET",
            host: "",
            path: "/",
            policy: None,
            route: None,
            backend: None,
            status: 0,
            grpc_status: None,
            duration: Duration::ZERO,
            decision: "allowed",
            shadow_decision: None,
            fallback: None,
            attempts: 0,
            policy_version: None,
            direction: "outbound",
            peer: None,
        }
    }
}
