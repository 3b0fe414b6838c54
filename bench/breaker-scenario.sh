#!/usr/bin/env bash
# Scenario: one of two backends stops answering under steady load (its process is
# frozen with SIGSTOP: connections are accepted by the kernel but never answered,
# the hardest failure for a proxy), then comes back. Measures the error rate and
# latency clients see before, during and after, without and with resilience
# (outlier ejection + circuit breaker + static fallback), and appends the table to
# bench/RESULTS.md.
#
# Usage: bench/breaker-scenario.sh            (builds release binaries first)
# Traffic goes to 127.0.0.1 only; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup
cargo build --release --locked -p sluice-proxy -p sluice-demo >&2
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

BEFORE=5 DURING=10 AFTER=10 RATE=${RATE:-200}
rows=()

run_variant() { # name, extra route yaml, extra spec yaml
  local name=$1 route_extra=$2 spec_extra=$3
  "$bin/sluice-demo-upstream" --listen 127.0.0.1:19181 --name a >/dev/null 2>&1 & local a=$!
  "$bin/sluice-demo-upstream" --listen 127.0.0.1:19182 --name b >/dev/null 2>&1 & local b=$!
  pids+=("$a" "$b")
  cat >"$work/policy.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: bench}
spec:
  hosts: [bench]
  backends:
    - address: 127.0.0.1:19181
    - address: 127.0.0.1:19182
$spec_extra
  routes:
    - name: all
      timeout: 500ms
$route_extra
YAML
  "$bin/sluice-proxy" --policy "$work/policy.yaml" --listen 127.0.0.1:19101 --admin 127.0.0.1:19100 \
    --no-access-log 2>"$work/proxy-$name.log" & local p=$!
  pids+=("$p")
  for _ in $(seq 1 100); do curl -fsS http://127.0.0.1:19100/ready >/dev/null 2>&1 && break; sleep 0.1; done
  "$bin/sluice-bench-load" --target 127.0.0.1:19101 --host bench --rate "$RATE" --connections 16 \
    --phases "before:$BEFORE,backend b frozen:$DURING,after:$AFTER" --variant "$name" >"$work/rows-$name" &
  local load=$!
  sleep "$BEFORE"; kill -STOP "$b"
  sleep "$DURING"; kill -CONT "$b"
  wait "$load"
  while IFS= read -r row; do rows+=("$row"); done <"$work/rows-$name"
  kill "$p" "$a" "$b"; wait "$p" "$a" "$b" 2>/dev/null || true
}

run_variant "no breaker, no fallback" "" ""
run_variant "outlier ejection + breaker + fallback" "      circuitBreaker: {consecutiveFailures: 5, errorRatio: 0.5, minRequests: 20, window: 10s, openFor: 5s, halfOpenRequests: 2}
      fallback: {status: 200, body: 'degraded', on: [breaker-open, upstream-error]}" \
  "  outlierDetection: {consecutiveFailures: 3, ejectFor: 5s, maxEjectedPercent: 50}"

table=$(
  echo "| variant | phase | requests | errors | error rate | p50 | p99 |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
)
echo "$table"
{
  echo
  echo "## Backend failure under load ($(date -u +%Y-%m-%d), $(nproc) cores, ${RATE} req/s)"
  echo
  echo "Command: \`bench/breaker-scenario.sh\`. Two backends, route timeout 500 ms; backend b is"
  echo "frozen (SIGSTOP) for ${DURING} s after ${BEFORE} s, then resumed. Errors are non-2xx answers"
  echo "or failed exchanges seen by the client; the fallback answers 200 \"degraded\"."
  echo
  echo "$table"
} >>bench/RESULTS.md
