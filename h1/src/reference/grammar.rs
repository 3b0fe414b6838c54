//! Core rules (RFC 5234), tokens and field values (RFC 9110), URI pieces (RFC 3986).

use super::*;

// ---------------------------------------------------------------------------
// RFC 5234 Appendix B.1: core rules
// ---------------------------------------------------------------------------

/// ALPHA = %x41-5A / %x61-7A
pub fn is_alpha(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_lowercase()
}

/// DIGIT = %x30-39
pub fn is_digit(b: u8) -> bool {
    b.is_ascii_digit()
}

/// HEXDIG = DIGIT / "A" / "B" / "C" / "D" / "E" / "F"
/// (ABNF quoted strings are case-insensitive, so "a"-"f" also match.)
pub fn is_hexdig(b: u8) -> bool {
    is_digit(b) || (b'A'..=b'F').contains(&b) || (b'a'..=b'f').contains(&b)
}

/// VCHAR = %x21-7E
pub fn is_vchar(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

pub(crate) fn hex_value(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

pub(crate) fn find(s: &[u8], b: u8) -> Option<usize> {
    s.iter().position(|&x| x == b)
}

pub(crate) fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// RFC 9110 5.5 / 5.6: field values, tokens, whitespace, quoted strings
// ---------------------------------------------------------------------------

/// RFC 9110 5.5: obs-text = %x80-FF
pub fn is_obs_text(b: u8) -> bool {
    b >= 0x80
}

/// RFC 9110 5.5: field-vchar = VCHAR / obs-text
pub fn is_field_vchar(b: u8) -> bool {
    is_vchar(b) || is_obs_text(b)
}

/// RFC 9110 5.6.3: OWS = *( SP / HTAB ); the same bytes make up BWS and RWS.
pub fn is_ows_byte(b: u8) -> bool {
    b == SP || b == HTAB
}

/// RFC 9110 5.6.3: OWS (and BWS): skip *( SP / HTAB ) from `i`.
pub fn skip_ows(s: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < s.len() && is_ows_byte(s[j]) {
        j += 1;
    }
    j
}

/// Removes leading and trailing OWS.
pub fn trim_ows(s: &[u8]) -> &[u8] {
    let mut a = 0;
    let mut b = s.len();
    while a < b && is_ows_byte(s[a]) {
        a += 1;
    }
    while b > a && is_ows_byte(s[b - 1]) {
        b -= 1;
    }
    &s[a..b]
}

/// RFC 9110 5.5: field-value = *field-content
///   field-content = field-vchar [ 1*( SP / HTAB / field-vchar ) field-vchar ]
/// i.e. empty, or only SP / HTAB / field-vchar, starting and ending with a
/// field-vchar. (CR, LF, NUL, other CTLs and DEL are therefore excluded.)
pub fn is_field_value(s: &[u8]) -> bool {
    if s.is_empty() {
        return true;
    }
    let first_ok = is_field_vchar(s[0]);
    let last_ok = is_field_vchar(s[s.len() - 1]);
    first_ok && last_ok && s.iter().all(|&b| b == SP || b == HTAB || is_field_vchar(b))
}

/// RFC 9110 5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-"
///   / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
pub fn is_tchar(b: u8) -> bool {
    matches!(
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
    ) || is_digit(b)
        || is_alpha(b)
}

/// RFC 9110 5.6.2: token = 1*tchar (matcher).
pub fn match_token(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    while j < s.len() && is_tchar(s[j]) {
        j += 1;
    }
    if j > i {
        Some(j)
    } else {
        None
    }
}

/// RFC 9110 5.6.2: token = 1*tchar (whole slice).
pub fn is_token(s: &[u8]) -> bool {
    match_token(s, 0) == Some(s.len())
}

/// RFC 9110 5.6.4: qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text
pub fn is_qdtext(b: u8) -> bool {
    b == HTAB
        || b == SP
        || b == 0x21
        || (0x23..=0x5b).contains(&b)
        || (0x5d..=0x7e).contains(&b)
        || is_obs_text(b)
}

/// RFC 9110 5.6.4: quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
pub fn match_quoted_pair(s: &[u8], i: usize) -> Option<usize> {
    if s.get(i) != Some(&b'\\') {
        return None;
    }
    match s.get(i + 1) {
        Some(&b) if b == HTAB || b == SP || is_vchar(b) || is_obs_text(b) => Some(i + 2),
        _ => None,
    }
}

/// RFC 9110 5.6.4: quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE
pub fn match_quoted_string(s: &[u8], i: usize) -> Option<usize> {
    if s.get(i) != Some(&DQUOTE) {
        return None;
    }
    let mut j = i + 1;
    loop {
        match s.get(j) {
            None => return None,
            Some(&DQUOTE) => return Some(j + 1),
            Some(&b'\\') => j = match_quoted_pair(s, j)?,
            Some(&b) if is_qdtext(b) => j += 1,
            Some(_) => return None,
        }
    }
}

// ---------------------------------------------------------------------------
// RFC 3986: URI pieces used by request-target and Host
// ---------------------------------------------------------------------------

/// RFC 3986 2.3: unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~"
pub fn is_unreserved(b: u8) -> bool {
    is_alpha(b) || is_digit(b) || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 2.2: sub-delims = "!" / "$" / "&" / "'" / "(" / ")" / "*" / "+"
///   / "," / ";" / "="
pub fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// RFC 3986 2.1: pct-encoded = "%" HEXDIG HEXDIG
/// (Any octet may be encoded, %00 included; nothing is decoded.)
pub fn match_pct_encoded(s: &[u8], i: usize) -> Option<usize> {
    match (s.get(i), s.get(i + 1), s.get(i + 2)) {
        (Some(&b'%'), Some(&h1), Some(&h2)) if is_hexdig(h1) && is_hexdig(h2) => Some(i + 3),
        _ => None,
    }
}

/// RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
pub fn match_pchar(s: &[u8], i: usize) -> Option<usize> {
    let b = *s.get(i)?;
    if is_unreserved(b) || is_sub_delim(b) || b == b':' || b == b'@' {
        Some(i + 1)
    } else {
        match_pct_encoded(s, i)
    }
}

/// RFC 3986 3.3: segment = *pchar (greedy; pchar excludes "/", "?", "#").
pub fn match_segment(s: &[u8], i: usize) -> usize {
    let mut j = i;
    while let Some(k) = match_pchar(s, j) {
        j = k;
    }
    j
}

/// RFC 3986 3.3: path-abempty = *( "/" segment )
pub fn match_path_abempty(s: &[u8], i: usize) -> usize {
    let mut j = i;
    while s.get(j) == Some(&b'/') {
        j = match_segment(s, j + 1);
    }
    j
}

/// RFC 9110 4.1: absolute-path = 1*( "/" segment )
pub fn match_absolute_path(s: &[u8], i: usize) -> Option<usize> {
    if s.get(i) != Some(&b'/') {
        return None;
    }
    Some(match_path_abempty(s, i))
}

/// RFC 3986 3.4: query = *( pchar / "/" / "?" )
pub fn match_query(s: &[u8], i: usize) -> usize {
    let mut j = i;
    loop {
        match s.get(j) {
            Some(&b'/') | Some(&b'?') => j += 1,
            _ => match match_pchar(s, j) {
                Some(k) => j = k,
                None => return j,
            },
        }
    }
}

/// RFC 3986 3.2.2: reg-name = *( unreserved / pct-encoded / sub-delims )
/// (The ABNF admits the empty string; callers needing a host require 1 byte.)
pub fn is_reg_name(s: &[u8]) -> bool {
    let mut j = 0;
    while j < s.len() {
        let b = s[j];
        if is_unreserved(b) || is_sub_delim(b) {
            j += 1;
        } else {
            match match_pct_encoded(s, j) {
                Some(k) => j = k,
                None => return false,
            }
        }
    }
    true
}

/// RFC 3986 3.2.2: dec-octet = DIGIT / %x31-39 DIGIT / "1" 2DIGIT
///   / "2" %x30-34 DIGIT / "25" %x30-35
pub fn is_dec_octet(s: &[u8]) -> bool {
    match s {
        [a] => is_digit(*a),
        [a, b] => (b'1'..=b'9').contains(a) && is_digit(*b),
        [b'1', b, c] => is_digit(*b) && is_digit(*c),
        [b'2', b, c] if (b'0'..=b'4').contains(b) => is_digit(*c),
        [b'2', b'5', c] => (b'0'..=b'5').contains(c),
        _ => false,
    }
}

/// RFC 3986 3.2.2: IPv4address = dec-octet "." dec-octet "." dec-octet "." dec-octet
/// (Strings failing this, e.g. "256.1.1.1", may still be a valid reg-name.)
pub fn is_ipv4address(s: &[u8]) -> bool {
    let parts: Vec<&[u8]> = s.split(|&b| b == b'.').collect();
    parts.len() == 4 && parts.iter().all(|p| is_dec_octet(p))
}

/// RFC 3986 3.2.2: IP-literal = "[" ( IPv6address / IPvFuture ) "]"
///
/// IPv6address as RFC 4291 section 2.2 writes it, checked by std's parser (an
/// oracle for the address grammar, not Sluice code). IPvFuture and zone
/// identifiers are refused (Sluice's policy).
pub fn is_ip_literal(s: &[u8]) -> bool {
    if s.len() < 3 || s[0] != b'[' || s[s.len() - 1] != b']' {
        return false;
    }
    std::str::from_utf8(&s[1..s.len() - 1]).is_ok_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
}

/// RFC 3986 3.2.3: port = *DIGIT (may be empty), bounded by Sluice to what TCP
/// can carry: at most five digits, at most 65535.
pub fn is_port(s: &[u8]) -> bool {
    s.len() <= 5
        && s.iter().all(|&b| is_digit(b))
        && s.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
}

/// RFC 3986 3.2.2: host = IP-literal / IPv4address / reg-name, but NON-EMPTY
/// (RFC 9110 4.2.1: an http URI with an empty host is invalid; POLICY.md
/// treats the empty Host value as its own special case).
pub fn is_uri_host(s: &[u8]) -> bool {
    !s.is_empty() && (is_ip_literal(s) || is_ipv4address(s) || is_reg_name(s))
}

/// uri-host [ ":" port ]  (RFC 9110 7.2 Host; RFC 3986 3.2 authority without
/// userinfo). Returns (host, port) on success.
pub fn split_host_port(s: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (host, port) = if s.first() == Some(&b'[') {
        let close = find(s, b']')?;
        let host = &s[..=close];
        let rest = &s[close + 1..];
        match rest.first() {
            None => (host, None),
            Some(&b':') => (host, Some(&rest[1..])),
            Some(_) => return None,
        }
    } else {
        match find(s, b':') {
            Some(c) => (&s[..c], Some(&s[c + 1..])),
            None => (s, None),
        }
    };
    let port_ok = match port {
        None => true,
        Some(p) => is_port(p),
    };
    if is_uri_host(host) && port_ok {
        Some((host, port))
    } else {
        None
    }
}

/// RFC 9110 7.2: Host = uri-host [ ":" port ] (non-empty value; the empty
/// value is handled by the caller).
pub fn is_host_value(s: &[u8]) -> bool {
    split_host_port(s).is_some()
}
