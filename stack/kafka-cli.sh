#!/usr/bin/env bash
# Kafka command-line tools from the cached jars (run `stack/stack.sh up` once first).
#
# Usage: stack/kafka-cli.sh TOOL [ARGS...]
#   TOOL is a short name below or a fully qualified main class.
#   The bootstrap server is 127.0.0.1:9092; pass it as the tools expect, e.g.
#
#   stack/kafka-cli.sh consumer-groups --bootstrap-server 127.0.0.1:9092 --list
#   stack/kafka-cli.sh consumer-groups --bootstrap-server 127.0.0.1:9092 --describe --group event-pipeline
#   stack/kafka-cli.sh topics --bootstrap-server 127.0.0.1:9092 --describe --topic events.raw
#   stack/kafka-cli.sh transactions --bootstrap-server 127.0.0.1:9092 list
#   stack/kafka-cli.sh console-consumer --bootstrap-server 127.0.0.1:9092 --topic events.raw \
#       --from-beginning --isolation-level read_committed --max-messages 10
set -euo pipefail
STACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$STACK_DIR/.." && pwd)"
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$STACK_DIR/kafka/pom.xml")
LIBS="$ROOT/.cache/kafka/$KAFKA_VERSION/libs"

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo "Tools: consumer-groups topics configs transactions console-consumer console-producer"
    echo "       get-offsets metadata-quorum cluster features delete-records"
    exit 0
fi
[[ -f $LIBS/.complete ]] || bash "$STACK_DIR/kafka.sh" install

tool=$1
shift
case "$tool" in
consumer-groups) main=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
topics) main=org.apache.kafka.tools.TopicCommand ;;
configs) main=kafka.admin.ConfigCommand ;;
transactions) main=org.apache.kafka.tools.TransactionsCommand ;;
console-consumer) main=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
console-producer) main=org.apache.kafka.tools.ConsoleProducer ;;
get-offsets) main=org.apache.kafka.tools.GetOffsetShell ;;
metadata-quorum) main=org.apache.kafka.tools.MetadataQuorumCommand ;;
cluster) main=org.apache.kafka.tools.ClusterTool ;;
features) main=org.apache.kafka.tools.FeatureCommand ;;
delete-records) main=org.apache.kafka.tools.DeleteRecordsCommand ;;
*.*) main=$tool ;;
*)
    echo "unknown tool '$tool' (see $0 --help)" >&2
    exit 2
    ;;
esac

exec "${KAFKA_JAVA:-java}" -Xmx512m -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$STACK_DIR/kafka/tools-log4j2.properties" \
    -cp "$LIBS/*" "$main" "$@"
