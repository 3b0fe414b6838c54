//! One JSON line per request on stdout, and JSON operational logs on stderr.
//!
//! Lines are serialized straight into a shared buffer (no intermediate `String` per
//! field) and written to stdout when it holds [`FLUSH_BYTES`], or at the latest every
//! [`FLUSH_EVERY`] (as Envoy's file access log does, with its 1 s default): one
//! `write` per many requests instead of one per request. Lines never interleave; at
//! most `FLUSH_EVERY` of lines is lost if the process is killed outright (a drain
//! flushes).

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;

/// What the access log says about one request.
#[derive(Serialize)]
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
    pub duration_ms: f64,
    pub decision: &'a str,
    /// What shadow mode would have done (`rate_limited`, ...), when it would have acted.
    pub shadow_decision: Option<&'a str>,
    /// The cause a fallback was served for, when one was.
    pub fallback: Option<&'a str>,
    pub attempts: u32,
    pub policy_version: Option<&'a str>,
    pub direction: &'a str,
}

/// Buffered bytes that trigger a write.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Longest a line waits in the buffer (the flush task's period).
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// The access log of one proxy (off with `--no-access-log`).
pub struct AccessLog {
    enabled: bool,
    buffer: Mutex<Vec<u8>>,
}

impl AccessLog {
    pub fn new(enabled: bool) -> Self {
        AccessLog {
            enabled,
            buffer: Mutex::new(Vec::with_capacity(FLUSH_BYTES + 1024)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Appends `record` as one line. Errors (a closed stdout) are dropped: the access
    /// log must never fail a request.
    pub fn write(&self, record: &AccessRecord<'_>) {
        if !self.enabled {
            return;
        }
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        let mark = buffer.len();
        if serde_json::to_writer(&mut *buffer, record).is_err() {
            buffer.truncate(mark);
            return;
        }
        buffer.push(b'\n');
        if buffer.len() >= FLUSH_BYTES {
            let _ = std::io::stdout().lock().write_all(&buffer);
            buffer.clear();
        }
    }

    /// Writes out whatever is buffered.
    pub fn flush(&self) {
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        if !buffer.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&buffer);
            let _ = out.flush();
            buffer.clear();
        }
    }
}

/// An operational event on stderr: `{"ts":..,"level":..,"msg":..,...fields}`.
pub fn event(level: &str, msg: &str, fields: serde_json::Value) {
    let mut object = serde_json::Map::new();
    object.insert(
        "ts".into(),
        serde_json::Value::String(Timestamp::now().to_string()),
    );
    object.insert("level".into(), level.into());
    object.insert("msg".into(), msg.into());
    if let serde_json::Value::Object(extra) = fields {
        object.extend(extra);
    }
    let mut line = serde_json::Value::Object(object).to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// RFC 3339 UTC time with milliseconds, formatted without a date library.
#[derive(Clone, Copy)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days as i64);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            since.subsec_millis()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(Timestamp(t).to_string(), "2026-11-18T11:06:40.123Z");
        assert_eq!(
            Timestamp(SystemTime::UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(Timestamp(leap).to_string(), "2000-02-29T00:00:00.000Z");
    }
}
