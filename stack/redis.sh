#!/usr/bin/env bash
# Redis (Debian's redis-server) on 127.0.0.1:6379, no persistence (no RDB, no AOF).
# Usage: stack/redis.sh {prereqs|install|start|stop|status}
SVC=redis
# shellcheck source=stack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=6379
PIDFILE="$RUN/redis.pid"
LOG="$LOGS/redis.log"
FAIL_LOGS=("$LOG")

# Debian packages this server needs (stack.sh runs every prereqs step one at a time).
prereqs() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
    apt_ensure redis-server redis-tools
}

ready() { [[ $(redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null) == PONG ]]; }

start() {
    lock
    local pid t0=$SECONDS d
    if pid=$(pid_of "$PIDFILE"); then
        say "already running (pid $pid)"
        wait_ready 30 "$PIDFILE" ready
        return 0
    fi
    prereqs
    refuse_busy_port "$PORT"
    d=$(svc_dir redis "$(id -un)")
    rotate_log "$LOG"
    # Runs in the foreground under spawn (which detaches it and keeps the pidfile).
    spawn "$PIDFILE" "$LOG" "$(id -un)" redis-server --bind 127.0.0.1 --port "$PORT" \
        --protected-mode yes --daemonize no --logfile "" --dir "$d" \
        --save "" --appendonly no
    wait_ready 30 "$PIDFILE" ready
    say "up on 127.0.0.1:$PORT (Redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'), pid $(head -1 "$PIDFILE"), $((SECONDS - t0))s)"
}

STOP_TIMEOUT=30
serve "$@"
