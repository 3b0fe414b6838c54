//! Responses the proxy writes itself (404, 429, 503, 502/504, static fallbacks), in
//! one place so their framing is always right: a Content-Length, and a small request
//! body drained first so the client's keep-alive connection stays usable.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// Request bodies up to this size are read and discarded when the proxy answers
/// itself, so the client's keep-alive connection stays usable; larger (or chunked)
/// bodies are not waited for and the connection is closed after the answer.
pub const MAX_DRAINED_BODY: u64 = 64 * 1024;

/// Writes a complete response: `content_type`, `headers`, then `body`.
pub async fn respond(
    session: &mut Session,
    status: u16,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<()> {
    let req = &session.req_header().headers;
    let chunked = req.contains_key(http::header::TRANSFER_ENCODING);
    let length = req
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if chunked || length > MAX_DRAINED_BODY {
        session.set_keepalive(None);
    } else if length > 0 {
        session.drain_request_body().await?;
    }
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 2))?;
    if let Some(ct) = content_type {
        resp.insert_header("content-type", ct)?;
    }
    for (name, value) in headers {
        resp.insert_header(name.to_string(), *value)?;
    }
    resp.set_content_length(body.len())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// A plain-text answer from the proxy itself.
pub async fn text(
    session: &mut Session,
    status: u16,
    headers: &[(&str, &str)],
    body: String,
) -> Result<()> {
    respond(
        session,
        status,
        Some("text/plain; charset=utf-8"),
        headers,
        Bytes::from(body),
    )
    .await
}
