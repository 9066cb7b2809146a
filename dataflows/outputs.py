"""Where each output stream goes, per `PIPELINE_SINKS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Stream

from connectors.base import (
    DeadLetters,
    FanOutDeadLetters,
    JsonLinesDeadLetters,
    SinkPolicy,
    SinkWriter,
    StoreSink,
)
from connectors.files import DirectorySink, RunSummary
from connectors.kafka import KafkaDeadLetters, KafkaStreamSink, StreamFormat
from connectors.opensearch import OpenSearchSink
from connectors.postgres import PostgresSink
from connectors.redis import RedisAggregatesSink
from connectors.s3 import S3ArchiveSink
from dataflows.config import Settings
from operators.routing import error_events, timeseries_events


@dataclass(frozen=True)
class Outputs:
    """The output streams; each item is `(key, rows)`, keyed by source partition or shard."""

    enriched: Stream[tuple[str, pl.DataFrame]]
    aggregates: Stream[tuple[str, list[dict]]]
    sessions: Stream[tuple[str, pl.DataFrame]]
    late: Stream[tuple[str, pl.DataFrame]]
    dlq: Stream[tuple[str, list[dict]]]


# Kafka record key and replay identity per stream, as expressions over the row's columns (see
# `StreamFormat`); aggregates are compactable per window.
_WINDOW = pl.concat_str("tenant", "event_type", "window", "window_start", separator="|")
_SESSION = pl.concat_str("session_id", "start", separator="|")
KAFKA_FORMATS = {
    "enriched": StreamFormat(key=pl.col("event_id"), identity=pl.col("source")),
    "aggregates": StreamFormat(key=_WINDOW, identity=_WINDOW, revisioned=True),
    "sessions": StreamFormat(key=_SESSION, identity=_SESSION, revisioned=True),
    "late": StreamFormat(key=pl.col("event_id"), identity=pl.col("source")),
    "dlq": StreamFormat(
        key=pl.col("correlation_id"), identity=pl.concat_str("stage", "source", separator="|")
    ),
}


def kafka_topic(settings: Settings, stream: str) -> str:
    return getattr(settings, f"kafka_topic_{stream}")


@dataclass(frozen=True)
class StoreRoute:
    """One stream into one store: `writer(settings)` builds the store's writer (one per sink
    partition); `select` keeps the part of each batch the store takes (None: drop the batch)."""

    sink: str  # the name in PIPELINE_SINKS
    stream: str  # a field of Outputs
    writer: Callable[[Settings], SinkWriter]
    select: Callable[[pl.DataFrame], pl.DataFrame | None] | None = None
    max_batch_rows_setting: str = "sink_max_batch_rows"  # the setting that sizes its writes

    @property
    def step_id(self) -> str:
        return f"{self.sink}_{self.stream}"


STORE_ROUTES = (
    # sink          stream         writer                                     rows
    StoreRoute("postgres", "enriched", partial(PostgresSink, table="events"), timeseries_events),
    StoreRoute("postgres", "aggregates", partial(PostgresSink, table="aggregates")),
    StoreRoute("postgres", "sessions", partial(PostgresSink, table="sessions")),
    StoreRoute("opensearch", "enriched", OpenSearchSink, error_events),
    StoreRoute("redis", "aggregates", RedisAggregatesSink),
    StoreRoute("s3", "enriched", S3ArchiveSink, max_batch_rows_setting="s3_max_batch_rows"),
)

# Where rows a store permanently rejects (`sink_failed`) are written with `local` on.
SINK_FAILED_FILE = "sink-failed.jsonl"


def sink_dead_letters(settings: Settings) -> DeadLetters:
    """The DLQ of the store sinks: `<PIPELINE_OUTPUT_DIR>/dlq/sink-failed.jsonl` (appended, each
    dead letter once) with `local`, `KAFKA_TOPIC_DLQ` with `kafka`. With neither, each record is
    logged at ERROR."""
    targets: list[DeadLetters] = []
    if "local" in settings.sinks:
        targets.append(
            JsonLinesDeadLetters(settings.pipeline_output_dir / "dlq" / SINK_FAILED_FILE)
        )
    if "kafka" in settings.sinks:
        targets.append(kafka_dead_letters(settings))
    return FanOutDeadLetters(targets)


def kafka_dead_letters(settings: Settings) -> DeadLetters:
    """`sink_failed` records to `KAFKA_TOPIC_DLQ`, keyed and identified like the `dlq` stream
    (`KAFKA_FORMATS["dlq"]`: key = correlation id, header `pipeline-id` = `<stage>|<source>`).

    Returns once the broker has acknowledged every record and raises
    `connectors.base.TransientSinkError` while it cannot (the sink base then retries with
    backoff). The records are written from inside a store sink's flush with an idempotent,
    non-transactional producer, outside the Kafka stream sink's epoch transactions (see
    `connectors.kafka.KafkaDeadLetters`). The producer is created on the first record.
    """
    return KafkaDeadLetters(settings, kafka_topic(settings, "dlq"), KAFKA_FORMATS["dlq"])


def attach_sinks(outputs: Outputs, settings: Settings) -> None:
    streams = {spec.name: getattr(outputs, spec.name) for spec in fields(outputs)}
    if "local" in settings.sinks:
        summary = RunSummary(settings.pipeline_output_dir, list(streams))
        for name, stream in streams.items():
            op.output(
                f"local_{name}",
                stream,
                DirectorySink(settings.pipeline_output_dir, name, summary),
            )
    if "kafka" in settings.sinks:
        for name, stream in streams.items():
            sink = KafkaStreamSink(
                settings,
                name,
                kafka_topic(settings, name),
                KAFKA_FORMATS[name],
                parts=settings.kafka_sink_partitions,
            )
            op.output(f"kafka_{name}", stream, sink)
    attach_stores(streams, settings)


def attach_stores(streams: dict[str, Stream], settings: Settings) -> list[StoreSink]:
    """One `StoreSink` per route in `STORE_ROUTES` whose store is named in PIPELINE_SINKS."""
    routes = [route for route in STORE_ROUTES if route.sink in settings.sinks]
    if not routes:
        return []
    policy = SinkPolicy.from_settings(settings)
    dead_letters = sink_dead_letters(settings)
    sinks = []
    for route in routes:
        stream = streams[route.stream]
        if route.select is not None:
            stream = op.filter_map_value(f"{route.step_id}_rows", stream, route.select)
        sink = StoreSink(
            partial(route.writer, settings),
            stream=route.stream,
            parts=settings.pipeline_state_shards,
            policy=replace(policy, max_batch_rows=getattr(settings, route.max_batch_rows_setting)),
            dead_letters=dead_letters,
        )
        op.output(route.step_id, stream, sink)
        sinks.append(sink)
    return sinks
