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

# nginx_conf DIR < server-blocks: a one-worker nginx.conf with every path under DIR,
# no access log and long keep-alive; the http{} body comes from stdin.
nginx_conf() {
    cat <<EOF
worker_processes 1;
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
