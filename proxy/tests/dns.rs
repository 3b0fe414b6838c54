//! Backend names end to end: a name with several A records gets traffic on every
//! address, and when its records change the traffic follows without a reload. The
//! proxy resolves through a tiny DNS server in the test (`--dns-server`); the fake
//! backends bind 127.0.0.11-13 (all loopback on Linux) on one port.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{get, sample, start_with, version, HttpClient, TempDir};

const NAME: &str = "svc.sluice.test";

/// Answers every A query with the current `records` (TTL 1 s) and every other
/// query with no records. Hand-rolled: one question per query, the answers point
/// back at it (RFC 1035 4.1; compression pointer 0xc00c).
async fn dns_server(records: Arc<Mutex<Vec<Ipv4Addr>>>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind dns");
    let addr = socket.local_addr().expect("dns addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        // Bounded by the test's life: the runtime ends with the test.
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let reply = answer(&buf[..n], &records.lock().unwrap());
            if let Some(reply) = reply {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    addr
}

fn answer(query: &[u8], records: &[Ipv4Addr]) -> Option<Vec<u8>> {
    // The question: labels up to the root, then type and class.
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let question = query.get(12..end + 5)?;
    let qtype = u16::from_be_bytes([question[question.len() - 4], question[question.len() - 3]]);
    let records: &[Ipv4Addr] = if qtype == 1 { records } else { &[] };
    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[..2]); // id
    reply.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available
    reply.extend_from_slice(&[0, 1]);
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for ip in records {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // name, A, IN
        reply.extend_from_slice(&1u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&[0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// Three fake backends on 127.0.0.11, .12 and .13, all on one port.
async fn three_backends() -> Vec<sluice_demo::upstream::Upstream> {
    // Bounded: another process may hold the port on one of the addresses.
    for _ in 0..20 {
        let first = start_upstream("pod-11", ([127, 0, 0, 11], 0).into())
            .await
            .expect("upstream on 127.0.0.11");
        let port = first.addr().port();
        let second = start_upstream("pod-12", ([127, 0, 0, 12], port).into()).await;
        let third = start_upstream("pod-13", ([127, 0, 0, 13], port).into()).await;
        if let (Some(second), Some(third)) = (second, third) {
            return vec![first, second, third];
        }
    }
    panic!("no port free on 127.0.0.11-13");
}

async fn start_upstream(name: &str, addr: SocketAddr) -> Option<sluice_demo::upstream::Upstream> {
    let config = sluice_demo::upstream::UpstreamConfig::new(name);
    sluice_demo::upstream::Upstream::start(addr, config)
        .await
        .ok()
}

/// Which backend answered one request (`none` for a non-200).
async fn hit(client: &mut HttpClient) -> String {
    let r = client
        .request("GET", "svc", "/", &[], b"")
        .await
        .expect("request");
    match r.status {
        200 => r.header("x-upstream").unwrap_or("?").to_owned(),
        _ => "none".to_owned(),
    }
}

#[tokio::test]
async fn every_address_of_a_name_gets_traffic_and_traffic_follows_the_records() {
    let backends = three_backends().await;
    let port = backends[0].addr().port();
    let records = Arc::new(Mutex::new(vec![
        Ipv4Addr::new(127, 0, 0, 11),
        Ipv4Addr::new(127, 0, 0, 12),
    ]));
    let dns = dns_server(Arc::clone(&records)).await.to_string();
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: svc}}\nspec:\n  hosts: [svc]\n  backends:\n    - {{address: \"{NAME}:{port}\"}}\n  routes:\n    - name: all\n"
    );
    let dir = TempDir::new();
    let proxy = start_with(&dir, &yaml, &["--dns-server", &dns]).await;
    let loaded = version(&proxy).await;
    let mut client = HttpClient::connect(proxy.listen_addr())
        .await
        .expect("connect");

    // The system resolver does not know the name: the job fills it in within a
    // second or so (bounded wait: 15 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    while hit(&mut client).await == "none" {
        assert!(Instant::now() < deadline, "the name never resolved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..40 {
        *seen.entry(hit(&mut client).await).or_insert(0) += 1;
    }
    assert_eq!(seen.get("pod-11"), Some(&20), "{seen:?}");
    assert_eq!(seen.get("pod-12"), Some(&20), "{seen:?}");

    // New records: the traffic moves once the answer is asked again (TTL 1 s,
    // bounded up to 5 s), without a reload.
    *records.lock().unwrap() = vec![Ipv4Addr::new(127, 0, 0, 13)];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut streak = 0;
    while streak < 10 {
        assert!(Instant::now() < deadline, "traffic never moved to pod-13");
        streak = if hit(&mut client).await == "pod-13" {
            streak + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(version(&proxy).await, loaded, "no reload");

    let text = support::metrics(&proxy).await;
    let series = format!("sluice_backend_endpoints{{backend=\"{NAME}:{port}\",policy=\"svc\"}}");
    // Published every second: the new count may lag one tick behind.
    assert!(sample(&text, &series) >= 1.0, "{series} in\n{text}");
    let lookups = format!("sluice_dns_lookups_total{{backend=\"{NAME}:{port}\",result=\"ok\"}}");
    assert!(sample(&text, &lookups) >= 2.0, "{lookups} in\n{text}");
    let dump = get(proxy.admin_addr(), "admin", "/config_dump")
        .await
        .expect("config_dump");
    let json: serde_json::Value = serde_json::from_slice(&dump.body).expect("json");
    let listed = &json["endpoints"]["svc"][format!("{NAME}:{port}")];
    assert_eq!(listed, &serde_json::json!([format!("127.0.0.13:{port}")]));
}
