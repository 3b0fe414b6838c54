use super::build::split;
use super::*;
use sluice_policy::Address;

fn backend(port: u16, weight: u32) -> Backend {
    Backend {
        address: Address {
            host: "127.0.0.1".into(),
            port,
        },
        weight,
        protocol: Protocol::Http1,
        service: None,
        tls: None,
    }
}

fn rule(
    backends: Vec<Backend>,
    algorithm: Algorithm,
    slow_start: Option<Duration>,
) -> EndpointsRule {
    EndpointsRule {
        backends,
        load_balancer: LoadBalancer {
            algorithm,
            slow_start,
        },
        health_check: None,
        outlier_detection: None,
        namespace: None,
    }
}

fn share(e: &Endpoints, now: Instant, picks: usize, index: usize) -> f64 {
    let hits = (0..picks)
        .filter(|_| e.pick(now, b"", &[]) == Some(index))
        .count();
    hits as f64 / picks as f64
}

#[test]
fn without_checks_a_pick_avoids_tried_backends_and_still_answers_when_all_were_tried() {
    let now = Instant::now();
    for algorithm in [
        Algorithm::WeightedRoundRobin,
        Algorithm::P2cEwma,
        Algorithm::ConsistentHash {
            hash_on: Key::Header("x-user".into()),
        },
    ] {
        let e = Endpoints::new(
            rule(
                vec![backend(1, 1), backend(2, 1), backend(3, 1)],
                algorithm,
                None,
            ),
            None,
            now,
        );
        assert!(e.always_available);
        for _ in 0..30 {
            assert_eq!(e.pick(now, b"k", &[0, 2]), Some(1));
            assert!(e.pick(now, b"k", &[0, 1, 2]).is_some());
        }
    }
    // Health checks turn the shortcut off: an unhealthy backend is avoided.
    let mut checked = rule(
        vec![backend(1, 1), backend(2, 1)],
        Algorithm::WeightedRoundRobin,
        None,
    );
    checked.health_check = Some(HealthCheck {
        path: "/health".into(),
        grpc: None,
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        unhealthy_after: 1,
        healthy_after: 1,
    });
    let e = Endpoints::new(checked, None, now);
    assert!(!e.always_available);
    e.record_check(1, false, now);
    for _ in 0..10 {
        assert_eq!(e.pick(now, b"", &[]), Some(0));
    }
}

#[test]
fn a_backend_added_by_a_reload_ramps_up_over_slow_start() {
    let t0 = Instant::now();
    let window = Some(Duration::from_secs(100));
    let first = Endpoints::new(
        rule(vec![backend(1, 100)], Algorithm::WeightedRoundRobin, window),
        None,
        t0,
    );
    let both = rule(
        vec![backend(1, 100), backend(2, 100)],
        Algorithm::WeightedRoundRobin,
        window,
    );
    let second = Endpoints::new(both, Some(&first), t0);
    // Just joined: the floor (10%) of its weight; halfway: half; after: all.
    let at = |secs: u64| {
        let now = t0 + Duration::from_secs(secs);
        second.refresh(now);
        share(&second, now, 2000, 1)
    };
    assert!((at(0) - 10.0 / 110.0).abs() < 0.01, "{}", at(0));
    assert!((at(50) - 50.0 / 150.0).abs() < 0.01, "{}", at(50));
    assert!((at(100) - 0.5).abs() < 0.01, "{}", at(100));
}

#[test]
fn p2c_prefers_the_faster_of_two_backends() {
    let now = Instant::now();
    let e = Endpoints::new(
        rule(vec![backend(1, 1), backend(2, 1)], Algorithm::P2cEwma, None),
        None,
        now,
    );
    for _ in 0..20 {
        e.begin(0);
        e.finish(0, now, Duration::from_millis(1), false);
        e.begin(1);
        e.finish(1, now, Duration::from_millis(80), false);
    }
    assert!(share(&e, now, 1000, 0) > 0.9);
}

#[test]
fn consistent_hash_keeps_a_key_on_its_backend_and_skips_tried_ones() {
    let now = Instant::now();
    let hash = Algorithm::ConsistentHash {
        hash_on: Key::Header("x-user-id".into()),
    };
    let e = Endpoints::new(
        rule(
            vec![backend(1, 1), backend(2, 1), backend(3, 1)],
            hash,
            None,
        ),
        None,
        now,
    );
    let first = e.pick(now, b"alice", &[]).unwrap_or(99);
    for _ in 0..50 {
        assert_eq!(e.pick(now, b"alice", &[]), Some(first));
    }
    let next = e.pick(now, b"alice", &[first]).unwrap_or(99);
    assert_ne!(next, first);
}

#[test]
fn unhealthy_backends_get_no_traffic_and_return_when_healthy() {
    let now = Instant::now();
    let mut r = rule(
        vec![backend(1, 1), backend(2, 1)],
        Algorithm::WeightedRoundRobin,
        None,
    );
    let check = HealthCheck {
        path: "/healthz".into(),
        grpc: None,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        unhealthy_after: 2,
        healthy_after: 1,
    };
    r.health_check = Some(check);
    let e = Endpoints::new(r, None, now);
    assert_eq!(e.record_check(1, false, now), None);
    assert_eq!(e.record_check(1, false, now), Some(Health::Unhealthy));
    for _ in 0..20 {
        assert_eq!(e.pick(now, b"", &[]), Some(0));
    }
    assert_eq!(e.record_check(1, true, now), Some(Health::Healthy));
    assert!((share(&e, now, 100, 1) - 0.5).abs() < 0.05);
}

#[test]
fn all_backends_unhealthy_falls_back_to_panic_mode() {
    let now = Instant::now();
    let mut r = rule(vec![backend(1, 1)], Algorithm::WeightedRoundRobin, None);
    r.outlier_detection = Some(OutlierDetection {
        consecutive_failures: 1,
        eject_for: Duration::from_secs(30),
        max_ejected_percent: 100,
    });
    let e = Endpoints::new(r, None, now);
    assert!(e.finish(0, now, Duration::from_millis(1), true));
    assert!(e.is_ejected(0, now));
    assert_eq!(
        e.pick(now, b"", &[]),
        Some(0),
        "better a suspect backend than none"
    );
}

#[test]
fn health_checks_are_due_once_per_interval() {
    let now = Instant::now();
    let mut r = rule(vec![backend(1, 1)], Algorithm::WeightedRoundRobin, None);
    r.health_check = Some(HealthCheck {
        path: "/healthz".into(),
        grpc: None,
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(1),
        unhealthy_after: 1,
        healthy_after: 1,
    });
    let e = Endpoints::new(r, None, now);
    assert!(e.health_check_due(now).is_some());
    assert!(e.health_check_due(now + Duration::from_secs(4)).is_none());
    assert!(e.health_check_due(now + Duration::from_secs(5)).is_some());
}

fn addrs(last_octets: std::ops::Range<u8>) -> Vec<SocketAddr> {
    last_octets
        .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
        .collect()
}

fn hash_on_user() -> Algorithm {
    Algorithm::ConsistentHash {
        hash_on: Key::Header("x-user".into()),
    }
}

/// Two backends weighted 90/10 resolving to 3 and 7 addresses.
fn ninety_ten(algorithm: Algorithm, now: Instant) -> Endpoints {
    Endpoints::build(
        rule(vec![backend(1, 90), backend(2, 10)], algorithm, None),
        vec![addrs(1..4), addrs(11..18)],
        None,
        now,
    )
}

/// The share of picks that went to backend 0's endpoints.
fn first_backend_share(e: &Endpoints, picks: &[usize]) -> f64 {
    let first = picks.iter().filter(|i| e.targets[**i].backend == 0).count();
    first as f64 / picks.len() as f64
}

#[test]
fn every_address_is_an_endpoint_of_its_backend() {
    let e = ninety_ten(Algorithm::WeightedRoundRobin, Instant::now());
    assert_eq!(e.targets.len(), 10);
    assert_eq!(e.backend_addresses(0), addrs(1..4).as_slice());
    assert_eq!(
        e.addresses_of("127.0.0.1:2"),
        Some(addrs(11..18).as_slice())
    );
    assert!(e.targets[..3]
        .iter()
        .all(|t| t.backend == 0 && t.label == "127.0.0.1:1"));
    // One counter cache per backend, shared by its endpoints: one series each.
    assert!(Arc::ptr_eq(&e.targets[3].upstream, &e.targets[9].upstream));
    assert!(!Arc::ptr_eq(&e.targets[0].upstream, &e.targets[3].upstream));
}

#[test]
fn a_backend_without_addresses_has_no_endpoint() {
    let e = Endpoints::build(
        rule(
            vec![backend(1, 1), backend(2, 1)],
            Algorithm::WeightedRoundRobin,
            None,
        ),
        vec![vec![], addrs(1..3)],
        None,
        Instant::now(),
    );
    assert_eq!(e.targets.len(), 2);
    assert!(e.targets.iter().all(|t| t.backend == 1));
    assert!(e.backend_addresses(0).is_empty());
}

#[test]
fn weight_is_a_backends_share_whatever_its_endpoint_count_with_round_robin() {
    let now = Instant::now();
    let e = ninety_ten(Algorithm::WeightedRoundRobin, now);
    let picks: Vec<usize> = (0..10_000).filter_map(|_| e.pick(now, b"", &[])).collect();
    let share = first_backend_share(&e, &picks);
    assert!((share - 0.9).abs() < 0.02, "{share}");
}

#[test]
fn weight_is_a_backends_share_whatever_its_endpoint_count_with_maglev() {
    let now = Instant::now();
    let e = ninety_ten(hash_on_user(), now);
    let picks: Vec<usize> = (0..20_000)
        .filter_map(|k| e.pick(now, format!("user-{k}").as_bytes(), &[]))
        .collect();
    let share = first_backend_share(&e, &picks);
    assert!((share - 0.9).abs() < 0.02, "{share}");
}

/// P2C balances load, so weights show in the split once many requests are in
/// flight (the `+ 1` in `rtt * (pending + 1) / weight` then matters little): here
/// a request every millisecond, each taking two seconds, at equal latency.
#[test]
fn weight_is_a_backends_share_whatever_its_endpoint_count_with_p2c() {
    let t0 = Instant::now();
    let e = ninety_ten(Algorithm::P2cEwma, t0);
    let rtt = Duration::from_secs(2);
    let mut in_flight = std::collections::VecDeque::new();
    let mut picks = Vec::new();
    for tick in 0..30_000u64 {
        let now = t0 + Duration::from_millis(tick);
        // Every request takes `rtt`, so they end in the order they began.
        while in_flight.front().is_some_and(|(done, _)| *done <= now) {
            if let Some((_, i)) = in_flight.pop_front() {
                e.finish(i, now, rtt, false);
            }
        }
        if let Some(i) = e.pick(now, b"", &[]) {
            e.begin(i);
            in_flight.push_back((now + rtt, i));
            // Measured once the in-flight counts have settled.
            if tick >= 10_000 {
                picks.push(i);
            }
        }
    }
    let share = first_backend_share(&e, &picks);
    assert!((share - 0.9).abs() < 0.02, "{share}");
}

#[test]
fn the_split_keeps_a_backends_share_within_one_percent() {
    let scale = WEIGHT_SCALE / 90;
    let (a, b) = (split(90, 3, scale), split(10, 7, scale));
    let share = f64::from(3 * a) / f64::from(3 * a + 7 * b);
    assert!((share - 0.9).abs() < 0.001, "{share}");
    assert_eq!(split(0, 3, scale), 0);
    assert_eq!(
        split(1, 1_000, 1),
        1,
        "a live backend's endpoints never starve"
    );
    assert_eq!(split(u32::MAX, 1, WEIGHT_SCALE), u32::MAX, "saturates");
}

fn p2c_cost(e: &Endpoints, index: usize, now: Instant) -> f64 {
    match &e.picker {
        Picker::P2c(p) => p.cost(index, now),
        _ => f64::NAN,
    }
}

#[test]
fn a_remaining_endpoint_keeps_its_p2c_state_across_a_rebuild() {
    let now = Instant::now();
    let r = rule(vec![backend(1, 1)], Algorithm::P2cEwma, None);
    let old = Endpoints::build(r, vec![addrs(1..3)], None, now);
    old.begin(1);
    old.finish(1, now, Duration::from_millis(80), false);
    old.begin(1);
    let cost = p2c_cost(&old, 1, now);
    // 10.0.0.1 goes, 10.0.0.2 stays (now at index 0), 10.0.0.3 comes.
    let new = old.with_resolved(vec![addrs(2..4)], now).expect("changed");
    assert_eq!(new.targets[0].addr, addrs(2..3)[0]);
    assert_eq!(p2c_cost(&new, 0, now), cost);
    assert_eq!(new.pending_total(), 1);
    // The request in flight on the old set settles into the same state.
    old.finish(1, now, Duration::from_millis(80), false);
    assert_eq!(new.pending_total(), 0);
    assert!(
        old.with_resolved(vec![addrs(1..3)], now).is_none(),
        "unchanged"
    );
}

#[test]
fn a_remaining_endpoint_keeps_its_health_and_ejection_across_a_rebuild() {
    let now = Instant::now();
    let mut r = rule(vec![backend(1, 1)], Algorithm::WeightedRoundRobin, None);
    r.health_check = Some(HealthCheck {
        path: "/health".into(),
        grpc: None,
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        unhealthy_after: 1,
        healthy_after: 1,
    });
    r.outlier_detection = Some(OutlierDetection {
        consecutive_failures: 1,
        eject_for: Duration::from_secs(30),
        max_ejected_percent: 100,
    });
    let old = Endpoints::build(r, vec![addrs(1..4)], None, now);
    assert!(old.finish(0, now, Duration::from_millis(1), true));
    old.record_check(1, false, now);
    // 10.0.0.1 and .2 stay at indexes 0 and 1; .4 joins.
    let mut next = addrs(1..3);
    next.push(addrs(4..5)[0]);
    let new = old.with_resolved(vec![next], now).expect("changed");
    assert!(new.is_ejected(0, now));
    assert!(!new.is_healthy(1));
    assert!(new.is_healthy(2) && !new.is_ejected(2, now));
    for _ in 0..10 {
        assert_eq!(new.pick(now, b"", &[]), Some(2));
    }
}

#[test]
fn new_endpoints_ramp_up_and_remaining_ones_keep_their_ramp() {
    let t0 = Instant::now();
    let window = Some(Duration::from_secs(100));
    let r = rule(vec![backend(1, 100)], Algorithm::WeightedRoundRobin, window);
    let first = Endpoints::build(r, vec![addrs(1..2)], None, t0);
    let t1 = t0 + Duration::from_secs(50);
    let second = first.with_resolved(vec![addrs(1..3)], t1).expect("changed");
    let t2 = t1 + Duration::from_secs(50);
    let third = second
        .with_resolved(vec![addrs(1..4)], t2)
        .expect("changed");
    third.refresh(t2);
    // The first set never ramps; .2 is halfway through its window; .3 just joined.
    let (full, half, new) = (100.0, 50.0, 10.0);
    let total = full + half + new;
    assert!((share(&third, t2, 3000, 0) - full / total).abs() < 0.01);
    assert!((share(&third, t2, 3000, 1) - half / total).abs() < 0.01);
    assert!((share(&third, t2, 3000, 2) - new / total).abs() < 0.01);
}

/// Of the keys that mapped to an endpoint that remains, the share that moved to
/// another old endpoint (moving to a new one is its fair share, not disruption).
fn maglev_disruption(old: &Endpoints, new: &Endpoints, now: Instant) -> f64 {
    let (mut kept, mut moved) = (0u32, 0u32);
    for k in 0..20_000 {
        let key = format!("user-{k}");
        let (Some(a), Some(b)) = (
            old.pick(now, key.as_bytes(), &[]),
            new.pick(now, key.as_bytes(), &[]),
        ) else {
            continue;
        };
        let (was, is) = (old.targets[a].addr, new.targets[b].addr);
        if !new.backend_addresses(0).contains(&was) || !old.backend_addresses(0).contains(&is) {
            continue;
        }
        if was == is {
            kept += 1;
        } else {
            moved += 1;
        }
    }
    f64::from(moved) / f64::from(kept + moved)
}

#[test]
fn maglev_keys_of_remaining_endpoints_mostly_stay_across_a_rebuild() {
    let now = Instant::now();
    let old = Endpoints::build(
        rule(vec![backend(1, 1)], hash_on_user(), None),
        vec![addrs(1..11)],
        None,
        now,
    );
    // .1 goes: only its keys should move.
    let removed = old.with_resolved(vec![addrs(2..11)], now).expect("changed");
    let moved = maglev_disruption(&old, &removed, now);
    assert!(moved < 0.03, "{moved}");
    // .1 goes and .11 comes: remaining keys stay or go to .11.
    let replaced = old.with_resolved(vec![addrs(2..12)], now).expect("changed");
    let moved = maglev_disruption(&old, &replaced, now);
    assert!(moved < 0.03, "{moved}");
}

fn members(ready: std::ops::Range<u8>, draining: std::ops::Range<u8>) -> Vec<Member> {
    let ready = addrs(ready).into_iter().map(Member::ready);
    let draining = addrs(draining).into_iter().map(|addr| Member {
        addr,
        draining: true,
        identity: None,
    });
    ready.chain(draining).collect()
}

#[test]
fn a_draining_endpoint_gets_no_new_request_while_a_ready_one_is_left() {
    let now = Instant::now();
    for algorithm in [
        Algorithm::WeightedRoundRobin,
        Algorithm::P2cEwma,
        hash_on_user(),
    ] {
        let r = rule(vec![backend(1, 1)], algorithm, None);
        // 10.0.0.1 and .2 ready, .3 draining (index 2).
        let e = Endpoints::build_members(r, vec![members(1..3, 3..4)], None, now);
        assert!(!e.always_available);
        for n in 0..100u32 {
            let key = n.to_string();
            assert_ne!(e.pick(now, key.as_bytes(), &[]), Some(2));
        }
        // A retry still prefers a ready endpoint already tried.
        assert_ne!(e.pick(now, b"k", &[0, 1]), Some(2));
        assert_eq!(e.ready_count(0), 2);
    }
}

#[test]
fn a_draining_endpoint_takes_requests_when_no_ready_one_is_left() {
    let now = Instant::now();
    for algorithm in [
        Algorithm::WeightedRoundRobin,
        Algorithm::P2cEwma,
        hash_on_user(),
    ] {
        let r = rule(vec![backend(1, 1)], algorithm, None);
        let e = Endpoints::build_members(r, vec![members(1..1, 1..3)], None, now);
        let picked: std::collections::BTreeSet<Option<usize>> = (0..100u32)
            .map(|n| e.pick(now, n.to_string().as_bytes(), &[]))
            .collect();
        assert!(picked.iter().all(Option::is_some), "{picked:?}");
        assert_eq!(e.ready_count(0), 0);
    }
}

#[test]
fn draining_endpoints_do_not_dilute_their_backends_share() {
    let now = Instant::now();
    let r = rule(
        vec![backend(1, 50), backend(2, 50)],
        Algorithm::WeightedRoundRobin,
        None,
    );
    // Backend 0: one ready, three draining; backend 1: two ready.
    let e = Endpoints::build_members(r, vec![members(1..2, 2..5), members(5..7, 7..7)], None, now);
    let picks: Vec<usize> = (0..1000).filter_map(|_| e.pick(now, b"", &[])).collect();
    let share = first_backend_share(&e, &picks);
    assert!((share - 0.5).abs() < 0.01, "{share}");
}

#[test]
fn a_changed_set_keeps_the_state_of_remaining_endpoints_and_their_conditions_count() {
    let now = Instant::now();
    let mut r = rule(vec![backend(1, 1)], Algorithm::P2cEwma, None);
    r.outlier_detection = Some(OutlierDetection {
        consecutive_failures: 1,
        eject_for: Duration::from_secs(30),
        max_ejected_percent: 100,
    });
    let old = Endpoints::build_members(r, vec![members(1..4, 4..4)], None, now);
    assert!(old.finish(1, now, Duration::from_millis(1), true));
    old.begin(0);
    // .1 becomes draining, .2 stays (ejected), .3 goes, .4 comes.
    let next = vec![
        Member {
            addr: addrs(1..2)[0],
            draining: true,
            identity: None,
        },
        Member::ready(addrs(2..3)[0]),
        Member::ready(addrs(4..5)[0]),
    ];
    let new = old.with_members(vec![next.clone()], now).expect("changed");
    assert!(new.targets[0].draining);
    assert!(new.is_ejected(1, now), "the ejection carried over");
    assert_eq!(new.pending_total(), 1, "the attempt in flight carried over");
    for _ in 0..20 {
        assert_eq!(new.pick(now, b"", &[]), Some(2));
    }
    assert!(new.with_members(vec![next], now).is_none(), "unchanged");
    // A changed condition alone is a change.
    let ready_again = members(1..3, 3..3)
        .into_iter()
        .chain(members(4..5, 4..4))
        .collect();
    assert!(new.with_members(vec![ready_again], now).is_some());
}

#[test]
fn a_members_identity_reaches_its_target_and_a_change_of_it_alone_rebuilds() {
    let now = Instant::now();
    let r = rule(vec![backend(1, 1)], Algorithm::WeightedRoundRobin, None);
    let id: Arc<str> = Arc::from("spiffe://cluster.local/ns/shop/sa/reviews");
    let meshed = |addr| Member {
        identity: Some(Arc::clone(&id)),
        ..Member::ready(addr)
    };
    let set = addrs(1..3);
    let e = Endpoints::build_members(
        r,
        vec![vec![meshed(set[0]), Member::ready(set[1])]],
        None,
        now,
    );
    assert_eq!(e.targets[0].identity.as_deref(), Some(&*id));
    assert_eq!(e.targets[1].identity, None);
    assert!(e
        .with_members(vec![vec![meshed(set[0]), Member::ready(set[1])]], now)
        .is_none());
    let all = e
        .with_members(vec![vec![meshed(set[0]), meshed(set[1])]], now)
        .expect("an identity changed");
    assert_eq!(all.targets[1].identity.as_deref(), Some(&*id));
}

#[test]
fn the_policys_pinned_identity_goes_before_a_members_own() {
    let now = Instant::now();
    let mut meshed = backend(1, 1);
    meshed.tls = Some(sluice_policy::BackendTls {
        identity: "spiffe://cluster.local/ns/shop/sa/declared".into(),
    });
    let r = rule(vec![meshed], Algorithm::WeightedRoundRobin, None);
    let set = addrs(1..3);
    let own = Member {
        identity: Some(Arc::from("spiffe://cluster.local/ns/shop/sa/pod")),
        ..Member::ready(set[0])
    };
    let e = Endpoints::build_members(r, vec![vec![own, Member::ready(set[1])]], None, now);
    let identities: Vec<Option<&str>> = e.targets.iter().map(|t| t.identity.as_deref()).collect();
    assert_eq!(
        identities,
        [
            Some("spiffe://cluster.local/ns/shop/sa/declared"),
            Some("spiffe://cluster.local/ns/shop/sa/declared")
        ]
    );
    // Without a pin, each member's own.
    let r = rule(vec![backend(1, 1)], Algorithm::WeightedRoundRobin, None);
    let own = Member {
        identity: Some(Arc::from("spiffe://cluster.local/ns/shop/sa/pod")),
        ..Member::ready(set[0])
    };
    let e = Endpoints::build_members(r, vec![vec![own, Member::ready(set[1])]], None, now);
    let identities: Vec<Option<&str>> = e.targets.iter().map(|t| t.identity.as_deref()).collect();
    assert_eq!(
        identities,
        [Some("spiffe://cluster.local/ns/shop/sa/pod"), None]
    );
}
