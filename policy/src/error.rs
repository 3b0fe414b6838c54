//! Errors a policy author can act on: where (file, line, column, YAML path), what was
//! expected and what was found. One enum for the problem, one struct for the place.

use std::fmt;
use std::path::PathBuf;

/// What is wrong with a value, independent of where it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("must be at least {min}, got {got}")]
    TooSmall { min: String, got: String },
    #[error("must be at most {max}, got {got}")]
    TooLarge { max: String, got: String },
    #[error("must be between {min} and {max}, got {got}")]
    OutOfRange {
        min: String,
        max: String,
        got: String,
    },
    #[error("expected a duration with a unit (e.g. 250ms, 30s, 5m), got {got:?}")]
    BadDuration { got: String },
    #[error("expected host:port, got {got:?}")]
    BadAddress { got: String },
    #[error("expected `header:NAME` or `client-ip`, got {got:?}")]
    BadKey { got: String },
    #[error("expected {expected}, got {got:?}")]
    BadValue { expected: String, got: String },
    #[error("unknown field `{field}`{}", suggest(.suggestion, .expected))]
    UnknownField {
        field: String,
        suggestion: Option<String>,
        expected: Vec<String>,
    },
    #[error("unknown value {got:?}{}", suggest(.suggestion, .expected))]
    UnknownVariant {
        got: String,
        suggestion: Option<String>,
        expected: Vec<String>,
    },
    #[error("missing required field `{field}`")]
    MissingField { field: String },
    #[error("{0}")]
    WrongType(String),
    #[error("duplicate {what} {name:?}, first defined {first}")]
    Duplicate {
        what: &'static str,
        name: String,
        first: String,
    },
    #[error("host {host:?} is already governed by policy {policy:?}")]
    HostClaimed { host: String, policy: String },
    #[error("`hashOn` only applies to `algorithm: consistent-hash`")]
    HashOnWithoutConsistentHash,
    #[error("`algorithm: consistent-hash` needs `hashOn` (`header:NAME` or `client-ip`)")]
    ConsistentHashWithoutHashOn,
    #[error("all backend weights are 0: no backend could ever be picked")]
    AllWeightsZero,
    #[error("a backend needs an `address` (host:port) or a `service` (with its `port`)")]
    NoBackendTarget,
    #[error("a backend is either an `address` or a `service`, not both")]
    AddressAndService,
    #[error("a `service` backend needs `port`: the Service port, by number or by name")]
    ServiceWithoutPort,
    #[error("`port` only applies to a `service` backend (an `address` carries its own)")]
    PortWithoutService,
    #[error("a fallback needs a static response (`status`/`body`) or a `backend`")]
    EmptyFallback,
    #[error("a fallback is either a static response (`status`/`headers`/`body`) or a `backend`, not both")]
    AmbiguousFallback,
    #[error("a keyed rate limit needs `maxKeys`, the hard cap on tracked keys")]
    MaxKeysRequired,
    #[error("`maxKeys` only applies to a keyed rate limit (set `key`)")]
    MaxKeysWithoutKey,
    #[error("give either `path` (exact) or `pathPrefix`, not both")]
    PathAndPrefix,
    #[error("`grpc` sets the path (`/SERVICE/METHOD`): not with `path` or `pathPrefix`")]
    GrpcAndPath,
    #[error("give either `path` (an HTTP GET check) or `grpc` (a gRPC health check), not both")]
    PathAndGrpcCheck,
    #[error("needs `path` (an HTTP GET check) or `grpc: {{service}}` (a gRPC health check)")]
    NoHealthProbe,
    #[error("give either `max` (fixed) or `adaptive`, not both")]
    FixedAndAdaptive,
    #[error("needs `max` (fixed) or `adaptive: {{min, max}}`")]
    NoConcurrencyLimit,
    #[error("`min` ({min}) must not exceed `max` ({max})")]
    MinAboveMax { min: i64, max: i64 },
    #[error(
        "a circuit breaker needs a trigger: `consecutiveFailures`, `errorRatio` or `slowCall`"
    )]
    NoBreakerTrigger,
    #[error("must be greater than 0, got {got}")]
    NotPositive { got: f64 },
    #[error("must be strictly between 0 and 1 (e.g. 0.999), got {got}")]
    NotOpenRatio { got: f64 },
    #[error("must not be empty")]
    Empty,
    #[error("no route named {route:?} in this policy{}", suggest(.suggestion, &[]))]
    UnknownRoute {
        route: String,
        suggestion: Option<String>,
    },
    #[error("a rule needs `serviceAccounts` or `namespaces`: naming nobody, it would allow nobody (to allow every caller, write `default: allow`)")]
    NoCallers,
    #[error("{0}")]
    Invalid(String),
}

fn suggest(suggestion: &Option<String>, expected: &[String]) -> String {
    match suggestion {
        Some(s) => format!(", did you mean `{s}`?"),
        None if expected.is_empty() => String::new(),
        None => format!(
            ", expected one of {}",
            expected
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A problem at a YAML path, before it is placed in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// `spec.routes[0].rateLimit.burst`; empty for the document itself.
    pub path: String,
    pub problem: Problem,
    /// Point at the key rather than the value (unknown fields).
    pub at_key: bool,
}

impl Violation {
    pub fn new(path: impl Into<String>, problem: Problem) -> Self {
        Violation {
            path: path.into(),
            problem,
            at_key: false,
        }
    }
}

/// A problem placed in a file: `checkout.yaml:31:20: spec.routes[0].rateLimit.burst: must be at least 1, got 0`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub path: String,
    pub problem: Problem,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.problem)
    }
}

/// Everything wrong with a policy source; never empty.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// The closest candidate by edit distance, if close enough to be a typo.
pub fn did_you_mean<'a>(
    got: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let got_lower = got.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (edit_distance(&got_lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len().max(got.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}

/// Optimal-string-alignment distance: Levenshtein plus adjacent transpositions,
/// the most common typo (`brust`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses_only() {
        let fields = ["requestsPerSecond", "burst", "key", "maxKeys"];
        assert_eq!(did_you_mean("brust", fields), Some("burst".into()));
        assert_eq!(did_you_mean("maxkey", fields), Some("maxKeys".into()));
        assert_eq!(
            did_you_mean("requestPerSecond", fields),
            Some("requestsPerSecond".into())
        );
        assert_eq!(did_you_mean("colour", fields), None);
    }
}
