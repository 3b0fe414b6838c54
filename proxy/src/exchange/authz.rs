//! An inbound policy's first decision after routing: may this caller call this
//! route? Its mTLS mode (a plaintext caller under `strict` is refused), then its
//! authorization (see `crate::authz`). Outbound requests are never judged here:
//! the caller is the local app, and the policy speaks for the destination.
//!
//! A refusal is a 403 (gRPC: `PERMISSION_DENIED`), counted and logged as
//! `unauthorized`; in shadow mode it is only counted and logged
//! (`shadow_decision`), and the request goes on, as every mechanism's shadow does.

use sluice_policy::{Mode, MtlsMode};

use super::{Direction, Exchange, Observe, Reply, Request, Side};
use crate::authz::Decision;
use crate::runtime::{Routed, Runtime};
use crate::verdict::Verdict;

impl<O: Observe> Exchange<O> {
    /// The refusal of a routed inbound request, if any (`None`: it goes on).
    pub(super) fn authorize(
        &mut self,
        req: &(impl Request + ?Sized),
        side: &Side,
    ) -> Option<Reply> {
        if side.direction != Direction::Inbound {
            return None;
        }
        // Taken out and put back rather than cloned (see `govern`).
        let runtime = self.runtime.take()?;
        let refusal = self.authorize_in(req, side, &runtime);
        self.runtime = Some(runtime);
        refusal
    }

    fn authorize_in(
        &mut self,
        req: &(impl Request + ?Sized),
        side: &Side,
        runtime: &Runtime,
    ) -> Option<Reply> {
        let caller = req
            .peer_identity()
            .map(|peer| (peer.namespace(), peer.service_account()));
        let (policy, route) = match self.routed {
            Routed::Route { policy, route } => (policy, route),
            // No route, or no policy (the app is reached ungoverned): nothing to
            // authorize against, but a plaintext caller under `strict` learns
            // nothing and reaches nothing (not even which paths are routed).
            Routed::NoRoute { policy } => {
                let policy = runtime.policies.get(policy)?;
                let strict = policy.access.mode(side.mtls_default) == MtlsMode::Strict;
                return (caller.is_none() && strict && policy.mode != Mode::Shadow).then(|| {
                    self.verdict = Verdict::Unauthorized;
                    Reply::mtls_required(&policy.name)
                });
            }
            Routed::NoPolicy => {
                let strict = side.mtls_default == MtlsMode::Strict;
                return (caller.is_none() && strict).then(|| {
                    self.verdict = Verdict::Unauthorized;
                    Reply::mtls_required(side.inbound_policy.as_deref().unwrap_or(""))
                });
            }
        };
        // Fails closed: a snapshot without the policy or route it routed to
        // (not reached: routing and this read the same snapshot) refuses.
        let (Some(policy), Some(route_rt)) = (
            runtime.policies.get(policy),
            runtime
                .policies
                .get(policy)
                .and_then(|p| p.routes.get(route)),
        ) else {
            self.verdict = Verdict::Unauthorized;
            return Some(Reply::unauthorized(""));
        };
        let decision = policy.access.decide(side.mtls_default, caller, route);
        if decision == Decision::Allowed {
            return None;
        }
        self.obs.unauthorized(route_rt);
        if route_rt.mode == Mode::Shadow {
            self.shadow.get_or_insert(Verdict::Unauthorized);
            return None;
        }
        self.verdict = Verdict::Unauthorized;
        Some(match decision {
            Decision::MtlsRequired => Reply::mtls_required(&policy.name),
            Decision::Denied | Decision::Allowed => Reply::unauthorized(&policy.name),
        })
    }
}
