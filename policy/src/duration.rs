//! Durations as policy authors write them: an unsigned number with a unit
//! (`250ms`, `30s`, `5m`, `1h`, `1.5s`).
//!
//! A bare number is refused on purpose: `timeout: 30` is ambiguous (seconds? ms?)
//! and the cost of guessing wrong is an outage.

use std::time::Duration;

/// Parses `250ms`, `30s`, `1.5s`, `5m`, `2h`, `100us`. Returns `None` for anything else.
pub fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let nanos_per_unit: f64 = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        _ => return None,
    };
    if let Ok(whole) = number.parse::<u64>() {
        // Exact integer arithmetic when possible, so `30s` is exactly 30 s.
        let nanos = u128::from(whole) * nanos_per_unit as u128;
        return u64::try_from(nanos).ok().map(Duration::from_nanos);
    }
    let value: f64 = number.parse().ok()?;
    let nanos = (value * nanos_per_unit).round();
    if !nanos.is_finite() || nanos > u64::MAX as f64 {
        return None;
    }
    Some(Duration::from_nanos(nanos as u64))
}

/// Formats a duration in the largest unit that represents it exactly, so that
/// `format(parse(s))` is canonical and `parse(format(d)) == d`.
pub fn format(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    if nanos == 0 {
        return "0s".to_owned();
    }
    for (size, unit) in UNITS {
        if nanos.is_multiple_of(size) {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("100us"), Some(Duration::from_micros(100)));
    }

    #[test]
    fn refuses_numbers_without_unit_and_garbage() {
        for bad in [
            "30", "", "s", "-1s", "1.s", ".5s", "1 d", "1d", "1e3ms", "ms",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_in_largest_exact_unit() {
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format(Duration::from_secs(120)), "2m");
        assert_eq!(format(Duration::ZERO), "0s");
    }

    proptest::proptest! {
        #[test]
        fn format_then_parse_is_identity(nanos in 0u64..u64::MAX / 2) {
            let d = Duration::from_nanos(nanos);
            proptest::prop_assert_eq!(parse(&format(d)), Some(d));
        }
    }
}
