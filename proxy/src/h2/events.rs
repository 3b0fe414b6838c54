//! The events whose shape follows what the response says (its status, and for
//! gRPC its `grpc-status`), and the gRPC deadline sent upstream, in one place.

use crate::exchange::Event;

/// The `grpc-status` of a response head or its trailers, when it is one.
pub(super) fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    let value = headers.get("grpc-status")?;
    std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()
}

/// The upstream response head arrived. `grpc_status`: in the head (a
/// trailers-only response).
pub(super) fn response(status: u16, grpc_status: Option<u32>) -> Event<'static> {
    Event::Response {
        status,
        grpc_status,
    }
}

/// The answer went out (`status`, 0 if none); `grpc_status`: what the client
/// finally got, in the trailers or the head.
pub(super) fn finished(status: u16, failed: bool, grpc_status: Option<u32>) -> Event<'static> {
    Event::Finished {
        status,
        failed,
        grpc_status,
    }
}

/// The `grpc-timeout` a backend gets: what is left of the call's deadline, in
/// place of the client's (which is otherwise copied with the rest of its head).
pub(super) fn grpc_timeout(
    exchange: &crate::exchange::Exchange<std::sync::Arc<crate::shared::Shared>>,
    headers: &mut http::HeaderMap,
) {
    let left = exchange.upstream_grpc_timeout(std::time::Instant::now());
    if let Some(value) = left.and_then(|t| http::HeaderValue::from_str(&t).ok()) {
        headers.insert("grpc-timeout", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_is_a_number_or_nothing() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&headers), Some(14));
        headers.insert("grpc-status", http::HeaderValue::from_static("unavailable"));
        assert_eq!(grpc_status(&headers), None);
    }
}
