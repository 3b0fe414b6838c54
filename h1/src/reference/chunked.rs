//! The chunked transfer coding (RFC 9112 7.1).

use super::*;

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
