"""Where each output stream goes, per `PIPELINE_SINKS`."""

from __future__ import annotations

import atexit
from collections import Counter
from dataclasses import dataclass, fields

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Stream

from connectors.files import DirectorySink
from connectors.kafka import KafkaStreamSink
from dataflows.config import Settings


@dataclass(frozen=True)
class Outputs:
    """The output streams; each item is `(key, rows)`, keyed by source partition or shard."""

    enriched: Stream[tuple[str, pl.DataFrame]]
    aggregates: Stream[tuple[str, list[dict]]]
    sessions: Stream[tuple[str, list[dict]]]
    late: Stream[tuple[str, pl.DataFrame]]
    dlq: Stream[tuple[str, list[dict]]]


# Kafka message key per stream: aggregates are compactable per window.
KAFKA_KEYS = {
    "enriched": lambda row: row["event_id"],
    "aggregates": lambda row: (
        f"{row['tenant']}|{row['event_type']}|{row['window']}|{row['window_start']}"
    ),
    "sessions": lambda row: f"{row['session_id']}|{row['start']}",
    "late": lambda row: row["event_id"],
    "dlq": lambda row: row["correlation_id"],
}


def kafka_topic(settings: Settings, stream: str) -> str:
    return getattr(settings, f"kafka_topic_{stream}")


def attach_sinks(outputs: Outputs, settings: Settings) -> None:
    streams = {spec.name: getattr(outputs, spec.name) for spec in fields(outputs)}
    if "local" in settings.sinks:
        counts: Counter = Counter()
        for name, stream in streams.items():
            op.output(
                f"local_{name}",
                stream,
                DirectorySink(settings.pipeline_output_dir, name, counts),
            )
        atexit.register(_print_summary, counts, settings, list(streams))
    if "kafka" in settings.sinks:
        for name, stream in streams.items():
            sink = KafkaStreamSink(
                settings,
                name,
                kafka_topic(settings, name),
                KAFKA_KEYS[name],
                parts=settings.pipeline_state_shards,
            )
            op.output(f"kafka_{name}", stream, sink)


def _print_summary(counts: Counter, settings: Settings, streams: list[str]) -> None:
    root = settings.pipeline_output_dir
    lines = [f"  {name:<11} {counts[name]:>9,}  → {root / name}/" for name in streams]
    print("records written per stream:\n" + "\n".join(lines))
