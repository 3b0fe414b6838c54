//! The HTTP/1 front end to end, on both engines (`--engine h1` and `--engine
//! pingora` side by side in every test): real connections to a real
//! `sluice-proxy`, and a recording backend that checks everything it receives
//! with the RFC 9112 reference reader (`sluice_h1::reference`).
//!
//! - Every case of `h1/tests/requests.cases` (llhttp's request tests, the HTTP
//!   Garden, smuggler's mutations, RFC 9112): the status it must get, the number
//!   of requests that must reach the backend, nothing ambiguous on the wire.
//! - Each smuggling family of issue 19, asserting the bytes the backend received.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_h1::cases::{self, Expect};
use sluice_h1::reference;
use support::{ProxyProcess, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Everything one backend connection received.
type Log = Arc<Mutex<Vec<u8>>>;

/// A backend that records each connection's bytes, answers every complete
/// request (as the reference reader frames them) with `200 ok`, and notes any
/// bytes the reference reader refuses: the proxy must never send such bytes.
struct Recorder {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<Log>>>,
    /// Every byte received, in arrival order across connections.
    arrivals: Log,
    violations: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<Log>>> = Arc::default();
        let violations: Arc<Mutex<Vec<String>>> = Arc::default();
        let arrivals = Log::default();
        let (conns, bad, all) = (
            Arc::clone(&connections),
            Arc::clone(&violations),
            Arc::clone(&arrivals),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Log::default();
                conns.lock().unwrap().push(Arc::clone(&log));
                tokio::spawn(record(stream, log, Arc::clone(&all), Arc::clone(&bad)));
            }
        });
        Recorder {
            addr,
            connections,
            arrivals,
            violations,
            task,
        }
    }

    /// Every complete request received so far, connection by connection.
    fn requests(&self) -> Vec<reference::Message> {
        let logs: Vec<Vec<u8>> = self
            .connections
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.lock().unwrap().clone())
            .collect();
        logs.iter()
            .flat_map(|bytes| reference::parse_stream_messages(bytes).0)
            .collect()
    }

    /// The bytes received since the last call, in arrival order.
    fn take(&self) -> String {
        let bytes = std::mem::take(&mut *self.arrivals.lock().unwrap());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }
}

async fn record(
    mut stream: TcpStream,
    log: Log,
    arrivals: Log,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut answered = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    // Bounded: ends when the proxy closes the connection.
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        arrivals.lock().unwrap().extend_from_slice(&chunk[..n]);
        let bytes = {
            let mut log = log.lock().unwrap();
            log.extend_from_slice(&chunk[..n]);
            log.clone()
        };
        let (messages, stop) = reference::parse_stream_messages(&bytes);
        if let Some(reference::Reject::Status(status)) = stop {
            violations.lock().unwrap().push(format!(
                "the backend received what RFC 9112 refuses ({status}): {:?}",
                String::from_utf8_lossy(&bytes)
            ));
            return;
        }
        for m in &messages[answered..] {
            let answer: &[u8] = if m.request.method == b"HEAD" {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
        answered = messages.len();
    }
}

/// One engine in front of its own recorder: the outbound listener routes host
/// `t` to it; the inbound listener sends everything to it (any host).
struct Engine {
    name: &'static str,
    proxy: ProxyProcess,
    inbound: SocketAddr,
    recorder: Recorder,
    _dir: TempDir,
}

/// Both engines, each ready.
async fn engines() -> Vec<Engine> {
    let mut engines = Vec::new();
    for name in ["h1", "pingora"] {
        let recorder = Recorder::start().await;
        let dir = TempDir::new();
        let policy = dir.write(
            "policy.yaml",
            &format!(
                "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t}}\nspec:\n  hosts: [t]\n  backends: [{{address: \"{}\"}}]\n  routes:\n    - name: all\n",
                recorder.addr
            ),
        );
        let proxy = ProxyProcess::start(
            &policy,
            &[
                "--engine",
                name,
                "--inbound",
                "127.0.0.1:0",
                "--app",
                &recorder.addr.to_string(),
            ],
        );
        proxy.wait_ready().await;
        let inbound = proxy.addr("inbound");
        engines.push(Engine {
            name,
            proxy,
            inbound,
            recorder,
            _dir: dir,
        });
    }
    engines
}

/// One answer as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Reads more: `Some(true)` bytes came, `Some(false)` the peer closed, `None`
/// nothing for 5 s.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<bool> {
    let mut chunk = [0u8; 16 * 1024];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(false),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(true)
        }
        Err(_) => None,
    }
}

/// Sends `bytes` on a new connection and reads up to `want` answers (the
/// methods say which answer a HEAD); with `until_close`, then also whether the
/// proxy closed the connection. Every wait is bounded (5 s without progress).
async fn exchange(
    addr: SocketAddr,
    bytes: &[u8],
    heads: &[bool],
    want: usize,
    until_close: bool,
) -> (Vec<Answer>, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The proxy may refuse and close before reading all of it.
    let _ = stream.write_all(bytes).await;
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    let mut closed = false;
    // Bounded: each pass reads (5 s at most) or completes an answer.
    'answers: while answers.len() < want {
        let head_request = heads.get(answers.len()).copied().unwrap_or(false);
        let head = loop {
            match sluice_h1::parse_response(&buf, head_request) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => panic!("the proxy sent a malformed response ({e:?}): {buf:?}"),
            }
            match read_more(&mut stream, &mut buf).await {
                Some(true) => {}
                Some(false) => {
                    closed = true;
                    break 'answers;
                }
                None => break 'answers,
            }
        };
        let length = match head.framing {
            sluice_h1::Framing::Length(n) => n as usize,
            sluice_h1::Framing::Empty => 0,
            other => panic!("unexpected framing {other:?}"),
        };
        while buf.len() < head.len + length {
            match read_more(&mut stream, &mut buf).await {
                Some(true) => {}
                _ => panic!("a response cut short: {:?}", String::from_utf8_lossy(&buf)),
            }
        }
        answers.push(Answer {
            status: head.status,
            body: buf[head.len..head.len + length].to_vec(),
        });
        buf.drain(..head.len + length);
    }
    if until_close && !closed && answers.len() == want {
        // Closed after the answers (a refusal must close), or kept open.
        closed = matches!(read_more(&mut stream, &mut buf).await, Some(false));
    }
    (answers, closed)
}

/// Waits (bounded: 10 s) until the recorder holds `n` complete requests.
async fn requests_reach(recorder: &Recorder, n: usize) -> usize {
    for _ in 0..1000 {
        let got = recorder.requests().len();
        if got >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    recorder.requests().len()
}

#[tokio::test]
async fn every_case_of_the_corpus_gets_its_outcome_on_both_engines() {
    let engines = engines().await;
    let cases = cases::requests();
    assert!(cases.len() >= 300);
    let mut failures = Vec::new();
    for case in &cases {
        let (sent, _) = reference::parse_stream_messages(&case.data);
        let heads: Vec<bool> = sent.iter().map(|m| m.request.method == b"HEAD").collect();
        for Engine {
            name: engine,
            inbound,
            recorder,
            ..
        } in &engines
        {
            let before = recorder.requests().len();
            let outcome = match &case.expect {
                Expect::Reject(statuses) => {
                    let (answers, closed) = exchange(*inbound, &case.data, &heads, 1, true).await;
                    // A refused request's answer comes before anything of it could
                    // reach the backend; give a wrongly forwarded one time to show.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let forwarded = recorder.requests().len() - before;
                    match answers.first() {
                        Some(a) if statuses.contains(&a.status) && forwarded == 0 && closed => None,
                        a => Some(format!(
                            "got {:?}, {forwarded} forwarded, closed: {closed}",
                            a.map(|a| a.status)
                        )),
                    }
                }
                Expect::Forward(n) => {
                    let (answers, _) = exchange(*inbound, &case.data, &heads, *n, false).await;
                    let forwarded = requests_reach(recorder, before + n).await - before;
                    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
                    (statuses != vec![200; *n] || forwarded != *n)
                        .then(|| format!("answers {statuses:?}, {forwarded} forwarded"))
                }
            };
            if let Some(why) = outcome {
                failures.push(format!(
                    "{engine}: {} (expected {:?}; {}): {why}",
                    case.name, case.expect, case.source
                ));
            }
        }
    }
    for engine in &engines {
        failures.extend(engine.recorder.violations());
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The trace context every request here carries, so no engine makes one up and
/// what the backend receives is known to the byte.
const TP: &str = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";

/// Sends `bytes` to the engine's outbound listener (host `t`), reads `want`
/// answers.
async fn send(engine: &Engine, bytes: &str, want: usize, until_close: bool) -> (Vec<Answer>, bool) {
    let heads = vec![false; want];
    exchange(
        engine.proxy.listen_addr(),
        bytes.as_bytes(),
        &heads,
        want,
        until_close,
    )
    .await
}

/// A request head as the backend must receive it from either engine: the
/// canonical head, Sluice's trace context and x-forwarded-for, the final CRLF.
fn upstream(head: &str) -> String {
    format!("{head}{TP}x-forwarded-for: 127.0.0.1\r\n\r\n")
}

/// Refused with `status`, the connection closed, and nothing at all reached the
/// backend; then the next request, on a new connection, reaches it intact.
async fn refused_before_the_backend(engine: &Engine, bytes: &str, status: u16) {
    let (answers, closed) = send(engine, bytes, 1, true).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![status], "{}: {bytes:?}", engine.name);
    assert!(
        closed,
        "{}: the connection stays open after {bytes:?}",
        engine.name
    );
    assert!(
        answers[0].body.starts_with(b"sluice: "),
        "{}: {:?}",
        engine.name,
        answers[0]
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(engine.recorder.take(), "", "{}: {bytes:?}", engine.name);
    assert_eq!(engine.recorder.violations(), Vec::<String>::new());
    let next = format!("GET /next HTTP/1.1\r\nHost: t\r\n{TP}\r\n");
    let (answers, _) = send(engine, &next, 1, false).await;
    assert_eq!(
        answers.first().map(|a| a.status),
        Some(200),
        "{}",
        engine.name
    );
    requests_reach(&engine.recorder, 1).await;
    assert_eq!(
        engine.recorder.take(),
        upstream("GET /next HTTP/1.1\r\nHost: t\r\n"),
        "{}",
        engine.name
    );
}

#[tokio::test]
async fn a_field_line_ending_in_a_bare_lf_is_refused_never_relayed() {
    for engine in &engines().await {
        // The reproduction: a backend reading the LF as part of X-A's value
        // sees no Content-Length and runs the "body" as a second request.
        let smuggle = "POST / HTTP/1.1\r\nHost: t\r\nX-A: 1\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
        refused_before_the_backend(engine, smuggle, 400).await;
        // A bare LF after Host, in the request line, as the final line, alone.
        for bytes in [
            "GET / HTTP/1.1\r\nHost: t\nX: 1\r\n\r\n",
            "GET / HTTP/1.1\nHost: t\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\r\n\n",
            "GET / HTTP/1.1\nHost: t\n\n",
            "GET / HTTP/1.1\r\nHost: t\r\nX: a\rb\r\n\r\n",
        ] {
            refused_before_the_backend(engine, bytes, 400).await;
        }
    }
    // What reached the backends was checked too: nothing it could not read.
}

#[tokio::test]
async fn host_and_length_must_be_single() {
    for engine in &engines().await {
        for bytes in [
            "GET / HTTP/1.1\r\nHost: t\r\nHost: t\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\r\nhOST: evil\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: t\r\nContent_Length: 3\r\n\r\nabc",
        ] {
            refused_before_the_backend(engine, bytes, 400).await;
        }
    }
}

#[tokio::test]
async fn only_a_single_chunked_coding_frames_a_request() {
    for engine in &engines().await {
        for bytes in [
            // CL.TE and TE.CL: both framings present.
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            // TE.TE: obfuscated or repeated codings.
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nX: 1\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            refused_before_the_backend(engine, bytes, 400).await;
        }
        refused_before_the_backend(
            engine,
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        )
        .await;
    }
}

#[tokio::test]
async fn request_targets_outside_the_rfcs_bytes_are_refused() {
    for engine in &engines().await {
        for target in [
            "/caf\u{e9}",
            "/a b",
            "/a#b",
            "/%zz",
            "/a\"b",
            "/{x}",
            "/a|b",
            "/\\",
        ] {
            let bytes = format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n");
            refused_before_the_backend(engine, &bytes, 400).await;
        }
        let long = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9000));
        refused_before_the_backend(engine, &long, 414).await;
        let wide = format!(
            "GET / HTTP/1.1\r\nHost: t\r\nX: {}\r\n\r\n",
            "a".repeat(17000)
        );
        refused_before_the_backend(engine, &wide, 431).await;
    }
}

#[tokio::test]
async fn absolute_form_takes_the_targets_authority_and_goes_on_in_origin_form() {
    for engine in &engines().await {
        let (answers, _) = send(
            engine,
            &format!("GET http://t/abs?q=1 HTTP/1.1\r\nHost: elsewhere\r\n{TP}\r\n"),
            1,
            false,
        )
        .await;
        assert_eq!(
            answers.first().map(|a| a.status),
            Some(200),
            "{}",
            engine.name
        );
        requests_reach(&engine.recorder, 1).await;
        assert_eq!(
            engine.recorder.take(),
            upstream("GET /abs?q=1 HTTP/1.1\r\nHost: t\r\n"),
            "{}",
            engine.name
        );
    }
}

#[tokio::test]
async fn chunked_bodies_reach_the_backend_in_canonical_chunks() {
    for engine in &engines().await {
        // Leading zeros (17 digits), an extension with a quoted value, a trailer.
        let bytes = format!(
            "POST /c HTTP/1.1\r\nHost: t\r\n{TP}Transfer-Encoding: chunked\r\n\r\n00000000000000005;a=\"b c\"\r\nhello\r\n6 ; x\r\n world\r\n0\r\nT: 1\r\n\r\n"
        );
        let (answers, _) = send(engine, &bytes, 1, false).await;
        assert_eq!(
            answers.first().map(|a| a.status),
            Some(200),
            "{}",
            engine.name
        );
        requests_reach(&engine.recorder, 1).await;
        let got = engine.recorder.take();
        let (head, body) = got.split_once("\r\n\r\n").unwrap_or((&got, ""));
        assert!(
            head.starts_with(&format!("POST /c HTTP/1.1\r\nHost: t\r\n{TP}")),
            "{}: {got:?}",
            engine.name
        );
        // pingora re-frames what it streams (one chunk per read); either way,
        // sizes without zeros or extensions, trailers gone.
        let (messages, _) = reference::parse_stream_messages(got.as_bytes());
        assert_eq!(messages.len(), 1, "{}: {got:?}", engine.name);
        assert_eq!(messages[0].body, b"hello world", "{}", engine.name);
        assert!(messages[0].trailers.is_empty(), "{}", engine.name);
        assert!(
            body.split("\r\n").step_by(2).all(|size| size.is_empty()
                || size.bytes().all(|b| b.is_ascii_hexdigit()) && !size.starts_with('0')
                || size == "0"),
            "{}: {body:?}",
            engine.name
        );
    }
}

#[tokio::test]
async fn loose_chunk_framing_is_refused_at_once_and_never_completes_upstream() {
    for engine in &engines().await {
        // Each is answered without the client sending another byte or closing
        // (the exchange would wait, then fail): refused as soon as it arrives.
        for body in [
            "\r\n",                     // an empty size line, not the last chunk
            "5 \r\nhello\r\n0\r\n\r\n", // whitespace after the size
            "5;\r\nhello\r\n0\r\n\r\n", // an extension without a name
            "zz\r\n",                   // not hex
            "5\r\nhelloXX",             // data not followed by CRLF
            "5\nhello\r\n0\r\n\r\n",    // a bare LF
            "10000000000000000\r\n",    // 17 significant digits: beyond 64 bits
        ] {
            let bytes = format!(
                "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n{TP}\r\n{body}"
            );
            let (answers, closed) = send(engine, &bytes, 1, true).await;
            let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
            assert_eq!(statuses, vec![400], "{}: {body:?}", engine.name);
            assert!(closed, "{}: {body:?}", engine.name);
            // pingora streams bodies, so the head may have gone upstream; the
            // request never completed there, and that connection was not reused.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                engine.recorder.requests().is_empty(),
                "{}: {body:?}",
                engine.name
            );
            if engine.name == "h1" {
                // The fast path reads small chunked bodies whole before sending.
                assert_eq!(engine.recorder.take(), "", "{body:?}");
            }
        }
        // The next request reaches the backend whole, on a connection that
        // carries nothing of the refused ones (the recorder would have seen it).
        let next = format!("GET /next HTTP/1.1\r\nHost: t\r\n{TP}\r\n");
        let (answers, _) = send(engine, &next, 1, false).await;
        assert_eq!(
            answers.first().map(|a| a.status),
            Some(200),
            "{}",
            engine.name
        );
        assert_eq!(
            requests_reach(&engine.recorder, 1).await,
            1,
            "{}",
            engine.name
        );
        assert_eq!(engine.recorder.violations(), Vec::<String>::new());
    }
}

#[tokio::test]
async fn requests_pipelined_behind_handed_over_ones_are_served_in_order() {
    for engine in &engines().await {
        let bytes = format!(
            "POST /1 HTTP/1.1\r\nHost: t\r\n{TP}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
             GET /2 HTTP/1.0\r\nHost: t\r\n{TP}Connection: keep-alive\r\n\r\n\
             POST /3 HTTP/1.1\r\nHost: t\r\n{TP}Content-Length: 2\r\n\r\nhi\
             GET /4 HTTP/1.1\r\nHost: t\r\n{TP}\r\n"
        );
        let (answers, _) = send(engine, &bytes, 4, false).await;
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert_eq!(statuses, vec![200; 4], "{}", engine.name);
        requests_reach(&engine.recorder, 4).await;
        let paths: Vec<Vec<u8>> = engine
            .recorder
            .requests()
            .iter()
            .map(|m| m.request.target.clone())
            .collect();
        assert_eq!(paths, [b"/1", b"/2", b"/3", b"/4"], "{}", engine.name);
    }
}

/// A backend that answers by path with fixed, oddly framed responses.
async fn odd_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // Bounded: one request per pass, until the proxy closes.
                while read_more(&mut stream, &mut buf).await == Some(true) {
                    let (messages, _) = reference::parse_stream_messages(&buf);
                    let Some(m) = messages.first() else { continue };
                    let answer: &[u8] = match m.request.target.as_slice() {
                        b"/bare-lf" => b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 2\n\nok",
                        b"/twice" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nok",
                        b"/both" => b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                        b"/extensions" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n002;a=b\r\nok\r\n0;x\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
                    };
                    let used = m.len;
                    buf.drain(..used);
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn responses_reach_the_client_in_one_canonical_form() {
    let (backend, task) = odd_backend().await;
    let dir = TempDir::new();
    let policy = dir.write(
        "policy.yaml",
        &format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t}}\nspec:\n  hosts: [t]\n  backends: [{{address: \"{backend}\"}}]\n  routes:\n    - name: all\n"
        ),
    );
    for engine in ["h1", "pingora"] {
        let proxy = ProxyProcess::start(&policy, &["--engine", engine]);
        proxy.wait_ready().await;
        let addr = proxy.listen_addr();
        let raw = |path: &str| {
            let wire = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            async move { support::send_raw(addr, wire.as_bytes()).await }
        };
        for path in ["/bare-lf", "/twice", "/both", "/extensions"] {
            let got = raw(path).await.unwrap();
            let text = String::from_utf8_lossy(&got).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let lower = head.to_ascii_lowercase();
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "{engine} {path}: {text:?}"
            );
            assert_eq!(
                sluice_h1::syntax::bare_line_break(head.as_bytes()),
                None,
                "{engine} {path}: {text:?}"
            );
            let lengths = lower.matches("\r\ncontent-length:").count();
            let chunked = lower.contains("\r\ntransfer-encoding: chunked");
            assert!(
                lengths + usize::from(chunked) == 1,
                "{engine} {path}: one framing: {text:?}"
            );
            if chunked {
                assert_eq!(body, "2\r\nok\r\n0\r\n\r\n", "{engine} {path}");
            } else {
                assert_eq!(body, "ok", "{engine} {path}");
            }
        }
        // Lengths that disagree: the client gets Sluice's 502, not a guess.
        let got = raw("/conflict").await.unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 502"),
            "{engine}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    task.abort();
}
