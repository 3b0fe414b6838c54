//! Byte classes of the grammar (RFC 9110, 9112 and 3986), as 256-entry tables so a
//! check is one load per byte.

/// What a byte may be, by grammar rule.
#[derive(Clone, Copy)]
enum Class {
    /// `tchar` (RFC 9110 §5.6.2): the bytes of tokens, methods and field names.
    Token,
    /// `field-vchar` and the whitespace inside a field value (RFC 9110 §5.5):
    /// HTAB, SP, VCHAR and obs-text. Everything else (NUL, CR, LF, other controls,
    /// DEL) is never part of a value.
    FieldValue,
    /// The bytes of an origin-form target (RFC 9112 §3.2.1 over RFC 3986): `pchar`
    /// (unreserved, sub-delims, ":", "@", and "%" of pct-encoded) plus "/" and "?".
    Target,
    /// `reg-name` (RFC 3986 §3.2.2): unreserved, sub-delims and "%".
    RegName,
}

const fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const fn sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

const fn member(class: Class, b: u8) -> bool {
    match class {
        Class::Token => {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        }
        Class::FieldValue => b == b'\t' || (b >= 0x20 && b != 0x7f),
        Class::Target => {
            unreserved(b) || sub_delim(b) || matches!(b, b':' | b'@' | b'%' | b'/' | b'?')
        }
        Class::RegName => unreserved(b) || sub_delim(b) || b == b'%',
    }
}

const fn table(class: Class) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = member(class, i as u8);
        i += 1;
    }
    t
}

static TOKEN: [bool; 256] = table(Class::Token);
static FIELD_VALUE: [bool; 256] = table(Class::FieldValue);
static TARGET: [bool; 256] = table(Class::Target);
static REG_NAME: [bool; 256] = table(Class::RegName);

/// A non-empty `token`.
pub fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|&b| TOKEN[usize::from(b)])
}

/// Every byte may appear in a field value (empty is allowed).
pub fn is_field_value(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| FIELD_VALUE[usize::from(b)])
}

/// `%` followed by two hex digits wherever it appears, and every other byte in `class`.
fn pct_encoded_over(bytes: &[u8], class: &[bool; 256]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else if class[usize::from(b)] {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// A path with an optional query, as origin-form carries it (may be empty: an
/// absolute-form target without a path).
pub fn is_path_and_query(bytes: &[u8]) -> bool {
    pct_encoded_over(bytes, &TARGET)
}

/// `port = *DIGIT` (RFC 3986), bounded to what TCP can carry: at most five digits
/// and at most 65535 (a longer or larger one cannot name a port, and an
/// unbounded digit string is a parser-differential waiting to happen).
fn is_port(bytes: &[u8]) -> bool {
    bytes.len() <= 5
        && bytes.iter().all(u8::is_ascii_digit)
        && bytes.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= 65535
}

/// `IP-literal` without its brackets: an IPv6 address, exactly as RFC 4291 writes
/// them (std's parser). IPvFuture and zone identifiers are refused: no backend
/// would route by them, and each is a syntax only some parsers know.
fn is_ip_literal(inner: &[u8]) -> bool {
    std::str::from_utf8(inner).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2): a reg-name (which
/// covers IPv4 addresses), or an IP-literal in brackets. `host_required`: the host
/// may not be empty (an `http` URI's authority, RFC 9110 §4.2.1).
pub fn is_authority(bytes: &[u8], host_required: bool) -> bool {
    let (host_ok, rest) = if bytes.first() == Some(&b'[') {
        match bytes.iter().position(|&b| b == b']') {
            Some(end) => (is_ip_literal(&bytes[1..end]), &bytes[end + 1..]),
            None => return false,
        }
    } else {
        if bytes.is_empty() {
            // An empty Host (no authority to give); never an empty host with a port.
            return !host_required;
        }
        let end = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
        let host = &bytes[..end];
        (
            !host.is_empty() && pct_encoded_over(host, &REG_NAME),
            &bytes[end..],
        )
    };
    host_ok
        && match rest.split_first() {
            None => true,
            Some((b':', port)) => is_port(port),
            Some(_) => false,
        }
}

/// `1*HEXDIG` as a number; `None` when empty, not hex, or beyond 64 bits (leading
/// zeros are fine however many).
pub fn hex_number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = char::from(d).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(v))
    })
}

/// `1*DIGIT` as a number; `None` when empty, not digits, or beyond 64 bits
/// (leading zeros are fine however many).
pub fn decimal_number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Trims optional whitespace (SP and HTAB, RFC 9110 §5.6.3) on both sides.
pub fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// The position of the first LF not preceded by CR, or of a CR not followed by LF
/// (RFC 9112 §2.2: a recipient may read a bare LF as a line end, a bare CR as
/// whitespace; two parsers that choose differently frame differently).
///
/// This runs on every response head, where walking it byte by byte was a tenth of
/// its parse: a head without any (every CR followed by an LF, every LF preceded by
/// a CR) is told eight bytes at a time ([`crlf_pairs_only`]); only one that fails
/// that is walked for the position.
pub fn bare_line_break(bytes: &[u8]) -> Option<usize> {
    if crlf_pairs_only(bytes) {
        return None;
    }
    first_bare_line_break(bytes)
}

/// [`bare_line_break`] by walking the bytes one by one.
fn first_bare_line_break(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => i += 2,
            b'\r' | b'\n' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Whether every CR is followed by an LF and every LF preceded by a CR: the first
/// byte is no LF, the last no CR, and at every position a CR exactly when the next
/// byte is an LF (compared as masks of eight positions at once).
fn crlf_pairs_only(bytes: &[u8]) -> bool {
    let n = bytes.len();
    if bytes.first() == Some(&b'\n') || bytes.last() == Some(&b'\r') {
        return false;
    }
    let word = |i: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let mut p = 0;
    while p + 9 <= n {
        if byte_mask(word(p), b'\r') != byte_mask(word(p + 1), b'\n') {
            return false;
        }
        p += 8;
    }
    while p + 1 < n {
        if (bytes[p] == b'\r') != (bytes[p + 1] == b'\n') {
            return false;
        }
        p += 1;
    }
    true
}

/// The high bit of each byte of `w` that equals `b` (exact per byte: no borrow
/// crosses from one byte into the next).
fn byte_mask(w: u64, b: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = w ^ (0x0101_0101_0101_0101 * u64::from(b));
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// Whether a complete head that httparse accepted has a line ending in LF alone.
/// The fast form of [`bare_line_break`] for the request path: httparse already
/// refuses a CR that is not followed by LF, so only the few LFs need a look.
pub fn lf_without_cr(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_token(b"GET"));
        assert!(is_token(b"x-a_b.c~!#$%&'*+^`|"));
        for bad in [
            &b""[..],
            b"a b",
            b"a:b",
            b"a\"",
            b"a(",
            b"a/",
            b"\xc3\xa9",
            b"a\x7f",
        ] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn field_values() {
        assert!(is_field_value(b""));
        assert!(is_field_value(b"a b\tc \x80\xff~"));
        for bad in [&b"a\rb"[..], b"a\nb", b"\x00", b"\x0b", b"\x7f", b"\x1f"] {
            assert!(!is_field_value(bad), "{bad:?}");
        }
    }

    #[test]
    fn targets() {
        assert!(is_path_and_query(b"/a/b;c=d?x=1&y=%2F/?@:"));
        assert!(is_path_and_query(b""));
        for bad in [
            &b"/a b"[..],
            b"/#frag",
            b"/%zz",
            b"/%4",
            b"/\x80",
            b"/a\"",
            b"/<",
            b"/[",
            b"/\\",
            b"/^",
            b"/`",
            b"/{",
            b"/|",
            b"/\x7f",
            b"/\t",
        ] {
            assert!(!is_path_and_query(bad), "{bad:?}");
        }
    }

    #[test]
    fn authorities() {
        for good in [
            &b"t"[..],
            b"t:80",
            b"api.shop.svc.cluster.local:8080",
            b"10.0.0.1:1",
            b"[::1]:8080",
            b"t:",
            b"a%41b",
        ] {
            assert!(is_authority(good, true), "{good:?}");
        }
        assert!(is_authority(b"", false));
        assert!(!is_authority(b"", true));
        assert!(!is_authority(b":80", true));
        assert!(!is_authority(b":80", false));
        for bad in [
            &b"u@t"[..],
            b"t:80:80",
            b"t:65536",
            b"t:123456",
            b"t:8a",
            b"t/x",
            b"t x",
            b"[::1",
            b"[::1]x",
            b"[zz]",
            b"[1:1]",
            b"[v1.x]",
            b"t\x80",
        ] {
            assert!(!is_authority(bad, false), "{bad:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(hex_number(b"0000000000000000000000ff"), Some(255));
        assert_eq!(hex_number(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(hex_number(b"10000000000000000"), None);
        assert_eq!(hex_number(b""), None);
        assert_eq!(hex_number(b"0x1"), None);
        assert_eq!(decimal_number(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(decimal_number(b"18446744073709551616"), None);
        assert_eq!(decimal_number(b"000000000000000000000000000003"), Some(3));
        assert_eq!(decimal_number(b"+1"), None);
        assert_eq!(decimal_number(b"1 "), None);
    }

    proptest::proptest! {
        #[test]
        fn bare_line_break_finds_what_the_walk_finds(
            bytes in proptest::collection::vec(proptest::prop_oneof![
                proptest::strategy::Just(b'\r'),
                proptest::strategy::Just(b'\n'),
                proptest::strategy::Just(b'a'),
                proptest::num::u8::ANY,
            ], 0..80)
        ) {
            // The word-at-a-time check says "none" exactly when the walk finds none.
            proptest::prop_assert_eq!(bare_line_break(&bytes), first_bare_line_break(&bytes));
        }
    }

    #[test]
    fn bare_line_breaks() {
        assert_eq!(bare_line_break(b"a\r\nb\r\n\r\n"), None);
        assert_eq!(bare_line_break(b"a\nb"), Some(1));
        assert_eq!(bare_line_break(b"a\r\nb\rc"), Some(4));
        assert_eq!(bare_line_break(b"\r"), Some(0));
        assert_eq!(bare_line_break(b"\r\r\n"), Some(0));
        assert!(!lf_without_cr(b"a\r\nb\r\n\r\n"));
        assert!(lf_without_cr(b"\nGET"));
        assert!(lf_without_cr(b"a\r\nb\n\r\n"));
    }
}
