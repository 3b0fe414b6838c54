#!/usr/bin/env bash
# bench/ab.sh: A/B comparison of sluice-proxy builds (or flags), side by side with nginx,
# for measuring what one change buys. Not a test: it prints numbers.
#
#   bench/ab.sh LABEL=BINARY[,FLAGS...] [LABEL=BINARY[,FLAGS...] ...]
#
# e.g. compare the committed build with a working-tree build, without access logs:
#   cp target/release/sluice-proxy /tmp/before   # build, then change, build again
#   bench/ab.sh before=/tmp/before,--no-access-log after=target/release/sluice-proxy,--no-access-log
#
# Each BINARY runs as a sluice-proxy with bench/policy.yaml on 127.0.0.1 (ports from
# 18100 up), pinned to core 1 like every proxy in bench/proxy.sh; nginx proxies to the
# same backend (nginx, core 0). Every round runs `wrk -t1 -c64 -d${SECS}s` against each
# target in turn (the first target moving by one each round), printing req/s, p99 and CPU µs per request (utime+stime
# from /proc), and the peak RSS (VmHWM) at the end. Knobs: ROUNDS=3 SECS=5, and
# RATE=N for an open loop instead (`oha -q N --latency-correction -c 64`: p50, p99);
# THREADS=N runs every proxy with N threads (nginx with N workers) on PROXY_CORES
# (default "1"; e.g. THREADS=2 PROXY_CORES=0,1 shares the cores with the load).
# Needs nginx and wrk (bench/proxy.sh installs them). Stops what it started by PID.
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
THREADS=${THREADS:-1}
PROXY_CORES=${PROXY_CORES:-1}
[[ $THREADS =~ ^[1-9][0-9]?$ ]] || { echo "ab.sh: THREADS=$THREADS is not a thread count (1..99)" >&2; exit 64; }
[ $# -ge 1 ] || { sed -n '2,16p' "$0" >&2; exit 64; }
for tool in nginx wrk taskset; do
    command -v "$tool" >/dev/null || { echo "ab.sh: $tool is missing (bench/proxy.sh installs it)" >&2; exit 1; }
done

# shellcheck source=bench/lib.sh
. bench/lib.sh

TMP=$(mktemp -d /tmp/sluice-ab.XXXXXX)
PIDS=()
cleanup() {
    set +e
    stop_pids "${PIDS[@]}"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$TMP/backend" "$TMP/nginx"
nginx_conf "$TMP/backend" >"$TMP/backend/nginx.conf" <<'EOF'
  server { listen 127.0.0.1:18080; location / { default_type text/plain; return 200 "hello\n"; } }
EOF
nginx_conf "$TMP/nginx" "$THREADS" >"$TMP/nginx/nginx.conf" <<'EOF'
  upstream backend { server 127.0.0.1:18080; keepalive 64; keepalive_requests 10000000; keepalive_timeout 300s; }
  server {
    listen 127.0.0.1:18002;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
EOF

declare -A PORT PROC
labels=(nginx)
PORT[nginx]=18002
port=18100
for spec in "$@"; do
    label=${spec%%=*}
    rest=${spec#*=}
    IFS=, read -r -a parts <<<"$rest"
    bin=${parts[0]}
    [ -x "$bin" ] || { echo "ab.sh: $label: $bin is not an executable" >&2; exit 64; }
    labels+=("$label")
    PORT[$label]=$port
    port=$((port + 2))
done
for p in 18080 18002 $(seq 18100 $((port - 1))); do
    if ss -ltnH "sport = :$p" | grep -q .; then echo "ab.sh: port $p is in use" >&2; exit 1; fi
done

taskset -c 0 nginx -p "$TMP/backend" -c "$TMP/backend/nginx.conf" -e "$TMP/backend/error.log" &
PIDS+=($!)
taskset -c "$PROXY_CORES" nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" &
NGINX=$!
PIDS+=($NGINX)
for spec in "$@"; do
    label=${spec%%=*}
    IFS=, read -r -a parts <<<"${spec#*=}"
    mkdir -p "$TMP/$label/policy"
    cp bench/policy.yaml "$TMP/$label/policy/policy.yaml"
    # A private copy: a rebuild during the run must not swap the binary.
    cp "${parts[0]}" "$TMP/$label/bin"
    taskset -c "$PROXY_CORES" "$TMP/$label/bin" --threads "$THREADS" --listen "127.0.0.1:${PORT[$label]}" \
        --admin "127.0.0.1:$((PORT[$label] + 1))" --policy "$TMP/$label/policy/policy.yaml" \
        --drain-timeout 1s "${parts[@]:1}" >"$TMP/$label/access.log" 2>"$TMP/$label/stderr.log" &
    PIDS+=($!)
    PROC[$label]=$!
done

# Every target answers before measuring (bounded wait).
for label in "${labels[@]}"; do
    body=""
    for ((i = 0; i < 100; i++)); do
        body=$(curl -sS --max-time 1 -H 'Host: bench' "http://127.0.0.1:${PORT[$label]}/api/v1/items" 2>/dev/null || true)
        [ "$body" = hello ] && break
        sleep 0.1
    done
    [ "$body" = hello ] || { echo "ab.sh: $label does not answer (stderr: $(tail -3 "$TMP/$label/stderr.log" 2>/dev/null))" >&2; exit 1; }
done
PROC[nginx]="$NGINX $(pgrep -P "$NGINX" | tr '\n' ' ')"
PIDS+=($(pgrep -P "$NGINX"))

CLK=$(getconf CLK_TCK)
RATE=${RATE:-}
if [ -n "$RATE" ]; then
    for tool in oha jq; do
        command -v "$tool" >/dev/null || { echo "ab.sh: RATE needs $tool (bench/proxy.sh installs it)" >&2; exit 1; }
    done
    echo "ab.sh: $ROUNDS rounds x ${SECS}s, oha -q $RATE -c 64 on core 0, proxies ($THREADS threads) on cores $PROXY_CORES ($(date -u '+%Y-%m-%d %H:%M UTC'))"
fi
[ -n "$RATE" ] || echo "ab.sh: $ROUNDS rounds x ${SECS}s, wrk -t1 -c64 on core 0, proxies ($THREADS threads) on cores $PROXY_CORES ($(date -u '+%Y-%m-%d %H:%M UTC'))"
for ((r = 1; r <= ROUNDS; r++)); do
    # Each round starts one target later, so every target runs in every position
    # equally often over a multiple of the target count (position moves p99 as much
    # as the differences being measured).
    k=$(((r - 1) % ${#labels[@]}))
    for label in "${labels[@]:k}" "${labels[@]:0:k}"; do
        [ -f "$TMP/$label/access.log" ] && : >"$TMP/$label/access.log"
        if [ -n "$RATE" ]; then
            out=$(taskset -c 0 timeout $((SECS + 30)) oha -q "$RATE" -z "${SECS}s" --latency-correction --no-tui \
                -c 64 --output-format json -H 'Host: bench' "http://127.0.0.1:${PORT[$label]}/api/v1/items")
            printf '%-16s round %d  achieved %7.0f/s  p50 %.3f ms  p99 %.3f ms\n' "$label" "$r" \
                "$(jq -r '.summary.requestsPerSec' <<<"$out")" "$(jq -r '.latencyPercentiles.p50 * 1000' <<<"$out")" \
                "$(jq -r '.latencyPercentiles.p99 * 1000' <<<"$out")"
            echo "$label $(jq -r '.latencyPercentiles.p99 * 1000' <<<"$out")" >>"$TMP/p99s"
            continue
        fi
        c0=$(cpu_ticks ${PROC[$label]})
        out=$(taskset -c 0 timeout $((SECS + 30)) wrk -t1 -c64 -d"${SECS}s" --latency -H 'Host: bench' \
            "http://127.0.0.1:${PORT[$label]}/api/v1/items")
        c1=$(cpu_ticks ${PROC[$label]})
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        n=$(awk '/requests in/ {print $1}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        errors=$(awk '/Non-2xx|Socket errors/' <<<"$out" | tr -s ' ' | tr '\n' ' ')
        printf '%-16s round %d  req/s %9.0f  p99 %8s  CPU %6.2f µs/req  %s\n' "$label" "$r" "$rps" "$p99" \
            "$(awk -v d=$((c1 - c0)) -v n="$n" -v hz="$CLK" 'BEGIN {print d / hz * 1e6 / n}')" "${errors:-}"
    done
done
if [ -n "$RATE" ]; then
    # Medians over the rounds, and each target's median against nginx's.
    for label in "${labels[@]}"; do
        awk -v l="$label" '$1 == l {print $2}' "$TMP/p99s" | sort -g | awk -v l="$label" '
            { v[NR] = $1 } END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print l, m }'
    done | awk '$1 == "nginx" { base = $2 } { label[NR] = $1; med[NR] = $2 }
        END { for (i = 1; i <= NR; i++) printf "%-16s median p99 %.3f ms  %.2fx nginx\n", label[i], med[i], med[i] / base }'
fi
for label in "${labels[@]}"; do
    kb=$(hwm_kb ${PROC[$label]})
    printf '%-16s peak RSS %.1f MB\n' "$label" "$(awk -v k=$kb 'BEGIN {print k / 1024}')"
done
