//! One JSON line per request on stdout. (Operational logs go to stderr through
//! `tracing`, sluice-logging; the two share the `ts` format, [`Timestamp`].)
//!
//! Lines are encoded by hand straight into a buffer (no intermediate `String`, no
//! serializer: serde_json's generic path was ~4% of a proxied request's CPU,
//! bench/RESULTS.md). The request path only appends, and never makes a system
//! call: a background task writes the buffers out every [`FLUSH_EVERY`] (Envoy's
//! file access log has a flush thread too), so a slow disk or pipe never stalls a
//! worker in the middle of serving requests.
//!
//! What a line costs (issue 23, bench/RESULTS.md "Access log cost"):
//! - no allocation in steady state: the buffers keep their capacity from one flush
//!   to the next (the flush swaps a full buffer for an empty one);
//! - the timestamp's `YYYY-MM-DDTHH:MM:SS.` is formatted once a second and reused
//!   (only the milliseconds are formatted per line);
//! - strings are copied as they are unless a byte needs escaping (checked eight
//!   bytes at a time);
//! - one buffer per worker thread (a shard, chosen by the thread's ordinal,
//!   `crate::shard`, on a cache line of its own), so workers
//!   never wait on each other; the flush task takes each shard's lock only for a
//!   swap.
//!
//! Invariants: lines never interleave (a line is appended whole under its shard's
//! lock); a thread's lines keep their order (lines of different worker threads
//! written in the same flush period may not be in `ts` order); a shard holds at
//! most [`MAX_BUFFERED`] bytes (plus one line): when the flush task falls that far
//! behind (stdout a full pipe), further lines are dropped and counted in
//! `sluice_access_log_dropped_lines_total` instead of blocking a request or growing
//! without bound. At most `FLUSH_EVERY` of lines is lost if the process is killed
//! outright (a drain flushes).

use std::io::Write;
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;

use crate::shard::{thread_ordinal, CacheLine};

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
    pub duration: Duration,
    /// The fixed vocabulary's fields (decision, shadow decision, fallback cause,
    /// direction) are `'static`: identifiers that need no JSON escaping, written
    /// without the check.
    pub decision: &'static str,
    /// What shadow mode would have done (`rate_limited`, ...), when it would have acted.
    pub shadow_decision: Option<&'static str>,
    /// The cause a fallback was served for, when one was.
    pub fallback: Option<&'static str>,
    pub attempts: u32,
    pub policy_version: Option<&'a str>,
    pub direction: &'static str,
    /// The caller's workload identity (SPIFFE ID) when it came over mTLS; `null`
    /// for plaintext.
    pub peer: Option<&'a str>,
}

/// Bytes a shard may hold; lines beyond it are dropped (and counted) until the
/// flush task catches up. At 70k requests/s on one thread and ~350 bytes a line,
/// 2 MiB is ~80 ms of lines: eight flush periods.
pub const MAX_BUFFERED: usize = 2 * 1024 * 1024;
/// Longest a line waits in the buffer (the flush task's period): at 70k requests/s
/// and ~350 bytes a line, about 0.25 MB per flush. The buffers keep the capacity a
/// period needs (two of them: a shard's and the flush's spare), so the period is
/// also what the log adds to peak memory: at 20 ms the proxy's peak RSS was
/// 21.0 MB at 64k requests/s, over issue 23's 20 MB (bench/RESULTS.md); 100 writes
/// a second instead of 50 cost nothing measurable.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// A shard's first capacity; it grows to what a flush period brings and keeps it.
const SHARD_CAPACITY: usize = 64 * 1024;
/// The access log of one proxy (off with `--no-access-log`).
pub struct AccessLog {
    enabled: bool,
    /// Each on a cache line of its own: neighbouring workers' appends must not
    /// bounce one line between their cores.
    shards: Box<[CacheLine<Mutex<Shard>>]>,
    /// The flush task's side of the double buffer: swapped with a shard's buffer
    /// under that shard's lock, written out after the lock is released.
    spare: Mutex<Vec<u8>>,
    /// Lines dropped because their shard was full.
    dropped: IntCounter,
}

/// One worker thread's lines, and the second its clock last formatted.
struct Shard {
    lines: Vec<u8>,
    clock: SecondStamp,
}

impl AccessLog {
    /// A log with a shard per core ([`crate::shard::per_core`]). `dropped` counts
    /// the lines a full shard refused.
    pub fn new(enabled: bool, dropped: IntCounter) -> Self {
        Self::with_shards(enabled, crate::shard::per_core(), dropped)
    }

    /// A log with `shards` buffers (at least one).
    pub fn with_shards(enabled: bool, shards: usize, dropped: IntCounter) -> Self {
        let shard = || {
            CacheLine(Mutex::new(Shard {
                lines: Vec::with_capacity(if enabled { SHARD_CAPACITY } else { 0 }),
                clock: SecondStamp::default(),
            }))
        };
        AccessLog {
            enabled,
            shards: (0..shards.max(1)).map(|_| shard()).collect(),
            spare: Mutex::new(Vec::with_capacity(if enabled { SHARD_CAPACITY } else { 0 })),
            dropped,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Appends `record` as one line. Never fails or blocks a request: errors (a
    /// closed stdout) are the flush task's and are dropped there.
    pub fn write(&self, record: &AccessRecord<'_>) {
        self.append(|out, clock| record.encode_with(out, clock));
    }

    /// Appends the line of a closed opaque TCP connection.
    pub fn write_tcp(&self, record: &TcpRecord<'_>) {
        self.append(|out, clock| record.encode_with(out, clock));
    }

    fn append(&self, encode: impl FnOnce(&mut Vec<u8>, &mut SecondStamp)) {
        if !self.enabled {
            return;
        }
        let mut shard = self.shard();
        if shard.lines.len() >= MAX_BUFFERED {
            drop(shard);
            self.dropped.inc();
            return;
        }
        let Shard { lines, clock } = &mut *shard;
        encode(lines, clock);
        lines.push(b'\n');
    }

    /// The calling thread's shard (a worker thread keeps its shard for its life,
    /// and its lines their order); when another thread holds it (more threads than
    /// shards, or the flush task's swap), the next free one rather than waiting:
    /// that line may come out before lines the thread wrote earlier (its timestamp
    /// still tells).
    fn shard(&self) -> MutexGuard<'_, Shard> {
        let n = self.shards.len();
        let home = if n == 1 { 0 } else { thread_ordinal() % n };
        for shard in self.shards.iter().cycle().skip(home).take(n) {
            match shard.try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.shards[home]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes out whatever is buffered, holding each shard's lock only for a swap.
    pub fn flush(&self) {
        self.flush_to(&mut std::io::stdout().lock());
    }

    /// [`flush`](Self::flush) into `out` (benchmarks and tests). One write per
    /// shard that has lines.
    pub fn flush_to(&self, out: &mut impl Write) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        for shard in self.shards.iter() {
            {
                let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                if shard.lines.is_empty() {
                    continue;
                }
                std::mem::swap(&mut shard.lines, &mut *spare);
            }
            let _ = out.write_all(&spare);
            spare.clear();
        }
        let _ = out.flush();
    }
}

/// Formats timestamps, reusing `YYYY-MM-DDTHH:MM:SS.` while the second is the
/// same: a line then costs three digits and a `Z`, not a calendar computation.
struct SecondStamp {
    /// Seconds since the epoch the prefix is for (`u64::MAX`: none yet).
    second: u64,
    prefix: [u8; PREFIX],
}

/// `YYYY-MM-DDTHH:MM:SS.`
const PREFIX: usize = 20;

impl Default for SecondStamp {
    fn default() -> Self {
        SecondStamp {
            second: u64::MAX,
            prefix: [0; PREFIX],
        }
    }
}

impl SecondStamp {
    /// Appends `ts` exactly as [`Timestamp::encode`] does.
    fn encode(&mut self, ts: Timestamp, out: &mut Vec<u8>) {
        let since =
            ts.0.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
        if since.as_secs() != self.second {
            let start = out.len();
            ts.encode(out);
            if let Some(prefix) = out.get(start..start + PREFIX) {
                self.prefix.copy_from_slice(prefix);
                self.second = since.as_secs();
            }
            return;
        }
        let ms = since.subsec_millis();
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&[
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// `null`, or the string.
fn json_opt(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(v) => json_string(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

impl AccessRecord<'_> {
    /// Appends the record as one JSON object (field order as declared).
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_with(out, &mut SecondStamp::default());
    }

    fn encode_with(&self, out: &mut Vec<u8>, clock: &mut SecondStamp) {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b"{\"ts\":\"");
        clock.encode(self.ts, out);
        out.extend_from_slice(b"\",\"trace_id\":");
        json_string(out, self.trace_id);
        out.extend_from_slice(b",\"method\":");
        json_string(out, self.method);
        out.extend_from_slice(b",\"host\":");
        json_string(out, self.host);
        out.extend_from_slice(b",\"path\":");
        json_string(out, self.path);
        out.extend_from_slice(b",\"policy\":");
        json_opt(out, self.policy);
        out.extend_from_slice(b",\"route\":");
        json_opt(out, self.route);
        out.extend_from_slice(b",\"backend\":");
        json_opt(out, self.backend);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(digits.format(self.status).as_bytes());
        if let Some(code) = self.grpc_status {
            out.extend_from_slice(b",\"grpc_status\":");
            out.extend_from_slice(digits.format(code).as_bytes());
        }
        let micros = self.duration.as_micros();
        out.extend_from_slice(b",\"duration_ms\":");
        out.extend_from_slice(digits.format(micros / 1000).as_bytes());
        let frac = (micros % 1000) as u16;
        out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        out.extend_from_slice(b",\"decision\":");
        json_word(out, Some(self.decision));
        out.extend_from_slice(b",\"shadow_decision\":");
        json_word(out, self.shadow_decision);
        out.extend_from_slice(b",\"fallback\":");
        json_word(out, self.fallback);
        out.extend_from_slice(b",\"attempts\":");
        out.extend_from_slice(digits.format(self.attempts).as_bytes());
        out.extend_from_slice(b",\"policy_version\":");
        json_opt(out, self.policy_version);
        out.extend_from_slice(b",\"direction\":");
        json_word(out, Some(self.direction));
        out.extend_from_slice(b",\"peer\":");
        json_opt(out, self.peer);
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
        self.encode_with(out, &mut SecondStamp::default());
    }

    fn encode_with(&self, out: &mut Vec<u8>, clock: &mut SecondStamp) {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b"{\"ts\":\"");
        clock.encode(self.ts, out);
        out.extend_from_slice(b"\",\"protocol\":\"tcp\",\"direction\":");
        json_string(out, self.direction);
        out.extend_from_slice(b",\"policy\":");
        json_opt(out, self.policy);
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
        json_opt(out, self.policy_version);
        out.push(b'}');
    }
}

/// `null`, or one of the fixed vocabulary's words (an identifier: nothing to escape).
fn json_word(out: &mut Vec<u8>, word: Option<&'static str>) {
    match word {
        Some(w) => {
            debug_assert!(!needs_escape(w.as_bytes()), "{w:?}");
            out.push(b'"');
            out.extend_from_slice(w.as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string literal: copied as is when nothing needs escaping (the usual case
/// for methods, hosts, paths and names), else escaped by serde_json.
fn json_string(out: &mut Vec<u8>, value: &str) {
    if needs_escape(value.as_bytes()) {
        if serde_json::to_writer(&mut *out, value).is_err() {
            out.extend_from_slice(b"\"\"");
        }
    } else {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    }
}

/// Whether a byte is a control character, `"` or `\\` (what JSON must escape;
/// bytes of multi-byte UTF-8 characters are all >= 0x80 and need nothing).
/// Eight bytes at a time (SWAR): a string with nothing to escape, the usual one,
/// is read without a branch per byte.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `x` is zero iff the result has its high bit (exact for "any").
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut found = 0;
    let mut check = |w: [u8; 8]| {
        let x = u64::from_ne_bytes(w);
        // Below 0x20: `x - 0x20` borrows into the high bit of a byte whose own
        // high bit is clear.
        found |= x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        found |= zero_in(x ^ (ONES * u64::from(b'"')));
        found |= zero_in(x ^ (ONES * u64::from(b'\\')));
    };
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        check(w);
    }
    // The last few bytes (all of a short method, host or name) as one more word,
    // padded with a byte that needs no escape: no loop over them.
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [b'a'; 8];
        w[..rest.len()].copy_from_slice(rest);
        check(w);
    }
    found != 0
}

#[cfg(test)]
mod tests;
