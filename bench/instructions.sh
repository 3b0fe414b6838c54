#!/usr/bin/env bash
# bench/instructions.sh: instructions per proxied request, counted by valgrind's
# callgrind. A count, not a time: the same binary and the same requests give the same
# figure whatever else the machine runs, so a change of 1-2% is visible here where
# bench/proxy.sh's req/s spread (up to 20% between rounds on a shared 2-core VM)
# hides it. It counts user space only: the kernel's share of a request (most of it on
# loopback: bench/RESULTS.md) is bench/proxy.sh's to measure.
#
# The release sluice-proxy (bench/policy.yaml, one thread) runs under callgrind once
# per variant; REQUESTS keep-alive GETs come from curl over PAR connections at once
# (16 by default: the proxy under callgrind is the bottleneck, busy as under load and
# rarely parking, as in bench/proxy.sh; PAR=1 measures one request at a time), after
# WARM warm-up requests excluded by zeroing the counters. Instructions per request
# = the whole process's count (every thread: the access-log flush and the span
# exporter included) over the requests, after a 3 s pause for the last flush.
#
#   VARIANTS  which runs, of: log (JSON access log on, the default setup), nolog
#             (--no-access-log), traced (spans to examples/otlp-sink, 1% sampled).
#             Default: "log nolog".
#   BINS      "NAME=PATH ..." binaries to compare (say, a build of the previous
#             revision); default: this tree's release build, named by its revision.
#   TOP       also print each run's TOP functions by their own instructions per request.
#   TITLE     the heading of the section appended to bench/RESULTS.md (APPEND=0: don't).
#   KEEP=1    keep the temp dir (its NAME.VARIANT.cg.N are the callgrind dumps, for
#             `callgrind_annotate --tree=caller`).
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-4000}
WARM=${WARM:-400}
PAR=${PAR:-16}
APPEND=${APPEND:-1}
TOP=${TOP:-0}
VARIANTS=${VARIANTS:-log nolog}
TITLE=${TITLE:-Instructions per request, callgrind}
export PATH="$HOME/.cargo/bin:/usr/sbin:/sbin:$PATH"
for tool in valgrind curl callgrind_control callgrind_annotate; do
    command -v "$tool" >/dev/null || { echo "needs $tool (Debian: valgrind curl)" >&2; exit 1; }
done
. bench/lib.sh
TMP=$(mktemp -d /tmp/sluice-bench-instr.XXXXXX)
TMP_BIN=$TMP/sluice-proxy
PIDS=()
cleanup() {
    set +e
    stop_pids "${PIDS[@]}"
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
REV=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/RESULTS.md' || echo "+changes")
# The proxy binary built on its own: built together with the demo crate (or examples),
# cargo unifies their dependencies' features into a slightly different binary.
cargo build --release --locked -p sluice-proxy --bin sluice-proxy
cp target/release/sluice-proxy "$TMP_BIN"
cargo build --release --locked -p sluice-proxy --example otlp-sink -p sluice-demo --bin sluice-demo-upstream
BINS=${BINS:-$REV=$TMP_BIN}

target/release/sluice-demo-upstream --listen 127.0.0.1:18480 --name b >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
target/release/examples/otlp-sink --listen 127.0.0.1:18417 >/dev/null 2>"$TMP/sink.log" &
PIDS+=($!)
mkdir -p "$TMP/policy"
sed 's/127\.0\.0\.1:18080/127.0.0.1:18480/g' bench/policy.yaml >"$TMP/policy/policy.yaml"

urls() { # N: N copies of the request URL
    local i
    for ((i = 0; i < $1; i++)); do
        printf 'url = "http://127.0.0.1:18401/api/v1/items"\noutput = "/dev/null"\n'
    done
}
urls "$WARM" >"$TMP/warm.cfg"
urls "$REQUESTS" >"$TMP/run.cfg"
get() { # config: its requests over PAR connections
    if [ "$PAR" -gt 1 ]; then
        curl -fsS --no-progress-meter -Z --parallel-max "$PAR" -H 'Host: bench' -K "$1"
    else
        curl -fsS -H 'Host: bench' -K "$1"
    fi
}

flags() { # variant -> the proxy's flags
    case $1 in
    log) ;;
    nolog) echo --no-access-log ;;
    traced) echo --otlp-endpoint http://127.0.0.1:18417 --trace-sample-ratio 0.01 ;;
    *) echo "unknown variant $1 (log, nolog, traced)" >&2; exit 1 ;;
    esac
}

declare -A IPR
ROWS=()
measure() { # name binary variant
    local name=$1 bin=$2 v=$3 pid total out=$TMP/$1.$3
    # shellcheck disable=SC2046 # flags are words
    valgrind --tool=callgrind --callgrind-out-file="$out.cg" --collect-atstart=yes \
        "$bin" --threads 1 --listen 127.0.0.1:18401 --admin 127.0.0.1:18402 \
        --policy "$TMP/policy/policy.yaml" --drain-timeout 1s $(flags "$v") \
        >>"$out.access.log" 2>"$out.stderr" &
    pid=$!
    wait_for 120 curl -fs -o /dev/null -H 'Host: bench' http://127.0.0.1:18401/api/v1/items
    get "$TMP/warm.cfg"
    sleep 3
    callgrind_control --zero "$pid" >/dev/null
    get "$TMP/run.cfg"
    sleep 3
    callgrind_control --dump "$pid" >/dev/null
    kill -TERM "$pid"
    wait "$pid" || true
    # The dump after zeroing (`.cg.N`; `.cg` itself is what came after it, written
    # at exit): the requests' share only, summed over the threads' parts.
    total=$(cat "$out.cg".[0-9]* | awk '/^summary:/ {s += $2} END {print s + 0}')
    IPR[$name.$v]=$(awk -v t="$total" -v n="$REQUESTS" 'BEGIN {printf "%.0f", t / n}')
    echo "$name $v: $total instructions over $REQUESTS requests = ${IPR[$name.$v]} per request" >&2
    if [ "$TOP" -gt 0 ]; then
        echo "$name $v: the $TOP functions with the most instructions of their own, per request:" >&2
        callgrind_annotate --threshold=100 --auto=no "$out.cg".[0-9]* 2>/dev/null |
            awk -v n="$REQUESTS" -v top="$TOP" '
                /^-+$/ {rule++; next}
                /PROGRAM TOTALS/ {total = $1; gsub(",", "", total); next}
                rule >= 4 && $1 ~ /^[0-9,]+$/ && shown < top {
                    c = $1; gsub(",", "", c)
                    if (c + 0 == total + 0) next # a thread root: it holds everything
                    fn = $0; sub(/^ *[0-9,]+ *\( *[0-9.]+%\) */, "", fn); sub(/ \[.*$/, "", fn); sub(/^\?\?\?:/, "", fn)
                    printf "  %7.0f  %s\n", c / n, substr(fn, 1, 110); shown++
                }' >&2
    fi
}

NAMES=()
for spec in $BINS; do
    name=${spec%%=*}
    bin=${spec#*=}
    [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }
    NAMES+=("$name")
    for v in $VARIANTS; do measure "$name" "$bin" "$v"; done
done

first=${NAMES[0]}
report=$(
    echo
    echo "## $TITLE ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Command: \`$([ "$BINS" = "$REV=$TMP_BIN" ] || echo "BINS=\"$BINS\" ")VARIANTS=\"$VARIANTS\" PAR=$PAR bench/instructions.sh\` (REQUESTS=$REQUESTS, tree $REV)."
    echo "The whole proxy process (every thread), $REQUESTS keep-alive GETs over $PAR connection(s) after"
    echo "$WARM warm-up ones, bench/policy.yaml, one thread; user-space instructions only."
    echo
    echo "| binary | variant | instructions/request | vs $first |"
    echo "|---|---|---|---|"
    for name in "${NAMES[@]}"; do
        for v in $VARIANTS; do
            echo "| $name | $v | ${IPR[$name.$v]} | $(awk -v a="${IPR[$name.$v]}" -v b="${IPR[$first.$v]}" 'BEGIN {printf "%.3f", a / b}') |"
        done
    done
    for name in "${NAMES[@]}"; do
        set -- $VARIANTS
        [ $# -gt 1 ] || continue
        echo
        echo "$name: each variant vs $1: $(for v in $VARIANTS; do awk -v v="$v" -v a="${IPR[$name.$v]}" -v b="${IPR[$name.$1]}" 'BEGIN {printf "%s %.3f; ", v, a / b}'; done)"
    done
)
echo "$report"
[ "$APPEND" = 1 ] && echo "$report" >>bench/RESULTS.md
exit 0
