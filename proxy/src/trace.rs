//! W3C Trace Context (`traceparent`): reuse the caller's trace, or start one.
//!
//! The proxy records no spans of its own, so a valid incoming `traceparent` is
//! forwarded unchanged (the upstream's parent is the caller's span); when there is
//! none, a new trace is started so every access-log line can be joined with the
//! upstream's logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Trace and span ids from a splitmix64 stream: unique per process and cheap (one
/// atomic add). Seeded from the clock and the pid so restarts do not repeat ids.
pub struct IdGenerator {
    state: AtomicU64,
}

impl Default for IdGenerator {
    fn default() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        IdGenerator {
            state: AtomicU64::new(nanos ^ (u64::from(std::process::id()) << 32)),
        }
    }
}

impl IdGenerator {
    fn next(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A fresh sampled `traceparent` value (`00-<32 hex>-<16 hex>-01`), written
    /// digit by digit into one exact-size allocation (this runs per request; the
    /// `format!` machinery cost more than the rest of the function).
    pub fn new_traceparent(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        let word = |w: u64, out: &mut String| {
            for shift in (0..16).rev() {
                out.push(char::from(HEX[(w >> (shift * 4)) as usize & 0xf]));
            }
        };
        word(self.next(), &mut out);
        word(self.next(), &mut out);
        out.push('-');
        word(self.next(), &mut out);
        out.push_str("-01");
        out
    }
}

/// The trace id (32 hex digits) of a valid `traceparent`, or `None`.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(traceparent).ok()?;
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        // Version 00 has exactly four fields; later versions may append more.
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

/// Whether a valid `traceparent` has the sampled flag (bit 0 of its trace flags):
/// the caller records its trace, so something that points to it (an exemplar)
/// leads somewhere.
pub fn sampled(traceparent: &[u8]) -> bool {
    // A valid traceparent has its flags at bytes 53..55, whatever the version.
    trace_id(traceparent).is_some()
        && traceparent
            .get(53..55)
            .and_then(|flags| std::str::from_utf8(flags).ok())
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 0x01 == 0x01)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_and_rejects_malformed_traceparents() {
        let valid = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(valid), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"garbage",
        ] {
            assert_eq!(trace_id(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn sampled_reads_the_sampled_flag_of_valid_traceparents_only() {
        let tp =
            |flags: &str| format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
        assert!(sampled(tp("01").as_bytes()));
        assert!(sampled(tp("03").as_bytes()), "other flags set too");
        assert!(!sampled(tp("00").as_bytes()));
        assert!(!sampled(tp("02").as_bytes()));
        assert!(sampled(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later-fields"
        ));
        assert!(!sampled(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!sampled(b"garbage"));
    }

    #[test]
    fn generated_traceparents_spell_the_ids_in_lower_case_hex() {
        let ids = IdGenerator {
            state: AtomicU64::new(7),
        };
        let twin = IdGenerator {
            state: AtomicU64::new(7),
        };
        for _ in 0..100 {
            let (hi, lo, span) = (twin.next(), twin.next(), twin.next());
            let tp = ids.new_traceparent();
            assert_eq!(tp, format!("00-{hi:016x}{lo:016x}-{span:016x}-01"));
            assert_eq!(tp.len(), 55);
        }
    }

    #[test]
    fn generated_traceparents_are_valid_and_distinct() {
        let ids = IdGenerator::default();
        let a = ids.new_traceparent();
        let b = ids.new_traceparent();
        assert!(trace_id(a.as_bytes()).is_some(), "{a}");
        assert_ne!(trace_id(a.as_bytes()), trace_id(b.as_bytes()));
    }
}
