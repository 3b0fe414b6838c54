#!/usr/bin/env bash
# bench/h2.sh: HTTP/2 through Sluice's h2 engine vs pingora's h2c, nginx and HAProxy,
# and the cost per request against HTTP/1.1 on Sluice's h1 engine (issue 21: h2 within
# 1.3x of h1 in CPU per request).
#
# Backends on core 0 (nginx, one worker each, `return 200 "hello\n"`): HTTP/1.1 on
# 127.0.0.1:18180, h2c (prior knowledge, `listen ... http2`) on 127.0.0.1:18181.
# Every proxy runs one worker/thread pinned to core 1; the load generator (h2load,
# one thread) shares core 0 with the backends. Targets:
#
#   sluice-h1        HTTP/1.1 client -> sluice h1 engine -> HTTP/1.1 backend   :18101
#                    (h2load --h1; the reference for the 1.3x ratio)
#   sluice-h2        h2c client -> sluice h2 engine -> HTTP/1.1 backend       :18101
#                    (the same proxy as sluice-h1: --h2c)
#   sluice-h2-1s     the same, one stream per connection (`-c$H1_CONNS -m1`): no
#                    multiplexing to share the cost of a read or write, as for HTTP/1.1
#   sluice-h2-h2c    h2c client -> sluice h2 engine -> h2c backend            :18102
#   pingora-h2       the same as sluice-h2 with --engine pingora --h2c        :18103
#   pingora-h2-h2c   the same as sluice-h2-h2c with --engine pingora --h2c    :18104
#   nginx-h2         nginx `listen ... http2` (h2c), proxy_pass to the HTTP/1.1
#                    backend with an upstream keepalive pool                  :18105
#   nginx-grpc       nginx `listen ... http2`, `grpc_pass` (its only HTTP/2 upstream)
#                    to the h2c backend with an upstream keepalive pool       :18107
#   haproxy-h2       HAProxy `bind ... proto h2`, `server ... proto h2` to the
#                    h2c backend                                              :18106
#   sluice-h1-h2c    HTTP/1.1 client -> sluice h1 engine -> h2c backend (over the h2
#                    engine's upstream connections; before, handed to pingora) :18102
#   pingora-h1-h2c   the same with --engine pingora (what that hand-off cost)  :18104
#
# Load: `h2load -t1 -c$CONNS -m$STREAMS -D $DURATION --warm-up-time 1` (h2: 8
# connections x 16 streams; HTTP/1.1 clients (*-h1*): `--h1`, 64 connections, one
# request at a time), request
# `GET /api/v1/items` with :authority `bench` (`--connect-to` the target). Sluice runs
# bench/policy.yaml (10 routes, the traffic's route with a token bucket, a breaker and
# a timeout; metrics on; access log off so that the engines are compared, not the
# log). p99 comes from h2load's per-request log (--log-file). CPU per request:
# utime+stime from /proc/PID/stat over the run / requests completed. Rounds interleave
# the targets (A B C .. A B C ..); the tables show medians.
#
# It installs what it needs from Debian (nghttp2-client for h2load, nginx-light,
# haproxy), builds sluice-proxy in release, waits until no cargo/rustc runs (up to
# IDLE_WAIT seconds), measures, and appends the tables to bench/RESULTS.md.
#
# Knobs: ROUNDS=3 DURATION=10 CONNS=8 STREAMS=16 H1_CONNS=64 IDLE_WAIT=900 APPEND=1 KEEP=0
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-8}
STREAMS=${STREAMS:-16}
H1_CONNS=${H1_CONNS:-64}
IDLE_WAIT=${IDLE_WAIT:-900}
APPEND=${APPEND:-1}
KEEP=${KEEP:-0}
URLPATH=/api/v1/items
export PATH="$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH"
COMMAND="bench/h2.sh"
for v in ROUNDS DURATION CONNS STREAMS H1_CONNS; do
    case "$v:${!v}" in
    ROUNDS:3 | DURATION:10 | CONNS:8 | STREAMS:16 | H1_CONNS:64) ;;
    *) COMMAND="$v=${!v} $COMMAND" ;;
    esac
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
[ "$(nproc)" -ge 2 ] || die "needs at least 2 cores (one for the proxy, one for backends + load)"

# --- tools ------------------------------------------------------------------------
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing from Debian: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi


log "building sluice-proxy (release)"
nice -n 10 cargo build --release --locked -p sluice-proxy --bin sluice-proxy
BUILD_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
BUILD_DIRTY=$(git status --porcelain -- proxy policy Cargo.toml Cargo.lock 2>/dev/null | wc -l)

# shellcheck source=bench/lib.sh
. bench/lib.sh
TMP=$(mktemp -d /tmp/sluice-bench-h2.XXXXXX)
PIDS=()
cleanup() {
    set +e
    stop_pids "${PIDS[@]}"
    if [ "$KEEP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SLUICE="$TMP/sluice-proxy"
cp target/release/sluice-proxy "$SLUICE"
for port in 18180 18181 18101 18102 18103 18104 18105 18106 18107 18111 18112 18113 18114; do
    if ss -ltnH "sport = :$port" | grep -q .; then die "port $port is in use"; fi
done

# --- backends and proxies -----------------------------------------------------------
mkdir -p "$TMP/backend" "$TMP/backend-h2c" "$TMP/nginx" "$TMP/haproxy"
nginx_conf "$TMP/backend" >"$TMP/backend/nginx.conf" <<'EOF'
  server {
    listen 127.0.0.1:18180;
    location / { default_type text/plain; return 200 "hello\n"; }
  }
EOF
nginx_conf "$TMP/backend-h2c" >"$TMP/backend-h2c/nginx.conf" <<'EOF'
  http2_max_requests 10000000;
  http2_max_concurrent_streams 256;
  server {
    listen 127.0.0.1:18181 http2;
    location / { default_type text/plain; return 200 "hello\n"; }
  }
EOF
nginx_conf "$TMP/nginx" >"$TMP/nginx/nginx.conf" <<'EOF'
  http2_max_requests 10000000;
  upstream backend {
    server 127.0.0.1:18180;
    keepalive 64;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:18105 http2;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  upstream backend_h2c {
    server 127.0.0.1:18181;
    keepalive 64;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:18107 http2;
    location / {
      grpc_pass grpc://backend_h2c;
    }
  }
EOF
cat >"$TMP/haproxy/haproxy.cfg" <<'EOF'
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 300s
frontend fe
  bind 127.0.0.1:18106 proto h2
  default_backend be
backend be
  server backend 127.0.0.1:18181 proto h2
EOF

declare -A PORT=([sluice-h2-1s]=18101 [sluice-h1-h2c]=18102 [pingora-h1-h2c]=18104 [sluice-h1]=18101 [sluice-h2]=18101 [sluice-h2-h2c]=18102 [pingora-h2]=18103 [pingora-h2-h2c]=18104 [nginx-h2]=18105 [nginx-grpc]=18107 [haproxy-h2]=18106)
declare -A PROCS
taskset -c 0 nginx -e "$TMP/backend/error.log" -p "$TMP/backend" -c "$TMP/backend/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
BACKEND_PID=$!
taskset -c 0 nginx -e "$TMP/backend-h2c/error.log" -p "$TMP/backend-h2c" -c "$TMP/backend-h2c/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
BACKEND_H2C_PID=$!
taskset -c 1 nginx -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
NGINX_PID=$!
taskset -c 1 haproxy -db -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/stdout.log" 2>&1 &
PIDS+=($!)
PROCS[haproxy-h2]=$!

start_sluice() { # name listen admin backend-port protocol-suffix [flags...]
    local name=$1 listen=$2 admin=$3 backend=$4 protocol=$5
    shift 5
    mkdir -p "$TMP/$name/policy"
    sed -e "s/- address: 127.0.0.1:18080/- {address: \"127.0.0.1:$backend\"$protocol}/" \
        bench/policy.yaml >"$TMP/$name/policy/policy.yaml"
    grep -q "127.0.0.1:$backend" "$TMP/$name/policy/policy.yaml" || die "bench/policy.yaml's backend line changed"
    taskset -c 1 "$SLUICE" --threads 1 --listen "127.0.0.1:$listen" --admin "127.0.0.1:$admin" \
        --policy "$TMP/$name/policy/policy.yaml" --drain-timeout 1s --no-access-log --h2c "$@" \
        >"$TMP/$name/stdout.log" 2>"$TMP/$name/stderr.log" &
    PIDS+=($!)
    PROCS[$name]=$!
}
start_sluice sluice-h2 18101 18111 18180 ""
start_sluice sluice-h2-h2c 18102 18112 18181 ", protocol: h2c"
start_sluice pingora-h2 18103 18113 18180 "" --engine pingora
start_sluice pingora-h2-h2c 18104 18114 18181 ", protocol: h2c" --engine pingora
PROCS[sluice-h1]=${PROCS[sluice-h2]}
PROCS[sluice-h2-1s]=${PROCS[sluice-h2]}
PROCS[sluice-h1-h2c]=${PROCS[sluice-h2-h2c]}
PROCS[pingora-h1-h2c]=${PROCS[pingora-h2-h2c]}

for name in sluice-h2 sluice-h2-h2c pingora-h2 pingora-h2-h2c; do
    for ((i = 0; i < 100; i++)); do
        curl -fsS --max-time 1 "http://127.0.0.1:$((PORT[$name] + 10))/ready" >/dev/null 2>&1 && break
        kill -0 "${PROCS[$name]}" 2>/dev/null || die "$name exited: $(tail -5 "$TMP/$name/stderr.log")"
        sleep 0.1
    done
done
PROCS[nginx-h2]="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"
PROCS[nginx-grpc]=${PROCS[nginx-h2]}
for p in $NGINX_PID $BACKEND_PID $BACKEND_H2C_PID; do
    for c in $(pgrep -P "$p"); do PIDS+=("$c"); done
done

TARGETS=(sluice-h1 sluice-h2 sluice-h2-1s sluice-h2-h2c pingora-h2 pingora-h2-h2c nginx-h2 nginx-grpc haproxy-h2 sluice-h1-h2c pingora-h1-h2c)
load() { # target seconds logfile -> h2load's output
    local t=$1 secs=$2 logfile=$3 shape
    case $t in
    *-h1*) shape=(--h1 -c"$H1_CONNS" -m1) ;;
    *-1s) shape=(-c"$H1_CONNS" -m1) ;;
    *) shape=(-c"$CONNS" -m"$STREAMS") ;;
    esac
    taskset -c 0 timeout $((secs + 30)) h2load -t1 "${shape[@]}" -D "$secs" --warm-up-time 1 \
        --connect-to="127.0.0.1:${PORT[$t]}" --log-file="$logfile" "http://bench$URLPATH"
}
for t in "${TARGETS[@]}"; do
    out=$(load "$t" 1 /dev/null 2>&1 || true)
    grep -q "status codes: [1-9][0-9]* 2xx" <<<"$out" || die "$t does not answer 2xx: $(tail -8 <<<"$out")"
done

# --- wait for a quiet machine -------------------------------------------------------
waited=0
while busy && [ $waited -lt "$IDLE_WAIT" ]; do
    log "a cargo/rustc build is running on this machine; waiting (${waited}s of at most ${IDLE_WAIT}s)"
    sleep 15
    waited=$((waited + 15))
done
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_AT_START=no
busy && BUSY_AT_START=yes && log "still busy after ${IDLE_WAIT}s; measuring anyway (noted in the results)"

# --- measure ------------------------------------------------------------------------
CLK=$(getconf CLK_TCK)
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
RAW="$TMP/raw.txt"
: >"$RAW"
DISTURBED=0
RUNS=0
START=$(date -u '+%Y-%m-%d %H:%M UTC')
T0=$SECONDS
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TARGETS[@]}"; do
        mark=""
        busy && mark="*" && DISTURBED=$((DISTURBED + 1))
        RUNS=$((RUNS + 1))
        # CPU is sampled from the end of h2load's 1 s warm-up to its end.
        load "$t" "$DURATION" "$TMP/req.log" >"$TMP/out.txt" 2>&1 &
        LOADER=$!
        sleep 1
        c0=$(cpu_ticks ${PROCS[$t]})
        wait "$LOADER" || die "h2load failed on $t: $(tail -5 "$TMP/out.txt")"
        c1=$(cpu_ticks ${PROCS[$t]})
        out=$(cat "$TMP/out.txt")
        rps=$(awk '/^finished in/ {gsub(/,/, ""); print $4}' <<<"$out")
        done_n=$(awk '/^requests:/ {print $6}' <<<"$out")
        ok=$(awk '/^status codes:/ {print $3}' <<<"$out")
        # p50/p99 of the measured requests (column 3: microseconds to the response's end).
        read -r p50 p99 < <(awk -F'\t' '{print $3}' "$TMP/req.log" | sort -n |
            awk 'function at(q,  i) { i = int(NR * q); if (i < NR * q) i++; if (i < 1) i = 1; return a[i] / 1000 }
                 {a[NR] = $1} END {if (NR == 0) print "nan nan"; else printf "%.3f %.3f\n", at(0.5), at(0.99)}')
        cpu=$(awk -v d=$((c1 - c0)) -v n="$done_n" -v hz="$CLK" 'BEGIN {if (n > 0) printf "%.2f", d / hz * 1e6 / n; else print "nan"}')
        add "rps|$t" "$rps"
        add "p50|$t" "$p50"
        add "p99|$t" "$p99"
        add "cpu|$t" "$cpu"
        # h2load counts a status for a response that ends just after the window
        # (2xx one more than done): that is no error.
        err=$((done_n - ok))
        [ "$err" -ge 0 ] || err=0
        add "err|$t" "$err"
        printf 'round=%s target=%s rps=%s p50=%sms p99=%sms requests=%s 2xx=%s cpu_us_per_req=%s%s\n' \
            "$r" "$t" "$rps" "$p50" "$p99" "$done_n" "$ok" "$cpu" "${mark:+ (a build was running)}" | tee -a "$RAW" >&2
    done
done
for t in sluice-h2 sluice-h2-h2c pingora-h2 pingora-h2-h2c; do
    kill -0 "${PROCS[$t]}" 2>/dev/null || die "$t died during the run: $(tail -5 "$TMP/$t/stderr.log")"
done
ELAPSED=$((SECONDS - T0))

# --- report -------------------------------------------------------------------------
m() { median <<<"${R[$1]:-}"; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan" || v == "") print "-"; else printf f, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
label() {
    case $1 in
    sluice-h1) echo "sluice h1 engine, HTTP/1.1 -> HTTP/1.1 (reference)" ;;
    sluice-h2) echo "sluice h2 engine, h2c -> HTTP/1.1" ;;
    sluice-h2-1s) echo "sluice h2 engine, h2c -> HTTP/1.1, 1 stream per connection" ;;
    sluice-h2-h2c) echo "sluice h2 engine, h2c -> h2c" ;;
    pingora-h2) echo "sluice --engine pingora, h2c -> HTTP/1.1" ;;
    pingora-h2-h2c) echo "sluice --engine pingora, h2c -> h2c" ;;
    nginx-h2) echo "nginx, h2c -> HTTP/1.1 (keepalive)" ;;
    nginx-grpc) echo "nginx, h2c -> h2c (grpc_pass, keepalive)" ;;
    haproxy-h2) echo "HAProxy, h2c -> h2c (proto h2 both sides)" ;;
    sluice-h1-h2c) echo "sluice h1 engine, HTTP/1.1 -> h2c" ;;
    pingora-h1-h2c) echo "sluice --engine pingora, HTTP/1.1 -> h2c" ;;
    esac
}
declare -A M
for t in "${TARGETS[@]}"; do for k in rps p50 p99 cpu err; do M["$k|$t"]=$(m "$k|$t"); done; done
REPORT="$TMP/report.md"
{
    echo "## HTTP/2: sluice's h2 engine vs pingora, nginx and HAProxy ($START)"
    echo
    echo "Command: \`$COMMAND\` (bench/h2.sh; ${ELAPSED} s of measuring)."
    echo
    echo "Machine: $(nproc) cores ($(lscpu | awk -F: '/^Model name/ {gsub(/^ +/, "", $2); print $2; exit}')),"
    echo "Linux $(uname -r). Core 1 runs the proxy under test (one worker/thread); core 0 runs the"
    echo "backends (nginx 1 worker each: HTTP/1.1, and h2c via \`listen ... http2\`; \`return 200 \"hello\\n\"\`)"
    echo "and h2load. Tools: $(nginx -v 2>&1 | sed 's/^nginx version: //'), HAProxy $(haproxy -v | awk 'NR == 1 {print $3}'),"
    echo "$(h2load --version | head -1). sluice-proxy from $BUILD_REV$([ "$BUILD_DIRTY" -gt 0 ] && echo " plus $BUILD_DIRTY uncommitted file(s)")"
    echo "with bench/policy.yaml (route \`items\`: token bucket, breaker, timeout; metrics on), \`--threads 1"
    echo "--no-access-log --h2c\`. Load: \`h2load -t1 -c$CONNS -m$STREAMS -D $DURATION --warm-up-time 1\` for h2"
    echo "($((CONNS * STREAMS)) streams in flight; the \"1 stream per connection\" row: \`-c$H1_CONNS -m1\`),"
    echo "\`h2load --h1 -t1 -c$H1_CONNS -m1\` for HTTP/1.1 clients,"
    echo "\`GET $URLPATH\`, :authority \`bench\`. Medians of $ROUNDS interleaved rounds. Load average at start:"
    echo "$LOADAVG (cargo/rustc running: $BUSY_AT_START)."
    if [ "$BUSY_AT_START" = yes ] || [ "$DISTURBED" -gt 0 ]; then
        echo
        echo "**Caution:** a cargo/rustc build ran during $DISTURBED of $RUNS runs; those are disturbed."
    fi
    echo
    echo "| target | req/s | p50 | p99 | CPU/request | CPU vs sluice h1 | non-2xx |"
    echo "|---|---|---|---|---|---|---|"
    for t in "${TARGETS[@]}"; do
        printf '| %s | %s | %s ms | %s ms | %s | %s | %s |\n' "$(label "$t")" \
            "$(fmt "${M[rps|$t]}" %.0f)" "$(fmt "${M[p50|$t]}" %.2f)" "$(fmt "${M[p99|$t]}" %.2f)" \
            "$(fmt "${M[cpu|$t]}" '%.1f µs')" "$(ratio "${M[cpu|$t]}" "${M[cpu|sluice-h1]}")" \
            "$(fmt "${M[err|$t]}" %.0f)"
    done
    echo
    echo "CPU/request: utime+stime of the proxy process(es) (\`/proc/PID/stat\`, nginx: master +"
    echo "worker) from the end of h2load's 1 s warm-up to its end, divided by the requests it"
    echo "completed after the warm-up. p50/p99: from h2load's \`--log-file\` (time to the end of"
    echo "each response)."
    echo "Issue 21 asks h2 within 1.3x of h1 in CPU per request: the \"CPU vs sluice h1\" column."
    echo
    echo "<details><summary>raw runs</summary>"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
    echo
    echo "</details>"
    echo
} >"$REPORT"
cat "$REPORT"
if [ "$APPEND" = 1 ]; then
    cat "$REPORT" >>bench/RESULTS.md
    log "appended to bench/RESULTS.md"
fi
