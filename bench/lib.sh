# bench/lib.sh: helpers shared by the bench scripts (sourced, not run).

# wait_for SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds; fails
# (naming it) after SECONDS.
wait_for() {
    local seconds=$1
    shift
    for _ in $(seq 1 $((seconds * 10))); do "$@" && return 0; sleep 0.1; done
    echo "$(basename "$0"): timed out after ${seconds}s waiting for: $*" >&2
    return 1
}

# stop_pids PID...: SIGTERM, up to 5 s for them to exit, then SIGKILL.
stop_pids() {
    local pid i alive
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# nginx_conf DIR [WORKERS] < server-blocks: an nginx.conf of WORKERS workers (default
# 1) with every path under DIR, no access log and long keep-alive; the http{} body
# comes from stdin.
nginx_conf() {
    cat <<EOF
worker_processes ${2:-1};
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $1/body; proxy_temp_path $1/proxy; fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
$(cat)
}
EOF
}

# cpu_ticks PID...: utime + stime summed over the processes, in clock ticks.
cpu_ticks() {
    local t=0 pid f
    for pid in "$@"; do
        f=$(sed 's/^.*) //' "/proc/$pid/stat")
        t=$((t + $(awk '{print $12 + $13}' <<<"$f")))
    done
    echo $t
}

# hwm_kb PID...: peak RSS (VmHWM) summed over the processes, in kB.
hwm_kb() {
    local t=0 pid
    for pid in "$@"; do t=$((t + $(awk '/^VmHWM/ {print $2}' "/proc/$pid/status"))); done
    echo $t
}

# cpu_list_expand LIST: a taskset-style CPU list ("1", "0-3,6", "2 3") as the cores in
# it, in the order given, one space apart; fails (naming it) on anything else.
cpu_list_expand() {
    local part a b out=()
    for part in ${1//,/ }; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            a=${BASH_REMATCH[1]} b=${BASH_REMATCH[2]}
            [ "$a" -le "$b" ] || { echo "bad CPU range '$part' in '$1'" >&2; return 1; }
            for ((; a <= b; a++)); do out+=("$a"); done
        elif [[ $part =~ ^[0-9]+$ ]]; then
            out+=("$((10#$part))")
        else
            echo "bad CPU list '$1' (want e.g. 1 or 0-3,6)" >&2
            return 1
        fi
    done
    [ ${#out[@]} -gt 0 ] || { echo "empty CPU list" >&2; return 1; }
    # Each core once, first occurrence first.
    printf '%s\n' "${out[@]}" | awk '!seen[$1]++' | tr '\n' ' ' | sed 's/ $//'
}

# allowed_cpus: the cores this shell may run on (what nproc counts), one space apart.
allowed_cpus() {
    cpu_list_expand "$(awk '/^Cpus_allowed_list:/ {print $2}' /proc/self/status)"
}

# busy: whether a cargo or rustc build runs on the machine (benchmarks wait it out
# and mark runs it overlapped).
busy() { pgrep -x rustc >/dev/null || pgrep -f 'cargo (build|test|clippy)' >/dev/null; }

# to_ms DURATION: a wrk duration (812.00us 1.23ms 1.02s 2.00m) in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

# median < numbers: the median of whitespace-separated numbers ("nan" for none).
median() { tr ' ' '\n' | awk NF | sort -g | awk '{a[NR] = $1} END {
    if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
