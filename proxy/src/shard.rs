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
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};

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

/// A reference to a `T` every thread shares, counted on a cache line of its own:
/// cloning and dropping it writes that line, not the counts of the `T`'s `Arc`,
/// which every thread would write. A request takes one from its thread
/// ([`Handles::mine`], [`Live::pin`]), so the counts it writes stay in its core's
/// cache (issue 23: the shared state's and the snapshot's `Arc` counts were the
/// last lines every request wrote).
pub struct Handle<T>(Arc<CacheLine<Arc<T>>>);

impl<T> Handle<T> {
    /// A handle counted on a line of its own (requests take their thread's instead).
    pub fn new(value: Arc<T>) -> Self {
        Handle(Arc::new(CacheLine(value)))
    }

    /// The value's own `Arc`, for what must outlive every handle.
    pub fn arc(&self) -> &Arc<T> {
        &self.0 .0
    }
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        Handle(Arc::clone(&self.0))
    }
}

impl<T> Deref for Handle<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0 .0
    }
}

/// A [`Handle`] per thread of a value that does not change (a listener's shared
/// state).
pub struct Handles<T> {
    handles: PerThread<Handle<T>>,
}

impl<T> Handles<T> {
    /// One per core ([`per_core`]).
    pub fn new(value: &Arc<T>) -> Self {
        Handles {
            handles: PerThread::per_core(|_| Handle::new(Arc::clone(value))),
        }
    }

    /// A handle counted on the calling thread's line.
    pub fn mine(&self) -> Handle<T> {
        self.handles.mine().clone()
    }
}

/// A value replaced whole from time to time (the live snapshot), read by every
/// request and kept for the request's life: an `ArcSwap` for the readers that
/// look ([`Live::load`]), and for requests a [`Handle`] per thread
/// ([`Live::pin`]), renewed after each replacement.
///
/// Only its own methods replace the value, so no replacement can leave a thread
/// pinning an older one; each lets go of every thread's handle, so an idle
/// thread does not keep an old value (a whole snapshot) alive.
pub struct Live<T> {
    current: ArcSwap<T>,
    /// Each thread's handle of the live value; emptied by every replacement.
    pins: PerThread<Mutex<Option<Handle<T>>>>,
}

impl<T> Live<T> {
    pub fn new(value: Arc<T>) -> Self {
        Live {
            current: ArcSwap::new(value),
            pins: PerThread::per_core(|_| Mutex::new(None)),
        }
    }

    /// A look at the value now (not to be kept across awaits: `ArcSwap::load`).
    pub fn load(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    /// The value now, as its own `Arc`.
    pub fn load_full(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// A handle of the value now, counted on the calling thread's line: what a
    /// request keeps.
    ///
    /// Why a pinned handle is never older than the last replacement that
    /// returned: an empty slot is filled with a load made under the slot's lock,
    /// and a replacement empties every slot under its lock after its store. So a
    /// fill either comes before the emptying (and is emptied) or after it (and
    /// its load sees the store). A request that begins during a replacement may
    /// get the value being replaced, as if it had begun a moment earlier.
    pub fn pin(&self) -> Handle<T> {
        // The thread's own lock: only a replacement's emptying ever waits on it.
        let mut slot = self
            .pins
            .mine()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert_with(|| Handle::new(self.current.load_full()))
            .clone()
    }

    /// Makes `value` the live one.
    pub fn store(&self, value: Arc<T>) {
        self.current.store(value);
        self.replaced();
    }

    /// Makes `next` the live one if `current` still is; whether it did.
    pub fn swap_if_current(&self, current: &Arc<T>, next: Arc<T>) -> bool {
        let before = self.current.compare_and_swap(current, next);
        let swapped = Arc::ptr_eq(&before, current);
        drop(before);
        if swapped {
            self.replaced();
        }
        swapped
    }

    /// After a replacement: every thread's handle of the old value is let go
    /// (requests in flight keep theirs until they end); the next pins load anew.
    fn replaced(&self) {
        for slot in self.pins.iter() {
            let old = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            // Dropped after the lock is released: it may be the last reference
            // to a whole snapshot, whose freeing must not hold up the worker
            // thread that pins on this slot next.
            drop(old);
        }
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::{
        ordinal_of, thread_ordinal, CacheLine, Handle, Handles, InFlight, Live, PerThread,
    };

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
    fn handles_are_counted_on_their_own_line_not_on_the_values_arc() {
        let value = Arc::new(7);
        let handles = Handles::new(&value);
        let counts = Arc::strong_count(&value);
        let mine: Vec<Handle<i32>> = (0..100).map(|_| handles.mine()).collect();
        // A hundred references a request each would have taken, and the value's
        // own count (the line every thread shares) never moved.
        assert_eq!(Arc::strong_count(&value), counts);
        assert!(mine
            .iter()
            .all(|h| **h == 7 && Arc::ptr_eq(h.arc(), &value)));
        // Another thread's handle is another line (with at least two lines).
        let theirs = std::thread::spawn({
            let handles = Arc::new(handles);
            move || handles.mine()
        })
        .join()
        .unwrap();
        assert_eq!(*theirs, 7);
    }

    #[test]
    fn a_pin_follows_the_replaced_value_and_lets_the_old_one_go() {
        let live = Live::new(Arc::new(String::from("first")));
        let first = live.pin();
        assert_eq!(*first, "first");
        // Pinned again on this thread: the same handle, no new count on the value.
        let counts = Arc::strong_count(first.arc());
        let again = live.pin();
        assert!(Arc::ptr_eq(first.arc(), again.arc()));
        assert_eq!(Arc::strong_count(first.arc()), counts);
        let old = Arc::downgrade(first.arc());
        // A request in flight keeps its value across a replacement.
        drop(again);
        live.store(Arc::new(String::from("second")));
        assert_eq!(*first, "first");
        assert_eq!(*live.pin(), "second");
        drop(first);
        assert!(old.upgrade().is_none(), "no pin kept the first value");

        // A thread that pinned and went idle lets go at the next replacement.
        let idle =
            std::thread::scope(|s| s.spawn(|| Arc::downgrade(live.pin().arc())).join().unwrap());
        assert!(idle.upgrade().is_some(), "held by the idle thread's pin");
        let second = live.load_full();
        assert!(live.swap_if_current(&second, Arc::new(String::from("third"))));
        drop(second);
        assert!(idle.upgrade().is_none(), "let go at the replacement");
        assert_eq!(*live.pin(), "third");
        // A swap from a value no longer current does nothing.
        let stale = Arc::new(String::from("stale"));
        assert!(!live.swap_if_current(&stale, Arc::new(String::from("lost"))));
        assert_eq!(*live.pin(), "third");
        assert_eq!(**live.load(), "third");
    }

    /// Frees of replaced values happen outside the slots' locks: the last handle
    /// of an old snapshot is often a thread's pin, and freeing a whole snapshot
    /// under the lock would hold up that thread's next pin.
    #[test]
    fn a_replaced_value_is_freed_with_no_slot_locked() {
        struct Probe {
            live: std::sync::Weak<Live<Probe>>,
            freed_unlocked: Arc<std::sync::Mutex<Vec<bool>>>,
        }
        impl Drop for Probe {
            fn drop(&mut self) {
                if let Some(live) = self.live.upgrade() {
                    let unlocked = live.pins.iter().all(|slot| slot.try_lock().is_ok());
                    self.freed_unlocked.lock().unwrap().push(unlocked);
                }
            }
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let live = Arc::new_cyclic(|weak| {
            Live::new(Arc::new(Probe {
                live: weak.clone(),
                freed_unlocked: Arc::clone(&seen),
            }))
        });
        // The thread's pin becomes the first value's last reference.
        drop(live.pin());
        live.store(Arc::new(Probe {
            live: Arc::downgrade(&live),
            freed_unlocked: Arc::clone(&seen),
        }));
        assert_eq!(
            *seen.lock().unwrap(),
            [true],
            "freed once, with no slot locked"
        );
    }

    /// The property `Live::pin` promises, under a replacer racing the pins: a pin
    /// begun after a replacement returned never gets an older value. (Filling a
    /// slot outside its lock breaks it: a fill of a value loaded before a
    /// replacement, landing after its emptying, would stay pinned.)
    #[test]
    fn no_pin_is_older_than_the_last_replacement_before_it() {
        const PINNERS: usize = 3;
        let live = Live::new(Arc::new(0u64));
        let published = AtomicUsize::new(0);
        let pinning = AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let pinners: Vec<_> = (0..PINNERS)
                .map(|_| {
                    s.spawn(|| {
                        let mut pins = 0u64;
                        // Bounded: the replacer's 20,000 stores end it first.
                        while !done.load(Ordering::Acquire) && pins < 50_000_000 {
                            let floor = published.load(Ordering::Acquire) as u64;
                            let pinned = live.pin();
                            assert!(*pinned >= floor, "pinned {} after {floor}", *pinned);
                            if pins == 0 {
                                pinning.fetch_add(1, Ordering::AcqRel);
                            }
                            pins += 1;
                        }
                        pins
                    })
                })
                .collect();
            // The replacements race pins only once every pinner is pinning
            // (bounded wait: the threads start within milliseconds).
            for _ in 0..10_000_000 {
                if pinning.load(Ordering::Acquire) == PINNERS {
                    break;
                }
                std::thread::yield_now();
            }
            assert_eq!(pinning.load(Ordering::Acquire), PINNERS, "pinners started");
            for value in 1..=20_000u64 {
                live.store(Arc::new(value));
                published.store(value as usize, Ordering::Release);
            }
            done.store(true, Ordering::Release);
            for pinner in pinners {
                assert!(pinner.join().unwrap() > 1);
            }
        });
        assert_eq!(*live.pin(), 20_000);
    }

    #[test]
    fn a_cache_line_is_128_bytes_apart_from_the_next() {
        let lines = [CacheLine(0u8), CacheLine(1u8)];
        let gap = std::ptr::from_ref(&lines[1]) as usize - std::ptr::from_ref(&lines[0]) as usize;
        assert_eq!(gap, 128);
        assert_eq!(*lines[1], 1);
    }
}
