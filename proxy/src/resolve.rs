//! Backend names, resolved off the request path and kept current.
//!
//! Why: a backend `api:8080` is usually a name for several pods (a headless
//! Service, a DNS round robin), and those come and go. Resolving it once per
//! snapshot and keeping the first address made one "backend" of all of them, and
//! never noticed a pod replaced. Here every record counts (see `endpoints`), and the
//! resolver job (`tasks::ResolveBackends`) asks again when the answer expires.
//!
//! - [`Resolve`] is the one narrow trait: a lookup of every address of a name and
//!   the answer's TTL. [`DnsResolver`] does A and AAAA lookups with hickory, with the
//!   system configuration (`/etc/resolv.conf`) or a pinned server (`--dns-server`);
//!   tests use fakes. IP literals never go to DNS.
//! - [`Names`] is the job's memory, one entry per `host:port` of the live snapshot:
//!   the last good answer and when to ask again: at the TTL, bounded to
//!   [`MIN_REFRESH`]..=[`MAX_REFRESH`] (a 0 s TTL must not become a query storm, a
//!   day-long one must not hide a moved pod), [`DEFAULT_REFRESH`] when the answer
//!   has none. A failed lookup keeps the last good set (an outage of DNS must not
//!   empty a policy that was serving) and is retried after [`MIN_REFRESH`].
//!
//! Invariants: a name's addresses are only ever replaced by a non-empty answer;
//! [`Names::record`] reports a failure as `first` only on the change from working
//! to failing, so the caller warns once per outage, not once per attempt.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::endpoints::{literal, normalize};

/// Shortest wait before a name is asked again, whatever its TTL (and after a failure).
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Longest wait before a name is asked again, whatever its TTL.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// The wait when an answer carries no TTL.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
/// Longest wait for one lookup; it then counts as failed.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Every address of a name, and how long the answer is good for.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub addrs: Vec<SocketAddr>,
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{host}: the answer holds no address")]
    NoAddresses { host: String },
    #[error("{host}: {message}")]
    Lookup { host: String, message: String },
    #[error("{host}: no answer within {timeout:?}")]
    Timeout { host: String, timeout: Duration },
    #[error("resolver configuration: {0}")]
    Config(String),
}

/// Looks up every address of `host` (with `port` attached).
#[async_trait]
pub trait Resolve: Send + Sync {
    async fn lookup(&self, host: &str, port: u16) -> Result<Answer, ResolveError>;
}

/// A and AAAA lookups through hickory; its cache honours the records' TTL.
pub struct DnsResolver(TokioResolver);

impl DnsResolver {
    /// The system's name servers, search domains and options (`/etc/resolv.conf`).
    pub fn system() -> Result<Self, ResolveError> {
        let builder =
            TokioResolver::builder_tokio().map_err(|e| ResolveError::Config(e.to_string()))?;
        builder
            .build()
            .map(DnsResolver)
            .map_err(|e| ResolveError::Config(e.to_string()))
    }

    /// Only the name server at `server` (UDP, then TCP), no search domains:
    /// `--dns-server`, for tests and for users pinning a resolver.
    pub fn at(server: SocketAddr) -> Result<Self, ResolveError> {
        let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
        for connection in &mut name_server.connections {
            connection.port = server.port();
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), vec![name_server]);
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .build()
            .map(DnsResolver)
            .map_err(|e| ResolveError::Config(e.to_string()))
    }
}

#[async_trait]
impl Resolve for DnsResolver {
    async fn lookup(&self, host: &str, port: u16) -> Result<Answer, ResolveError> {
        if let Some(addr) = literal(host, port) {
            return Ok(Answer {
                addrs: vec![addr],
                ttl: None,
            });
        }
        let found = self
            .0
            .lookup_ip(host)
            .await
            .map_err(|e| ResolveError::Lookup {
                host: host.to_owned(),
                message: e.to_string(),
            })?;
        let ttl = found
            .valid_until()
            .saturating_duration_since(Instant::now());
        Ok(Answer {
            addrs: found.iter().map(|ip| SocketAddr::new(ip, port)).collect(),
            ttl: Some(ttl),
        })
    }
}

/// When to ask again after an answer with `ttl` (see the module doc).
pub fn refresh_after(ttl: Option<Duration>) -> Duration {
    ttl.unwrap_or(DEFAULT_REFRESH)
        .clamp(MIN_REFRESH, MAX_REFRESH)
}

/// What one recorded lookup changed, for the caller's log.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An answer; `changed` when its addresses differ from the last good ones.
    Resolved { changed: bool, recovered: bool },
    /// No usable answer; the last good addresses stay. `first` on the change from
    /// working (or never asked) to failing.
    Failed { first: bool },
}

#[derive(Debug)]
struct Name {
    /// The last good answer's addresses (normalized); `None` until one arrives.
    addrs: Option<Vec<SocketAddr>>,
    due: Instant,
    failing: bool,
}

/// The resolver job's memory: one entry per name of the live snapshot.
#[derive(Debug, Default)]
pub struct Names {
    names: HashMap<(String, u16), Name>,
}

impl Names {
    /// Follows the snapshot: names no longer used are forgotten (so the map is
    /// bounded by configuration), new ones are due at once.
    pub fn track(&mut self, wanted: impl IntoIterator<Item = (String, u16)>, now: Instant) {
        let wanted: std::collections::HashSet<(String, u16)> = wanted.into_iter().collect();
        self.names.retain(|key, _| wanted.contains(key));
        for key in wanted {
            self.names.entry(key).or_insert(Name {
                addrs: None,
                due: now,
                failing: false,
            });
        }
    }

    /// The names to look up at `now`, sorted.
    pub fn due(&self, now: Instant) -> Vec<(String, u16)> {
        let mut due: Vec<(String, u16)> = self
            .names
            .iter()
            .filter(|(_, name)| name.due <= now)
            .map(|(key, _)| key.clone())
            .collect();
        due.sort_unstable();
        due
    }

    /// Records a lookup of `host:port` made at `now` and schedules the next one.
    pub fn record(
        &mut self,
        host: &str,
        port: u16,
        result: Result<Answer, ResolveError>,
        now: Instant,
    ) -> Outcome {
        let name = self.names.entry((host.to_owned(), port)).or_insert(Name {
            addrs: None,
            due: now,
            failing: false,
        });
        let answer = result.ok().filter(|a| !a.addrs.is_empty());
        match answer {
            Some(answer) => {
                let addrs = normalize(answer.addrs);
                let changed = name.addrs.as_ref() != Some(&addrs);
                let recovered = std::mem::replace(&mut name.failing, false);
                name.addrs = Some(addrs);
                name.due = now + refresh_after(answer.ttl);
                Outcome::Resolved { changed, recovered }
            }
            None => {
                let first = !std::mem::replace(&mut name.failing, true);
                name.due = now + MIN_REFRESH;
                Outcome::Failed { first }
            }
        }
    }

    /// The last good addresses of `host:port`; `None` before any good answer.
    pub fn addresses(&self, host: &str, port: u16) -> Option<&[SocketAddr]> {
        self.names
            .get(&(host.to_owned(), port))
            .and_then(|name| name.addrs.as_deref())
    }

    /// When `host:port` is next looked up.
    pub fn next_due(&self, host: &str, port: u16) -> Option<Instant> {
        self.names
            .get(&(host.to_owned(), port))
            .map(|name| name.due)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(last: &[u8], ttl: Option<Duration>) -> Result<Answer, ResolveError> {
        Ok(Answer {
            addrs: last
                .iter()
                .map(|i| SocketAddr::from(([10, 0, 0, *i], 80)))
                .collect(),
            ttl,
        })
    }

    fn failure() -> Result<Answer, ResolveError> {
        Err(ResolveError::Lookup {
            host: "api".into(),
            message: "SERVFAIL".into(),
        })
    }

    #[test]
    fn the_ttl_is_bounded_between_five_seconds_and_five_minutes() {
        assert_eq!(refresh_after(Some(Duration::ZERO)), MIN_REFRESH);
        assert_eq!(
            refresh_after(Some(Duration::from_secs(1))),
            Duration::from_secs(5)
        );
        assert_eq!(
            refresh_after(Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_after(Some(Duration::from_secs(86_400))),
            Duration::from_secs(300)
        );
        assert_eq!(refresh_after(None), Duration::from_secs(30));
    }

    #[test]
    fn a_name_is_asked_again_at_its_bounded_ttl() {
        let t0 = Instant::now();
        let mut names = Names::default();
        names.track([("api".to_owned(), 80)], t0);
        assert_eq!(names.due(t0), vec![("api".to_owned(), 80)]);
        let outcome = names.record("api", 80, answer(&[2, 1], Some(Duration::from_secs(1))), t0);
        assert_eq!(
            outcome,
            Outcome::Resolved {
                changed: true,
                recovered: false
            }
        );
        assert_eq!(names.next_due("api", 80), Some(t0 + MIN_REFRESH));
        assert!(names.due(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(names.due(t0 + MIN_REFRESH).len(), 1);
        // Sorted: equal sets compare equal whatever the record order.
        let t1 = t0 + MIN_REFRESH;
        let outcome = names.record(
            "api",
            80,
            answer(&[1, 2], Some(Duration::from_secs(3600))),
            t1,
        );
        assert_eq!(
            outcome,
            Outcome::Resolved {
                changed: false,
                recovered: false
            }
        );
        assert_eq!(names.next_due("api", 80), Some(t1 + MAX_REFRESH));
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_good_set_and_reports_once() {
        let t0 = Instant::now();
        let mut names = Names::default();
        names.record("api", 80, answer(&[1, 2], None), t0);
        assert_eq!(
            names.record("api", 80, failure(), t0),
            Outcome::Failed { first: true }
        );
        assert_eq!(
            names.record("api", 80, failure(), t0),
            Outcome::Failed { first: false }
        );
        // An empty answer is no better than none.
        assert_eq!(
            names.record("api", 80, answer(&[], None), t0),
            Outcome::Failed { first: false }
        );
        assert_eq!(names.addresses("api", 80).map(<[_]>::len), Some(2));
        assert_eq!(names.next_due("api", 80), Some(t0 + MIN_REFRESH));
        let back = names.record("api", 80, answer(&[3], None), t0);
        assert_eq!(
            back,
            Outcome::Resolved {
                changed: true,
                recovered: true
            }
        );
    }

    #[test]
    fn names_no_longer_in_the_snapshot_are_forgotten() {
        let t0 = Instant::now();
        let mut names = Names::default();
        names.track([("a".to_owned(), 1), ("b".to_owned(), 1)], t0);
        names.record("a", 1, answer(&[1], None), t0);
        names.track([("a".to_owned(), 1)], t0);
        assert_eq!(names.len(), 1);
        assert!(
            names.addresses("a", 1).is_some(),
            "a tracked name keeps its answer"
        );
    }

    #[tokio::test]
    async fn ip_literals_never_go_to_dns() {
        // A server nobody answers on: a literal must not need it.
        let resolver = DnsResolver::at(SocketAddr::from(([127, 0, 0, 1], 9))).unwrap();
        let found = resolver.lookup("10.1.2.3", 80).await.unwrap();
        assert_eq!(found.addrs, vec![SocketAddr::from(([10, 1, 2, 3], 80))]);
    }
}
