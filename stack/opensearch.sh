#!/usr/bin/env bash
# OpenSearch, single node, plain HTTP on 127.0.0.1:9200 (transport 127.0.0.1:9300).
# Usage: stack/opensearch.sh {prereqs|install|start|stop|status}
#
# The distribution is Maven Central's integ-test zip (no security plugin, no bundled JDK),
# unpacked once into .cache/opensearch. OpenSearch 3.x needs Java 21+: the newest JDK found
# under /usr/lib/jvm (or OPENSEARCH_JAVA_HOME) is used; with only Java 17 around, the
# script falls back to the OpenSearch 2.19 line. It refuses to run as root, so it runs as
# the system user `opensearch` (created when missing).
SVC=opensearch
# shellcheck source=stack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OS3_VERSION=3.6.0
OS2_VERSION=2.19.6
PORT=9200
TRANSPORT_PORT=9300
PIDFILE="$RUN/opensearch.pid"
LOG="$LOGS/opensearch.log"
FAIL_LOGS=("$LOG")
HEAP="${OPENSEARCH_HEAP:-1g}"
OS_USER=$(service_user opensearch)

# java_major JAVA_HOME: the feature version of that JDK (17, 21, 25, ...).
java_major() {
    "$1/bin/java" -XshowSettings:properties -version 2>&1 |
        sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p'
}

# choose_java: sets JAVA_HOME_OS (OPENSEARCH_JAVA_HOME if given, else the newest JDK under
# /usr/lib/jvm), VERSION (3.x on Java 21+, else 2.19) and DIST (its unpacked home).
choose_java() {
    local best="${OPENSEARCH_JAVA_HOME:-}" best_major=0 j m
    if [[ -n $best ]]; then
        best_major=$(java_major "$best")
        [[ -n $best_major ]] || die "OPENSEARCH_JAVA_HOME=$best has no working bin/java"
    else
        for j in /usr/lib/jvm/*; do
            [[ -x $j/bin/java && ! -L $j ]] || continue
            m=$(java_major "$j")
            [[ -n $m ]] && ((m > best_major)) && best=$j best_major=$m
        done
    fi
    if [[ -z $best ]]; then
        apt_ensure openjdk-17-jre-headless
        best=$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")
        best_major=$(java_major "$best")
    fi
    JAVA_HOME_OS=$best
    JAVA_MAJOR=$best_major
    if ((best_major >= 21)); then VERSION=$OS3_VERSION; else VERSION=$OS2_VERSION; fi
    DIST="$CACHE/opensearch/opensearch-$VERSION"
}

# Debian packages this server needs (stack.sh runs every prereqs step one at a time).
prereqs() {
    command -v curl >/dev/null || apt_ensure curl ca-certificates
    command -v unzip >/dev/null || apt_ensure unzip
    choose_java
}

install() {
    prereqs
    [[ -f $DIST/.complete ]] && return 0
    local url="https://repo1.maven.org/maven2/org/opensearch/distribution/integ-test-zip/opensearch/$VERSION/opensearch-$VERSION.zip"
    local zip="$CACHE/opensearch/opensearch-$VERSION.zip"
    if [[ ! -f $zip ]]; then
        say "downloading OpenSearch $VERSION from Maven Central (first run only)"
        fetch "$url" "$zip"
    fi
    rm -rf "$DIST" "$DIST.tmp"
    mkdir -p "$DIST.tmp"
    unzip -q "$zip" -d "$DIST.tmp"
    mv "$DIST.tmp/opensearch-$VERSION" "$DIST"
    rmdir "$DIST.tmp"
    chmod -R a+rX "$DIST"
    touch "$DIST/.complete"
    rm -f "$zip"
}

ready() {
    curl -fsS --max-time 2 "http://127.0.0.1:$PORT/_cluster/health?wait_for_status=yellow&timeout=1s"
}

write_config() { # $1 = per-run dir, $2 = OpenSearch home
    local d=$1 home=$2
    mkdir -p "$d/config/jvm.options.d" "$d/data" "$d/logs" "$d/tmp"
    # The distribution's jvm.options with every relative path made absolute (the launcher
    # runs from the read-only home).
    sed -e "s#-XX:HeapDumpPath=data#-XX:HeapDumpPath=$d/data#" \
        -e "s#-XX:ErrorFile=logs/#-XX:ErrorFile=$d/logs/#" \
        -e "s#file=logs/gc.log#file=$d/logs/gc.log#" \
        -e "s#-javaagent:agent/#-javaagent:$home/agent/#" \
        -e "s#^-Xms.*#-Xms$HEAP#" -e "s#^-Xmx.*#-Xmx$HEAP#" \
        "$home/config/jvm.options" >"$d/config/jvm.options"
    cat >"$d/config/opensearch.yml" <<EOF
# Written by stack/opensearch.sh at every start; edit the script, not this file.
cluster.name: event-pipeline
node.name: node-1
network.host: 127.0.0.1
http.port: $PORT
transport.port: $TRANSPORT_PORT
discovery.type: single-node
path.data: $d/data
path.logs: $d/logs
bootstrap.memory_lock: false
cluster.routing.allocation.disk.threshold_enabled: false
action.auto_create_index: true
EOF
    # Everything to stdout, which spawn appends to .stack/logs/opensearch.log.
    cat >"$d/config/log4j2.properties" <<'EOF'
status = error
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d{ISO8601}][%-5p][%-25c{1.}] [%node_name]%marker %m%n
rootLogger.level = info
rootLogger.appenderRef.console.ref = console
logger.deprecation.name = org.opensearch.deprecation
logger.deprecation.level = error
EOF
}

start() {
    lock
    local pid
    if pid=$(pid_of "$PIDFILE"); then
        say "already running (pid $pid)"
        wait_ready 300 "$PIDFILE" ready
        return 0
    fi
    install
    refuse_busy_port "$PORT"
    refuse_busy_port "$TRANSPORT_PORT"
    ensure_system_user "$OS_USER"
    local d home=$DIST t0=$SECONDS
    d=$(svc_dir opensearch "$OS_USER")
    # The service user must be able to read the distribution; when the cache sits under a
    # directory closed to it, use a copy inside its own per-run directory.
    if ! as_user "$OS_USER" test -r "$DIST/lib"; then
        home="$d/home-$VERSION"
        [[ -f $home/.complete ]] || { rm -rf "$home" && cp -a "$DIST" "$home"; }
    fi
    if [[ $STACK_KEEP_DATA != 1 ]]; then rm -rf "$d/data" "$d/logs" "$d/tmp"; fi
    rm -rf "$d/config"
    write_config "$d" "$home"
    is_root && chown -R "$OS_USER:$(id -gn "$OS_USER")" "$d"
    rotate_log "$LOG"
    spawn "$PIDFILE" "$LOG" "$OS_USER" env \
        OPENSEARCH_JAVA_HOME="$JAVA_HOME_OS" OPENSEARCH_PATH_CONF="$d/config" \
        OPENSEARCH_TMPDIR="$d/tmp" JAVA_HOME= "$home/bin/opensearch"
    wait_ready 300 "$PIDFILE" ready
    say "up on 127.0.0.1:$PORT (OpenSearch $VERSION on Java $JAVA_MAJOR, pid $(head -1 "$PIDFILE"), $((SECONDS - t0))s)"
}

STOP_TIMEOUT=60
serve "$@"
