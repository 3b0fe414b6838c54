//! What a policy-directory watcher needs whatever the watching library: which
//! directory entries are policy files, and a debounce that lets a burst of changes
//! (an editor's save, a ConfigMap's symlink swap) settle into one reload.

use std::ffi::OsStr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Whether a change to the entry `name` can change the policy: a `*.yaml`/`*.yml`
/// (or exactly `only`, when watching a single file), or a Kubernetes ConfigMap
/// mount's `..`-prefixed entries, whose swap is how a ConfigMap update arrives.
pub fn is_policy_entry(name: &OsStr, only: Option<&OsStr>) -> bool {
    let text = name.to_string_lossy();
    text.starts_with("..")
        || match only {
            Some(file) => name == file,
            None => text.ends_with(".yaml") || text.ends_with(".yml"),
        }
}

/// After a relevant event: waits until `quiet` passes without another *relevant*
/// event (unrelated events, such as a log file written in the same directory, do
/// not extend the wait), but no longer than `max` in all. Returns false when the
/// channel is closed.
pub fn settle<T>(
    rx: &Receiver<T>,
    relevant: impl Fn(&T) -> bool,
    quiet: Duration,
    max: Duration,
) -> bool {
    let started = Instant::now();
    let mut quiet_until = started + quiet;
    loop {
        let deadline = quiet_until.min(started + max);
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(event) if relevant(&event) => quiet_until = Instant::now() + quiet,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn recognises_policy_files_and_configmap_entries() {
        assert!(is_policy_entry(OsStr::new("a.yaml"), None));
        assert!(is_policy_entry(OsStr::new("..data"), None));
        assert!(!is_policy_entry(OsStr::new("access.log"), None));
        assert!(is_policy_entry(
            OsStr::new("p.yaml"),
            Some(OsStr::new("p.yaml"))
        ));
        assert!(!is_policy_entry(
            OsStr::new("q.yaml"),
            Some(OsStr::new("p.yaml"))
        ));
    }

    #[test]
    fn unrelated_events_do_not_extend_the_wait() {
        let (tx, rx) = channel();
        let sender = std::thread::spawn(move || {
            // Unrelated events every 10 ms until the receiver is gone (at most 60 s,
            // so a broken `settle` fails the test instead of hanging it).
            for _ in 0..6000 {
                if tx.send(false).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        // `settle` returns false once the sender stops and the channel closes: true
        // means it ended its wait while unrelated events were still arriving.
        assert!(
            settle(
                &rx,
                |e: &bool| *e,
                Duration::from_millis(50),
                Duration::from_secs(600)
            ),
            "the wait lasted as long as the unrelated events"
        );
        drop(rx);
        let _ = sender.join();
    }

    #[test]
    fn a_closed_channel_ends_the_wait() {
        let (tx, rx) = channel::<bool>();
        drop(tx);
        assert!(!settle(
            &rx,
            |e| *e,
            Duration::from_millis(50),
            Duration::from_secs(5)
        ));
    }
}
