//! For the h1 engine: an HTTP/1.1 client's request to an h2c backend, sent over
//! the h2 engine's multiplexed upstream connections, so that such requests stay on
//! the fast path instead of being handed to pingora with their connection.
//!
//! The h1 engine reads the request whole (its body bounded by its `MAX_BODY`), so
//! this sends a head and a body and gives back the response head and a body to
//! read piece by piece; the h1 engine writes HTTP/1.1.

use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use pingora::ErrorType;

use super::upstream::{unprocessed, within, Lease, Upstreams};
use crate::exchange::Peer;

/// The h2c backends of one listener's h1 engine.
pub struct H2Backends {
    upstreams: Upstreams,
}

/// What became of a request sent to an h2c backend.
pub enum Sent {
    Response(H2Response),
    ConnectFailed(&'static str),
    Broken {
        timed_out: bool,
        /// The backend did not process it (refused, or its connection broke
        /// first): it may be resent.
        stale: bool,
        error: &'static str,
    },
}

/// A response from an h2c backend whose body is still to be read.
pub struct H2Response {
    pub head: http::response::Parts,
    body: h2::RecvStream,
    limit: Option<Duration>,
    /// The stream's hold on its connection, given back when the body is done.
    _lease: Lease,
}

/// Reading the body failed; `timed_out`: by the route's timeout.
pub struct BodyBroken {
    pub timed_out: bool,
    pub error: &'static str,
}

impl H2Response {
    /// The next piece of the body (the backend's window reopened as it is read);
    /// `None` at its end.
    pub async fn data(&mut self) -> Result<Option<Bytes>, BodyBroken> {
        match within(self.limit, self.body.data()).await {
            Some(Some(Ok(data))) => {
                let _ = self.body.flow_control().release_capacity(data.len());
                Ok(Some(data))
            }
            Some(None) => Ok(None),
            Some(Some(Err(_))) => Err(BodyBroken {
                timed_out: false,
                error: ErrorType::ReadError.as_str(),
            }),
            None => Err(BodyBroken {
                timed_out: true,
                error: ErrorType::ReadTimedout.as_str(),
            }),
        }
    }

    /// The body has no more data (it may still have trailers).
    pub fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

impl H2Backends {
    /// Connections made with `identity` to meshed backends.
    pub fn new(identity: std::sync::Arc<crate::identity::tls::Tls>) -> Self {
        H2Backends {
            upstreams: Upstreams::new(identity),
        }
    }

    /// Drops closed and idle connections (run periodically).
    pub fn sweep(&self, now: std::time::Instant) {
        self.upstreams.sweep(now);
    }

    /// Sends `request` with `body` to `peer` (an h2c backend) on a connection of
    /// `thread`'s, and waits for the response head, each step within
    /// `peer.io_timeout`.
    pub async fn send(
        &self,
        thread: ThreadId,
        peer: &Peer,
        request: http::Request<()>,
        body: Bytes,
    ) -> Sent {
        let (lease, reused) = match self.upstreams.h2_conn(thread, peer).await {
            Ok(pair) => pair,
            Err(kind) => return Sent::ConnectFailed(kind.as_str()),
        };
        let limit = peer.io_timeout;
        let broken = |e: Option<&h2::Error>, error: ErrorType| Sent::Broken {
            timed_out: e.is_none(),
            stale: reused && e.is_some_and(unprocessed),
            error: error.as_str(),
        };
        let mut send = match within(limit, lease.send().ready()).await {
            Some(Ok(send)) => send,
            Some(Err(e)) => return broken(Some(&e), ErrorType::ConnectionClosed),
            None => return broken(None, ErrorType::WriteTimedout),
        };
        let (response, mut stream) = match send.send_request(request, body.is_empty()) {
            Ok(pair) => pair,
            Err(e) => return broken(Some(&e), ErrorType::WriteError),
        };
        if !body.is_empty() {
            // At most the h1 engine's MAX_BODY (64 KiB): queued whole, h2 sends it
            // as the backend's window opens.
            if let Err(e) = stream.send_data(body, true) {
                return broken(Some(&e), ErrorType::WriteError);
            }
        }
        match within(limit, response).await {
            Some(Ok(response)) => {
                let (head, body) = response.into_parts();
                Sent::Response(H2Response {
                    head,
                    body,
                    limit,
                    _lease: lease,
                })
            }
            Some(Err(e)) => broken(Some(&e), ErrorType::ReadError),
            None => broken(None, ErrorType::ReadTimedout),
        }
    }
}
