//! Connection-level governance of one policy's opaque TCP (`spec.tcp`): a cap on
//! connections open at once and a token bucket on new connections.
//!
//! Why at the connection level: an opaque connection carries requests the proxy
//! cannot see (a database session), so the only things it can bound are how many
//! are open and how fast they are opened — what protects a database from a
//! connection storm after a deploy.
//!
//! Invariants: a slot is taken only by an admitted connection and given back
//! exactly once, when its [`TcpPermit`] drops; admission never takes the count
//! past `maxConnections` (a reload that lowers it refuses new connections until
//! enough old ones close). Cheapest refusal first, as for requests: the rate, then the
//! cap. The limiter is carried across reloads while its rule is unchanged
//! (`runtime`), and a changed rule keeps the count of open connections (and the
//! bucket, if the rate is the same), so a reload neither forgets open connections
//! nor refills the bucket.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use sluice_policy::TcpLimits;

use crate::ratelimit::{Decision, RouteLimiter};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `maxConnections` are open.
    Limit,
    /// Over `connectionsPerSecond`.
    Rate,
}

impl Refused {
    /// The `outcome` label of `sluice_tcp_connections_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Limit => "refused_limit",
            Refused::Rate => "refused_rate",
        }
    }
}

/// One policy's TCP limiter.
pub struct TcpLimiter<C: Clock = DefaultClock> {
    rule: TcpLimits,
    /// Shared with the limiter this one replaced (see [`TcpLimiter::after`]).
    open: Arc<AtomicU32>,
    rate: Option<Arc<RouteLimiter<C>>>,
}

/// An admitted connection's slot, given back when dropped.
#[derive(Debug)]
pub struct TcpPermit {
    open: Arc<AtomicU32>,
}

impl Drop for TcpPermit {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TcpLimiter<DefaultClock> {
    pub fn new(rule: &TcpLimits) -> Self {
        Self::with_clock(rule, DefaultClock::default())
    }

    /// A limiter for a changed rule that replaces `previous`: the connections it
    /// admitted are still open, so they keep counting against the new cap (a
    /// reload that raises `maxConnections` from 100 to 200 admits 100 more, not
    /// 200); its bucket is kept if the rate did not change.
    pub fn after(rule: &TcpLimits, previous: Option<&TcpLimiter>) -> Self {
        let mut limiter = Self::new(rule);
        if let Some(previous) = previous {
            limiter.open = Arc::clone(&previous.open);
            if previous.rule.connection_rate == rule.connection_rate {
                limiter.rate = previous.rate.clone();
            }
        }
        limiter
    }
}

impl<C: Clock + Clone> TcpLimiter<C>
where
    C::Instant: governor::clock::Reference,
{
    pub fn with_clock(rule: &TcpLimits, clock: C) -> Self {
        TcpLimiter {
            rule: rule.clone(),
            open: Arc::new(AtomicU32::new(0)),
            rate: rule
                .connection_rate
                .as_ref()
                .map(|r| Arc::new(RouteLimiter::exact(r, clock))),
        }
    }

    pub fn rule(&self) -> &TcpLimits {
        &self.rule
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// Admits a new connection, or says why not.
    pub fn admit(&self) -> Result<TcpPermit, Refused> {
        if let Some(rate) = &self.rate {
            if let Decision::Limited { .. } = rate.check("") {
                return Err(Refused::Rate);
            }
        }
        // Counted without a cap too: a reload that adds one counts the
        // connections already open.
        let max = self.rule.max_connections.unwrap_or(u32::MAX);
        // A compare-and-swap loop, bounded: each failed pass saw another
        // connection take or give back a slot.
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if open >= max {
                return Err(Refused::Limit);
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(TcpPermit {
                        open: Arc::clone(&self.open),
                    })
                }
                Err(now) => open = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use sluice_policy::RateLimit;
    use std::time::Duration;

    fn rule(max: Option<u32>, rate: Option<(f64, u32)>) -> TcpLimits {
        TcpLimits {
            connect_timeout: Duration::from_secs(1),
            max_connections: max,
            connection_rate: rate.map(|(rps, burst)| RateLimit {
                requests_per_second: rps,
                burst,
                key: None,
            }),
        }
    }

    #[test]
    fn refuses_beyond_max_connections_until_one_closes() {
        let limiter = TcpLimiter::new(&rule(Some(2), None));
        let a = limiter.admit().expect("first");
        let _b = limiter.admit().expect("second");
        assert_eq!(limiter.admit().map(|_| ()), Err(Refused::Limit));
        drop(a);
        assert_eq!(limiter.open(), 1);
        assert!(limiter.admit().is_ok());
    }

    #[test]
    fn refuses_over_the_connection_rate_and_refills_with_time() {
        let clock = FakeRelativeClock::default();
        let limiter = TcpLimiter::with_clock(&rule(None, Some((1.0, 2))), clock.clone());
        assert!(limiter.admit().is_ok());
        assert!(limiter.admit().is_ok());
        assert_eq!(limiter.admit().map(|_| ()), Err(Refused::Rate));
        clock.advance(Duration::from_secs(1));
        assert!(limiter.admit().is_ok());
    }

    #[test]
    fn a_rate_refusal_takes_no_slot() {
        let clock = FakeRelativeClock::default();
        let limiter = TcpLimiter::with_clock(&rule(Some(5), Some((1.0, 1))), clock);
        let _a = limiter.admit().expect("first");
        assert_eq!(limiter.admit().map(|_| ()), Err(Refused::Rate));
        assert_eq!(limiter.open(), 1);
    }

    #[test]
    fn no_limits_admits_everything() {
        let limiter = TcpLimiter::new(&rule(None, None));
        let permits: Vec<_> = (0..1000).map(|_| limiter.admit()).collect();
        assert!(permits.iter().all(Result::is_ok));
        assert_eq!(limiter.open(), 1000);
        drop(permits);
        assert_eq!(limiter.open(), 0);
    }
}
