//! Policies discovered on demand: a request for a host no held policy owns asks
//! the control plane for it and waits (at most [`Demand::timeout`]) for the answer,
//! a policy or "no policy owns it"; later requests for that host are local either
//! way. This is what keeps a proxy's memory and metric series in proportion to the
//! services its workload calls, not to the mesh (Linkerd discovers per destination
//! the same way).
//!
//! The request path only reads here, except for a host seen for the first time:
//! that one takes the mutex, queues the host for the policy stream
//! (`control_plane`), and waits on a `watch` the stream bumps after every update
//! it applied. Bounds: at most [`MAX_HOSTS`] hosts asked for at once (beyond, a new
//! host is answered at once, unowned), a queue of [`QUEUE`] asks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

/// Most hosts one proxy subscribes to on demand (known or unknown to the control
/// plane); a host past it is not asked for (its requests get the 404 of a host no
/// policy owns), until idle ones are released.
pub const MAX_HOSTS: usize = 4096;
/// Hosts waiting to be sent on the stream.
pub const QUEUE: usize = 1024;
/// How long a request waits for the control plane's answer about its host.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a discovered policy, or a host no policy owns, is kept without a
/// request before it is released.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);

#[derive(Default)]
struct State {
    /// Hosts subscribed on demand (sent, or queued to be).
    asked: HashSet<String>,
    /// Of those, the ones the control plane said no policy owns, and when.
    unknown: HashMap<String, Instant>,
}

pub struct Demand {
    asks: mpsc::Sender<String>,
    state: Mutex<State>,
    answered: watch::Sender<u64>,
    /// Whether the policy stream is up: without it nobody would answer.
    connected: AtomicBool,
    pub timeout: Duration,
    pub idle: Duration,
}

impl Demand {
    /// A demand and the receiving end of its asks (for the policy stream).
    pub fn new(timeout: Duration, idle: Duration) -> (Demand, mpsc::Receiver<String>) {
        let (asks, rx) = mpsc::channel(QUEUE);
        let demand = Demand {
            asks,
            state: Mutex::default(),
            answered: watch::channel(0).0,
            connected: AtomicBool::new(false),
            timeout,
            idle,
        };
        (demand, rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `known()` (a held policy owns `host`), the control plane says
    /// no policy owns it, or the timeout. Returns at once when the stream is down,
    /// the host is known to be unowned, or the bound on hosts is reached. True
    /// when the wait timed out (asked, no answer yet).
    pub async fn wait(&self, host: &str, known: impl Fn() -> bool) -> bool {
        let host = sluice_policy::validate::host_without_port(host).to_ascii_lowercase();
        let mut answers = self.answered.subscribe();
        {
            let mut state = self.lock();
            if state.unknown.contains_key(&host) || !self.connected.load(Ordering::Relaxed) {
                return false;
            }
            if !state.asked.contains(&host) {
                if state.asked.len() >= MAX_HOSTS || self.asks.try_send(host.clone()).is_err() {
                    return false;
                }
                state.asked.insert(host.clone());
            }
        }
        let answered = async {
            // Ends when the host is answered or the stream task is gone.
            loop {
                if known() || self.lock().unknown.contains_key(&host) {
                    return;
                }
                if answers.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(self.timeout, answered).await.is_err()
    }

    /// The stream is up (true) or down; while down, requests do not wait.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// After an update was applied: these hosts have no policy; every waiter looks
    /// again.
    pub fn answered(&self, unknown: &[String], now: Instant) {
        {
            let mut state = self.lock();
            for host in unknown {
                if state.asked.contains(host) {
                    state.unknown.insert(host.clone(), now);
                }
            }
        }
        self.answered.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A policy now owns these hosts (they were unknown, or are now held).
    pub fn owned(&self, hosts: &[String]) {
        let mut state = self.lock();
        for host in hosts {
            state.unknown.remove(host);
        }
    }

    /// Counts `hosts` as asked for (the hosts of policies restored from the state
    /// file, subscribed again on connecting), within the bound.
    pub fn hold(&self, hosts: &[String]) {
        let mut state = self.lock();
        for host in hosts {
            if state.asked.len() >= MAX_HOSTS {
                break;
            }
            state.asked.insert(host.clone());
        }
    }

    /// Every host subscribed on demand (to subscribe again after a reconnect).
    pub fn asked(&self) -> Vec<String> {
        self.lock().asked.iter().cloned().collect()
    }

    /// Forgets hosts (released): a later request asks again.
    pub fn release(&self, hosts: &[String]) {
        let mut state = self.lock();
        for host in hosts {
            state.asked.remove(host);
            state.unknown.remove(host);
        }
    }

    /// Unowned hosts answered before `before`: what the release job lets go.
    pub fn unknown_since(&self, before: Instant) -> Vec<String> {
        self.lock()
            .unknown
            .iter()
            .filter(|(_, at)| **at < before)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Whether `host` was asked for on demand (so it may be released).
    pub fn was_asked(&self, host: &str) -> bool {
        self.lock().asked.contains(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_request_waits_for_the_answer_and_the_host_is_asked_once() {
        let (demand, mut asks) = Demand::new(Duration::from_secs(30), DEFAULT_IDLE);
        let demand = Arc::new(demand);
        demand.set_connected(true);
        let known = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (demand, known) = (Arc::clone(&demand), Arc::clone(&known));
            tokio::spawn(async move {
                demand
                    .wait("Shop.Example:8080", || known.load(Ordering::Relaxed))
                    .await
            })
        };
        assert_eq!(asks.recv().await.as_deref(), Some("shop.example"));
        assert!(!waiter.is_finished());
        known.store(true, Ordering::Relaxed);
        demand.answered(&[], Instant::now());
        waiter.await.expect("waiter");
        // Asked already: a second request does not ask again.
        demand.wait("shop.example", || true).await;
        assert!(asks.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_unowned_host_is_answered_once_then_never_waits() {
        let (demand, mut asks) = Demand::new(Duration::from_secs(30), DEFAULT_IDLE);
        let demand = Arc::new(demand);
        demand.set_connected(true);
        let waiter = {
            let demand = Arc::clone(&demand);
            tokio::spawn(async move { demand.wait("nobody", || false).await })
        };
        assert_eq!(asks.recv().await.as_deref(), Some("nobody"));
        demand.answered(&["nobody".to_owned()], Instant::now());
        waiter.await.expect("waiter");
        demand.wait("nobody", || false).await;
        assert!(asks.try_recv().is_err());
        // Released: asked again next time.
        demand.release(&demand.unknown_since(Instant::now() + Duration::from_secs(1)));
        assert!(!demand.was_asked("nobody"));
    }

    #[tokio::test]
    async fn without_a_stream_nothing_waits_and_nothing_is_asked() {
        let (demand, mut asks) = Demand::new(Duration::from_secs(30), DEFAULT_IDLE);
        demand.wait("shop", || false).await;
        assert!(asks.try_recv().is_err());
    }
}
