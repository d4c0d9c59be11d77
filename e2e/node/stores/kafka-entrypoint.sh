#!/bin/bash
# The lab's Kafka image (the jars e2e/bin/stores fetches from Maven Central, Debian's
# Java 17), with the upstream apache/kafka image's contract: every KAFKA_* variable but
# the JVM's becomes a broker property (KAFKA_FOO_BAR -> foo.bar; `__` is `_`, `___` is `-`),
# CLUSTER_ID formats the log directory once, KAFKA_HEAP_OPTS sizes the heap.
set -euo pipefail
[[ -n "${CLUSTER_ID:-}" ]] || { echo "entrypoint: CLUSTER_ID must be set" >&2; exit 1; }
props=/tmp/kafka/server.properties
mkdir -p /tmp/kafka
: > "$props"
while IFS='=' read -r name value; do
  case "$name" in
    KAFKA_HEAP_OPTS|KAFKA_OPTS|KAFKA_JVM_PERFORMANCE_OPTS|KAFKA_LOG4J_OPTS|KAFKA_VERSION) continue ;;
    KAFKA_*)
      key=${name#KAFKA_}; key=${key,,}
      key=${key//___/-}; key=${key//__/@}; key=${key//_/.}; key=${key//@/_}
      printf '%s=%s\n' "$key" "$value" >> "$props" ;;
  esac
done < <(env)
java=(java ${KAFKA_HEAP_OPTS:--Xmx512m} -XX:+UseSerialGC -Djava.awt.headless=true
  -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties -cp '/opt/kafka/libs/*')
# --cluster-id=: an id may start with '-' (base64url), which would read as an option.
"${java[@]}" kafka.tools.StorageTool format --cluster-id="$CLUSTER_ID" --config "$props" --ignore-formatted
exec "${java[@]}" kafka.Kafka "$props"
