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
use support::{free_port, ProxyProcess, TempDir};
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
        let (conns, bad) = (Arc::clone(&connections), Arc::clone(&violations));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Log::default();
                conns.lock().unwrap().push(Arc::clone(&log));
                tokio::spawn(record(stream, log, Arc::clone(&bad)));
            }
        });
        Recorder {
            addr,
            connections,
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

    /// The raw bytes of every connection, in the order they were accepted.
    fn received(&self) -> Vec<Vec<u8>> {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.lock().unwrap().clone())
            .collect()
    }

    fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }
}

async fn record(mut stream: TcpStream, log: Log, violations: Arc<Mutex<Vec<String>>>) {
    let mut answered = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    // Bounded: ends when the proxy closes the connection.
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
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

/// The two engines, both in front of one recorder: the outbound listener routes
/// host `t` to it; the inbound listener sends everything to it (any host).
struct Proxies {
    recorder: Recorder,
    engines: Vec<(&'static str, ProxyProcess, SocketAddr)>,
    _dir: TempDir,
}

async fn proxies() -> Proxies {
    let recorder = Recorder::start().await;
    let dir = TempDir::new();
    let policy = dir.write(
        "policy.yaml",
        &format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: t}}\nspec:\n  hosts: [t]\n  backends: [{{address: \"{}\"}}]\n  routes:\n    - name: all\n",
            recorder.addr
        ),
    );
    let mut engines = Vec::new();
    for engine in ["h1", "pingora"] {
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let proxy = ProxyProcess::start(
            &policy,
            &[
                "--engine",
                engine,
                "--inbound",
                &inbound.to_string(),
                "--app",
                &recorder.addr.to_string(),
            ],
        );
        proxy.wait_ready().await;
        engines.push((engine, proxy, inbound));
    }
    Proxies {
        recorder,
        engines,
        _dir: dir,
    }
}

/// One answer as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
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
            head: String::from_utf8_lossy(&buf[..head.len]).into_owned(),
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

/// Waits (bounded) until the recorder holds `n` complete requests.
async fn requests_reach(recorder: &Recorder, n: usize) -> usize {
    for _ in 0..100 {
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
    let proxies = proxies().await;
    let cases = cases::requests();
    assert!(cases.len() >= 300);
    let mut failures = Vec::new();
    for case in &cases {
        let (sent, _) = reference::parse_stream_messages(&case.data);
        let heads: Vec<bool> = sent.iter().map(|m| m.request.method == b"HEAD").collect();
        for (engine, _, inbound) in &proxies.engines {
            let before = proxies.recorder.requests().len();
            let started = std::time::Instant::now();
            let outcome = match &case.expect {
                Expect::Reject(statuses) => {
                    let (answers, closed) = exchange(*inbound, &case.data, &heads, 1, true).await;
                    // A refused request's answer comes before anything of it could
                    // reach the backend; give a wrongly forwarded one time to show.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let forwarded = proxies.recorder.requests().len() - before;
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
                    let forwarded = requests_reach(&proxies.recorder, before + n).await - before;
                    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
                    (statuses != vec![200; *n] || forwarded != *n)
                        .then(|| format!("answers {statuses:?}, {forwarded} forwarded"))
                }
            };
            let outcome = match outcome {
                None if started.elapsed() > Duration::from_secs(2) => {
                    Some(format!("right, but took {:?}", started.elapsed()))
                }
                other => other,
            };
            if let Some(why) = outcome {
                failures.push(format!(
                    "{engine}: {} (expected {:?}; {}): {why}",
                    case.name, case.expect, case.source
                ));
            }
        }
    }
    failures.extend(proxies.recorder.violations());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
