#!/usr/bin/env bash
# PostgreSQL 15 (Debian's package) on 127.0.0.1:5432 with its own data directory under
# .stack/postgres, run as the `postgres` OS user. Creates role `pipeline` (password
# `pipeline`) owning database `pipeline`, matching Settings.postgres_dsn.
# TimescaleDB is preloaded and created in `pipeline` when its extension is installed.
# Usage: stack/postgres.sh {prereqs|install|start|stop|status}
SVC=postgres
# shellcheck source=stack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_MAJOR=15
PG_BIN="/usr/lib/postgresql/$PG_MAJOR/bin"
PORT=5432
DB_USER=pipeline
DB_PASSWORD=pipeline
DB_NAME=pipeline
PIDFILE="$RUN/postgres.pid"
LOG="$LOGS/postgres.log"
FAIL_LOGS=("$LOG")
PG_USER=$(service_user postgres)

# Debian packages this server needs (stack.sh runs every prereqs step one at a time).
prereqs() {
    [[ -x $PG_BIN/postgres ]] || apt_ensure "postgresql-$PG_MAJOR"
    # postgresql-common's default cluster stays down (policy-rc.d while installing); it is
    # left alone, this stack never uses /var/lib/postgresql.
}

# The unix socket lives in the per-run dir unless that path is too long for a socket.
socket_dir() {
    local d=$1
    if ((${#d} < 80)); then
        echo "$d/sock"
    else
        echo "/tmp/event-pipeline-pg.$(printf '%s' "$ROOT" | sha1sum | cut -c1-12)"
    fi
}

ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -d postgres; }

psql_admin() {
    "$PG_BIN/psql" -h "$SOCK" -p "$PORT" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"
}

bootstrap_db() {
    psql_admin -d postgres <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') THEN
    CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD';
  END IF;
END
\$\$;
EOF
    if [[ -z $(psql_admin -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") ]]; then
        psql_admin -d postgres -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"
    fi
    if [[ -n $TIMESCALE ]]; then
        psql_admin -d "$DB_NAME" -c "CREATE EXTENSION IF NOT EXISTS timescaledb"
    fi
}

start() {
    lock
    local pid t0=$SECONDS d
    d=$(svc_dir postgres "$PG_USER")
    SOCK=$(socket_dir "$d")
    prereqs
    TIMESCALE=""
    [[ -f $("$PG_BIN/pg_config" --sharedir)/extension/timescaledb.control ]] && TIMESCALE=1
    if pid=$(pid_of "$PIDFILE"); then
        say "already running (pid $pid)"
        wait_ready 60 "$PIDFILE" ready
        return 0
    fi
    refuse_busy_port "$PORT"
    if [[ $STACK_KEEP_DATA != 1 ]] || [[ ! -f $d/data/PG_VERSION ]]; then
        rm -rf "$d/data"
        as_user "$PG_USER" "$PG_BIN/initdb" -D "$d/data" -U postgres --encoding=UTF8 \
            --no-locale --auth-local=trust --auth-host=scram-sha-256 --no-sync \
            >"$LOGS/postgres-initdb.log" 2>&1 || {
            cat "$LOGS/postgres-initdb.log" >&2
            die "initdb failed"
        }
        cat >>"$d/data/postgresql.conf" <<EOF

# --- stack/postgres.sh ---
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
unix_socket_permissions = 0700
max_connections = 200
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
${TIMESCALE:+shared_preload_libraries = 'timescaledb'}
${TIMESCALE:+timescaledb.telemetry_level = off}
EOF
    fi
    mkdir -p "$SOCK"
    chmod 700 "$SOCK"
    is_root && chown "$PG_USER:$(id -gn "$PG_USER")" "$SOCK"
    rotate_log "$LOG"
    spawn "$PIDFILE" "$LOG" "$PG_USER" "$PG_BIN/postgres" -D "$d/data"
    wait_ready 60 "$PIDFILE" ready
    bootstrap_db || start_failed "creating role/database '$DB_NAME' failed"
    say "up on 127.0.0.1:$PORT (PostgreSQL $("$PG_BIN/postgres" -V | awk '{print $3}')${TIMESCALE:+ + TimescaleDB}, pid $(head -1 "$PIDFILE"), $((SECONDS - t0))s)"
}

STOP_TIMEOUT=60
STOP_SIGNAL=INT  # "fast" shutdown: roll back open transactions, checkpoint, exit
serve "$@"
