//! Sluice's data plane: a pingora proxy governed by `TrafficPolicy`.
//!
//! `ProxyHttp` phases ([`proxy`]) stay thin and call plain components with
//! synchronous APIs: the router and compiled snapshot ([`runtime`]), token buckets
//! ([`ratelimit`]), the balancer ([`balancer`]). All live policy state is one
//! `ArcSwap` of a [`runtime::Runtime`], replaced whole by [`source`] on reload.
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod balancer;
pub mod breaker;
pub mod budget;
pub mod concurrency;
pub mod control_plane;
pub mod demo_client;
pub mod demo_upstream;
pub mod endpoints;
pub mod h1;
pub mod hashring;
pub mod health;
pub mod iptables;
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
