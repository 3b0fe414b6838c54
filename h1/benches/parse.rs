//! What strictness costs per request (criterion): a typical request head parsed by
//! httparse alone (what the fast path did before the strict front) against
//! `RequestHead::parse` (httparse, then every RFC 9112 check) and against parse
//! plus the canonical forwarded form; a chunked body re-encoded. Results go to
//! bench/RESULTS.md with the command.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use sluice_h1::{ChunkedDecoder, RequestHead, MAX_FIELDS};

/// What wrk sends through the benchmarks, plus a browser's usual fields.
const HEAD: &[u8] = b"GET /api/v1/orders?page=2&size=50 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0\r\nAccept: application/json\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\nCookie: session=8f2a1c; theme=dark\r\nX-Request-Id: 5b0e8e1c-3f0a-4c2b-9d7e-1f2e3d4c5b6a\r\n\r\n";

fn heads(c: &mut Criterion) {
    c.bench_function("request head: httparse alone", |b| {
        b.iter(|| {
            let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
            let mut req = httparse::Request::new(&mut fields);
            black_box(req.parse(black_box(HEAD)).ok());
        })
    });
    let mut head = RequestHead::default();
    c.bench_function("request head: strict parse", |b| {
        b.iter(|| black_box(head.parse(black_box(HEAD)).ok()))
    });
    let bytes = Bytes::from_static(HEAD);
    let mut out = Vec::with_capacity(1024);
    c.bench_function(
        "request head: strict parse + canonical forwarded form",
        |b| {
            b.iter(|| {
                let _ = head.parse(black_box(HEAD));
                head.attach(bytes.clone());
                out.clear();
                head.write_forwarded(&mut out, false);
                black_box(out.len())
            })
        },
    );
}

fn chunked(c: &mut Criterion) {
    let body: Vec<u8> = (0..16)
        .flat_map(|_| {
            let mut chunk = b"400\r\n".to_vec();
            chunk.extend(std::iter::repeat_n(b'x', 0x400));
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .chain(b"0\r\n\r\n".iter().copied())
        .collect();
    let mut out = Vec::with_capacity(body.len());
    c.bench_function("chunked body: 16 KiB in 1 KiB chunks, re-encoded", |b| {
        b.iter(|| {
            out.clear();
            let mut decoder = ChunkedDecoder::new(false);
            black_box(decoder.transcode(black_box(&body), &mut out).ok())
        })
    });
}

criterion_group!(benches, heads, chunked);
criterion_main!(benches);
