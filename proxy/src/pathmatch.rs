//! A route's path condition compiled for the request path.
//!
//! Why: routes are tried in order and most of them fail on the path. Comparing each
//! prefix with `starts_with` costs a `memcmp` call per route; here the first 8 bytes
//! of the request path are loaded into a word once per request ([`head`]) and each
//! route first compares them with its own under a mask: one AND and one compare,
//! which settles prefixes of up to 8 bytes outright and rejects almost every
//! non-matching longer one without touching memory again.

use sluice_policy::PathMatch;

/// The first (up to) 8 bytes of `bytes` as a little-endian word, zero-padded.
#[inline]
pub fn head(bytes: &[u8]) -> u64 {
    match bytes.first_chunk::<8>() {
        Some(word) => u64::from_le_bytes(*word),
        // Shorter than 8: a byte loop (a variable-length copy would call memcpy).
        None => bytes
            .iter()
            .enumerate()
            .fold(0, |acc, (i, b)| acc | (u64::from(*b) << (8 * i))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Any,
    Exact,
    Prefix,
}

/// `PathMatch` compiled: the text, its first 8 bytes as a word and the mask of the
/// bytes that count.
#[derive(Debug, Clone)]
pub struct PathMatcher {
    kind: Kind,
    head: u64,
    mask: u64,
    text: Box<[u8]>,
}

impl PathMatcher {
    pub fn new(path: &PathMatch) -> Self {
        let (kind, text) = match path {
            PathMatch::Any => (Kind::Any, ""),
            PathMatch::Exact(p) => (Kind::Exact, p.as_str()),
            PathMatch::Prefix(p) => (Kind::Prefix, p.as_str()),
        };
        let n = text.len().min(8);
        let mask = if n == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * n)) - 1
        };
        PathMatcher {
            kind,
            head: head(text.as_bytes()),
            mask,
            text: text.as_bytes().into(),
        }
    }

    /// Whether `path` satisfies the condition; `path_head` is `head(path)`.
    #[inline]
    pub fn matches(&self, path: &[u8], path_head: u64) -> bool {
        let n = self.text.len();
        let long_enough = match self.kind {
            Kind::Any => return true,
            Kind::Exact => path.len() == n,
            Kind::Prefix => path.len() >= n,
        };
        // With `path` at least `n` long, its head holds its first min(n, 8) bytes,
        // exactly the ones the mask keeps.
        long_enough
            && path_head & self.mask == self.head
            && (n <= 8 || path.get(8..n) == self.text.get(8..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: &PathMatch, path: &str) -> bool {
        match m {
            PathMatch::Any => true,
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        }
    }

    #[test]
    fn edges_around_eight_bytes() {
        let prefix = |p: &str| PathMatcher::new(&PathMatch::Prefix(p.into()));
        let exact = |p: &str| PathMatcher::new(&PathMatch::Exact(p.into()));
        let at = |m: &PathMatcher, path: &str| m.matches(path.as_bytes(), head(path.as_bytes()));
        assert!(at(&prefix("/api"), "/api/v1"));
        assert!(at(&prefix("/api"), "/api"));
        assert!(!at(&prefix("/api"), "/ap"));
        assert!(!at(&prefix("/api"), "/apx/v1"));
        assert!(at(&prefix("/1234567"), "/1234567/x"));
        assert!(at(&prefix("/12345678"), "/12345678"));
        assert!(!at(&prefix("/12345678"), "/1234567"));
        assert!(at(&prefix("/api/v1/items"), "/api/v1/items/9"));
        assert!(!at(&prefix("/api/v1/items"), "/api/v1/itemz/9"));
        assert!(!at(&prefix("/api/v1/items"), "/api/v1/item"));
        assert!(at(&exact("/health"), "/health"));
        assert!(!at(&exact("/health"), "/health/"));
        assert!(!at(&exact("/api/v1/items"), "/api/v1/items/"));
        assert!(at(&exact("/api/v1/items"), "/api/v1/items"));
        assert!(at(&PathMatcher::new(&PathMatch::Any), ""));
        // A path with a zero byte cannot be confused with the padding.
        assert!(!at(&exact("/a"), "/a\0"));
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_starts_with_and_equality(
            text in "[/a-c\\x00]{0,12}",
            path in "[/a-c\\x00]{0,14}",
            kind in 0u8..3,
        ) {
            let m = match kind {
                0 => PathMatch::Any,
                1 => PathMatch::Exact(text.clone()),
                _ => PathMatch::Prefix(text.clone()),
            };
            let compiled = PathMatcher::new(&m);
            proptest::prop_assert_eq!(
                compiled.matches(path.as_bytes(), head(path.as_bytes())),
                naive(&m, &path)
            );
        }

        #[test]
        fn a_path_extending_the_text_always_matches_its_prefix(
            text in "[/a-z]{0,12}",
            rest in "[/a-z]{0,6}",
        ) {
            let path = format!("{text}{rest}");
            let m = PathMatcher::new(&PathMatch::Prefix(text));
            proptest::prop_assert!(m.matches(path.as_bytes(), head(path.as_bytes())));
        }
    }
}
