"""Kafka client configuration from Settings (confluent-kafka / librdkafka).

Every builder returns a plain librdkafka config dict. Extra keyword arguments are
librdkafka properties and win over the defaults; pass dotted names by unpacking a dict:
``producer_config(settings, **{"linger.ms": 20})``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from dataflows.config import Settings


def base_config(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.kafka_bootstrap_servers}


def producer_config(
    settings: Settings, *, transactional_id: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Idempotent producer (acks=all); transactional when `transactional_id` is given."""
    conf: dict[str, Any] = {
        **base_config(settings),
        "enable.idempotence": True,
        "acks": "all",
    }
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
    conf.update(overrides)
    return conf


def consumer_config(
    settings: Settings, *, group_id: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Consumer that sees only committed transactions and never commits offsets on its own.

    The group defaults to `settings.kafka_consumer_group`; a group with no committed offset
    starts from the earliest record.
    """
    conf: dict[str, Any] = {
        **base_config(settings),
        "group.id": group_id or settings.kafka_consumer_group,
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }
    conf.update(overrides)
    return conf


def admin_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return {**base_config(settings), **overrides}


def producer(settings: Settings, **kwargs: Any) -> Producer:
    return Producer(producer_config(settings, **kwargs))


def consumer(settings: Settings, **kwargs: Any) -> Consumer:
    return Consumer(consumer_config(settings, **kwargs))


def admin(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient(admin_config(settings, **overrides))


def pipeline_topics(settings: Settings) -> list[str]:
    """Every topic the pipeline reads or writes."""
    return [
        settings.kafka_topic_raw,
        settings.kafka_topic_enriched,
        settings.kafka_topic_aggregates,
        settings.kafka_topic_sessions,
        settings.kafka_topic_late,
        settings.kafka_topic_dlq,
    ]


def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    Existing topics are left as they are (their partition count is not changed).
    """
    names = list(dict.fromkeys(names))
    if not names:
        return []
    client = admin(settings)  # must outlive the futures
    futures = client.create_topics(
        [NewTopic(n, partitions, replication_factor) for n in names],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created
