//! RFC 3339 UTC timestamps with milliseconds, the one time format of every Sluice
//! log line (the access log's and the operational log's `ts`), formatted without a
//! date library.

use std::time::SystemTime;

/// A point in time, shown as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
#[derive(Clone, Copy)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }

    /// Appends `YYYY-MM-DDTHH:MM:SS.mmmZ` (years 0..=9999).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let since = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days as i64);
        let mut put = |n: u64, width: u32, sep: u8| {
            for i in (0..width).rev() {
                out.push(b'0' + (n / 10u64.pow(i) % 10) as u8);
            }
            out.push(sep);
        };
        put(year.clamp(0, 9999) as u64, 4, b'-');
        put(u64::from(month), 2, b'-');
        put(u64::from(day), 2, b'T');
        put(rem / 3600, 2, b':');
        put(rem % 3600 / 60, 2, b':');
        put(rem % 60, 2, b'.');
        put(u64::from(since.subsec_millis()), 3, b'Z');
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = Vec::with_capacity(24);
        self.encode(&mut out);
        f.write_str(std::str::from_utf8(&out).map_err(|_| std::fmt::Error)?)
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
