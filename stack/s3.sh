#!/usr/bin/env bash
# S3 API on 127.0.0.1:5000: moto's server mode from the repository's virtualenv
# (`moto[server]` is a test extra; `make install` provides it). State is in memory only.
# Usage: stack/s3.sh {prereqs|install|start|stop|status}
SVC=s3
# shellcheck source=stack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=5000
PIDFILE="$RUN/s3.pid"
LOG="$LOGS/s3.log"
FAIL_LOGS=("$LOG")
MOTO="$ROOT/.venv/bin/moto_server"

# The virtualenv and curl (stack.sh runs every prereqs step one at a time).
prereqs() {
    command -v curl >/dev/null || apt_ensure curl ca-certificates
    [[ -x $MOTO ]] && return 0
    say "no $MOTO yet: running make install"
    make -C "$ROOT" install
    [[ -x $MOTO ]] || die "make install did not provide $MOTO"
}

# ListBuckets answers 200 once the server is serving.
ready() { curl -fsS --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/"; }

start() {
    lock
    local pid t0=$SECONDS
    if pid=$(pid_of "$PIDFILE"); then
        say "already running (pid $pid)"
        wait_ready 60 "$PIDFILE" ready
        return 0
    fi
    prereqs
    refuse_busy_port "$PORT"
    rotate_log "$LOG"
    spawn "$PIDFILE" "$LOG" "$(id -un)" "$MOTO" -H 127.0.0.1 -p "$PORT"
    wait_ready 60 "$PIDFILE" ready
    say "up on 127.0.0.1:$PORT (moto $("$ROOT/.venv/bin/python" -c 'import moto; print(moto.__version__)'), pid $(head -1 "$PIDFILE"), $((SECONDS - t0))s)"
}

STOP_TIMEOUT=30
serve "$@"
