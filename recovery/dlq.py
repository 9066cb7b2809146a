"""`replay-dlq`: put dead-lettered records back into the input, with their provenance.

A DLQ record's `payload` is the original record text for every validation reason, so replaying
it means producing that text to `KAFKA_TOPIC_RAW` again (or writing it to a JSON Lines file the
pipeline can read with `PIPELINE_INPUT=file:...`). Exceptions:

* `too_large`: only the first 4 KiB were kept; cannot be replayed (skipped, counted).
* `sink_failed`: the event was processed and counted; the payload is the row a store refused,
  not a raw record. Replaying it into the input would count the event twice (skipped, counted).
* `enrichment_failed`: the payload is the validated event row; the raw event is rebuilt from it
  (the contract's fields, `properties` and `error` as objects), which validates to the same row.

Records produced to Kafka carry headers `replayed-from` (`<dlq topic>/<partition>/<offset>` or
`<file>:<line>`), `replay-reason`, `replayed-at` and `original-source`. The producer is
idempotent (no duplicates from its own retries), but a second replay of the same DLQ records
produces them again: scope each replay with `--since`, `--reason` and `--limit`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from recovery.store import StoreError

SKIP_REASONS = {
    "too_large": "only a 4 KiB sample of the record was kept",
    "sink_failed": "already processed; the payload is a store row, not a raw record",
}
REBUILT_REASONS = {"enrichment_failed"}

# The raw event's fields in contract order (operators/contracts/urn_nc_events_web.v1.json).
_EVENT_FIELDS = (
    "schema_urn",
    "version",
    "event_id",
    "type",
    "timestamp",
    "tenant",
    "user_id",
    "session_id",
    "ip",
    "user_agent",
    "url",
    "correlation_id",
)


@dataclass(frozen=True)
class DlqEntry:
    record: dict
    origin: str  # where the DLQ record itself is: topic/partition/offset or file:line


@dataclass
class Summary:
    read: int = 0
    selected: int = 0
    replayed: Counter = field(default_factory=Counter)
    rebuilt: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: str | None = None
    last: str | None = None
    target: str = ""
    dry_run: bool = False

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "selected": self.selected,
            "replayed": dict(self.replayed.most_common()),
            "replayed_total": sum(self.replayed.values()),
            "rebuilt_from_rows": self.rebuilt,
            "skipped": dict(self.skipped.most_common()),
            "skipped_total": sum(self.skipped.values()),
            "first": self.first,
            "last": self.last,
            "target": self.target,
            "dry_run": self.dry_run,
        }

    def text(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        lines = [
            f"read {self.read} DLQ record(s), selected {self.selected}",
            f"{verb} {sum(self.replayed.values())} into {self.target}"
            + (":" if self.replayed else ""),
        ]
        lines += [f"  {reason:<20} {n:>8}" for reason, n in self.replayed.most_common()]
        if self.rebuilt:
            lines.append(f"  ({self.rebuilt} enrichment_failed record(s) rebuilt from their row)")
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())}:")
            lines += [
                f"  {reason:<20} {n:>8}  ({SKIP_REASONS.get(reason, 'no payload')})"
                for reason, n in self.skipped.most_common()
            ]
        if self.first:
            lines.append(f"DLQ records {self.first} .. {self.last}")
        return "\n".join(lines)


# --- reading -------------------------------------------------------------------------------------


def _failed_at(record: dict) -> datetime | None:
    text = record.get("failed_at")
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def read_topic(settings, topic: str, since: datetime | None = None) -> Iterator[DlqEntry]:
    """Every committed record of the DLQ topic (from `since`, by record time) up to its end."""
    from connectors import kafka

    consumer = kafka.consumer(
        settings,
        group_id=f"{settings.kafka_consumer_group}.dlq-replay",
        **{"enable.partition.eof": True},
    )
    try:
        meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or meta.error is not None:
            raise StoreError(f"Kafka topic {topic!r}: {meta.error if meta else 'not found'}")
        partitions = sorted(meta.partitions)
        starts = {p: OFFSET_BEGINNING for p in partitions}
        if since is not None:
            stamp = int(since.timestamp() * 1000)
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, stamp) for p in partitions], timeout=30
            )
            for tp in found:
                starts[tp.partition] = (
                    tp.offset
                    if tp.offset >= 0
                    else consumer.get_watermark_offsets(tp, timeout=30)[1]
                )
        for message in kafka.read_to_end(consumer, topic, starts, timeout_s=1.0):
            origin = f"{topic}/{message.partition()}/{message.offset()}"
            try:
                record = orjson.loads(message.value())
            except orjson.JSONDecodeError:
                record = {"reason": "unreadable", "payload": None}
            yield DlqEntry(record if isinstance(record, dict) else {}, origin)
    finally:
        consumer.close()


def read_files(path: Path) -> Iterator[DlqEntry]:
    """DLQ records from the local sink: a file, or every `*.jsonl` file of a directory."""
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
    if not files:
        raise StoreError(f"no DLQ files (*.jsonl) at {path}")
    for file in files:
        with file.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    record = {"reason": "unreadable", "payload": None}
                yield DlqEntry(record if isinstance(record, dict) else {}, f"{file}:{number}")


# --- what to replay ------------------------------------------------------------------------------


def rebuild_event(row: dict) -> dict:
    """The raw event of a validated row (the `enrichment_failed` payload)."""
    event = {name: row[name] for name in _EVENT_FIELDS if row.get(name) is not None}
    properties = row.get("properties")
    if properties is not None:
        event["properties"] = (
            orjson.loads(properties) if isinstance(properties, str) else properties
        )
    error = {
        k: row[f"error_{k}"] for k in ("message", "stack") if row.get(f"error_{k}") is not None
    }
    if error:
        event["error"] = error
    return event


def raw_payload(record: dict) -> bytes | None:
    payload = record.get("payload")
    if not isinstance(payload, str):
        return None
    if record.get("reason") in REBUILT_REASONS:
        try:
            row = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload.encode()
        return orjson.dumps(rebuild_event(row)) if isinstance(row, dict) else payload.encode()
    return payload.encode()


def select(
    entries: Iterable[DlqEntry],
    reasons: set[str] | None,
    since: datetime | None,
    summary: Summary,
) -> Iterator[tuple[DlqEntry, bytes]]:
    for entry in entries:
        summary.read += 1
        reason = str(entry.record.get("reason", "unknown"))
        if reasons and reason not in reasons:
            continue
        if since is not None:
            failed = _failed_at(entry.record)
            if failed is not None and failed < since:
                continue
        summary.selected += 1
        if reason in SKIP_REASONS:
            summary.skipped[reason] += 1
            continue
        payload = raw_payload(entry.record)
        if payload is None:
            summary.skipped["no_payload"] += 1
            continue
        yield entry, payload


# --- where to --------------------------------------------------------------------------------------


class KafkaTarget:
    """The input topic, through an idempotent producer; a record goes back to the partition
    it was first read from when that is a partition of this topic."""

    def __init__(self, settings, topic: str):
        from connectors import kafka

        self.topic = topic
        self._producer = kafka.producer(settings, **{"linger.ms": 20})
        meta = self._producer.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or meta.error is not None:
            raise StoreError(f"Kafka topic {topic!r}: {meta.error if meta else 'not found'}")
        self._partitions = set(meta.partitions)
        self._errors: list[str] = []

    def _partition(self, source: object) -> int | None:
        """`events.raw/3/1288` -> 3 when the record came from partition 3 of this topic."""
        if not isinstance(source, str):
            return None
        parts = source.rsplit("/", 2)
        if len(parts) == 3 and parts[0] == self.topic and parts[1].isdigit():
            partition = int(parts[1])
            return partition if partition in self._partitions else None
        return None

    def _delivered(self, error, message) -> None:
        if error is not None:
            self._errors.append(str(error))

    def write(self, entry: DlqEntry, payload: bytes, replayed_at: str) -> None:
        record = entry.record
        headers = [
            ("replayed-from", entry.origin.encode()),
            ("replay-reason", str(record.get("reason", "")).encode()),
            ("replayed-at", replayed_at.encode()),
            ("original-source", str(record.get("source", "")).encode()),
        ]
        partition = self._partition(record.get("source"))
        kwargs = {"partition": partition} if partition is not None else {}
        while True:
            try:
                self._producer.produce(
                    self.topic, payload, headers=headers, on_delivery=self._delivered, **kwargs
                )
                break
            except BufferError:
                self._producer.poll(0.1)
        self._producer.poll(0)

    def close(self) -> None:
        remaining = self._producer.flush(60)
        if remaining:
            raise StoreError(f"{remaining} replayed record(s) not acknowledged by the broker")
        if self._errors:
            raise StoreError(f"{len(self._errors)} replayed record(s) failed: {self._errors[0]}")


class FileTarget:
    """A JSON Lines file of raw records, for `PIPELINE_INPUT=file:<path>`."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("xb")

    def write(self, entry: DlqEntry, payload: bytes, replayed_at: str) -> None:
        # A JSON text holds line breaks only between tokens, where a space means the same.
        self._handle.write(payload.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n")

    def close(self) -> None:
        self._handle.close()


def replay(
    entries: Iterable[DlqEntry],
    target: KafkaTarget | FileTarget | None,
    *,
    target_name: str,
    reasons: set[str] | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> Summary:
    """Replay the selected records into `target` (None: dry run, count only)."""
    summary = Summary(target=target_name, dry_run=target is None)
    replayed_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    try:
        for entry, payload in select(entries, reasons, since, summary):
            if limit is not None and sum(summary.replayed.values()) >= limit:
                break
            reason = str(entry.record.get("reason", "unknown"))
            if target is not None:
                target.write(entry, payload, replayed_at)
            summary.replayed[reason] += 1
            summary.rebuilt += reason in REBUILT_REASONS
            summary.first = summary.first or entry.origin
            summary.last = entry.origin
    finally:
        if target is not None:
            target.close()
    return summary
