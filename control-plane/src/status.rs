//! Status on the TrafficPolicy resources, as Gateway API does it: each object gets an
//! `Accepted` condition (`True` or `False`, a reason, a message naming what is wrong
//! and where) through the status subresource, so `kubectl get trafficpolicy -A` shows
//! which policy is refused and why, without reading the control plane's logs.
//!
//! Two halves. Pure functions decide what to write: [`needs_write`] and
//! [`status_patch`]. [`StatusWriter`] is a background task that writes what they
//! decide: the policy source computes every object's [`PolicyCondition`] and
//! [`StatusWriter::publish`]es the whole set, never waiting on the API server (a slow
//! or refusing API server must not hold up serving policy).
//!
//! Invariants:
//! - Idempotent: an object whose status already says what would be written is not
//!   written. Replicas computing the same result converge without writing back and
//!   forth, and a status write (itself a watch event, hence a new published set) does
//!   not loop.
//! - A status about a newer generation than the desired condition's is left alone:
//!   whoever wrote it has seen a spec this replica has not yet.
//! - `lastTransitionTime` changes only when the condition's status flips between
//!   `True` and `False` (the Kubernetes condition convention); a new reason, message or
//!   generation keeps it.
//! - Bounded: a message of at most [`MAX_MESSAGE_BYTES`], at most
//!   [`MAX_CONCURRENT_WRITES`] requests in flight, [`ATTEMPTS`] tries per write per
//!   pass, a retry pass at most every [`MAX_RETRY_DELAY`], and one remembered write
//!   per published object.

use std::fmt::Write as _;

use serde_json::{json, Value};

mod writer;

pub use writer::{
    DesiredSet, StatusWriter, ATTEMPTS, FIELD_MANAGER, FIRST_RETRY_DELAY, MAX_CONCURRENT_WRITES,
    MAX_RETRY_DELAY,
};

/// The condition's type: the one condition the control plane writes.
pub const CONDITION_TYPE: &str = "Accepted";
/// Reason of an accepted policy.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason of a policy refused for its own content (the message lists the errors).
pub const REASON_INVALID: &str = "Invalid";
/// Reason of a policy refused because another policy claims one of its hosts.
pub const REASON_HOST_CONFLICT: &str = "HostConflict";
/// The longest message written. Kubernetes allows 32 KiB, but a status is read in a
/// terminal and stored in etcd on every change; the first errors say what to fix.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Specs that validated kept in `status.accepted` (newest first).
pub const ACCEPTED_KEPT: usize = 3;

/// One spec that validated, as `status.accepted` keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedSpec {
    pub generation: i64,
    /// The policy's version (content hash of its canonical YAML).
    pub version: String,
    pub spec: Value,
}

impl AcceptedSpec {
    fn to_json(&self) -> Value {
        json!({"generation": self.generation, "version": self.version, "spec": self.spec})
    }

    /// The `status.accepted` list of an object's status, as written.
    pub fn list_of(status: Option<&Value>) -> Vec<AcceptedSpec> {
        status
            .and_then(|s| s.get("accepted"))
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| {
                        Some(AcceptedSpec {
                            generation: i.get("generation")?.as_i64()?,
                            version: text(i, "version")?.to_owned(),
                            spec: i.get("spec")?.clone(),
                        })
                    })
                    .take(ACCEPTED_KEPT)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `list` with `newest` in front (once), at most [`ACCEPTED_KEPT`]: a function
    /// of the object alone, so every replica computes the same list.
    pub fn push(newest: AcceptedSpec, list: &[AcceptedSpec]) -> Vec<AcceptedSpec> {
        std::iter::once(newest.clone())
            .chain(list.iter().filter(|a| a.version != newest.version).cloned())
            .take(ACCEPTED_KEPT)
            .collect()
    }
}

/// What one TrafficPolicy object's `Accepted` condition should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCondition {
    pub namespace: String,
    pub name: String,
    /// The object's `metadata.generation` the condition is about.
    pub generation: i64,
    pub accepted: bool,
    /// CamelCase, as the API server's condition schema requires: [`REASON_ACCEPTED`],
    /// [`REASON_INVALID`], [`REASON_HOST_CONFLICT`].
    pub reason: String,
    /// For humans; one error a line (see [`bounded_message`]).
    pub message: String,
    /// `status.accepted`: the last specs that validated, newest first.
    pub accepted_specs: Vec<AcceptedSpec>,
}

fn status_word(accepted: bool) -> &'static str {
    if accepted {
        "True"
    } else {
        "False"
    }
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// The `Accepted` condition of a status, if it has one.
fn accepted_condition(status: Option<&Value>) -> Option<&Value> {
    status?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| text(c, "type") == Some(CONDITION_TYPE))
}

/// `message` within [`MAX_MESSAGE_BYTES`]: as many whole errors (lines) as fit, then
/// how many were left out. An error longer than the bound on its own is cut at a
/// character boundary and ends with `…`.
pub fn bounded_message(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_owned();
    }
    // Room for "…" and "\n(N more errors not shown)" with N up to u64::MAX.
    const NOTE_ROOM: usize = 64;
    let budget = MAX_MESSAGE_BYTES - NOTE_ROOM;
    // `split`, not `lines`: an empty last error is still one (`lines` drops it).
    let lines: Vec<&str> = message.split('\n').collect();
    let mut out = String::with_capacity(MAX_MESSAGE_BYTES);
    let mut shown = 0;
    for line in &lines {
        let separator = usize::from(shown > 0);
        if out.len() + separator + line.len() > budget {
            break;
        }
        if shown > 0 {
            out.push('\n');
        }
        out.push_str(line);
        shown += 1;
    }
    if shown == 0 {
        let first = lines.first().copied().unwrap_or(message);
        let mut cut = budget.min(first.len());
        while !first.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push_str(&first[..cut]);
        out.push('…');
        shown = 1;
    }
    let left_out = lines.len().saturating_sub(shown);
    if left_out > 0 {
        let plural = if left_out == 1 { "error" } else { "errors" };
        // Writing to a String cannot fail.
        let _ = write!(out, "\n({left_out} more {plural} not shown)");
    }
    out
}

/// Whether the object's status (`existing_status`, its `status` field as last seen)
/// must be written to say `desired`: false when it already says the same status,
/// reason, message and generation, or when it is about a newer generation.
pub fn needs_write(existing_status: Option<&Value>, desired: &PolicyCondition) -> bool {
    let observed = existing_status
        .and_then(|s| s.get("observedGeneration"))
        .and_then(Value::as_i64);
    let condition = accepted_condition(existing_status);
    let condition_observed = condition
        .and_then(|c| c.get("observedGeneration"))
        .and_then(Value::as_i64);
    if observed.max(condition_observed) > Some(desired.generation) {
        return false;
    }
    let Some(condition) = condition else {
        return true;
    };
    let same = observed == Some(desired.generation)
        && condition_observed == Some(desired.generation)
        && text(condition, "status") == Some(status_word(desired.accepted))
        && text(condition, "reason") == Some(desired.reason.as_str())
        && text(condition, "message") == Some(bounded_message(&desired.message).as_str())
        && text(condition, "lastTransitionTime").is_some()
        && AcceptedSpec::list_of(existing_status) == desired.accepted_specs;
    !same
}

/// The JSON merge patch that makes `existing_status` say `desired`, `now` being the
/// time (RFC 3339, seconds) to give `lastTransitionTime` if the status flips. A merge
/// patch replaces a list whole, so other conditions are carried over as they were.
pub fn status_patch(
    existing_status: Option<&Value>,
    desired: &PolicyCondition,
    now: &str,
) -> Value {
    let status = status_word(desired.accepted);
    let since = accepted_condition(existing_status)
        .filter(|c| text(c, "status") == Some(status))
        .and_then(|c| text(c, "lastTransitionTime"))
        .unwrap_or(now);
    let condition = json!({
        "type": CONDITION_TYPE,
        "status": status,
        "reason": desired.reason,
        "message": bounded_message(&desired.message),
        "observedGeneration": desired.generation,
        "lastTransitionTime": since,
    });
    let mut conditions: Vec<Value> = existing_status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match conditions
        .iter_mut()
        .find(|c| text(c, "type") == Some(CONDITION_TYPE))
    {
        Some(slot) => *slot = condition,
        None => conditions.push(condition),
    }
    let accepted: Vec<Value> = desired
        .accepted_specs
        .iter()
        .map(AcceptedSpec::to_json)
        .collect();
    json!({"status": {
        "observedGeneration": desired.generation,
        "conditions": conditions,
        "accepted": accepted,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(accepted: bool, reason: &str, message: &str, generation: i64) -> PolicyCondition {
        PolicyCondition {
            namespace: "shop".into(),
            name: "api".into(),
            generation,
            accepted,
            reason: reason.into(),
            message: message.into(),
            accepted_specs: Vec::new(),
        }
    }

    const T0: &str = "2025-01-01T00:00:00Z";
    const T1: &str = "2025-01-02T00:00:00Z";

    fn written(c: &PolicyCondition, now: &str) -> Value {
        status_patch(None, c, now)["status"].clone()
    }

    #[test]
    fn the_accepted_specs_are_part_of_the_status_and_keep_the_newest_three() {
        let spec = |n: i64| AcceptedSpec {
            generation: n,
            version: format!("v{n}"),
            spec: json!({"hosts": [format!("h{n}")]}),
        };
        let mut c = condition(true, REASON_ACCEPTED, "", 1);
        c.accepted_specs = vec![spec(1)];
        let written = status_patch(None, &c, T0);
        assert!(!needs_write(Some(&written["status"]), &c));
        assert_eq!(AcceptedSpec::list_of(Some(&written["status"])), [spec(1)]);
        c.accepted_specs = AcceptedSpec::push(spec(2), &c.accepted_specs);
        assert!(needs_write(Some(&written["status"]), &c));
        // Newest first, each version once, at most ACCEPTED_KEPT.
        let mut list = Vec::new();
        for n in [1, 2, 3, 2, 4] {
            list = AcceptedSpec::push(spec(n), &list);
        }
        let versions: Vec<&str> = list.iter().map(|a| a.version.as_str()).collect();
        assert_eq!(versions, ["v4", "v2", "v3"]);
    }

    #[test]
    fn writes_an_object_without_status() {
        let c = condition(true, REASON_ACCEPTED, "", 1);
        assert!(needs_write(None, &c));
        assert!(needs_write(Some(&json!({})), &c));
        assert_eq!(
            status_patch(None, &c, T0),
            json!({"status": {"observedGeneration": 1, "conditions": [{
                "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                "observedGeneration": 1, "lastTransitionTime": T0,
            }], "accepted": []}})
        );
    }

    #[test]
    fn does_not_write_a_status_that_already_says_the_same() {
        let c = condition(false, REASON_INVALID, "kubernetes:shop/api:3:7: bad", 2);
        let status = written(&c, T0);
        assert!(!needs_write(Some(&status), &c));
    }

    #[test]
    fn writes_when_reason_message_status_or_generation_differ() {
        let c = condition(false, REASON_INVALID, "bad", 2);
        let status = written(&c, T0);
        for other in [
            condition(false, REASON_HOST_CONFLICT, "bad", 2),
            condition(false, REASON_INVALID, "worse", 2),
            condition(true, REASON_ACCEPTED, "", 2),
            condition(false, REASON_INVALID, "bad", 3),
        ] {
            assert!(needs_write(Some(&status), &other), "{other:?}");
        }
    }

    #[test]
    fn leaves_a_status_about_a_newer_generation_alone() {
        let newer = written(&condition(true, REASON_ACCEPTED, "", 5), T0);
        assert!(!needs_write(
            Some(&newer),
            &condition(false, REASON_INVALID, "bad", 4)
        ));
    }

    #[test]
    fn keeps_the_transition_time_while_the_status_stays() {
        let before = written(&condition(false, REASON_INVALID, "bad", 1), T0);
        let patch = status_patch(
            Some(&before),
            &condition(false, REASON_HOST_CONFLICT, "taken", 2),
            T1,
        );
        let c = &patch["status"]["conditions"][0];
        assert_eq!(c["lastTransitionTime"], T0);
        assert_eq!(
            (c["reason"].as_str(), c["message"].as_str()),
            (Some("HostConflict"), Some("taken"))
        );
        assert_eq!(patch["status"]["observedGeneration"], 2);
    }

    #[test]
    fn changes_the_transition_time_when_the_status_flips() {
        let before = written(&condition(false, REASON_INVALID, "bad", 1), T0);
        let patch = status_patch(Some(&before), &condition(true, REASON_ACCEPTED, "", 2), T1);
        assert_eq!(patch["status"]["conditions"][0]["lastTransitionTime"], T1);
        assert_eq!(patch["status"]["conditions"][0]["status"], "True");
    }

    #[test]
    fn keeps_other_writers_conditions() {
        let before = json!({"conditions": [
            {"type": "Programmed", "status": "True", "reason": "Done", "message": "",
             "lastTransitionTime": T0},
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
             "observedGeneration": 1, "lastTransitionTime": T0},
        ]});
        let patch = status_patch(
            Some(&before),
            &condition(false, REASON_INVALID, "bad", 2),
            T1,
        );
        let conditions = patch["status"]["conditions"].as_array().expect("list");
        assert_eq!(conditions.len(), 2);
        assert_eq!(conditions[0], before["conditions"][0]);
        assert_eq!(conditions[1]["status"], "False");
    }

    #[test]
    fn a_short_message_is_kept_whole() {
        let message = "kubernetes:shop/api:12:7: spec.routes[0].timeout: expected a duration";
        assert_eq!(bounded_message(message), message);
    }

    #[test]
    fn a_long_message_keeps_whole_errors_and_counts_the_rest() {
        let errors: Vec<String> = (0..200)
            .map(|i| format!("kubernetes:shop/api:{i}:7: spec.routes[{i}].timeout: expected a duration, got \"soon\""))
            .collect();
        let bounded = bounded_message(&errors.join("\n"));
        assert!(bounded.len() <= MAX_MESSAGE_BYTES, "{}", bounded.len());
        let lines: Vec<&str> = bounded.lines().collect();
        let (note, shown) = lines.split_last().expect("lines");
        assert!(shown.iter().zip(&errors).all(|(s, e)| s == e));
        assert_eq!(
            *note,
            format!("({} more errors not shown)", 200 - shown.len())
        );
    }

    #[test]
    fn one_overlong_error_is_cut_at_a_character_boundary() {
        // Two-byte characters, so a cut at an arbitrary byte would split one.
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let bounded = bounded_message(&format!("{long}\nsecond"));
        assert!(bounded.len() <= MAX_MESSAGE_BYTES);
        assert!(bounded.starts_with("éé"));
        assert!(
            bounded.ends_with("…\n(1 more error not shown)"),
            "{}",
            &bounded[bounded.len() - 40..]
        );
    }

    #[test]
    fn a_bounded_message_written_is_not_written_again() {
        let c = condition(false, REASON_INVALID, &"x\n".repeat(MAX_MESSAGE_BYTES), 1);
        let status = written(&c, T0);
        assert!(!needs_write(Some(&status), &c));
    }

    proptest::proptest! {
        #[test]
        fn a_bounded_message_fits_and_starts_with_whole_errors(
            errors in proptest::collection::vec("[a-zé:. 0-9]{0,300}", 0..60),
        ) {
            let message = errors.join("\n");
            let bounded = bounded_message(&message);
            proptest::prop_assert!(bounded.len() <= MAX_MESSAGE_BYTES);
            if message.len() <= MAX_MESSAGE_BYTES {
                proptest::prop_assert_eq!(&bounded, &message);
            } else {
                // Every line but the note is an error, whole and in order (the first
                // may be cut only when it alone is over the bound, and these are not).
                let lines: Vec<&str> = bounded.split('\n').collect();
                let (note, shown) = lines.split_last().expect("a note");
                proptest::prop_assert!(shown.iter().zip(&errors).all(|(s, e)| s == e));
                let left_out = errors.len() - shown.len();
                let plural = if left_out == 1 { "error" } else { "errors" };
                proptest::prop_assert_eq!(*note, format!("({left_out} more {plural} not shown)"));
            }
        }
    }
}
