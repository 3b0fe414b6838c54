#!/usr/bin/env bash
# Scenario (issue 18): a control plane for a mesh of POLICIES services. One
# `sluice-cp serve` (release) reads POLICIES policies of 3 routes each (FILES files
# of POLICIES/FILES), and is measured:
#
#   - reading them: start → ready, its RSS and CPU, with POLICIES/2 and POLICIES;
#   - one new sluice-proxy (on-demand discovery, the default): start → /ready, then
#     HOSTS distinct hosts requested once each; its RSS and /metrics series after;
#   - STREAMS simulated proxies (sluice-fanout-bench, each subscribed to HOSTS hosts,
#     one of them the edited policy's) and one policy edited: write → every stream
#     received it, what the update carried (one policy), and the control plane's
#     RSS and CPU with the streams.
#
# Targets (issue 18): proxy ready ≤ 2 s; proxy RSS ≤ 30 MB and /metrics ≤ 500 series
# after 10 hosts; one edit reaches 1,000 proxies ≤ 1 s, sending that policy only.
# Appends the tables to RESULTS (default bench/RESULTS.md).
#
# Usage: bench/mesh.sh      (builds release binaries first)
#        POLICIES=10000 FILES=100 STREAMS=1000 CONNECTIONS=10 HOSTS=10 bench/mesh.sh
# Traffic stays on 127.0.0.1; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
POLICIES=${POLICIES:-10000} FILES=${FILES:-100} STREAMS=${STREAMS:-1000}
CONNECTIONS=${CONNECTIONS:-10} HOSTS=${HOSTS:-10} RESULTS=${RESULTS:-bench/RESULTS.md}
UPSTREAM=127.0.0.1:18190
# shellcheck source=bench/lib.sh
source bench/lib.sh
cargo build --release --locked -p sluice-control-plane -p sluice-proxy -p sluice-demo >&2
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() {
  stop_pids "${pids[@]}"
  rm -rf "$work"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
hwm_mib() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
cpu_ms() { echo $(( $(cpu_ticks "$1") * 1000 / $(getconf CLK_TCK) )); }

# generate DIR N: N policies in FILES files; policy pI owns svc-I.mesh.bench.
generate() {
  python3 - "$1" "$2" "$FILES" "$UPSTREAM" <<'EOF'
import os, sys
out, n, files, upstream = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.makedirs(out, exist_ok=True)
per = max(1, n // files)
for f in range(0, n, per):
    docs = []
    for i in range(f, min(n, f + per)):
        docs.append(f"""apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: p{i}, namespace: mesh}}
spec:
  hosts: [svc-{i}.mesh.bench]
  backends: [{{address: "{upstream}"}}]
  routes:
    - name: api
      match: {{pathPrefix: /api}}
      timeout: 2s
      rateLimit: {{requestsPerSecond: 1000, burst: 100}}
    - name: checkout
      match: {{pathPrefix: /checkout}}
      circuitBreaker: {{errorRatio: 0.5, minRequests: 20, window: 10s, openFor: 30s}}
    - name: default
""")
    with open(os.path.join(out, f"mesh-{f // per:03}.yaml"), "w") as fh:
        fh.write("---\n".join(docs))
EOF
}

"$bin/sluice-demo-upstream" --listen "$UPSTREAM" --name mesh >"$work/upstream.log" 2>&1 &
pids+=($!)

# serve DIR LOG: starts sluice-cp on DIR; sets cp (pid), server, ready_ms.
serve() {
  local start log=$2; start=$(now_ms)
  "$bin/sluice-cp" serve --policies "$1" --listen 127.0.0.1:0 2>"$log" &
  cp=$!
  pids+=("$cp")
  listening() { grep -o '"listen":"127.0.0.1:[0-9]*"' "$log" >/dev/null 2>&1; }
  wait_for 120 listening
  server="http://$(grep -o '"listen":"127.0.0.1:[0-9]*"' "$log" | head -1 | cut -d'"' -f4)"
  wait_for 120 "$bin/sluice-cp" status --server "$server" >/dev/null
  ready_ms=$(( $(now_ms) - start ))
}

# Reading the mesh, at half and at full size (each control plane alone).
half=$((POLICIES / 2))
generate "$work/half" "$half"
"$bin/sluice-cp" validate "$work/half" >/dev/null
serve "$work/half" "$work/cp-half.log"
half_row="| $half policies, no proxy | ${ready_ms} ms | $(rss_mib "$cp") MiB | $(hwm_mib "$cp") MiB | $(cpu_ms "$cp") ms |"
stop_pids "$cp"
generate "$work/policies" "$POLICIES"
serve "$work/policies" "$work/cp.log"
full_row="| $POLICIES policies, no proxy | ${ready_ms} ms | $(rss_mib "$cp") MiB | $(hwm_mib "$cp") MiB | $(cpu_ms "$cp") ms |"
policies_served=$("$bin/sluice-cp" status --server "$server" | sed -n 1p)
echo "$policies_served" >&2

# One new proxy: start → ready; HOSTS hosts; its memory and series.
start=$(now_ms)
"$bin/sluice-proxy" --control-plane "$server" --node-id mesh-proxy --listen 127.0.0.1:0 \
  --admin 127.0.0.1:0 --ready-file "$work/proxy.json" --no-access-log 2>"$work/proxy.log" &
proxy=$!
pids+=("$proxy")
wait_for 30 test -s "$work/proxy.json"
admin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$work/proxy.json")
listen=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen"])' "$work/proxy.json")
wait_for 30 curl -sf "http://$admin/ready" -o /dev/null
proxy_ready_ms=$(( $(now_ms) - start ))
first_ms=""
for i in $(seq 0 $((HOSTS - 1))); do
  host="svc-$((i * (POLICIES / HOSTS))).mesh.bench"
  t0=$(now_ms)
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "host: $host" "http://$listen/api/items")
  [ "$code" = 200 ] || { echo "mesh: $host answered $code" >&2; exit 1; }
  [ -n "$first_ms" ] || first_ms=$(( $(now_ms) - t0 ))
done
t0=$(now_ms)
curl -s -o /dev/null -H "host: svc-0.mesh.bench" "http://$listen/api/items"
again_ms=$(( $(now_ms) - t0 ))
sleep 1
proxy_rss=$(rss_mib "$proxy") proxy_hwm=$(hwm_mib "$proxy")
series=$(curl -sf "http://$admin/metrics" | grep -cv '^#')
held=$(curl -sf "http://$admin/config_dump" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["policyVersions"]))')

# STREAMS simulated proxies, each on HOSTS hosts; one policy edited.
edited=$((POLICIES / HOSTS))
file=$(grep -l "name: p$edited," "$work/policies"/*.yaml)
sed "/name: p$edited,/,/name: default/ s/requestsPerSecond: 1000/requestsPerSecond: 1001/" "$file" >"$work/edited.yaml"
cmp -s "$file" "$work/edited.yaml" && { echo "mesh: the edit changed nothing" >&2; exit 1; }
host_args=()
for i in $(seq 0 $((HOSTS - 1))); do host_args+=(--host "svc-$(( i * (POLICIES / HOSTS) + (i == 1 ? 0 : 1) )).mesh.bench"); done
# The edited policy's host is the second one (i == 1 above: svc-$edited).
"$bin/sluice-fanout-bench" --server "$server" --streams "$STREAMS" --connections "$CONNECTIONS" \
  --policy-file "$file" --new-content "$work/edited.yaml" --policy-id "mesh/p$edited" \
  "${host_args[@]}" --gate "$work/gate" >"$work/bench.out" 2>"$work/bench.err" &
bench=$!
pids+=("$bench")
said() { grep -q "^$1" "$work/bench.out" || { kill -0 "$bench" 2>/dev/null || { cat "$work/bench.err" >&2; exit 1; }; false; }; }
wait_for 180 said ready
sleep 2
cp_idle_rss=$(rss_mib "$cp") cp_idle_hwm=$(hwm_mib "$cp")
cpu_before=$(cpu_ms "$cp")
touch "$work/gate"
wait_for 120 said done
cp_push_cpu=$(( $(cpu_ms "$cp") - cpu_before ))
rm "$work/gate"
wait "$bench" || { cat "$work/bench.err" >&2; exit 1; }
cat "$work/bench.out" >&2
field() { grep "^$1 " "$work/bench.out" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }
r() { field result "$1"; }

mem_gib=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
proxy_table=$(
  echo "| one new proxy (target) | measured |"
  echo "|---|---|"
  echo "| start → /ready 200 (≤ 2 s) | ${proxy_ready_ms} ms |"
  echo "| first request for an unknown host (discovery included) | ${first_ms} ms |"
  echo "| a later request for a held host | ${again_ms} ms |"
  echo "| policies held after $HOSTS hosts | $held |"
  echo "| RSS after $HOSTS hosts (≤ 30 MB) | ${proxy_rss} MiB (peak ${proxy_hwm} MiB) |"
  echo "| /metrics series after $HOSTS hosts (≤ 500) | $series |"
)
fanout_table=$(
  echo "| one policy edited, $STREAMS subscribed proxies (target) | measured |"
  echo "|---|---|"
  echo "| subscribe: $STREAMS streams × $HOSTS hosts → all hold the policy (status) | $(field ready subscribe_all_acked_ms) ms |"
  echo "| write → accepted (100 ms debounce, one file of $((POLICIES / FILES)) re-checked) | $(r write_to_accepted_ms) ms |"
  echo "| write → all $STREAMS streams received it (≤ 1 s) | $(r write_to_all_received_ms) ms |"
  echo "| write → status shows all $STREAMS hold it | $(r write_to_all_acked_ms) ms |"
  echo "| what the update carried (that policy only) | $(r update_policies) policy, $(r update_bytes) bytes |"
)
cp_table=$(
  echo "| control plane | start → ready | RSS | peak RSS | CPU |"
  echo "|---|---|---|---|---|"
  echo "$half_row"
  echo "$full_row"
  echo "| $POLICIES policies, $STREAMS streams idle | | $cp_idle_rss MiB | $cp_idle_hwm MiB | |"
  echo "| one edit pushed to $STREAMS streams | | | | ${cp_push_cpu} ms |"
)
echo "$proxy_table"; echo "$fanout_table"; echo "$cp_table"
{
  echo
  echo "## A mesh of $POLICIES policies: one control plane, proxies that hold what they use ($(date -u +%Y-%m-%d), $(nproc) cores, ${mem_gib} GiB)"
  echo
  echo "Command: \`POLICIES=$POLICIES FILES=$FILES STREAMS=$STREAMS CONNECTIONS=$CONNECTIONS HOSTS=$HOSTS bench/mesh.sh\`."
  echo "Release builds on loopback, on the same machine: \`sluice-cp serve\` reads $POLICIES generated"
  echo "policies of 3 routes each (\`$FILES\` files); one \`sluice-proxy --control-plane\` (on-demand"
  echo "discovery, access log off) requests $HOSTS distinct hosts once each; \`sluice-fanout-bench\`"
  echo "holds $STREAMS subscriptions to $HOSTS hosts each over $CONNECTIONS HTTP/2 connections, then one"
  echo "policy file is replaced (write + rename). CPU is user+sys from /proc (10 ms ticks). \`sluice-cp status\`: \`$policies_served\`."
  echo
  echo "$proxy_table"
  echo
  echo "$fanout_table"
  echo
  echo "$cp_table"
} >>"$RESULTS"
