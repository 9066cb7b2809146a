"""The store sinks' dead letters into Kafka (`connectors.kafka.KafkaDeadLetters`)."""

from __future__ import annotations

import time

import orjson
import pytest
from confluent_kafka import KafkaError, TopicPartition

from connectors import kafka
from connectors.base import Rejected, TransientSinkError, rejection_records
from connectors.kafka import KafkaDeadLetters
from dataflows.config import Settings
from dataflows.outputs import KAFKA_FORMATS, kafka_dead_letters, sink_dead_letters


def sink_failed(i: int, store: str = "postgres") -> dict:
    row = {"event_id": f"ev-{i}", "source": f"events.raw/3/{1000 + i}", "correlation_id": f"corr-{i}"}
    return rejection_records(store, [Rejected(row, "bad row")])[0]


class FakeProducer:
    """Queues what is produced; `flush` delivers it only while `up` (else it stays queued)."""

    def __init__(self):
        self.produced: list[tuple] = []
        self.queue: list = []
        self.up = False
        self.error: KafkaError | None = None

    def produce(self, topic, value, key, headers, on_delivery):
        self.produced.append((topic, value, key, headers))
        self.queue.append(on_delivery)

    def flush(self, timeout):
        if self.error is not None:
            for callback in self.queue:
                callback(self.error, None)
            self.queue.clear()
        elif self.up:
            for callback in self.queue:
                callback(None, None)
            self.queue.clear()
        return len(self.queue)

    def poll(self, timeout):
        return 0


def test_a_retry_does_not_produce_what_is_in_flight_or_acknowledged():
    fake = FakeProducer()
    target = KafkaDeadLetters(
        Settings(), "dlq-topic", KAFKA_FORMATS["dlq"], flush_timeout_s=0.01, new_producer=lambda: fake
    )
    records = [sink_failed(1), sink_failed(2)]
    with pytest.raises(TransientSinkError, match="2 of 2 not acknowledged"):
        target(records)  # the broker is away: both stay queued
    with pytest.raises(TransientSinkError):
        target(records)
    assert len(fake.produced) == 2
    fake.up = True
    target(records)  # delivered now: the retry returns without producing again
    assert len(fake.produced) == 2
    topic, value, key, headers = fake.produced[0]
    assert (topic, key) == ("dlq-topic", b"corr-1")
    assert headers == [("pipeline-id", b"sink:postgres|events.raw/3/1001")]
    assert orjson.loads(value) == records[0]
    # A failed delivery is produced again on the next call.
    fake.up, fake.error = False, KafkaError(KafkaError._MSG_TIMED_OUT)
    with pytest.raises(TransientSinkError, match="timed out"):
        target([sink_failed(3)])
    fake.up, fake.error = True, None
    target([sink_failed(3)])
    assert [orjson.loads(p[1])["source"] for p in fake.produced[2:]] == ["events.raw/3/1003"] * 2


def test_the_hook_is_wired_for_kafka(tmp_path):
    settings = Settings(pipeline_sinks="local,kafka,postgres", pipeline_output_dir=tmp_path)
    assert isinstance(kafka_dead_letters(settings), KafkaDeadLetters)
    fan_out = sink_dead_letters(settings)
    assert [type(t).__name__ for t in fan_out.targets] == ["JsonLinesDeadLetters", "KafkaDeadLetters"]


def test_an_unreachable_broker_is_transient_and_nothing_is_produced_twice():
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    target = KafkaDeadLetters(settings, "nowhere", KAFKA_FORMATS["dlq"], flush_timeout_s=0.5)
    records = [sink_failed(1), sink_failed(2)]
    for _ in range(2):
        with pytest.raises(TransientSinkError, match="not acknowledged"):
            target(records)
    assert len(target._producer) == 2  # still queued once each, waiting for the broker
    target._producer.purge()
    target._producer = None  # no more connection attempts (and their logs) after the test


@pytest.mark.servers
def test_dead_letters_reach_the_topic_keyed_with_the_identity_header(unique):
    settings = Settings(kafka_topic_dlq=f"{unique}.dlq")
    kafka.ensure_topics(settings, [settings.kafka_topic_dlq])
    target = kafka_dead_letters(settings)
    records = [sink_failed(1), sink_failed(2, "s3"), sink_failed(3)]
    target(records[:2])
    target(records[2:])
    consumer = kafka.consumer(settings, group_id=f"{unique}.reader", **{"enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(settings.kafka_topic_dlq, 0, 0)])
        got = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    break
                raise AssertionError(message.error())
            got.append((message.key(), dict(message.headers()), orjson.loads(message.value())))
    finally:
        consumer.close()
    assert got == [
        (f"corr-{i}".encode(), {"pipeline-id": f"{r['stage']}|{r['source']}".encode()}, r)
        for i, r in zip((1, 2, 3), records, strict=True)
    ]
    assert got[1][1] == {"pipeline-id": b"sink:s3|events.raw/3/1002"}
