//! The events whose shape follows what the response says (its status, and for
//! gRPC its `grpc-status`), built in one place: the exchange is learning gRPC
//! semantics (`grpc_status` on `Response` and `Finished`), and this is the only
//! file that has to know.

use crate::exchange::Event;

/// The `grpc-status` of a response head or its trailers, when it is one.
pub(super) fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    let value = headers.get("grpc-status")?;
    std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()
}

/// The upstream response head arrived. `grpc_status`: in the head (a
/// trailers-only response).
pub(super) fn response(status: u16, grpc_status: Option<u32>) -> Event<'static> {
    let _ = grpc_status;
    Event::Response { status }
}

/// The answer went out (`status`, 0 if none); `grpc_status`: what the client
/// finally got, in the trailers or the head.
pub(super) fn finished(status: u16, failed: bool, grpc_status: Option<u32>) -> Event<'static> {
    let _ = grpc_status;
    Event::Finished { status, failed }
}

/// The `grpc-timeout` a backend gets: for now the client's, copied with the rest
/// of its head (the exchange will say what is left of the deadline).
pub(super) fn grpc_timeout(
    exchange: &crate::exchange::Exchange<std::sync::Arc<crate::shared::Shared>>,
    headers: &mut http::HeaderMap,
) {
    let _ = (exchange, headers);
}
