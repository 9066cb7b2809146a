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
from concurrent.futures import Future, ThreadPoolExecutor
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
    cimpl,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from connectors.base import TransientSinkError, oldest_ingested_at
from dataflows import metrics, priorities
from dataflows.config import Settings
from operators.model import (
    ISO_MS_FORMAT,
    PolledRecords,
    RawBatch,
    Rows,
    arrow_columns,
    as_dicts,
)
from operators.placement import sink_part

try:  # native/, built by `make install`: `_json_values`, `record_writer`, `record_reader`
    from pipeline_native import RecordReader, RecordWriter
    from pipeline_native import json_rows as _native_json_rows
except ImportError:
    _native_json_rows = RecordReader = RecordWriter = None

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


def unless_configured(settings: Settings, tuning: dict[str, Any]) -> dict[str, Any]:
    """The entries of `tuning` whose key KAFKA_CONFIG does not set (the user's setting wins)."""
    return {k: v for k, v in tuning.items() if k not in settings.kafka_config}


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


# Consumer settings of the source partitions; a key set in KAFKA_CONFIG wins. Each partition has
# a consumer of its own, and librdkafka's default prefetch (64 MiB each) made most of the
# process's memory at start; 8 MiB is still seconds of input per partition.
SOURCE_CONSUMER_TUNING: dict[str, Any] = {"queued.max.messages.kbytes": 8192}


@dataclass(frozen=True, slots=True)
class _Poll:
    """One poll of a partition: its records, what `prepare` made of them (None for no records),
    and whether it reached the end of the partition."""

    records: PolledRecords
    prepared: Any
    ended: bool


def _read_ahead_thread() -> ThreadPoolExecutor:
    """The process's read-ahead thread (made on first use): it reads and prepares each Kafka
    partition's next poll while the worker runs the flow on the one before. One thread is enough:
    the worker takes the polls in the order it asked for them. It keeps the worker's priority
    (`dataflows.priorities`): the worker waits for it when it falls behind."""
    global _read_ahead
    with _read_ahead_lock:
        if _read_ahead is None:
            _read_ahead = ThreadPoolExecutor(
                1,
                thread_name_prefix=READ_AHEAD_THREAD,
                initializer=priorities.name_this_thread,
                initargs=(READ_AHEAD_THREAD,),
            )
        return _read_ahead


READ_AHEAD_THREAD = "read-ahead"
_read_ahead: ThreadPoolExecutor | None = None
_read_ahead_lock = threading.Lock()


class _KafkaPartition(StatefulSourcePartition[Any, int]):
    """One topic partition, read in batches; its state is the next offset to hand over.

    Each batch is `prepare(RawBatch)`. While the partition is a full poll or more behind, the
    next poll is read and prepared on the read-ahead thread as the flow runs on the one before
    (with the compiled reader; without it, every poll is read in place). A poll read ahead is not
    yet handed over: a snapshot never counts it, so a resume reads it again.

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
        prepare: Callable[[RawBatch], Any],
    ):
        self._label = f"{topic}/{partition}"
        self._batch_size = settings.pipeline_batch_size
        self._stop_at_end = stop_at_end
        self._prepare = prepare
        config = consumer_config(
            settings,
            **unless_configured(settings, SOURCE_CONSUMER_TUNING),
            **{"enable.partition.eof": stop_at_end},
        )
        self._consumer = Consumer(config)
        self._tp = TopicPartition(topic, partition)
        if resume_offset is None:
            (committed,) = until_reachable(
                lambda: self._consumer.committed([self._tp], timeout=10),
                f"committed offset of {self._label}",
            )
            resume_offset = committed.offset if committed.offset >= 0 else OFFSET_BEGINNING
        self._consumer.assign([TopicPartition(topic, partition, resume_offset)])
        self._reader = record_reader(self._consumer, config, topic, partition)
        self._ahead: Future[_Poll] | None = None
        self._next_offset = resume_offset
        self._to_commit: int | None = None
        self._ended = False
        self._idle_until = 0.0
        # The first batch is handed over even when empty: it tells the event-time gate that this
        # partition exists, so windows wait for its watermark from the start.
        self._announced = False
        self._lag_reported_at = 0.0

    def next_batch(self) -> list[Any]:
        if self._ended:
            raise StopIteration
        if self._reader is not None:
            self._serve_consumer_queue()
        ahead, self._ahead = self._ahead, None
        poll = ahead.result() if ahead is not None else self._poll()
        self._ended = poll.ended and self._stop_at_end
        if poll.records:
            self._next_offset = poll.records.last_offset() + 1
        elif self._announced:
            self._idle_until = time.monotonic() + _IDLE_POLL_S
            if self._idle_until - self._lag_reported_at >= _IDLE_LAG_REPORT_S:
                self._report_lag()
            return []
        lag = self._report_lag()
        # Read the next poll while the flow runs on this one when catching up: a full poll or more
        # behind, or a full poll read with more to come (the last part of a backlog); and before
        # the first records, which a start (a resume, a backlog) usually has waiting. Live, polls
        # are small and reading ahead would only add hand-offs.
        catching_up = lag >= self._batch_size or (lag and len(poll.records) >= self._batch_size)
        first_fetch = not poll.records and not self._announced
        if self._reader is not None and not self._ended and (first_fetch or catching_up):
            self._ahead = _read_ahead_thread().submit(self._poll)
        self._announced = True
        if poll.prepared is None:
            return [self._prepare(RawBatch(self._label, poll.records))]
        return [poll.prepared]

    def _serve_consumer_queue(self) -> None:
        """The consumer queue has everything but this partition's records and errors (client
        errors, commit results): the Consumer serves it, with its callbacks, on the worker."""
        event = self._consumer.poll(0)
        if event is not None:
            if event.error() is None:
                raise RuntimeError(
                    f"kafka source {self._label}: a record came through the consumer queue, not "
                    "the partition's own (librdkafka changed how partition queues are forwarded?)"
                )
            self._error(event.error())

    def _poll(self) -> _Poll:
        """Up to a batch of records, prepared; errors on the way are handled (`_error`)."""
        now = round(time.time() * 1000)  # the timestamp of a record without one: when it was read
        if self._reader is None:
            messages = self._consumer.consume(self._batch_size, 0.001)
            polled = [message for message in messages if message.error() is None]
            ended = False
            if len(polled) < len(messages):
                for message in messages:
                    if message.error() is not None:
                        ended |= self._error(message.error())
            stamps = [message.timestamp()[1] for message in polled]
            records = PolledRecords.of(
                self._label,
                [message.value() or b"" for message in polled],
                [message.offset() for message in polled],
                [stamp if stamp > 0 else now for stamp in stamps],
            )
        else:
            values, ends, offsets, stamps, ended, errors = self._reader.read(
                self._batch_size, 1, now
            )
            for code, reason, fatal in errors:
                self._error(KafkaError(code, reason, fatal=fatal))
            records = PolledRecords(self._label, values, ends, offsets, stamps)
        prepared = self._prepare(RawBatch(self._label, records)) if records else None
        return _Poll(records, prepared, ended)

    def _error(self, error: KafkaError) -> bool:
        """Raises a fatal error, logs the others; True for the end of the partition."""
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        if error.fatal():
            raise KafkaException(error)
        logger.warning("kafka source %s: %s", self._label, error)
        return False

    def _report_lag(self) -> int:
        """`pipeline_consumer_lag` of this partition (returned; 0 before the first fetch), from
        cached watermarks: no broker call."""
        self._lag_reported_at = time.monotonic()
        lag = self.lag()
        if lag is None:
            return 0
        metrics.get().consumer_lag(self._tp.topic, self._tp.partition, lag)
        return lag

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
        """Records between the hand-over position and the partition's high watermark, as of the
        last fetch (None before the first one). Before the first record is read from the
        beginning, the position is the low watermark."""
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
        # A poll read ahead was not handed over, so it is in no snapshot: a resume reads it again.
        if self._ahead is not None and not self._ahead.cancel():
            failed = self._ahead.exception()  # waits until the read-ahead thread is done with it
            if failed is not None:
                logger.warning("kafka source %s: reading ahead failed: %s", self._label, failed)
        self._ahead = None
        # The run is over and its last snapshot is written: that offset is safe to commit.
        if self._to_commit is not None and self._to_commit >= 0:
            tp = TopicPartition(self._tp.topic, self._tp.partition, self._to_commit)
            try:
                self._consumer.commit(offsets=[tp], asynchronous=False)
            except KafkaException as exc:
                logger.warning("kafka source %s: final offset commit failed: %s", self._label, exc)
        if self._reader is not None:
            self._reader.close()  # gives the partition queue back before the consumer goes
        self._consumer.close()


_IDLE_POLL_S = 0.05
_IDLE_LAG_REPORT_S = 1.0  # an idle partition refreshes its lag gauge at most this often


class KafkaBatchSource(FixedPartitionedSource[Any, int]):
    """`KAFKA_TOPIC_RAW` as one Bytewax partition per topic partition; each batch is
    `prepare(RawBatch)`, made on the read-ahead thread while the flow runs on the batch before
    when the partition is catching up.

    Resumes from the offsets in the recovery snapshot; without one, from the consumer group's
    committed offsets, else from the earliest record. Partitions added to the topic are picked up
    on the next start. With `stop_at_end`, each partition ends at the end of the log (for
    backfills, tests and benchmarks).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        prepare: Callable[[RawBatch], Any],
        stop_at_end: bool | None = None,
    ):
        self._settings = settings
        self._stop_at_end = settings.kafka_stop_at_end if stop_at_end is None else stop_at_end
        self._prepare = prepare

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
            self._settings, topic, int(partition), resume_state, self._stop_at_end, self._prepare
        )


# --- sink ------------------------------------------------------------------------------------
#
# Exactly-once into Kafka. Each sink partition owns one transactional producer (a stable
# `transactional.id`, so a restarted run fences its predecessor) and commits one transaction per
# epoch, in `snapshot()`. Bytewax persists the snapshot only after `snapshot()` returns, so a crash
# can land between the Kafka commit and the snapshot: the resumed run then replays an epoch whose
# output is already committed. To not write it twice, the snapshot records per topic partition an
# offset at or before everything this partition writes after it (`tail_from`, from the topic's end
# offsets; also kept in a ledger consumer group for a start without a snapshot), and a resumed
# partition first reads back what was committed after `tail_from` (`ReplayLedger`, identities
# recomputed from the record values) and skips those rows. Rows that carry a `revision` (windows,
# sessions) can be re-emitted with other totals after a replay; they are compared by content and
# re-numbered above what was committed, so revisions stay unique and increasing. The protocol is
# in docs/exactly-once.md.

# Producer settings of the stream sinks besides `compression.type` (KAFKA_COMPRESSION); a key set
# in KAFKA_CONFIG wins. The sinks register no delivery callback (a failed delivery fails the
# transaction's commit), so no delivered record reaches Python. librdkafka still hands each one
# back to be freed where the Producer is polled (`write_batch`, `_await_writer`, the commit): ~0.3
# s of the worker thread's time per 1M events in a catch-up. The writer threads cannot poll
# instead: confluent-kafka's error callback runs only on a thread inside one of its calls.
SINK_PRODUCER_TUNING: dict[str, Any] = {
    "linger.ms": 20,
    "transaction.timeout.ms": 600_000,
    "message.timeout.ms": 590_000,
    "delivery.report.only.error": True,
}
KAFKA_SINK_NAME = "kafka"  # the `sink` label of the metrics
# Frames a sink partition may have handed to the compiled writer and not yet seen produced: enough
# that the worker rarely waits for the writer's (lower-priority) thread, few enough to bound the
# memory (an enriched row holds ~1.2 KB of Arrow buffers).
WRITER_FRAMES_AHEAD = 4
ID_HEADER = "pipeline-id"  # on dead letters (`KafkaDeadLetters`): the identity to deduplicate on


@dataclass(frozen=True, eq=False)
class StreamFormat:
    """How a stream's rows become Kafka records.

    `key` and `identity` are polars expressions over a row's columns. They see the columns they
    read as text, as the record's JSON value holds them (datetimes formatted, numbers and booleans
    as JSON writes them), so a frame batch, dict rows and a record read back on resume all give
    the same result.
    """

    key: pl.Expr  # message key (compaction, partitioning); null: no key
    identity: pl.Expr  # the same output after a replay has the same identity
    revisioned: bool = False  # rows carry `revision` and are corrected by later revisions

    def keys(self, rows: Rows) -> list[bytes | None]:
        return _evaluate(self.key, rows).cast(pl.Binary).to_list()

    def identities(self, rows: Rows) -> list[str]:
        identities = _evaluate(self.identity, rows)
        if identities.null_count():
            raise ValueError(f"rows without an identity: {self.identity} is null")
        return identities.to_list()


def _evaluate(expr: pl.Expr, rows: Rows) -> pl.Series:
    names = expr.meta.root_names()
    if isinstance(rows, pl.DataFrame):
        if expr.meta.is_column() and rows.schema[names[0]] == pl.String:
            return rows.get_column(names[0]).alias("value")  # three polars calls fewer a frame
        text = _text_frame(rows.select(names)).select(pl.col(names).cast(pl.String))
    else:  # dict rows hold JSON values: the row to send, or one read back
        text = pl.DataFrame(
            [pl.Series(n, [row.get(n) for row in rows], pl.String, strict=False) for n in names]
        )
    return text.select(expr.alias("value")).to_series()


def _text_frame(rows: pl.DataFrame) -> pl.DataFrame:
    """`rows` with the values their JSON holds: datetimes formatted as `as_dicts` does, Float32
    widened to Float64 (as a Python float holds it). Unchanged if it has neither."""
    stamps = [c for c, t in rows.schema.items() if isinstance(t, pl.Datetime)]
    singles = [c for c, t in rows.schema.items() if t == pl.Float32]
    if not stamps and not singles:
        return rows
    return rows.with_columns(
        pl.col(stamps).dt.strftime(ISO_MS_FORMAT), pl.col(singles).cast(pl.Float64)
    )


# Types whose values polars writes to JSON exactly as orjson writes their Python values.
_POLARS_JSON_EXACT = frozenset(
    {pl.String, pl.Boolean, pl.Null, pl.Float64}
    | {pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64}
)


def _json_values(rows: pl.DataFrame) -> list[bytes]:
    """Each row of a frame as JSON, byte for byte `orjson.dumps` of its dict in `as_dicts(rows)`.

    The compiled encoder writes them from the frame's Arrow buffers (~1.5 µs a row for the
    enriched stream); without it, or for a column type it does not know, polars encodes the whole
    frame when every column has a type it writes as orjson does (~2.5 µs a row), and other frames
    go row by row through dicts (~10 µs).
    """
    values = _native_values(rows)
    if values is not None:
        return values
    text = _text_frame(rows)
    if all(dtype in _POLARS_JSON_EXACT for dtype in text.dtypes):
        json = pl.struct(pl.all()).struct.json_encode().cast(pl.Binary)
        return text.select(json).to_series().to_list()
    return [orjson.dumps(row) for row in text.to_dicts()]


def _native_values(rows: pl.DataFrame) -> list[bytes] | None:
    """`_json_values` by the compiled encoder (`native/`); None where it cannot write them."""
    if _native_json_rows is None:
        return None
    _arrays, columns = arrow_columns(rows, string_views=True)  # alive until written
    try:
        return _native_json_rows(rows.height, columns)
    except ValueError:  # a column type (or a datetime) it does not write
        return None


def record_reader(
    consumer: Consumer, config: dict[str, Any], topic: str, partition: int
) -> RecordReader | None:
    """The compiled reader of `topic`/`partition`, assigned to `consumer`
    (`native/src/consumer.rs`), or None without it (then records go through
    `Consumer.consume`)."""
    if RecordReader is None:
        return None
    client_id = config.get("client.id", "rdkafka")  # librdkafka's default
    try:
        return RecordReader(
            consumer, cimpl.__file__, object.__basicsize__, client_id, topic, partition
        )
    except RuntimeError as exc:
        logger.warning("kafka: records are read through Consumer.consume: %s", exc)
        return None


def record_writer(producer: Producer, config: dict[str, Any]) -> RecordWriter | None:
    """The compiled writer of frames into `producer` (`native/src/producer.rs`), or None
    without it (then records go through `Producer.produce`)."""
    if RecordWriter is None:
        return None
    client_id = config.get("client.id", "rdkafka")  # librdkafka's default
    try:
        return RecordWriter(producer, cimpl.__file__, object.__basicsize__, client_id)
    except RuntimeError as exc:
        logger.warning("kafka: records go through Producer.produce: %s", exc)
        return None


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

    @property
    def active(self) -> bool:
        """Whether any row can still be skipped or re-numbered (else every row is written)."""
        return bool(self.committed or self.floors)

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
        # This row becomes the latest revision: a later row of the identity supersedes it, so it
        # is written even when its content was committed before the crash.
        self.committed.pop(identity, None)
        floor = self.floors.get(identity)
        if floor is None:
            return row
        if row["revision"] <= floor:
            row = {**row, "revision": floor + 1}
        self.floors[identity] = row["revision"]
        return row


@dataclass(frozen=True)
class SinkState:
    # topic partition → an offset at or before everything this sink partition writes after the
    # snapshot (a partition missing: from the beginning)
    tail_from: dict[int, int]
    floors: dict[str, int]  # revision floors still in force after a replay
    # where the partition's output began (before its first write): a rewind to before that first
    # write resumes the partition from here (`python -m recovery rewind`)
    started_from: dict[int, int] | None = None


class _TransactionalPartition(StatefulSinkPartition[Rows, SinkState]):
    """One transactional producer; what is written in an epoch commits at the epoch's end.

    While the broker is unreachable, produce blocks (backpressure) and librdkafka retries; a
    transaction that cannot commit (a record that could not be delivered included) raises, so the
    run stops and resumes from its last snapshot instead of losing records.
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
        config = sink_producer_config(settings, transactional_id)
        self._producer = Producer(config)
        self._writer = record_writer(self._producer, config)
        self._producer.init_transactions(60)  # fences (and aborts) a predecessor's transaction
        self._open = False
        # Without a snapshot (a fresh store, or a crash before the first snapshot was persisted)
        # the start of the tail to read back comes from the ledger group (see `_TailMarks`).
        self._marks = _TailMarks(settings, topic, transactional_id)
        self._tail_from = dict(resume.tail_from) if resume is not None else self._marks.recall()
        self._ledger = _read_committed_tail(
            settings,
            topic,
            self._tail_from,
            fmt,
            resume.floors if resume is not None else {},
        )
        self._marked = dict(self._tail_from)  # what the ledger group holds after the next commit
        started = resume.started_from if resume is not None else None
        self._started_from = dict(started if started is not None else self._tail_from)
        self._ends = _EndOffsets(settings, topic)

    def write_batch(self, items: list[Rows]) -> None:
        if not self._open:
            self._producer.begin_transaction()
            self._open = True
        produced = 0
        for rows in items:
            stamp = oldest_ingested_at(rows)
            if stamp is not None and (self._pending_oldest is None or stamp < self._pending_oldest):
                self._pending_oldest = stamp
            produced += self._write(rows)
        self._producer.poll(0)
        self._pending_rows += produced
        metrics.get().batch_size(f"kafka_{self._stream}", produced)

    def _write(self, rows: Rows) -> int:
        """Produces the rows to write: all of them, unless a replay ledger is in force (then rows
        already committed are dropped and revisioned ones may be re-numbered). Returns how many.

        A frame is encoded column-wise (by the compiled encoder straight into the producer, if
        it can); dict rows, and frames whose revisions the ledger may change, row by row. Either
        way a value is exactly `orjson.dumps` of the row of `as_dicts(rows)`."""
        fmt, ledger = self._format, self._ledger
        if isinstance(rows, pl.DataFrame) and not (fmt.revisioned and ledger.active):
            if ledger.active:
                fresh = [row_id not in ledger.committed for row_id in fmt.identities(rows)]
                rows = rows.filter(pl.Series(fresh, dtype=pl.Boolean))
            if self._writer is not None and self._write_frame(rows):
                return rows.height
            keys, values = fmt.keys(rows), _json_values(rows)
        else:
            rows = as_dicts(rows)
            if ledger.active:
                admitted = map(ledger.admit, fmt.identities(rows), rows)
                rows = [row for row in admitted if row is not None]
            keys, values = fmt.keys(rows), [orjson.dumps(row) for row in rows]
        self._await_writer()  # frames handed to the writer go first, as they came
        self._produce(keys, values)
        return len(values)

    def _write_frame(self, rows: pl.DataFrame) -> bool:
        """Hands a frame to the compiled writer, which produces it on a thread of its own; False
        (nothing handed over) where it cannot write a column's type or a value."""
        arrays, columns = arrow_columns(rows, string_views=True)
        keys = _evaluate(self._format.key, rows).to_frame()
        key_arrays, (key_column,) = arrow_columns(keys, string_views=True)
        self._await_writer(below=WRITER_FRAMES_AHEAD)  # backpressure
        try:  # the writer holds the arrays until the frame is produced
            self._writer.submit(self._topic, rows.height, columns, key_column, (arrays, key_arrays))
        except ValueError:  # checked before it was queued
            return False
        return True

    def _await_writer(self, below: int = 1) -> None:
        """Wait until fewer than `below` frames are left to the compiled writer (1: all are
        produced); raises what the writer met."""
        if self._writer is None:
            return
        while not self._writer.wait(0.1, below):
            self._producer.poll(0)  # error reports (there are no others to serve)

    def _produce(self, keys: list[bytes | None], values: list[bytes]) -> None:
        # No delivery callback: a failed delivery fails the transaction's commit, and `tail_from`
        # comes from the topic's end offsets (see `_advance_tail`). No headers either: a header
        # per record costs about as much again as the rest of a `produce` call.
        produce, poll = self._producer.produce, self._producer.poll
        topic = self._topic
        for key, value in zip(keys, values, strict=True):
            while True:
                try:
                    produce(topic, value, key)
                    break
                except BufferError:  # local queue full: wait for the broker (backpressure)
                    poll(0.1)

    def snapshot(self) -> SinkState:
        if self._open:
            self._commit()
        else:
            self._advance_tail()
        return SinkState(dict(self._tail_from), dict(self._ledger.floors), dict(self._started_from))

    def close(self) -> None:
        self._commit()
        self._marks.close()

    def _commit(self) -> None:
        if not self._open:
            return
        self._await_writer()
        while True:
            try:
                self._producer.commit_transaction(600)  # flushes what is still queued first
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
        self._advance_tail()
        self._marked = dict(self._tail_from)
        self._report_commit()

    def _advance_tail(self) -> None:
        """Move `tail_from` up to the topic's end offsets asked for earlier, if the answer is in,
        and ask again (in the background: no round trip per commit).

        Called with no transaction open. The broker read the offsets before the answer arrived,
        so before anything this partition writes from now on: they are at or before all of it,
        which is all `tail_from` must be. An answer that is late or lost only leaves `tail_from`
        further back, and a resume reads back more."""
        ends = self._ends.answer()
        if ends is not None:
            self._tail_from.update(ends)
        self._ends.ask()

    def _report_commit(self) -> None:
        """Rows of a committed transaction are written: count them, observe their latency."""
        m = metrics.get()
        m.events_out(self._stream, KAFKA_SINK_NAME, self._pending_rows)
        if self._pending_oldest is not None:
            m.end_to_sink_latency(KAFKA_SINK_NAME, time.time() - self._pending_oldest)
        self._pending_rows, self._pending_oldest = 0, None


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


_SHARED_ADMINS: dict[bytes, AdminClient] = {}
_SHARED_ADMINS_LOCK = threading.Lock()


def shared_admin(settings: Settings) -> AdminClient:
    """One admin client per process and cluster configuration, for the sink partitions'
    background requests (every librdkafka client has threads and broker connections of its own)."""
    key = orjson.dumps(admin_config(settings), option=orjson.OPT_SORT_KEYS, default=str)
    with _SHARED_ADMINS_LOCK:
        client = _SHARED_ADMINS.get(key)
        if client is None:
            client = _SHARED_ADMINS[key] = admin(settings)
        return client


def sink_producer_config(settings: Settings, transactional_id: str) -> dict[str, Any]:
    """The transactional producer of a stream sink partition: `SINK_PRODUCER_TUNING` and
    KAFKA_COMPRESSION under whatever KAFKA_CONFIG sets."""
    tuning = unless_configured(
        settings, {**SINK_PRODUCER_TUNING, "compression.type": settings.kafka_compression}
    )
    return producer_config(settings, transactional_id=transactional_id, **tuning)


class _EndOffsets:
    """The end offsets (high watermarks) of a topic's partitions, asked for in the background."""

    def __init__(self, settings: Settings, topic: str):
        self._topic = topic
        self._client = shared_admin(settings)
        # Partitions added later are not asked for: `tail_from` lacks them, so a resume reads
        # them back from the beginning.
        self._partitions = _partitions(self._client, topic)
        self._pending: dict[TopicPartition, Future] | None = None

    def ask(self) -> None:
        """Send a request, unless one is still unanswered."""
        if self._pending is not None:
            return
        latest = OffsetSpec.latest()
        request = {TopicPartition(self._topic, p): latest for p in self._partitions}
        try:
            self._pending = self._client.list_offsets(request, request_timeout=30)
        except KafkaException as exc:
            logger.warning("kafka sink: end offsets of %s: %s", self._topic, exc)

    def answer(self) -> dict[int, int] | None:
        """The offsets of the last request once all are in (None before); each answers once."""
        pending = self._pending
        if pending is None or not all(future.done() for future in pending.values()):
            return None
        self._pending = None
        try:
            ends = {tp.partition: future.result().offset for tp, future in pending.items()}
        except KafkaException as exc:
            logger.warning("kafka sink: end offsets of %s: %s", self._topic, exc)
            return None
        return {p: offset for p, offset in ends.items() if offset >= 0}


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
    tail_from: dict[int, int],
    fmt: StreamFormat,
    floors: dict[str, int],
) -> ReplayLedger:
    """Everything committed to `topic` at or after `tail_from` (read_committed), identities
    computed from the values.

    Records of other sink partitions are read too: their identities are not ones this partition
    writes (rows go to sink partitions by source partition or shard), unless the number of sink
    partitions changed since they were written, and then skipping them is what keeps the output
    exactly once."""
    ledger = ReplayLedger(fmt.revisioned, floors=dict(floors))
    reader = consumer(
        settings,
        group_id=f"{settings.kafka_consumer_group}.sink-replay",
        **{"enable.partition.eof": True},
    )

    def record(rows: list[dict]) -> None:
        for identity, row in zip(fmt.identities(rows), rows, strict=True):
            ledger.record(identity, row)

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
        rows: list[dict] = []
        for message in read_to_end(reader, topic, starts):
            rows.append(orjson.loads(message.value()))
            if len(rows) == _READ_BACK_CHUNK:
                record(rows)
                rows = []
        record(rows)
    finally:
        reader.close()
    return ledger


_READ_BACK_CHUNK = 10_000  # records decoded at a time when reading back a tail


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

    def part_fn(self, item_key: str) -> int:
        return sink_part(item_key)  # a source partition's output stays on its worker

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
        self._format = fmt or StreamFormat(
            key=pl.col("correlation_id"), identity=pl.concat_str("stage", "source", separator="|")
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
            keys, identities = self._format.keys(records), self._format.identities(records)
            for digest, record, key, identity in zip(
                digests, records, keys, identities, strict=True
            ):
                if digest not in self._acked:
                    self._produce(digest, record, key, identity)
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

    def _produce(self, digest: bytes, record: dict, key: bytes | None, identity: str) -> None:
        self._acked[digest] = False
        try:
            self._producer.produce(
                self._topic,
                orjson.dumps(record),
                key,
                headers=[(ID_HEADER, identity.encode())],
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
