"""Rewinding the Kafka source's offsets in a store written by a Kafka run, then resuming."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bytewax.recovery import RecoveryConfig
from bytewax.testing import run_main
from confluent_kafka import TopicPartition

from bench.workload import generate_items
from connectors import kafka
from connectors.files import read_json_lines
from dataflows.config import Settings
from dataflows.main import build
from recovery.__main__ import main
from recovery.rewind import rewind_to_epoch
from recovery.store import Store, init_store

pytestmark = pytest.mark.servers

PER_PARTITION = 300
BASE = datetime(2026, 1, 1, tzinfo=UTC)  # Kafka record time of offset 0; offset i is i seconds on


def run(settings: Settings, store: Path) -> None:
    run_main(
        build(settings),
        epoch_interval=timedelta(seconds=0.2),
        recovery_config=RecoveryConfig(store),
    )


def sources(out: Path, stream: str, skip: int = 0) -> list[str]:
    return [row["source"] for row in list(read_json_lines(out / stream))[skip:]]


@pytest.fixture(scope="module")
def kafka_store(tmp_path_factory):
    unique = f"rw{datetime.now(UTC).strftime('%H%M%S%f')}"
    settings = Settings(
        pipeline_input="kafka",
        pipeline_sinks="local",
        pipeline_output_dir=tmp_path_factory.mktemp("out"),
        pipeline_batch_size=50,
        kafka_consumer_group=f"{unique}.group",
        kafka_stop_at_end=True,
        kafka_topic_raw=f"{unique}.raw",
    )
    topic = settings.kafka_topic_raw
    kafka.ensure_topics(settings, [topic], partitions=2)
    items = generate_items(2 * PER_PARTITION, seed=9, span_s=1800, late_fraction=0, bad_fraction=0)
    producer = kafka.producer(settings)
    for i, item in enumerate(items):
        stamp = BASE + timedelta(seconds=i // 2)
        producer.produce(topic, item.line, partition=i % 2, timestamp=int(stamp.timestamp() * 1000))
    assert producer.flush(30) == 0
    store = tmp_path_factory.mktemp("store")
    init_store(store, 2)
    run(settings, store)
    return settings, store


def test_inspect_shows_the_end_offsets(kafka_store, capsys):
    settings, store = kafka_store
    assert main(["inspect", "--dir", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == {
        "kind": "kafka",
        "step": "event_pipeline.read",
        "offsets": {settings.kafka_topic_raw: {"0": PER_PARTITION, "1": PER_PARTITION}},
    }
    out = settings.pipeline_output_dir
    assert len(sources(out, "enriched")) == 2 * PER_PARTITION


def test_offsets_outside_the_log_are_refused(kafka_store, monkeypatch, capsys):
    settings, store = kafka_store
    monkeypatch.setenv("KAFKA_CONSUMER_GROUP", settings.kafka_consumer_group)
    topic = settings.kafka_topic_raw
    assert main(["rewind", "--dir", str(store), "--to-offsets", f"{topic}/0=9999"]) == 1
    assert "outside the records the broker holds (0..300)" in capsys.readouterr().err
    assert main(["rewind", "--dir", str(store), "--to-offsets", f"{topic}/7=0"]) == 1
    assert "has no partition 7" in capsys.readouterr().err


def test_to_time_dry_run_finds_the_offsets_and_changes_nothing(kafka_store, monkeypatch, capsys):
    settings, store = kafka_store
    monkeypatch.setenv("KAFKA_CONSUMER_GROUP", settings.kafka_consumer_group)
    at = (BASE + timedelta(seconds=100)).isoformat()
    assert main(["rewind", "--dir", str(store), "--to-time", at, "--dry-run", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    topic = settings.kafka_topic_raw
    assert [(c["partition"], c["old"], c["new"], c["reprocess"]) for c in result["changes"]] == [
        (f"{topic}/0", PER_PARTITION, 100, PER_PARTITION - 100),
        (f"{topic}/1", PER_PARTITION, 100, PER_PARTITION - 100),
    ]
    assert all(c["where"].startswith("store (epoch") for c in result["changes"])
    assert result["backup"] is None
    offsets = Store.open(store).snapshots_at(step="event_pipeline.read")
    assert [s.value() for s in offsets] == [PER_PARTITION, PER_PARTITION]


def test_rewound_offset_is_where_the_resumed_run_starts(kafka_store, tmp_path, monkeypatch, capsys):
    settings, store = kafka_store
    topic = settings.kafka_topic_raw
    out = settings.pipeline_output_dir
    before = {stream: len(sources(out, stream)) for stream in ("enriched", "late")}
    monkeypatch.setenv("KAFKA_CONSUMER_GROUP", settings.kafka_consumer_group)
    assert (
        main(
            [
                "rewind",
                "--dir",
                str(store),
                "--to-offsets",
                f"{topic}/0=250",
                "--backup-dir",
                str(tmp_path / "backup"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert f"{topic}/0: 300 → 250 in store" in text and "50 record(s) read again" in text
    assert "NOT rewound" in text
    assert (
        Store.open(tmp_path / "backup").snapshots_at(step="event_pipeline.read")[0].value() == 300
    )

    # The resumed run uses another consumer group, which has no offsets: it would read both
    # partitions from the start if the store's positions did not decide.
    other = settings.model_copy(
        update={"kafka_consumer_group": f"{settings.kafka_consumer_group}.2"}
    )
    run(other, store)

    assert sources(out, "enriched", before["enriched"]) == [
        f"{topic}/0/{offset}" for offset in range(250, PER_PARTITION)
    ]
    # the windows and the clock were not rewound: re-read events are behind the watermark
    late = sources(out, "late", before["late"])
    assert late and set(late) <= {f"{topic}/0/{o}" for o in range(250, PER_PARTITION)}
    positions = Store.open(store).snapshots_at(step="event_pipeline.read")
    assert [s.value() for s in positions] == [PER_PARTITION, PER_PARTITION]


def test_fresh_store_to_time_starts_from_the_consumer_group(
    kafka_store, tmp_path, monkeypatch, capsys
):
    settings, _ = kafka_store
    topic = settings.kafka_topic_raw
    group = f"{settings.kafka_consumer_group}.fresh"
    store = tmp_path / "fresh"
    init_store(store, 2)
    monkeypatch.setenv("KAFKA_CONSUMER_GROUP", group)
    monkeypatch.setenv("KAFKA_TOPIC_RAW", topic)
    at = (BASE + timedelta(seconds=280)).isoformat()
    assert main(["rewind", "--dir", str(store), "--to-time", at]) == 0
    text = capsys.readouterr().out
    assert f"{topic}/0: None → 280 in consumer group" in text

    probe = kafka.consumer(settings, group_id=group)
    committed = probe.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
    probe.close()
    assert [tp.offset for tp in committed] == [280, 280]

    out = tmp_path / "out"
    run(
        settings.model_copy(update={"kafka_consumer_group": group, "pipeline_output_dir": out}),
        store,
    )
    got = sorted(sources(out, "enriched"))
    assert got == sorted(f"{topic}/{p}/{o}" for p in (0, 1) for o in range(280, PER_PARTITION))
    # windows start empty in a fresh store: they hold exactly the events read again
    final: dict[tuple, dict] = {}
    for row in read_json_lines(out / "aggregates"):
        key = (row["tenant"], row["event_type"], row["window"], row["window_start"])
        if key not in final or row["revision"] > final[key]["revision"]:
            final[key] = row
    for window in ("1m", "5m", "1h"):
        assert sum(r["count"] for k, r in final.items() if k[2] == window) == len(got)


def test_epoch_rewind_writes_no_duplicates_to_the_output_topics(tmp_path):
    """All state goes back with --epoch, and the Kafka sinks skip what they committed after the
    snapshot they resume from: the output topics end up exactly as after the first run."""
    unique = f"rwe{datetime.now(UTC).strftime('%H%M%S%f')}"
    streams = ("enriched", "aggregates", "sessions", "late", "dlq")
    topics = {f"kafka_topic_{name}": f"{unique}.{name}" for name in ("raw", *streams)}
    settings = Settings(
        pipeline_input="kafka",
        pipeline_sinks="kafka",
        pipeline_batch_size=20,
        pipeline_state_shards=2,
        kafka_consumer_group=f"{unique}.group",
        kafka_stop_at_end=True,
        **topics,
    )
    kafka.ensure_topics(settings, [settings.kafka_topic_raw], partitions=2)
    kafka.ensure_topics(settings, [topics[f"kafka_topic_{s}"] for s in streams], partitions=2)
    items = generate_items(600, seed=4, span_s=1800, late_fraction=0.03, bad_fraction=0.03)
    producer = kafka.producer(settings)
    for i, item in enumerate(items):
        producer.produce(settings.kafka_topic_raw, item.line, partition=i % 2)
    assert producer.flush(30) == 0

    store = tmp_path / "store"
    init_store(store, 2)
    config = RecoveryConfig(store, backup_interval=timedelta(hours=1))
    run_main(build(settings), epoch_interval=timedelta(seconds=0.1), recovery_config=config)

    def topic_values() -> dict[str, list[bytes]]:
        out = {}
        for stream in streams:
            topic = topics[f"kafka_topic_{stream}"]
            consumer = kafka.consumer(
                settings, group_id=f"{topic}.check", **{"enable.partition.eof": True}
            )
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, 0) for p in parts])
            values, ended = [], set()
            while len(ended) < len(parts):
                for message in consumer.consume(1000, 1.0):
                    if message.error() is not None:
                        ended.add(message.partition())
                        continue
                    values.append(message.value())
            consumer.close()
            out[stream] = sorted(values)
        return out

    first = topic_values()
    assert len(first["enriched"]) > 500 and first["aggregates"] and first["dlq"]

    stored = Store.open(store)
    positions = {s.state_key: s.epoch for s in stored.snapshots_at(step="event_pipeline.read")}
    epoch = stored.oldest_rewind_epoch + (stored.resume_epoch - stored.oldest_rewind_epoch) // 2
    assert stored.oldest_rewind_epoch < epoch < stored.resume_epoch, positions
    rewound = rewind_to_epoch(store, epoch, backup=False)
    read_again = sum(
        PER_PARTITION - pos["after"] for pos in rewound["source"].values() if pos["after"]
    )
    assert read_again > 0
    # sessions close at the end of input: their sink partitions first wrote after the epoch
    assert any(".kafka_sessions " in name for name in rewound["kafka_sink_starts"])

    run_main(build(settings), epoch_interval=timedelta(seconds=0.1), recovery_config=config)
    assert topic_values() == first
