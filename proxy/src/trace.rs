//! W3C Trace Context (`traceparent`): reuse the caller's trace, or start one; and
//! the spans the proxy records of a request when tracing is on (`--otlp-endpoint`).
//!
//! Without tracing, a valid incoming `traceparent` is forwarded unchanged (the
//! upstream's parent is the caller's span); when there is none, a new trace is
//! started so every access-log line can be joined with the upstream's logs.
//!
//! With tracing, each request is a span (server side on the inbound listener,
//! client side on the outbound one) whose parent is the caller's span, and each
//! attempt at a backend a child span; the `traceparent` sent upstream names the
//! attempt's span, so the upstream's spans hang under it. Sampling is decided twice:
//! at the head, parent-based (the caller's sampled flag) or by [`Sampler`]'s ratio
//! for a trace started here, and that decision travels upstream in the flags; at the
//! end, a request that was refused, failed or served a fallback is exported as well
//! (tail-friendly: the outcome is known when the span ends). Spans go into a bounded
//! queue ([`SpanQueue`]) that an exporter drains off the request path (`otlp`); a
//! full queue drops the span (counted), never waits.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::shard::CacheLine;

/// The splitmix64 stream's step (odd, so a stream visits every state once in 2^64).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// Streams per generator: each thread draws from the one of its ordinal
/// (`crate::shard`), a power of two.
const STREAMS: usize = 8;

/// Trace and span ids from splitmix64 streams: unique per process and cheap.
/// Seeded from the clock and the pid so restarts do not repeat ids.
///
/// A request draws three ids (two for its trace id, one for its span), so one
/// stream shared by every worker thread was three atomic adds per request on a
/// line all of them write. Each thread draws from one of [`STREAMS`] streams
/// instead, each on a cache line of its own: stream `s` starts `s * 2^61` steps
/// into the same sequence, so no two streams meet before one of them has given
/// 2^61 ids (centuries), and the ids stay unique.
#[derive(Debug)]
pub struct IdGenerator {
    streams: [CacheLine<AtomicU64>; STREAMS],
}

impl Default for IdGenerator {
    fn default() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        IdGenerator::with_seed(nanos ^ (u64::from(std::process::id()) << 32))
    }
}

impl IdGenerator {
    fn with_seed(seed: u64) -> Self {
        IdGenerator {
            streams: std::array::from_fn(|s| {
                let offset = ((s as u64) << 61).wrapping_mul(GAMMA);
                CacheLine(AtomicU64::new(seed.wrapping_add(offset)))
            }),
        }
    }

    /// A fresh id, never 0 (the invalid span id).
    pub fn next(&self) -> u64 {
        let stream = &self.streams[crate::shard::thread_ordinal() & (STREAMS - 1)];
        let mut z = stream
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).max(1)
    }

    /// A fresh sampled `traceparent` value (`00-<32 hex>-<16 hex>-01`): runs per
    /// request when tracing is off (every access-log line gets a trace id), so it is
    /// written from byte arrays, not char by char (that was 800 instructions).
    pub fn new_traceparent(&self) -> String {
        let trace = (u128::from(self.next()) << 64) | u128::from(self.next());
        format_traceparent(trace, self.next(), true)
    }
}

/// The trace id (32 hex digits) of a valid `traceparent`, or `None`.
///
/// Read at fixed offsets (`vv-<32>-<16>-ff`, W3C Trace Context §3.2): this runs for
/// every request, and the split-on-`-` reading it replaced was a tenth of a
/// proxied request's instructions (bench/RESULTS.md, issue 23). A test holds it to
/// that reading.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    // All 32 bytes are ASCII hex digits: the conversion cannot fail.
    valid(traceparent)
        .then(|| std::str::from_utf8(&traceparent[3..35]).ok())
        .flatten()
}

/// [`trace_id`] of a `traceparent` that is a `str` already (the one a request
/// sends upstream, ours or the caller's): the id sliced out of it, without the
/// second UTF-8 check (150 instructions per request).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    valid(traceparent.as_bytes())
        .then(|| traceparent.get(3..35))
        .flatten()
}

/// Whether `traceparent` is a valid W3C `traceparent` (see [`trace_id`]).
fn valid(traceparent: &[u8]) -> bool {
    let tp = traceparent;
    if tp.len() < 55 || tp[2] != b'-' || tp[35] != b'-' || tp[52] != b'-' {
        return false;
    }
    let (version, trace, span, flags) = (&tp[..2], &tp[3..35], &tp[36..52], &tp[53..55]);
    // Without a branch per byte (a vector loop): any byte outside 0-9a-f sets a bit.
    let hex = |s: &[u8]| {
        s.iter().fold(0u8, |bad, &b| {
            bad | u8::from(b.wrapping_sub(b'0') > 9 && b.wrapping_sub(b'a') > 5)
        }) == 0
    };
    hex(version)
        && version != b"ff"
        && hex(trace)
        && trace != [b'0'; 32]
        && hex(span)
        && span != [b'0'; 16]
        && hex(flags)
        // Version 00 has exactly four fields; later versions may append more, each
        // after a `-`.
        && (tp.len() == 55 || (version != b"00" && tp[55] == b'-'))
}

/// Whether a valid `traceparent`'s flags say the caller sampled its trace.
pub fn sampled(traceparent: &[u8]) -> bool {
    // The flags' low bit is the last hex digit's (checked to be 0-9a-f).
    trace_id(traceparent).is_some()
        && matches!(
            traceparent[54],
            b'1' | b'3' | b'5' | b'7' | b'9' | b'b' | b'd' | b'f'
        )
}

/// A caller's trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

/// A valid `traceparent`, parsed (any version's first four fields, as the
/// specification asks of a version this code does not know).
pub fn parse(traceparent: &[u8]) -> Option<Parent> {
    let trace = trace_id(traceparent)?;
    let span = traceparent.get(36..52)?;
    let flags = traceparent.get(53..55)?;
    fn hex(b: &[u8]) -> Option<&str> {
        std::str::from_utf8(b).ok()
    }
    Some(Parent {
        trace_id: u128::from_str_radix(trace, 16).ok()?,
        span_id: u64::from_str_radix(hex(span)?, 16).ok()?,
        sampled: u8::from_str_radix(hex(flags)?, 16).ok()? & 1 == 1,
    })
}

/// `00-<trace>-<span>-<flags>`, in lower-case hex.
pub fn format_traceparent(trace_id: u128, span_id: u64, sampled: bool) -> String {
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    out[3..19].copy_from_slice(&hex16((trace_id >> 64) as u64));
    out[19..35].copy_from_slice(&hex16(trace_id as u64));
    out[35] = b'-';
    out[36..52].copy_from_slice(&hex16(span_id));
    out[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    // Every byte above is ASCII, so this is never the empty default (and is cheaper
    // than `from_utf8_lossy`, which walked the bytes in chunks).
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

/// `n` as 16 lower-case hex digits, eight at a time: each half's nibbles spread
/// into the bytes of a word, then made digits with no branch or table (three of
/// these per traced attempt; the table walk was 300 instructions).
fn hex16(n: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hex8((n >> 32) as u32));
    out[8..].copy_from_slice(&hex8(n as u32));
    out
}

fn hex8(n: u32) -> [u8; 8] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut x = u64::from(n);
    x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // 1 in each byte whose nibble is 10 or more: those become 'a'..'f'.
    let letters = ((x + ONES * 6) >> 4) & ONES;
    (x + ONES * u64::from(b'0') + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
}

/// Makes `traceparent` (one [`format_traceparent`] wrote) name `span_id` as the
/// parent, in place: an attempt's `traceparent` costs no new string.
pub fn set_parent_span(traceparent: &mut String, span_id: u64) {
    // Anything else is not one of ours (never happens): left whole.
    let Some(flags) = traceparent
        .as_bytes()
        .get(52..55)
        .filter(|_| traceparent.len() == 55)
    else {
        return;
    };
    let mut tail = [0u8; 3];
    tail.copy_from_slice(flags);
    let hex = hex16(span_id);
    let (Ok(hex), Ok(tail)) = (std::str::from_utf8(&hex), std::str::from_utf8(&tail)) else {
        return;
    };
    // Cut and appended, not `replace_range`: its general splice cost more than the
    // rest of an attempt's tracing; the capacity stays, so nothing is allocated.
    traceparent.truncate(36);
    traceparent.push_str(hex);
    traceparent.push_str(tail);
}

/// The head sampling decision for a trace started here: the trace id's low 64
/// bits below `ratio` of their range. Consistent for a trace id (every proxy with
/// the same ratio decides the same), as OpenTelemetry's `TraceIdRatioBased`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    ratio: f64,
    threshold: u64,
}

impl Sampler {
    /// `ratio` in [0, 1] (checked where it is parsed; clamped here).
    pub fn new(ratio: f64) -> Sampler {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        // 2^64 as f64 is exact; the product saturates at u64::MAX in the cast.
        let threshold = (ratio * 18_446_744_073_709_551_616.0) as u64;
        Sampler { ratio, threshold }
    }

    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    pub fn sampled(&self, trace_id: u128) -> bool {
        self.ratio >= 1.0 || (trace_id as u64) < self.threshold
    }
}

/// One request's span while it runs (the exchange keeps it when tracing is on).
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub trace_id: u128,
    /// The caller's span, when it sent a `traceparent`.
    pub parent: Option<u64>,
    pub span_id: u64,
    /// The head decision: the caller's flag, or the sampler's for a trace started here.
    pub head_sampled: bool,
    /// The request's start in Unix nanoseconds; the other times are the exchange's
    /// `Instant`s, measured from `start`.
    pub start_unix_nanos: u64,
    pub start: Instant,
    /// One per attempt at a backend, in order (bounded by the exchange's
    /// `MAX_ATTEMPTS`).
    pub attempts: Vec<AttemptTrace>,
}

/// One attempt at a backend: a child span of the request's.
#[derive(Debug, Clone)]
pub struct AttemptTrace {
    pub span_id: u64,
    pub addr: SocketAddr,
    pub start: Instant,
    /// Set when the attempt ended before the request did (else: at its end).
    pub end: Option<Instant>,
    /// `sluice_upstream_requests_total`'s outcome, once known.
    pub outcome: Option<&'static str>,
    /// The response status, 0 if none came.
    pub status: u16,
}

impl RequestTrace {
    /// A span for a request arriving `now` with the caller's `traceparent` (if
    /// valid), ids from `ids`.
    pub fn start(
        traceparent: Option<&[u8]>,
        sampler: Sampler,
        ids: &IdGenerator,
        now: Instant,
    ) -> RequestTrace {
        let parent = traceparent.and_then(parse);
        let trace_id = match parent {
            Some(p) => p.trace_id,
            None => (u128::from(ids.next()) << 64) | u128::from(ids.next()),
        };
        RequestTrace {
            trace_id,
            parent: parent.map(|p| p.span_id),
            span_id: ids.next(),
            head_sampled: match parent {
                Some(p) => p.sampled,
                None => sampler.sampled(trace_id),
            },
            start_unix_nanos: unix_nanos(SystemTime::now()),
            start: now,
            attempts: Vec::new(),
        }
    }

    /// `t` in Unix nanoseconds.
    pub fn unix_nanos_at(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.start).as_nanos();
        self.start_unix_nanos
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// The `traceparent` for the next hop, naming `span_id` as its parent.
    pub fn traceparent(&self, span_id: u64) -> String {
        format_traceparent(self.trace_id, span_id, self.head_sampled)
    }

    /// Opens an attempt's span (closing the previous one at `now` if still open);
    /// `traceparent` (this trace's, as [`Self::traceparent`] made it) is rewritten
    /// to name it, for the backend.
    pub fn begin_attempt(
        &mut self,
        ids: &IdGenerator,
        addr: SocketAddr,
        now: Instant,
        traceparent: &mut String,
    ) {
        if let Some(last) = self.attempts.last_mut() {
            last.end.get_or_insert(now);
        }
        let span_id = ids.next();
        self.attempts.push(AttemptTrace {
            span_id,
            addr,
            start: now,
            end: None,
            outcome: None,
            status: 0,
        });
        set_parent_span(traceparent, span_id);
    }

    /// What the attempt in progress came to (`end`: it is over, another may follow).
    pub fn attempt_outcome(&mut self, outcome: &'static str, status: u16, end: Option<Instant>) {
        if let Some(last) = self.attempts.last_mut() {
            if last.end.is_none() {
                last.outcome = Some(outcome);
                last.status = status;
                last.end = end;
            }
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// OpenTelemetry's span kinds that the proxy records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// A finished span, as the exporter sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanData {
    pub trace_id: u128,
    pub span_id: u64,
    /// 0: a root span.
    pub parent_span_id: u64,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)`: the span's status is ERROR; `None`: unset (OpenTelemetry's
    /// HTTP conventions leave it unset unless the request failed).
    pub error: Option<String>,
}

/// Spans on their way to the exporter: bounded, never waited on. A span that does
/// not fit is dropped (and counted by the caller).
#[derive(Debug, Clone)]
pub struct SpanQueue {
    tx: tokio::sync::mpsc::Sender<SpanData>,
}

/// The most spans waiting for the exporter; beyond it spans are dropped.
pub const SPAN_QUEUE: usize = 4096;

impl SpanQueue {
    /// A queue of `capacity` spans and its receiving end, for the exporter.
    pub fn new(capacity: usize) -> (SpanQueue, tokio::sync::mpsc::Receiver<SpanData>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (SpanQueue { tx }, rx)
    }

    /// Whether `span` was queued (false: full, or the exporter is gone).
    pub fn push(&self, span: SpanData) -> bool {
        self.tx.try_send(span).is_ok()
    }
}

/// What the proxy's observer needs to record spans: the sampler and the queue.
#[derive(Debug, Clone)]
pub struct Tracer {
    pub sampler: Sampler,
    pub queue: SpanQueue,
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

    /// The reading `trace_id` replaced: split on `-`, four fields (more after
    /// version 00), each checked.
    fn trace_id_by_fields(traceparent: &[u8]) -> Option<&str> {
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
            && (version != "00" || parts.next().is_none());
        valid.then_some(trace)
    }

    proptest::proptest! {
        #[test]
        fn trace_id_reads_like_the_field_by_field_reading(
            version in "[0-9a-fA-F-]{2}|ff|00|01",
            trace in "[0-9a-f]{32}|0{32}|[0-9a-fA-F-]{30,34}",
            span in "[0-9a-f]{16}|0{16}|[0-9a-fA-F-]{15,17}",
            flags in "[0-9a-f]{2}|[0-9a-fA-F-]{1,3}",
            tail in "|-|-[a-z0-9-]{0,8}|[a-z0-9]{1,3}|\\PC{0,4}",
            seps in proptest::collection::vec(proptest::prop_oneof![proptest::strategy::Just('-'), proptest::strategy::Just('_')], 3),
        ) {
            let tp = format!("{version}{}{trace}{}{span}{}{flags}{tail}", seps[0], seps[1], seps[2]);
            proptest::prop_assert_eq!(trace_id(tp.as_bytes()), trace_id_by_fields(tp.as_bytes()), "{:?}", tp);
            proptest::prop_assert_eq!(trace_id_of(&tp), trace_id(tp.as_bytes()), "{:?}", tp);
            let bytes = tp.as_bytes();
            for cut in [0, 1, 2, 35, 52, 54, 55, 56] {
                let b = &bytes[..cut.min(bytes.len())];
                proptest::prop_assert_eq!(trace_id(b), trace_id_by_fields(b));
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn hex16_spells_like_format(n in proptest::num::u64::ANY) {
            proptest::prop_assert_eq!(hex16(n).to_vec(), format!("{n:016x}").into_bytes());
        }
    }

    #[test]
    fn hex16_spells_the_edges() {
        for n in [
            0,
            9,
            10,
            15,
            16,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0xa0a0_a0a0_9f9f_9f9f,
        ] {
            assert_eq!(hex16(n).to_vec(), format!("{n:016x}").into_bytes());
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

    /// Stream `s` starts `s * 2^61` steps into the one sequence (so they cannot
    /// meet before 2^61 ids), and threads drawing at once get distinct ids.
    #[test]
    fn id_streams_start_far_apart_on_one_sequence() {
        let seed = 0x1234_5678_9abc_def0;
        let ids = IdGenerator::with_seed(seed);
        // GAMMA's inverse mod 2^64 (Newton's iteration doubles the good bits).
        let mut inverse: u64 = 1;
        for _ in 0..6 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(GAMMA.wrapping_mul(inverse)));
        }
        assert_eq!(GAMMA.wrapping_mul(inverse), 1);
        for (s, stream) in ids.streams.iter().enumerate() {
            let state = stream.load(Ordering::Relaxed);
            assert_eq!(
                state.wrapping_sub(seed).wrapping_mul(inverse),
                (s as u64) << 61,
                "stream {s}"
            );
        }
        let drawn: Vec<u64> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..STREAMS)
                .map(|_| scope.spawn(|| (0..1000).map(|_| ids.next()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<_> = drawn.iter().collect();
        assert_eq!(distinct.len(), drawn.len());
    }

    #[test]
    fn generated_traceparents_spell_the_ids_in_lower_case_hex() {
        let ids = IdGenerator::with_seed(7);
        let twin = IdGenerator::with_seed(7);
        for _ in 0..100 {
            let (hi, lo, span) = (twin.next(), twin.next(), twin.next());
            let tp = ids.new_traceparent();
            assert_eq!(tp, format!("00-{hi:016x}{lo:016x}-{span:016x}-01"));
            assert_eq!(tp.len(), 55);
        }
    }

    #[test]
    fn parses_the_callers_context_and_formats_ours() {
        let p = parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!sampled(unsampled));
        // A later version's extra fields are ignored, its first four read.
        let later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-extra";
        assert!(sampled(later));
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(
            format_traceparent(p.trace_id, 0x1234, false),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000001234-00"
        );
        let mut ours = format_traceparent(p.trace_id, 7, true);
        assert_eq!(parse(ours.as_bytes()).map(|q| q.span_id), Some(7));
        set_parent_span(&mut ours, u64::MAX - 1);
        assert_eq!(ours, format_traceparent(p.trace_id, u64::MAX - 1, true));
        let mut unsampled = format_traceparent(p.trace_id, 7, false);
        set_parent_span(&mut unsampled, 0x1234);
        assert_eq!(unsampled, format_traceparent(p.trace_id, 0x1234, false));
        // Not one of ours: left whole.
        for other in [
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            let mut kept = other.to_owned();
            set_parent_span(&mut kept, 7);
            assert_eq!(kept, other);
        }
    }

    #[test]
    fn the_sampler_takes_its_ratio_of_trace_ids_and_decides_alike_everywhere() {
        assert!(!Sampler::new(0.0).sampled(0));
        assert!(Sampler::new(1.0).sampled(u128::MAX));
        assert!(!Sampler::new(f64::NAN).sampled(0));
        let ids = IdGenerator::default();
        let sampler = Sampler::new(0.25);
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| sampler.sampled(u128::from(ids.next())))
            .count();
        // 25% of 20,000 with a binomial sd of ~61: 6 sd either way.
        assert!((4_630..=5_370).contains(&hits), "{hits}");
        let id = 0xdead_beef_u128 << 64 | 3;
        assert_eq!(sampler.sampled(id), Sampler::new(0.25).sampled(id));
    }

    #[test]
    fn a_request_continues_its_callers_trace_and_names_each_attempt_upstream() {
        let ids = IdGenerator::default();
        let now = Instant::now();
        let caller = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut t = RequestTrace::start(Some(caller), Sampler::new(0.0), &ids, now);
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.parent, Some(0x00f067aa0ba902b7));
        assert!(t.head_sampled, "parent-based: the caller sampled it");
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut tp = t.traceparent(t.span_id);
        t.begin_attempt(&ids, addr, now, &mut tp);
        let first = tp.clone();
        t.attempt_outcome("connect_error", 0, Some(now));
        t.begin_attempt(&ids, addr, now, &mut tp);
        let second = tp;
        assert_eq!(t.attempts.len(), 2);
        let spans: Vec<u64> = [&first, &second]
            .iter()
            .map(|tp| parse(tp.as_bytes()).unwrap().span_id)
            .collect();
        assert_eq!(spans, [t.attempts[0].span_id, t.attempts[1].span_id]);
        assert_ne!(spans[0], spans[1]);
        assert!(
            first.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && first.ends_with("-01")
        );
        // A trace started here with ratio 0 is not head-sampled, and says so.
        let fresh = RequestTrace::start(None, Sampler::new(0.0), &ids, now);
        assert_eq!(fresh.parent, None);
        assert!(fresh.traceparent(1).ends_with("-00"));
        assert!(
            t.unix_nanos_at(now + std::time::Duration::from_millis(2))
                >= t.start_unix_nanos + 2_000_000
        );
    }

    #[test]
    fn a_full_queue_drops_spans_instead_of_waiting() {
        let (queue, mut rx) = SpanQueue::new(2);
        let span = SpanData {
            trace_id: 1,
            span_id: 1,
            parent_span_id: 0,
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_nanos: 0,
            end_unix_nanos: 1,
            attributes: Vec::new(),
            error: None,
        };
        assert!(queue.push(span.clone()));
        assert!(queue.push(span.clone()));
        assert!(!queue.push(span.clone()));
        assert_eq!(rx.try_recv().ok(), Some(span.clone()));
        assert!(queue.push(span));
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
