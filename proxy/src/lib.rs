//! Sluice's data plane: an HTTP proxy governed by `TrafficPolicy`.
//!
//! Two engines run one request flow ([`proxy`]): Sluice's own HTTP/1.1 engine
//! ([`h1`], the default) and pingora's `ProxyHttp` phases (everything h1 hands over,
//! or all traffic with `--engine pingora`). The flow stays thin and calls plain
//! components with synchronous APIs: the router and compiled snapshot
//! ([`runtime`]), token buckets ([`ratelimit`]), the balancer ([`balancer`],
//! [`endpoints`]). All live policy state is one
//! `ArcSwap` of a [`runtime::Runtime`], replaced whole by [`source`] on reload.
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod backoff;
pub mod balancer;
pub mod breaker;
pub mod budget;
pub mod cli;
pub mod concurrency;
pub mod control_plane;
pub mod demo_client;
pub mod demo_upstream;
pub mod endpoints;
pub mod globallimit;
pub mod h1;
pub mod hashring;
pub mod health;
pub mod iptables;
pub mod listeners;
pub mod metrics;
pub mod outlier;
pub mod p2c;
pub mod pathmatch;
pub mod proxy;
pub mod ratelimit;
pub mod respond;
pub mod runtime;
pub mod shutdown;
pub mod slowstart;
pub mod source;
pub mod trace;
