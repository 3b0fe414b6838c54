//! Every response the proxy writes itself, in one place: 404s, refusals (429,
//! 503), static fallbacks, and the explanations of failed requests (502, 504).

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use sluice_policy::{FallbackCause, GrpcCode};

use super::{ceil_secs, grpc, Exchange, Observe};

/// A response the proxy writes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub headers: Vec<(Cow<'static, str>, String)>,
    pub body: Bytes,
    /// The client connection closes after it: a request that failed may have left
    /// its body unread (complete answers — refusals, fallbacks — keep it open).
    pub close: bool,
    /// The status a gRPC call gets instead (see [`Reply::into_grpc`]).
    pub grpc: GrpcCode,
    /// Its `grpc-message`, when not the body's text.
    pub grpc_message: Option<String>,
}

/// Why a request could not be proxied, for its explanation.
#[derive(Debug, Clone, Copy)]
pub(super) enum Failure<'a> {
    /// No backend accepted a connection; the last error's name.
    Connect(&'a str),
    /// A decision of the flow, explained.
    Status(&'a str),
    /// The exchange broke; the error's name.
    Other(&'a str),
}

impl Reply {
    fn text(status: u16, headers: Vec<(Cow<'static, str>, String)>, body: String) -> Reply {
        Reply {
            status,
            content_type: Some("text/plain; charset=utf-8"),
            headers,
            body: Bytes::from(body),
            close: false,
            grpc: grpc::code_for_http(status),
            grpc_message: None,
        }
    }

    /// The same answer with another gRPC status.
    fn with_grpc(self, code: GrpcCode) -> Reply {
        Reply { grpc: code, ..self }
    }

    pub(super) fn not_ready() -> Reply {
        Reply::text(503, Vec::new(), "sluice: no policy loaded yet\n".into())
    }

    /// No policy claims the request: `inbound_policy` is the inbound listener's
    /// (not loaded), else `host` is what nobody governs.
    pub(super) fn no_policy(inbound_policy: Option<&str>, host: &str) -> Reply {
        let body = match inbound_policy {
            Some(name) => format!("sluice: the inbound policy {name:?} is not loaded\n"),
            None => format!("sluice: no policy governs host {host:?}\n"),
        };
        Reply::text(404, Vec::new(), body)
    }

    /// The control plane did not say in time which policy owns `host` (asked on
    /// demand): worth a retry, unlike a host no policy owns.
    pub(super) fn undiscovered(host: &str) -> Reply {
        let body = format!(
            "sluice: the control plane has not answered yet which policy governs host {host:?}; retry\n"
        );
        Reply::text(503, vec![("retry-after".into(), "1".into())], body)
    }

    pub(super) fn no_route(policy: &str, method: &str, path: &str) -> Reply {
        let body = format!("sluice: policy {policy:?} has no route for {method} {path}\n");
        Reply::text(404, Vec::new(), body)
    }

    /// A plaintext caller under `mtls.mode: strict`.
    pub(super) fn mtls_required(policy: &str) -> Reply {
        let body = format!("sluice: mTLS required by policy {policy:?}\n");
        Reply::text(403, Vec::new(), body).with_grpc(GrpcCode::PermissionDenied)
    }

    /// A caller no rule of the policy's authorization allows (rules only allow, so
    /// a denial is always the default's).
    pub(super) fn unauthorized(policy: &str) -> Reply {
        let body = format!("sluice: denied by authorization of policy {policy:?} (default deny)\n");
        Reply::text(403, Vec::new(), body).with_grpc(GrpcCode::PermissionDenied)
    }

    pub(super) fn rate_limited(
        policy: &str,
        route: &str,
        retry_after: Duration,
        limit: u32,
    ) -> Reply {
        let secs = ceil_secs(retry_after).max(1).to_string();
        let body = format!(
            "sluice: rate limit of route {route:?} (policy {policy:?}) exceeded; retry in {secs}s\n"
        );
        let headers = vec![
            ("retry-after".into(), secs.clone()),
            ("ratelimit-limit".into(), limit.to_string()),
            ("ratelimit-remaining".into(), "0".to_owned()),
            ("ratelimit-reset".into(), secs),
        ];
        Reply::text(429, headers, body).with_grpc(GrpcCode::ResourceExhausted)
    }

    pub(super) fn breaker_open(policy: &str, route: &str, retry_in: Duration) -> Reply {
        let secs = ceil_secs(retry_in).max(1).to_string();
        let body = format!(
            "sluice: circuit breaker of route {route:?} (policy {policy:?}) is open; retry in {secs}s\n"
        );
        Reply::text(503, vec![("retry-after".into(), secs)], body).with_grpc(GrpcCode::Unavailable)
    }

    pub(super) fn overloaded(policy: &str, route: &str, limit: u32) -> Reply {
        let body = format!(
            "sluice: route {route:?} (policy {policy:?}) is overloaded ({limit} requests in flight); retry later\n"
        );
        Reply::text(503, vec![("retry-after".into(), "1".to_owned())], body)
            .with_grpc(GrpcCode::ResourceExhausted)
    }

    /// A route's static fallback, marked with the cause it answers; gRPC calls get
    /// `grpc` (the fallback's own status and message, else the cause's code).
    pub(super) fn fallback(
        status: u16,
        headers: &[(String, String)],
        body: &str,
        cause: FallbackCause,
        grpc: (Option<GrpcCode>, Option<&str>),
    ) -> Reply {
        let code = grpc.0.unwrap_or(match cause {
            FallbackCause::RateLimited | FallbackCause::Overloaded => GrpcCode::ResourceExhausted,
            FallbackCause::BreakerOpen | FallbackCause::UpstreamError => GrpcCode::Unavailable,
        });
        let content_type = (!headers.iter().any(|(k, _)| k == "content-type"))
            .then_some("text/plain; charset=utf-8");
        Reply {
            status,
            content_type,
            headers: headers
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), v.clone()))
                .chain([("x-sluice-fallback".into(), cause.as_str().to_owned())])
                .collect(),
            body: Bytes::from(body.to_owned()),
            close: false,
            grpc: code,
            grpc_message: grpc.1.map(str::to_owned),
        }
    }
}

impl<O: Observe> Exchange<O> {
    /// The explanation of a request that could not be proxied, with `status`.
    pub(super) fn failure_reply(&self, status: u16, failure: Failure<'_>) -> Reply {
        let what = match failure {
            _ if status == 504 => {
                "sluice: the backend did not answer within the route's timeout".to_owned()
            }
            _ if status == 400 => "sluice: malformed request".to_owned(),
            Failure::Connect(error) => {
                let name = self.policy().map_or("?", |p| p.name.as_str());
                format!(
                    "sluice: no backend of policy {name:?} accepted a connection ({} tried, last {}: {error})",
                    self.tried.len(),
                    self.backend_label().unwrap_or("the fallback backend"),
                )
            }
            Failure::Status(context) => format!("sluice: {context}"),
            Failure::Other(error) => format!(
                "sluice: backend {} failed: {error}",
                self.backend_label().unwrap_or("?"),
            ),
        };
        let reply = Reply::text(status, Vec::new(), format!("{what}\n"));
        Reply {
            close: true,
            grpc: match status {
                504 => GrpcCode::DeadlineExceeded,
                _ => reply.grpc,
            },
            ..reply
        }
    }
}
