//! [`JsonLines`]: one JSON object per event, `{"ts","level","target","msg",
//! ...fields}`, the shape Sluice's operational logs had before `tracing` (log
//! pipelines and tests key on `ts`, `level` and `msg`).
//!
//! tracing-subscriber's own `.json()` would write `timestamp`, `INFO` and nest the
//! message under `fields.message`, hence this formatter. Field values keep their
//! JSON types (numbers, booleans); anything recorded with `%` or `?` becomes a
//! string. Records bridged from the `log` crate (pingora, rustls, notify) carry their
//! real target and level, not tracing-log's `log.*` bookkeeping fields. Spans are
//! not written: Sluice opens none of its own, and the libraries' spans are request
//! plumbing that would lengthen every line for no reader.

use std::fmt::{self, Debug, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::Timestamp;

/// Keys every line starts with; a field of the same name is written as `fields.NAME`
/// so that no line has a key twice.
const RESERVED: [&str; 4] = ["ts", "level", "target", "msg"];

/// Formats each event as one JSON line.
#[derive(Clone, Copy)]
pub struct JsonLines {
    clock: fn() -> Timestamp,
}

impl JsonLines {
    pub fn new() -> Self {
        Self::with_clock(Timestamp::now)
    }

    /// Stamps lines with `clock` instead of the system time (tests).
    pub fn with_clock(clock: fn() -> Timestamp) -> Self {
        JsonLines { clock }
    }
}

impl Default for JsonLines {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut fields = Fields::default();
        event.record(&mut fields);
        write!(
            writer,
            "{{\"ts\":\"{}\",\"level\":\"{}\",\"target\":",
            (self.clock)(),
            level_name(*meta.level())
        )?;
        let mut head = String::with_capacity(64 + fields.msg.len());
        push_json_str(&mut head, meta.target());
        head.push_str(",\"msg\":");
        push_json_str(&mut head, &fields.msg);
        writer.write_str(&head)?;
        writer.write_str(&fields.rest)?;
        writer.write_str("}\n")
    }
}

/// Lowercase, as the logs were before (`"info"`, not tracing's `"INFO"`).
fn level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// An event's message, and its other fields as `,"name":value` pairs.
#[derive(Default)]
struct Fields {
    msg: String,
    rest: String,
}

impl Fields {
    /// Starts the pair for `field`; `false` for a field not to be written.
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        self.rest.push(',');
        if RESERVED.contains(&name) {
            push_json_str(&mut self.rest, &format!("fields.{name}"));
        } else {
            push_json_str(&mut self.rest, name);
        }
        self.rest.push(':');
        true
    }

    /// A number written as itself (its `Display` is valid JSON).
    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        if field.name() == "message" {
            let _ = write!(self.msg, "{value}");
        } else if self.key(field) {
            let _ = write!(self.rest, "{value}");
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        // `format_args!` messages and `%value` fields arrive here; their Debug is
        // the text itself.
        if field.name() == "message" {
            let _ = write!(self.msg, "{value:?}");
        } else if self.key(field) {
            push_json_str(&mut self.rest, &format!("{value:?}"));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg.push_str(value);
        } else if self.key(field) {
            push_json_str(&mut self.rest, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.number(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.number(field, value);
        } else if self.key(field) {
            // JSON has no NaN or infinity.
            self.rest.push_str("null");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The causes too, as anyhow's `{:#}` would: "cannot connect: connection
        // refused". Many errors already print their source; it is not repeated.
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        self.record_str(field, &text);
    }
}

/// Appends `value` as a JSON string literal.
fn push_json_str(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
