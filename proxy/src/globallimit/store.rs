//! Where the shared buckets live, behind one narrow trait: the sync task is written
//! against [`LeaseStore`], Redis implements it with the claim script, and the unit
//! tests implement it in memory.
//!
//! A round's failure says whether anything may have happened in the store: a round
//! that was never sent can be settled as refused (everything kept for later), one
//! whose outcome is unknown must never be replayed.

use std::error::Error;
use std::future::Future;
use std::time::Duration;

use super::SCRIPT;

/// Any store's own error, kept for the logs.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// One call of the claim script: a claim (`want` > 0) or a lease given back
/// (`want` < 0), with the admissions made without a lease to charge first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClaimOp<'a> {
    /// The bucket's key.
    pub key: &'a str,
    /// The bucket's refill, tokens per second.
    pub rate: f64,
    pub burst: u32,
    pub want: i64,
    pub charge: u32,
}

/// How one claim of an answered round ended.
#[derive(Debug)]
pub enum ClaimResult {
    /// The script ran: tokens granted, µs until the bucket holds a token, whole
    /// tokens left.
    Done {
        granted: i64,
        wait_us: i64,
        left: i64,
    },
    /// The store refused this script alone (a key of the wrong type, say): nothing
    /// happened; the other claims of the round stand.
    Refused(BoxError),
    /// The store no longer knows the script (Redis's script cache was flushed, or a
    /// failover happened behind the same address): nothing happened, and the store
    /// must be prepared again (reconnected) before the next round.
    Unprepared(BoxError),
}

/// Why a whole round (or a connection) failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Nothing reached the store (no connection, the address refused): nothing
    /// happened there.
    #[error(transparent)]
    NotSent(BoxError),
    /// The round trip failed midway (a timeout, a dropped connection): its scripts
    /// may or may not have run.
    #[error(transparent)]
    Unknown(BoxError),
}

/// The shared buckets' store, as the sync task needs it. One task owns it, hence
/// `&mut self`.
pub trait LeaseStore {
    /// Connects (again), readying whatever the claims need (Redis: the script).
    fn connect(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// One round trip carrying `ops` (claims and leases given back alike), pipelined:
    /// on success one result per op, in order.
    fn claim(
        &mut self,
        ops: &[ClaimOp<'_>],
    ) -> impl Future<Output = Result<Vec<ClaimResult>, StoreError>> + Send;

    /// Checks the store answers, when a round has nothing to claim.
    fn ping(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// `--redis` as a URL: `host:port` becomes `redis://host:port/`; a `redis://` URL
/// (with a password or a database) is taken as it is.
pub fn redis_url(addr: &str) -> String {
    if addr.starts_with("redis://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}/")
    }
}

/// The URL without its password, for logs.
pub fn redacted(addr: &str) -> String {
    match (addr.strip_prefix("redis://"), addr.rfind('@')) {
        (Some(_), Some(at)) => format!("redis://***{}", &addr[at..]),
        _ => addr.to_owned(),
    }
}

/// The shared buckets in Redis: each claim is one `EVALSHA` of [`SCRIPT`], clocked
/// by Redis's own `TIME`, and a round is one pipeline.
pub struct RedisStore {
    client: redis::Client,
    script: redis::Script,
    config: redis::AsyncConnectionConfig,
    con: Option<redis::aio::MultiplexedConnection>,
}

impl RedisStore {
    /// A store for `--redis` `addr` (not connected yet); `timeout` bounds connecting
    /// and each round trip.
    pub fn new(addr: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(RedisStore {
            client: redis::Client::open(redis_url(addr))?,
            script: redis::Script::new(SCRIPT),
            config: redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            con: None,
        })
    }

    fn connection(&mut self) -> Result<&mut redis::aio::MultiplexedConnection, StoreError> {
        self.con
            .as_mut()
            .ok_or_else(|| StoreError::NotSent("not connected to redis".into()))
    }
}

impl LeaseStore for RedisStore {
    async fn connect(&mut self) -> Result<(), StoreError> {
        // A failed attempt leaves no connection: a round before the next attempt is
        // not sent rather than sent on a connection known to be broken.
        self.con = None;
        let mut con = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(|e| StoreError::NotSent(e.into()))?;
        self.script
            .prepare_invoke()
            .load_async(&mut con)
            .await
            .map_err(|e| StoreError::NotSent(e.into()))?;
        self.con = Some(con);
        Ok(())
    }

    async fn claim(&mut self, ops: &[ClaimOp<'_>]) -> Result<Vec<ClaimResult>, StoreError> {
        let mut pipe = redis::pipe();
        // One script's refusal must not sink the others: each answer is settled on
        // its own.
        pipe.ignore_errors();
        for op in ops {
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(op.key)
                .arg(op.rate)
                .arg(op.burst)
                .arg(op.want)
                .arg(op.charge);
        }
        let answers: Vec<redis::RedisResult<(i64, i64, i64)>> = pipe
            .query_async(self.connection()?)
            .await
            .map_err(|e| StoreError::Unknown(e.into()))?;
        Ok(answers
            .into_iter()
            .map(|answer| match answer {
                Ok((granted, wait_us, left)) => ClaimResult::Done {
                    granted,
                    wait_us,
                    left,
                },
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    ClaimResult::Unprepared(e.into())
                }
                Err(e) => ClaimResult::Refused(e.into()),
            })
            .collect())
    }

    async fn ping(&mut self) -> Result<(), StoreError> {
        let pong: redis::RedisResult<String> =
            redis::cmd("PING").query_async(self.connection()?).await;
        pong.map(drop).map_err(|e| StoreError::Unknown(e.into()))
    }
}
