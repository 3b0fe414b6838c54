//! The sync task: one pipelined round trip to the store per wake-up or tick,
//! carrying the claims the limiters want and the idle leases they give back, and at
//! shutdown giving everything back.
//!
//! The task is a thin loop (waiting, reconnecting with a jittered backoff) around
//! [`Rounds::round`], which does one round against any [`LeaseStore`] with an
//! injected clock, so the unit tests run rounds one by one against an in-memory
//! store. What the task needs from the proxy comes in as arguments (the hub, a way
//! to get the live limiters, its metrics), so this module depends on no part of
//! the proxy but the components.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge};
use tokio::sync::watch;

use super::lease::{settle, Op, Outcome};
use super::limiter::{GlobalLimiter, GlobalLimits};
use super::store::{redacted, ClaimOp, ClaimResult, LeaseStore, RedisStore, StoreError};
use super::MAX_OPS_PER_ROUND;
use crate::backoff::Backoff;

/// The backoff's first step after a failed connection to the store; steps double up
/// to [`MAX_BACKOFF`] until a round succeeds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often leases are looked at without a wake-up.
const TICK: Duration = Duration::from_millis(100);
/// How often a policy without global limits is looked at.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Idle leases and keys are looked for this often.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Without claims to make, the store is pinged this often.
const PING_EVERY: Duration = Duration::from_secs(1);
/// At shutdown, rounds giving leases back (each up to MAX_OPS_PER_ROUND).
const MAX_FINAL_ROUNDS: u32 = 16;

/// The metrics the sync task keeps up to date; the caller registers them.
#[derive(Clone)]
pub struct SyncMetrics {
    /// 1 while the store answers.
    pub redis_up: IntGauge,
    /// Round trips by `outcome` (`ok`, `error`).
    pub syncs: IntCounterVec,
}

/// Keeps every global limiter that `limiters` returns (those of the live policy)
/// supplied with leases from the Redis at `addr` until shutdown, reconnecting with
/// backoff; at shutdown, gives the leases back. `timeout` bounds connecting and each
/// round trip; past it Redis counts as unreachable and the local buckets decide
/// until it answers again.
pub async fn sync<L>(
    hub: Arc<GlobalLimits>,
    limiters: L,
    metrics: SyncMetrics,
    addr: String,
    timeout: Duration,
    shutdown: watch::Receiver<bool>,
) where
    L: Fn() -> Vec<Arc<GlobalLimiter>> + Send,
{
    let shown = redacted(&addr);
    let store = match RedisStore::new(&addr, timeout) {
        Ok(store) => store,
        Err(e) => {
            tracing::error!(
                redis = shown,
                error = &e as &dyn Error,
                "redis address rejected; global rate limits use their local buckets"
            );
            return;
        }
    };
    let mut rounds = Rounds::new(store, hub, limiters, metrics, shown, Instant::now);
    run(&mut rounds, shutdown).await;
}

/// The task's loop: connect, then one round per wake-up or tick until the store
/// fails (then wait and reconnect) or shutdown has given everything back.
async fn run<S, L, C>(rounds: &mut Rounds<S, L, C>, mut shutdown: watch::Receiver<bool>)
where
    S: LeaseStore,
    L: Fn() -> Vec<Arc<GlobalLimiter>>,
    C: Fn() -> Instant,
{
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    // Each iteration is one connection.
    loop {
        let connected = tokio::select! {
            _ = shutdown.changed() => return,
            up = rounds.connect() => up,
        };
        if connected {
            let mut stopping = false;
            loop {
                if !stopping {
                    let tick = rounds.tick();
                    stopping = tokio::select! {
                        _ = shutdown.changed() => true,
                        () = rounds.hub.woken() => false,
                        () = tokio::time::sleep(tick) => false,
                    };
                }
                match rounds.round(stopping).await {
                    Step::Idle => {}
                    Step::Answered => backoff.reset(),
                    Step::Stopped => return,
                    Step::Failed => break,
                }
            }
        }
        // A store that fails again right away must not be retried in a loop, and
        // proxies that lost it together must not all come back at the same moment.
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(backoff.next_wait()) => {}
        }
    }
}

/// What a round leaves the loop to do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Nothing was sent (nothing to claim, a ping not due yet).
    Idle,
    /// The store answered.
    Answered,
    /// Shutdown: everything is given back (or the store is gone); the task ends.
    Stopped,
    /// The store failed (recorded); reconnect after a backoff.
    Failed,
}

/// The sync task's state between rounds.
struct Rounds<S, L, C> {
    store: S,
    hub: Arc<GlobalLimits>,
    /// The live global limiters.
    limiters: L,
    metrics: SyncMetrics,
    /// The store's address without its password, for logs.
    shown: String,
    /// Injected so the tests move time by hand.
    clock: C,
    /// The round's script calls; kept to reuse its allocation.
    ops: Vec<Op>,
    /// Whether the store answered at the last change logged.
    was_up: Option<bool>,
    last_answer: Instant,
    last_scan: Instant,
    /// A refused script is logged once per connection: they come in floods.
    refusal_logged: bool,
    /// Rounds so far, which picks the limiter a round starts at.
    round: usize,
    stopped_rounds: u32,
}

impl<S, L, C> Rounds<S, L, C>
where
    S: LeaseStore,
    L: Fn() -> Vec<Arc<GlobalLimiter>>,
    C: Fn() -> Instant,
{
    fn new(
        store: S,
        hub: Arc<GlobalLimits>,
        limiters: L,
        metrics: SyncMetrics,
        shown: String,
        clock: C,
    ) -> Self {
        let now = clock();
        Rounds {
            store,
            hub,
            limiters,
            metrics,
            shown,
            clock,
            ops: Vec::new(),
            was_up: None,
            last_answer: now,
            last_scan: now,
            refusal_logged: false,
            round: 0,
            stopped_rounds: 0,
        }
    }

    /// Connects to the store and records whether that worked.
    async fn connect(&mut self) -> bool {
        match self.store.connect().await {
            Ok(()) => {
                // What a share knew of its bucket before may be stale (a restarted
                // Redis starts it full): a dry share asks again within PROBE_EVERY
                // anyway.
                self.note_reachable(true, None);
                let now = (self.clock)();
                self.last_answer = now;
                self.last_scan = now;
                self.refusal_logged = false;
                self.round = 0;
                self.stopped_rounds = 0;
                true
            }
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    /// The wait between rounds without a wake-up.
    fn tick(&self) -> Duration {
        if (self.limiters)().is_empty() {
            IDLE_TICK
        } else {
            TICK
        }
    }

    /// One round: collects the limiters' script calls (with `stopping`, every lease
    /// and debt), sends them in one round trip and settles the answers.
    async fn round(&mut self, stopping: bool) -> Step {
        let now = (self.clock)();
        let scan = now.duration_since(self.last_scan) >= SCAN_EVERY;
        if scan {
            self.last_scan = now;
        }
        self.ops.clear();
        let limiters = (self.limiters)();
        // Each round starts at the next limiter, so a busy one cannot keep the
        // others out of the round's room.
        self.round = self.round.wrapping_add(1);
        let first = if limiters.is_empty() {
            0
        } else {
            self.round % limiters.len()
        };
        for limiter in limiters[first..].iter().chain(&limiters[..first]) {
            if stopping {
                limiter.collect_all(MAX_OPS_PER_ROUND, &mut self.ops);
            } else {
                limiter.collect(now, MAX_OPS_PER_ROUND, scan, &mut self.ops);
            }
        }
        drop(limiters);
        if self.ops.is_empty() {
            if stopping {
                return self.stop();
            }
            // Nothing to claim: a PING now and then keeps the reachability (and its
            // gauge) current for when a claim is needed.
            if now.duration_since(self.last_answer) < PING_EVERY {
                return Step::Idle;
            }
            return match self.store.ping().await {
                Ok(()) => {
                    self.last_answer = (self.clock)();
                    Step::Answered
                }
                Err(e) => self.fail(&e),
            };
        }
        let answer = {
            let claims: Vec<ClaimOp<'_>> = self.ops.iter().map(Op::claim).collect();
            self.store.claim(&claims).await
        };
        let stamp = self.hub.millis((self.clock)());
        let results = match answer {
            Ok(results) if results.len() == self.ops.len() => results,
            failed => {
                let error = match failed {
                    Ok(results) => StoreError::Unknown(
                        format!(
                            "wrong number of answers: {} for {} scripts",
                            results.len(),
                            self.ops.len()
                        )
                        .into(),
                    ),
                    Err(e) => e,
                };
                // A round that never left keeps everything for later; one whose
                // outcome is unknown is never replayed (see Outcome::Unknown).
                let outcome = match error {
                    StoreError::NotSent(_) => Outcome::Refused,
                    StoreError::Unknown(_) => Outcome::Unknown,
                };
                for op in &self.ops {
                    settle(op, stamp, outcome);
                }
                return if stopping {
                    self.stop()
                } else {
                    self.fail(&error)
                };
            }
        };
        let mut unprepared = None;
        for (op, result) in self.ops.iter().zip(results) {
            match result {
                ClaimResult::Done {
                    granted,
                    wait_us,
                    left,
                } => settle(op, stamp, Outcome::Done(granted, wait_us, left)),
                ClaimResult::Unprepared(e) => {
                    // Nothing ran; reconnecting prepares the store again.
                    settle(op, stamp, Outcome::Refused);
                    unprepared = Some(e);
                }
                ClaimResult::Refused(e) => {
                    settle(op, stamp, Outcome::Refused);
                    self.metrics.syncs.with_label_values(&["error"]).inc();
                    if !self.refusal_logged {
                        self.refusal_logged = true;
                        tracing::warn!(
                            redis = self.shown.as_str(),
                            key = op.redis_key.as_str(),
                            error = &*e as &dyn Error,
                            "redis refused a global rate-limit script"
                        );
                    }
                }
            }
        }
        if let Some(e) = unprepared {
            return if stopping {
                self.stop()
            } else {
                self.fail(&*e)
            };
        }
        self.metrics.syncs.with_label_values(&["ok"]).inc();
        self.last_answer = (self.clock)();
        if stopping {
            // Another round if the room was full, until all is given back.
            if self.ops.len() < MAX_OPS_PER_ROUND || self.stopped_rounds >= MAX_FINAL_ROUNDS {
                return self.stop();
            }
            self.stopped_rounds += 1;
        }
        Step::Answered
    }

    /// The last round is over: requests still draining decide on their own buckets.
    fn stop(&self) -> Step {
        self.hub.set_reachable(false);
        Step::Stopped
    }

    /// Records a failed connection or round.
    fn fail(&mut self, error: &(dyn Error + 'static)) -> Step {
        self.metrics.syncs.with_label_values(&["error"]).inc();
        self.note_reachable(false, Some(error));
        Step::Failed
    }

    /// Records whether the store answers (flag, gauge) and logs each change once.
    fn note_reachable(&mut self, up: bool, error: Option<&(dyn Error + 'static)>) {
        self.hub.set_reachable(up);
        self.metrics.redis_up.set(i64::from(up));
        if self.was_up == Some(up) {
            return;
        }
        self.was_up = Some(up);
        let shown = self.shown.as_str();
        if up {
            tracing::info!(
                redis = shown,
                error,
                "redis connected; global rate limits shared"
            );
        } else {
            tracing::warn!(
                redis = shown,
                error,
                "redis unreachable; global rate limits use their local buckets"
            );
        }
    }
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
