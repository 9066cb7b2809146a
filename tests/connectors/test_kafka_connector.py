from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from connectors import kafka
from dataflows.config import Settings


def test_producer_config_defaults_and_overrides():
    settings = Settings(kafka_bootstrap_servers="broker:1234")
    conf = kafka.producer_config(settings, transactional_id="tx-1", **{"linger.ms": 20})
    assert conf == {
        "bootstrap.servers": "broker:1234",
        "enable.idempotence": True,
        "acks": "all",
        "transactional.id": "tx-1",
        "linger.ms": 20,
    }
    assert "transactional.id" not in kafka.producer_config(settings)


def test_consumer_config_defaults_and_overrides():
    settings = Settings(kafka_consumer_group="g1")
    conf = kafka.consumer_config(settings, **{"isolation.level": "read_uncommitted"})
    assert conf["group.id"] == "g1"
    assert conf["isolation.level"] == "read_uncommitted"
    assert conf["enable.auto.commit"] is False
    assert conf["auto.offset.reset"] == "earliest"
    assert kafka.consumer_config(settings, group_id="g2")["group.id"] == "g2"
    assert kafka.consumer_config(settings)["isolation.level"] == "read_committed"


def test_pipeline_topics_lists_every_topic_setting():
    settings = Settings()
    topic_fields = {
        name for name in Settings.model_fields if name.startswith("kafka_topic_")
    }
    assert sorted(kafka.pipeline_topics(settings)) == sorted(
        getattr(settings, name) for name in topic_fields
    )


def _drain(consumer: Consumer, topic: str, timeout_s: float = 30.0) -> list[bytes]:
    """Every value of partition 0 from the beginning up to its end (EOF), in order."""
    consumer.assign([TopicPartition(topic, 0, 0)])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                return values
            raise AssertionError(msg.error())
        values.append(msg.value())
    raise AssertionError(f"no end of partition within {timeout_s}s; got {values}")


@pytest.mark.servers
def test_transactions_read_committed_skips_aborted(settings: Settings, unique: str):
    topic = f"{unique}.tx"
    assert kafka.ensure_topics(settings, [topic], partitions=1) == [topic]
    assert kafka.ensure_topics(settings, [topic], partitions=1) == []

    producer = kafka.producer(settings, transactional_id=f"{unique}-producer")
    producer.init_transactions(30)

    producer.begin_transaction()
    producer.produce(topic, b"committed-1", key=b"k")
    producer.produce(topic, b"committed-2", key=b"k")
    producer.commit_transaction(30)

    producer.begin_transaction()
    producer.produce(topic, b"aborted-1", key=b"k")
    producer.flush(30)  # on the broker, so only the isolation level can hide it
    producer.abort_transaction(30)

    producer.begin_transaction()
    producer.produce(topic, b"committed-3", key=b"k")
    producer.commit_transaction(30)

    committed = kafka.consumer(
        settings, group_id=f"{unique}-rc", **{"enable.partition.eof": True}
    )
    uncommitted = kafka.consumer(
        settings,
        group_id=f"{unique}-ru",
        **{"enable.partition.eof": True, "isolation.level": "read_uncommitted"},
    )
    try:
        assert _drain(committed, topic) == [b"committed-1", b"committed-2", b"committed-3"]
        # The aborted record is in the log: a read_uncommitted consumer does see it.
        assert _drain(uncommitted, topic) == [
            b"committed-1",
            b"committed-2",
            b"aborted-1",
            b"committed-3",
        ]
    finally:
        committed.close()
        uncommitted.close()


@pytest.mark.servers
def test_ensure_topics_creates_requested_partitions(settings: Settings, unique: str):
    topic = f"{unique}.parts"
    assert kafka.ensure_topics(settings, [topic, topic], partitions=3) == [topic]
    metadata = kafka.admin(settings).list_topics(topic, timeout=30)
    assert sorted(metadata.topics[topic].partitions) == [0, 1, 2]
