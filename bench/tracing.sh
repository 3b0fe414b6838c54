#!/usr/bin/env bash
# bench/tracing.sh: what tracing costs per request (issue 24: with 1% sampling,
# throughput within 3% of tracing off).
#
# Three identical sluice-proxy processes (bench/policy.yaml, JSON access log to a
# file, --threads 1, core 1), differing only in tracing:
#
#   off     no --otlp-endpoint                                   127.0.0.1:18301
#   1pct    --otlp-endpoint to the sink, --trace-sample-ratio 0.01 (the default)
#                                                                127.0.0.1:18302
#   all     --trace-sample-ratio 1: every request's spans built, queued and
#           exported (the upper bound)                           127.0.0.1:18303
#
# The backend (nginx, one worker, `return 200 "hello\n"`), wrk and the OTLP receiver
# (proxy/examples/otlp-sink.rs, a real TraceService server that takes every batch)
# share core 0. Requests carry no traceparent, so the proxy starts every trace and its
# ratio decides; bench/policy.yaml answers them all 200 (no tail-sampled ones).
#
# `wrk -t1 -c64 -d${DURATION}s --latency -H 'Host: bench'` against each variant in
# turn (off 1pct all off 1pct all ...), ROUNDS rounds after a 2 s warm-up of each;
# medians of req/s, p99 and the proxy's CPU per request (utime+stime from
# /proc/PID/stat over the run / requests completed). Spans exported (the proxy's
# sluice_trace_spans_exported_total) and dropped per run are shown, so a variant
# that silently exported nothing would show.
#
# It installs what it needs (Debian: nginx-light wrk curl), builds sluice-proxy and
# the sink in release, waits until no cargo/rustc build runs (up to IDLE_WAIT seconds),
# measures, prints the table and appends it to bench/RESULTS.md. No pass/fail.
# Knobs: ROUNDS=5 DURATION=10 IDLE_WAIT=900 APPEND=1 (0: print only) KEEP=0.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
IDLE_WAIT=${IDLE_WAIT:-900}
APPEND=${APPEND:-1}
KEEP=${KEEP:-0}
CONNS=64
HOSTHDR="Host: bench"
URLPATH=/api/v1/items
export PATH="$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH"
COMMAND="bench/tracing.sh"
for v in ROUNDS DURATION; do
    case "$v:${!v}" in
    ROUNDS:5 | DURATION:10) ;;
    *) COMMAND="$v=${!v} $COMMAND" ;;
    esac
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
[ "$(nproc)" -ge 2 ] || die "needs at least 2 cores"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing from Debian: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi


log "building sluice-proxy and the OTLP sink (release)"
nice -n 10 cargo build --release --locked -p sluice-proxy --bin sluice-proxy --example otlp-sink
BUILD_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
BUILD_DIRTY=$(git status --porcelain -- proxy policy Cargo.toml Cargo.lock 2>/dev/null | wc -l)

# shellcheck source=bench/lib.sh
. bench/lib.sh
TMP=$(mktemp -d /tmp/sluice-bench-tracing.XXXXXX)
PIDS=()
cleanup() {
    set +e
    stop_pids "${PIDS[@]}"
    if [ "$KEEP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SLUICE="$TMP/sluice-proxy"
SINK="$TMP/otlp-sink"
cp target/release/sluice-proxy "$SLUICE"
cp target/release/examples/otlp-sink "$SINK"
for port in 18380 18301 18302 18303 18311 18312 18313 18317; do
    if ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then die "port $port is in use"; fi
done

mkdir -p "$TMP/backend"
nginx_conf "$TMP/backend" >"$TMP/backend/nginx.conf" <<'EOF'
  server {
    listen 127.0.0.1:18380;
    location / { default_type text/plain; return 200 "hello\n"; }
  }
EOF
taskset -c 0 nginx -e "$TMP/backend/error.log" -p "$TMP/backend" -c "$TMP/backend/nginx.conf" \
    >"$TMP/backend/stdout.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$SINK" --listen 127.0.0.1:18317 >/dev/null 2>"$TMP/sink.log" &
PIDS+=($!)

VARIANTS=(off 1pct all)
declare -A PORT=([off]=18301 [1pct]=18302 [all]=18303)
declare -A ADMIN=([off]=18311 [1pct]=18312 [all]=18313)
declare -A PROC
start_sluice() { # variant [flags...]
    local v=$1
    shift
    mkdir -p "$TMP/$v/policy"
    sed 's/127\.0\.0\.1:18080/127.0.0.1:18380/g' bench/policy.yaml >"$TMP/$v/policy/policy.yaml"
    taskset -c 1 "$SLUICE" --threads 1 --listen "127.0.0.1:${PORT[$v]}" --admin "127.0.0.1:${ADMIN[$v]}" \
        --policy "$TMP/$v/policy/policy.yaml" --drain-timeout 1s "$@" \
        >>"$TMP/$v/access.log" 2>"$TMP/$v/stderr.log" &
    PIDS+=($!)
    PROC[$v]=$!
}
start_sluice off
start_sluice 1pct --otlp-endpoint http://127.0.0.1:18317 --trace-sample-ratio 0.01
start_sluice all --otlp-endpoint http://127.0.0.1:18317 --trace-sample-ratio 1

for v in "${VARIANTS[@]}"; do
    body=""
    for ((i = 0; i < 100; i++)); do
        body=$(curl -sS --max-time 1 -H "$HOSTHDR" "http://127.0.0.1:${PORT[$v]}$URLPATH" 2>/dev/null || true)
        [ "$body" = hello ] && break
        kill -0 "${PROC[$v]}" 2>/dev/null || die "$v exited: $(tail -5 "$TMP/$v/stderr.log")"
        sleep 0.1
    done
    [ "$body" = hello ] || die "$v does not answer 'hello' (got: $body)"
done

metric() { # variant series-prefix: its value (summed over label sets)
    curl -fsS --max-time 2 "http://127.0.0.1:${ADMIN[$1]}/metrics" |
        awk -v s="$2" 'index($0, s) == 1 {t += $NF} END {print t + 0}'
}
CLK=$(getconf CLK_TCK)
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
DISTURBED=0
RAW="$TMP/raw.txt"
: >"$RAW"

run() { # variant seconds record(0|1)
    local v=$1 secs=$2 record=$3 out c0 c1 x0 x1 d0 d1 mark=""
    busy && mark="*"
    c0=$(cpu_ticks "${PROC[$v]}")
    x0=$(metric "$v" sluice_trace_spans_exported_total)
    d0=$(metric "$v" sluice_trace_spans_dropped_total)
    out=$(taskset -c 0 timeout $((secs + 30)) wrk -t1 -c"$CONNS" -d"${secs}s" --latency -H "$HOSTHDR" \
        "http://127.0.0.1:${PORT[$v]}$URLPATH")
    c1=$(cpu_ticks "${PROC[$v]}")
    busy && mark="*"
    # Batches leave at least once a second: let the last one go before counting.
    sleep 1.5
    x1=$(metric "$v" sluice_trace_spans_exported_total)
    d1=$(metric "$v" sluice_trace_spans_dropped_total)
    [ "$record" = 1 ] || return 0
    local rps p99 reqs cpu
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v d=$((c1 - c0)) -v n="$reqs" -v hz="$CLK" 'BEGIN {printf "%.2f", d / hz * 1e6 / n}')
    [ -n "$mark" ] && DISTURBED=$((DISTURBED + 1))
    add "rps:$v" "$rps"
    add "p99:$v" "$p99"
    add "cpu:$v" "$cpu"
    add "spans:$v" "$((x1 - x0))"
    add "dropped:$v" "$((d1 - d0))"
    printf '%s round %s: %s req/s, p99 %s ms, %s µs CPU/req, %s spans exported, %s dropped%s\n' \
        "$v" "$round" "$rps" "$p99" "$cpu" "$((x1 - x0))" "$((d1 - d0))" "${mark:+ (a build ran: disturbed)}" | tee -a "$RAW" >&2
}

waited=0
while busy && [ $waited -lt "$IDLE_WAIT" ]; do
    [ $waited = 0 ] && log "waiting for cargo/rustc to finish (up to ${IDLE_WAIT}s)"
    sleep 5
    waited=$((waited + 5))
done
log "warm-up"
for v in "${VARIANTS[@]}"; do round=0 run "$v" 2 0; done
for ((round = 1; round <= ROUNDS; round++)); do
    for v in "${VARIANTS[@]}"; do run "$v" "$DURATION" 1; done
done

m() { median <<<"${R[$1]:-}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.3f", a / b; else print "nan"}'; }
{
    echo
    echo "## Tracing cost: spans off, 1% and 100% sampled ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Command: \`$COMMAND\` (rev $BUILD_REV$([ "$BUILD_DIRTY" -gt 0 ] && echo ", uncommitted changes")). $(nproc) cores;"
    echo "each proxy one thread on core 1, JSON access log to a file; nginx backend, wrk and the OTLP"
    echo "receiver (proxy/examples/otlp-sink.rs) on core 0. Requests without traceparent, all 200."
    echo "\`wrk -t1 -c$CONNS -d${DURATION}s --latency\`, variants interleaved, $ROUNDS rounds, medians."
    echo
    echo "| tracing | req/s | vs off | CPU µs/req | vs off | p99 ms | spans exported/run | dropped/run |"
    echo "|---|---|---|---|---|---|---|---|"
    for v in "${VARIANTS[@]}"; do
        label=$v
        case $v in off) label="off" ;; 1pct) label="on, 1% sampled" ;; all) label="on, 100% sampled" ;; esac
        echo "| $label | $(m "rps:$v") | $(ratio "$(m "rps:$v")" "$(m rps:off)") | $(m "cpu:$v") | $(ratio "$(m "cpu:$v")" "$(m cpu:off)") | $(m "p99:$v") | $(m "spans:$v") | $(m "dropped:$v") |"
    done
    echo
    echo "Runs during which a cargo/rustc build ran: $DISTURBED of $((ROUNDS * ${#VARIANTS[@]}))."
    echo
    echo "<details><summary>every run</summary>"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
    echo "</details>"
} >"$TMP/report.md"
cat "$TMP/report.md"
if [ "$APPEND" = 1 ]; then
    cat "$TMP/report.md" >>bench/RESULTS.md
    log "appended to bench/RESULTS.md"
fi
