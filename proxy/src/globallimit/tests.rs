//! The limiters' decisions and the lease accounting, driven by hand (no sync task).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_policy::hash::fnv1a64 as fnv64;
use sluice_policy::{GlobalRateLimit, Key, KeyedLimit, RateLimit};

use super::lease::Shares;
use super::*;
use crate::ratelimit::Decision;

/// A shared bucket refilling at `rps` with a replica's own bucket of `local_burst`.
pub(super) fn rule(
    rps: f64,
    burst: u32,
    local_burst: u32,
    key: Option<KeyedLimit>,
) -> GlobalRateLimit {
    GlobalRateLimit {
        shared: RateLimit {
            requests_per_second: rps,
            burst,
            key: key.clone(),
        },
        when_unreachable: RateLimit {
            requests_per_second: 0.001,
            burst: local_burst,
            key,
        },
    }
}

fn limiter(rule: &GlobalRateLimit, reachable: bool) -> (GlobalLimiter, Arc<GlobalLimits>) {
    let hub = GlobalLimits::new(true);
    hub.set_reachable(reachable);
    (
        GlobalLimiter::new(rule, None, "shop", "checkout", Arc::clone(&hub), None),
        hub,
    )
}

fn allowed(d: Decision) -> bool {
    matches!(d, Decision::Allowed { .. })
}

fn ops(l: &GlobalLimiter, now: Instant) -> Vec<Op> {
    let mut ops = Vec::new();
    l.collect(now, MAX_OPS_PER_ROUND, true, &mut ops);
    ops
}

#[test]
fn unreachable_redis_leaves_the_local_bucket_deciding() {
    let (l, _) = limiter(&rule(100.0, 50, 2, None), false);
    let now = Instant::now();
    assert!(allowed(l.check("", now)));
    assert!(allowed(l.check("", now)));
    assert!(!allowed(l.check("", now)), "the local burst is 2");
    assert_eq!(l.take_local_decisions(), 3);
    // Nothing to charge: Redis never heard of these requests.
    assert!(ops(&l, now).is_empty());
}

#[test]
fn before_its_first_lease_a_replica_admits_on_credit_and_pays_at_the_claim() {
    let (l, _) = limiter(&rule(10.0, 20, 5, None), true);
    let now = Instant::now();
    assert!(allowed(l.check("", now)));
    assert!(allowed(l.check("", now)));
    let ops = ops(&l, now);
    assert_eq!(ops.len(), 1);
    let op = &ops[0];
    assert_eq!(op.redis_key, "sluice:rl:shop:checkout");
    assert_eq!(op.charge, 2, "both admissions without a lease are charged");
    assert_eq!(op.want, 2, "the lease asked is what was spent");
    assert_eq!((op.rate, op.burst), (10.0, 20));
}

#[test]
fn a_lease_is_spent_locally_and_renewed_at_half() {
    let (l, _) = limiter(&rule(10.0, 20, 5, None), true);
    let now = Instant::now();
    // No lease yet: the first request is admitted on credit, not by the own bucket.
    assert!(allowed(l.check("", now)));
    assert_eq!(l.take_local_decisions(), 0);
    let claim = ops(&l, now);
    assert_eq!(
        claim[0].want, 2,
        "the lease ran out (there was none): twice the last"
    );
    settle(&claim[0], 0, Outcome::Done(2, 0, 17));
    // Two tokens leased: the first spends one (1 left, not below half of 2)...
    assert!(allowed(l.check("", now)));
    assert!(ops(&l, now).is_empty());
    // ...the second spends the other, and the next lease is wanted.
    assert!(allowed(l.check("", now)));
    let next = ops(&l, now);
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].want, next[0].charge), (2, 0));
    assert_eq!(l.take_local_decisions(), 0);
}

#[test]
fn credit_is_one_lease_then_the_own_bucket_decides() {
    let (l, _) = limiter(&rule(10.0, 20, 1, None), true);
    let now = Instant::now();
    assert!(allowed(l.check("", now)), "on credit");
    assert!(allowed(l.check("", now)), "by the own bucket (burst 1)");
    assert!(
        !allowed(l.check("", now)),
        "own bucket empty, claim not back yet"
    );
    assert_eq!(l.take_local_decisions(), 2);
    let claim = ops(&l, now);
    assert_eq!(claim[0].charge, 2, "both admissions are owed");
}

#[test]
fn a_dry_shared_bucket_refuses_until_it_refills() {
    let (l, hub) = limiter(&rule(10.0, 20, 5, None), true);
    let start = Instant::now();
    assert!(allowed(l.check("", start)));
    let claim = ops(&l, start);
    // Redis had no token for us: one comes in 100 ms.
    settle(&claim[0], hub.millis(start), Outcome::Done(0, 100_000, 0));
    match l.check("", start) {
        Decision::Limited { retry_after } => {
            assert_eq!(retry_after, Duration::from_millis(100));
        }
        other => panic!("{other:?}"),
    }
    assert!(ops(&l, start).is_empty(), "no claim before the refill");
    // Refilled: admitted on credit again, and a claim is wanted.
    let later = start + Duration::from_millis(150);
    assert!(allowed(l.check("", later)));
    let claim = ops(&l, later);
    assert_eq!(claim.len(), 1);
    assert_eq!(claim[0].charge, 1);
    settle(
        &claim[0],
        hub.millis(later),
        Outcome::Done(claim[0].want, 0, 3),
    );
    assert!(allowed(l.check("", later)));
}

#[test]
fn taking_the_last_tokens_makes_the_share_dry_and_a_dry_share_probes() {
    let (l, hub) = limiter(&rule(0.1, 20, 5, None), true);
    let start = Instant::now();
    let stamp = hub.millis(start);
    assert!(allowed(l.check("", start)));
    let claim = ops(&l, start);
    // Granted in full, but the bucket is left with less than a token (10 s away).
    settle(
        &claim[0],
        stamp,
        Outcome::Done(claim[0].want, 10_000_000, 0),
    );
    for _ in 0..claim[0].want {
        assert!(allowed(l.check("", start)), "the lease is spent first");
    }
    assert!(!allowed(l.check("", start)), "then the dry bucket refuses");
    ops(&l, start);
    // Before PROBE_EVERY nobody asks; after it the next request asks again
    // (another replica may have given tokens back), still refused meanwhile.
    let soon = start + Duration::from_millis(500);
    assert!(!allowed(l.check("", soon)));
    assert!(ops(&l, soon).is_empty());
    let probe = start + PROBE_EVERY;
    match l.check("", probe) {
        Decision::Limited { retry_after } => assert_eq!(retry_after, Duration::from_secs(9)),
        other => panic!("{other:?}"),
    }
    assert_eq!(ops(&l, probe).len(), 1);
}

#[test]
fn an_idle_lease_goes_back_and_an_unknown_outcome_is_never_replayed() {
    let (l, _) = limiter(&rule(10.0, 20, 5, None), true);
    let now = Instant::now();
    for _ in 0..4 {
        l.check("", now);
    }
    let claim = ops(&l, now);
    settle(&claim[0], 0, Outcome::Done(4, 0, 10));
    let leased = || match &*l.shares {
        Shares::Single(share) => share.leased(),
        Shares::PerKey { .. } => unreachable!(),
    };
    assert_eq!(leased(), 4);
    let idle = now + IDLE_RETURN;
    let back = ops(&l, idle);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].want, -4);
    // Redis refused the script: the tokens are still ours...
    settle(&back[0], 0, Outcome::Refused);
    assert_eq!(leased(), 4);
    // ...but when nobody knows whether Redis took them, they are dropped (never
    // counted twice).
    let back = ops(&l, idle);
    settle(&back[0], 0, Outcome::Unknown);
    assert_eq!(leased(), 0);
    assert!(ops(&l, idle).is_empty());
}

#[test]
fn a_changed_rule_keeps_the_lease_when_the_bucket_is_the_same() {
    let (l, hub) = limiter(&rule(10.0, 20, 5, None), true);
    let now = Instant::now();
    l.check("", now);
    let claim = ops(&l, now);
    settle(&claim[0], 0, Outcome::Done(2, 0, 10));
    let faster = rule(50.0, 20, 9, None);
    let next = GlobalLimiter::new(
        &faster,
        None,
        "shop",
        "checkout",
        Arc::clone(&hub),
        Some(&l),
    );
    assert!(Arc::ptr_eq(&l.shares, &next.shares));
    let elsewhere = GlobalLimiter::new(&faster, Some("team-b"), "shop", "checkout", hub, Some(&l));
    assert!(!Arc::ptr_eq(&l.shares, &elsewhere.shares));
    elsewhere.check("", now);
    assert_eq!(
        ops(&elsewhere, now)[0].redis_key,
        "sluice:rl:team-b/shop:checkout"
    );
}

#[test]
fn keys_beyond_the_cap_share_the_overflow_bucket() {
    let keyed = KeyedLimit {
        key: Key::Header("x-tenant".into()),
        max_keys: 2,
    };
    let (l, _) = limiter(&rule(10.0, 20, 5, Some(keyed)), true);
    let now = Instant::now();
    for tenant in ["a", "b", "c", "d"] {
        assert!(allowed(l.check(tenant, now)));
    }
    assert_eq!(l.tracked_keys(), 2);
    let mut keys: Vec<String> = ops(&l, now).into_iter().map(|o| o.redis_key).collect();
    keys.sort();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.contains(&"sluice:rl:shop:checkout:overflow".to_owned()));
    assert!(keys
        .iter()
        .any(|k| k == &format!("sluice:rl:shop:checkout:{:016x}", fnv64(b"a"))));
}

#[test]
fn a_keyed_share_whose_claim_failed_claims_again() {
    let keyed = KeyedLimit {
        key: Key::Header("x-tenant".into()),
        max_keys: 10,
    };
    let (l, _) = limiter(&rule(10.0, 20, 5, Some(keyed)), true);
    let now = Instant::now();
    assert!(allowed(l.check("acme", now)));
    let claim = ops(&l, now);
    assert_eq!(claim[0].charge, 1);
    // Refused: nothing happened in Redis; queued again, still owing.
    settle(&claim[0], 0, Outcome::Refused);
    let claim = ops(&l, now);
    assert_eq!((claim.len(), claim[0].charge), (1, 1));
    // Unknown: queued again, the charge dropped (it may have been paid).
    settle(&claim[0], 0, Outcome::Unknown);
    let claim = ops(&l, now);
    assert_eq!((claim.len(), claim[0].charge), (1, 0));
    settle(&claim[0], 0, Outcome::Done(claim[0].want, 0, 10));
    assert!(ops(&l, now).is_empty());
}

#[test]
fn without_redis_the_own_bucket_decides_and_no_key_is_tracked() {
    let keyed = KeyedLimit {
        key: Key::ClientIp,
        max_keys: 10,
    };
    let hub = GlobalLimits::new(false);
    let l = GlobalLimiter::new(
        &rule(10.0, 20, 2, Some(keyed)),
        None,
        "shop",
        "checkout",
        hub,
        None,
    );
    let now = Instant::now();
    assert!(allowed(l.check("10.0.0.1", now)));
    assert!(allowed(l.check("10.0.0.1", now)));
    assert!(
        !allowed(l.check("10.0.0.1", now)),
        "the own bucket's burst is 2"
    );
    assert_eq!(l.take_local_decisions(), 3);
    assert_eq!(l.tracked_keys(), 0);
    assert!(ops(&l, now).is_empty());
}

#[test]
fn idle_keys_holding_nothing_are_forgotten() {
    let keyed = KeyedLimit {
        key: Key::ClientIp,
        max_keys: 10,
    };
    let (l, _) = limiter(&rule(10.0, 20, 5, Some(keyed)), false);
    let now = Instant::now();
    l.check("10.0.0.1", now);
    l.check("10.0.0.2", now);
    assert_eq!(l.tracked_keys(), 2);
    ops(&l, now + IDLE_FORGET);
    assert_eq!(l.tracked_keys(), 0);
}
