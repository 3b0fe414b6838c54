//! The whole head (RFC 9112 2.1).

use super::*;

// ---------------------------------------------------------------------------
// Head (RFC 9112 2.1: HTTP-message = start-line CRLF *( field-line CRLF ) CRLF)
// ---------------------------------------------------------------------------

#[derive(Default)]
pub(crate) struct FieldState {
    host: Option<Vec<u8>>,
    content_length: Option<u64>,
    te: Option<TeKind>,
}

/// Per-field rules, applied when the field line is complete.
pub(crate) fn check_field(
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
