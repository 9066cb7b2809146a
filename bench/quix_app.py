"""Baseline "quix": the same job on Quix Streams, run from its own virtualenv.

    .cache/bench/quix-venv/bin/python -m bench.quix_app STATS.json

(`python -m bench run` creates that virtualenv; Quix Streams is not one of the project's
dependencies.) One `Application` reads the input topic from the beginning; per record, `apply`
decodes, validates and enriches it (`bench/baseline.py`, the same code as the naive Bytewax
baseline); rejected records go to `<prefix>.dlq`, valid ones to `<prefix>.enriched`; the event time
becomes the message timestamp, the stream is re-keyed by tenant × event type (`group_by`, Quix's
repartition topic), and 1m/5m/1h tumbling windows (60 s grace, like our allowed lateness) count
events per key into `<prefix>.aggregates` when they close.

It stops once no message has arrived for `BENCH_QUIX_IDLE_S` seconds (`app.run(timeout=...)`).
STATS.json: `first_read` (first record seen by `apply`), `last_read` (last message processed by
any step, the repartition topic included), `records` (input records), `end` (when `run`
returned, idle wait included; the harness measures up to `last_read`).

Settings from the environment: BENCH_BROKERS, BENCH_TOPIC_IN, BENCH_TOPIC_PREFIX, BENCH_GROUP,
BENCH_STATE_DIR, BENCH_QUIX_IDLE_S.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from quixstreams import Application

from bench import baseline

stats = {"first_read": None, "last_read": None, "end": None, "records": 0}


def main() -> None:
    out = Path(sys.argv[1])
    prefix = os.environ["BENCH_TOPIC_PREFIX"]

    def processed(topic: str, partition: int, offset: int) -> None:
        stats["last_read"] = time.time()

    app = Application(
        broker_address=os.environ.get("BENCH_BROKERS", "127.0.0.1:9092"),
        consumer_group=os.environ["BENCH_GROUP"],
        auto_offset_reset="earliest",
        state_dir=os.environ["BENCH_STATE_DIR"],
        loglevel="WARNING",
        on_message_processed=processed,
    )
    raw = app.topic(
        os.environ["BENCH_TOPIC_IN"], value_deserializer="bytes", key_deserializer="bytes"
    )
    enriched_topic = app.topic(f"{prefix}.enriched", value_serializer="json")
    aggregates_topic = app.topic(f"{prefix}.aggregates", value_serializer="json")
    dlq_topic = app.topic(f"{prefix}.dlq", value_serializer="json")

    def process(value: bytes, key, timestamp: int, headers) -> dict:
        if stats["first_read"] is None:
            stats["first_read"] = time.time()
        stats["records"] += 1
        return baseline.process(value, timestamp)

    sdf = app.dataframe(raw)
    sdf = sdf.apply(process, metadata=True)
    sdf.filter(lambda v: "reason" in v).to_topic(dlq_topic)
    events = sdf.filter(lambda v: "reason" not in v)
    events.to_topic(enriched_topic, key=lambda v: v["event_id"])
    events = events.set_timestamp(lambda value, key, timestamp, headers: value["timestamp_ms"])
    by_key = events.group_by(lambda v: f"{v['tenant']}|{v['type']}", name="tenant_type")

    def ignore_late(*_args) -> bool:
        return False  # counted nowhere, like the naive baseline; do not log each one

    for name, seconds in baseline.WINDOWS_S.items():
        (
            by_key.tumbling_window(
                timedelta(seconds=seconds),
                grace_ms=timedelta(seconds=60),
                name=f"w{name}",
                on_late=ignore_late,
            )
            .count()
            .final()
            .apply(lambda w, name=name: {**w, "window": name})
            .to_topic(aggregates_topic)
        )

    logging.getLogger("quixstreams").setLevel(logging.WARNING)
    app.run(timeout=float(os.environ.get("BENCH_QUIX_IDLE_S", "5")), collect=False)
    stats["end"] = time.time()
    out.write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
