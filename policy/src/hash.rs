//! The one content hash of the project: FNV-1a, 64 bit. The proxy reports it as
//! its policy version and the control plane as a snapshot's content hash, so the
//! two must agree byte for byte; keyed bucket names and Maglev's table use it too.
//! FNV because it is stable by definition (the same on every replica, build and
//! Rust version), which SipHash with random keys is not.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_more(OFFSET_BASIS, bytes)
}

/// FNV-1a of what `state` hashed so far followed by `bytes` (hashing in parts).
pub fn fnv1a64_more(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// The content hash of a text (canonical policy YAML), as 16 hex digits.
pub fn content_hash(text: &str) -> String {
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // From the FNV reference (draft-eastlake-fnv).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(content_hash("a"), "af63dc4c8601ec8c");
        assert_eq!(fnv1a64_more(fnv1a64(b"foo"), b"bar"), fnv1a64(b"foobar"));
    }
}
