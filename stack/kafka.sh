#!/usr/bin/env bash
# Apache Kafka, KRaft single node (broker + controller) on 127.0.0.1:9092 (controller 9093).
# Usage: stack/kafka.sh {prereqs|install|start|stop|status}
#
# Jars come from Maven Central (stack/kafka/pom.xml, resolved by Maven into
# .cache/kafka/<version>/libs); the broker runs on the default `java` (17+).
SVC=kafka
# shellcheck source=stack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$STACK_DIR/kafka/pom.xml")
PORT=9092
CONTROLLER_PORT=9093
LIBS="$CACHE/kafka/$KAFKA_VERSION/libs"
DIR="$STATE/kafka"
PIDFILE="$RUN/kafka.pid"
LOG="$LOGS/kafka.log"          # log4j2 output (stack/kafka/log4j2.properties)
OUT="$LOGS/kafka.stdout.log"   # JVM stdout/stderr: crashes, fatal start-up errors
FAIL_LOGS=("$OUT" "$LOG")
JAVA="${KAFKA_JAVA:-java}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"

# Debian packages this server needs (stack.sh runs every prereqs step one at a time).
prereqs() {
    command -v mvn >/dev/null || apt_ensure maven
    command -v "$JAVA" >/dev/null || apt_ensure openjdk-17-jre-headless
}

install() {
    prereqs
    [[ -f $LIBS/.complete ]] && return 0
    say "fetching Kafka $KAFKA_VERSION jars from Maven Central (first run only)"
    rm -rf "$LIBS"
    mvn -B -q -f "$STACK_DIR/kafka/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS" \
        >"$LOGS/kafka-install.log" 2>&1 || {
        tail -n 30 "$LOGS/kafka-install.log" >&2
        die "maven could not fetch the Kafka jars (full output: $LOGS/kafka-install.log)"
    }
    touch "$LIBS/.complete"
}

write_config() {
    cat >"$DIR/server.properties" <<EOF
# Written by stack/kafka.sh at every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DIR/data
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
}

ready() {
    port_open "$PORT" && grep -q 'Kafka Server started' "$LOG"
}

start() {
    lock
    local pid
    if pid=$(pid_of "$PIDFILE"); then
        say "already running (pid $pid)"
        wait_ready 180 "$PIDFILE" ready
        return 0
    fi
    install
    refuse_busy_port "$PORT"
    refuse_busy_port "$CONTROLLER_PORT"
    mkdir -p "$DIR"
    local cp="$LIBS/*" t0=$SECONDS
    if [[ $STACK_KEEP_DATA != 1 ]] || [[ ! -f $DIR/data/meta.properties ]]; then
        rm -rf "$DIR/data"
        write_config
        local cluster_id
        # 16 random bytes, base64url as Kafka writes a UUID; one starting with '-' would be read
        # as an option (Kafka's own generator skips those too)
        cluster_id=-
        while [[ $cluster_id == -* ]]; do
            cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
        done
        "$JAVA" -Dlog4j2.configurationFile="$STACK_DIR/kafka/tools-log4j2.properties" -cp "$cp" \
            kafka.tools.StorageTool format -t "$cluster_id" -c "$DIR/server.properties" --standalone \
            >"$LOGS/kafka-format.log" 2>&1 || {
            cat "$LOGS/kafka-format.log" >&2
            die "formatting the log directory failed"
        }
    fi
    write_config
    rotate_log "$LOG"
    rotate_log "$OUT"
    # shellcheck disable=SC2086
    spawn "$PIDFILE" "$OUT" "$(id -un)" "$JAVA" $HEAP_OPTS -server -XX:+UseG1GC \
        -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
        -Dkafka.logs.dir="$LOGS" -Dlog4j2.configurationFile="$STACK_DIR/kafka/log4j2.properties" \
        -cp "$cp" kafka.Kafka "$DIR/server.properties"
    wait_ready 180 "$PIDFILE" ready
    say "up on 127.0.0.1:$PORT (Kafka $KAFKA_VERSION, pid $(head -1 "$PIDFILE"), $((SECONDS - t0))s)"
}

STOP_TIMEOUT=60
serve "$@"
