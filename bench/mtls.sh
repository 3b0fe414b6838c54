#!/usr/bin/env bash
# bench/mtls.sh: what the mTLS hop between two Sluice proxies costs per request, and
# the handshake rate of an inbound listener, against a plaintext hop (issue 22).
#
# Certificates: made by openssl in the temp dir: a P-256 root, two P-256 workload
# leaves (URI SAN spiffe://cluster.local/ns/shop/sa/{caller,callee}, EKU serverAuth +
# clientAuth; the root's key in SEC1, the leaves' in PKCS#8), valid for 2 days.
#
# Processes (layout of bench/proxy.sh: proxies on core 1, backend and load on core 0):
#
#   backend       nginx, one worker, `return 200 "hello\n"`    127.0.0.1:18280  core 0
#   callee        sluice-proxy, identity shop/callee, inbound listener -> backend
#                 under policy `callee` (one route, `all`)      inbound 127.0.0.1:18201
#                                                               admin   127.0.0.1:18211  core 1
#   caller-plain  sluice-proxy, identity shop/caller, `--listen`, host `bench` -> the
#                 callee's inbound, backend without `tls:`      127.0.0.1:18203
#                 (the `plaintext` variant)                     admin   127.0.0.1:18213  core 1
#   caller-mtls   the same with `tls: {identity: spiffe://cluster.local/ns/shop/sa/callee}`
#                 (the `mtls` variant)                          127.0.0.1:18204
#                                                               admin   127.0.0.1:18214  core 1
#
# The two callers are identical but for the backend's `tls:` (both hold identities,
# both run --threads 1 --no-access-log), and both talk to the same callee, so only the
# hop differs; the caller of the other variant sits idle during a run. A caller per
# variant rather than one caller reloaded between them: a reload would rebuild the
# pools and put handshakes into the runs.
#
# 1. Keep-alive: `wrk -t1 -c$CONNS -d${DURATION}s --latency -H 'Host: bench'` against
#    each caller, variants interleaved (plaintext mtls plaintext mtls ...) for ROUNDS
#    rounds after a 2 s warm-up of each; medians. CPU per request of the caller and of
#    the callee separately (utime+stime from /proc/PID/stat over the run / requests
#    wrk completed) and their sum; the mTLS hop's added cost = mtls - plaintext.
#    Pooled steady state: the callee's `sluice_protocol_detections_total{direction=
#    "inbound",result="mtls"}` (one per mTLS connection accepted, i.e. per handshake)
#    before and after each run, and the established caller -> callee connections
#    (`ss`) at the end of it.
# 2. Handshakes: `openssl s_time -connect 127.0.0.1:18201 -cert caller.crt -key
#    caller.key -CAfile root.crt -tls1_3 -time $HS_TIME` against the callee's inbound
#    listener (on core 0), one connection at a time: `-new` (full handshakes, nothing
#    sent), `-new -www /` (full handshake + one HTTP/1.0 request) and `-reuse -www /`
#    (resumed sessions + one request: with TLS 1.3 the session ticket comes after the
#    handshake, so s_time only gets one when it reads, i.e. with -www), and as the
#    plaintext reference `ab -c1` (a new connection + the same `GET / HTTP/1.0` per
#    request, no TLS). Connections/s (over the client's wall-clock time), how many
#    s_time resumed (its `r` marks), and the callee's CPU per connection.
#    Interleaved for ROUNDS rounds; medians.
#
# 3. Syscalls per request (not timed): once per variant, a ${SYSCALL_SECS} s wrk run with
#    `strace -f -c` attached to the caller and to the callee; calls counted / requests.
#
# It installs what it needs (Debian: nginx-light wrk openssl apache2-utils), builds sluice-proxy in
# release, waits until no cargo/rustc build runs on the machine (up to IDLE_WAIT
# seconds), measures, prints the tables and appends them to bench/RESULTS.md. No
# pass/fail. Takes about 2 minutes of measuring (ROUNDS=3) plus the build.
#
# Knobs (environment): ROUNDS=3 DURATION=10 CONNS=64 HS_TIME=5 SYSCALL_SECS=3 IDLE_WAIT=900 FOREIGN_MAX=10 (% of a core other
# processes may use for the machine to count as idle and a run as undisturbed)
# APPEND=1 (0: print only) KEEP=0 (1: keep the temp dir with configs and logs).
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
HS_TIME=${HS_TIME:-5}
SYSCALL_SECS=${SYSCALL_SECS:-3}
IDLE_WAIT=${IDLE_WAIT:-900}
APPEND=${APPEND:-1}
KEEP=${KEEP:-0}
HOSTHDR="Host: bench"
URLPATH=/api/v1/items
TRUST_DOMAIN=cluster.local
export PATH="$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH"
COMMAND="bench/mtls.sh"
for v in ROUNDS DURATION CONNS HS_TIME SYSCALL_SECS; do
    case "$v:${!v}" in
    ROUNDS:3 | DURATION:10 | CONNS:64 | HS_TIME:5 | SYSCALL_SECS:3) ;;
    *) COMMAND="$v=${!v} $COMMAND" ;;
    esac
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
[ "$(nproc)" -ge 2 ] || die "needs at least 2 cores (one for the proxies, one for backend + load)"

# --- tools ------------------------------------------------------------------------
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v openssl >/dev/null || missing+=(openssl)
command -v ab >/dev/null || missing+=(apache2-utils)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
command -v ss >/dev/null || missing+=(iproute2)
command -v strace >/dev/null || missing+=(strace)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing from Debian: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

FOREIGN_MAX=${FOREIGN_MAX:-10}

log "building sluice-proxy (release)"
nice -n 10 cargo build --release --locked -p sluice-proxy --bin sluice-proxy
BUILD_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
BUILD_DIRTY=$(git status --porcelain -- proxy policy Cargo.toml Cargo.lock 2>/dev/null | wc -l)

# shellcheck source=bench/lib.sh
. bench/lib.sh
TMP=$(mktemp -d /tmp/sluice-bench-mtls.XXXXXX)
PIDS=()
cleanup() {
    set +e
    stop_pids "${PIDS[@]}"
    if [ "$KEEP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A private copy: another build in the target directory must not swap it under us.
SLUICE="$TMP/sluice-proxy"
cp target/release/sluice-proxy "$SLUICE"
for port in 18280 18201 18202 18203 18204 18211 18213 18214; do
    if ss -ltnH "sport = :$port" | grep -q .; then die "port $port is in use"; fi
done

# --- certificates -------------------------------------------------------------------
PKI="$TMP/pki"
mkdir -p "$PKI"
cat >"$PKI/root.cnf" <<'EOF'
[req]
distinguished_name = dn
x509_extensions = v3_root
prompt = no
[dn]
CN = sluice bench root
[v3_root]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/root.key" 2>/dev/null
openssl req -x509 -new -config "$PKI/root.cnf" -key "$PKI/root.key" -sha256 -days 2 \
    -out "$PKI/root.crt" 2>/dev/null
leaf() { # name: a workload leaf for shop/NAME
    local name=$1
    cat >"$PKI/$name.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = URI:spiffe://$TRUST_DOMAIN/ns/shop/sa/$name
authorityKeyIdentifier = keyid
EOF
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$name.key" 2>/dev/null
    openssl req -new -key "$PKI/$name.key" -subj "/CN=$name" -out "$PKI/$name.csr" 2>/dev/null
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/root.crt" -CAkey "$PKI/root.key" \
        -set_serial "0x$(openssl rand -hex 8)" -days 2 -sha256 -extfile "$PKI/$name.ext" \
        -out "$PKI/$name.crt" 2>/dev/null
    openssl verify -CAfile "$PKI/root.crt" "$PKI/$name.crt" >/dev/null || die "leaf $name does not verify"
}
leaf caller
leaf callee
CALLEE_ID="spiffe://$TRUST_DOMAIN/ns/shop/sa/callee"

# --- backend and proxies ------------------------------------------------------------
mkdir -p "$TMP/backend"
nginx_conf "$TMP/backend" >"$TMP/backend/nginx.conf" <<'EOF'
  server {
    listen 127.0.0.1:18280;
    location / { default_type text/plain; return 200 "hello\n"; }
  }
EOF
taskset -c 0 nginx -e "$TMP/backend/error.log" -p "$TMP/backend" -c "$TMP/backend/nginx.conf" \
    >"$TMP/backend/stdout.log" 2>&1 &
PIDS+=($!)
BACKEND_PID=$!

declare -A PORT=([plaintext]=18203 [mtls]=18204)
declare -A ADMIN=([callee]=18211 [caller-plain]=18213 [caller-mtls]=18214)
declare -A CALLER=([plaintext]=caller-plain [mtls]=caller-mtls)
declare -A PROC
start_sluice() { # name identity policy-yaml [flags...]
    local name=$1 who=$2 policy=$3
    shift 3
    # The policy in a directory of its own (the proxy watches the policy's directory).
    mkdir -p "$TMP/$name/policy"
    printf '%s\n' "$policy" >"$TMP/$name/policy/policy.yaml"
    taskset -c 1 "$SLUICE" --threads 1 --admin "127.0.0.1:${ADMIN[$name]}" \
        --policy "$TMP/$name/policy/policy.yaml" --drain-timeout 1s --no-access-log \
        --identity-cert "$PKI/$who.crt" --identity-key "$PKI/$who.key" --trust-roots "$PKI/root.crt" \
        "$@" >"$TMP/$name/stdout.log" 2>"$TMP/$name/stderr.log" &
    PIDS+=($!)
    PROC[$name]=$!
}
start_sluice callee callee "apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: callee}
spec:
  routes:
    - name: all" --listen 127.0.0.1:18202 --inbound 127.0.0.1:18201 --app 127.0.0.1:18280 --inbound-policy callee
caller_policy() { # tls-line
    printf '%s\n' "apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: to-callee}
spec:
  hosts: [bench]
  backends:
    - address: 127.0.0.1:18201$1
  routes:
    - name: all"
}
start_sluice caller-plain caller "$(caller_policy "")" --listen "127.0.0.1:${PORT[plaintext]}"
start_sluice caller-mtls caller "$(caller_policy "
      tls: {identity: \"$CALLEE_ID\"}")" --listen "127.0.0.1:${PORT[mtls]}"

for name in callee caller-plain caller-mtls; do
    for ((i = 0; i < 100; i++)); do
        curl -fsS --max-time 1 "http://127.0.0.1:${ADMIN[$name]}/ready" >/dev/null 2>&1 && break
        kill -0 "${PROC[$name]}" 2>/dev/null || die "$name exited: $(tail -5 "$TMP/$name/stderr.log")"
        sleep 0.1
    done
done
[ -n "$(pgrep -P "$BACKEND_PID")" ] && PIDS+=($(pgrep -P "$BACKEND_PID"))

mtls_accepted() { # the callee's mTLS connections so far
    curl -fsS --max-time 2 "http://127.0.0.1:${ADMIN[callee]}/metrics" |
        awk '/^sluice_protocol_detections_total\{/ && /direction="inbound"/ && /result="mtls"/ {s += $NF} END {print s + 0}'
}
hop_conns() { # PID: its established connections to the callee's inbound listener
    ss -tnpH state established "dport = :18201" | grep -c "pid=$1," || true
}
refused() { grep -c 'mTLS handshake refused' "$TMP/callee/stderr.log" || true; }

# Each variant serves the body, and only the mtls one makes mTLS connections.
for v in plaintext mtls; do
    n0=$(mtls_accepted)
    body=""
    for ((i = 0; i < 50; i++)); do
        body=$(curl -sS --max-time 1 -H "$HOSTHDR" "http://127.0.0.1:${PORT[$v]}$URLPATH" 2>/dev/null || true)
        [ "$body" = hello ] && break
        sleep 0.1
    done
    [ "$body" = hello ] || die "$v does not answer 'hello' on port ${PORT[$v]} (got: $body; caller: $(tail -3 "$TMP/${CALLER[$v]}/stderr.log"); callee: $(tail -3 "$TMP/callee/stderr.log"))"
    n1=$(mtls_accepted)
    case $v in
    plaintext) [ "$n1" = "$n0" ] || die "the plaintext variant made $((n1 - n0)) mTLS connection(s)" ;;
    mtls) [ "$n1" -gt "$n0" ] || die "the mtls variant made no mTLS connection (the callee counts none)" ;;
    esac
done
# s_time against the inbound listener: the client certificate is accepted and TLS 1.3
# negotiated.
probe=$(openssl s_client -connect 127.0.0.1:18201 -tls1_3 -cert "$PKI/caller.crt" -key "$PKI/caller.key" \
    -CAfile "$PKI/root.crt" -verify_return_error -brief </dev/null 2>&1 || true)
grep -q 'Protocol version: TLSv1.3' <<<"$probe" || die "openssl s_client cannot do mTLS with the callee: $probe"
CIPHER=$(awk -F': ' '/^Ciphersuite:/ {print $2}' <<<"$probe")

# --- helpers --------------------------------------------------------------------------
# CPU used by processes outside the benchmark (a test binary that cargo started, another
# benchmark...: busy() sees only cargo and rustc): the machine's user+nice+system ticks
# minus those of our processes (proxies, nginx) and of this script's waited-for children
# (wrk, s_time, ab, curl, strace), as % of one core over the interval.
OURS=("${PROC[callee]}" "${PROC[caller-plain]}" "${PROC[caller-mtls]}" "$BACKEND_PID" $(pgrep -P "$BACKEND_PID"))
foreign_ticks() {
    local machine children
    machine=$(awk '/^cpu / {print $2 + $3 + $4}' /proc/stat)
    children=$(sed 's/^.*) //' "/proc/$$/stat" | awk '{print $14 + $15}')
    echo $((machine - $(cpu_ticks "${OURS[@]}") - children))
}
foreign_begin() {
    F_T0=$(date +%s%N)
    F_0=$(foreign_ticks)
}
foreign_end() { # -> FOREIGN (% of a core), and marks the run disturbed past FOREIGN_MAX
    local f1 t1
    f1=$(foreign_ticks)
    t1=$(date +%s%N)
    FOREIGN=$(awk -v d=$((f1 - F_0)) -v hz="$(getconf CLK_TCK)" -v ns=$((t1 - F_T0)) \
        'BEGIN {p = d / hz / (ns / 1e9) * 100; if (p < 0) p = 0; printf "%.0f", p}')
    if [ "$FOREIGN" -gt "$FOREIGN_MAX" ] && [ -z "$mark" ]; then
        mark="*"
        DISTURBED=$((DISTURBED + 1))
    fi
}
CLK=$(getconf CLK_TCK)
per() { # ticks count -> µs each
    awk -v d="$1" -v n="$2" -v hz="$CLK" 'BEGIN {if (n > 0) printf "%.2f", d / hz * 1e6 / n; else print "nan"}'
}
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
RAW="$TMP/raw.txt"
: >"$RAW"
DISTURBED=0
RUNS=0

wrk_run() { # variant seconds -> sets W_RPS W_P50 W_P99 W_REQS W_NON2XX W_SOCKERR
    local v=$1 secs=$2 out
    out=$(taskset -c 0 timeout $((secs + 30)) wrk -t1 -c"$CONNS" -d"${secs}s" --latency -H "$HOSTHDR" \
        "http://127.0.0.1:${PORT[$v]}$URLPATH")
    W_RPS=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    W_P50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    W_P99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    W_REQS=$(awk '/requests in/ {print $1}' <<<"$out")
    W_NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
    W_NON2XX=${W_NON2XX:-0}
    W_SOCKERR=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' <<<"$out")
    W_SOCKERR=${W_SOCKERR:-0}
}

keepalive() { # variant round
    local v=$1 round=$2 caller=${CALLER[$1]} mark="" a0 a1 e0 e1 h0 h1 conns
    busy && mark="*" && DISTURBED=$((DISTURBED + 1))
    RUNS=$((RUNS + 1))
    foreign_begin
    h0=$(mtls_accepted)
    a0=$(cpu_ticks "${PROC[$caller]}")
    e0=$(cpu_ticks "${PROC[callee]}")
    wrk_run "$v" "$DURATION"
    a1=$(cpu_ticks "${PROC[$caller]}")
    e1=$(cpu_ticks "${PROC[callee]}")
    h1=$(mtls_accepted)
    conns=$(hop_conns "${PROC[$caller]}")
    foreign_end
    local cpu_a cpu_e cpu_s
    cpu_a=$(per $((a1 - a0)) "$W_REQS")
    cpu_e=$(per $((e1 - e0)) "$W_REQS")
    cpu_s=$(per $((a1 - a0 + e1 - e0)) "$W_REQS")
    add "rps|$v" "$W_RPS"
    add "p50|$v" "$W_P50"
    add "p99|$v" "$W_P99"
    add "cpua|$v" "$cpu_a"
    add "cpue|$v" "$cpu_e"
    add "cpus|$v" "$cpu_s"
    add "err|$v" $((W_NON2XX + W_SOCKERR))
    add "hs|$v" $((h1 - h0))
    add "conns|$v" "$conns"
    printf 'keepalive round=%s variant=%s rps=%s p50=%sms p99=%sms requests=%s non2xx=%s sockerr=%s cpu_us_per_req caller=%s callee=%s sum=%s mtls_handshakes=%s hop_conns_established=%s other_cpu=%s%%%s\n' \
        "$round" "$v" "$W_RPS" "$W_P50" "$W_P99" "$W_REQS" "$W_NON2XX" "$W_SOCKERR" "$cpu_a" "$cpu_e" "$cpu_s" \
        $((h1 - h0)) "$conns" "$FOREIGN" "${mark:+ (disturbed)}" | tee -a "$RAW" >&2
}

syscalls() { # variant: strace -c on the caller and the callee during a short wrk run
    local v=$1 caller=${CALLER[$1]} sa se
    strace -f -c -o "$TMP/strace-$v-caller.txt" -p "${PROC[$caller]}" 2>/dev/null &
    sa=$!
    strace -f -c -o "$TMP/strace-$v-callee.txt" -p "${PROC[callee]}" 2>/dev/null &
    se=$!
    PIDS+=("$sa" "$se")
    sleep 1 # attached
    wrk_run "$v" "$SYSCALL_SECS"
    kill -INT "$sa" "$se"
    wait "$sa" "$se" || true
    local side f calls errs top
    for side in caller callee; do
        f="$TMP/strace-$v-$side.txt"
        # The total line: % seconds usecs/call calls [errors] total.
        calls=$(awk '$NF == "total" {print $4}' "$f")
        errs=$(awk '$NF == "total" {print (NF == 6 ? $5 : 0)}' "$f")
        top=$(awk '$1 ~ /^[0-9.]+$/ && $NF != "total" {print $NF "=" $4}' "$f" | sort -t= -k2 -gr | head -5 |
            awk -F= -v n="$W_REQS" '{printf "%s%s:%.2f", (NR > 1 ? " " : ""), $1, $2 / n}')
        add "sys|$v|$side" "$(awk -v c="${calls:-0}" -v n="$W_REQS" 'BEGIN {printf "%.2f", c / n}')"
        add "syserr|$v|$side" "$(awk -v c="${errs:-0}" -v n="$W_REQS" 'BEGIN {printf "%.2f", c / n}')"
        printf 'syscalls variant=%s process=%s requests=%s calls=%s errors=%s per_request: %s\n' \
            "$v" "$side" "$W_REQS" "${calls:-0}" "${errs:-0}" "$top" | tee -a "$RAW" >&2
    done
}

declare -A HS_ARGS=([plain]="ab" [new]="-new" [new-www]="-new -www /" [reuse-www]="-reuse -www /")
HS_MODES=(plain new new-www reuse-www)
handshakes() { # mode round
    local mode=$1 round=$2 mark="" e0 e1 h0 h1 r0 r1 t0 t1 out n secs rate resumed cpu
    busy && mark="*" && DISTURBED=$((DISTURBED + 1))
    RUNS=$((RUNS + 1))
    foreign_begin
    h0=$(mtls_accepted)
    r0=$(refused)
    e0=$(cpu_ticks "${PROC[callee]}")
    t0=$(date +%s%N)
    if [ "$mode" = plain ]; then
        # The plaintext reference: a new connection per request, the same
        # `GET / HTTP/1.0` as s_time -www, one at a time.
        out=$(taskset -c 0 timeout $((HS_TIME + 60)) ab -c1 -t "$HS_TIME" -n 10000000 \
            "http://127.0.0.1:18201/" 2>&1) || die "ab failed: $(tail -5 <<<"$out")"
    else
        # shellcheck disable=SC2086 # HS_ARGS holds several words
        out=$(taskset -c 0 timeout $((HS_TIME + 60)) openssl s_time -connect 127.0.0.1:18201 -tls1_3 \
            -cert "$PKI/caller.crt" -key "$PKI/caller.key" -CAfile "$PKI/root.crt" ${HS_ARGS[$mode]} \
            -time "$HS_TIME" 2>&1) || die "openssl s_time ${HS_ARGS[$mode]} failed: $(tail -5 <<<"$out")"
    fi
    t1=$(date +%s%N)
    e1=$(cpu_ticks "${PROC[callee]}")
    foreign_end
    sleep 0.2 # the callee logs a refused handshake after the client has gone
    h1=$(mtls_accepted)
    r1=$(refused)
    # "N connections in S real seconds, ..." (S: whole seconds, so the rate is taken
    # over the wall-clock time of the s_time process instead).
    n=$(awk '/connections in [0-9]+ real seconds/ {n = $1} /^Complete requests:/ {n = $3} END {print n + 0}' <<<"$out")
    if [ "$mode" = plain ]; then
        local failed
        failed=$(awk '/^Failed requests:/ {f += $3} /^Non-2xx responses:/ {f += $3} END {print f + 0}' <<<"$out")
        [ "$failed" = 0 ] || die "ab: $failed failed or non-2xx requests against the callee's inbound listener"
    fi
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
    rate=$(awk -v n="$n" -v s="$secs" 'BEGIN {if (s > 0) printf "%.0f", n / s; else print "nan"}')
    # s_time prints one character per timed connection: `r` resumed, `*` not.
    resumed=$({ grep -E '^[r*]+$' <<<"$out" || true; } | tr -cd 'r' | wc -c)
    [ "$mode" = reuse-www ] || resumed=0
    # -reuse makes one full connection before the timed ones: the callee's CPU and
    # handshakes (detections) cover it too, so count it.
    local counted=$n
    [ "$mode" = reuse-www ] && counted=$((n + 1))
    cpu=$(per $((e1 - e0)) "$counted")
    add "hsrate|$mode" "$rate"
    add "hscpu|$mode" "$cpu"
    add "hsres|$mode" "$resumed"
    add "hsn|$mode" "$n"
    add "hsref|$mode" $((r1 - r0))
    add "hsacc|$mode" $((h1 - h0))
    printf 'handshake round=%s mode="%s" connections=%s seconds=%s per_s=%s resumed=%s callee_mtls_detections=%s callee_refused=%s callee_cpu_us_per_conn=%s other_cpu=%s%%%s\n' \
        "$round" "${HS_ARGS[$mode]}" "$n" "$secs" "$rate" "$resumed" $((h1 - h0)) $((r1 - r0)) "$cpu" \
        "$FOREIGN" "${mark:+ (disturbed)}" | tee -a "$RAW" >&2
}

# --- wait for a quiet machine -------------------------------------------------------
waited=0
while busy && [ $waited -lt "$IDLE_WAIT" ]; do
    log "a cargo/rustc build is running on this machine; waiting (${waited}s of at most ${IDLE_WAIT}s)"
    sleep 15
    waited=$((waited + 15))
done
# ... and until other processes use less than FOREIGN_MAX % of a core (over 3 s).
mark=""
while :; do
    foreign_begin
    sleep 3
    foreign_end
    [ "$FOREIGN" -le "$FOREIGN_MAX" ] || [ $waited -ge "$IDLE_WAIT" ] && break
    log "other processes use ${FOREIGN}% of a core; waiting (${waited}s of at most ${IDLE_WAIT}s)"
    waited=$((waited + 3))
done
IDLE_AT_START=$FOREIGN
mark=""
DISTURBED=0
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_AT_START=no
busy && BUSY_AT_START=yes && log "still busy after ${IDLE_WAIT}s; measuring anyway (noted in the results)"
[ "$IDLE_AT_START" -le "$FOREIGN_MAX" ] || BUSY_AT_START=yes

# --- measure ------------------------------------------------------------------------
VARIANTS=(plaintext mtls)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
T0=$SECONDS
declare -A WARM_HS
log "warm-up: 2 s per variant"
for v in "${VARIANTS[@]}"; do
    h0=$(mtls_accepted)
    wrk_run "$v" 2
    WARM_HS[$v]=$(($(mtls_accepted) - h0))
done
WARM_CONNS="$(hop_conns "${PROC[caller-plain]}") (plaintext) and $(hop_conns "${PROC[caller-mtls]}") (mtls)"
log "keep-alive: ${ROUNDS} rounds x ${#VARIANTS[@]} variants x ${DURATION}s"
for ((r = 1; r <= ROUNDS; r++)); do
    for v in "${VARIANTS[@]}"; do keepalive "$v" "$r"; done
done
log "syscalls per request: strace -c during a ${SYSCALL_SECS}s run per variant"
for v in "${VARIANTS[@]}"; do syscalls "$v"; done
log "handshakes: ${ROUNDS} rounds x ${#HS_MODES[@]} s_time modes x ${HS_TIME}s"
for ((r = 1; r <= ROUNDS; r++)); do
    for mode in "${HS_MODES[@]}"; do handshakes "$mode" "$r"; done
done
for name in callee caller-plain caller-mtls; do
    kill -0 "${PROC[$name]}" 2>/dev/null || die "$name died during the run: $(tail -5 "$TMP/$name/stderr.log")"
done
ELAPSED=$((SECONDS - T0))

# --- report -------------------------------------------------------------------------
m() { median <<<"${R[$1]:-}"; }
sum() { tr ' ' '\n' | awk NF | awk '{s += $1} END {print s + 0}'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan" || v == "") print "-"; else printf f, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
diff_us() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || a == "" || b == "") print "-"; else printf "%+.1f µs", a - b }'; }
declare -A M
for v in "${VARIANTS[@]}"; do
    for k in rps p50 p99 cpua cpue cpus err conns; do M["$k|$v"]=$(m "$k|$v"); done
    M["hs|$v"]=$(sum <<<"${R[hs|$v]:-}")
done
for mode in "${HS_MODES[@]}"; do
    for k in hsrate hscpu hsn; do M["$k|$mode"]=$(m "$k|$mode"); done
    for k in hsres hsref hsacc hsn; do M["tot$k|$mode"]=$(sum <<<"${R[$k|$mode]:-}"); done
done
label() {
    case $1 in
    plaintext) echo "plaintext hop" ;;
    plain) echo "plaintext reference, \`ab -c1\`: new TCP connection + 1 request" ;;
    mtls) echo "mTLS hop" ;;
    new) echo "\`-new\`: full handshake, nothing sent" ;;
    new-www) echo "\`-new -www /\`: full handshake + 1 request" ;;
    reuse-www) echo "\`-reuse -www /\`: resumed session + 1 request" ;;
    esac
}
REQS_PER_RUN=$(awk -v r="${M[rps|mtls]}" -v d="$DURATION" 'BEGIN {printf "%.0f", r * d}')
REPORT="$TMP/report.md"
{
    echo "## mTLS hop between two proxies vs plaintext, and the handshake rate ($START)"
    echo
    echo "Command: \`$COMMAND\` (bench/mtls.sh; ${ELAPSED} s of measuring)."
    echo
    echo "Machine: $(nproc) cores ($(lscpu | awk -F: '/^Model name/ {gsub(/^ +/, "", $2); print $2; exit}')),"
    echo "Linux $(uname -r). Core 1 runs both proxies of the hop (one thread each); core 0 runs the"
    echo "backend (nginx, one worker, \`return 200 \"hello\\n\"\`) and the load generator."
    echo "Path: wrk -> caller (\`--listen\`, host \`bench\`) -> callee's inbound listener (policy"
    echo "\`callee\`, one route) -> nginx; one caller per variant, identical but for the backend's"
    echo "\`tls: {identity: \"$CALLEE_ID\"}\`, both with identities, the same callee (permissive)."
    echo "Certificates: openssl, P-256 root and leaves (ECDSA P-256 SHA-256 signatures); TLS 1.3"
    echo "(rustls with ring), ${CIPHER:-?} (what \`openssl s_client\` negotiates with the callee)."
    echo "Tools: $(nginx -v 2>&1 | sed 's/^nginx version: //'), wrk $(wrk -v 2>&1 | awk 'NR == 1 {print $2}'), $(openssl version | cut -d' ' -f1-2)."
    echo "sluice-proxy from $BUILD_REV$([ "$BUILD_DIRTY" -gt 0 ] && echo " plus $BUILD_DIRTY uncommitted file(s)"), \`--threads 1 --no-access-log\`."
    echo "Medians of $ROUNDS interleaved rounds. Load average at start: $LOADAVG; other processes used"
    echo "$IDLE_AT_START% of a core just before (busy at start: $BUSY_AT_START). A run counts as disturbed when cargo/rustc"
    echo "ran or other processes used more than $FOREIGN_MAX% of a core during it (\`other_cpu\` in the raw lines:"
    echo "the machine's user+system time minus the benchmark's own processes')."
    if [ "$BUSY_AT_START" = yes ] || [ "$DISTURBED" -gt 0 ]; then
        echo
        echo "**Caution:** $DISTURBED of $RUNS runs were disturbed by other work on the machine (marked in the raw lines)."
    fi
    echo
    echo "### Keep-alive: \`wrk -t1 -c$CONNS -d${DURATION}s --latency -H '$HOSTHDR'\` against the caller"
    echo
    echo "| hop | req/s | p50 | p99 | CPU/request caller | callee | caller + callee | errors | handshakes in $ROUNDS runs | hop connections |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for v in "${VARIANTS[@]}"; do
        hs=${M[hs|$v]}
        [ "$v" = plaintext ] && hs="- ($hs mTLS)"
        printf '| %s | %s | %s ms | %s ms | %s | %s | %s | %s | %s | %s |\n' "$(label "$v")" \
            "$(fmt "${M[rps|$v]}" %.0f)" "$(fmt "${M[p50|$v]}" %.2f)" "$(fmt "${M[p99|$v]}" %.2f)" \
            "$(fmt "${M[cpua|$v]}" '%.1f µs')" "$(fmt "${M[cpue|$v]}" '%.1f µs')" "$(fmt "${M[cpus|$v]}" '%.1f µs')" \
            "$(fmt "${M[err|$v]}" %.0f)" "$hs" "$(fmt "${M[conns|$v]}" %.0f)"
    done
    printf '| **mTLS - plaintext** | %s | %+.2f ms | %+.2f ms | %s (%s) | %s (%s) | **%s (%s)** | | | |\n' \
        "$(ratio "${M[rps|mtls]}" "${M[rps|plaintext]}")" \
        "$(awk -v a="${M[p50|mtls]}" -v b="${M[p50|plaintext]}" 'BEGIN {print a - b}')" \
        "$(awk -v a="${M[p99|mtls]}" -v b="${M[p99|plaintext]}" 'BEGIN {print a - b}')" \
        "$(diff_us "${M[cpua|mtls]}" "${M[cpua|plaintext]}")" "$(ratio "${M[cpua|mtls]}" "${M[cpua|plaintext]}")" \
        "$(diff_us "${M[cpue|mtls]}" "${M[cpue|plaintext]}")" "$(ratio "${M[cpue|mtls]}" "${M[cpue|plaintext]}")" \
        "$(diff_us "${M[cpus|mtls]}" "${M[cpus|plaintext]}")" "$(ratio "${M[cpus|mtls]}" "${M[cpus|plaintext]}")"
    echo
    echo "CPU/request: utime+stime of the process (\`/proc/PID/stat\`) over the wrk run, divided by the"
    echo "requests wrk completed; both proxies share core 1, so req/s is what that core does for"
    echo "the two of them. Handshakes: the callee's \`sluice_protocol_detections_total{direction=\"inbound\",result=\"mtls\"}\`"
    echo "(one per mTLS connection it accepts) summed over the $ROUNDS measured runs of each variant"
    echo "(about $REQS_PER_RUN requests per mTLS run); the 2 s warm-ups before them, from fresh pools, made"
    echo "${WARM_HS[plaintext]} (plaintext) and ${WARM_HS[mtls]} (mtls). Hop connections: caller -> callee connections"
    echo "established (\`ss -p\`) by the variant's caller at the end of each run (median; after the warm-ups: $WARM_CONNS)."
    echo
    echo "Syscalls per request (\`strace -f -c\` attached to each proxy during one ${SYSCALL_SECS} s wrk run per"
    echo "variant, after the timed rounds; strace slows the proxies, so these runs are not timed):"
    echo
    echo "| hop | caller: calls/request | of which returned an error | callee: calls/request | of which returned an error |"
    echo "|---|---|---|---|---|"
    for v in "${VARIANTS[@]}"; do
        printf '| %s | %s | %s | %s | %s |\n' "$(label "$v")" "${R[sys|$v|caller]# }" "${R[syserr|$v|caller]# }" \
            "${R[sys|$v|callee]# }" "${R[syserr|$v|callee]# }"
    done
    echo
    echo "### Handshakes: \`openssl s_time -connect <callee inbound> -tls1_3 -cert caller.crt -key caller.key -CAfile root.crt -time $HS_TIME\`"
    echo
    echo "| client | connections/s | callee CPU/connection | vs plaintext reference | resumed | callee mTLS connections (all runs) | logged \"mTLS handshake refused\" |"
    echo "|---|---|---|---|---|---|---|"
    for mode in "${HS_MODES[@]}"; do
        res="-"
        [ "$mode" = reuse-www ] && res="${M[tothsres|$mode]} of ${M[tothsn|$mode]}"
        extra="-"
        case $mode in new-www | reuse-www) extra=$(diff_us "${M[hscpu|$mode]}" "${M[hscpu|plain]}") ;; esac
        printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$(label "$mode")" "$(fmt "${M[hsrate|$mode]}" %.0f)" \
            "$(fmt "${M[hscpu|$mode]}" '%.0f µs')" "$extra" "$res" "${M[tothsacc|$mode]}" "${M[tothsref|$mode]}"
    done
    echo
    echo "One connection at a time from s_time (or ab) on core 0 (a latency-bound loop: connections/s"
    echo "is 1 / (connect + handshake [+ request] + close), client and server together), to the callee's"
    echo "inbound listener on core 1. \`-www /\` and ab send \`GET / HTTP/1.0\` (no keep-alive), which the"
    echo "callee answers from nginx; the ab row is the same connection and request without TLS, so"
    echo "\"vs plaintext reference\" is what the full or resumed TLS 1.3 handshake (and the record layer"
    echo "of one request) adds on the callee. Callee CPU/connection: its utime+stime over the run /"
    echo "the connections made (with \`-reuse\`, plus the one full handshake s_time makes first)."
    echo "Connections/s: connections / wall-clock time of the client process."
    echo "With \`-new\` alone, s_time closes the socket as soon as its Finished is sent: the callee"
    echo "still verifies the client's certificate and Finished, then its session tickets meet a reset"
    echo "connection, which it logs as \"mTLS handshake refused\" (\`Connection reset by peer\`); the"
    echo "handshake's CPU is spent all the same."
    echo
    echo "<details><summary>Raw runs</summary>"
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
