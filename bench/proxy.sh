#!/usr/bin/env bash
# bench/proxy.sh: Sluice against nginx and HAProxy (issue 9), on one machine.
#
# One backend (nginx, `return 200 "hello\n"`, 127.0.0.1:18080) reached directly and
# through each proxy. Every proxy runs one worker/thread pinned to core 1
# (`taskset -c 1`); the backend and the load generators share core 0. Targets:
#
#   direct          the backend itself                         127.0.0.1:18080
#   sluice          sluice-proxy, bench/policy.yaml, JSON access log to a file (same disk)
#                                                              127.0.0.1:18001 (admin 18000)
#   sluice-nolog    the same with --no-access-log              127.0.0.1:18004 (admin 18005)
#   sluice-pingora  the same as sluice on --engine pingora (every request through
#                   pingora's HTTP engine, as before the h1 engine; closed loop only)
#                                                              127.0.0.1:18010 (admin 18011)
#   sluice-twin     a second identical sluice, the A/A control  127.0.0.1:18012 (admin 18013)
#                   (open loop only)
#   sluice-1k-keys  the same as sluice, the traffic spread over 1,000 x-user-id
#                   rate-limit keys (route `keyed`, maxKeys 10000)
#                                                              127.0.0.1:18006 (admin 18007)
#   pingora-bare    proxy/examples/bare-pingora.rs: pingora with no policy, metrics or
#                   log, every request to the backend; the floor of any pingora proxy
#                   (closed loop only)                         127.0.0.1:18008
#   minimal-h1      proxy/examples/minimal-h1.rs: tokio + httparse, head parsed and
#                   forwarded, no policy; what an HTTP/1 engine itself must cost
#                   (closed loop only)                         127.0.0.1:18009
#   nginx           proxy_pass, upstream keepalive pool, HTTP/1.1 127.0.0.1:18002
#   haproxy         mode http, nbthread 1, http-reuse always   127.0.0.1:18003
#
# Closed loop: `wrk -t1 -c64 -d10s --latency` (req/s, p50, p99, CPU per request from
# /proc/PID/stat, peak RSS = VmHWM). Open loop: `oha -q RATE -z 10s
# --latency-correction -c 64` at 1k, 5k and 20k req/s. Every round visits every
# target in turn (A B C A B C ...) so drift hits all alike; the tables show the
# median of the rounds. Last, 50 policy reloads (atomic rename, each applied before
# the next, >= 150 ms apart) during a 30 s closed-loop run against `sluice`, errors counted.
#
# It installs what it needs (Debian: nginx-light haproxy wrk; `cargo install oha`),
# builds sluice-proxy in release, waits until no cargo/rustc build runs on the machine
# (up to 15 min), measures, prints the tables and appends them to bench/RESULTS.md.
# No pass/fail: it is a measurement. Takes about 9 minutes (ROUNDS=2) plus builds.
#
# Knobs (environment): ROUNDS=2 DURATION=10 RATES="1000 5000 20000" RELOADS=50 RELOAD_SECS=30
# IDLE_WAIT=900 (seconds to wait for the machine to be idle) APPEND=1 (0: print only)
# KEEP=0 (1: keep the temp dir with configs and logs).
#
# Core layout (issue 23), taskset-style CPU lists ("1", "2-5", "2,4" or "2 4"):
#   PROXY_CORES=1     every proxy under test
#   LOAD_CORES=0      wrk and oha; wrk runs one thread per core listed
#   BACKEND_CORES=0   the backend nginx, one worker per core listed
#   THREADS=1         thread counts to measure, e.g. "1 2 4" (1 is always included)
# The defaults are the layout above. Every target in the tables below runs at one
# thread, pinned to the first core of PROXY_CORES. For each N > 1 in THREADS a second
# set of sluice, sluice-nolog, nginx and HAProxy runs N threads/workers (sluice
# `--threads N`, nginx `worker_processes N`, HAProxy `nbthread N`) pinned to the first
# N cores of PROXY_CORES, or to all of them when it has fewer (oversubscribed: marked),
# loaded with `wrk -c 64*N` (and `direct` at 64*N connections, the load side's
# ceiling), in the same rounds as the rest; the scaling table compares them with N=1.
# Overlapping sets are allowed (on 2 cores load and backend must share) but warned
# about and recorded; the report says which figures such a layout cannot resolve.
# Open loop, the 1,000-key, pingora and reload runs stay at one thread.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10}
RATES=${RATES:-"1000 5000 20000"}
RELOADS=${RELOADS:-50}
RELOAD_SECS=${RELOAD_SECS:-30}
IDLE_WAIT=${IDLE_WAIT:-900}
APPEND=${APPEND:-1}
KEEP=${KEEP:-0}
PROXY_CORES=${PROXY_CORES:-1}
LOAD_CORES=${LOAD_CORES:-0}
BACKEND_CORES=${BACKEND_CORES:-0}
THREADS=${THREADS:-1}
CONNS=64
HOSTHDR="Host: bench"
URLPATH=/api/v1/items
export PATH="$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH"
COMMAND="bench/proxy.sh"
for v in ROUNDS DURATION RATES RELOADS RELOAD_SECS PROXY_CORES LOAD_CORES BACKEND_CORES THREADS; do
    case "$v" in
    ROUNDS) [ "$ROUNDS" = 2 ] || COMMAND="ROUNDS=$ROUNDS $COMMAND" ;;
    DURATION) [ "$DURATION" = 10 ] || COMMAND="DURATION=$DURATION $COMMAND" ;;
    RATES) [ "$RATES" = "1000 5000 20000" ] || COMMAND="RATES=\"$RATES\" $COMMAND" ;;
    RELOADS) [ "$RELOADS" = 50 ] || COMMAND="RELOADS=$RELOADS $COMMAND" ;;
    RELOAD_SECS) [ "$RELOAD_SECS" = 30 ] || COMMAND="RELOAD_SECS=$RELOAD_SECS $COMMAND" ;;
    PROXY_CORES) [ "$PROXY_CORES" = 1 ] || COMMAND="PROXY_CORES=\"$PROXY_CORES\" $COMMAND" ;;
    LOAD_CORES) [ "$LOAD_CORES" = 0 ] || COMMAND="LOAD_CORES=\"$LOAD_CORES\" $COMMAND" ;;
    BACKEND_CORES) [ "$BACKEND_CORES" = 0 ] || COMMAND="BACKEND_CORES=\"$BACKEND_CORES\" $COMMAND" ;;
    THREADS) [ "$THREADS" = 1 ] || COMMAND="THREADS=\"$THREADS\" $COMMAND" ;;
    esac
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- core layout (issue 23) ---------------------------------------------------------
# shellcheck source=bench/lib.sh
. bench/lib.sh
ALLOWED=" $(allowed_cpus) "
layout_list() { # NAME VALUE -> the cores, each checked against the ones we may run on
    local cores c
    cores=$(cpu_list_expand "$2") || die "$1=\"$2\" is not a CPU list"
    for c in $cores; do
        [[ $ALLOWED == *" $c "* ]] || die "$1=\"$2\": core $c is not one of this machine's (nproc: $(nproc); cores:$ALLOWED)"
    done
    echo "$cores"
}
P_CORES=($(layout_list PROXY_CORES "$PROXY_CORES"))
L_CORES=($(layout_list LOAD_CORES "$LOAD_CORES"))
B_CORES=($(layout_list BACKEND_CORES "$BACKEND_CORES"))
join_cores() { local IFS=,; echo "$*"; }
LOAD_SET=$(join_cores "${L_CORES[@]}")
BACKEND_SET=$(join_cores "${B_CORES[@]}")
LOAD_THREADS=${#L_CORES[@]}
BACKEND_WORKERS=${#B_CORES[@]}
NS=()
for n in 1 $THREADS; do
    [[ $n =~ ^[1-9][0-9]*$ ]] && [ "$n" -le 256 ] || die "THREADS=\"$THREADS\": $n is not a thread count (1..256)"
    [[ " ${NS[*]} " == *" $n "* ]] || NS+=("$n")
done
NS=($(printf '%s\n' "${NS[@]}" | sort -n))
[[ " $THREADS " == *" 1 "* ]] || log "THREADS=\"$THREADS\" lacks 1: N=1 is measured too (the scaling table's reference)"
common() { # two core arrays by name -> the cores in both, comma-separated
    local -n x=$1 y=$2
    local c out=()
    for c in "${x[@]}"; do [[ " ${y[*]} " == *" $c "* ]] && out+=("$c"); done
    join_cores "${out[@]}"
}
declare -A PIN OVERSUB SHARED # N -> proxy cores (taskset list); 1 if fewer cores than threads; cores shared with load/backend
LB_CORES=("${L_CORES[@]}" "${B_CORES[@]}")
for n in "${NS[@]}"; do
    if [ ${#P_CORES[@]} -ge "$n" ]; then
        PIN[$n]=$(join_cores "${P_CORES[@]:0:n}")
        OVERSUB[$n]=0
    else
        PIN[$n]=$(join_cores "${P_CORES[@]}")
        OVERSUB[$n]=1
    fi
    pin_n=(${PIN[$n]//,/ })
    SHARED[$n]=$(common pin_n LB_CORES)
done
OVERLAPS=()
o=$(common P_CORES L_CORES) && [ -n "$o" ] && OVERLAPS+=("proxies and load generator share core(s) $o")
o=$(common P_CORES B_CORES) && [ -n "$o" ] && OVERLAPS+=("proxies and backend share core(s) $o")
o=$(common L_CORES B_CORES) && [ -n "$o" ] && OVERLAPS+=("load generator and backend share core(s) $o")
for o in "${OVERLAPS[@]}"; do log "warning: $o (recorded in the results)"; done
for n in "${NS[@]}"; do
    [ "${OVERSUB[$n]}" = 1 ] && log "warning: N=$n threads on ${#P_CORES[@]} proxy core(s) (${PIN[$n]}): oversubscribed"
done
LAYOUT="PROXY_CORES=$(join_cores "${P_CORES[@]}") LOAD_CORES=$LOAD_SET BACKEND_CORES=$BACKEND_SET THREADS=\"${NS[*]}\""
log "layout: $LAYOUT"

# --- tools ------------------------------------------------------------------------
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing from Debian: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v oha >/dev/null; then
    log "building oha (cargo install oha --locked; a few minutes, cached in ~/.cargo/bin)"
    cargo install oha --locked
fi

log "building sluice-proxy (release)"
cargo build --release --locked -p sluice-proxy --bin sluice-proxy --example bare-pingora --example minimal-h1
BUILD_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
BUILD_DIRTY=$(git status --porcelain -- proxy policy Cargo.toml Cargo.lock 2>/dev/null | wc -l)

# --- private workspace, cleanup by PID ---------------------------------------------
TMP=$(mktemp -d /tmp/sluice-bench.XXXXXX)
PIDS=()
cleanup() {
    set +e
    stop_pids "${PIDS[@]}"
    if [ "$KEEP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run the binary we just built from a private copy: another build in the shared target
# directory must not swap it under the benchmark.
SLUICE="$TMP/sluice-proxy"
cp target/release/sluice-proxy "$SLUICE"
cp target/release/examples/bare-pingora "$TMP/bare-pingora"
cp target/release/examples/minimal-h1 "$TMP/minimal-h1"

# The N-thread instances (N > 1): sluice, its admin, sluice-nolog, its admin, nginx,
# HAProxy on 20000 + 8N + 0..5.
SCALE_PORTS=()
for n in "${NS[@]}"; do [ "$n" = 1 ] || SCALE_PORTS+=($(seq $((20000 + 8 * n)) $((20005 + 8 * n)))); done
for port in 18080 18000 18001 18002 18003 18004 18005 18006 18007 18008 18009 18010 18011 18012 18013 "${SCALE_PORTS[@]}"; do
    if ss -ltnH "sport = :$port" | grep -q .; then die "port $port is in use"; fi
done

# --- backend and proxies ----------------------------------------------------------
mkdir -p "$TMP/backend" "$TMP/nginx" "$TMP/haproxy"
nginx_conf "$TMP/backend" "$BACKEND_WORKERS" >"$TMP/backend/nginx.conf" <<'EOF'
  server {
    listen 127.0.0.1:18080;
    location / { default_type text/plain; return 200 "hello\n"; }
  }
EOF
nginx_proxy_conf() { # dir workers port
    mkdir -p "$1"
    nginx_conf "$1" "$2" >"$1/nginx.conf" <<EOF
  upstream backend {
    server 127.0.0.1:18080;
    keepalive 64;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$3;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
EOF
}
haproxy_conf() { # dir threads port
    mkdir -p "$1"
    # HAProxy refuses to start when maxconn needs more descriptors (two per
    # connection) than the hard limit allows: nbthread 4 asked for 32k here, over
    # the 20k limit. The load never opens more than 64*N connections.
    local maxconn=$((4000 * $2)) cap=$((($(ulimit -Hn) - 100) / 2))
    [ "$maxconn" -le "$cap" ] || maxconn=$cap
    cat >"$1/haproxy.cfg" <<EOF
global
  nbthread $2
  maxconn $maxconn
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 300s
frontend fe
  bind 127.0.0.1:$3
  default_backend be
backend be
  server backend 127.0.0.1:18080
EOF
}
nginx_proxy_conf "$TMP/nginx" 1 18002
haproxy_conf "$TMP/haproxy" 1 18003

declare -A PORT=([direct]=18080 [sluice]=18001 [sluice-nolog]=18004 [sluice-1k-keys]=18006 [pingora-bare]=18008 [minimal-h1]=18009 [sluice-pingora]=18010 [sluice-twin]=18012 [nginx]=18002 [haproxy]=18003)
declare -A ADMIN=([sluice]=18000 [sluice-nolog]=18005 [sluice-1k-keys]=18007 [sluice-pingora]=18011 [sluice-twin]=18013)
declare -A PROCS # target -> PIDs whose CPU and memory count as the proxy's
declare -A CONN  # target -> wrk connections (default CONNS)
P1=${PIN[1]} # where every one-thread proxy runs

taskset -c "$BACKEND_SET" nginx -e "$TMP/backend/error.log" -p "$TMP/backend" -c "$TMP/backend/nginx.conf" \
    >"$TMP/backend/stdout.log" 2>&1 &
PIDS+=($!)
BACKEND_PID=$!
taskset -c "$P1" nginx -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" \
    >"$TMP/nginx/stdout.log" 2>&1 &
PIDS+=($!)
NGINX_PID=$!
taskset -c "$P1" haproxy -db -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/stdout.log" 2>&1 &
PIDS+=($!)
PROCS[haproxy]=$!

start_sluice() { # name listen admin [flags...]; THREADS_N (default 1) threads on PIN[THREADS_N]
    local name=$1 listen=$2 admin=$3 n=${THREADS_N:-1}
    shift 3
    # The policy in a directory of its own: the proxy watches the policy's directory,
    # and the access log written next to it would wake the watcher on every request.
    mkdir -p "$TMP/$name/policy"
    cp bench/policy.yaml "$TMP/$name/policy/policy.yaml"
    # >> (O_APPEND): the log can be truncated between runs without leaving a hole.
    taskset -c "${PIN[$n]}" "$SLUICE" --threads "$n" --listen "127.0.0.1:$listen" --admin "127.0.0.1:$admin" \
        --policy "$TMP/$name/policy/policy.yaml" --drain-timeout 1s "$@" \
        >>"$TMP/$name/access.log" 2>"$TMP/$name/stderr.log" &
    PIDS+=($!)
    PROCS[$name]=$!
}
taskset -c "$P1" "$TMP/bare-pingora" --listen 127.0.0.1:18008 --upstream 127.0.0.1:18080 >"$TMP/bare-pingora.log" 2>&1 &
PIDS+=($!)
PROCS[pingora-bare]=$!
taskset -c "$P1" "$TMP/minimal-h1" --listen 127.0.0.1:18009 --upstream 127.0.0.1:18080 >"$TMP/minimal-h1.log" 2>&1 &
PIDS+=($!)
PROCS[minimal-h1]=$!
start_sluice sluice 18001 18000
start_sluice sluice-nolog 18004 18005 --no-access-log
start_sluice sluice-1k-keys 18006 18007
start_sluice sluice-pingora 18010 18011 --engine pingora
# The A/A control: a second, identical `sluice`, measured in the open loop only. Its
# p99 against the first's shows what difference the open loop can resolve.
start_sluice sluice-twin 18012 18013

# The N-thread instances for the scaling table; at N = 1 it uses the targets above.
SCALE_TARGETS=()   # in the order of the rounds
declare -A NGINX_N # N -> nginx master PID
for n in "${NS[@]}"; do
    [ "$n" = 1 ] && continue
    base=$((20000 + 8 * n))
    PORT[direct@$n]=18080
    PORT[sluice@$n]=$base ADMIN[sluice@$n]=$((base + 1))
    PORT[sluice-nolog@$n]=$((base + 2)) ADMIN[sluice-nolog@$n]=$((base + 3))
    PORT[nginx@$n]=$((base + 4)) PORT[haproxy@$n]=$((base + 5))
    for t in direct sluice sluice-nolog nginx haproxy; do
        CONN[$t@$n]=$((CONNS * n))
        SCALE_TARGETS+=("$t@$n")
    done
    THREADS_N=$n start_sluice "sluice@$n" "$base" $((base + 1))
    THREADS_N=$n start_sluice "sluice-nolog@$n" $((base + 2)) $((base + 3)) --no-access-log
    nginx_proxy_conf "$TMP/nginx@$n" "$n" $((base + 4))
    taskset -c "${PIN[$n]}" nginx -e "$TMP/nginx@$n/error.log" -p "$TMP/nginx@$n" -c "$TMP/nginx@$n/nginx.conf" \
        >"$TMP/nginx@$n/stdout.log" 2>&1 &
    PIDS+=($!)
    NGINX_N[$n]=$!
    haproxy_conf "$TMP/haproxy@$n" "$n" $((base + 5))
    taskset -c "${PIN[$n]}" haproxy -db -f "$TMP/haproxy@$n/haproxy.cfg" >"$TMP/haproxy@$n/stdout.log" 2>&1 &
    PIDS+=($!)
    PROCS[haproxy@$n]=$!
done
SCALE_SLUICES=()
SCALE_CHECK=()
for t in "${SCALE_TARGETS[@]}"; do
    case $t in sluice*) SCALE_SLUICES+=("$t") ;; esac
    case $t in direct*) ;; *) SCALE_CHECK+=("$t") ;; esac
done

# Wait until everything answers (bounded), then check each target serves the body.
for name in sluice sluice-nolog sluice-1k-keys sluice-pingora sluice-twin "${SCALE_SLUICES[@]}"; do
    for ((i = 0; i < 100; i++)); do
        curl -fsS --max-time 1 "http://127.0.0.1:${ADMIN[$name]}/ready" >/dev/null 2>&1 && break
        kill -0 "${PROCS[$name]}" 2>/dev/null || die "$name exited: $(tail -5 "$TMP/$name/stderr.log")"
        sleep 0.1
    done
done
for t in direct sluice sluice-nolog sluice-pingora sluice-twin pingora-bare minimal-h1 nginx haproxy "${SCALE_CHECK[@]}"; do
    body=""
    for ((i = 0; i < 100; i++)); do
        body=$(curl -sS --max-time 1 -H "$HOSTHDR" "http://127.0.0.1:${PORT[$t]}$URLPATH" 2>/dev/null || true)
        [ "$body" = hello ] && break
        sleep 0.1
    done
    [ "$body" = hello ] || die "$t does not answer 'hello' on port ${PORT[$t]} (got: $body)"
done
body=$(curl -sS --max-time 1 -H "$HOSTHDR" -H 'x-user-id: u1' "http://127.0.0.1:18006/keyed/item")
[ "$body" = hello ] || die "sluice-1k-keys /keyed does not answer 'hello' (got: $body)"
route_of() { # the route of the last access-log line (written after the response: poll)
    local r="" i
    for ((i = 0; i < 20; i++)); do
        r=$(tail -1 "$TMP/$1/access.log" | jq -r .route 2>/dev/null || true)
        [ -n "$r" ] && break
        sleep 0.1
    done
    echo "$r"
}
route=$(route_of sluice)
[ "$route" = items ] || die "sluice's access log does not show route items for $URLPATH (got: $route)"
route=$(route_of sluice-1k-keys)
[ "$route" = keyed ] || die "sluice-1k-keys' access log does not show route keyed (got: $route)"
PROCS[nginx]="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"
PIDS+=($(pgrep -P "$NGINX_PID"))
[ -n "$(pgrep -P "$BACKEND_PID")" ] && PIDS+=($(pgrep -P "$BACKEND_PID"))
for n in "${!NGINX_N[@]}"; do
    PROCS[nginx@$n]="${NGINX_N[$n]} $(pgrep -P "${NGINX_N[$n]}" | tr '\n' ' ')"
    PIDS+=($(pgrep -P "${NGINX_N[$n]}"))
done

cat >"$TMP/keys.lua" <<'EOF'
-- 1,000 distinct x-user-id values in rotation on the per-user rate-limited route.
local i = 0
request = function()
  i = i % 1000 + 1
  wrk.headers["x-user-id"] = "user-" .. i
  return wrk.format(nil, "/keyed/item")
end
EOF

# --- helpers ------------------------------------------------------------------------
CLK=$(getconf CLK_TCK)

declare -A R # "metric|target[|rate]" -> values of the rounds, space separated
add() { R[$1]="${R[$1]:-} $2"; }
RAW="$TMP/raw.txt"
: >"$RAW"
DISTURBED=0
RUNS=0

wrk_run() { # target seconds [extra wrk args] -> sets W_RPS W_P50 W_P99 W_REQS W_NON2XX W_SOCKERR
    local t=$1 secs=$2
    shift 2
    local out
    out=$(taskset -c "$LOAD_SET" timeout $((secs + 30)) wrk -t"$LOAD_THREADS" -c"${CONN[$t]:-$CONNS}" -d${secs}s --latency -H "$HOSTHDR" "$@" \
        "http://127.0.0.1:${PORT[$t]}$URLPATH")
    W_RPS=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    W_P50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    W_P99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    W_REQS=$(awk '/requests in/ {print $1}' <<<"$out")
    W_NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
    W_NON2XX=${W_NON2XX:-0}
    W_SOCKERR=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' <<<"$out")
    W_SOCKERR=${W_SOCKERR:-0}
}

closed_loop() { # target round
    local t=$1 round=$2 pids c0 c1 extra=() mark=""
    [ "$t" = sluice-1k-keys ] && extra=(-s "$TMP/keys.lua")
    case $t in sluice | sluice-1k-keys | sluice-pingora | sluice@*) : >"$TMP/$t/access.log" ;; esac
    busy && mark="*" && DISTURBED=$((DISTURBED + 1))
    RUNS=$((RUNS + 1))
    pids=${PROCS[$t]:-}
    [ -n "$pids" ] && c0=$(cpu_ticks $pids)
    wrk_run "$t" "$DURATION" "${extra[@]}"
    add "rps|$t" "$W_RPS"
    add "p50|$t" "$W_P50"
    add "p99|$t" "$W_P99"
    add "err|$t" $((W_NON2XX + W_SOCKERR))
    local cpu="-"
    if [ -n "$pids" ]; then
        c1=$(cpu_ticks $pids)
        cpu=$(awk -v d=$((c1 - c0)) -v n="$W_REQS" -v hz="$CLK" 'BEGIN {printf "%.2f", d / hz * 1e6 / n}')
        add "cpu|$t" "$cpu"
    fi
    local logb=""
    case $t in sluice | sluice-1k-keys)
        logb=$(awk -v b="$(stat -c %s "$TMP/$t/access.log")" -v n="$W_REQS" 'BEGIN {printf "%.0f", b / n}')
        add "logb|$t" "$logb"
        ;;
    esac
    printf 'closed round=%s target=%s connections=%s rps=%s p50=%sms p99=%sms requests=%s non2xx=%s sockerr=%s cpu_us_per_req=%s log_bytes_per_req=%s%s\n' \
        "$round" "$t" "${CONN[$t]:-$CONNS}" "$W_RPS" "$W_P50" "$W_P99" "$W_REQS" "$W_NON2XX" "$W_SOCKERR" "$cpu" "${logb:--}" "${mark:+ (a build was running)}" |
        tee -a "$RAW" >&2
}

open_loop() { # target rate round
    local t=$1 rate=$2 round=$3 out mark=""
    case $t in sluice | sluice-twin) : >"$TMP/$t/access.log" ;; esac
    busy && mark="*" && DISTURBED=$((DISTURBED + 1))
    RUNS=$((RUNS + 1))
    out=$(taskset -c "$LOAD_SET" timeout $((DURATION + 60)) oha -q "$rate" -z "${DURATION}s" --latency-correction --no-tui \
        -c $CONNS --output-format json -H "$HOSTHDR" "http://127.0.0.1:${PORT[$t]}$URLPATH")
    local rps p50 p99 ok
    rps=$(jq -r '.summary.requestsPerSec' <<<"$out")
    p50=$(jq -r '.latencyPercentiles.p50 * 1000' <<<"$out")
    p99=$(jq -r '.latencyPercentiles.p99 * 1000' <<<"$out")
    ok=$(jq -r '.summary.successRate' <<<"$out")
    add "orps|$t|$rate" "$rps"
    add "op50|$t|$rate" "$p50"
    add "op99|$t|$rate" "$p99"
    printf 'open rate=%s round=%s target=%s achieved=%.0f p50=%.3fms p99=%.3fms success=%s status=%s errors=%s%s\n' \
        "$rate" "$round" "$t" "$rps" "$p50" "$p99" "$ok" \
        "$(jq -c '.statusCodeDistribution' <<<"$out")" "$(jq -c '.errorDistribution' <<<"$out")" \
        "${mark:+ (a build was running)}" | tee -a "$RAW" >&2
}

reload_metric() { # admin port, result
    curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" |
        awk -v r="result=\"$2\"" '/^sluice_policy_reloads_total\{/ && index($0, r) {s += $NF} END {print s + 0}'
}

# --- wait for a quiet machine -------------------------------------------------------
waited=0
while busy && [ $waited -lt "$IDLE_WAIT" ]; do
    log "a cargo/rustc build is running on this machine; waiting (${waited}s of at most ${IDLE_WAIT}s)"
    sleep 30
    waited=$((waited + 30))
done
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_AT_START=no
busy && BUSY_AT_START=yes && log "still busy after ${IDLE_WAIT}s; measuring anyway (noted in the results)"

# --- measure ------------------------------------------------------------------------
CLOSED_TARGETS=(direct sluice sluice-nolog sluice-1k-keys sluice-pingora pingora-bare minimal-h1 nginx haproxy)
OPEN_TARGETS=(direct sluice sluice-nolog nginx sluice-twin haproxy)
PROXIES=(sluice sluice-nolog sluice-1k-keys sluice-pingora pingora-bare minimal-h1 nginx haproxy)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
T0=$SECONDS

log "warm-up: 2 s per target"
for t in "${CLOSED_TARGETS[@]}" "${SCALE_TARGETS[@]}"; do
    extra=()
    [ "$t" = sluice-1k-keys ] && extra=(-s "$TMP/keys.lua")
    wrk_run "$t" 2 "${extra[@]}"
done

log "closed loop: ${ROUNDS} rounds x $((${#CLOSED_TARGETS[@]} + ${#SCALE_TARGETS[@]})) targets x ${DURATION}s"
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${CLOSED_TARGETS[@]}" "${SCALE_TARGETS[@]}"; do closed_loop "$t" "$r"; done
done
declare -A HWM
for t in "${PROXIES[@]}"; do HWM[$t]=$(hwm_kb ${PROCS[$t]}); done
# The N-thread instances too (issue 23: <= 32 MB at four threads, 64*N connections).
for t in "${SCALE_TARGETS[@]}"; do
    [ -n "${PROCS[$t]:-}" ] && HWM[$t]=$(hwm_kb ${PROCS[$t]})
done

log "open loop: rates ${RATES}, ${ROUNDS} rounds x ${#OPEN_TARGETS[@]} targets x ${DURATION}s"
for rate in $RATES; do
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${OPEN_TARGETS[@]}"; do open_loop "$t" "$rate" "$r"; done
    done
done

log "reloads: ${RELOADS} policy rewrites (each applied before the next, >= 150 ms apart) during a ${RELOAD_SECS}s closed-loop run on sluice"
ACC0=$(reload_metric 18000 accepted)
REJ0=$(reload_metric 18000 rejected)
UNCH0=$(reload_metric 18000 unchanged)
# Each rewrite waits until the proxy has applied the previous one (polling the reload
# counter, at most 5 s) and at least 150 ms, so the watcher's debounce cannot fold two
# rewrites into one reload and the run really sees RELOADS reloads. How long each took
# to be applied (rename -> counter up) is recorded.
reloader() {
    local i j n0 t0 now dir="$TMP/sluice/policy"
    sleep 1
    for ((i = 1; i <= RELOADS; i++)); do
        n0=$(reload_metric 18000 accepted)
        t0=$(date +%s%N)
        sed "s/requestsPerSecond: 1000000000 # BENCH_RELOAD/requestsPerSecond: $((1000000000 - i)) # BENCH_RELOAD/" \
            bench/policy.yaml >"$dir/.policy.yaml.tmp"
        mv -f "$dir/.policy.yaml.tmp" "$dir/policy.yaml"
        for ((j = 0; j < 100; j++)); do
            sleep 0.05
            [ "$(reload_metric 18000 accepted)" -gt "$n0" ] && break
        done
        now=$(date +%s%N)
        echo $(((now - t0) / 1000000)) >>"$TMP/reload-ms.txt"
        [ $(((now - t0) / 1000000)) -ge 150 ] || sleep 0.15
    done
}
grep -q 'requestsPerSecond: 1000000000 # BENCH_RELOAD' bench/policy.yaml || die "bench/policy.yaml lost its BENCH_RELOAD line"
: >"$TMP/sluice/access.log"
reloader &
RELOADER=$!
PIDS+=($RELOADER)
RL_MARK=""
busy && RL_MARK="*"
wrk_run sluice "$RELOAD_SECS"
RL_LATE=no
kill -0 "$RELOADER" 2>/dev/null && RL_LATE=yes
ACC_IN_RUN=$(($(reload_metric 18000 accepted) - ACC0))
wait "$RELOADER" || true
sleep 1.5 # the watcher's debounce (at most 0.5 s) and the last reload
ACC=$(($(reload_metric 18000 accepted) - ACC0))
REJ=$(($(reload_metric 18000 rejected) - REJ0))
UNCH=$(($(reload_metric 18000 unchanged) - UNCH0))
RL_RPS=$W_RPS RL_P99=$W_P99 RL_NON2XX=$W_NON2XX RL_SOCKERR=$W_SOCKERR RL_REQS=$W_REQS
RL_MS_MED=$(median <"$TMP/reload-ms.txt")
RL_MS_MAX=$(sort -g "$TMP/reload-ms.txt" | tail -1)
printf 'reload rewrites=%s accepted=%s accepted_during_load=%s apply_ms_median=%s apply_ms_max=%s rejected=%s unchanged=%s rps=%s p99=%sms requests=%s non2xx=%s sockerr=%s%s\n' \
    "$RELOADS" "$ACC" "$ACC_IN_RUN" "$RL_MS_MED" "$RL_MS_MAX" "$REJ" "$UNCH" "$RL_RPS" "$RL_P99" "$RL_REQS" "$RL_NON2XX" "$RL_SOCKERR" "${RL_MARK:+ (a build was running)}" |
    tee -a "$RAW" >&2
HWM_AFTER_RELOADS=$(hwm_kb ${PROCS[sluice]})
for t in sluice sluice-nolog sluice-1k-keys sluice-pingora "${SCALE_SLUICES[@]}"; do
    kill -0 "${PROCS[$t]}" 2>/dev/null || die "$t died during the run: $(tail -5 "$TMP/$t/stderr.log")"
done
ELAPSED=$((SECONDS - T0))

# --- report -------------------------------------------------------------------------
m() { median <<<"${R[$1]:-}"; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan" || v == "") print "-"; else printf f, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "-"; else printf "%.2fx", a / b }'; }

declare -A M
for t in "${CLOSED_TARGETS[@]}" "${SCALE_TARGETS[@]}"; do
    for k in rps p50 p99 cpu err logb; do M["$k|$t"]=$(m "$k|$t"); done
done
for rate in $RATES; do
    for t in "${OPEN_TARGETS[@]}"; do
        for k in orps op50 op99; do M["$k|$t|$rate"]=$(m "$k|$t|$rate"); done
    done
done

label() {
    case $1 in
    direct) echo "direct (no proxy)" ;;
    sluice) echo "sluice (access log on)" ;;
    sluice-nolog) echo "sluice (--no-access-log)" ;;
    sluice-1k-keys) echo "sluice, 1,000 rate-limit keys" ;;
    sluice-pingora) echo "sluice --engine pingora (access log on)" ;;
    sluice-twin) echo "sluice again: a second identical instance (A/A control)" ;;
    pingora-bare) echo "bare pingora (no policy, floor)" ;;
    minimal-h1) echo "minimal tokio+httparse proxy (no policy)" ;;
    *) echo "$1" ;;
    esac
}

# The scaling table (issue 23): every N of THREADS for the four targets, and which
# figures this layout cannot resolve.
key_of() { if [ "$2" = 1 ]; then echo "$1"; else echo "$1@$2"; fi; } # target N
pct() { # a b -> "+3.1%" (a against b)
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b == "" || b == 0) print "-"; else printf "%+.1f%%", (a / b - 1) * 100 }'
}
scaling_report() {
    local t n k k1 kn kd cores note cpu_vs lb rss unres=() why=() loadbound=()
    echo "### Scaling: N threads per proxy (closed loop, \`wrk -t$LOAD_THREADS -c64*N -d${DURATION}s\`)"
    echo
    echo "Layout: \`$LAYOUT\`. At N threads sluice runs \`--threads N\`, nginx \`worker_processes N\`,"
    echo "HAProxy \`nbthread N\`, each pinned to the cores in the table; N = 1 is the one-thread instance of the"
    echo "closed-loop table above. \`direct\` at 64*N connections is what the backend and load cores deliver"
    echo "without a proxy: a proxy row near it is bounded by those cores, not by the proxy."
    echo
    echo "| target | N | proxy cores | req/s | speed-up vs N=1 | CPU/request | CPU/request vs N=1 (target: within 5%) | req/s vs nginx at N | CPU/request vs nginx at N | p99 | peak RSS | errors |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
    for n in "${NS[@]}"; do
        kd=$(key_of direct "$n")
        printf '| direct (no proxy), %s connections | %s | - | %s | %s | - | - | - | - | %s ms | - | %s |\n' "$((CONNS * n))" "$n" \
            "$(fmt "${M[rps|$kd]}" %.0f)" "$(ratio "${M[rps|$kd]}" "${M[rps|direct]}")" \
            "$(fmt "${M[p99|$kd]}" %.2f)" "$(fmt "${M[err|$kd]}" %.0f)"
    done
    for t in sluice sluice-nolog nginx haproxy; do
        k1=$t
        for n in "${NS[@]}"; do
            k=$(key_of "$t" "$n")
            kn=$(key_of nginx "$n")
            kd=$(key_of direct "$n")
            cores=${PIN[$n]}
            note=""
            [ "${OVERSUB[$n]}" = 1 ] && note=" (oversubscribed)"
            [ -n "${SHARED[$n]}" ] && note="$note (shares ${SHARED[$n]} with load/backend)"
            cpu_vs="-"
            if [ "$n" != 1 ]; then
                cpu_vs=$(pct "${M[cpu|$k]}" "${M[cpu|$k1]}")
                if [ "$cpu_vs" != "-" ]; then
                    if awk -v a="${M[cpu|$k]}" -v b="${M[cpu|$k1]}" 'BEGIN {exit !(a <= b * 1.05)}'; then
                        cpu_vs="$cpu_vs (within)"
                    else
                        cpu_vs="$cpu_vs (over)"
                    fi
                fi
            fi
            rss="-"
            [ -n "${HWM[$k]:-}" ] && rss=$(awk -v kb="${HWM[$k]}" 'BEGIN {printf "%.1f MB", kb / 1024}')
            printf '| %s | %s | %s%s | %s | %s | %s | %s | %s | %s | %s ms | %s | %s |\n' "$(label "$t")" "$n" "$cores" "$note" \
                "$(fmt "${M[rps|$k]}" %.0f)" "$( [ "$n" = 1 ] && echo 1.00x || ratio "${M[rps|$k]}" "${M[rps|$k1]}")" \
                "$(fmt "${M[cpu|$k]}" '%.1f µs')" "$cpu_vs" \
                "$(ratio "${M[rps|$k]}" "${M[rps|$kn]}")" "$(ratio "${M[cpu|$k]}" "${M[cpu|$kn]}")" \
                "$(fmt "${M[p99|$k]}" %.2f)" "$rss" "$(fmt "${M[err|$k]}" %.0f)"
            if awk -v a="${M[rps|$k]}" -v d="${M[rps|$kd]}" 'BEGIN {exit !(a != "nan" && d != "nan" && d > 0 && a >= 0.9 * d)}'; then
                loadbound+=("$(label "$t") at N=$n")
            fi
        done
    done
    echo
    echo "CPU/request: utime+stime of all the proxy's threads (nginx: master + workers) over the run,"
    echo "divided by the requests wrk completed; if the threads scale without contention it stays"
    echo "flat as N grows. Speed-up: req/s at N over req/s at N = 1, same target. Peak RSS: \`VmHWM\`"
    echo "after the closed-loop rounds, at 64*N connections (issue 23: <= 20 MB at one thread, <= 32 MB at four)."
    echo
    for n in "${NS[@]}"; do
        local w=()
        [ "${OVERSUB[$n]}" = 1 ] && w+=("$n threads share the ${#P_CORES[@]} proxy core(s) ${PIN[$n]}")
        [ -n "${SHARED[$n]}" ] && w+=("the proxy's core(s) ${SHARED[$n]} also run the load generator or the backend")
        if [ ${#w[@]} -gt 0 ]; then
            unres+=("$n")
            why+=("N=$n: $(IFS=';'; echo "${w[*]}" | sed 's/;/; /g')")
        fi
    done
    if [ ${#unres[@]} -gt 0 ]; then
        echo "**What this run cannot resolve.** This machine ($(nproc) cores, layout above) cannot give"
        echo "each proxy thread a core of its own with the load generator and the backend on other cores:"
        echo
        printf -- '- %s\n' "${why[@]}"
        lb=$(common L_CORES B_CORES)
        [ -n "$lb" ] && echo "- at every N the load generator and the backend share core(s) $lb: the load side does not grow with N (see \`direct\`)"
        echo
        echo "So, for N = ${unres[*]}:"
        echo
        echo "- **Meaningless:** req/s, the speed-up vs N=1 and req/s vs nginx. Throughput cannot scale past"
        echo "  the cores the proxy has free, so a speed-up near (or under) 1.00x says nothing about how"
        echo "  sluice scales, and the ratio to nginx compares how each copes with time-slicing, not scaling."
        echo "  p99 there is largely the scheduler's time slice."
        echo "- **Still meaningful, roughly:** CPU per request, its change vs N=1 and its ratio to nginx at"
        echo "  the same N. It is the work per request summed over the threads, so it still shows what more"
        echo "  threads cost (shared state, locks, cross-thread wake-ups, more connections to the backend);"
        echo "  time-slicing threads on one core adds context switches and cache refills that N real cores"
        echo "  would not pay (and saves the cross-core cache traffic they would), so take a few per cent"
        echo "  either way as noise, not as a verdict on the 5% target."
        echo "- To measure scaling, run on a machine with at least N + 2 cores, e.g. on 8:"
        echo "  \`PROXY_CORES=4-7 LOAD_CORES=0-1 BACKEND_CORES=2-3 THREADS=\"1 2 4\" bench/proxy.sh\`."
        echo
    fi
    if [ ${#loadbound[@]} -gt 0 ]; then
        echo "**Bounded by the load side:** $(IFS=';'; echo "${loadbound[*]}" | sed 's/;/; /g') reached 90% or more of"
        echo "\`direct\` at the same connections: those req/s measure the load generator and backend, not the proxy."
        echo
    fi
}

REPORT="$TMP/report.md"
{
    echo "## Proxy comparison: sluice vs nginx vs HAProxy ($START)"
    echo
    echo "Command: \`$COMMAND\` (bench/proxy.sh; took ${ELAPSED} s of measuring)."
    echo
    echo "Machine: $(nproc) cores ($(lscpu | awk -F: '/^Model name/ {gsub(/^ +/, "", $2); print $2; exit}')),"
    echo "$(free -g | awk '/^Mem:/ {print $2}') GiB memory, Linux $(uname -r)."
    echo "Layout: \`$LAYOUT\`. Core(s) $P1 run(s) the proxy under test"
    echo "(one worker/thread, \`taskset -c $P1\`, in every table but the scaling table); core(s) $BACKEND_SET"
    echo "the backend (nginx, $BACKEND_WORKERS worker(s), \`return 200 \"hello\\n\"\`) and core(s) $LOAD_SET the load"
    echo "generator (wrk with $LOAD_THREADS thread(s)), so the \`direct\` row is bounded by those cores."
    if [ ${#OVERLAPS[@]} -gt 0 ]; then
        echo "Overlaps in this layout: $(IFS=';'; echo "${OVERLAPS[*]}" | sed 's/;/; /g')."
    fi
    echo "Tools: $(nginx -v 2>&1 | sed 's/^nginx version: //'), HAProxy $(haproxy -v | awk 'NR == 1 {print $3}'),"
    echo "wrk $(wrk -v 2>&1 | awk 'NR == 1 {print $2}'), $(oha --version). sluice-proxy built from $BUILD_REV"
    if [ "$BUILD_DIRTY" -gt 0 ]; then
        echo "plus $BUILD_DIRTY uncommitted changed file(s) under proxy/, policy/ or Cargo.* (work in progress at the time)."
    else
        echo "(clean tree)."
    fi
    echo "Sluice runs \`bench/policy.yaml\` (10 routes by prefix, 2 also by header; the traffic's route"
    echo "\`items\` is the 8th, with a token bucket that never trips, a circuit breaker and a timeout;"
    echo "metrics on) with \`--threads 1\`; its JSON access log goes to a file on the same ext4 disk"
    echo "as everything else (\`stdout >> file\`). nginx and HAProxy log nothing (their fastest setup):"
    echo "nginx \`proxy_pass\` to an upstream with \`keepalive 64\`, HTTP/1.1, \`Connection \"\"\`,"
    echo "worker_processes 1; HAProxy 2.6 \`mode http\`, \`nbthread 1\`, \`http-reuse always\`."
    echo "Requests: \`GET $URLPATH\` with \`$HOSTHDR\` on keep-alive connections. Each figure is the"
    echo "median of $ROUNDS rounds taken A B C .. A B C .. in the same run. Load average when the"
    echo "measuring began: $LOADAVG (no cargo/rustc build running: $([ "$BUSY_AT_START" = no ] && echo yes || echo no))."
    if [ "$BUSY_AT_START" = yes ] || [ "$DISTURBED" -gt 0 ] || [ -n "$RL_MARK" ]; then
        echo
        echo "**Caution:** another cargo/rustc build was running during $DISTURBED of $RUNS runs"
        echo "(busy at start: $BUSY_AT_START); those numbers are disturbed (marked in the raw lines)."
    fi
    echo
    echo "### Closed loop: \`wrk -t$LOAD_THREADS -c$CONNS -d${DURATION}s --latency\`"
    echo
    echo "| target | req/s | vs nginx | vs HAProxy | p50 | p99 | CPU/request | peak RSS | errors |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for t in "${CLOSED_TARGETS[@]}"; do
        rss="-"
        [ -n "${HWM[$t]:-}" ] && rss=$(awk -v k="${HWM[$t]}" 'BEGIN {printf "%.1f MB", k / 1024}')
        printf '| %s | %s | %s | %s | %s ms | %s ms | %s | %s | %s |\n' "$(label "$t")" \
            "$(fmt "${M[rps|$t]}" %.0f)" "$(ratio "${M[rps|$t]}" "${M[rps|nginx]}")" \
            "$(ratio "${M[rps|$t]}" "${M[rps|haproxy]}")" \
            "$(fmt "${M[p50|$t]}" %.2f)" "$(fmt "${M[p99|$t]}" %.2f)" \
            "$(fmt "${M[cpu|$t]}" '%.1f µs')" "$rss" "$(fmt "${M[err|$t]}" %.0f)"
    done
    echo
    echo "CPU/request: utime+stime of the proxy's process(es) from \`/proc/PID/stat\` over the run,"
    echo "divided by the requests wrk completed. Peak RSS: \`VmHWM\` after the closed-loop rounds"
    echo "(nginx: master + worker). Errors: non-2xx answers plus socket errors reported by wrk."
    echo "The access log wrote $(fmt "${M[logb|sluice]}" %.0f) bytes per request."
    echo
    echo "### Open loop: \`oha -q RATE -z ${DURATION}s --latency-correction --no-tui -c $CONNS\`"
    echo
    [ ${#NS[@]} -gt 1 ] && echo "One thread per proxy only (core(s) $P1); the N-thread instances are measured in the closed loop only." && echo
    printf '| target |'
    for rate in $RATES; do printf ' %s/s p50 | p99 | achieved |' "$rate"; done
    echo
    printf '|---|'
    for rate in $RATES; do printf -- '---|---|---|'; done
    echo
    for t in "${OPEN_TARGETS[@]}"; do
        printf '| %s |' "$(label "$t")"
        for rate in $RATES; do
            printf ' %s ms | %s ms | %s |' "$(fmt "${M[op50|$t|$rate]}" %.2f)" "$(fmt "${M[op99|$t|$rate]}" %.2f)" \
                "$(fmt "${M[orps|$t|$rate]}" %.0f)"
        done
        echo
    done
    echo
    printf '| p99 ratio (lower is better) |'
    for rate in $RATES; do printf ' %s/s |' "$rate"; done
    echo
    printf '|---|'
    for rate in $RATES; do printf -- '---|'; done
    echo
    for t in sluice sluice-nolog; do
        for ref in nginx haproxy; do
            printf '| %s / %s |' "$(label "$t")" "$ref"
            for rate in $RATES; do printf ' %s |' "$(ratio "${M[op99|$t|$rate]}" "${M[op99|$ref|$rate]}")"; done
            echo
        done
    done
    printf '| %s / %s (A/A: the resolution) |' "$(label sluice-twin)" "$(label sluice)"
    for rate in $RATES; do printf ' %s |' "$(ratio "${M[op99|sluice-twin|$rate]}" "${M[op99|sluice|$rate]}")"; done
    echo
    echo
    echo "Latency is corrected for coordinated omission (measured from each request's scheduled"
    echo "time). \"achieved\" is requests completed per second; below the asked rate the target"
    echo "could not keep up and the latency shows the queue."
    echo
    [ ${#NS[@]} -gt 1 ] && scaling_report
    echo "### Policy reloads under load"
    echo
    echo "$RELOADS rewrites of sluice's policy file (a copy of bench/policy.yaml with the \`items\` route's"
    echo "rate changed each time, written to a temp file and renamed over it) during a ${RELOAD_SECS} s"
    echo "closed-loop run (\`wrk -t$LOAD_THREADS -c$CONNS\`) against \`sluice\`. Each rewrite waits until the previous one"
    echo "was applied (and at least 150 ms), so the watcher's debounce cannot merge them."
    echo
    echo "| rewrites | reloads accepted (during the load) | rejected | unchanged | rename -> applied, median / max | non-2xx | socket errors | req/s | p99 |"
    echo "|---|---|---|---|---|---|---|---|---|"
    printf '| %s | %s (%s) | %s | %s | %s / %s ms | %s | %s | %s%s | %s ms |\n' "$RELOADS" "$ACC" "$ACC_IN_RUN" "$REJ" "$UNCH" \
        "$RL_MS_MED" "$RL_MS_MAX" "$RL_NON2XX" "$RL_SOCKERR" "$(fmt "$RL_RPS" %.0f)" "$RL_MARK" "$(fmt "$RL_P99" %.2f)"
    echo
    [ "$RL_LATE" = yes ] && echo "Not all rewrites were applied within the ${RELOAD_SECS} s of load; the rest came after it." && echo
    echo "Reloads are counted from \`sluice_policy_reloads_total\` on the admin port (polled every 50 ms"
    echo "by the rewriter, which adds a little admin traffic on the proxy's core). sluice's peak RSS"
    echo "after the reloads and every other run: $(awk -v k="$HWM_AFTER_RELOADS" 'BEGIN {printf "%.1f MB", k / 1024}')."
    echo
    echo "### Issue 9's figures from this run"
    echo
    echo "| figure | target | this run |"
    echo "|---|---|---|"
    echo "| req/s, Sluice / nginx | >= 1.0 (stretch 1.2) | $(ratio "${M[rps|sluice]}" "${M[rps|nginx]}") (no access log: $(ratio "${M[rps|sluice-nolog]}" "${M[rps|nginx]}")) |"
    echo "| req/s, Sluice / HAProxy | >= 1.0 | $(ratio "${M[rps|sluice]}" "${M[rps|haproxy]}") (no access log: $(ratio "${M[rps|sluice-nolog]}" "${M[rps|haproxy]}")) |"
    echo "| req/s, Sluice on its h1 engine / on pingora's (what the engine buys) | - | $(ratio "${M[rps|sluice]}" "${M[rps|sluice-pingora]}") |"
    echo "| req/s, bare pingora / nginx (what pingora itself allows) | - | $(ratio "${M[rps|pingora-bare]}" "${M[rps|nginx]}") |"
    echo "| req/s, minimal tokio+httparse proxy / nginx (what an engine of our own allows) | - | $(ratio "${M[rps|minimal-h1]}" "${M[rps|nginx]}") |"
    if [[ " $RATES " == *" 5000 "* ]]; then
        echo "| p99 at 5k req/s open loop | <= nginx's | $(fmt "${M[op99|sluice|5000]}" %.2f) ms vs $(fmt "${M[op99|nginx|5000]}" %.2f) ms ($(ratio "${M[op99|sluice|5000]}" "${M[op99|nginx|5000]}"); an identical second Sluice: $(ratio "${M[op99|sluice-twin|5000]}" "${M[op99|sluice|5000]}") the first) |"
    fi
    echo "| peak RSS at 64 connections | <= 20 MB | $(awk -v k="${HWM[sluice]}" 'BEGIN {printf "%.1f MB", k / 1024}') |"
    echo "| errors during $RELOADS reloads under load | 0 | $((RL_NON2XX + RL_SOCKERR)) |"
    echo "| req/s with 1,000 keys / one bucket | - | $(ratio "${M[rps|sluice-1k-keys]}" "${M[rps|sluice]}") |"
    echo
    echo "<details><summary>Raw runs</summary>"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
    echo
    echo "</details>"
} >"$REPORT"

echo
cat "$REPORT"
if [ "$APPEND" = 1 ]; then
    [ -f bench/RESULTS.md ] || printf '# Benchmark results\n' >bench/RESULTS.md
    { echo; cat "$REPORT"; } >>bench/RESULTS.md
    log "appended to bench/RESULTS.md"
fi
