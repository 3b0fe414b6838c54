//! Rate limits shared by every replica: one token bucket per route (or per key) kept
//! in Redis, handed out to each proxy in small leases so that no request waits on
//! Redis.
//!
//! Why leases: Envoy's global rate limit asks its rate-limit service on every
//! request, which puts a network round trip on the request path and makes every
//! request fail open or closed with that service. Here a proxy claims a few tokens
//! at a time from the shared bucket (one atomic Lua script, clocked by Redis's own
//! `TIME`, so the replicas' clocks do not matter) and spends them locally; the
//! background [`sync`] task claims the next lease when this one is half spent.
//! Requests admitted without a lease (below) are charged to the shared bucket at
//! the next claim, so together the replicas admit what the shared bucket allows,
//! give or take what they admit before they hear that it ran dry.
//!
//! A request that finds no leased token:
//! - Redis is unreachable: the replica's own bucket (`whenUnreachable`, by default
//!   the shared rate and burst) decides. An outage of Redis neither blocks traffic
//!   nor lifts the limit; at worst each replica admits its own bucket's rate.
//! - the shared bucket was dry at the last claim and has not refilled since: 429,
//!   with the shared bucket's own wait as `Retry-After`. A dry share re-asks Redis
//!   at least every [`PROBE_EVERY`] (another replica may have given tokens back).
//! - otherwise the demand outran the lease and the next one is on its way (or this
//!   replica has not claimed yet): up to one lease's worth is admitted on credit,
//!   then the own bucket decides; both are charged to the shared bucket at the
//!   claim, and the next lease is asked twice as large.
//!
//! A round trip whose outcome is unknown (a timeout, a dropped connection) is never
//! replayed: its claims are asked again, tokens it gave back and charges it carried
//! are dropped, so nothing is counted twice (an unpaid charge is at most one lease
//! plus the own bucket's burst per share and failed round).
//!
//! Bounds: each limiter tracks at most `maxKeys` keys (later keys share one overflow
//! bucket, as in [`crate::ratelimit`]); a lease is at most half the burst; one round
//! trip carries at most [`MAX_OPS_PER_ROUND`] scripts; keyed shares wanting a lease
//! wait in a queue (at most one entry per share), so a round does not scan every
//! key; a lease unused for [`IDLE_RETURN`] goes back to the shared bucket, and a key
//! idle for [`IDLE_FORGET`] is forgotten (both found by a scan once a second).
//!
//! Layout: `lease.rs` keeps a replica's part of each bucket (atomics, credit,
//! charges) and settles answers into it; `limiter.rs` decides each request and
//! collects the claims; `store.rs` is the [`LeaseStore`] the sync task talks to,
//! with [`RedisStore`] running `script.lua`; `sync.rs` is the task ([`sync`]), a
//! loop around one round at a time. The task gets the live limiters and its metrics
//! from its caller, so this module depends on the components only, never on the
//! proxy.

use std::time::Duration;

mod lease;
mod limiter;
#[cfg(test)]
mod memstore;
mod store;
mod sync;
#[cfg(test)]
mod tests;

pub use lease::{settle, Op, Outcome, Share};
pub use limiter::{GlobalLimiter, GlobalLimits};
pub use store::{
    redacted, redis_url, BoxError, ClaimOp, ClaimResult, LeaseStore, RedisStore, StoreError,
};
pub use sync::{sync, SyncMetrics};

/// A lease not drawn from for this long goes back to the shared bucket, so an idle
/// replica does not sit on tokens others could use.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
/// A key idle this long (and holding nothing) is forgotten, freeing room under
/// `maxKeys`.
pub const IDLE_FORGET: Duration = Duration::from_secs(5);
/// A share that found the shared bucket dry asks again at least this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Scripts per pipelined round trip; the rest wait for the next round.
pub const MAX_OPS_PER_ROUND: usize = 1024;

/// The token bucket, atomically, in Redis. Keys: the bucket. Arguments: rate
/// (tokens/s), burst, want (tokens to lease; negative gives tokens back), charge
/// (tokens spent without a lease, taken first; the bucket may go down to -burst, a
/// debt paid by waiting). Returns {granted, wait in µs until one token, whole tokens
/// left}. The state expires once the bucket would be full again anyway (an absent
/// bucket is a full one). Numbers are stored with explicit formats: Lua's own
/// `tostring` keeps 14 digits, which would round a microsecond clock.
pub const SCRIPT: &str = include_str!("script.lua");
