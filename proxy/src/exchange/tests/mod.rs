//! The request flow on a fake clock, with no sockets: each test builds a snapshot
//! from policy YAML, feeds an exchange the events an engine would, and checks the
//! actions, the record it settles with, and what it held (breaker admissions,
//! concurrency slots, open attempts) going back.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_policy::{FallbackCause, Mode};

use super::*;

mod admission;
mod attempts;
mod authz;
mod backends;
mod grpc;
mod tracing;
use crate::breaker::Transition;
use crate::globallimit::GlobalLimits;
use crate::trace::{IdGenerator, Sampler};

/// What an exchange told its observer, in order.
#[derive(Default)]
struct Recorder {
    notes: Mutex<Vec<String>>,
    finished: Mutex<Vec<Settled>>,
    inflight: crate::shard::InFlight,
    ids: crate::trace::IdGenerator,
    /// Tracing on (spans recorded) with this sampler.
    sampler: Option<crate::trace::Sampler>,
}

/// A settled request, owned.
#[derive(Debug, Clone, PartialEq)]
struct Settled {
    route: Option<String>,
    status: u16,
    verdict: Verdict,
    shadow: Option<Verdict>,
    fallback: Option<FallbackCause>,
    backend: Option<String>,
    attempts: u32,
    elapsed: Duration,
    class_status: u16,
    grpc_status: Option<u32>,
    /// The spans exported for it (tracing on and sampled), none otherwise.
    spans: Vec<crate::trace::SpanData>,
    trace_id: String,
}

impl Recorder {
    fn note(&self, note: String) {
        self.notes.lock().unwrap().push(note);
    }

    fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap().clone()
    }

    fn settled(&self) -> Vec<Settled> {
        self.finished.lock().unwrap().clone()
    }
}

impl Observe for Arc<Recorder> {
    fn begin(&self) -> crate::shard::Ticket {
        self.inflight.enter()
    }
    fn end(&self, ticket: crate::shard::Ticket) {
        self.inflight.leave(ticket);
    }
    fn ids(&self) -> &IdGenerator {
        &self.ids
    }
    fn sampler(&self) -> Option<Sampler> {
        self.sampler
    }
    fn rate_limited(&self, route: &RouteRuntime) {
        self.note(format!(
            "rate_limited {} {}",
            route.name,
            route.mode.as_str()
        ));
    }
    fn unauthorized(&self, route: &RouteRuntime) {
        self.note(format!(
            "unauthorized {} {}",
            route.name,
            route.mode.as_str()
        ));
    }
    fn breaker_rejected(&self, route: &RouteRuntime) {
        self.note(format!("breaker_rejected {}", route.name));
    }
    fn breaker_changed(&self, route: &RouteRuntime, t: Transition) {
        self.note(format!("breaker {} {}", route.name, t.to.as_str()));
    }
    fn shed(&self, route: &RouteRuntime, class: &str) {
        self.note(format!("shed {} {class}", route.name));
    }
    fn fallback(&self, route: &RouteRuntime, cause: FallbackCause, mode: Mode) {
        self.note(format!(
            "fallback {} {} {}",
            route.name,
            cause.as_str(),
            mode.as_str()
        ));
    }
    fn retry(&self, route: &RouteRuntime, granted: bool) {
        self.note(format!("retry {} {granted}", route.name));
    }
    fn upstream(&self, _: &PolicyRuntime, endpoints: &Endpoints, backend: usize, outcome: Outcome) {
        let label = observe_label(endpoints, backend);
        self.note(format!("upstream {label} {}", outcome.as_str()));
    }
    fn ejected(&self, _: &PolicyRuntime, endpoints: &Endpoints, backend: usize) {
        self.note(format!("ejected {}", observe_label(endpoints, backend)));
    }
    fn passthrough(&self, direction: Direction) {
        self.note(format!("passthrough {}", direction.as_str()));
    }
    fn finished<R: Request + ?Sized>(&self, r: &Record<'_, R>) {
        self.finished.lock().unwrap().push(Settled {
            route: r.route.map(|r| r.name.clone()),
            status: r.status,
            verdict: r.verdict,
            shadow: r.shadow,
            fallback: r.fallback,
            backend: r.backend.map(str::to_owned),
            attempts: r.attempts,
            elapsed: r.elapsed,
            class_status: r.class_status,
            grpc_status: r.grpc_status,
            spans: r.trace.map(|t| observe::spans(r, t)).unwrap_or_default(),
            trace_id: r.trace_id.to_owned(),
        });
    }
}

fn observe_label(endpoints: &Endpoints, backend: usize) -> String {
    match backend {
        APP => "app".into(),
        i => endpoints.targets[i].label.clone(),
    }
}

/// A request as an engine would parse it.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    /// The caller's identity, as an engine would give it for an mTLS connection.
    peer: Option<crate::identity::PeerIdentity>,
}

impl Req {
    fn get(path: &'static str) -> Req {
        Req {
            method: "GET",
            host: "svc",
            path,
            headers: Vec::new(),
            peer: None,
        }
    }

    fn post(path: &'static str) -> Req {
        Req {
            method: "POST",
            ..Req::get(path)
        }
    }
}

impl Request for Req {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn host(&self) -> &str {
        self.host
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
    }
    fn client_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, 1]))
    }
    fn body_truncated(&self) -> bool {
        false
    }
    fn peer_identity(&self) -> Option<&crate::identity::PeerIdentity> {
        self.peer.as_ref()
    }
}

/// A snapshot of one policy for host `svc` with `backends` (IP literals: no DNS)
/// and `routes` (YAML list items, indented by six).
fn runtime(extra_spec: &str, routes: &str) -> Arc<Runtime> {
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: p\nspec:\n  hosts: [svc]\n  backends:\n    - address: 127.0.0.1:1001\n    - address: 127.0.0.1:1002\n    - address: 127.0.0.1:1003\n{extra_spec}  routes:\n{routes}"
    );
    let set = sluice_policy::load::parse_str(Path::new("test.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let globals = GlobalLimits::new(false);
    Arc::new(Runtime::build(set, "test".into(), None, &globals).unwrap())
}

fn outbound() -> Side {
    Side {
        direction: Direction::Outbound,
        inbound_policy: None,
        inbound_app: None,
        own_ports: Vec::new(),
        mtls_default: MtlsMode::Permissive,
    }
}

struct Harness {
    rec: Arc<Recorder>,
    rt: Arc<Runtime>,
    side: Side,
    t0: Instant,
}

impl Harness {
    fn new(rt: Arc<Runtime>) -> Harness {
        Harness {
            rec: Arc::new(Recorder::default()),
            rt,
            side: outbound(),
            t0: Instant::now(),
        }
    }

    /// With tracing on, traces started here sampled at `ratio`.
    fn traced(rt: Arc<Runtime>, ratio: f64) -> Harness {
        Harness {
            rec: Arc::new(Recorder {
                sampler: Some(crate::trace::Sampler::new(ratio)),
                ..Recorder::default()
            }),
            ..Harness::new(rt)
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// A new exchange at `ms` and its first action.
    fn arrive(&self, req: &Req, ms: u64) -> (Exchange<Arc<Recorder>>, Action) {
        let mut ex = Exchange::new(Arc::clone(&self.rec), self.at(ms));
        let event = Event::Arrived {
            runtime: Handle::new(Arc::clone(&self.rt)),
            side: &self.side,
            original_dst: None,
            h2c: true,
            undiscovered: false,
        };
        let action = ex.on(req, self.at(ms), event);
        (ex, action)
    }

    /// One whole request: arrives, every attempt answered by `outcome(n)`, then
    /// finished. The settled record.
    fn request(
        &self,
        req: &Req,
        ms: u64,
        mut outcome: impl FnMut(usize) -> Event<'static>,
    ) -> Settled {
        let (mut ex, mut action) = self.arrive(req, ms);
        let mut n = 0;
        let status = loop {
            match action {
                Action::Connect(_) => {
                    action = ex.on(req, self.at(ms + 1), outcome(n));
                    n += 1;
                    assert!(n <= MAX_ATTEMPTS + 1, "unbounded attempts");
                }
                Action::Relay => break 200,
                Action::Answer(reply) => break reply.status,
                other => panic!("unexpected {other:?}"),
            }
        };
        let status = match (&ex.upstream_status, status) {
            (Some(s), 200) => *s,
            (_, s) => s,
        };
        ex.on(
            req,
            self.at(ms + 2),
            Event::Finished {
                status,
                failed: false,
                grpc_status: None,
            },
        );
        drop(ex);
        self.rec.settled().pop().expect("settled")
    }
}

fn ok(_: usize) -> Event<'static> {
    Event::Response {
        status: 200,
        grpc_status: None,
    }
}

fn status(s: u16) -> impl FnMut(usize) -> Event<'static> {
    move |_| Event::Response {
        status: s,
        grpc_status: None,
    }
}

fn refused(_: usize) -> Event<'static> {
    Event::ConnectFailed {
        error: "ConnectRefused",
    }
}

fn reset(_: usize) -> Event<'static> {
    Event::Broken {
        timed_out: false,
        stale: false,
        responding: false,
        error: "ConnectionClosed",
    }
}

fn timed_out(_: usize) -> Event<'static> {
    Event::Broken {
        timed_out: true,
        stale: false,
        responding: false,
        error: "ReadTimedout",
    }
}
