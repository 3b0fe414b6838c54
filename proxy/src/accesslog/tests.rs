use super::*;
use std::time::{Duration, SystemTime};

#[test]
fn records_are_valid_json_with_every_field() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
    for path in ["/plain", "/quote\"back\\slash", "/ctl\u{1}\n\t", "/ünï€😀"] {
        let record = AccessRecord {
            ts: Timestamp(t),
            trace_id: "0af7651916cd43dd8448eb211c80319c",
            method: "GET",
            host: "shop",
            path,
            policy: Some("shop"),
            route: None,
            backend: Some("10.0.0.1:80"),
            status: 200,
            grpc_status: None,
            duration: Duration::from_micros(12_345_678),
            decision: "allowed",
            shadow_decision: None,
            fallback: Some("rate-limited"),
            attempts: 2,
            policy_version: Some("abc"),
            direction: "outbound",
            peer: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
        };
        let mut out = Vec::new();
        record.encode(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["ts"], "2026-11-18T11:06:40.123Z");
        assert_eq!(v["path"], path);
        assert_eq!(v["route"], serde_json::Value::Null);
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"].as_f64(), Some(12_345.678));
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["fallback"], "rate-limited");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["peer"], "spiffe://cluster.local/ns/shop/sa/frontend");
        assert_eq!(v.as_object().map(|o| o.len()), Some(17));
    }
    let mut out = Vec::new();
    let short = AccessRecord {
        duration: Duration::from_micros(7),
        ..sample()
    };
    short.encode(&mut out);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
    assert_eq!(v["duration_ms"].as_f64(), Some(0.007));
}

#[test]
fn tcp_records_are_valid_json() {
    let record = TcpRecord {
        ts: Timestamp(SystemTime::UNIX_EPOCH),
        direction: "outbound",
        policy: Some("shop/db"),
        port: 5432,
        end: "closed",
        bytes_received: 12,
        bytes_sent: 3400,
        duration: Duration::from_millis(1500),
        policy_version: None,
    };
    let mut out = Vec::new();
    record.encode(&mut out);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
    assert_eq!(v["protocol"], "tcp");
    assert_eq!(v["policy"], "shop/db");
    assert_eq!(v["port"], 5432);
    assert_eq!(v["bytes_sent"], 3400);
    assert_eq!(v["duration_ms"], 1500);
    assert_eq!(v["policy_version"], serde_json::Value::Null);
}

#[test]
fn lines_are_byte_for_byte_the_documented_format() {
    let record = AccessRecord {
        ts: Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        host: "bench",
        path: "/api/v1/items?q=\"x\"",
        policy: Some("bench"),
        route: Some("items"),
        backend: Some("127.0.0.1:18080"),
        status: 200,
        grpc_status: Some(14),
        duration: Duration::from_micros(734),
        attempts: 1,
        policy_version: Some("3f2a9c1b7d4e"),
        ..sample()
    };
    let log = AccessLog::with_shards(true, 1, IntCounter::new("d", "d").expect("counter"));
    log.write(&record);
    log.write_tcp(&TcpRecord {
        ts: Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_999)),
        direction: "inbound",
        policy: None,
        port: 5432,
        end: "idle_timeout",
        bytes_received: 12,
        bytes_sent: 3400,
        duration: Duration::from_millis(1500),
        policy_version: Some("abc"),
    });
    let mut out = Vec::new();
    log.flush_to(&mut out);
    assert_eq!(
        String::from_utf8_lossy(&out),
        concat!(
            r#"{"ts":"2026-11-18T11:06:40.123Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","#,
            r#""method":"GET","host":"bench","path":"/api/v1/items?q=\"x\"","policy":"bench","#,
            r#""route":"items","backend":"127.0.0.1:18080","status":200,"grpc_status":14,"#,
            r#""duration_ms":0.734,"decision":"allowed","shadow_decision":null,"fallback":null,"#,
            r#""attempts":1,"policy_version":"3f2a9c1b7d4e","direction":"outbound","peer":null}"#,
            "\n",
            r#"{"ts":"2026-11-18T11:06:40.999Z","protocol":"tcp","direction":"inbound","#,
            r#""policy":null,"port":5432,"end":"idle_timeout","bytes_received":12,"#,
            r#""bytes_sent":3400,"duration_ms":1500,"policy_version":"abc"}"#,
            "\n",
        )
    );
}

#[test]
fn a_reused_second_stamps_as_timestamp_does() {
    let mut clock = SecondStamp::default();
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_000);
    // Across second, minute, day and year boundaries, forwards and back.
    let steps = (0..3_000u64)
        .map(|i| start + Duration::from_millis(i * 7))
        .chain([
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_798_761_599_999),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_798_761_600_000),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_798_761_599_001),
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH - Duration::from_secs(5),
        ]);
    for t in steps {
        let (mut cached, mut fresh) = (Vec::new(), Vec::new());
        clock.encode(Timestamp(t), &mut cached);
        Timestamp(t).encode(&mut fresh);
        assert_eq!(
            String::from_utf8_lossy(&cached),
            String::from_utf8_lossy(&fresh)
        );
    }
}

proptest::proptest! {
    #[test]
    fn escapes_exactly_what_json_must(s in "(?s).{0,40}", ascii in proptest::collection::vec(0u8..0x80, 0..40)) {
        let simple = |b: &[u8]| b.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        proptest::prop_assert_eq!(needs_escape(s.as_bytes()), simple(s.as_bytes()));
        proptest::prop_assert_eq!(needs_escape(&ascii), simple(&ascii));
        let mut out = Vec::new();
        json_string(&mut out, &s);
        let back: String = serde_json::from_slice(&out).expect("a JSON string");
        proptest::prop_assert_eq!(back, s);
    }
}

#[test]
fn a_line_is_the_same_through_the_log() {
    let log = AccessLog::with_shards(true, 3, IntCounter::new("d", "d").expect("counter"));
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
    let record = AccessRecord {
        ts: Timestamp(t),
        grpc_status: Some(14),
        ..sample()
    };
    let mut expected = Vec::new();
    record.encode(&mut expected);
    record.encode(&mut expected);
    expected.push(b'\n');
    expected.insert(expected.len() / 2, b'\n');
    log.write(&record);
    log.write(&record);
    let mut out = Vec::new();
    log.flush_to(&mut out);
    assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&expected)
    );
    let mut again = Vec::new();
    log.flush_to(&mut again);
    assert!(again.is_empty(), "a flush empties the buffers");
}

#[test]
fn every_line_comes_out_whole_and_once_or_is_counted_dropped() {
    let dropped = IntCounter::new("d", "d").expect("counter");
    let log = AccessLog::with_shards(true, 2, dropped.clone());
    let paths = ["/a", "/b", "/c", "/d"];
    let flushed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for path in paths {
            let log = &log;
            s.spawn(move || {
                for attempts in 0..2_000 {
                    log.write(&AccessRecord {
                        path,
                        attempts,
                        ..sample()
                    });
                }
            });
        }
        // The flush task drains while they write.
        let (log, flushed) = (&log, &flushed);
        s.spawn(move || {
            for _ in 0..20 {
                log.flush_to(&mut *flushed.lock().unwrap());
                std::thread::yield_now();
            }
        });
    });
    let mut out = flushed.into_inner().unwrap();
    log.flush_to(&mut out);
    // A thread whose shard is taken writes to the next free one, so its lines can
    // come out of two shards, not in its order (their timestamps tell it): each
    // is whole, and is there exactly once unless counted dropped.
    let mut seen = std::collections::HashSet::new();
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("a whole line");
        let path = v["path"].as_str().expect("path").to_owned();
        let attempts = v["attempts"].as_u64().expect("attempts");
        assert!(seen.insert((path, attempts)), "a line written twice");
    }
    assert_eq!(seen.len() as u64 + dropped.get(), 4 * 2_000);
}

#[test]
fn a_full_buffer_drops_lines_and_counts_them() {
    let dropped = IntCounter::new("d", "d").expect("counter");
    let log = AccessLog::with_shards(true, 1, dropped.clone());
    let mut written = 0;
    while dropped.get() == 0 {
        log.write(&sample());
        written += 1;
    }
    for _ in 0..9 {
        log.write(&sample());
    }
    assert_eq!(dropped.get(), 10);
    let mut out = Vec::new();
    log.flush_to(&mut out);
    assert!(out.len() < MAX_BUFFERED + 1024, "bounded: {}", out.len());
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), written - 1);
    log.write(&sample());
    assert_eq!(dropped.get(), 10, "room again after a flush");
}

#[test]
fn a_disabled_log_writes_nothing() {
    let log = AccessLog::with_shards(false, 1, IntCounter::new("d", "d").expect("counter"));
    log.write(&sample());
    let mut out = Vec::new();
    log.flush_to(&mut out);
    assert!(out.is_empty());
}

fn sample() -> AccessRecord<'static> {
    AccessRecord {
        ts: Timestamp(SystemTime::UNIX_EPOCH),
        trace_id: "",
        method: "GET",
        host: "",
        path: "/",
        policy: None,
        route: None,
        backend: None,
        status: 0,
        grpc_status: None,
        duration: Duration::ZERO,
        decision: "allowed",
        shadow_decision: None,
        fallback: None,
        attempts: 0,
        policy_version: None,
        direction: "outbound",
        peer: None,
    }
}
