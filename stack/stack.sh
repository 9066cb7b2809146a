#!/usr/bin/env bash
# The local server stack: Kafka, OpenSearch, PostgreSQL, Redis and an S3 API, every one
# bound to 127.0.0.1. No Docker: Debian packages, Maven Central artifacts and the repo's
# virtualenv. See docs/stack.md.
#
# Usage: stack/stack.sh {up|down|status}
#   up      install what is missing (apt-get, Maven Central, make install), then start
#           every server that is not running, in parallel, and wait until each is ready.
#           Servers already running are left alone. Exit status non-zero if any failed;
#           the servers this run started are then stopped again.
#   down    stop every server (no error for those not running). Keeps .cache/.
#   status  one line per server: name, port, state (always exits 0; grep for "down").
#
# One server: stack/<name>.sh {prereqs|install|start|stop|status}.
# Environment: STACK_KEEP_DATA=1 keeps Kafka/PostgreSQL/OpenSearch data from the last run
# (by default each start from "down" begins empty).
SVC=stack
# shellcheck source=stack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SERVERS=(kafka opensearch postgres redis s3)

up() {
    local t0=$SECONDS s failed=() started=() pids=()
    # Debian packages and the virtualenv, one server at a time: apt and make must not race.
    for s in "${SERVERS[@]}"; do
        bash "$STACK_DIR/$s.sh" prereqs
    done
    # Start in parallel: the two JVMs dominate, and the rest fits beside them.
    for s in "${SERVERS[@]}"; do
        bash "$STACK_DIR/$s.sh" status >/dev/null || started+=("$s")
        bash "$STACK_DIR/$s.sh" start &
        pids+=($!)
    done
    local i
    for i in "${!SERVERS[@]}"; do
        wait "${pids[$i]}" || failed+=("${SERVERS[$i]}")
    done
    if ((${#failed[@]})); then
        warn "failed to start: ${failed[*]} (logs in $LOGS)"
        for s in "${started[@]}"; do
            [[ " ${failed[*]} " == *" $s "* ]] || bash "$STACK_DIR/$s.sh" stop >/dev/null 2>&1 || true
        done
        warn "stopped the servers this run had started"
        return 1
    fi
    say "all up in $((SECONDS - t0))s"
}

down() {
    local s pids=() rc=0
    for s in "${SERVERS[@]}"; do
        bash "$STACK_DIR/$s.sh" stop &
        pids+=($!)
    done
    for s in "${pids[@]}"; do wait "$s" || rc=1; done
    return $rc
}

status() {
    local s
    for s in "${SERVERS[@]}"; do
        bash "$STACK_DIR/$s.sh" status || true
    done
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
