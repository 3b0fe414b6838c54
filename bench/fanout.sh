#!/usr/bin/env bash
# Scenario: one policy change fanned out by `sluice-cp serve` to many subscribed
# proxies. sluice-fanout-bench opens STREAMS subscriptions (simulated proxies, one
# process, each subscribed to every policy) over CONNECTIONS HTTP/2 connections,
# ACKs every update, then replaces a policy file in the served directory and times,
# from that write, until every stream received the policy's new version and until
# the control plane's status shows every one holding it. (bench/mesh.sh measures
# the same with 10,000 policies and proxies subscribed to the hosts they use.) The control plane's VmRSS/VmHWM are read from /proc before subscribers,
# with the subscribers idle, and after the push. Appends the tables to RESULTS
# (default bench/RESULTS.md).
#
# Usage: bench/fanout.sh            (builds release binaries first)
#        STREAMS=1000 CONNECTIONS=10 RESULTS=bench/RESULTS.md bench/fanout.sh
# Traffic stays on 127.0.0.1; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS=${STREAMS:-1000} CONNECTIONS=${CONNECTIONS:-10} RESULTS=${RESULTS:-bench/RESULTS.md}
# shellcheck source=bench/lib.sh
source bench/lib.sh
cargo build --release --locked -p sluice-control-plane >&2
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Waits up to $1 seconds for command $2... to succeed.

# The served policy is the demo's; the change raises one rate limit.
mkdir "$work/policies"
cp policies/demo.yaml "$work/policies/demo.yaml"
sed 's/requestsPerSecond: 50, burst: 20/requestsPerSecond: 60, burst: 20/' \
  policies/demo.yaml >"$work/demo-new.yaml"
if cmp -s policies/demo.yaml "$work/demo-new.yaml"; then
  echo "fanout: policies/demo.yaml changed; update the sed above" >&2
  exit 1
fi

"$bin/sluice-cp" serve --policies "$work/policies" --listen 127.0.0.1:0 2>"$work/cp.log" &
cp=$!
pids+=("$cp")
listening() { grep -o '"listen":"127.0.0.1:[0-9]*"' "$work/cp.log" >/dev/null 2>&1; }
wait_for 10 listening
server="http://$(grep -o '"listen":"127.0.0.1:[0-9]*"' "$work/cp.log" | head -1 | cut -d'"' -f4)"
wait_for 10 "$bin/sluice-cp" status --server "$server" >/dev/null

mib() { awk -v k="$1:" '$1 == k { printf "%.1f MiB", $2 / 1024 }' "/proc/$cp/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$cp/stat"; }
rss_before=$(mib VmRSS) hwm_before=$(mib VmHWM)

"$bin/sluice-fanout-bench" --server "$server" --streams "$STREAMS" --connections "$CONNECTIONS" \
  --policy-file "$work/policies/demo.yaml" --new-content "$work/demo-new.yaml" --policy-id demo \
  --gate "$work/gate" >"$work/bench.out" 2>"$work/bench.err" &
bench=$!
pids+=("$bench")
said() { grep -q "^$1" "$work/bench.out" || { kill -0 "$bench" 2>/dev/null || { cat "$work/bench.err" >&2; exit 1; }; false; }; }
wait_for 90 said ready
sleep 2 # let the idle figure settle
rss_idle=$(mib VmRSS) hwm_idle=$(mib VmHWM)
ticks_before=$(cpu_ticks)
touch "$work/gate"
wait_for 90 said done
rss_after=$(mib VmRSS) hwm_after=$(mib VmHWM)
cpu_ms=$(( ($(cpu_ticks) - ticks_before) * 1000 / $(getconf CLK_TCK) ))
rm "$work/gate"
wait "$bench" || { cat "$work/bench.err" >&2; exit 1; }

field() { grep "^$1 " "$work/bench.out" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }
r() { field result "$1"; }
cat "$work/bench.out" >&2

mem_gib=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
timings=$(
  echo "| measure | time |"
  echo "|---|---|"
  echo "| subscribe: $STREAMS streams opened → all served and ACKed in status | $(field ready subscribe_all_acked_ms) ms |"
  echo "| write → new version accepted (watch debounce: 100 ms quiet; load, validation) | $(r write_to_accepted_ms) ms |"
  echo "| write → all $STREAMS streams received it | $(r write_to_all_received_ms) ms |"
  echo "| write → status shows all $STREAMS ACKed it | $(r write_to_all_acked_ms) ms |"
  echo "| push spread, first → last stream received | $(r first_to_last_received_ms) ms |"
  echo "| per-stream receive latency from write, p50 / p99 / max | $(r receive_p50_ms) / $(r receive_p99_ms) / $(r receive_max_ms) ms |"
  echo "| control-plane CPU (user+sys, 10 ms ticks), write → end of measure | ${cpu_ms} ms |"
)
memory=$(
  echo "| control plane | VmRSS | VmHWM |"
  echo "|---|---|---|"
  echo "| before subscribers | $rss_before | $hwm_before |"
  echo "| $STREAMS subscribers idle | $rss_idle | $hwm_idle |"
  echo "| after the push | $rss_after | $hwm_after |"
)
echo "$timings"
echo "$memory"
{
  echo
  echo "## Policy fan-out to $STREAMS subscribers ($(date -u +%Y-%m-%d), $(nproc) cores, ${mem_gib} GiB)"
  echo
  echo "Command: \`STREAMS=$STREAMS CONNECTIONS=$CONNECTIONS bench/fanout.sh\`. One \`sluice-cp serve\`"
  echo "(release) on loopback serving \`policies/demo.yaml\` (the update: $(r update_policies) policy, $(r update_bytes) bytes of canonical YAML);"
  echo "\`sluice-fanout-bench\` holds $STREAMS subscriptions over $CONNECTIONS HTTP/2 connections in one"
  echo "process on the same machine, ACKing each update on receipt, then replaces the file"
  echo "(write + rename) and times from the rename. Status is polled every 5 ms."
  echo
  echo "$timings"
  echo
  echo "$memory"
} >>"$RESULTS"
