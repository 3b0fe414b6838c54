//! An in-memory [`LeaseStore`] for the sync task's unit tests: the claim script's
//! arithmetic in Rust, clocked by an injected clock (as the script is by Redis's
//! `TIME`), with the faults a test asks for.

use std::collections::HashMap;

use super::store::{ClaimOp, ClaimResult, LeaseStore, StoreError};

/// One bucket: tokens (down to -burst, a debt) at a time in µs.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: u64,
}

pub struct MemStore {
    /// The store's time in µs.
    clock: Box<dyn Fn() -> u64 + Send>,
    buckets: HashMap<String, Bucket>,
    connected: bool,
    /// While set, nothing reaches the store: connecting fails, and so does every
    /// round, before sending.
    pub unreachable: bool,
    /// The next round's scripts run, then its answer is lost (a timeout, a dropped
    /// connection): the sync task cannot know what happened.
    pub lose_next_answer: bool,
    /// Every script call that ran, in order: (key, want, charge).
    pub calls: Vec<(String, i64, u32)>,
}

impl MemStore {
    pub fn new(clock: impl Fn() -> u64 + Send + 'static) -> Self {
        MemStore {
            clock: Box::new(clock),
            buckets: HashMap::new(),
            connected: false,
            unreachable: false,
            lose_next_answer: false,
            calls: Vec::new(),
        }
    }

    /// The tokens `key` holds now (a bucket never used is full).
    pub fn tokens(&self, key: &str, rate: f64, burst: u32) -> f64 {
        let now = (self.clock)();
        self.buckets
            .get(key)
            .map_or(f64::from(burst), |b| refilled(*b, now, rate, burst))
    }

    /// Sets `key`'s bucket, as another replica's claims would.
    pub fn set_tokens(&mut self, key: &str, tokens: f64) {
        let at = (self.clock)();
        self.buckets.insert(key.to_owned(), Bucket { tokens, at });
    }

    /// The claim script (script.lua), line for line.
    fn run(&mut self, op: &ClaimOp<'_>) -> ClaimResult {
        let now = (self.clock)();
        let burst = f64::from(op.burst);
        let mut tokens = self
            .buckets
            .get(op.key)
            .map_or(burst, |b| refilled(*b, now, op.rate, op.burst));
        tokens = (tokens - f64::from(op.charge)).max(-burst);
        let mut granted = 0;
        if op.want > 0 {
            granted = op.want.min(tokens.floor() as i64).max(0);
            tokens -= granted as f64;
        } else {
            tokens = (tokens - op.want as f64).min(burst);
        }
        let wait_us = if tokens < 1.0 {
            ((1.0 - tokens) * 1_000_000.0 / op.rate).ceil() as i64
        } else {
            0
        };
        self.buckets
            .insert(op.key.to_owned(), Bucket { tokens, at: now });
        self.calls.push((op.key.to_owned(), op.want, op.charge));
        ClaimResult::Done {
            granted,
            wait_us,
            left: tokens.floor().max(0.0) as i64,
        }
    }
}

/// A bucket's tokens at `now`, refilled since it was last written.
fn refilled(bucket: Bucket, now: u64, rate: f64, burst: u32) -> f64 {
    if now > bucket.at {
        let refill = (now - bucket.at) as f64 * rate / 1_000_000.0;
        (bucket.tokens + refill).min(f64::from(burst))
    } else {
        bucket.tokens
    }
}

impl LeaseStore for MemStore {
    async fn connect(&mut self) -> Result<(), StoreError> {
        self.connected = !self.unreachable;
        if self.connected {
            Ok(())
        } else {
            Err(StoreError::NotSent("connection refused".into()))
        }
    }

    async fn claim(&mut self, ops: &[ClaimOp<'_>]) -> Result<Vec<ClaimResult>, StoreError> {
        if self.unreachable || !self.connected {
            self.connected = false;
            return Err(StoreError::NotSent("not connected".into()));
        }
        let results = ops.iter().map(|op| self.run(op)).collect();
        if self.lose_next_answer {
            self.lose_next_answer = false;
            self.connected = false;
            return Err(StoreError::Unknown("answer lost".into()));
        }
        Ok(results)
    }

    async fn ping(&mut self) -> Result<(), StoreError> {
        if self.unreachable || !self.connected {
            self.connected = false;
            return Err(StoreError::NotSent("not connected".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn claim(store: &mut MemStore, want: i64, charge: u32) -> (i64, i64, i64) {
        let op = ClaimOp {
            key: "b",
            rate: 0.001,
            burst: 10,
            want,
            charge,
        };
        match store.claim(&[op]).await.expect("reachable").pop() {
            Some(ClaimResult::Done {
                granted,
                wait_us,
                left,
            }) => (granted, wait_us, left),
            other => panic!("{other:?}"),
        }
    }

    /// The cases of the Redis script's own test (tests/global.rs), with the clock
    /// stopped: both implementations of the bucket must agree.
    #[tokio::test]
    async fn keeps_the_same_token_bucket_as_the_claim_script() {
        let mut store = MemStore::new(|| 0);
        store.connect().await.expect("reachable");
        assert_eq!(
            claim(&mut store, 4, 0).await,
            (4, 0, 6),
            "a new bucket is full"
        );
        assert_eq!(
            claim(&mut store, 10, 0).await,
            (6, 1_000_000_000, 0),
            "only what is left is granted; one token in 1000 s"
        );
        assert_eq!(
            claim(&mut store, -3, 0).await.2,
            3,
            "a returned lease refills it"
        );
        assert_eq!(
            claim(&mut store, -30, 0).await.2,
            10,
            "never above the burst"
        );
        assert_eq!(
            claim(&mut store, 1, 25).await,
            (0, 11_000_000_000, 0),
            "charges go down to a debt of one burst"
        );
    }
}
