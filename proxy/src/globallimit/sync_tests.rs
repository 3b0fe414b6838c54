//! Sync rounds against the in-memory store, one round at a time, with time moved by
//! hand: what a replica claims, spends, gives back and is charged, and what it does
//! when the store is gone or its answer is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge, Opts};
use sluice_policy::{GlobalRateLimit, Key, KeyedLimit};

use super::*;
use crate::globallimit::memstore::MemStore;
use crate::globallimit::tests::rule;
use crate::globallimit::{IDLE_RETURN, PROBE_EVERY};
use crate::ratelimit::Decision;

const CHECKOUT: &str = "sluice:rl:shop:checkout";
const SEARCH: &str = "sluice:rl:shop:search";

/// Time moved by hand, read by the replica (rounds, requests) and the store alike.
#[derive(Clone)]
struct Clock {
    base: Instant,
    elapsed_ms: Arc<AtomicU64>,
}

impl Clock {
    fn new() -> Self {
        Clock {
            base: Instant::now(),
            elapsed_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.elapsed_ms.load(Ordering::Relaxed))
    }

    fn micros(&self) -> u64 {
        self.elapsed_ms.load(Ordering::Relaxed) * 1000
    }

    fn advance(&self, by: Duration) {
        self.elapsed_ms
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}

type Limiters = Arc<Mutex<Vec<Arc<GlobalLimiter>>>>;
type TestRounds = Rounds<
    MemStore,
    Box<dyn Fn() -> Vec<Arc<GlobalLimiter>> + Send>,
    Box<dyn Fn() -> Instant + Send>,
>;

/// One proxy replica with its sync rounds, against its own in-memory store.
struct Replica {
    clock: Clock,
    hub: Arc<GlobalLimits>,
    limiters: Limiters,
    rounds: TestRounds,
}

impl Replica {
    fn new() -> Self {
        let hub = GlobalLimits::new(true);
        // After the hub: its epoch must not be later than the clock's start.
        let clock = Clock::new();
        let limiters: Limiters = Arc::default();
        let live = Arc::clone(&limiters);
        let (rounds_clock, store_clock) = (clock.clone(), clock.clone());
        let metrics = SyncMetrics {
            redis_up: IntGauge::new("redis_up", "up").expect("gauge"),
            syncs: IntCounterVec::new(Opts::new("syncs", "syncs"), &["outcome"]).expect("counter"),
        };
        let rounds = Rounds::new(
            MemStore::new(move || store_clock.micros()),
            Arc::clone(&hub),
            Box::new(move || live.lock().unwrap_or_else(PoisonError::into_inner).clone())
                as Box<dyn Fn() -> Vec<Arc<GlobalLimiter>> + Send>,
            metrics,
            "memory".to_owned(),
            Box::new(move || rounds_clock.now()) as Box<dyn Fn() -> Instant + Send>,
        );
        Replica {
            clock,
            hub,
            limiters,
            rounds,
        }
    }

    /// A global limit on route `route` of policy `shop`, live from now on.
    fn limiter(&self, rule: &GlobalRateLimit, route: &str) -> Arc<GlobalLimiter> {
        let limiter = Arc::new(GlobalLimiter::new(
            rule,
            None,
            "shop",
            route,
            Arc::clone(&self.hub),
            None,
        ));
        self.limiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&limiter));
        limiter
    }

    fn admits(&self, limiter: &GlobalLimiter, key: &str) -> bool {
        matches!(
            limiter.check(key, self.clock.now()),
            Decision::Allowed { .. }
        )
    }

    fn store(&mut self) -> &mut MemStore {
        &mut self.rounds.store
    }

    fn redis_up(&self) -> i64 {
        self.rounds.metrics.redis_up.get()
    }

    fn syncs(&self, outcome: &str) -> u64 {
        self.rounds
            .metrics
            .syncs
            .with_label_values(&[outcome])
            .get()
    }
}

/// A bucket that does not refill while a test runs.
fn slow() -> GlobalRateLimit {
    rule(0.001, 20, 5, None)
}

fn call(key: &str, want: i64, charge: u32) -> (String, i64, u32) {
    (key.to_owned(), want, charge)
}

#[tokio::test]
async fn a_lease_is_claimed_then_spent_without_asking_the_store() {
    let mut r = Replica::new();
    let l = r.limiter(&slow(), "checkout");
    assert!(r.rounds.connect().await);
    assert!(r.admits(&l, ""), "on credit before the first lease");
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    // The admission is charged, and the lease asked is twice the last (it ran out).
    assert_eq!(r.store().calls, [call(CHECKOUT, 2, 1)]);
    assert_eq!(l.leased(), 2);
    assert!(r.admits(&l, ""));
    assert!(r.admits(&l, ""));
    assert_eq!(l.leased(), 0);
    assert_eq!(l.take_local_decisions(), 0);
    assert_eq!(r.store().calls.len(), 1, "spent without a round trip");
    assert_eq!(r.store().tokens(CHECKOUT, 0.001, 20).floor(), 17.0);
}

/// Admits once on credit, claims (a lease of 2), spends it and admits once more
/// on credit, claims again: a lease of 4, with 4 + 1 + 2 + 1 taken from the bucket.
async fn lease_of_four(r: &mut Replica, l: &GlobalLimiter) {
    assert!(r.rounds.connect().await);
    assert!(r.admits(l, ""));
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    for _ in 0..3 {
        assert!(r.admits(l, ""));
    }
    assert_eq!(l.take_local_decisions(), 0, "the third on credit");
    assert_eq!(r.rounds.round(false).await, Step::Answered);
}

#[tokio::test]
async fn admissions_without_a_lease_are_charged_at_the_next_claim_and_the_next_lease_is_larger() {
    let mut r = Replica::new();
    let l = r.limiter(&slow(), "checkout");
    lease_of_four(&mut r, &l).await;
    assert_eq!(
        r.store().calls,
        [call(CHECKOUT, 2, 1), call(CHECKOUT, 4, 1)],
        "the lease ran out: the next is twice as large, and the credit is paid"
    );
    assert_eq!(l.leased(), 4);
    assert_eq!(r.store().tokens(CHECKOUT, 0.001, 20).floor(), 12.0);
}

#[tokio::test]
async fn the_next_lease_is_asked_once_half_is_spent() {
    let mut r = Replica::new();
    let l = r.limiter(&slow(), "checkout");
    lease_of_four(&mut r, &l).await;
    assert!(r.admits(&l, ""));
    assert!(r.admits(&l, ""));
    assert_eq!(r.rounds.round(false).await, Step::Idle, "half left");
    assert_eq!(r.store().calls.len(), 2);
    assert!(r.admits(&l, ""));
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    assert_eq!(
        r.store().calls.last(),
        Some(&call(CHECKOUT, 3, 0)),
        "what was spent since the last claim"
    );
    assert_eq!(l.leased(), 1 + 3);
}

#[tokio::test]
async fn a_dry_bucket_refuses_with_retry_after_and_is_asked_again_every_second() {
    let mut r = Replica::new();
    // One token every 10 s.
    let l = r.limiter(&rule(0.1, 2, 5, None), "checkout");
    assert!(r.rounds.connect().await);
    assert!(r.admits(&l, ""));
    r.rounds.round(false).await;
    assert_eq!(l.leased(), 1, "the bucket had 2, one paid the credit");
    assert!(r.admits(&l, ""), "the lease is spent first");
    r.rounds.round(false).await;
    assert_eq!(r.store().calls.len(), 2);
    assert_eq!(l.leased(), 0, "nothing left to grant");
    assert_eq!(
        l.check("", r.clock.now()),
        Decision::Limited {
            retry_after: Duration::from_secs(10)
        }
    );
    r.clock.advance(PROBE_EVERY / 2);
    assert!(!r.admits(&l, ""));
    assert_eq!(r.rounds.round(false).await, Step::Idle, "no probe yet");
    assert_eq!(r.store().calls.len(), 2);
    // Another replica gives its lease back; a second after the last claim the
    // next refused request asks again, and the tokens are found.
    r.clock.advance(PROBE_EVERY / 2);
    r.store().set_tokens(CHECKOUT, 2.0);
    assert_eq!(
        l.check("", r.clock.now()),
        Decision::Limited {
            retry_after: Duration::from_secs(9)
        }
    );
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    assert_eq!(r.store().calls.len(), 3);
    assert_eq!(l.leased(), 1);
    assert!(r.admits(&l, ""));
}

#[tokio::test]
async fn an_unreachable_store_leaves_the_own_bucket_deciding_until_it_returns() {
    let mut r = Replica::new();
    let l = r.limiter(&rule(0.001, 20, 2, None), "checkout");
    r.store().unreachable = true;
    assert!(!r.rounds.connect().await);
    assert_eq!((r.redis_up(), r.syncs("error")), (0, 1));
    assert!(!r.hub.reachable());
    assert!(r.admits(&l, ""));
    assert!(r.admits(&l, ""));
    assert!(!r.admits(&l, ""), "the own bucket's burst is 2");
    assert_eq!(l.take_local_decisions(), 3);

    r.store().unreachable = false;
    assert!(r.rounds.connect().await);
    assert_eq!(r.redis_up(), 1);
    assert!(r.hub.reachable());
    assert!(r.admits(&l, ""), "on credit");
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    let calls = &r.store().calls;
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].2, 1,
        "only the credit is charged: the store never heard of the outage's admissions"
    );
    assert!(l.leased() > 0);
}

#[tokio::test]
async fn a_round_that_never_reached_the_store_keeps_its_claim_and_charge() {
    let mut r = Replica::new();
    let l = r.limiter(&slow(), "checkout");
    assert!(r.rounds.connect().await);
    assert!(r.admits(&l, ""));
    r.store().unreachable = true;
    assert_eq!(r.rounds.round(false).await, Step::Failed);
    assert_eq!(r.redis_up(), 0);
    assert!(!r.hub.reachable());

    r.store().unreachable = false;
    assert!(r.rounds.connect().await);
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    let calls = &r.store().calls;
    assert_eq!((calls.len(), calls[0].2), (1, 1), "{calls:?}");
}

#[tokio::test]
async fn an_idle_replica_notices_a_lost_store_by_its_ping() {
    let mut r = Replica::new();
    r.limiter(&slow(), "checkout");
    assert!(r.rounds.connect().await);
    assert_eq!(r.rounds.round(false).await, Step::Idle);
    r.clock.advance(PING_EVERY);
    assert_eq!(r.rounds.round(false).await, Step::Answered, "pinged");
    r.clock.advance(PING_EVERY);
    r.store().unreachable = true;
    assert_eq!(r.rounds.round(false).await, Step::Failed);
    assert_eq!(r.redis_up(), 0);
    assert!(r.store().calls.is_empty());
}

#[tokio::test]
async fn an_unused_lease_goes_back_after_a_second() {
    let mut r = Replica::new();
    let l = r.limiter(&slow(), "checkout");
    assert!(r.rounds.connect().await);
    assert!(r.admits(&l, ""));
    r.rounds.round(false).await;
    assert_eq!(l.leased(), 2);
    r.clock.advance(IDLE_RETURN / 2);
    assert_eq!(r.rounds.round(false).await, Step::Idle);
    assert_eq!(l.leased(), 2, "still in use");
    r.clock.advance(IDLE_RETURN / 2);
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    assert_eq!(r.store().calls.last(), Some(&call(CHECKOUT, -2, 0)));
    assert_eq!(l.leased(), 0);
    assert_eq!(r.store().tokens(CHECKOUT, 0.001, 20).floor(), 19.0);
}

#[tokio::test]
async fn every_lease_goes_back_at_shutdown() {
    let mut r = Replica::new();
    let single = r.limiter(&slow(), "checkout");
    let keyed = KeyedLimit {
        key: Key::Header("x-tenant".into()),
        max_keys: 10,
    };
    let per_tenant = r.limiter(&rule(0.001, 20, 5, Some(keyed)), "search");
    assert!(r.rounds.connect().await);
    for (limiter, key) in [(&single, ""), (&per_tenant, "a"), (&per_tenant, "b")] {
        assert!(r.admits(limiter, key));
    }
    r.rounds.round(false).await;
    assert!(r.admits(&single, ""));
    assert_eq!((single.leased(), per_tenant.leased()), (1, 4));
    let claims = r.store().calls.len();

    assert_eq!(r.rounds.round(true).await, Step::Stopped);
    assert_eq!((single.leased(), per_tenant.leased()), (0, 0));
    let mut back: Vec<i64> = r.store().calls[claims..].iter().map(|c| c.1).collect();
    back.sort_unstable();
    assert_eq!(back, [-2, -2, -1]);
    assert_eq!(r.store().tokens(CHECKOUT, 0.001, 20).floor(), 18.0);
    assert!(
        !r.hub.reachable(),
        "requests still draining decide on their own buckets"
    );
}

#[tokio::test]
async fn a_round_whose_outcome_is_unknown_is_never_replayed() {
    let mut r = Replica::new();
    let checkout = r.limiter(&slow(), "checkout");
    let search = r.limiter(&slow(), "search");
    assert!(r.rounds.connect().await);
    assert!(r.admits(&checkout, ""));
    r.rounds.round(false).await;
    assert_eq!(checkout.leased(), 2);
    // The checkout lease is idle and goes back; a search admission is charged...
    r.clock.advance(IDLE_RETURN);
    assert!(r.admits(&search, ""));
    // ...in a round that ran in the store but whose answer never came.
    r.store().lose_next_answer = true;
    assert_eq!(r.rounds.round(false).await, Step::Failed);
    assert_eq!(r.redis_up(), 0);
    assert_eq!(r.store().calls.len(), 3);
    assert_eq!(r.store().tokens(CHECKOUT, 0.001, 20).floor(), 19.0);
    assert_eq!(r.store().tokens(SEARCH, 0.001, 20).floor(), 17.0);
    assert_eq!(checkout.leased(), 0, "dropped: the store may have it back");
    assert_eq!(search.leased(), 0, "whatever was granted is lost");

    assert!(r.rounds.connect().await);
    assert_eq!(r.rounds.round(false).await, Step::Answered);
    assert_eq!(
        &r.store().calls[3..],
        [call(SEARCH, 1, 0)],
        "the claim is asked again, the lease not given back nor the charge paid twice"
    );
    assert_eq!(r.store().tokens(CHECKOUT, 0.001, 20).floor(), 19.0);
    assert_eq!(r.store().tokens(SEARCH, 0.001, 20).floor(), 16.0);
}

#[tokio::test]
async fn the_task_claims_when_woken_and_gives_everything_back_at_shutdown() {
    let mut r = Replica::new();
    let l = r.limiter(&slow(), "checkout");
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let (clock, hub) = (r.clock.clone(), Arc::clone(&r.hub));
    let requests = async {
        // Before the task has connected, the own bucket would decide.
        while !hub.reachable() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(matches!(l.check("", clock.now()), Decision::Allowed { .. }));
        // The admission wakes the task; its round brings a lease.
        while l.leased() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).expect("the task listens");
    };
    let task = async {
        tokio::time::timeout(Duration::from_secs(30), run(&mut r.rounds, shutdown))
            .await
            .expect("the task ends at shutdown");
    };
    tokio::join!(requests, task);
    assert_eq!(l.leased(), 0);
    assert_eq!(
        r.store().calls,
        [call(CHECKOUT, 2, 1), call(CHECKOUT, -2, 0)]
    );
}
