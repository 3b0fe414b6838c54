//! What governance decided for a request: the access log's `decision` and the
//! `decision` label of `sluice_requests_total`. A leaf: the snapshot sizes its
//! per-route counter caches by [`Verdict::COUNT`], the request flow sets it.

/// What governance decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    RateLimited,
    BreakerOpen,
    Shed,
    Fallback,
    NoPolicy,
    NoRoute,
    NotReady,
    /// Transparent outbound traffic no policy claims, forwarded untouched.
    Passthrough,
    /// Refused by an inbound policy's mTLS mode or authorization (403).
    Unauthorized,
}

impl Verdict {
    /// How many verdicts there are (for per-route counter caches).
    pub const COUNT: usize = 10;

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::RateLimited => "rate_limited",
            Verdict::BreakerOpen => "breaker_open",
            Verdict::Shed => "shed",
            Verdict::Fallback => "fallback",
            Verdict::NoPolicy => "no_policy",
            Verdict::NoRoute => "no_route",
            Verdict::NotReady => "not_ready",
            Verdict::Passthrough => "passthrough",
            Verdict::Unauthorized => "unauthorized",
        }
    }
}
