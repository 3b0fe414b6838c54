//! The operational log of `sluice-proxy` and `sluice-cp`: JSON lines on stderr
//! through `tracing`, one format for both binaries.
//!
//! Every line is `{"ts":"<RFC 3339 UTC, ms>","level":"info","target":"…","msg":"…",
//! …fields}` ([`JsonLines`]). Sluice's own events, the libraries that log through
//! `tracing` (kube, tonic, h2, hyper) and those that log through the `log` crate
//! (pingora, rustls, notify; bridged by tracing-log) all end up there, filtered by
//! one `RUST_LOG`-style filter (`--log-level`, else `$RUST_LOG`, else
//! [`DEFAULT_FILTER`]). The JSON access log on stdout is the proxy's own and is not
//! this.
//!
//! Invariant: [`init`] runs once per process, in `main`, after the arguments are
//! parsed (usage errors stay plain text for the person who typed them). The global
//! subscriber it installs is the only global state.
#![forbid(unsafe_code)]

mod format;
mod timestamp;

use tracing::Subscriber;
use tracing_log::AsLog;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use format::JsonLines;
pub use timestamp::Timestamp;

/// Info from Sluice and everything else, but only warnings and errors from the
/// libraries that narrate each connection at info.
pub const DEFAULT_FILTER: &str = "info,pingora_core=warn,pingora_proxy=warn,h2=warn,hyper=warn";

/// A filter in `RUST_LOG` syntax (`warn`, `info,kube=debug`), known to parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFilter(String);

impl LogFilter {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn env_filter(&self) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
        EnvFilter::builder().parse(&self.0)
    }
}

impl Default for LogFilter {
    fn default() -> Self {
        LogFilter(DEFAULT_FILTER.to_owned())
    }
}

/// Checks a filter (a clap `value_parser`, so a bad one is a usage error naming
/// `--log-level`). Empty means the default, as an empty `RUST_LOG` does elsewhere.
pub fn parse_filter(text: &str) -> Result<LogFilter, String> {
    if text.trim().is_empty() {
        return Ok(LogFilter::default());
    }
    let filter = LogFilter(text.to_owned());
    filter.env_filter().map(|_| filter).map_err(|e| {
        // clap names --log-level even when the value came from the environment.
        format!(
            "{e} (expected RUST_LOG syntax, such as `warn` or `info,kube=debug`; \
                 without --log-level the value is $RUST_LOG's)"
        )
    })
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("--log-level {filter}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a `log` logger is already installed: {0}")]
    Log(#[from] tracing_log::log::SetLoggerError),
    #[error("a tracing subscriber is already installed: {0}")]
    Tracing(#[from] tracing::subscriber::SetGlobalDefaultError),
}

/// The subscriber [`init`] installs, writing to `writer` (tests pass a buffer).
pub fn subscriber<W>(
    filter: &LogFilter,
    writer: W,
) -> Result<impl Subscriber + Send + Sync + 'static, InitError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    build(filter, JsonLines::new(), writer)
}

fn build<W>(
    filter: &LogFilter,
    format: JsonLines,
    writer: W,
) -> Result<impl Subscriber + Send + Sync + 'static, InitError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let env_filter = filter.env_filter().map_err(|source| InitError::Filter {
        filter: filter.0.clone(),
        source,
    })?;
    let lines = tracing_subscriber::fmt::layer()
        .event_format(format)
        .with_writer(writer);
    Ok(tracing_subscriber::registry().with(env_filter).with(lines))
}

/// Installs the process's logging: JSON lines on stderr, `filter` deciding what is
/// written, `log` records bridged into `tracing`. Call once, from `main`.
pub fn init(filter: &LogFilter) -> Result<(), InitError> {
    // `log` macros below this level return at one atomic load instead of reaching
    // the filter: pingora's per-connection debug! lines cost nothing when off.
    let max = filter
        .env_filter()
        .ok()
        .and_then(|f| Layer::<tracing_subscriber::Registry>::max_level_hint(&f))
        .unwrap_or(tracing::level_filters::LevelFilter::TRACE);
    // stderr is unbuffered and the fmt layer writes each line in one call, so
    // lines from different threads never interleave.
    tracing::subscriber::set_global_default(subscriber(filter, std::io::stderr)?)?;
    tracing_log::LogTracer::builder()
        .with_max_level(max.as_log())
        .init()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, SystemTime};

    /// What a subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            inner.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            let inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&inner).into_owned()
        }
    }

    fn fixed_clock() -> Timestamp {
        Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123))
    }

    /// Runs `f` with a subscriber filtering by `filter`; returns what it wrote.
    fn logged(filter: &str, f: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let filter = parse_filter(filter).expect("a valid filter");
        let subscriber = build(&filter, JsonLines::with_clock(fixed_clock), move || {
            writer.clone()
        })
        .expect("subscriber");
        tracing::subscriber::with_default(subscriber, f);
        buffer.text()
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach redis")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn writes_ts_level_target_msg_then_the_fields_with_their_json_types() {
        let cause = Outer(std::io::Error::other("connection refused"));
        let out = logged("info", || {
            tracing::warn!(
                target: "sluice_proxy::test",
                policy = "shop",
                attempts = 3u32,
                healthy = false,
                ratio = 0.5,
                debt = -2i64,
                url = %"http://cp:15010",
                error = &cause as &(dyn std::error::Error + 'static),
                level = "a field named like a key",
                "backend \"a\" ejected\n"
            );
        });
        assert_eq!(
            out,
            "{\"ts\":\"2026-11-18T11:06:40.123Z\",\"level\":\"warn\",\"target\":\"sluice_proxy::test\",\
             \"msg\":\"backend \\\"a\\\" ejected\\n\",\"policy\":\"shop\",\"attempts\":3,\"healthy\":false,\
             \"ratio\":0.5,\"debt\":-2,\"url\":\"http://cp:15010\",\
             \"error\":\"cannot reach redis: connection refused\",\
             \"fields.level\":\"a field named like a key\"}\n"
        );
        let line: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
        assert_eq!(line["msg"], "backend \"a\" ejected\n");
    }

    #[test]
    fn control_characters_and_unicode_stay_valid_json() {
        let out = logged("info", || tracing::info!(path = "/\u{1}ü€😀\t", "x"));
        let line: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(line["path"], "/\u{1}ü€😀\t");
        assert!(out.contains("\\u0001"), "{out}");
    }

    #[test]
    fn log_records_keep_their_own_target_and_level() {
        // The `log` bridge is process-wide; no other test here logs through `log`.
        let _ = tracing_log::LogTracer::init();
        let out = logged(DEFAULT_FILTER, || {
            log::warn!(target: "pingora_core::server", "fail to {}", "bind");
            log::info!(target: "pingora_core::server", "per-connection chatter");
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("valid JSON"))
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert_eq!(lines[0]["level"], "warn");
        assert_eq!(lines[0]["target"], "pingora_core::server");
        assert_eq!(lines[0]["msg"], "fail to bind");
        let keys: Vec<&String> = lines[0].as_object().expect("object").keys().collect();
        assert!(keys.iter().all(|k| !k.starts_with("log.")), "{keys:?}");
    }

    #[test]
    fn the_filter_writes_only_what_it_lets_through() {
        let out = logged("warn", || {
            tracing::info!("dropped");
            tracing::warn!("kept");
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("\"msg\":\"kept\""), "{out}");
        let out = logged(DEFAULT_FILTER, || {
            tracing::info!(target: "hyper::proto", "dropped");
            tracing::info!(target: "sluice_control_plane::serve", "kept");
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains("\"target\":\"sluice_control_plane::serve\""),
            "{out}"
        );
    }

    #[test]
    fn a_filter_that_does_not_parse_is_refused_with_the_reason() {
        let refused = parse_filter("info,kube=verbose").expect_err("no such level");
        assert!(refused.contains("RUST_LOG syntax"), "{refused}");
        assert_eq!(parse_filter(""), Ok(LogFilter::default()));
        assert_eq!(
            parse_filter("warn,sluice_proxy=debug").map(|f| f.as_str().to_owned()),
            Ok("warn,sluice_proxy=debug".to_owned())
        );
    }
}
