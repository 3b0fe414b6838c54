//! The request line, field lines and framing fields, and the line scanner.

use super::*;

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

pub(crate) fn port_value(p: &[u8]) -> Option<u32> {
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
pub(crate) struct Limits {
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
    pub(crate) fn request_line() -> Limits {
        Limits {
            abs_limit: MAX_HEAD,
            abs_status: 431,
            content_limit: usize::MAX,
            content_status: 431,
            request_line: true,
        }
    }
    pub(crate) fn field_line() -> Limits {
        Limits {
            abs_limit: MAX_HEAD,
            abs_status: 431,
            content_limit: MAX_FIELD_LINE,
            content_status: 431,
            request_line: false,
        }
    }
    pub(crate) fn size_line() -> Limits {
        Limits {
            abs_limit: usize::MAX,
            abs_status: 400,
            content_limit: MAX_CHUNK_SIZE_LINE,
            content_status: 400,
            request_line: false,
        }
    }
    pub(crate) fn trailer_line(trailer_start: usize) -> Limits {
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
pub(crate) fn scan_line(
    input: &[u8],
    start: usize,
    lim: &Limits,
) -> Result<(usize, usize), Reject> {
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
