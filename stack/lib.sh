# Shared helpers for stack/*.sh. Sourced, never run. Each server script sets SVC first.
#
# Layout (all relative to the repository root, both ignored by git):
#   .cache/            downloads and unpacked distributions, kept by `down`
#   .stack/run/        pidfiles and locks
#   .stack/logs/       one log per server (<name>.log)
#   .stack/<name>/     per-run data of a server, wiped when it starts from "down"
#                      unless STACK_KEEP_DATA=1

set -euo pipefail

STACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$STACK_DIR/.." && pwd)"
CACHE="$ROOT/.cache"
STATE="$ROOT/.stack"
LOGS="$STATE/logs"
RUN="$STATE/run"
mkdir -p "$CACHE" "$LOGS" "$RUN"

STACK_KEEP_DATA="${STACK_KEEP_DATA:-0}"

say() { printf '%-12s %s\n' "$SVC:" "$*"; }
warn() { printf '%-12s %s\n' "$SVC:" "$*" >&2; }
die() {
    printf '%-12s ERROR: %s\n' "$SVC:" "$*" >&2
    exit 1
}

is_root() { [[ $EUID -eq 0 ]]; }

# ---------------------------------------------------------------------------------------
# Debian packages

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

# apt_ensure PKG...: install the packages that are missing (root only). Services that a
# package would start on its own (redis-server, the default PostgreSQL cluster) are kept
# down with a temporary policy-rc.d, so they never take this stack's ports.
apt_ensure() {
    local missing=() p
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    is_root || die "missing Debian packages: ${missing[*]} (install them: sudo apt-get install -y ${missing[*]})"
    say "installing ${missing[*]} (apt-get)"
    local guard="" policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, written by stack/lib.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        guard=1
    fi
    local rc=0 opts=(-q -o DPkg::Lock::Timeout=300)
    {
        DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" update &&
            DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y --no-install-recommends "${missing[@]}"
    } >"$LOGS/apt-$SVC.log" 2>&1 || rc=$?
    [[ -z $guard ]] || rm -f "$policy"
    if ((rc)); then
        tail -n 30 "$LOGS/apt-$SVC.log" >&2
        die "apt-get install ${missing[*]} failed (full output: $LOGS/apt-$SVC.log)"
    fi
}

# ---------------------------------------------------------------------------------------
# Users and directories

# ensure_system_user NAME: a locked system account with no home and no shell.
ensure_system_user() {
    id -u "$1" >/dev/null 2>&1 && return 0
    is_root || die "system user '$1' is missing and only root can create it"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$1"
}

# as_user USER CMD...: run CMD as USER when root (via setpriv, which execs, so a pid
# taken with $! is the server's own), as ourselves otherwise.
as_user() {
    local user=$1
    shift
    if is_root && [[ $user != root ]]; then
        setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups \
            env HOME=/tmp USER="$user" LOGNAME="$user" "$@"
    else
        "$@"
    fi
}

# service_user WANTED: the account a server runs as: WANTED when we are root, ourselves
# otherwise (no chown possible then, and none needed).
service_user() { if is_root; then echo "$1"; else id -un; fi; }

# svc_dir NAME USER: the per-run directory of server NAME, created, owned by USER, and
# reachable by USER. That is .stack/NAME, unless a parent of the repository is closed to
# other users (a checkout under /root, say): then it is a directory under /var/tmp keyed
# by the repository path, and .stack/NAME becomes a symlink to it.
svc_dir() {
    local name=$1 user=$2 dir
    dir="$STATE/$name"
    if [[ $user == "$(id -un)" ]] || as_user "$user" test -x "$STATE"; then
        [[ -L $dir ]] && rm -f "$dir"
        mkdir -p "$dir"
    else
        local alt
        alt="/var/tmp/event-pipeline-stack.$(printf '%s' "$ROOT" | sha1sum | cut -c1-12)/$name"
        mkdir -p "$alt"
        chmod 755 "$(dirname "$alt")"
        [[ -L $dir || ! -e $dir ]] || rm -rf "$dir"
        ln -sfn "$alt" "$dir"
        dir=$alt
    fi
    [[ $user == "$(id -un)" ]] || chown "$user:$(id -gn "$user")" "$dir"
    echo "$dir"
}

# ---------------------------------------------------------------------------------------
# Processes

# lock: serialise start/stop of one server across concurrent stack.sh runs.
lock() {
    exec 9>"$RUN/$SVC.lock"
    flock -w 900 9 || die "could not lock $RUN/$SVC.lock"
}

# proc_field PID N: field N of /proc/PID/stat counted after the command name (1 = state,
# 20 = start time in clock ticks since boot).
proc_field() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    cut -d' ' -f"$2" <<<"$stat"
}

# pid_of PIDFILE: the pid in PIDFILE if that very process is still alive (not a zombie,
# same start time, so a pid reused after a reboot does not count), else nothing (status 1).
pid_of() {
    local pid start state
    { read -r pid && read -r start; } 2>/dev/null <"$1" || [[ -n ${pid:-} ]] || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    state=$(proc_field "$pid" 1) || return 1
    [[ $state != Z && $state != X ]] || return 1
    [[ -z ${start:-} || $(proc_field "$pid" 20) == "$start" ]] || return 1
    echo "$pid"
}

# write_pidfile PIDFILE PID: the pid and its start time.
write_pidfile() {
    printf '%s\n%s\n' "$2" "$(proc_field "$2" 20 || true)" >"$1"
}

# spawn PIDFILE LOGFILE USER CMD...: start CMD as USER, detached (own session, no stdin,
# no inherited lock fd), stdout+stderr appended to LOGFILE; records its pid.
spawn() {
    local pidfile=$1 logfile=$2 user=$3
    shift 3
    local cmd=("$@")
    if is_root && [[ $user != root ]]; then
        cmd=(setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups
            env HOME=/tmp USER="$user" LOGNAME="$user" "$@")
    fi
    setsid "${cmd[@]}" </dev/null >>"$logfile" 2>&1 9>&- &
    write_pidfile "$pidfile" $!
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_ready TIMEOUT PIDFILE CHECK...: poll CHECK until it succeeds. Fails loudly when the
# process exits or TIMEOUT seconds pass (stopping the process in that case).
wait_ready() {
    local timeout=$1 pidfile=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        pid_of "$pidfile" >/dev/null || start_failed "exited during start-up"
        if ((SECONDS >= deadline)); then
            stop_pid "$pidfile" 20
            start_failed "not ready after ${timeout}s (stopped it)"
        fi
        sleep 0.5
    done
}

# Log files shown by start_failed; each server script sets its own.
FAIL_LOGS=()
start_failed() {
    local f
    for f in "${FAIL_LOGS[@]}"; do
        [[ -f $f ]] || continue
        printf '%s\n' "----- last 40 lines of $f -----" >&2
        tail -n 40 "$f" >&2
    done
    die "$1"
}

# stop_pid PIDFILE [TIMEOUT] [SIGNAL]: signal the process (TERM unless told), wait up to
# TIMEOUT seconds, then SIGKILL. No error when it is not running.
stop_pid() {
    local pidfile=$1 timeout=${2:-30} sig=${3:-TERM} pid
    if pid=$(pid_of "$pidfile"); then
        kill "-$sig" "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + timeout))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            warn "pid $pid still running after ${timeout}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
        say "stopped (pid $pid)"
    else
        say "not running"
    fi
    rm -f "$pidfile"
}

# refuse_busy_port PORT: before a start, make sure no other process holds the port.
refuse_busy_port() {
    if port_open "$1"; then
        local who
        who=$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:.*' | head -1 || true)
        die "port $1 is already taken by another process ${who:+($who)}; stop it first (another checkout's stack? run its stack/stack.sh down)"
    fi
}

# status_line PORT PIDFILE: "name port state" for stack.sh status; returns 0 only when up.
status_line() {
    local port=$1 pidfile=$2 pid state rc=1
    if pid=$(pid_of "$pidfile"); then
        if port_open "$port"; then
            state="up (pid $pid)"
            rc=0
        else
            state="starting or unhealthy (pid $pid, port closed)"
        fi
    elif port_open "$port"; then
        state="down (port taken by another process)"
    else
        state="down"
    fi
    printf '%-11s %-6s %s\n' "$SVC" "$port" "$state"
    return $rc
}

# rotate_log FILE: keep the previous run's log as FILE.1 and start an empty one.
rotate_log() {
    [[ -s $1 ]] && mv -f "$1" "$1.1"
    : >"$1"
}

# fetch URL DEST: download from Maven Central (or any URL) with retries, verifying the
# .sha1 published next to it.
fetch() {
    local url=$1 dest=$2 want got
    mkdir -p "$(dirname "$dest")"
    curl -fsSL --retry 5 --retry-delay 2 --connect-timeout 20 -o "$dest.part" "$url" ||
        die "download failed: $url"
    want=$(curl -fsSL --retry 5 --retry-delay 2 "$url.sha1" | cut -c1-40) ||
        die "download failed: $url.sha1"
    got=$(sha1sum "$dest.part" | cut -c1-40)
    [[ $want == "$got" ]] || die "checksum mismatch for $url (want $want, got $got)"
    mv -f "$dest.part" "$dest"
}

# The command line every server script ends with: `serve "$@"`. A script defines prereqs and start
# (and install when it downloads something) and sets PORT, PIDFILE, STOP_TIMEOUT (seconds) and
# STOP_SIGNAL (default TERM); stop and status are the same for all.
serve() {
    case "${1:-}" in
    prereqs) prereqs ;;
    install) if declare -F install >/dev/null; then install; else prereqs; fi ;;
    start) start ;;
    stop)
        lock
        # shellcheck disable=SC2153 # PIDFILE is set by the server script
        stop_pid "$PIDFILE" "${STOP_TIMEOUT:-30}" "${STOP_SIGNAL:-TERM}"
        ;;
    status) status_line "$PORT" "$PIDFILE" ;;
    *)
        echo "usage: $0 {prereqs|install|start|stop|status}" >&2
        exit 2
        ;;
    esac
}

