"""replay-dlq: DLQ records back into the input, from Kafka (servers) and from the local sink."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from confluent_kafka import KafkaError, TopicPartition

from connectors import kafka
from dataflows.config import BUNDLED_SAMPLE, Settings
from operators.model import DlqReason, RawBatch, RawRecord, dlq_record
from operators.validate import decode_batch
from recovery.__main__ import main
from recovery.dlq import raw_payload

NOW = datetime.now(UTC)


def event(n: int, **changes) -> dict:
    body = {
        "schema_urn": "urn:nc:events:web",
        "version": 1,
        "event_id": f"evt-{n}",
        "type": "pageview",
        "timestamp": "2024-05-01T08:00:00Z",
        "tenant": "acme",
    }
    return body | changes


def dlq(reason: str, payload: str, source: str, failed_at: datetime = NOW) -> dict:
    record = dlq_record(
        reason=DlqReason(reason), error="test", stage="validate", payload=payload, source=source
    )
    record["failed_at"] = failed_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return record


# --- payloads ------------------------------------------------------------------------------------


def test_an_enrichment_failed_row_is_rebuilt_into_the_same_event():
    lines = [line for line in BUNDLED_SAMPLE.read_bytes().splitlines()[:400] if line.strip()]
    batch = RawBatch("sample", [RawRecord(v, f"sample:{i}", 0.0) for i, v in enumerate(lines)])
    first = decode_batch(batch).events
    assert first.height > 300
    rebuilt = []
    for row in first.iter_rows(named=True):  # what enrich puts in an enrichment_failed payload
        payload = orjson.dumps(row, option=orjson.OPT_UTC_Z, default=str).decode()
        rebuilt.append(raw_payload({"reason": "enrichment_failed", "payload": payload}))
    again = decode_batch(
        RawBatch("replay", [RawRecord(v, f"replay:{i}", 0.0) for i, v in enumerate(rebuilt)])
    )
    assert again.dlq == []
    columns = [c for c in first.columns if c not in ("source", "ingested_at")]
    assert again.events.select(columns).equals(first.select(columns))


def test_other_payloads_are_replayed_as_they_are():
    text = '{"schema_urn": "urn:x", "broken": tru'
    assert raw_payload({"reason": "malformed_json", "payload": text}) == text.encode()
    assert raw_payload({"reason": "bad_timestamp"}) is None


# --- from the local sink's files -------------------------------------------------------------------


@pytest.fixture
def dlq_dir(tmp_path):
    old = NOW - timedelta(days=2)
    records = [
        dlq("unknown_schema", json.dumps(event(1, schema_urn="urn:new")), "in.jsonl:1"),
        dlq("bad_timestamp", json.dumps(event(2, timestamp="yesterday")), "in.jsonl:2", old),
        dlq("too_large", '{"schema_urn": "urn:nc:events:web", "x": "aaaa', "in.jsonl:3"),
        dlq("unknown_schema", json.dumps(event(4, schema_urn="urn:new")), "in.jsonl:4"),
    ]
    sink_failed = dlq("sink_failed", json.dumps({"event_id": "evt-5"}), "in.jsonl:5")
    directory = tmp_path / "dlq"
    directory.mkdir()
    (directory / "part-0.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    (directory / "sink-failed.jsonl").write_bytes(orjson.dumps(sink_failed) + b"\n")
    return directory, records


def test_replay_from_the_local_sink_into_a_file(dlq_dir, tmp_path, capsys):
    directory, records = dlq_dir
    out = tmp_path / "replay.jsonl"
    assert main(["replay-dlq", "--from-dir", str(directory), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["read"] == 5 and summary["selected"] == 5
    assert summary["replayed"] == {"unknown_schema": 2, "bad_timestamp": 1}
    assert summary["skipped"] == {"too_large": 1, "sink_failed": 1}
    expected = [r["payload"].encode() for r in records if r["reason"] != "too_large"]
    assert out.read_bytes().splitlines() == expected


def test_reason_since_limit_and_dry_run(dlq_dir, tmp_path, capsys):
    directory, records = dlq_dir
    out = tmp_path / "one.jsonl"
    since = (NOW - timedelta(days=1)).isoformat()
    args = ["replay-dlq", "--from-dir", str(directory), "--json"]
    assert main([*args, "--reason", "bad_timestamp", "--since", since, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["replayed_total"] == 0  # older than --since
    assert out.read_bytes() == b""

    assert (
        main([*args, "--reason", "unknown_schema", "--limit", "1", "--out", str(tmp_path / "l")])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["replayed"] == {"unknown_schema": 1}
    assert (tmp_path / "l").read_bytes() == records[0]["payload"].encode() + b"\n"

    assert main([*args, "--dry-run", "--out", str(tmp_path / "dry.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dry_run"] and summary["replayed_total"] == 3
    assert not (tmp_path / "dry.jsonl").exists()


def test_an_existing_output_file_is_not_overwritten(dlq_dir, tmp_path, capsys):
    out = tmp_path / "taken.jsonl"
    out.write_text("keep\n")
    with pytest.raises(FileExistsError):
        main(["replay-dlq", "--from-dir", str(dlq_dir[0]), "--out", str(out)])
    assert out.read_text() == "keep\n"


# --- from Kafka into Kafka ---------------------------------------------------------------------------


def read_all(settings: Settings, topic: str) -> list:
    consumer = kafka.consumer(settings, group_id=f"{topic}.check", **{"enable.partition.eof": True})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    messages, ended = [], set()
    while len(ended) < len(partitions):
        for message in consumer.consume(100, 1.0):
            if message.error() is not None:
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                ended.add(message.partition())
                continue
            messages.append(message)
    consumer.close()
    return messages


@pytest.mark.servers
def test_replay_from_the_dlq_topic_into_the_raw_topic(unique, monkeypatch, capsys):
    settings = Settings(
        kafka_topic_raw=f"{unique}.raw",
        kafka_topic_dlq=f"{unique}.dlq",
        kafka_consumer_group=f"{unique}.group",
    )
    raw, dead = settings.kafka_topic_raw, settings.kafka_topic_dlq
    kafka.ensure_topics(settings, [raw], partitions=2)
    kafka.ensure_topics(settings, [dead], partitions=1)
    for name, value in (
        ("KAFKA_TOPIC_RAW", raw),
        ("KAFKA_TOPIC_DLQ", dead),
        ("KAFKA_CONSUMER_GROUP", settings.kafka_consumer_group),
    ):
        monkeypatch.setenv(name, value)

    records = [
        dlq("unknown_schema", json.dumps(event(1, schema_urn="urn:new")), f"{raw}/1/7"),
        dlq("malformed_json", '{"event_id": "evt-2", "type": ', f"{raw}/0/3"),
        dlq("too_large", '{"schema_urn": "urn:nc:events:web", "x": "aaa', f"{raw}/0/4"),
        dlq("sink_failed", json.dumps({"event_id": "evt-6"}), f"{raw}/1/9"),
        dlq("bad_timestamp", json.dumps(event(5, timestamp="soon")), f"{raw}/1/8"),
        dlq("unknown_schema", json.dumps(event(7, schema_urn="urn:new")), "elsewhere/0/1"),
    ]
    # the pipeline writes the DLQ in transactions; one that aborted must not be replayed
    aborted = kafka.producer(settings, transactional_id=f"{unique}.tx")
    aborted.init_transactions(30)
    aborted.begin_transaction()
    aborted.produce(dead, orjson.dumps(dlq("unknown_schema", "never", f"{raw}/0/1")))
    aborted.flush(30)
    aborted.abort_transaction(30)
    offsets = {}
    producer = kafka.producer(settings)
    for i, record in enumerate(records):
        producer.produce(
            dead,
            orjson.dumps(record),
            on_delivery=lambda err, msg, i=i: offsets.__setitem__(i, msg.offset()),
        )
    assert producer.flush(30) == 0

    assert main(["replay-dlq", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["replayed_total"] == 4
    assert read_all(settings, raw) == []

    args = ["replay-dlq", "--from-topic", dead, "--json"]
    reasons = ["--reason", "unknown_schema", "--reason", "malformed_json", "--reason", "too_large"]
    assert main([*args, *reasons]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["read"] == len(records)  # the aborted one is not seen (read_committed)
    assert summary["selected"] == 4
    assert summary["replayed"] == {"unknown_schema": 2, "malformed_json": 1}
    assert summary["skipped"] == {"too_large": 1}

    replayed = {m.value(): m for m in read_all(settings, raw)}
    expected = {0: 1, 1: 0, 5: None}  # record index -> partition it must land in
    assert set(replayed) == {records[i]["payload"].encode() for i in expected}
    for i, partition in expected.items():
        message = replayed[records[i]["payload"].encode()]
        headers = {k: v.decode() for k, v in message.headers()}
        assert headers["replayed-from"] == f"{dead}/0/{offsets[i]}"
        assert headers["replay-reason"] == records[i]["reason"]
        assert headers["original-source"] == records[i]["source"]
        replayed_at = datetime.fromisoformat(headers["replayed-at"])
        assert abs(replayed_at - datetime.now(UTC)) < timedelta(minutes=5)
        if partition is not None:  # back to the partition it was first read from
            assert message.partition() == partition
