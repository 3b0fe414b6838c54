//! The tests' fake Kubernetes API server as a program, for `scripts/install-smoke`:
//! the control plane started with a manifest's `--kubernetes` gets a kubeconfig
//! pointing here, and the proxies' projected tokens are registered here so that
//! TokenReview vouches for them.
//!
//! ```text
//! fake-apiserver --listen 10.213.0.1:0 \
//!     --token TOKEN=AUDIENCE,NAMESPACE,SERVICEACCOUNT,POD   (repeatable)
//! ```
//!
//! Prints the bound address (`10.213.0.1:41234`) on a line of its own on stdout,
//! then serves plain HTTP until killed. It holds no TrafficPolicies, Services or
//! EndpointSlices: their lists are empty and their watches stay open. What it answers is described in
//! `tests/support/fake_apiserver.rs`.

#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use fake_apiserver::{Account, FakeApiServer};

const USAGE: &str =
    "usage: fake-apiserver --listen ADDR [--token TOKEN=AUDIENCE,NAMESPACE,SERVICEACCOUNT,POD]...";

/// `--token`'s value: the token and whom it belongs to.
fn parse_token(spec: &str) -> Result<(String, Account), String> {
    let expected =
        || format!("--token {spec}: expected TOKEN=AUDIENCE,NAMESPACE,SERVICEACCOUNT,POD");
    let (token, owner) = spec.split_once('=').ok_or_else(expected)?;
    match owner.split(',').collect::<Vec<_>>().as_slice() {
        [audience, namespace, service_account, pod]
            if ![token, audience, namespace, service_account].contains(&"") =>
        {
            Ok((
                token.to_owned(),
                Account {
                    audience: (*audience).to_owned(),
                    namespace: (*namespace).to_owned(),
                    service_account: (*service_account).to_owned(),
                    pod: (*pod).to_owned(),
                },
            ))
        }
        _ => Err(expected()),
    }
}

fn parse_args(
    mut args: impl Iterator<Item = String>,
) -> Result<(SocketAddr, Vec<(String, Account)>), String> {
    let mut listen = None;
    let mut tokens = Vec::new();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                listen = Some(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--token" => tokens.push(parse_token(&value()?)?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    Ok((listen, tokens))
}

fn main() -> ExitCode {
    let (listen, tokens) = match parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("fake-apiserver: {message}");
            return ExitCode::from(64);
        }
    };
    let fake = Arc::new(FakeApiServer::default());
    for (token, a) in &tokens {
        fake.add_token(token, &a.audience, &a.namespace, &a.service_account, &a.pod);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-apiserver: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("fake-apiserver: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let bound = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("fake-apiserver: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{bound}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
        drop(stdout);
        fake.serve(listener).await;
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn reads_the_address_and_every_token() {
        let (listen, tokens) = parse_args(args(&[
            "--listen",
            "127.0.0.1:0",
            "--token",
            "t1=sluice,shop,reviews,reviews-0",
            "--token",
            "t2=https://kubernetes.default.svc,sluice-system,sluice-control-plane,",
        ]))
        .expect("parsed");
        assert_eq!(listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(tokens[0].0, "t1");
        assert_eq!(tokens[0].1.service_account, "reviews");
        assert_eq!(tokens[1].1.audience, "https://kubernetes.default.svc");
        assert_eq!(tokens[1].1.pod, "");
    }

    #[test]
    fn refuses_a_token_without_its_owner() {
        assert!(parse_args(args(&["--listen", "127.0.0.1:0", "--token", "t1"])).is_err());
        assert!(parse_args(args(&["--listen", "127.0.0.1:0", "--token", "t1=a,b"])).is_err());
        assert!(parse_args(args(&["--token", "t1=a,b,c,d"])).is_err());
    }
}
