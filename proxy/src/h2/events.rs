//! The events whose shape follows what the response says (its status, and for
//! gRPC its `grpc-status`, read by `exchange::grpc::status_of` as pingora's phases
//! read it), and the gRPC deadline sent upstream, in one place.

use crate::exchange::Event;

pub(super) use crate::exchange::grpc::status_of as grpc_status;

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
    exchange: &crate::exchange::Exchange<crate::shard::Handle<crate::shared::Shared>>,
    headers: &mut http::HeaderMap,
) {
    let left = exchange.upstream_grpc_timeout(std::time::Instant::now());
    if let Some(value) = left.and_then(|t| http::HeaderValue::from_str(&t).ok()) {
        headers.insert("grpc-timeout", value);
    }
}
