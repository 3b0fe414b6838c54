//! State that every worker thread writes on every request (route histograms, the
//! access log's buffers) is kept in shards, one per thread where it can be: which
//! shard a thread writes ([`thread_ordinal`]), and a cache line of its own for each
//! shard ([`CacheLine`]).
//!
//! Why the ordinal and not a hash of the thread's id: pingora starts a runtime's
//! worker threads one after another, so its N workers have N consecutive ordinals,
//! and consecutive ordinals land in N different shards whenever there are at least
//! N. A hash lands them anywhere: 4 workers over 8 shards share one in 59% of
//! starts (2 over 2 in half of them), and two threads on one shard bounce its cache
//! line on every request, for the life of the process.

use std::hash::{Hash, Hasher};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most shards a per-thread structure sized by cores gets.
const MAX_PER_CORE: usize = 8;

/// Shards for state sharded by core: one per core this process may run on (its
/// affinity and cgroup quota count), at most 8. More shards than cores buy
/// nothing: at most one thread per core runs at once.
///
/// Read once per process: std reads the cgroup's files for the quota on every
/// call, and every breaker, balancer and limiter of a snapshot asks (10,000
/// services' worth on a reload), as does a request making a counter's first
/// handle. A process constant, like the core count it stands for.
pub fn per_core() -> usize {
    static PER_CORE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PER_CORE.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_PER_CORE)
    })
}

/// The calling thread's ordinal: the sequence number std gives each thread it
/// creates (increasing in creation order), read once per thread. Reduce it modulo
/// the shard count.
pub fn thread_ordinal() -> usize {
    thread_local! {
        static ORDINAL: usize = ordinal_of(std::thread::current().id());
    }
    ORDINAL.with(|ordinal| *ordinal)
}

/// `ThreadId`'s number is only reachable through its `Debug` form
/// (`ThreadId(7)`; `as_u64` is unstable). Should that form ever change, a hash of
/// the id: still a valid shard, only without the spread.
fn ordinal_of(id: std::thread::ThreadId) -> usize {
    let text = format!("{id:?}");
    let digits = text
        .strip_prefix("ThreadId(")
        .and_then(|rest| rest.strip_suffix(')'));
    match digits.and_then(|d| d.parse::<u64>().ok()) {
        Some(n) => n as usize,
        None => {
            let mut hasher = fnv::FnvHasher::default();
            id.hash(&mut hasher);
            hasher.finish() as usize
        }
    }
}

/// A value on a cache line of its own: 128 bytes, since x86's adjacent-line
/// prefetcher pairs 64-byte lines, so a neighbour's writes 64 bytes away still
/// cost a transfer.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CacheLine<T>(pub T);

impl<T> Deref for CacheLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for CacheLine<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// A value per thread, each on its own cache line: a power of two of them, a
/// thread using the one of its ordinal ([`PerThread::mine`]). Threads beyond the
/// count share (correctly, with the traffic of a shared line between them).
#[derive(Debug)]
pub struct PerThread<T> {
    lines: Box<[CacheLine<T>]>,
    mask: usize,
}

impl<T> PerThread<T> {
    /// `count` values (at least one, rounded up to a power of two), the `i`th
    /// made by `make(i)`.
    pub fn new(count: usize, mut make: impl FnMut(usize) -> T) -> Self {
        let count = count.max(1).next_power_of_two();
        PerThread {
            lines: (0..count).map(|i| CacheLine(make(i))).collect(),
            mask: count - 1,
        }
    }

    /// One per core ([`per_core`]).
    pub fn per_core(make: impl FnMut(usize) -> T) -> Self {
        Self::new(per_core(), make)
    }

    /// The calling thread's.
    pub fn mine(&self) -> &T {
        self.get(thread_ordinal())
    }

    /// The `i`th, modulo the count.
    pub fn get(&self, i: usize) -> &T {
        &self.lines[i & self.mask]
    }

    /// Every thread's, for a reader that sums or resets them.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.lines.iter().map(|line| &line.0)
    }
}

/// Shards of [`InFlight`] (a power of two).
const IN_FLIGHT_SHARDS: usize = 8;

/// The requests in flight, counted by the threads that serve them on lines of
/// their own (two adds per request on one line every worker wrote were the
/// busiest shared write of a request), summed by the few that read it (the drain,
/// a scrape).
///
/// Invariant: an exchange leaves the shard it entered (its [`Ticket`] says which),
/// so no shard ever goes below zero, and a sum read while requests come and go
/// counts every request that entered before the read began and has not left: the
/// drain never reads 0 while one of those is still in flight.
pub struct InFlight {
    shards: [CacheLine<AtomicUsize>; IN_FLIGHT_SHARDS],
}

/// Which shard of [`InFlight`] an exchange entered.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(usize);

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            shards: std::array::from_fn(|_| CacheLine(AtomicUsize::new(0))),
        }
    }
}

impl InFlight {
    /// One more in flight, on the calling thread's shard.
    pub fn enter(&self) -> Ticket {
        let shard = thread_ordinal() & (IN_FLIGHT_SHARDS - 1);
        self.shards[shard].fetch_add(1, Ordering::AcqRel);
        Ticket(shard)
    }

    /// The request that took `ticket` is done (on whichever thread).
    pub fn leave(&self, ticket: Ticket) {
        self.shards[ticket.0].fetch_sub(1, Ordering::AcqRel);
    }

    /// The requests in flight now.
    pub fn count(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.load(Ordering::Acquire))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{ordinal_of, thread_ordinal, CacheLine, InFlight, PerThread};

    #[test]
    fn requests_in_flight_are_counted_across_threads_and_shards() {
        let inflight = InFlight::default();
        let here = inflight.enter();
        // Entered on several threads, left on this one: the sum is exact and no
        // shard is ever below zero (each leaves the shard it entered).
        let tickets: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..6).map(|_| s.spawn(|| inflight.enter())).collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(inflight.count(), 7);
        for ticket in tickets {
            inflight.leave(ticket);
        }
        assert_eq!(inflight.count(), 1);
        inflight.leave(here);
        assert_eq!(inflight.count(), 0);
    }

    #[test]
    fn threads_created_one_after_another_have_increasing_ordinals() {
        let first = std::thread::spawn(thread_ordinal).join().unwrap();
        let second = std::thread::spawn(thread_ordinal).join().unwrap();
        assert!(second > first, "{first} then {second}");
        // Stable for a thread's life.
        assert_eq!(thread_ordinal(), thread_ordinal());
    }

    #[test]
    fn the_ordinal_is_std_s_thread_number() {
        let id = std::thread::current().id();
        assert_eq!(format!("ThreadId({})", ordinal_of(id)), format!("{id:?}"));
    }

    #[test]
    fn per_thread_values_are_a_power_of_two_indexed_modulo_their_count() {
        let values = PerThread::new(3, |i| i);
        assert_eq!(values.iter().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(*values.get(5), 1);
        assert_eq!(*values.mine(), thread_ordinal() % 4);
        assert_eq!(PerThread::new(0, |i| i).iter().count(), 1);
    }

    #[test]
    fn a_cache_line_is_128_bytes_apart_from_the_next() {
        let lines = [CacheLine(0u8), CacheLine(1u8)];
        let gap = std::ptr::from_ref(&lines[1]) as usize - std::ptr::from_ref(&lines[0]) as usize;
        assert_eq!(gap, 128);
        assert_eq!(*lines[1], 1);
    }
}
