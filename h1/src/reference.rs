//! REFERENCE HTTP/1.1 request parser for differential testing (std only).
//!
//! Slow but meant to be obviously correct: a literal reading of the ABNF of
//! RFC 9112 (HTTP/1.1), RFC 9110 (HTTP semantics) and RFC 3986 (URI), as
//! constrained by h1/POLICY.md ("the strict policy"), which is the
//! contract. One small function per ABNF rule, each commented with its section.
//!
//! Matchers named `match_*` take `(s, i)` and return the index just past what
//! they matched (or `None`); predicates named `is_*` test a whole slice.
//!
//! # Precedence (which status wins when several things are wrong)
//!
//! The head is consumed left to right, one line at a time; a line ends at the
//! first CRLF. The rule is "the first error in byte order wins", with errors
//! attributed as follows:
//!
//! 1. Positional errors, detected while a line is being scanned, at the byte
//!    where they become certain (earliest byte first):
//!    - (a) head limit (431): byte index 65536 would belong to the head, i.e.
//!      the first 65536 bytes (leading empty lines included) do not contain
//!      the end of the head. This is checked *before* asking whether the byte
//!      is available, so an incomplete head that already holds >= 65536 bytes
//!      is 431, not Incomplete (it can no longer end within the limit);
//!    - (b) bare LF (400) at the LF; bare CR (400) once the byte after the CR
//!      is available (a CR at the very end of the input is Incomplete);
//!    - (c) field-line length (431) at the 16385th byte of a field line's
//!      content (the CRLF is not counted);
//!    - (d) request-target length (414) at the 8193rd byte of the target,
//!      provided the line so far is `token SP` followed by no other SP (an
//!      invalid method is an earlier error, reported as 400 when the line
//!      completes).
//! 2. Content errors, checked when the line is complete (its CRLF seen):
//!    - request line: structure/method (400), target length (414), version
//!      (505 for a well-formed HTTP/D.D other than 1.0/1.1, else 400), then
//!      target form and bytes (400);
//!    - field line: field count (431 for the 101st) before its syntax (400),
//!      then the per-field rules (400): Host repeated / invalid / empty where
//!      the target carries an authority; Content-Length repeated / invalid /
//!      with Transfer-Encoding; Transfer-Encoding repeated / in HTTP/1.0 /
//!      with Content-Length / malformed.
//! 3. At the empty line ending the head: missing Host in HTTP/1.1 (400), then
//!    an unsupported-but-well-formed transfer coding list (501). 501 is thus
//!    only returned for a head that is otherwise acceptable.
//!
//! Consequences: a status, once returned for some input, is returned for every
//! extension of that input (prefix-stable); `Incomplete` is returned only when
//! the bytes present contain no error by the rules above. Errors *inside* a
//! line that is not yet complete (e.g. a NUL in a field value) are reported
//! only when its CRLF arrives (or a positional limit fires first).
//!
//! The chunked decoder follows the same scheme: the size line and each trailer
//! line are scanned for bare CR/LF and limits (positional), then their content
//! is checked when complete.

// ---------------------------------------------------------------------------
// Limits (POLICY.md "Limits" and "Chunked request bodies")
// ---------------------------------------------------------------------------

/// Whole head, leading empty lines and final CRLF included (-> 431).
pub const MAX_HEAD: usize = 65536;
/// Field lines in the head (-> 431).
pub const MAX_FIELDS: usize = 100;
/// One field line, CRLF excluded (-> 431).
pub const MAX_FIELD_LINE: usize = 16384;
/// request-target (-> 414).
pub const MAX_TARGET: usize = 8192;
/// chunk size line, extensions included, CRLF excluded (-> 400).
pub const MAX_CHUNK_SIZE_LINE: usize = 4096;
/// trailer-section: its field lines with their CRLFs, final CRLF excluded (-> 400).
pub const MAX_TRAILER_SECTION: usize = 16384;

const CR: u8 = b'\r';
const LF: u8 = b'\n';
const SP: u8 = b' ';
const HTAB: u8 = b'\t';
const DQUOTE: u8 = b'"';

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No Content-Length, no Transfer-Encoding: body length 0 (RFC 9112 6.3 rule 7).
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Vec<u8>,
    /// As received.
    pub target: Vec<u8>,
    /// (1,0) or (1,1).
    pub version: (u8, u8),
    /// Names as received, values with OWS trimmed.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub framing: Framing,
    /// Effective authority: absolute-form's / authority-form's, else the Host
    /// value (empty when there is no Host field or it is empty).
    pub authority: Vec<u8>,
    /// The target as it must be forwarded: origin-form (path+query, "/" if the
    /// path is empty); "*" for asterisk-form; the authority for CONNECT.
    pub origin_path: Vec<u8>,
    /// Bytes of the head incl. leading empty lines and the final CRLF.
    pub head_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Status(u16),
    Incomplete,
}

/// A request with its body, as found in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub request: Request,
    /// Decoded body (chunk data concatenated, or the Content-Length bytes).
    pub body: Vec<u8>,
    /// Chunk data as received, one entry per chunk (empty unless chunked).
    pub chunks: Vec<Vec<u8>>,
    /// Trailer fields (names as received, values OWS-trimmed).
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of input used: head + body framing.
    pub len: usize,
}

/// Field lines: (name as received, value OWS-trimmed).
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn bad() -> Reject {
    Reject::Status(400)
}

fn status(code: u16) -> Reject {
    Reject::Status(code)
}

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

fn hex_value(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

fn find(s: &[u8], b: u8) -> Option<usize> {
    s.iter().position(|&x| x == b)
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
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

// ---------------------------------------------------------------------------
// RFC 9112 2.3 / 3: request line
// ---------------------------------------------------------------------------

/// RFC 9112 2.3: HTTP-version = HTTP-name "/" DIGIT "." DIGIT, HTTP-name = %s"HTTP".
/// Ok only for 1.0 / 1.1; another well-formed version -> 505; anything else -> 400.
pub fn parse_http_version(s: &[u8]) -> Result<(u8, u8), Reject> {
    match s {
        b"HTTP/1.1" => Ok((1, 1)),
        b"HTTP/1.0" => Ok((1, 0)),
        [b'H', b'T', b'T', b'P', b'/', a, b'.', b] if is_digit(*a) && is_digit(*b) => {
            Err(status(505))
        }
        _ => Err(bad()),
    }
}

/// RFC 9112 3.2: the four forms of request-target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetForm {
    /// 3.2.1 origin-form = absolute-path [ "?" query ]
    Origin,
    /// 3.2.2 absolute-form (http/https only): authority and the origin-form to forward.
    Absolute {
        authority: Vec<u8>,
        path_query: Vec<u8>,
    },
    /// 3.2.3 authority-form = uri-host ":" port (CONNECT only)
    Authority,
    /// 3.2.4 asterisk-form = "*" (OPTIONS only)
    Asterisk,
}

impl TargetForm {
    /// Does the target itself carry an authority (POLICY.md: "other forms of authority")?
    pub fn has_authority(&self) -> bool {
        matches!(self, TargetForm::Absolute { .. } | TargetForm::Authority)
    }
}

/// RFC 9112 3.2.1: origin-form = absolute-path [ "?" query ]
pub fn is_origin_form(t: &[u8]) -> bool {
    let Some(j) = match_absolute_path(t, 0) else {
        return false;
    };
    let end = if t.get(j) == Some(&b'?') {
        match_query(t, j + 1)
    } else {
        j
    };
    end == t.len()
}

/// RFC 9112 3.2.2: absolute-form = absolute-URI, restricted by POLICY.md to
///   ( "http" / "https" ) "://" authority path-abempty [ "?" query ]
/// (RFC 9110 4.2.1/4.2.2), scheme case-insensitive, no userinfo, non-empty
/// host, no fragment. Returns (authority, origin-form to forward).
pub fn parse_absolute_form(t: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let rest = strip_prefix_ci(t, b"http://").or_else(|| strip_prefix_ci(t, b"https://"))?;
    // RFC 3986 3.2: the authority ends at the next "/", "?" (or "#", which is
    // never valid here and so is left inside to fail the host check) or the end.
    let a_end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..a_end];
    if find(authority, b'@').is_some() {
        return None; // userinfo: refused by POLICY.md (RFC 9110 4.2.4)
    }
    split_host_port(authority)?;
    let p_end = match_path_abempty(rest, a_end);
    let q_end = if rest.get(p_end) == Some(&b'?') {
        match_query(rest, p_end + 1)
    } else {
        p_end
    };
    if q_end != rest.len() {
        return None;
    }
    let path = &rest[a_end..p_end];
    let mut path_query = if path.is_empty() {
        b"/".to_vec()
    } else {
        path.to_vec()
    };
    path_query.extend_from_slice(&rest[p_end..]);
    Some((authority.to_vec(), path_query))
}

/// RFC 9112 3.2.3: authority-form = uri-host ":" port, with (RFC 9110 9.3.6)
/// a port that is present and valid: 1*DIGIT with a value <= 65535 (leading
/// zeros allowed; port 0 accepted: only the range is checked).
pub fn is_authority_form(t: &[u8]) -> bool {
    match split_host_port(t) {
        Some((_, Some(port))) => {
            !port.is_empty() && matches!(port_value(port), Some(v) if v <= 65535)
        }
        _ => false,
    }
}

fn port_value(p: &[u8]) -> Option<u32> {
    let mut v: u32 = 0;
    for &b in p {
        if !is_digit(b) {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
    }
    Some(v)
}

/// RFC 9112 3.2: request-target = origin-form / absolute-form / authority-form
///   / asterisk-form; the form is chosen by the method (3.2.3, 3.2.4):
/// CONNECT takes authority-form only; "*" only with OPTIONS; others take
/// origin-form or absolute-form. Methods are case-sensitive (RFC 9110 9.1).
pub fn parse_request_target(method: &[u8], t: &[u8]) -> Result<TargetForm, Reject> {
    if method == b"CONNECT" {
        return if is_authority_form(t) {
            Ok(TargetForm::Authority)
        } else {
            Err(bad())
        };
    }
    if t == b"*" {
        return if method == b"OPTIONS" {
            Ok(TargetForm::Asterisk)
        } else {
            Err(bad())
        };
    }
    if t.first() == Some(&b'/') {
        return if is_origin_form(t) {
            Ok(TargetForm::Origin)
        } else {
            Err(bad())
        };
    }
    match parse_absolute_form(t) {
        Some((authority, path_query)) => Ok(TargetForm::Absolute {
            authority,
            path_query,
        }),
        None => Err(bad()),
    }
}

/// A parsed request-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    pub version: (u8, u8),
    pub form: TargetForm,
}

/// RFC 9112 3: request-line = method SP request-target SP HTTP-version
/// (CRLF already removed). Exactly one SP each; method = token (3.1).
/// Order: structure/method 400, target length 414, version 505/400, target 400.
pub fn parse_request_line(line: &[u8]) -> Result<RequestLine, Reject> {
    let sp1 = find(line, SP).ok_or_else(bad)?;
    let method = &line[..sp1];
    if !is_token(method) {
        return Err(bad());
    }
    let rest = &line[sp1 + 1..];
    let (target, version) = match find(rest, SP) {
        Some(sp2) => (&rest[..sp2], Some(&rest[sp2 + 1..])),
        None => (rest, None),
    };
    if target.len() > MAX_TARGET {
        return Err(status(414));
    }
    // No second SP: HTTP/0.9-style line or missing version.
    let version = parse_http_version(version.ok_or_else(bad)?)?;
    if target.is_empty() {
        return Err(bad());
    }
    let form = parse_request_target(method, target)?;
    Ok(RequestLine {
        method: method.to_vec(),
        target: target.to_vec(),
        version,
        form,
    })
}

// ---------------------------------------------------------------------------
// RFC 9112 5: field lines; RFC 9110 8.6 / RFC 9112 6: framing fields
// ---------------------------------------------------------------------------

/// RFC 9112 5: field-line = field-name ":" OWS field-value OWS (CRLF removed);
/// RFC 9110 5.1 field-name = token. Whitespace before the colon (RFC 9112
/// 5.1), obs-fold and a leading SP/HTAB (RFC 9112 5.2, 2.2) all make the name
/// a non-token -> 400. Returns (name as received, value OWS-trimmed).
pub fn parse_field_line(line: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Reject> {
    let colon = find(line, b':').ok_or_else(bad)?;
    let name = &line[..colon];
    if !is_token(name) {
        return Err(bad());
    }
    let value = trim_ows(&line[colon + 1..]);
    if !is_field_value(value) {
        return Err(bad());
    }
    Ok((name.to_vec(), value.to_vec()))
}

/// RFC 9110 8.6: Content-Length = 1*DIGIT, value must fit in u64.
/// Leading zeros are allowed ("007" = 7); no sign, no inner spaces, no list.
pub fn parse_content_length(v: &[u8]) -> Result<u64, Reject> {
    if v.is_empty() {
        return Err(bad());
    }
    let mut n: u64 = 0;
    for &b in v {
        if !is_digit(b) {
            return Err(bad());
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or_else(bad)?;
    }
    Ok(n)
}

/// RFC 9112 7: transfer-parameter = token BWS "=" BWS ( token / quoted-string )
pub fn match_transfer_parameter(s: &[u8], i: usize) -> Option<usize> {
    let j = match_token(s, i)?;
    let j = skip_ows(s, j);
    if s.get(j) != Some(&b'=') {
        return None;
    }
    let j = skip_ows(s, j + 1);
    match_token(s, j).or_else(|| match_quoted_string(s, j))
}

/// RFC 9112 7: transfer-coding = token *( OWS ";" OWS transfer-parameter )
/// Returns (end, coding name, has parameters).
pub fn match_transfer_coding(s: &[u8], i: usize) -> Option<(usize, &[u8], bool)> {
    let name_end = match_token(s, i)?;
    let mut j = name_end;
    let mut params = false;
    loop {
        let k = skip_ows(s, j);
        if s.get(k) != Some(&b';') {
            return Some((j, &s[i..name_end], params));
        }
        let k = skip_ows(s, k + 1);
        j = match_transfer_parameter(s, k)?;
        params = true;
    }
}

/// RFC 9112 6.1: Transfer-Encoding = #transfer-coding, read STRICTLY as the
/// sender form 1#transfer-coding = transfer-coding *( OWS "," OWS transfer-coding )
/// (no empty list elements). Returns (name, has parameters) per coding.
pub fn parse_transfer_coding_list(s: &[u8]) -> Option<Vec<(&[u8], bool)>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let (j, name, params) = match_transfer_coding(s, i)?;
        out.push((name, params));
        let k = skip_ows(s, j);
        if k == s.len() {
            return Some(out);
        }
        if s[k] != b',' {
            return None;
        }
        i = skip_ows(s, k + 1);
    }
}

/// How a (trimmed) Transfer-Encoding value is treated (POLICY.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeKind {
    /// Exactly "chunked" (case-insensitive).
    Chunked,
    /// Well-formed list of >= 2 codings ending in exactly one "chunked"
    /// (without parameters), no other "chunked" -> 501.
    Unsupported,
    /// Anything else -> 400.
    Invalid,
}

pub fn classify_transfer_encoding(v: &[u8]) -> TeKind {
    if v.eq_ignore_ascii_case(b"chunked") {
        return TeKind::Chunked;
    }
    let Some(list) = parse_transfer_coding_list(v) else {
        return TeKind::Invalid;
    };
    let is_chunked = |name: &[u8]| name.eq_ignore_ascii_case(b"chunked");
    match list.split_last() {
        Some((&(last, last_params), others))
            if !others.is_empty()
                && is_chunked(last)
                && !last_params
                && others.iter().all(|&(n, _)| !is_chunked(n)) =>
        {
            TeKind::Unsupported
        }
        _ => TeKind::Invalid,
    }
}

// ---------------------------------------------------------------------------
// Line scanner (RFC 9112 2.2: every line ends in CRLF; bare CR/LF -> 400)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Absolute index of the first byte that may not be scanned (usize::MAX: none).
    abs_limit: usize,
    abs_status: u16,
    /// Maximum content bytes of the line, CRLF excluded (usize::MAX: none).
    content_limit: usize,
    content_status: u16,
    /// Apply the positional 414 rule of the request line.
    request_line: bool,
}

impl Limits {
    fn request_line() -> Limits {
        Limits {
            abs_limit: MAX_HEAD,
            abs_status: 431,
            content_limit: usize::MAX,
            content_status: 431,
            request_line: true,
        }
    }
    fn field_line() -> Limits {
        Limits {
            abs_limit: MAX_HEAD,
            abs_status: 431,
            content_limit: MAX_FIELD_LINE,
            content_status: 431,
            request_line: false,
        }
    }
    fn size_line() -> Limits {
        Limits {
            abs_limit: usize::MAX,
            abs_status: 400,
            content_limit: MAX_CHUNK_SIZE_LINE,
            content_status: 400,
            request_line: false,
        }
    }
    fn trailer_line(trailer_start: usize) -> Limits {
        Limits {
            abs_limit: trailer_start.saturating_add(MAX_TRAILER_SECTION),
            abs_status: 400,
            content_limit: usize::MAX,
            content_status: 400,
            request_line: false,
        }
    }
}

/// Scans one line starting at `start`. Ok((content_end, next_line_start)),
/// where input[content_end..next] == CRLF. Errors are positional (see the
/// module doc): for each byte, in order, the absolute limit, availability,
/// bare LF / bare CR, content length, the 414 rule.
fn scan_line(input: &[u8], start: usize, lim: &Limits) -> Result<(usize, usize), Reject> {
    let mut i = start;
    let mut first_sp: Option<usize> = None; // request line: index (in line) of the first SP
    let mut more_sp = false; // request line: a second SP was seen
    loop {
        if i >= lim.abs_limit {
            return Err(status(lim.abs_status));
        }
        let Some(&b) = input.get(i) else {
            return Err(Reject::Incomplete);
        };
        if b == LF {
            return Err(bad()); // bare LF (a CRLF would have ended the line at the CR)
        }
        if b == CR {
            if i + 1 >= lim.abs_limit {
                return Err(status(lim.abs_status));
            }
            return match input.get(i + 1) {
                None => Err(Reject::Incomplete),
                Some(&LF) => Ok((i, i + 2)),
                Some(_) => Err(bad()), // bare CR
            };
        }
        let j = i - start; // index of b within the line
        if j + 1 > lim.content_limit {
            return Err(status(lim.content_status));
        }
        if lim.request_line {
            if b == SP {
                if first_sp.is_none() {
                    first_sp = Some(j);
                } else {
                    more_sp = true;
                }
            } else if let Some(k) = first_sp {
                // target so far = line[k+1..=j], j - k bytes
                if !more_sp && j - k == MAX_TARGET + 1 && is_token(&input[start..start + k]) {
                    return Err(status(414));
                }
            }
        }
        i += 1;
    }
}

// ---------------------------------------------------------------------------
// Head (RFC 9112 2.1: HTTP-message = start-line CRLF *( field-line CRLF ) CRLF)
// ---------------------------------------------------------------------------

#[derive(Default)]
struct FieldState {
    host: Option<Vec<u8>>,
    content_length: Option<u64>,
    te: Option<TeKind>,
}

/// Per-field rules, applied when the field line is complete.
fn check_field(
    rl: &RequestLine,
    st: &mut FieldState,
    name: &[u8],
    value: &[u8],
) -> Result<(), Reject> {
    // Sluice: a name that is a framing field's with "_" for "-" is refused (a
    // backend that maps one to the other, as CGI does, would see a second framing).
    if name.contains(&b'_') {
        let dashed: Vec<u8> = name
            .iter()
            .map(|&b| if b == b'_' { b'-' } else { b })
            .collect();
        if dashed.eq_ignore_ascii_case(b"content-length")
            || dashed.eq_ignore_ascii_case(b"transfer-encoding")
        {
            return Err(bad());
        }
    }
    if name.eq_ignore_ascii_case(b"host") {
        // RFC 9110 7.2 + POLICY.md: one Host field at most (any case, even identical).
        if st.host.is_some() {
            return Err(bad());
        }
        // An empty value is allowed whatever the form: with absolute-form or
        // CONNECT the target's authority is used and Host ignored (RFC 9112 3.2.2).
        if !value.is_empty() && !is_host_value(value) {
            return Err(bad());
        }
        st.host = Some(value.to_vec());
    } else if name.eq_ignore_ascii_case(b"content-length") {
        // RFC 9112 6.3 rules 3 and 5, POLICY.md: one CL, never with TE.
        if st.content_length.is_some() || st.te.is_some() {
            return Err(bad());
        }
        st.content_length = Some(parse_content_length(value)?);
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        // RFC 9112 6.1: TE in HTTP/1.0 -> 400 (POLICY.md); one field; not with CL.
        if rl.version == (1, 0) || st.te.is_some() || st.content_length.is_some() {
            return Err(bad());
        }
        match classify_transfer_encoding(value) {
            TeKind::Invalid => return Err(bad()),
            k => st.te = Some(k),
        }
    }
    Ok(())
}

/// Parses the head at the start of `input`.
pub fn parse_head(input: &[u8]) -> Result<Request, Reject> {
    // RFC 9112 2.2: leading empty lines (exactly CRLF) are skipped; the first
    // non-empty line is the request-line.
    let mut pos = 0;
    let rl = loop {
        let (end, next) = scan_line(input, pos, &Limits::request_line())?;
        let line = &input[pos..end];
        pos = next;
        if !line.is_empty() {
            break parse_request_line(line)?;
        }
    };

    let mut st = FieldState::default();
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        let (end, next) = scan_line(input, pos, &Limits::field_line())?;
        let line = &input[pos..end];
        pos = next;
        if line.is_empty() {
            break; // the CRLF ending the head
        }
        if fields.len() >= MAX_FIELDS {
            return Err(status(431));
        }
        let (name, value) = parse_field_line(line)?;
        check_field(&rl, &mut st, &name, &value)?;
        fields.push((name, value));
    }
    let head_len = pos;

    // End-of-head rules.
    if rl.version == (1, 1) && st.host.is_none() {
        return Err(bad()); // RFC 9110 7.2: Host is required in HTTP/1.1
    }
    let framing = match (st.te, st.content_length) {
        (Some(TeKind::Unsupported), _) => return Err(status(501)),
        (Some(TeKind::Chunked), None) => Framing::Chunked,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::None,
        // Unreachable: check_field refuses these combinations.
        (Some(_), _) => return Err(bad()),
    };

    let host = st.host.unwrap_or_default();
    let (authority, origin_path) = match &rl.form {
        TargetForm::Origin => (host, rl.target.clone()),
        TargetForm::Asterisk => (host, b"*".to_vec()),
        TargetForm::Authority => (rl.target.clone(), rl.target.clone()),
        TargetForm::Absolute {
            authority,
            path_query,
        } => (authority.clone(), path_query.clone()),
    };

    Ok(Request {
        method: rl.method,
        target: rl.target,
        version: rl.version,
        fields,
        framing,
        authority,
        origin_path,
        head_len,
    })
}

// ---------------------------------------------------------------------------
// RFC 9112 7.1: chunked transfer coding
// ---------------------------------------------------------------------------

/// RFC 9112 7.1: chunk-size = 1*HEXDIG, value must fit in u64 (leading zeros
/// allowed in any number). Returns (end, value); Err(400) on no digit or overflow.
pub fn match_chunk_size(s: &[u8], i: usize) -> Result<(usize, u64), Reject> {
    let mut j = i;
    let mut v: u64 = 0;
    while let Some(d) = s.get(j).and_then(|&b| hex_value(b)) {
        v = v
            .checked_mul(16)
            .and_then(|v| v.checked_add(d))
            .ok_or_else(bad)?;
        j += 1;
    }
    if j == i {
        return Err(bad());
    }
    Ok((j, v))
}

/// RFC 9112 7.1.1: ext-val = token / quoted-string
pub fn match_chunk_ext_val(s: &[u8], i: usize) -> Option<usize> {
    match_token(s, i).or_else(|| match_quoted_string(s, i))
}

/// RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name
///   [ BWS "=" BWS chunk-ext-val ] ), chunk-ext-name = token.
/// Returns the end of the longest match; BWS is consumed only when a ";"
/// (or "=") follows it, so "5 " leaves the SP unmatched (-> 400 by caller).
pub fn match_chunk_ext(s: &[u8], i: usize) -> Option<usize> {
    let mut i = i;
    loop {
        let j = skip_ows(s, i);
        if s.get(j) != Some(&b';') {
            return Some(i);
        }
        let j = skip_ows(s, j + 1);
        let name_end = match_token(s, j)?;
        let k = skip_ows(s, name_end);
        if s.get(k) == Some(&b'=') {
            let k = skip_ows(s, k + 1);
            i = match_chunk_ext_val(s, k)?;
        } else {
            i = name_end;
        }
    }
}

/// chunk-size [ chunk-ext ] (the line without its CRLF). Ok(size).
pub fn parse_chunk_size_line(line: &[u8]) -> Result<u64, Reject> {
    let (j, size) = match_chunk_size(line, 0)?;
    if match_chunk_ext(line, j) == Some(line.len()) {
        Ok(size)
    } else {
        Err(bad())
    }
}

/// Decodes a chunked body keeping chunk boundaries: Ok((chunks, trailers, consumed)).
/// RFC 9112 7.1: chunked-body = *chunk last-chunk trailer-section CRLF
///   chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
///   last-chunk = 1*("0") [ chunk-ext ] CRLF
///   trailer-section = *( field-line CRLF )   (RFC 9112 7.1.2)
pub fn decode_chunked_parts(input: &[u8]) -> Result<(Vec<Vec<u8>>, Fields, usize), Reject> {
    let mut pos = 0;
    let mut chunks = Vec::new();
    loop {
        let (end, next) = scan_line(input, pos, &Limits::size_line())?;
        let size = parse_chunk_size_line(&input[pos..end])?;
        pos = next;
        if size == 0 {
            break; // last-chunk
        }
        // A size that cannot be addressed can never be complete in memory.
        let n = usize::try_from(size).map_err(|_| Reject::Incomplete)?;
        let data_end = pos.checked_add(n).ok_or(Reject::Incomplete)?;
        if data_end > input.len() {
            return Err(Reject::Incomplete);
        }
        chunks.push(input[pos..data_end].to_vec());
        pos = data_end;
        // chunk-data must be followed by exactly CRLF.
        match input.get(pos) {
            None => return Err(Reject::Incomplete),
            Some(&CR) => {}
            Some(_) => return Err(bad()),
        }
        match input.get(pos + 1) {
            None => return Err(Reject::Incomplete),
            Some(&LF) => {}
            Some(_) => return Err(bad()),
        }
        pos += 2;
    }
    let trailer_start = pos;
    let mut trailers = Vec::new();
    loop {
        // The final CRLF (not counted in the trailer-section limit).
        match (input.get(pos), input.get(pos + 1)) {
            (None, _) | (Some(&CR), None) => return Err(Reject::Incomplete),
            (Some(&CR), Some(&LF)) => {
                pos += 2;
                break;
            }
            _ => {}
        }
        let (end, next) = scan_line(input, pos, &Limits::trailer_line(trailer_start))?;
        trailers.push(parse_field_line(&input[pos..end])?);
        pos = next;
    }
    Ok((chunks, trailers, pos))
}

/// Decodes a chunked body at the start of `input`: Ok((data, trailers, consumed)).
pub fn decode_chunked(input: &[u8]) -> Result<(Vec<u8>, Fields, usize), Reject> {
    let (chunks, trailers, consumed) = decode_chunked_parts(input)?;
    Ok((chunks.concat(), trailers, consumed))
}

// ---------------------------------------------------------------------------
// Messages and streams (RFC 9112 6.3 message body length; 9.3 pipelining)
// ---------------------------------------------------------------------------

/// Parses one request (head and body) at the start of `input`.
pub fn parse_message(input: &[u8]) -> Result<Message, Reject> {
    let request = parse_head(input)?;
    let rest = &input[request.head_len..];
    let (body, chunks, trailers, body_len) = match request.framing {
        Framing::None => (Vec::new(), Vec::new(), Vec::new(), 0),
        Framing::Length(n) => {
            let n = usize::try_from(n).map_err(|_| Reject::Incomplete)?;
            if rest.len() < n {
                return Err(Reject::Incomplete);
            }
            (rest[..n].to_vec(), Vec::new(), Vec::new(), n)
        }
        Framing::Chunked => {
            let (chunks, trailers, used) = decode_chunked_parts(rest)?;
            (chunks.concat(), chunks, trailers, used)
        }
    };
    let len = request.head_len + body_len;
    Ok(Message {
        request,
        body,
        chunks,
        trailers,
        len,
    })
}

/// Like `parse_stream`, with chunk boundaries and trailers kept.
/// Returns None as the second element iff the input ends exactly at a message
/// boundary; Some(Incomplete) if a partial message follows (leading CRLFs of a
/// next request included); Some(Status) at the first rejection.
pub fn parse_stream_messages(input: &[u8]) -> (Vec<Message>, Option<Reject>) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        match parse_message(&input[pos..]) {
            Ok(m) => {
                pos += m.len;
                out.push(m);
            }
            Err(r) => return (out, Some(r)),
        }
    }
    (out, None)
}

/// Parses a whole byte stream of pipelined requests into requests with their
/// (decoded) bodies, stopping at the first rejection (returned as the last
/// element) or at incomplete input (Some(Incomplete)); None iff the input ends
/// exactly after a complete request (or is empty). Connection persistence
/// (Connection: close, HTTP/1.0 without keep-alive) is NOT applied: see
/// `is_persistent`.
pub fn parse_stream(input: &[u8]) -> (Vec<(Request, Vec<u8>)>, Option<Reject>) {
    let (msgs, rej) = parse_stream_messages(input);
    (msgs.into_iter().map(|m| (m.request, m.body)).collect(), rej)
}

/// RFC 9112 9.3: does the connection persist after this request?
/// "close" in Connection -> no; else HTTP/1.1 -> yes; HTTP/1.0 -> only with
/// "keep-alive" in Connection. (Connection = #connection-option, token, ci.)
pub fn is_persistent(req: &Request) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for (n, v) in &req.fields {
        if n.eq_ignore_ascii_case(b"connection") {
            for opt in v.split(|&b| b == b',') {
                let opt = trim_ows(opt);
                close |= opt.eq_ignore_ascii_case(b"close");
                keep_alive |= opt.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    if close {
        false
    } else {
        req.version == (1, 1) || keep_alive
    }
}

// ---------------------------------------------------------------------------
// Canonical serialization
// ---------------------------------------------------------------------------

/// Accepted targets starting with "http://" / "https://" (any case) are
/// exactly the absolute-form ones (CONNECT can never accept them).
fn is_absolute_form_target(t: &[u8]) -> bool {
    strip_prefix_ci(t, b"http://").is_some() || strip_prefix_ci(t, b"https://").is_some()
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The canonical head (request line, fields, final CRLF).
pub fn canonical_head(req: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&req.method);
    out.push(SP);
    out.extend_from_slice(&req.origin_path);
    out.extend_from_slice(if req.version == (1, 0) {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    if is_absolute_form_target(&req.target) {
        // RFC 9112 3.2.2: one Host = the target's authority, where the first
        // Host was, or first if there was none.
        let has_host = req
            .fields
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(b"host"));
        let mut host_written = false;
        if !has_host {
            push_field(&mut out, b"Host", &req.authority);
            host_written = true;
        }
        for (n, v) in &req.fields {
            if n.eq_ignore_ascii_case(b"host") {
                if !host_written {
                    push_field(&mut out, b"Host", &req.authority);
                    host_written = true;
                }
            } else {
                push_field(&mut out, n, v);
            }
        }
    } else {
        for (n, v) in &req.fields {
            push_field(&mut out, n, v);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_chunked(out: &mut Vec<u8>, chunks: &[&[u8]], trailers: &[(Vec<u8>, Vec<u8>)]) {
    for c in chunks.iter().filter(|c| !c.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (n, v) in trailers {
        push_field(out, n, v);
    }
    out.extend_from_slice(b"\r\n");
}

/// The canonical serialization a proxy must forward for an accepted request.
/// A chunked body is emitted as ONE chunk (none if empty), then last-chunk,
/// trailers and CRLF; a Content-Length body is copied; with Framing::None the
/// body argument is ignored.
pub fn canonical(req: &Request, body: &[u8], trailers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = canonical_head(req);
    match req.framing {
        Framing::None => {}
        Framing::Length(_) => out.extend_from_slice(body),
        Framing::Chunked => push_chunked(&mut out, &[body], trailers),
    }
    out
}

/// Same as `canonical`, but a chunked body keeps the received chunk boundaries
/// (each chunk re-framed canonically). For a Content-Length body the chunks
/// are concatenated.
pub fn canonical_with_chunks(
    req: &Request,
    chunks: &[Vec<u8>],
    trailers: &[(Vec<u8>, Vec<u8>)],
) -> Vec<u8> {
    let mut out = canonical_head(req);
    match req.framing {
        Framing::None => {}
        Framing::Length(_) => chunks.iter().for_each(|c| out.extend_from_slice(c)),
        Framing::Chunked => {
            let parts: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            push_chunked(&mut out, &parts, trailers)
        }
    }
    out
}

/// Canonical form of every accepted message of a stream (one chunk per body),
/// concatenated, plus the stream's stop reason as in `parse_stream`.
pub fn canonical_stream(input: &[u8]) -> (Vec<u8>, Option<Reject>) {
    let (msgs, rej) = parse_stream_messages(input);
    let mut out = Vec::new();
    for m in &msgs {
        out.extend_from_slice(&canonical(&m.request, &m.body, &m.trailers));
    }
    (out, rej)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const S400: Result<(), Reject> = Err(Reject::Status(400));

    fn ok(s: &[u8]) -> Request {
        match parse_head(s) {
            Ok(r) => r,
            Err(e) => panic!(
                "expected Ok for {:?}, got {:?}",
                String::from_utf8_lossy(s),
                e
            ),
        }
    }
    fn rej(s: &[u8]) -> Reject {
        match parse_head(s) {
            Ok(r) => panic!(
                "expected reject for {:?}, got {:?}",
                String::from_utf8_lossy(s),
                r
            ),
            Err(e) => e,
        }
    }
    fn st(s: &[u8]) -> Result<(), Reject> {
        parse_head(s).map(|_| ())
    }
    /// "GET / HTTP/1.1\r\nHost: h\r\n" + extra + "\r\n"
    fn get_with(extra: &str) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\nHost: h\r\n{}\r\n", extra).into_bytes()
    }
    fn line(target: &str) -> Vec<u8> {
        format!("GET {} HTTP/1.1\r\nHost: h\r\n\r\n", target).into_bytes()
    }
    fn field(name: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
        (name.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    // ---- core rules -------------------------------------------------------

    #[test]
    fn tchar_exact_set() {
        let spec = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        for b in 0..=255u8 {
            assert_eq!(is_tchar(b), spec.contains(&b), "byte {:#x}", b);
        }
    }

    #[test]
    fn token_rules() {
        assert!(is_token(b"GET"));
        assert!(is_token(b"X-Custom_1~"));
        assert!(!is_token(b""));
        assert!(!is_token(b"a b"));
        assert!(!is_token(b"a:"));
        assert!(!is_token(b"a\"b"));
        assert!(!is_token(b"(x)"));
        assert!(!is_token(&[0x80]));
    }

    #[test]
    fn ows_trim() {
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
        assert_eq!(trim_ows(b""), b"");
        assert_eq!(skip_ows(b"  x", 0), 2);
    }

    #[test]
    fn field_vchar_and_obs_text() {
        assert!(is_field_vchar(0x21) && is_field_vchar(0x7e));
        assert!(is_field_vchar(0x80) && is_field_vchar(0xff));
        assert!(is_obs_text(0x80) && !is_obs_text(0x7f));
        assert!(!is_field_vchar(0x7f) && !is_field_vchar(SP) && !is_field_vchar(0));
    }

    #[test]
    fn field_value_rule() {
        assert!(is_field_value(b""));
        assert!(is_field_value(b"a"));
        assert!(is_field_value(b"a \t b"));
        assert!(is_field_value(&[b'a', 0xff, b'b']));
        assert!(!is_field_value(b" a"));
        assert!(!is_field_value(b"a "));
        assert!(!is_field_value(b"a\0b"));
        assert!(!is_field_value(b"a\x7fb"));
        assert!(!is_field_value(b"a\x1bb"));
        assert!(!is_field_value(b"a\rb"));
    }

    #[test]
    fn quoted_string_rule() {
        assert_eq!(match_quoted_string(b"\"abc\"", 0), Some(5));
        assert_eq!(match_quoted_string(b"\"\"", 0), Some(2));
        assert_eq!(match_quoted_string(b"\"a\\\"b\"x", 0), Some(6));
        assert_eq!(match_quoted_string(b"\"a b\tc\"", 0), Some(7));
        assert_eq!(match_quoted_string(&[b'"', 0x80, b'"'], 0), Some(3));
        assert_eq!(match_quoted_string(b"\"abc", 0), None);
        assert_eq!(match_quoted_string(b"\"a\\", 0), None);
        assert_eq!(match_quoted_string(b"\"a\x01\"", 0), None);
        assert_eq!(match_quoted_string(b"\"a\\\x01\"", 0), None);
        assert_eq!(match_quoted_string(b"abc", 0), None);
    }

    #[test]
    fn pct_encoded_rule() {
        assert_eq!(match_pct_encoded(b"%2F", 0), Some(3));
        assert_eq!(match_pct_encoded(b"%aF", 0), Some(3));
        assert_eq!(match_pct_encoded(b"%zz", 0), None);
        assert_eq!(match_pct_encoded(b"%2", 0), None);
        assert_eq!(match_pct_encoded(b"%", 0), None);
        assert_eq!(match_pct_encoded(b"a2F", 0), None);
    }

    #[test]
    fn pchar_set() {
        for &b in b"azAZ09-._~!$&'()*+,;=:@" {
            assert_eq!(match_pchar(&[b], 0), Some(1), "{}", b as char);
        }
        for &b in b"/?#\"<>[\\]^`{|} \x7f" {
            assert_eq!(match_pchar(&[b], 0), None, "{}", b as char);
        }
        assert_eq!(match_pchar(&[0xc3], 0), None);
    }

    #[test]
    fn origin_form_rule() {
        for t in [
            "/", "//", "/a/b/", "/a?b=c&d", "/a?b?c/d", "/?", "/%41%7e", "/a:b@c",
        ] {
            assert!(is_origin_form(t.as_bytes()), "{}", t);
        }
        for t in [
            "", "a", "a/", "/a b", "/a#f", "/%zz", "/%4", "/a\"", "/<", "/[", "/\\", "/{", "/|",
            "/^", "/`",
        ] {
            assert!(!is_origin_form(t.as_bytes()), "{}", t);
        }
        assert!(!is_origin_form(&[b'/', 0xc3, 0xa9]));
    }

    #[test]
    fn reg_name_rule() {
        assert!(is_reg_name(b"example.com"));
        assert!(is_reg_name(b"ex%41mple"));
        assert!(is_reg_name(b"a!$&'()*+,;=b"));
        assert!(is_reg_name(b""));
        assert!(!is_reg_name(b"a b"));
        assert!(!is_reg_name(b"a@b"));
        assert!(!is_reg_name(b"a:b"));
        assert!(!is_reg_name(b"a%zz"));
        assert!(!is_reg_name(b"a/b"));
    }

    #[test]
    fn dec_octet_and_ipv4() {
        for s in [
            "0", "9", "10", "99", "100", "199", "200", "249", "250", "255",
        ] {
            assert!(is_dec_octet(s.as_bytes()), "{}", s);
        }
        for s in ["", "00", "01", "256", "260", "300", "1000", "a"] {
            assert!(!is_dec_octet(s.as_bytes()), "{}", s);
        }
        assert!(is_ipv4address(b"1.2.3.4"));
        assert!(is_ipv4address(b"255.255.255.255"));
        assert!(!is_ipv4address(b"1.2.3"));
        assert!(!is_ipv4address(b"1.2.3.4.5"));
        assert!(!is_ipv4address(b"256.1.1.1"));
        assert!(!is_ipv4address(b"01.1.1.1"));
        // ...but those are still reg-names, hence valid hosts:
        assert!(is_uri_host(b"256.1.1.1"));
    }

    #[test]
    fn ip_literal_exact() {
        for s in [
            "[::1]",
            "[::]",
            "[2001:db8::1]",
            "[::ffff:1.2.3.4]",
            "[FE80::A]",
        ] {
            assert!(is_ip_literal(s.as_bytes()), "{}", s);
        }
        // Exact: not a valid IPv6address.
        assert!(!is_ip_literal(b"[:::::::::]"));
        assert!(!is_ip_literal(b"[1:1]"));
        for s in [
            "[]",
            "[1.2.3.4]",
            "[:1]",
            "[v1.x]",
            "[::1%25eth0]",
            "[::g]",
            "[::1",
            "::1]",
            "[ ::1]",
        ] {
            assert!(!is_ip_literal(s.as_bytes()), "{}", s);
        }
    }

    #[test]
    fn port_rule() {
        assert!(is_port(b""));
        assert!(is_port(b"80"));
        assert!(is_port(b"65535"));
        assert!(!is_port(b"65536"));
        assert!(!is_port(b"000080"));
        assert!(!is_port(b"8a"));
        assert!(!is_port(b"-1"));
    }

    #[test]
    fn host_value_rule() {
        for s in [
            "example.com",
            "example.com:8080",
            "example.com:",
            "[::1]:80",
            "[::1]",
            "1.2.3.4:1",
            "EX%41.com",
        ] {
            assert!(is_host_value(s.as_bytes()), "{}", s);
        }
        for s in [
            "a b", "u@h", ":80", "[::1]x", "[::1]:a", "exa%zz", "h:80:80", "h/x", "h#", "[::1",
        ] {
            assert!(!is_host_value(s.as_bytes()), "{}", s);
        }
    }

    #[test]
    fn http_version_rule() {
        assert_eq!(parse_http_version(b"HTTP/1.1"), Ok((1, 1)));
        assert_eq!(parse_http_version(b"HTTP/1.0"), Ok((1, 0)));
        for v in ["HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTP/9.9"] {
            assert_eq!(
                parse_http_version(v.as_bytes()),
                Err(Reject::Status(505)),
                "{}",
                v
            );
        }
        for v in [
            "http/1.1",
            "HTTP/1.10",
            "HTTP/1",
            "HTTP/1.1 ",
            "HTTP/11",
            "HTTP/a.b",
            "",
            "HTTPS/1.1",
        ] {
            assert_eq!(
                parse_http_version(v.as_bytes()),
                Err(Reject::Status(400)),
                "{}",
                v
            );
        }
    }

    #[test]
    fn content_length_rule() {
        assert_eq!(parse_content_length(b"0"), Ok(0));
        assert_eq!(parse_content_length(b"0005"), Ok(5));
        assert_eq!(parse_content_length(b"18446744073709551615"), Ok(u64::MAX));
        for v in [
            "18446744073709551616",
            "",
            "+5",
            "-5",
            "5,5",
            "5 5",
            "0x5",
            "5a",
        ] {
            assert_eq!(
                parse_content_length(v.as_bytes()),
                Err(Reject::Status(400)),
                "{}",
                v
            );
        }
    }

    #[test]
    fn transfer_coding_classification() {
        use TeKind::*;
        for (v, k) in [
            ("chunked", Chunked),
            ("CHUNKED", Chunked),
            ("ChUnKeD", Chunked),
            ("gzip, chunked", Unsupported),
            ("gzip,chunked", Unsupported),
            ("gzip , deflate ,\tchunked", Unsupported),
            ("gzip;q=1, chunked", Unsupported),
            ("gzip ; a = \"x,y\", chunked", Unsupported),
            ("identity, chunked", Unsupported),
            ("chunked, chunked", Invalid),
            ("chunked, gzip", Invalid),
            ("identity", Invalid),
            ("gzip", Invalid),
            ("xchunked", Invalid),
            ("", Invalid),
            ("chunked;x", Invalid),
            ("chunked;a=b", Invalid),
            ("gzip, chunked;a=b", Invalid),
            ("\"chunked\"", Invalid),
            ("chunked,", Invalid),
            (", chunked", Invalid),
            ("gzip, , chunked", Invalid),
            ("gzip chunked", Invalid),
            ("gzip;q, chunked", Invalid),
        ] {
            assert_eq!(classify_transfer_encoding(v.as_bytes()), k, "{:?}", v);
        }
    }

    #[test]
    fn chunk_size_line_rule() {
        assert_eq!(parse_chunk_size_line(b"0"), Ok(0));
        assert_eq!(parse_chunk_size_line(b"000"), Ok(0));
        assert_eq!(parse_chunk_size_line(b"a"), Ok(10));
        assert_eq!(parse_chunk_size_line(b"A"), Ok(10));
        assert_eq!(parse_chunk_size_line(b"ffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(parse_chunk_size_line(b"00000000000000000005"), Ok(5)); // 20 digits
        assert_eq!(parse_chunk_size_line(b"0000ffffffffffffffff"), Ok(u64::MAX)); // 20 digits
        assert_eq!(
            parse_chunk_size_line(b"10000000000000000"),
            Err(Reject::Status(400))
        ); // 17 significant
        assert_eq!(parse_chunk_size_line(b"5;a"), Ok(5));
        assert_eq!(parse_chunk_size_line(b"5;a=b"), Ok(5));
        assert_eq!(parse_chunk_size_line(b"5 ;a"), Ok(5));
        assert_eq!(parse_chunk_size_line(b"5 ; a = b ;c;d=\"q\""), Ok(5));
        assert_eq!(parse_chunk_size_line(b"5;a=\"x y\""), Ok(5));
        assert_eq!(parse_chunk_size_line(b"5;a=\"x\\\"y;z\""), Ok(5));
        for l in [
            "", "5 ", "5\t", "5;", "5;a=", "5;a b", "5;a ", "5;a=b ", "5;=b", "x", "-5", "0x5",
            " 5", "5;a=\"x", "5,a",
        ] {
            assert_eq!(
                parse_chunk_size_line(l.as_bytes()),
                Err(Reject::Status(400)),
                "{:?}",
                l
            );
        }
    }

    #[test]
    fn path_and_query_matchers() {
        assert_eq!(match_absolute_path(b"/a/b?c", 0), Some(4));
        assert_eq!(match_absolute_path(b"a/b", 0), None);
        assert_eq!(match_path_abempty(b"", 0), 0);
        assert_eq!(match_path_abempty(b"x", 0), 0);
        assert_eq!(match_path_abempty(b"/a//b#", 0), 5);
        assert_eq!(match_segment(b"a%41b/c", 0), 5);
        assert_eq!(match_segment(b"a%4", 0), 1);
        assert_eq!(match_query(b"a/?b?#", 0), 5);
        assert_eq!(match_query(b"a b", 0), 1);
    }

    #[test]
    fn split_host_port_and_authority_form() {
        assert_eq!(
            split_host_port(b"h:80"),
            Some((&b"h"[..], Some(&b"80"[..])))
        );
        assert_eq!(split_host_port(b"h"), Some((&b"h"[..], None)));
        assert_eq!(split_host_port(b"h:"), Some((&b"h"[..], Some(&b""[..]))));
        assert_eq!(
            split_host_port(b"[::1]:1"),
            Some((&b"[::1]"[..], Some(&b"1"[..])))
        );
        assert_eq!(split_host_port(b""), None);
        assert!(is_authority_form(b"h:1"));
        assert!(is_authority_form(b"h:65535"));
        assert!(is_authority_form(b"1.2.3.4:0443"));
        assert!(!is_authority_form(b"h:65536"));
        assert!(!is_authority_form(b"h:000001")); // Sluice: at most five digits
        assert!(!is_authority_form(b"h:99999999999999999999"));
        assert!(!is_authority_form(b"h:"));
        assert!(!is_authority_form(b"h"));
        assert!(!is_authority_form(b"[::1]"));
    }

    #[test]
    fn field_line_direct() {
        assert_eq!(parse_field_line(b"A: b"), Ok(field("A", "b")));
        assert_eq!(parse_field_line(b"A:b"), Ok(field("A", "b")));
        assert_eq!(parse_field_line(b"A:\t b \t"), Ok(field("A", "b")));
        assert_eq!(parse_field_line(b"A::"), Ok(field("A", ":")));
        assert_eq!(parse_field_line(b"A"), Err(Reject::Status(400)));
        assert_eq!(parse_field_line(b" A: b"), Err(Reject::Status(400)));
        assert_eq!(parse_field_line(b"A : b"), Err(Reject::Status(400)));
        assert_eq!(parse_field_line(b"A: b\x7f"), Err(Reject::Status(400)));
    }

    #[test]
    fn request_line_direct_order() {
        let rl = parse_request_line(b"GET /x HTTP/1.1").unwrap();
        assert_eq!(
            (
                rl.method.as_slice(),
                rl.target.as_slice(),
                rl.version,
                rl.form
            ),
            (&b"GET"[..], &b"/x"[..], (1, 1), TargetForm::Origin)
        );
        // version is checked before the target
        assert_eq!(
            parse_request_line(b"GET /# HTTP/2.0"),
            Err(Reject::Status(505))
        );
        assert_eq!(
            parse_request_line(b"GET /# HTTP/1.1"),
            Err(Reject::Status(400))
        );
        // method before everything
        assert_eq!(
            parse_request_line(b"G@T /x HTTP/2.0"),
            Err(Reject::Status(400))
        );
        // empty target
        assert_eq!(
            parse_request_line(b"GET  HTTP/1.1"),
            Err(Reject::Status(400))
        );
    }

    #[test]
    fn chunk_ext_and_transfer_parameter_matchers() {
        assert_eq!(match_chunk_ext(b"", 0), Some(0));
        assert_eq!(match_chunk_ext(b" ", 0), Some(0));
        assert_eq!(match_chunk_ext(b";a;b=c", 0), Some(6));
        assert_eq!(match_chunk_ext(b"\t;\ta\t=\t\"\"", 0), Some(9));
        assert_eq!(match_chunk_ext(b";", 0), None);
        assert_eq!(match_chunk_ext(b";a=", 0), None);
        assert_eq!(match_transfer_parameter(b"q=1", 0), Some(3));
        assert_eq!(match_transfer_parameter(b"q = \"x\"", 0), Some(7));
        assert_eq!(match_transfer_parameter(b"q", 0), None);
        assert_eq!(match_transfer_parameter(b"=1", 0), None);
    }

    // ---- request line -------------------------------------------------------

    #[test]
    fn simple_get() {
        let input = b"GET /a?b HTTP/1.1\r\nHost: example.com\r\nX-A:  v w \t\r\n\r\nBODY";
        let r = ok(input);
        assert_eq!(r.method, b"GET");
        assert_eq!(r.target, b"/a?b");
        assert_eq!(r.version, (1, 1));
        assert_eq!(
            r.fields,
            vec![field("Host", "example.com"), field("X-A", "v w")]
        );
        assert_eq!(r.framing, Framing::None);
        assert_eq!(r.authority, b"example.com");
        assert_eq!(r.origin_path, b"/a?b");
        assert_eq!(r.head_len, input.len() - 4);
    }

    #[test]
    fn leading_empty_lines_skipped_and_counted() {
        let r = ok(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(r.head_len, 4 + 16 + 9 + 2);
        assert_eq!(st(b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"\r\rGET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b" \r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    }

    #[test]
    fn request_line_spacing() {
        assert_eq!(st(b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b" GET / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET /\r\n\r\n"), S400); // HTTP/0.9 style
        assert_eq!(st(b"GET\r\n\r\n"), S400);
    }

    #[test]
    fn method_is_token() {
        assert_eq!(ok(b"get / HTTP/1.1\r\nHost: h\r\n\r\n").method, b"get");
        assert_eq!(ok(b"X-M~ / HTTP/1.1\r\nHost: h\r\n\r\n").method, b"X-M~");
        assert_eq!(st(b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"G\x80T / HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    }

    #[test]
    fn versions() {
        assert_eq!(ok(b"GET / HTTP/1.0\r\n\r\n").version, (1, 0));
        assert_eq!(
            rej(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n"),
            Reject::Status(505)
        );
        assert_eq!(
            rej(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n"),
            Reject::Status(505)
        );
        assert_eq!(st(b"GET / http/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1.1\r\nHost: h\r\n\r\n"), S400);
    }

    #[test]
    fn request_line_errors_precede_field_errors() {
        assert_eq!(
            rej(b"GET / HTTP/2.0\r\nBad Line\r\n\r\n"),
            Reject::Status(505)
        );
        assert_eq!(rej(b"GET / HTTP/2.0\r\nX: a\n"), Reject::Status(505));
        // ...but the version is only known once the request line is complete
        assert_eq!(rej(b"GET / HTTP/2.0"), Reject::Incomplete);
    }

    #[test]
    fn ipv4_and_reg_name_hosts() {
        assert_eq!(
            ok(b"GET / HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n\r\n").authority,
            b"10.0.0.1:8080"
        );
        assert_eq!(
            ok(b"GET / HTTP/1.1\r\nHost: 999.1.1.1\r\n\r\n").authority,
            b"999.1.1.1"
        );
        assert_eq!(
            ok(b"GET / HTTP/1.1\r\nHost: a-b_c~d.%41\r\n\r\n").authority,
            b"a-b_c~d.%41"
        );
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: \xc3\xa9.com\r\n\r\n"), S400);
    }

    // ---- line endings -------------------------------------------------------

    #[test]
    fn bare_lf_anywhere() {
        assert_eq!(st(b"GET / HTTP/1.1\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\r\n\n"), S400);
        assert_eq!(st(b"GET /a\nb HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nX: a\nb\r\nHost: h\r\n\r\n"), S400);
        // Detected before the head is complete.
        assert_eq!(st(b"GET / HTTP/1.1\r\nX: a\n"), S400);
    }

    #[test]
    fn bare_cr_anywhere() {
        assert_eq!(st(b"GET / HTTP/1.1\rHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\r\n\r\r\n"), S400);
        assert_eq!(
            st(b"GET / HTTP/1.1\r\nHost: h\r\n\r"),
            Err(Reject::Incomplete)
        );
    }

    // ---- field lines --------------------------------------------------------

    #[test]
    fn obs_fold_rejected() {
        assert_eq!(st(&get_with("X: a\r\n b\r\n")), S400);
        assert_eq!(st(&get_with("X: a\r\n\tb\r\n")), S400);
        // whitespace before the first field line
        assert_eq!(st(b"GET / HTTP/1.1\r\n Host: h\r\n\r\n"), S400);
    }

    #[test]
    fn whitespace_before_colon() {
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost : h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost\t: h\r\n\r\n"), S400);
        assert_eq!(st(&get_with("X-A : v\r\n")), S400);
    }

    #[test]
    fn field_line_syntax() {
        assert_eq!(st(&get_with("NoColon\r\n")), S400);
        assert_eq!(st(&get_with(": v\r\n")), S400);
        assert_eq!(st(&get_with("X\"Y: v\r\n")), S400);
        assert_eq!(st(&get_with("X: a\0b\r\n")), S400);
        assert_eq!(st(&get_with("X: a\x7fb\r\n")), S400);
        assert_eq!(st(&get_with("X: a\x01\r\n")), S400);
        let r = ok(&get_with("X:\r\nY: \t \r\nZ:a:b\r\n"));
        assert_eq!(
            &r.fields[1..],
            &[field("X", ""), field("Y", ""), field("Z", "a:b")]
        );
        let r = ok(b"GET / HTTP/1.1\r\nHost: h\r\nX: \xff\x80 q\r\n\r\n");
        assert_eq!(r.fields[1].1, b"\xff\x80 q");
    }

    // ---- Host ---------------------------------------------------------------

    #[test]
    fn duplicate_host_case_insensitive() {
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h\r\nhost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nHOST: a\r\nHost: b\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.0\r\nHost: a\r\nhOsT: a\r\n\r\n"), S400);
    }

    #[test]
    fn missing_host() {
        assert_eq!(st(b"GET / HTTP/1.1\r\nX: y\r\n\r\n"), S400);
        let r = ok(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(r.authority, b"");
        assert_eq!(ok(b"GET / HTTP/1.0\r\nHost: a:1\r\n\r\n").authority, b"a:1");
    }

    #[test]
    fn host_values() {
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n"), S400);
        assert_eq!(st(b"GET / HTTP/1.1\r\nHost: h:x\r\n\r\n"), S400);
        assert_eq!(
            ok(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n").authority,
            b"[::1]:8080"
        );
        // Empty Host: allowed with origin-form / asterisk-form.
        assert_eq!(ok(b"GET / HTTP/1.1\r\nHost:\r\n\r\n").authority, b"");
        assert_eq!(ok(b"OPTIONS * HTTP/1.1\r\nHost: \r\n\r\n").authority, b"");
        // ...and when the target carries an authority (which is used instead).
        assert_eq!(
            ok(b"GET http://a/ HTTP/1.1\r\nHost:\r\n\r\n").authority,
            b"a"
        );
        assert_eq!(
            ok(b"CONNECT a:443 HTTP/1.1\r\nHost:\r\n\r\n").authority,
            b"a:443"
        );
    }

    // ---- Content-Length / Transfer-Encoding ---------------------------------

    #[test]
    fn content_length_framing() {
        assert_eq!(
            ok(&get_with("Content-Length: 5\r\n")).framing,
            Framing::Length(5)
        );
        assert_eq!(
            ok(&get_with("content-length:  007 \r\n")).framing,
            Framing::Length(7)
        );
        assert_eq!(
            st(&get_with("Content-Length: 5\r\nContent-Length: 5\r\n")),
            S400
        );
        assert_eq!(
            st(&get_with("Content-Length: 5\r\ncontent-length: 6\r\n")),
            S400
        );
        assert_eq!(st(&get_with("Content-Length: 5, 5\r\n")), S400);
        assert_eq!(st(&get_with("Content-Length: 5,5\r\n")), S400);
        assert_eq!(st(&get_with("Content-Length: +5\r\n")), S400);
        assert_eq!(st(&get_with("Content-Length:\r\n")), S400);
        assert_eq!(
            st(&get_with("Content-Length: 18446744073709551616\r\n")),
            S400
        );
    }

    #[test]
    fn cl_and_te_together() {
        assert_eq!(
            st(&get_with(
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
            )),
            S400
        );
        assert_eq!(
            st(&get_with(
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"
            )),
            S400
        );
        // even when the TE would be 501 on its own
        assert_eq!(
            st(&get_with(
                "Transfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n"
            )),
            S400
        );
    }

    #[test]
    fn te_variants() {
        for v in ["chunked", "Chunked", "CHUNKED", "  chunked\t"] {
            assert_eq!(
                ok(&get_with(&format!("Transfer-Encoding:{}\r\n", v))).framing,
                Framing::Chunked,
                "{:?}",
                v
            );
        }
        for v in ["gzip, chunked", "deflate,chunked", "x;a=\"b\" , chunked"] {
            assert_eq!(
                rej(&get_with(&format!("Transfer-Encoding: {}\r\n", v))),
                Reject::Status(501),
                "{:?}",
                v
            );
        }
        for v in [
            "chunked, chunked",
            "chunked, gzip",
            "identity",
            "xchunked",
            "",
            "chunked;x",
            "\"chunked\"",
            "chunked,",
            "gzip",
        ] {
            assert_eq!(
                st(&get_with(&format!("Transfer-Encoding: {}\r\n", v))),
                S400,
                "{:?}",
                v
            );
        }
    }

    #[test]
    fn te_field_count_and_version() {
        assert_eq!(
            st(&get_with(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
            )),
            S400
        );
        assert_eq!(
            st(&get_with(
                "Transfer-Encoding: gzip\r\ntransfer-encoding: chunked\r\n"
            )),
            S400
        );
        assert_eq!(
            st(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            S400
        );
        assert_eq!(
            st(b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            S400
        );
    }

    #[test]
    fn te_501_only_when_otherwise_valid() {
        // a later malformed line wins over the 501
        assert_eq!(
            st(&get_with(
                "Transfer-Encoding: gzip, chunked\r\nBad Line\r\n"
            )),
            S400
        );
        // missing Host wins over the 501
        assert_eq!(
            st(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            S400
        );
    }

    // ---- request-target forms -----------------------------------------------

    #[test]
    fn absolute_form_authority_wins() {
        let r = ok(b"GET http://example.com:8080/p?q HTTP/1.1\r\nHost: other.org\r\n\r\n");
        assert_eq!(r.authority, b"example.com:8080");
        assert_eq!(r.origin_path, b"/p?q");
        assert_eq!(r.target, b"http://example.com:8080/p?q");
        assert_eq!(r.fields, vec![field("Host", "other.org")]);
    }

    #[test]
    fn absolute_form_paths() {
        assert_eq!(ok(&line("http://a")).origin_path, b"/");
        assert_eq!(ok(&line("http://a?x=1")).origin_path, b"/?x=1");
        assert_eq!(ok(&line("HTTPS://A.b/")).origin_path, b"/");
        assert_eq!(ok(&line("HtTp://a//x/")).origin_path, b"//x/");
        assert_eq!(ok(&line("http://[::1]:80/x")).authority, b"[::1]:80");
        assert_eq!(ok(b"GET http://a/x HTTP/1.0\r\n\r\n").authority, b"a");
    }

    #[test]
    fn absolute_form_rejects() {
        for t in [
            "http://user@a/",
            "http://user:pw@a/",
            "http://@a/",
            "http:///x",
            "http://:80/",
            "http://a/#f",
            "http://a#f",
            "ftp://a/",
            "http:/a",
            "http:a",
            "httpx://a/",
            "http://a b/",
            "http://a/%zz",
            "http://a:x/",
        ] {
            assert_eq!(st(&line(t)), S400, "{}", t);
        }
    }

    #[test]
    fn userinfo_rejected() {
        assert_eq!(st(&line("http://u@h/")), S400);
        assert_eq!(st(b"CONNECT u@h:443 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    }

    #[test]
    fn asterisk_only_with_options() {
        let r = ok(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(r.origin_path, b"*");
        assert_eq!(r.authority, b"h");
        assert_eq!(st(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"options * HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"OPTIONS *x HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(
            ok(b"OPTIONS /x HTTP/1.1\r\nHost: h\r\n\r\n").origin_path,
            b"/x"
        );
    }

    #[test]
    fn connect_authority_form() {
        let r = ok(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert_eq!(r.authority, b"example.com:443");
        assert_eq!(r.origin_path, b"example.com:443");
        assert_eq!(
            ok(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n").authority,
            b"[::1]:443"
        );
        for t in [
            "example.com",
            "example.com:",
            "example.com:65536",
            "/",
            "http://a:1/",
            ":443",
            "a:443/",
        ] {
            let req = format!("CONNECT {} HTTP/1.1\r\nHost: h\r\n\r\n", t);
            assert_eq!(st(req.as_bytes()), S400, "{}", t);
        }
        // authority-form only with CONNECT
        assert_eq!(st(b"GET example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
    }

    #[test]
    fn target_bytes() {
        assert_eq!(st(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(&line("/a#b")), S400);
        assert_eq!(st(&line("/%zz")), S400);
        assert_eq!(st(&line("/%4")), S400);
        assert_eq!(st(&line("/a\"b")), S400);
        assert_eq!(st(&line("/a{b}")), S400);
        assert_eq!(st(&line("a")), S400);
        assert_eq!(st(b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(st(b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n"), S400);
        assert_eq!(
            ok(&line("/%41%2f?x=/?&y=%7E")).origin_path,
            b"/%41%2f?x=/?&y=%7E"
        );
    }

    // ---- limits -------------------------------------------------------------

    #[test]
    fn target_limit_414() {
        let t8192 = format!("/{}", "a".repeat(MAX_TARGET - 1));
        assert_eq!(ok(&line(&t8192)).target.len(), MAX_TARGET);
        let t8193 = format!("/{}", "a".repeat(MAX_TARGET));
        assert_eq!(rej(&line(&t8193)), Reject::Status(414));
        // known before the line is complete
        let partial = format!("GET {}", t8193);
        assert_eq!(rej(partial.as_bytes()), Reject::Status(414));
        let partial = format!("GET {}", t8192);
        assert_eq!(rej(partial.as_bytes()), Reject::Incomplete);
        // an invalid method is an earlier error
        let partial = format!("G(T {}", t8193);
        assert_eq!(rej(partial.as_bytes()), Reject::Incomplete);
        assert_eq!(
            rej(format!("G(T {} HTTP/1.1\r\n", t8193).as_bytes()),
            Reject::Status(400)
        );
        // 414 wins over a bad version and bad target bytes
        assert_eq!(
            rej(format!("GET /{} HTTP/9\r\n", "#".repeat(MAX_TARGET)).as_bytes()),
            Reject::Status(414)
        );
    }

    #[test]
    fn head_limit_431() {
        // A head of exactly 65536 bytes, padded with several X fields (one
        // field line may not exceed 16384 bytes).
        let mut head = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
        while head.len() + 2 < MAX_HEAD {
            let room = MAX_HEAD - 2 - head.len(); // bytes left for field lines
            let n = room.min(10000);
            if n < 6 {
                break;
            }
            head.push_str(&format!("X: {}\r\n", "a".repeat(n - 5)));
        }
        head.push_str("\r\n");
        assert_eq!(head.len(), MAX_HEAD);
        assert_eq!(ok(head.as_bytes()).head_len, MAX_HEAD);
        // one more byte in a field value -> 431
        let over = head.replacen("X: a", "X: aa", 1);
        assert_eq!(rej(over.as_bytes()), Reject::Status(431));
        // incomplete head already at the limit -> 431, not Incomplete
        let partial = &over.as_bytes()[..MAX_HEAD];
        assert_eq!(rej(partial), Reject::Status(431));
        assert_eq!(rej(&over.as_bytes()[..MAX_HEAD - 1]), Reject::Incomplete);
        // leading empty lines count toward the limit
        let leading = format!("\r\n{}", head);
        assert_eq!(rej(leading.as_bytes()), Reject::Status(431));
        assert_eq!(rej(&b"\r\n".repeat(MAX_HEAD / 2 + 1)), Reject::Status(431));
    }

    #[test]
    fn field_count_431() {
        let mut ok100 = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
        for i in 0..99 {
            ok100.push_str(&format!("X-{}: v\r\n", i));
        }
        assert_eq!(ok(format!("{}\r\n", ok100).as_bytes()).fields.len(), 100);
        let over = format!("{}X-last: v\r\n\r\n", ok100);
        assert_eq!(rej(over.as_bytes()), Reject::Status(431));
        // the count wins over the syntax of the 101st line
        let over = format!("{}Bad Line\r\n\r\n", ok100);
        assert_eq!(rej(over.as_bytes()), Reject::Status(431));
        // an earlier error wins over the count
        let early = ok100.replacen("X-0: v", "X-0 : v", 1) + "X-last: v\r\n\r\n";
        assert_eq!(rej(early.as_bytes()), Reject::Status(400));
    }

    #[test]
    fn field_line_limit_431() {
        let v16384 = "a".repeat(MAX_FIELD_LINE - 3); // "X: " + value = 16384
        assert_eq!(ok(&get_with(&format!("X: {}\r\n", v16384))).fields.len(), 2);
        let v16385 = "a".repeat(MAX_FIELD_LINE - 2);
        assert_eq!(
            rej(&get_with(&format!("X: {}\r\n", v16385))),
            Reject::Status(431)
        );
        // known before the line ends
        let partial = format!("GET / HTTP/1.1\r\nX: {}", v16385);
        assert_eq!(rej(partial.as_bytes()), Reject::Status(431));
        let partial = format!("GET / HTTP/1.1\r\nX: {}", v16384);
        assert_eq!(rej(partial.as_bytes()), Reject::Incomplete);
        // NUL early in the line: the line is still too long first
        let partial = format!("GET / HTTP/1.1\r\nX: \0{}", v16385);
        assert_eq!(rej(partial.as_bytes()), Reject::Status(431));
    }

    #[test]
    fn incomplete_heads() {
        for s in [
            "",
            "\r\n",
            "GET",
            "GET / HTTP/1.1",
            "GET / HTTP/1.1\r",
            "GET / HTTP/1.1\r\nHost: h",
            "GET / HTTP/1.1\r\nHost: h\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\n\r",
            "GET / HTTP/1.1\r\nX: \0",
        ] {
            assert_eq!(rej(s.as_bytes()), Reject::Incomplete, "{:?}", s);
        }
    }

    #[test]
    fn prefix_stability() {
        // Every status given for a prefix is the status of the whole input,
        // and Ok is only given for the whole head.
        let inputs: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nb\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec(),
            b"\r\n\r\nPOST http://a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n".to_vec(),
            b"GET / HTTP/2.0\r\nHost: h\r\n\r\n".to_vec(),
        ];
        for input in inputs {
            let full = parse_head(&input);
            for k in 0..=input.len() {
                match parse_head(&input[..k]) {
                    Err(Reject::Incomplete) => {}
                    Err(e) => assert_eq!(Err(e), full.clone().map(|_| ()), "prefix {}", k),
                    Ok(r) => assert_eq!(Ok(r), full.clone(), "prefix {}", k),
                }
            }
        }
    }

    // ---- chunked ------------------------------------------------------------

    #[test]
    fn chunked_basic_with_trailers() {
        let input = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: a \r\ny:\r\n\r\nNEXT";
        let (data, trailers, used) = decode_chunked(input).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(trailers, vec![field("X-T", "a"), field("y", "")]);
        assert_eq!(used, input.len() - 4);
        let (chunks, _, _) = decode_chunked_parts(input).unwrap();
        assert_eq!(chunks, vec![b"hello".to_vec(), b" world".to_vec()]);
    }

    #[test]
    fn chunked_empty_and_last_chunk_zeros() {
        assert_eq!(decode_chunked(b"0\r\n\r\n"), Ok((vec![], vec![], 5)));
        assert_eq!(decode_chunked(b"000\r\n\r\n"), Ok((vec![], vec![], 7)));
        assert_eq!(decode_chunked(b"0;ext=1\r\n\r\n"), Ok((vec![], vec![], 11)));
    }

    #[test]
    fn chunked_extension_quoted_string() {
        let input = b"3;name=\"quoted ; \\\" value\";x\r\nabc\r\n0 ; done\r\n\r\n";
        let (data, _, used) = decode_chunked(input).unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(used, input.len());
        assert_eq!(
            decode_chunked(b"3;n=\"unterminated\r\nabc\r\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
    }

    #[test]
    fn chunked_leading_zeros_and_overflow() {
        let input = b"00000000000000000003\r\nabc\r\n0\r\n\r\n"; // 20 digits
        assert_eq!(decode_chunked(input).unwrap().0, b"abc");
        assert_eq!(
            decode_chunked(b"10000000000000000\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"fffffffffffffffff\r\n"),
            Err(Reject::Status(400))
        );
        // 16 significant digits fit: the data is just not there yet
        assert_eq!(
            decode_chunked(b"ffffffffffffffff\r\nabc"),
            Err(Reject::Incomplete)
        );
    }

    #[test]
    fn chunked_size_line_whitespace_and_empty() {
        assert_eq!(
            decode_chunked(b"5 \r\nhello\r\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"5\t\r\nhello\r\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(decode_chunked(b"0 \r\n\r\n"), Err(Reject::Status(400)));
        assert_eq!(
            decode_chunked(b"5 ;a\r\nhello\r\n0\r\n\r\n").unwrap().0,
            b"hello"
        );
        assert_eq!(
            decode_chunked(b"\r\n5\r\nhello\r\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(decode_chunked(b"x\r\n"), Err(Reject::Status(400)));
    }

    #[test]
    fn chunked_bare_lf_cr_and_data_crlf() {
        assert_eq!(
            decode_chunked(b"5\nhello\r\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"5\rhello\r\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"5\r\nhello\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"5\r\nhelloX\r\n0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"5\r\nhello\rX0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(decode_chunked(b"0\r\n\n"), Err(Reject::Status(400)));
        assert_eq!(decode_chunked(b"0\r\nX: a\n\r\n"), Err(Reject::Status(400)));
        assert_eq!(
            decode_chunked(b"0\r\nX: a\r\n\r\r\n"),
            Err(Reject::Status(400))
        );
        // CR/LF inside chunk-data are data
        assert_eq!(
            decode_chunked(b"2\r\n\r\n\r\n0\r\n\r\n").unwrap().0,
            b"\r\n"
        );
    }

    #[test]
    fn chunked_incomplete() {
        for s in [
            "",
            "5",
            "5\r",
            "5\r\nhel",
            "5\r\nhello",
            "5\r\nhello\r",
            "5\r\nhello\r\n",
            "0\r\n",
            "0\r\n\r",
            "0\r\nX: a\r\n",
            "0\r\nX: a",
        ] {
            assert_eq!(
                decode_chunked(s.as_bytes()),
                Err(Reject::Incomplete),
                "{:?}",
                s
            );
        }
    }

    #[test]
    fn chunked_size_line_limit() {
        let ok_line = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "a".repeat(MAX_CHUNK_SIZE_LINE - 2)
        );
        assert_eq!(decode_chunked(ok_line.as_bytes()).unwrap().0, b"hello");
        let long = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "a".repeat(MAX_CHUNK_SIZE_LINE - 1)
        );
        assert_eq!(decode_chunked(long.as_bytes()), Err(Reject::Status(400)));
        let partial = format!("5;{}", "a".repeat(MAX_CHUNK_SIZE_LINE - 1));
        assert_eq!(decode_chunked(partial.as_bytes()), Err(Reject::Status(400)));
    }

    #[test]
    fn trailer_syntax_and_limit() {
        assert_eq!(
            decode_chunked(b"0\r\nX : a\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"0\r\nX: a\r\n b\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"0\r\nNoColon\r\n\r\n"),
            Err(Reject::Status(400))
        );
        assert_eq!(
            decode_chunked(b"0\r\nX: a\0\r\n\r\n"),
            Err(Reject::Status(400))
        );
        // exactly 16384 bytes of trailer-section (line incl. CRLF)
        let t = format!("X: {}\r\n", "a".repeat(MAX_TRAILER_SECTION - 5));
        assert_eq!(t.len(), MAX_TRAILER_SECTION);
        let input = format!("0\r\n{}\r\n", t);
        assert_eq!(decode_chunked(input.as_bytes()).unwrap().2, input.len());
        let t = format!("X: {}\r\n", "a".repeat(MAX_TRAILER_SECTION - 4));
        let input = format!("0\r\n{}\r\n", t);
        assert_eq!(decode_chunked(input.as_bytes()), Err(Reject::Status(400)));
    }

    // ---- streams ------------------------------------------------------------

    #[test]
    fn pipelined_gets() {
        let input = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n";
        let (reqs, rej) = parse_stream(input);
        assert_eq!(rej, None);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].0.target, b"/a");
        assert_eq!(reqs[1].0.target, b"/b");
    }

    #[test]
    fn pipelined_bodies() {
        let input = b"POST /1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
POST /2 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n\
\r\nGET /3 HTTP/1.0\r\n\r\n\
GET /4 HTTP/1.1\r\nHost: h\r\n\r\n";
        let (reqs, rej) = parse_stream(input);
        assert_eq!(rej, None);
        let got: Vec<(&[u8], &[u8])> = reqs
            .iter()
            .map(|(r, b)| (r.target.as_slice(), b.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                (&b"/1"[..], &b"abc"[..]),
                (b"/2", b"de"),
                (b"/3", b""),
                (b"/4", b"")
            ]
        );
        let (msgs, _) = parse_stream_messages(input);
        assert_eq!(msgs[1].trailers, vec![field("T", "v")]);
        assert!(!is_persistent(&msgs[2].request));
        assert!(is_persistent(&msgs[3].request));
    }

    #[test]
    fn stream_stops_at_rejection_and_incomplete() {
        let input = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n";
        let (reqs, rej) = parse_stream(input);
        assert_eq!(reqs.len(), 1);
        assert_eq!(rej, Some(Reject::Status(400)));
        let (reqs, rej) = parse_stream(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTT");
        assert_eq!((reqs.len(), rej), (1, Some(Reject::Incomplete)));
        let (reqs, rej) =
            parse_stream(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc");
        assert_eq!((reqs.len(), rej), (0, Some(Reject::Incomplete)));
        let (reqs, rej) = parse_stream(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n");
        assert_eq!((reqs.len(), rej), (0, Some(Reject::Status(400))));
        assert_eq!(parse_stream(b""), (vec![], None));
        // a trailing CRLF is the start of an incomplete next request
        let (reqs, rej) = parse_stream(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n\r\n");
        assert_eq!((reqs.len(), rej), (1, Some(Reject::Incomplete)));
    }

    // ---- canonical ------------------------------------------------------------

    #[test]
    fn canonical_origin_form() {
        let r = ok(b"\r\nGET /x HTTP/1.0\r\nHost:  h \r\nA:\tb  c\t\r\n\r\n");
        assert_eq!(
            canonical(&r, b"", &[]),
            b"GET /x HTTP/1.0\r\nHost: h\r\nA: b  c\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn canonical_absolute_form_host_replaced() {
        let r = ok(b"GET http://a:1?q HTTP/1.1\r\nX: 1\r\nhost: other\r\nY: 2\r\n\r\n");
        assert_eq!(
            canonical(&r, b"", &[]),
            b"GET /?q HTTP/1.1\r\nX: 1\r\nHost: a:1\r\nY: 2\r\n\r\n".to_vec()
        );
        let r = ok(b"GET HTTP://A/p HTTP/1.0\r\nX: 1\r\n\r\n");
        assert_eq!(
            canonical(&r, b"", &[]),
            b"GET /p HTTP/1.0\r\nHost: A\r\nX: 1\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn canonical_connect_and_options() {
        let r = ok(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n");
        assert_eq!(
            canonical(&r, b"", &[]),
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n".to_vec()
        );
        let r = ok(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(
            canonical(&r, b"", &[]),
            b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn canonical_bodies() {
        let input = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n\
001A;x=y\r\nabcdefghijklmnopqrstuvwxyz\r\n2\r\n!!\r\n00\r\nT1:  v \r\n\r\n";
        let (msgs, rej) = parse_stream_messages(input);
        assert_eq!(rej, None);
        let m = &msgs[0];
        assert_eq!(
            canonical(&m.request, &m.body, &m.trailers),
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n\
1c\r\nabcdefghijklmnopqrstuvwxyz!!\r\n0\r\nT1: v\r\n\r\n"
                .to_vec()
        );
        assert_eq!(
            canonical_with_chunks(&m.request, &m.chunks, &m.trailers),
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n\
1a\r\nabcdefghijklmnopqrstuvwxyz\r\n2\r\n!!\r\n0\r\nT1: v\r\n\r\n"
                .to_vec()
        );
        let r = ok(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            canonical(&r, b"", &[]),
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()
        );
        let r = ok(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            canonical(&r, b"a\r\n", &[]),
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\na\r\n".to_vec()
        );
    }

    #[test]
    fn canonical_ignores_body_without_framing() {
        let r = ok(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(
            canonical(&r, b"junk", &[]),
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn canonical_is_a_fixpoint() {
        let input = b"\r\nPOST http://a.example:8/x?y HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nZ:  z \r\n\r\n\
3;e\r\nabc\r\n0\r\nT: 1\r\n\r\nGET /q HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\n\r\nxy";
        let (once, rej) = canonical_stream(input);
        assert_eq!(rej, None);
        let (twice, rej) = canonical_stream(&once);
        assert_eq!(rej, None);
        assert_eq!(once, twice);
    }

    #[test]
    fn never_panics_on_small_inputs() {
        // Exhaustive over a tiny alphabet, all strings up to length 5, after a valid prefix.
        let alphabet = [b'\r', b'\n', b' ', b':', b'0', b';', b'"', b'a'];
        let prefixes: [&[u8]; 3] = [
            b"",
            b"GET / HTTP/1.1\r\nHost: h\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for p in prefixes {
            let mut buf: Vec<usize> = Vec::new();
            loop {
                let mut s = p.to_vec();
                s.extend(buf.iter().map(|&i| alphabet[i]));
                let _ = parse_head(&s);
                let _ = decode_chunked(&s);
                let _ = parse_stream(&s);
                // next combination
                let mut k = 0;
                loop {
                    if k == buf.len() {
                        buf.push(0);
                        break;
                    }
                    buf[k] += 1;
                    if buf[k] < alphabet.len() {
                        break;
                    }
                    buf[k] = 0;
                    k += 1;
                }
                if buf.len() > 5 {
                    break;
                }
            }
        }
    }
}
