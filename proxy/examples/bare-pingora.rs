//! A bare pingora HTTP proxy: every request to one fixed upstream, no policy, no
//! metrics, no log. `bench/proxy.sh` runs it beside Sluice to show how much of
//! Sluice's per-request cost is pingora's own (the floor any pingora-based proxy pays).
//!
//! `cargo run --release --example bare-pingora -- --listen ADDR --upstream ADDR`
//! (other `--flag value` pairs, as `bench/ab.sh` passes them, are ignored).
use std::process::ExitCode;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a String> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (flag(&args, "--listen"), flag(&args, "--upstream"))
    else {
        eprintln!("usage: bare-pingora --listen ADDR --upstream ADDR");
        return ExitCode::from(64);
    };
    // The same server settings as sluice-proxy: one thread, no work stealing; and
    // a prompt exit on SIGTERM (the benchmark stops it by PID).
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: upstream.clone(),
        },
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}
