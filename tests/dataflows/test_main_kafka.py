"""End to end through Kafka: events.raw (3 partitions) → dataflow → output topics + consumer group."""

from __future__ import annotations

import uuid
from collections import Counter

import orjson
import polars as pl
import pytest
from bytewax.testing import run_main
from confluent_kafka import TopicPartition

from bench.workload import generate_items
from connectors import kafka
from connectors.files import read_json_lines
from dataflows.config import Settings
from dataflows.main import build
from tests import chaos
from tests.dataflows import truth

pytestmark = pytest.mark.servers

PARTITIONS = 3
STREAMS = ("enriched", "aggregates", "sessions", "late", "dlq")


def read_topic(settings: Settings, topic: str) -> list[dict]:
    """Every committed record of a topic (read_committed), decoded."""
    return [row for _, _, row in chaos.read_topic(settings, topic)]


@pytest.fixture(scope="module")
def kafka_run(tmp_path_factory):
    unique = f"e2e{uuid.uuid4().hex[:10]}"
    topics = {f"kafka_topic_{name}": f"{unique}.{name}" for name in ("raw", *STREAMS)}
    settings = Settings(
        pipeline_input="kafka",
        pipeline_sinks="local,kafka",
        pipeline_output_dir=tmp_path_factory.mktemp("out"),
        pipeline_batch_size=500,
        kafka_consumer_group=f"{unique}.group",
        kafka_stop_at_end=True,
        **topics,
    )
    kafka.ensure_topics(settings, [settings.kafka_topic_raw], partitions=PARTITIONS)
    # output topics are not created here: the Kafka sink creates what is missing
    items = list(
        generate_items(6000, seed=5, span_s=3 * 3600, late_fraction=0.03, bad_fraction=0.02)
    )
    producer = kafka.producer(settings)
    for i, item in enumerate(items):
        producer.produce(settings.kafka_topic_raw, item.line, partition=i % PARTITIONS)
    assert producer.flush(30) == 0
    run_main(build(settings))
    return settings, items


def test_output_topics_hold_exactly_what_the_run_wrote(kafka_run):
    settings, _ = kafka_run
    for stream in STREAMS:
        local = list(read_json_lines(settings.pipeline_output_dir / stream))
        in_kafka = read_topic(settings, getattr(settings, f"kafka_topic_{stream}"))
        key = (
            (lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
            if stream != "dlq"
            else (lambda r: r["source"])
        )
        assert sorted(map(key, in_kafka)) == sorted(map(key, local)), stream


def test_results_equal_the_truth_across_partitions(kafka_run):
    settings, items = kafka_run
    out = settings.pipeline_output_dir
    events = truth.valid_events(items)
    assert truth.final_windows(list(read_json_lines(out / "aggregates"))) == truth.window_totals(
        events
    )
    assert truth.final_sessions(list(read_json_lines(out / "sessions"))) == truth.sessions(
        events, gap_ms=1_800_000
    )
    assert Counter(r["reason"] for r in read_json_lines(out / "dlq")) == truth.dlq_reasons(items)
    # lateness is per source partition, in partition order
    partition_of = {
        orjson.loads(item.line)["event_id"]: i % PARTITIONS
        for i, item in enumerate(items)
        if item.bad is None
    }
    events = events.with_columns(
        pl.col("event_id").replace_strict(partition_of, return_dtype=pl.Int64).alias("partition")
    )
    expected_late = set().union(
        *(
            truth.late_event_ids(events.filter(pl.col("partition") == p), 60_000)
            for p in range(PARTITIONS)
        )
    )
    assert {r["event_id"] for r in read_json_lines(out / "late")} == expected_late


def test_consumer_group_has_committed_every_offset(kafka_run):
    settings, items = kafka_run
    consumer = kafka.consumer(settings)
    parts = [TopicPartition(settings.kafka_topic_raw, p) for p in range(PARTITIONS)]
    committed = consumer.committed(parts, timeout=10)
    ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
    consumer.close()
    assert [tp.offset for tp in committed] == ends
    assert sum(ends) == len(items)
