"""Baseline "naive": the same job written the obvious way on Bytewax's built-ins.

Bytewax's `KafkaSource` (one item per record), per-item `op.map` steps for JSON decode +
validation and for enrichment (`bench/baseline.py`: a plain dict check, geoip2 and ua-parser
behind `functools.lru_cache`), `op.fold_window` with an `EventClock` and a `TumblingWindower` for
each of the three window sizes (count and distinct users per tenant × event type), and Bytewax's
`KafkaSink` for the enriched events, the window rows and the rejected records.

    BENCH_BROKERS=127.0.0.1:9092 BENCH_TOPIC_IN=... BENCH_TOPIC_PREFIX=... \\
        python -m bytewax.run bench.naive_flow

Reads the input topic from the beginning to its end (`tail=False`), then stops.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, TumblingWindower, fold_window

from bench import baseline

BROKERS = os.environ.get("BENCH_BROKERS", "127.0.0.1:9092")
TOPIC_IN = os.environ.get("BENCH_TOPIC_IN", "events.raw")
PREFIX = os.environ.get("BENCH_TOPIC_PREFIX", "naive")
ALIGN = datetime(1970, 1, 1, tzinfo=UTC)


def _event_time(event: dict) -> datetime:
    return datetime.fromtimestamp(event["timestamp_ms"] / 1000, tz=UTC)


def _add(state: tuple[int, set], event: dict) -> tuple[int, set]:
    count, users = state
    if event["user_id"] is not None:
        users.add(event["user_id"])
    return count + 1, users


def _merge(a: tuple[int, set], b: tuple[int, set]) -> tuple[int, set]:
    return a[0] + b[0], a[1] | b[1]


def build() -> Dataflow:
    flow = Dataflow("naive_pipeline")
    messages = op.input("read", flow, KafkaSource([BROKERS], [TOPIC_IN], tail=False))
    checked = op.map("validate", messages, lambda m: (baseline.validate(m.value), m.timestamp[1]))
    split = op.branch("valid", checked, lambda item: item[0][0] is not None)
    enriched = op.map("enrich", split.trues, lambda item: baseline.enrich(item[0][0], item[1]))
    rejected = op.map(
        "dlq",
        split.falses,
        lambda item: KafkaSinkMessage(None, orjson.dumps({"reason": item[0][1]})),
    )
    op.output("dlq_out", rejected, KafkaSink([BROKERS], f"{PREFIX}.dlq"))
    op.output(
        "enriched_out",
        op.map("encode", enriched, lambda e: KafkaSinkMessage(e["event_id"], orjson.dumps(e))),
        KafkaSink([BROKERS], f"{PREFIX}.enriched"),
    )

    keyed = op.key_on("key", enriched, lambda e: f"{e['tenant']}|{e['type']}")
    clock = EventClock(_event_time, wait_for_system_duration=timedelta(seconds=60))
    for name, seconds in baseline.WINDOWS_S.items():
        windows = fold_window(
            f"window_{name}",
            keyed,
            clock,
            TumblingWindower(length=timedelta(seconds=seconds), align_to=ALIGN),
            lambda: (0, set()),
            _add,
            _merge,
        )

        def row(item, name=name, seconds=seconds):
            key, (window_id, (count, users)) = item
            start_ms = window_id * seconds * 1000
            value = {"key": key, "window": name, "start_ms": start_ms, "count": count,
                     "unique_users": len(users)}  # fmt: skip
            return KafkaSinkMessage(f"{key}|{name}|{start_ms}", orjson.dumps(value))

        op.output(
            f"aggregates_{name}_out",
            op.map(f"aggregate_{name}", windows.down, row),
            KafkaSink([BROKERS], f"{PREFIX}.aggregates"),
        )
    return flow


flow = build()
