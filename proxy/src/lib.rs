//! Sluice's data plane: an HTTP proxy governed by `TrafficPolicy`.
//!
//! The map, in the order a request meets it:
//! - on a `--transparent` listener, [`detect`] first tells HTTP from opaque TCP by
//!   the first bytes (or the destination port); opaque connections go to
//!   [`opaque`], proxied byte for byte under the policy's `spec.tcp` ([`tcplimit`]),
//!   and never reach the HTTP engines;
//! - it enters at [`h1`] (Sluice's HTTP/1.1 engine: `h1/listener.rs` accepts, `h1/mod.rs`
//!   serves), which hands what it does not serve (upgrades, large or chunked bodies,
//!   HTTP/1.0) to pingora's [`phases`] through the strict HTTP/1 [`front`];
//!   connections opening with the HTTP/2 preface go to [`h2`] (Sluice's HTTP/2
//!   engine on the `h2` crate), whose upstream connections also carry the h1
//!   engine's requests for h2c backends;
//! - [`exchange`] decides everything about it, for both engines: routing, an
//!   inbound policy's mTLS mode and authorization of the caller ([`authz`]), the
//!   rate limits, breaker and concurrency limit, peers, retries, fallbacks (a gRPC
//!   call by its `grpc-status`, answered in gRPC's terms: `exchange/grpc.rs`), and
//!   settlement (metrics and the access log through its `Observe`r; a route's and a
//!   policy's series exist while they have traffic, see [`series`]);
//! - the policy it is decided by is a [`runtime::Runtime`] snapshot in
//!   [`shared::Shared`], swapped whole by [`source`] (files) or [`control_plane`]
//!   (the gRPC stream, one resource per policy); the components it holds are plain
//!   state with synchronous APIs;
//! - with a control plane, a request for a host no held policy owns first waits for
//!   the control plane's answer about it ([`demand`], asked by [`phases`]' `discover`);
//! - a `service:` backend's pods come from the control plane's endpoint stream
//!   ([`discovery`], kept in [`services`]) and are swapped into the live snapshot's
//!   endpoints like DNS answers ([`tasks`]), without a reload;
//! - the proxy's workload identity for mTLS ([`identity`]) comes from files or from
//!   the control plane's CA ([`issuer`], renewed before it expires);
//! - with `--otlp-endpoint`, each request's span and its attempts' ([`trace`]) are
//!   queued at settlement and exported over OTLP/gRPC off the request path ([`otlp`]).
//!
//! Modules are layered and only look down (checked by `scripts/check-layers`):
//! leaves (`metrics`, `openmetrics`, `exemplar`, `trace`, `verdict`, `detect`...) < components (`ratelimit`, `breaker`, `authz`,
//! `endpoints`, `resolve`, `services`, `globallimit`, `tcplimit`...) < runtime (`runtime`, `shared`) < engine
//! (`exchange`, `front`, `phases`, `h1`, `h2`, `opaque`) < app (`source`, `control_plane`, `discovery`, `issuer`,
//! `admin`, `shutdown`, `otlp`; `main.rs` above all).
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod backoff;
pub mod balancer;
pub mod breaker;
pub mod budget;
pub mod cli;
pub mod concurrency;
pub mod conn;
pub mod control_plane;
pub mod demand;
pub mod detect;
pub mod discovery;
pub mod endpoints;
pub mod exchange;
pub mod exemplar;
pub mod front;
pub mod globallimit;
pub mod h1;
pub mod h2;
pub mod hashring;
pub mod health;
pub mod histogram;
pub mod identity;
pub mod iptables;
pub mod issuer;
pub mod listeners;
pub mod metrics;
pub mod opaque;
pub mod openmetrics;
pub mod otlp;
pub mod outlier;
pub mod p2c;
pub mod pathmatch;
pub mod phases;
pub mod pool;
pub mod ratelimit;
pub mod resolve;
pub mod respond;
pub mod runtime;
pub mod series;
pub mod services;
pub mod shard;
pub mod shared;
pub mod shutdown;
pub mod slowstart;
pub mod source;
pub mod tasks;
pub mod tcplimit;
pub mod trace;
pub mod verdict;
