#!/usr/bin/env bash
# bench/tracing-instructions.sh: what tracing costs per request in instructions
# (issue 24's cost target, where bench/tracing.sh's req/s spread exceeds the margin):
# bench/instructions.sh with tracing off and on (1% sampled), one request at a time
# (PAR=1) as first recorded; its settings (REQUESTS, PAR, BINS, APPEND) apply.
set -euo pipefail
export VARIANTS="log traced" PAR=${PAR:-1}
export TITLE="Tracing cost in instructions per request, callgrind"
exec "$(dirname "$0")/instructions.sh"
