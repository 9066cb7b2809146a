"""Kafka client configuration from Settings (confluent-kafka / librdkafka).

Every builder returns a plain librdkafka config dict. Extra keyword arguments are
librdkafka properties and win over the defaults; pass dotted names by unpacking a dict:
``producer_config(settings, **{"linger.ms": 20})``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.base import TransientSinkError, oldest_ingested_at
from dataflows import metrics
from dataflows.config import Settings
from operators.model import RawBatch, RawRecord, as_dicts

logger = logging.getLogger(__name__)


def base_config(settings: Settings) -> dict[str, Any]:
    """Brokers plus any librdkafka setting from `KAFKA_CONFIG` (SASL, TLS, ...)."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        **settings.kafka_config,
    }


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


# --- source ----------------------------------------------------------------------------------


class _KafkaPartition(StatefulSourcePartition[RawBatch, int]):
    """One topic partition, read in batches; its state is the next offset to read.

    Offsets are committed to the consumer group one snapshot behind: when Bytewax asks for the
    snapshot of epoch N, the snapshot of epoch N−1 has been persisted, so the committed offset
    never runs ahead of what a resume would replay. Lag tools then show the true lag.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        partition: int,
        resume_offset: int | None,
        stop_at_end: bool,
    ):
        self._label = f"{topic}/{partition}"
        self._batch_size = settings.pipeline_batch_size
        self._stop_at_end = stop_at_end
        self._consumer = consumer(settings, **{"enable.partition.eof": stop_at_end})
        self._tp = TopicPartition(topic, partition)
        if resume_offset is None:
            (committed,) = until_reachable(
                lambda: self._consumer.committed([self._tp], timeout=10),
                f"committed offset of {self._label}",
            )
            resume_offset = committed.offset if committed.offset >= 0 else OFFSET_BEGINNING
        self._consumer.assign([TopicPartition(topic, partition, resume_offset)])
        self._next_offset = resume_offset
        self._to_commit: int | None = None
        self._ended = False
        self._idle_until = 0.0
        # The first batch is handed over even when empty: it tells the event-time gate that this
        # partition exists, so windows wait for its watermark from the start.
        self._announced = False
        self._lag_reported_at = 0.0

    def next_batch(self) -> list[RawBatch]:
        if self._ended:
            raise StopIteration
        messages = self._consumer.consume(self._batch_size, 0.001)
        records = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._ended = self._stop_at_end
                    continue
                if error.fatal():
                    raise KafkaException(error)
                logger.warning("kafka source %s: %s", self._label, error)
                continue
            offset = message.offset()
            _, stamp = message.timestamp()
            records.append(
                RawRecord(
                    message.value() or b"",
                    f"{self._label}/{offset}",
                    stamp / 1000 if stamp > 0 else time.time(),
                )
            )
            self._next_offset = offset + 1
        if not records and self._announced:
            self._idle_until = time.monotonic() + _IDLE_POLL_S
            if self._idle_until - self._lag_reported_at >= _IDLE_LAG_REPORT_S:
                self._report_lag()
            return []
        self._report_lag()
        self._announced = True
        return [RawBatch(self._label, records)]

    def _report_lag(self) -> None:
        """`pipeline_consumer_lag` of this partition; from cached watermarks, no broker call."""
        self._lag_reported_at = time.monotonic()
        lag = self.lag()
        if lag is not None:
            metrics.get().consumer_lag(self._tp.topic, self._tp.partition, lag)

    def next_awake(self) -> datetime | None:
        if time.monotonic() < self._idle_until:
            return datetime.now(UTC) + timedelta(seconds=_IDLE_POLL_S)
        return None

    def snapshot(self) -> int:
        if self._to_commit is not None:
            self._commit(self._to_commit)
        self._to_commit = self._next_offset
        return self._next_offset

    def lag(self) -> int | None:
        """Records between the read position and the partition's high watermark, as of the last
        fetch (None before the first one). Before the first record is read from the beginning,
        the position is the low watermark."""
        low, high = self._consumer.get_watermark_offsets(self._tp, cached=True)
        if high < 0:
            return None
        position = self._next_offset if self._next_offset >= 0 else max(low, 0)
        return max(high - position, 0)

    def _commit(self, offset: int) -> None:
        if offset < 0:
            return
        tp = TopicPartition(self._tp.topic, self._tp.partition, offset)
        try:
            self._consumer.commit(offsets=[tp], asynchronous=True)
        except KafkaException as exc:  # the next snapshot commits a later offset anyway
            logger.warning("kafka source %s: offset commit failed: %s", self._label, exc)

    def close(self) -> None:
        # The run is over and its last snapshot is written: that offset is safe to commit.
        if self._to_commit is not None and self._to_commit >= 0:
            tp = TopicPartition(self._tp.topic, self._tp.partition, self._to_commit)
            try:
                self._consumer.commit(offsets=[tp], asynchronous=False)
            except KafkaException as exc:
                logger.warning("kafka source %s: final offset commit failed: %s", self._label, exc)
        self._consumer.close()


_IDLE_POLL_S = 0.05
_IDLE_LAG_REPORT_S = 1.0  # an idle partition refreshes its lag gauge at most this often


class KafkaBatchSource(FixedPartitionedSource[RawBatch, int]):
    """`KAFKA_TOPIC_RAW` as one Bytewax partition per topic partition.

    Resumes from the offsets in the recovery snapshot; without one, from the consumer group's
    committed offsets, else from the earliest record. Partitions added to the topic are picked up
    on the next start. With `stop_at_end`, each partition ends at the end of the log (for
    backfills, tests and benchmarks).
    """

    def __init__(self, settings: Settings, *, stop_at_end: bool | None = None):
        self._settings = settings
        self._stop_at_end = settings.kafka_stop_at_end if stop_at_end is None else stop_at_end

    def list_parts(self) -> list[str]:
        topic = self._settings.kafka_topic_raw
        try:
            partitions = _partitions(admin(self._settings), topic)
        except KafkaException as exc:
            raise RuntimeError(
                f"cannot read Kafka topic {topic!r} at {self._settings.kafka_bootstrap_servers}: "
                f"{exc.args[0].str()}"
            ) from exc
        return [f"{topic}/{p}" for p in partitions]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaPartition:
        topic, partition = for_part.rsplit("/", 1)
        return _KafkaPartition(
            self._settings, topic, int(partition), resume_state, self._stop_at_end
        )


# --- sink ------------------------------------------------------------------------------------
#
# Exactly-once into Kafka. Each sink partition owns one transactional producer (a stable
# `transactional.id`, so a restarted run fences its predecessor) and commits one transaction per
# epoch, in `snapshot()`. Bytewax persists the snapshot only after `snapshot()` returns, so a crash
# can land between the Kafka commit and the snapshot: the resumed run then replays an epoch whose
# output is already committed. To not write it twice, the snapshot records where this partition's
# committed output ends (`tail_from`; also kept in a ledger consumer group for a start without a
# snapshot), every record carries headers naming its sink partition and identity, and a resumed
# partition first reads back what it committed after `tail_from` (`ReplayLedger`) and skips those
# records. Rows that carry a `revision` (windows, sessions) can be
# re-emitted with other totals after a replay; they are compared by content and re-numbered above
# what was committed, so revisions stay unique and increasing. The protocol is in
# docs/exactly-once.md.

Rows = pl.DataFrame | list[dict]
KAFKA_SINK_NAME = "kafka"  # the `sink` label of the metrics
SINK_HEADER = "pipeline-sink"
ID_HEADER = "pipeline-id"


@dataclass(frozen=True)
class StreamFormat:
    """How a stream's rows become Kafka records."""

    key: Callable[[dict], str]  # message key (compaction, partitioning)
    identity: Callable[[dict], str]  # the same output after a replay has the same identity
    revisioned: bool = False  # rows carry `revision` and are corrected by later revisions


def _fingerprint(row: dict) -> bytes:
    return orjson.dumps(
        {k: v for k, v in row.items() if k != "revision"}, option=orjson.OPT_SORT_KEYS
    )


@dataclass
class ReplayLedger:
    """What a sink partition committed after its last persisted snapshot, to skip on replay."""

    revisioned: bool
    committed: dict[str, set[bytes]] = field(default_factory=dict)  # identity → fingerprints
    floors: dict[str, int] = field(default_factory=dict)  # identity → highest revision written

    def record(self, identity: str, row: dict | None) -> None:
        seen = self.committed.setdefault(identity, set())
        if self.revisioned and row is not None:
            seen.add(_fingerprint(row))
            self.floors[identity] = max(self.floors.get(identity, -1), row["revision"])

    def admit(self, identity: str, row: dict) -> dict | None:
        """The row to write (maybe re-numbered), or None when it is already committed."""
        seen = self.committed.get(identity)
        if not self.revisioned:
            return None if seen is not None else row
        if seen is not None and _fingerprint(row) in seen:
            return None
        floor = self.floors.get(identity)
        if floor is None:
            return row
        if row["revision"] <= floor:
            row = {**row, "revision": floor + 1}
        self.floors[identity] = row["revision"]
        return row


@dataclass(frozen=True)
class SinkState:
    tail_from: dict[int, int]  # topic partition → offset after this partition's committed output
    floors: dict[str, int]  # revision floors still in force after a replay
    # where the partition's output began (before its first write): a rewind to before that first
    # write resumes the partition from here (`python -m recovery rewind`)
    started_from: dict[int, int] | None = None


class _TransactionalPartition(StatefulSinkPartition[Rows, SinkState]):
    """One transactional producer; what is written in an epoch commits at the epoch's end.

    While the broker is unreachable, produce blocks (backpressure) and librdkafka retries; a
    transaction that cannot commit raises, so the run stops and resumes from its last snapshot
    instead of losing records.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        transactional_id: str,
        fmt: StreamFormat,
        resume: SinkState | None,
        stream: str = "",
    ):
        self._topic = topic
        self._format = fmt
        self._id = transactional_id
        self._stream = stream or topic
        # Rows produced in the open transaction and their oldest ingested_at, for the metrics
        # reported when it commits.
        self._pending_rows = 0
        self._pending_oldest: float | None = None
        self._producer = producer(
            settings,
            transactional_id=transactional_id,
            **{
                "linger.ms": 20,
                "compression.type": "lz4",
                "transaction.timeout.ms": 600_000,
                "message.timeout.ms": 590_000,
            },
        )
        self._producer.init_transactions(60)  # fences (and aborts) a predecessor's transaction
        self._delivered: dict[int, int] = {}
        self._open = False
        # Without a snapshot (a fresh store, or a crash before the first snapshot was persisted)
        # the start of the tail to read back comes from the ledger group (see `_TailMarks`).
        self._marks = _TailMarks(settings, topic, transactional_id)
        self._tail_from = dict(resume.tail_from) if resume is not None else self._marks.recall()
        self._ledger = _read_committed_tail(
            settings,
            topic,
            transactional_id,
            self._tail_from,
            fmt,
            resume.floors if resume is not None else {},
        )
        self._marked = dict(self._tail_from)  # what the ledger group holds after the next commit
        started = resume.started_from if resume is not None else None
        self._started_from = dict(started if started is not None else self._tail_from)

    def write_batch(self, items: list[Rows]) -> None:
        if not self._open:
            self._producer.begin_transaction()
            self._open = True
        identity = self._format.identity
        produced = 0
        for rows in items:
            stamp = oldest_ingested_at(rows)
            if stamp is not None and (self._pending_oldest is None or stamp < self._pending_oldest):
                self._pending_oldest = stamp
            if isinstance(rows, pl.DataFrame) and not self._format.revisioned:
                frame = _encode_frame(rows, self._format)
                if frame is not None:  # rows are written as they are, unless already committed
                    committed = self._ledger.committed
                    for key, value, row_id in frame:
                        if row_id not in committed:
                            self._produce(key, value, row_id)
                            produced += 1
                    continue
            for row in as_dicts(rows):
                row_id = identity(row)
                admitted = self._ledger.admit(row_id, row)
                if admitted is not None:
                    self._produce(self._format.key(admitted), orjson.dumps(admitted), row_id)
                    produced += 1
        self._producer.poll(0)
        self._pending_rows += produced
        metrics.get().batch_size(f"kafka_{self._stream}", produced)

    def _produce(self, key: str, value: bytes, row_id: str) -> None:
        headers = [(SINK_HEADER, self._id), (ID_HEADER, row_id)]
        while True:
            try:
                self._producer.produce(
                    self._topic,
                    value,
                    key.encode(),
                    headers=headers,
                    on_delivery=self._delivery,
                )
                return
            except BufferError:  # local queue full: wait for the broker (backpressure)
                self._producer.poll(0.1)

    def _delivery(self, error, message) -> None:
        if error is not None:
            logger.error("kafka sink %s: delivery failed: %s", self._id, error)
            raise KafkaException(error)
        partition, offset = message.partition(), message.offset()
        if offset >= self._delivered.get(partition, -1):
            self._delivered[partition] = offset

    def snapshot(self) -> SinkState:
        self._commit()
        return SinkState(dict(self._tail_from), dict(self._ledger.floors), dict(self._started_from))

    def close(self) -> None:
        self._commit()
        self._marks.close()

    def _commit(self) -> None:
        if not self._open:
            return
        self._producer.flush()
        while True:
            try:
                self._producer.commit_transaction(600)
                break
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable() or error.txn_requires_abort():
                    logger.error("kafka sink %s: commit failed: %s", self._id, error)
                    raise  # the run stops; the resume replays this epoch
                logger.warning("kafka sink %s: commit will be retried: %s", self._id, error)
                time.sleep(1)
        self._open = False
        # One commit behind, like the source's offsets: the snapshot taken with the previous
        # commit is persisted by now, so a restart without a snapshot never reads back less.
        self._marks.mark(self._marked)
        for partition, offset in self._delivered.items():
            self._tail_from[partition] = offset + 1
        self._marked = dict(self._tail_from)
        self._report_commit()

    def _report_commit(self) -> None:
        """Rows of a committed transaction are written: count them, observe their latency."""
        m = metrics.get()
        m.events_out(self._stream, KAFKA_SINK_NAME, self._pending_rows)
        if self._pending_oldest is not None:
            m.end_to_sink_latency(KAFKA_SINK_NAME, time.time() - self._pending_oldest)
        self._pending_rows, self._pending_oldest = 0, None


def _encode_frame(rows: pl.DataFrame, fmt: StreamFormat) -> list[tuple[str, bytes, str]] | None:
    """(key, value, identity) per row of a frame, the value exactly `orjson.dumps` of the row of
    `as_dicts(rows)`, built column-wise: polars writes the JSON lines, and the key and identity
    functions only see the columns they read (found on the first row, checked to give the same
    result as on the whole row). None if that check fails: the caller then goes row by row."""
    if rows.height == 0:
        return []
    stamps = [c for c, t in rows.schema.items() if isinstance(t, pl.Datetime)]
    text = rows.with_columns(pl.col(stamps).dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"))
    first = as_dicts(rows.head(1))[0]
    used = _columns_read(first, fmt.key, fmt.identity)
    if used is None:
        return None
    narrow = as_dicts(text.select(used))
    if fmt.key(narrow[0]) != fmt.key(first) or fmt.identity(narrow[0]) != fmt.identity(first):
        return None
    values = text.write_ndjson().encode().split(b"\n")
    if len(values) == rows.height + 1 and not values[-1]:
        values.pop()
    if len(values) != rows.height:  # never expected: JSON text escapes newlines
        return None
    key, identity = fmt.key, fmt.identity
    return [(key(r), v, identity(r)) for r, v in zip(narrow, values, strict=True)]


class _ReadProbe(dict):
    """A row that notes which columns are read through `[]` or `get`."""

    def __init__(self, row: dict):
        super().__init__(row)
        self.read: list[str] = []

    def __getitem__(self, name):
        self.read.append(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self.read.append(name)
        return super().get(name, default)


def _columns_read(row: dict, *functions: Callable[[dict], str]) -> list[str] | None:
    probe = _ReadProbe(row)
    try:
        for function in functions:
            function(probe)
    except Exception:  # noqa: BLE001 - the row-by-row path raises it where it belongs
        return None
    return [c for c in dict.fromkeys(probe.read) if c in row]


def until_reachable(call: Callable[[], Any], what: str, *, attempts: int | None = None) -> Any:
    """`call()`, retried every second while the cluster cannot answer (an outage blocks here,
    it does not fail the run). Errors that are not about reachability are raised at once."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal() or error.code() not in _UNREACHABLE or attempt == attempts:
                raise
            logger.warning("kafka: %s: %s (retrying)", what, error)
            time.sleep(1)


_UNREACHABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._WAIT_COORD,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.REQUEST_TIMED_OUT,
}


def _partitions(client, topic: str) -> list[int]:
    def describe():
        described = client.list_topics(topic, timeout=10).topics.get(topic)
        if described is None or described.error is not None:
            error = described.error if described is not None else None
            if error is not None and error.code() != KafkaError.LEADER_NOT_AVAILABLE:
                raise KafkaException(error)
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, f"{topic}: no metadata"))
        return sorted(described.partitions)

    return until_reachable(describe, f"metadata of {topic}")


class _TailMarks:
    """Where a sink partition's committed output ends, kept outside the recovery store.

    The offsets are committed to a consumer group of their own (`<transactional.id>.ledger`) one
    commit behind. A partition that starts without a snapshot reads back its output from there,
    which covers a crash between its first commit and its first persisted snapshot, and a new
    recovery store over topics a previous deployment wrote to (nothing is written twice). A
    partition that never committed starts from the topic's end offsets and records them at once.
    """

    def __init__(self, settings: Settings, topic: str, transactional_id: str):
        self._settings = settings
        self._topic = topic
        self._group = f"{transactional_id}.ledger"
        self._client = consumer(settings, group_id=self._group)

    def recall(self) -> dict[int, int]:
        partitions = _partitions(self._client, self._topic)
        committed = until_reachable(
            lambda: self._client.committed(
                [TopicPartition(self._topic, p) for p in partitions], timeout=10
            ),
            f"ledger offsets of {self._group}",
        )
        marks = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
        if len(marks) < len(partitions):
            ends = _end_offsets(self._settings, self._topic)
            marks = {p: marks.get(p, ends.get(p, 0)) for p in partitions}
            self.mark(marks, wait=True)
        return marks

    def mark(self, offsets: dict[int, int], *, wait: bool = False) -> None:
        """Record `offsets`; without `wait` the commit is asynchronous (a later one supersedes)."""
        tps = [TopicPartition(self._topic, p, o) for p, o in offsets.items()]
        if wait:
            until_reachable(
                lambda: self._client.commit(offsets=tps, asynchronous=False),
                f"ledger offsets of {self._group}",
            )
            return
        try:
            self._client.commit(offsets=tps, asynchronous=True)
        except KafkaException as exc:
            logger.warning("kafka sink ledger %s: %s", self._group, exc)

    def close(self) -> None:
        self._client.close()


def _end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    probe = consumer(settings, group_id=f"{settings.kafka_consumer_group}.sink-probe")
    try:
        return {
            p: until_reachable(
                lambda p=p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1],
                f"end offset of {topic}/{p}",
            )
            for p in _partitions(probe, topic)
        }
    finally:
        probe.close()


def read_to_end(
    reader: Consumer, topic: str, starts: dict[int, int], *, timeout_s: float = 0.1
) -> Iterator[Message]:
    """The records of `topic` from `starts` (partition → offset) to the end of each partition.

    `reader` must be built with `enable.partition.eof`; with the default read_committed isolation
    the end is the last committed record. Errors other than the end of a partition are raised.
    """
    reader.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
    ended: set[int] = set()
    while len(ended) < len(starts):
        for message in reader.consume(10_000, timeout_s):
            error = message.error()
            if error is None:
                yield message
            elif error.code() == KafkaError._PARTITION_EOF:
                ended.add(message.partition())
            else:
                raise KafkaException(error)


def _read_committed_tail(
    settings: Settings,
    topic: str,
    transactional_id: str,
    tail_from: dict[int, int],
    fmt: StreamFormat,
    floors: dict[str, int],
) -> ReplayLedger:
    """Everything this sink partition committed at or after `tail_from` (read_committed)."""
    ledger = ReplayLedger(fmt.revisioned, floors=dict(floors))
    reader = consumer(
        settings,
        group_id=f"{settings.kafka_consumer_group}.sink-replay",
        **{"enable.partition.eof": True},
    )
    try:
        starts = {}
        for p in _partitions(reader, topic):
            start = tail_from.get(p, OFFSET_BEGINNING)
            end = until_reachable(
                lambda p=p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1],
                f"end offset of {topic}/{p}",
            )
            if start == OFFSET_BEGINNING or end > start:  # something was written after the mark
                starts[p] = start
        if not starts:
            return ledger
        for message in read_to_end(reader, topic, starts):
            headers = dict(message.headers() or ())
            if headers.get(SINK_HEADER, b"").decode() != transactional_id:
                continue
            row = orjson.loads(message.value()) if fmt.revisioned else None
            ledger.record(headers[ID_HEADER].decode(), row)
    finally:
        reader.close()
    return ledger


class KafkaStreamSink(FixedPartitionedSink[Rows, SinkState]):
    """A pipeline stream into a Kafka topic, exactly once: one transaction per epoch per part."""

    def __init__(self, settings: Settings, stream: str, topic: str, fmt: StreamFormat, parts: int):
        self._settings = settings
        self._stream = stream
        self._topic = topic
        self._format = fmt
        self._parts = parts

    def list_parts(self) -> list[str]:
        # An output topic that does not exist yet is created with the broker's defaults.
        until_reachable(
            lambda: ensure_topics(self._settings, [self._topic], -1, replication_factor=-1),
            f"create {self._topic}",
        )
        return [f"{self._stream}-{i}" for i in range(self._parts)]

    def build_part(self, step_id: str, for_part: str, resume_state: SinkState | None):
        transactional_id = f"{self._settings.kafka_consumer_group}.{for_part}"
        metrics.get().events_out(self._stream, KAFKA_SINK_NAME, 0)
        return _TransactionalPartition(
            self._settings,
            self._topic,
            transactional_id,
            self._format,
            resume_state,
            stream=self._stream,
        )


# --- dead letters of the store sinks ---------------------------------------------------------


class KafkaDeadLetters:
    """The store sinks' `sink_failed` records → `topic` (`KAFKA_TOPIC_DLQ`).

    Called from inside a store sink's flush, outside the stream sinks' epoch transactions, so it
    has its own non-transactional, idempotent producer (`enable.idempotence`, acks=all: a record
    librdkafka retries is not stored twice). Each record is keyed like the `dlq` stream
    (`fmt.key`: the correlation id) and carries the header `pipeline-id` (`fmt.identity`:
    `<stage>|<source>`), the identity a consumer deduplicates on.

    A call returns once the broker has acknowledged every record of it (it flushes), and raises
    `connectors.base.TransientSinkError` while it cannot: broker unreachable, local queue full, a
    failed delivery. The sink base then calls again with the same records; records of the failed
    call still in flight or already acknowledged are not produced again, so a retry adds no
    duplicate. Messages never time out locally (`message.timeout.ms=0`): they wait in librdkafka's
    queue for as long as the broker is away. A replay after a crash hands the same rejected rows
    over again (the DLQ is written before the epoch commits); those records carry the same
    `pipeline-id`.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str | None = None,
        fmt: StreamFormat | None = None,
        *,
        flush_timeout_s: float = 10.0,
        new_producer: Callable[[], Producer] | None = None,
    ):
        self._topic = topic or settings.kafka_topic_dlq
        self._key = fmt.key if fmt is not None else (lambda row: row.get("correlation_id"))
        self._identity = (
            fmt.identity if fmt is not None else (lambda row: f"{row['stage']}|{row['source']}")
        )
        self._flush_timeout_s = flush_timeout_s
        self._new_producer = new_producer or (
            lambda: producer(settings, **{"linger.ms": 5, "message.timeout.ms": 0})
        )
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._acked: dict[bytes, bool] = {}  # record digest → acknowledged (False: in flight)
        self._last_error: str | None = None

    def __call__(self, records: list[dict]) -> None:
        with self._lock:
            self._last_error = None
            if self._producer is None:
                try:
                    self._producer = self._new_producer()
                except KafkaException as exc:
                    raise TransientSinkError(f"dead letters to {self._topic}: {exc}") from exc
            digests = [orjson.dumps(r, option=orjson.OPT_SORT_KEYS, default=str) for r in records]
            for digest, record in zip(digests, records, strict=True):
                if digest not in self._acked:
                    self._produce(digest, record)
            self._producer.flush(self._flush_timeout_s)
            waiting = sum(1 for d in set(digests) if not self._acked.get(d))
            if waiting:
                raise TransientSinkError(
                    f"dead letters to {self._topic}: {waiting} of {len(set(digests))} not "
                    f"acknowledged within {self._flush_timeout_s:g}s"
                    + (f" ({self._last_error})" if self._last_error else "")
                )
            for digest in digests:
                self._acked.pop(digest, None)

    def _produce(self, digest: bytes, record: dict) -> None:
        key = self._key(record)
        self._acked[digest] = False
        try:
            self._producer.produce(
                self._topic,
                orjson.dumps(record),
                None if key is None else str(key).encode(),
                headers=[(ID_HEADER, self._identity(record).encode())],
                on_delivery=lambda error, _message: self._delivered(digest, error),
            )
        except BufferError as exc:  # the local queue is full: the broker is far behind
            del self._acked[digest]
            self._producer.poll(1.0)
            raise TransientSinkError(f"dead letters to {self._topic}: {exc}") from exc
        except KafkaException as exc:
            del self._acked[digest]
            if exc.args and exc.args[0].fatal():
                self._reset()
            raise TransientSinkError(f"dead letters to {self._topic}: {exc}") from exc

    def _delivered(self, digest: bytes, error: KafkaError | None) -> None:
        if error is None:
            if digest in self._acked:
                self._acked[digest] = True
            return
        self._last_error = error.str()
        self._acked.pop(digest, None)  # produced again on the next call
        if error.fatal():
            self._reset()

    def _reset(self) -> None:
        """A fatal producer error: start over with a new producer (the records in flight are
        produced again, so a broker may then hold one of them twice)."""
        self._producer = None
        self._acked = {d: True for d, acked in self._acked.items() if acked}
