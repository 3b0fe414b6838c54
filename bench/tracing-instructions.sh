#!/usr/bin/env bash
# bench/tracing-instructions.sh: what tracing costs per request in instructions
# (valgrind's callgrind), which a shared machine's noise does not move: the same
# binary and the same requests give the same count whatever else runs (issue 24's
# cost target, where bench/tracing.sh's req/s spread exceeds the margin).
#
# The release sluice-proxy (bench/policy.yaml, JSON access log to a file, one
# thread) runs under `valgrind --tool=callgrind` twice: tracing off, then
# `--otlp-endpoint` to proxy/examples/otlp-sink with `--trace-sample-ratio 0.01`.
# Each gets the same REQUESTS keep-alive GETs from one curl (after WARM warm-up
# requests, excluded by zeroing the counters), the backend is sluice-demo-upstream.
# Instructions per request = the whole process's count (every thread: the exporter
# and the access-log flush included) over the requests, after a 3 s pause so the
# last batch is exported. Prints the table; appends it to bench/RESULTS.md (APPEND=0: don't).
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-4000}
WARM=${WARM:-200}
APPEND=${APPEND:-1}
export PATH="$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH"
for tool in valgrind curl callgrind_control; do
    command -v "$tool" >/dev/null || { echo "needs $tool (Debian: valgrind curl)" >&2; exit 1; }
done
cargo build --release --locked -p sluice-proxy --bin sluice-proxy --example otlp-sink -p sluice-demo --bin sluice-demo-upstream
. bench/lib.sh
TMP=$(mktemp -d /tmp/sluice-bench-ti.XXXXXX)
PIDS=()
cleanup() {
    set +e
    stop_pids "${PIDS[@]}"
    rm -rf "$TMP"
}
trap cleanup EXIT

target/release/sluice-demo-upstream --listen 127.0.0.1:18480 --name b >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
target/release/examples/otlp-sink --listen 127.0.0.1:18417 >/dev/null 2>"$TMP/sink.log" &
PIDS+=($!)
mkdir -p "$TMP/policy"
sed 's/127\.0\.0\.1:18080/127.0.0.1:18480/g' bench/policy.yaml >"$TMP/policy/policy.yaml"

urls() { # N: N copies of the request URL (one curl, one keep-alive connection)
    local i
    for ((i = 0; i < $1; i++)); do
        printf 'url = "http://127.0.0.1:18401/api/v1/items"\noutput = "/dev/null"\n'
    done
}
urls "$WARM" >"$TMP/warm.cfg"
urls "$REQUESTS" >"$TMP/run.cfg"

declare -A IPR
measure() { # variant [flags...]
    local v=$1 pid total
    shift
    valgrind --tool=callgrind --callgrind-out-file="$TMP/$v.out" --collect-atstart=yes \
        target/release/sluice-proxy --threads 1 --listen 127.0.0.1:18401 --admin 127.0.0.1:18402 \
        --policy "$TMP/policy/policy.yaml" --drain-timeout 1s "$@" \
        >>"$TMP/$v.access.log" 2>"$TMP/$v.stderr" &
    pid=$!
    wait_for 120 curl -fsS -o /dev/null -H 'Host: bench' http://127.0.0.1:18401/api/v1/items
    curl -fsS -H 'Host: bench' -K "$TMP/warm.cfg"
    sleep 3
    callgrind_control --zero "$pid" >/dev/null
    curl -fsS -H 'Host: bench' -K "$TMP/run.cfg"
    sleep 3
    callgrind_control --dump "$pid" >/dev/null
    kill -TERM "$pid"
    wait "$pid" || true
    # The dump after zeroing (`$v.out.N`; `$v.out` itself is what came after it,
    # written at exit): the requests' share only, summed over the threads' parts.
    total=$(cat "$TMP/$v.out".[0-9]* | awk '/^summary:/ {s += $2} END {print s + 0}')
    IPR[$v]=$(awk -v t="$total" -v n="$REQUESTS" 'BEGIN {printf "%.0f", t / n}')
    echo "$v: $total instructions over $REQUESTS requests = ${IPR[$v]} per request" >&2
}
measure off
measure 1pct --otlp-endpoint http://127.0.0.1:18417 --trace-sample-ratio 0.01

report=$(
    echo
    echo "## Tracing cost in instructions per request, callgrind ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Command: \`bench/tracing-instructions.sh\` (REQUESTS=$REQUESTS, rev $(git rev-parse --short HEAD)). The whole"
    echo "proxy process (every thread: request path, exporter, access-log flush), $REQUESTS keep-alive"
    echo "GETs after $WARM warm-up ones, bench/policy.yaml, access log on."
    echo
    echo "| tracing | instructions/request | vs off |"
    echo "|---|---|---|"
    echo "| off | ${IPR[off]} | 1.000 |"
    echo "| on, 1% sampled | ${IPR[1pct]} | $(awk -v a="${IPR[1pct]}" -v b="${IPR[off]}" 'BEGIN {printf "%.3f", a / b}') |"
)
echo "$report"
[ "$APPEND" = 1 ] && echo "$report" >>bench/RESULTS.md
exit 0
