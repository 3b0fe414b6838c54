//! A minimal HTTP/1.1 keep-alive proxy on tokio and httparse: the least work any
//! HTTP/1 proxy must do per request (parse the request head, forward it, parse the
//! response head, forward it and a Content-Length body). No policy, no metrics, no
//! pooling beyond one upstream connection per client connection, no chunked bodies.
//!
//! Not a product: `bench/ab.sh` runs it beside sluice-proxy and the bare pingora
//! proxy to measure how much of the per-request cost is the HTTP/1 engine's, i.e.
//! what a purpose-built engine under Sluice's phases could reach on this machine.
//!
//! `cargo run --release --example minimal-h1 -- --listen ADDR --upstream ADDR`
//! (other `--flag value` pairs, as `bench/ab.sh` passes them, are ignored).
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// Reads until `parse` finds a complete head in `buf`; returns its length and the
/// body length it announces. `None` on EOF, a malformed or oversized head.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    parse: impl Fn(&[u8]) -> Option<Option<(usize, usize)>>,
) -> Option<(usize, usize)> {
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Some(Some(done)) => return Some(done),
                Some(None) => {}
                None => return None,
            }
        }
        if buf.len() >= MAX_HEAD {
            return None;
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
    let mut length = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None; // chunked bodies are out of scope here
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        }
    }
    Some(length)
}

fn parse_request(buf: &[u8]) -> Option<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf).ok()? {
        httparse::Status::Complete(n) => Some(Some((n, content_length(req.headers)?))),
        httparse::Status::Partial => Some(None),
    }
}

fn parse_response(buf: &[u8]) -> Option<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf).ok()? {
        httparse::Status::Complete(n) => Some(Some((n, content_length(resp.headers)?))),
        httparse::Status::Partial => Some(None),
    }
}

/// Moves one message (head + `body` bytes) from `buf`/`from` to `to`.
async fn forward(
    buf: &mut BytesMut,
    from: &mut TcpStream,
    to: &mut TcpStream,
    head: usize,
    body: usize,
) -> Option<()> {
    let mut left = head + body;
    loop {
        let n = left.min(buf.len());
        to.write_all(&buf[..n]).await.ok()?;
        buf.advance(n);
        left -= n;
        if left == 0 {
            return Some(());
        }
        buf.reserve(4096);
        if from.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr) -> Option<()> {
    let (mut down, mut up) = (BytesMut::with_capacity(4096), BytesMut::with_capacity(4096));
    let mut server: Option<TcpStream> = None;
    loop {
        let (head, body) = read_head(&mut client, &mut down, parse_request).await?;
        if server.is_none() {
            let s = TcpStream::connect(upstream).await.ok()?;
            s.set_nodelay(true).ok()?;
            server = Some(s);
        }
        let s = server.as_mut()?;
        forward(&mut down, &mut client, s, head, body).await?;
        let (head, body) = read_head(s, &mut up, parse_response).await?;
        forward(&mut up, s, &mut client, head, body).await?;
    }
}

fn flag(args: &[String], name: &str) -> Option<SocketAddr> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (flag(&args, "--listen"), flag(&args, "--upstream"))
    else {
        eprintln!("usage: minimal-h1 --listen ADDR --upstream ADDR");
        return ExitCode::from(64);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("minimal-h1: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("minimal-h1: {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            tokio::spawn(serve(client, upstream));
        }
    })
}
