//! Lease accounting: what this replica holds of each shared bucket (tokens leased,
//! admissions owed, whether the bucket was dry), kept in atomics so the request path
//! never locks, and how a sync round's answer settles into it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use dashmap::DashMap;

use super::store::ClaimOp;
use super::PROBE_EVERY;

/// This replica's part of one shared bucket.
pub struct Share {
    /// The bucket's Redis key.
    pub(super) redis_key: String,
    /// Tokens leased and not spent yet (never negative).
    pub(super) leased: AtomicI64,
    /// Requests admitted without a lease while Redis was reachable (on credit, or by
    /// the own bucket): charged at the next claim.
    pub(super) unleased: AtomicU32,
    /// The lease ran out before the next one arrived: the next is asked larger.
    pub(super) ran_out: AtomicBool,
    /// Requests since the last claim (the next lease's size).
    pub(super) spent: AtomicU32,
    /// The lease size asked last (a claim is wanted below half of it).
    pub(super) lease: AtomicU32,
    /// 0 while the shared bucket had tokens to spare at the last claim; else the
    /// stamp (ms) at which it holds a token again.
    pub(super) dry_until: AtomicU64,
    /// While dry, the stamp from which a request asks Redis again.
    pub(super) probe_at: AtomicU64,
    /// Whole tokens the shared bucket held at the last claim.
    pub(super) shared_left: AtomicU32,
    pub(super) wanted: AtomicBool,
    pub(super) last_used: AtomicU64,
}

impl Share {
    pub(super) fn new(redis_key: String) -> Self {
        Share {
            redis_key,
            leased: AtomicI64::new(0),
            unleased: AtomicU32::new(0),
            ran_out: AtomicBool::new(false),
            spent: AtomicU32::new(0),
            lease: AtomicU32::new(1),
            dry_until: AtomicU64::new(0),
            probe_at: AtomicU64::new(0),
            shared_left: AtomicU32::new(0),
            wanted: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
        }
    }

    /// Takes one leased token; never lets `leased` go below zero (a sync round may
    /// be taking the lease back at the same moment).
    pub(super) fn take(&self) -> Option<i64> {
        let mut left = self.leased.load(Ordering::Acquire);
        while left > 0 {
            match self.leased.compare_exchange_weak(
                left,
                left - 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(left - 1),
                Err(actual) => left = actual,
            }
        }
        None
    }

    /// Takes one unit of credit (owed at the next claim), if fewer than `credit`
    /// are owed.
    pub(super) fn borrow(&self, credit: u32) -> bool {
        self.unleased
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                (owed < credit).then_some(owed + 1)
            })
            .is_ok()
    }

    pub fn leased(&self) -> i64 {
        self.leased.load(Ordering::Relaxed)
    }
}

pub(super) enum Shares {
    Single(Arc<Share>),
    PerKey {
        keys: DashMap<String, Arc<Share>>,
        /// Slots taken in `keys`, reserved before inserting so the cap holds.
        len: AtomicUsize,
        max_keys: usize,
        overflow: Arc<Share>,
        /// Shares that want a claim, each at most once (its `wanted` flag).
        queue: Mutex<VecDeque<Arc<Share>>>,
    },
}

/// One script call of a sync round.
pub struct Op {
    pub(super) share: Arc<Share>,
    /// Its limiter's shares: a failed claim re-queues a keyed share there.
    pub(super) shares: Arc<Shares>,
    pub redis_key: String,
    /// Tokens asked (> 0) or given back (< 0).
    pub want: i64,
    pub charge: u32,
    pub rate: f64,
    pub burst: u32,
}

impl Op {
    /// The call as the store sees it.
    pub fn claim(&self) -> ClaimOp<'_> {
        ClaimOp {
            key: &self.redis_key,
            rate: self.rate,
            burst: self.burst,
            want: self.want,
            charge: self.charge,
        }
    }
}

/// How a script call ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// (granted, wait in µs until one token, whole tokens left).
    Done(i64, i64, i64),
    /// Redis refused the script: nothing happened, everything is kept for later.
    Refused,
    /// The round trip failed midway (timeout, connection lost): whatever it gave
    /// back or paid is dropped rather than risk counting it twice; claims are asked
    /// again.
    Unknown,
}

/// Marks `share` as wanting a claim; a keyed share joins its limiter's queue. True
/// when it did not want one yet.
pub(super) fn rearm(shares: &Shares, share: &Arc<Share>) -> bool {
    if share.wanted.swap(true, Ordering::AcqRel) {
        return false;
    }
    if let Shares::PerKey { queue, .. } = shares {
        queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Arc::clone(share));
    }
    true
}

/// Settles a script call at `stamp` (see [`Outcome`]).
pub fn settle(op: &Op, stamp: u64, outcome: Outcome) {
    let share = &op.share;
    let (granted, wait_us, left) = match outcome {
        Outcome::Done(granted, wait_us, left) => (granted, wait_us, left),
        Outcome::Refused => {
            if op.want < 0 {
                share.leased.fetch_add(-op.want, Ordering::AcqRel);
            }
            share.unleased.fetch_add(op.charge, Ordering::Relaxed);
            if op.want > 0 {
                rearm(&op.shares, share);
            }
            return;
        }
        Outcome::Unknown => {
            if op.want > 0 {
                rearm(&op.shares, share);
            }
            return;
        }
    };
    if op.want <= 0 {
        return;
    }
    share.lease.store(op.want as u32, Ordering::Relaxed);
    share.shared_left.store(
        u32::try_from(left.max(0)).unwrap_or(u32::MAX),
        Ordering::Relaxed,
    );
    if wait_us > 0 {
        // The shared bucket has less than a token to spare: once this lease is
        // spent, refuse until it has one again (asking again meanwhile, at most
        // every PROBE_EVERY, in case another replica gives tokens back).
        let wait_ms = (wait_us as u64).div_ceil(1000).max(1);
        let until = stamp.saturating_add(wait_ms);
        share.probe_at.store(
            until.min(stamp + PROBE_EVERY.as_millis() as u64),
            Ordering::Release,
        );
        share.dry_until.store(until, Ordering::Release);
    } else {
        share.dry_until.store(0, Ordering::Release);
    }
    share
        .leased
        .fetch_add(granted.clamp(0, op.want), Ordering::AcqRel);
}
