//! The sync task: one pipelined round trip to Redis per wake-up or tick, carrying
//! the claims the limiters want, giving idle leases back, and at shutdown giving
//! everything back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lease::{settle, Outcome};
use super::limiter::{GlobalLimiter, GlobalLimits};
use super::{MAX_OPS_PER_ROUND, SCRIPT};

/// The first wait after a failed connection to Redis; it doubles up to
/// [`MAX_BACKOFF`] until a round succeeds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often leases are looked at without a wake-up; a policy without global
/// limits is looked at once a second.
const TICK: Duration = Duration::from_millis(100);
/// Idle leases and keys are looked for this often.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// Without claims to make, Redis is pinged this often.
const PING_EVERY: Duration = Duration::from_secs(1);
/// At shutdown, rounds giving leases back (each up to MAX_OPS_PER_ROUND).
const MAX_FINAL_ROUNDS: u32 = 16;

/// `--redis` as a URL: `host:port` becomes `redis://host:port/`; a `redis://` URL
/// (with a password or a database) is taken as it is.
pub fn redis_url(addr: &str) -> String {
    if addr.starts_with("redis://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}/")
    }
}

/// The URL without its password, for logs.
pub fn redacted(addr: &str) -> String {
    match (addr.strip_prefix("redis://"), addr.rfind('@')) {
        (Some(_), Some(at)) => format!("redis://***{}", &addr[at..]),
        _ => addr.to_owned(),
    }
}

/// Keeps every global limiter of the live policy supplied with leases from the Redis
/// at `addr` until shutdown, reconnecting with backoff; at shutdown, gives the
/// leases back. `timeout` bounds connecting and each round trip; past it Redis
/// counts as unreachable and the local buckets decide until it answers again.
pub async fn sync(
    shared: Arc<crate::proxy::Shared>,
    addr: String,
    timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let hub = Arc::clone(&shared.globals);
    let metrics = &shared.metrics;
    let shown = redacted(&addr);
    let client = match redis::Client::open(redis_url(&addr)) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(
                redis = shown,
                error = &e as &dyn std::error::Error,
                "redis address rejected; global rate limits use their local buckets"
            );
            return;
        }
    };
    let script = redis::Script::new(SCRIPT);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut backoff = MIN_BACKOFF;
    let mut was_up = None;
    let mut ops = Vec::new();
    // Ends on shutdown; each iteration is one connection.
    loop {
        let connect = async {
            let mut con = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            script.prepare_invoke().load_async(&mut con).await?;
            Ok::<_, redis::RedisError>(con)
        };
        let connected = tokio::select! {
            _ = shutdown.changed() => return,
            c = connect => c,
        };
        let mut con = match connected {
            Ok(con) => con,
            Err(e) => {
                metrics.global_syncs.with_label_values(&["error"]).inc();
                note_reachable(&hub, metrics, &mut was_up, false, &shown, Some(&e));
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // What a share knew of its bucket before may be stale (a restarted Redis
        // starts it full): a dry share asks again within PROBE_EVERY anyway.
        note_reachable(&hub, metrics, &mut was_up, true, &shown, None);
        let mut last_answer = Instant::now();
        let mut last_scan = Instant::now();
        let mut refusal_logged = false;
        let mut round: usize = 0;
        let mut stopped_rounds = 0;
        let mut stopping = false;
        // One round per wake-up or tick, while Redis answers.
        let failure = loop {
            let any = shared
                .runtime
                .load()
                .as_deref()
                .is_some_and(|r| r.routes().any(|r| r.global.is_some()));
            let tick = if any { TICK } else { Duration::from_secs(1) };
            if !stopping {
                stopping = tokio::select! {
                    _ = shutdown.changed() => true,
                    () = hub.woken() => false,
                    () = tokio::time::sleep(tick) => false,
                };
            }
            let Some(runtime) = shared.runtime.load_full() else {
                if stopping {
                    return;
                }
                continue;
            };
            let now = Instant::now();
            let scan = now.duration_since(last_scan) >= SCAN_EVERY;
            if scan {
                last_scan = now;
            }
            ops.clear();
            // Each round starts at the next limiter, so a busy one cannot keep the
            // others out of the round's room.
            let limiters: Vec<&GlobalLimiter> = runtime
                .routes()
                .filter_map(|r| r.global.as_deref())
                .collect();
            round = round.wrapping_add(1);
            let first = if limiters.is_empty() {
                0
            } else {
                round % limiters.len()
            };
            for limiter in limiters[first..].iter().chain(&limiters[..first]) {
                if stopping {
                    limiter.collect_all(MAX_OPS_PER_ROUND, &mut ops);
                } else {
                    limiter.collect(now, MAX_OPS_PER_ROUND, scan, &mut ops);
                }
            }
            drop(limiters);
            if ops.is_empty() {
                if stopping {
                    // Requests still draining decide on their own buckets now.
                    hub.set_reachable(false);
                    return;
                }
                // Nothing to claim: a PING now and then keeps the reachability (and
                // its gauge) current for when a claim is needed.
                if last_answer.elapsed() < PING_EVERY {
                    continue;
                }
                let ping: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut con).await;
                match ping {
                    Ok(_) => {
                        last_answer = Instant::now();
                        backoff = MIN_BACKOFF;
                        continue;
                    }
                    Err(e) => break e,
                }
            }
            let mut pipe = redis::pipe();
            // One script's refusal (a key of the wrong type, say) must not sink the
            // others: each answer is settled on its own.
            pipe.ignore_errors();
            for op in &ops {
                pipe.cmd("EVALSHA")
                    .arg(script.get_hash())
                    .arg(1)
                    .arg(&op.redis_key)
                    .arg(op.rate)
                    .arg(op.burst)
                    .arg(op.want)
                    .arg(op.charge);
            }
            let answer: redis::RedisResult<Vec<redis::RedisResult<(i64, i64, i64)>>> =
                pipe.query_async(&mut con).await;
            let stamp = hub.millis(Instant::now());
            let mut script_lost = None;
            match answer {
                Ok(answers) if answers.len() == ops.len() => {
                    for (op, answer) in ops.iter().zip(answers) {
                        match answer {
                            Ok((granted, wait, left)) => {
                                settle(op, stamp, Outcome::Done(granted, wait, left));
                            }
                            Err(e)
                                if e.kind()
                                    == redis::ErrorKind::Server(
                                        redis::ServerErrorKind::NoScript,
                                    ) =>
                            {
                                // Redis lost the script (SCRIPT FLUSH, a failover
                                // behind the same address): nothing ran; reconnect,
                                // which loads it again.
                                settle(op, stamp, Outcome::Refused);
                                script_lost = Some(e);
                            }
                            Err(e) => {
                                settle(op, stamp, Outcome::Refused);
                                metrics.global_syncs.with_label_values(&["error"]).inc();
                                if !refusal_logged {
                                    refusal_logged = true;
                                    tracing::warn!(
                                        redis = shown,
                                        key = op.redis_key.as_str(),
                                        error = &e as &dyn std::error::Error,
                                        "redis refused a global rate-limit script"
                                    );
                                }
                            }
                        }
                    }
                    if let Some(e) = script_lost {
                        if stopping {
                            hub.set_reachable(false);
                            return;
                        }
                        break e;
                    }
                    metrics.global_syncs.with_label_values(&["ok"]).inc();
                    last_answer = Instant::now();
                    backoff = MIN_BACKOFF;
                    if stopping {
                        // Another round if the room was full, until all is given back.
                        if ops.len() < MAX_OPS_PER_ROUND || stopped_rounds >= MAX_FINAL_ROUNDS {
                            hub.set_reachable(false);
                            return;
                        }
                        stopped_rounds += 1;
                    }
                }
                answer => {
                    for op in &ops {
                        settle(op, stamp, Outcome::Unknown);
                    }
                    if stopping {
                        hub.set_reachable(false);
                        return;
                    }
                    break match answer {
                        Err(e) => e,
                        Ok(answers) => redis::RedisError::from((
                            redis::ErrorKind::Parse,
                            "wrong number of answers",
                            format!("{} for {} scripts", answers.len(), ops.len()),
                        )),
                    };
                }
            }
        };
        metrics.global_syncs.with_label_values(&["error"]).inc();
        note_reachable(&hub, metrics, &mut was_up, false, &shown, Some(&failure));
        // A connection that fails again right away must not be retried in a loop.
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Records whether Redis answers (flag, gauge) and logs each change once.
fn note_reachable(
    hub: &GlobalLimits,
    metrics: &crate::metrics::Metrics,
    was_up: &mut Option<bool>,
    up: bool,
    shown: &str,
    error: Option<&redis::RedisError>,
) {
    hub.set_reachable(up);
    metrics.global_redis_up.set(i64::from(up));
    if *was_up == Some(up) {
        return;
    }
    *was_up = Some(up);
    let error = error.map(|e| e as &dyn std::error::Error);
    if up {
        tracing::info!(
            redis = shown,
            error,
            "redis connected; global rate limits shared"
        );
    } else {
        tracing::warn!(
            redis = shown,
            error,
            "redis unreachable; global rate limits use their local buckets"
        );
    }
}
