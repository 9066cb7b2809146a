"""`rewind`: make the next run of the dataflow reprocess from an earlier point.

Two ways, with different consequences (docs/runbook.md, "Rewind and reprocess"):

* `--epoch E` moves the whole store back to the end of epoch E − 1: every snapshot of epoch E or
  later is deleted and an execution row that resumes at E is added, so source positions, event-time
  clocks, windows, sessions and sink positions all go back together. Nothing is counted twice.
  Only possible while the older snapshots still exist, i.e. within the backup interval (`-b`).
* `--to-offsets` / `--to-time` only move the Kafka source's positions (in the snapshot the next run
  loads); all other state stays as it is, so re-read events count again in windows and sessions
  (and are mostly late). A partition the store has no position for starts from the consumer
  group's committed offset, so for those the offset is committed to the group instead.

Both refuse while a process has the store open, and copy the store before changing it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from confluent_kafka import TopicPartition

from recovery.store import (
    Snapshot,
    Store,
    StoreError,
    backup_store,
    default_backup_dir,
    dump_offset,
    ensure_stopped,
    kafka_key,
    writing,
)


def parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise StoreError(f"not an ISO-8601 time: {text!r}") from exc
    if when.tzinfo is None:
        raise StoreError(f"give the time with a UTC offset (e.g. {text}Z): {text!r}")
    return when


def parse_offsets(text: str) -> dict[tuple[str, int], int]:
    """`events.raw/0=1200,events.raw/3=0` -> {("events.raw", 0): 1200, ("events.raw", 3): 0}"""
    out: dict[tuple[str, int], int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, sep, offset = item.rpartition("=")
        key = kafka_key(where) if sep else None
        if key is None or not offset.strip().isdigit():
            raise StoreError(f"expected topic/partition=offset, got {item!r}")
        if key in out:
            raise StoreError(f"{where} given twice")
        out[key] = int(offset)
    if not out:
        raise StoreError("no offsets given")
    return out


def _backup(store: Store, backup_dir: Path | None, enabled: bool) -> Path | None:
    if not enabled:
        return None
    target = backup_dir or default_backup_dir(store.directory)
    backup_store(store, target)
    return target


# --- rewind to an epoch --------------------------------------------------------------------------


def rewind_to_epoch(
    directory: Path, epoch: int, *, backup: bool = True, backup_dir: Path | None = None
) -> dict:
    ensure_stopped(directory)
    store = Store.open(directory)
    resume = store.resume_epoch
    oldest = store.oldest_rewind_epoch
    if epoch > resume:
        raise StoreError(f"epoch {epoch} is after the resume epoch {resume}; nothing to rewind")
    commit = store.commit_epoch
    if commit is not None and epoch <= commit:
        raise StoreError(
            f"cannot rewind to epoch {epoch}: the store was garbage-collected up to epoch "
            f"{commit}, so the oldest complete state is that of resume epoch {commit + 1}. "
            "Older snapshots are only kept for the backup interval "
            "(BYTEWAX_RECOVERY_BACKUP_INTERVAL / -b). To go further back, start a fresh store "
            "and use --to-time"
        )
    if epoch < oldest:
        raise StoreError(
            f"cannot rewind to epoch {epoch}: the source has no position before it for every "
            f"partition (the oldest epoch with one is {oldest}); a partition without one would "
            "start from the consumer group's offset. To start over, use a fresh store"
        )
    starts = _kafka_sink_starts(store, epoch)
    source_step = store.source_step()
    before = (
        {s.state_key: s for s in store.snapshots_at(resume, source_step)} if source_step else {}
    )
    after = {s.state_key: s for s in store.snapshots_at(epoch, source_step)} if source_step else {}
    backup_path = _backup(store, backup_dir, backup)

    deleted = 0
    last = store.last_execution
    marker_part = store.partition(last.partition) if last else store.partitions[0]
    for part in store.partitions:
        with writing(part) as conn:
            deleted += conn.execute("DELETE FROM snaps WHERE snap_epoch >= ?", (epoch,)).rowcount
            for snap, blob in starts:
                if snap.partition == part.index:
                    conn.execute(
                        "INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) "
                        "VALUES (?, ?, ?, ?)",
                        (snap.step_id, snap.state_key, epoch - 1, blob),
                    )
            if epoch != resume and part == marker_part:
                # A new execution that resumed at `epoch` and made no progress: Bytewax takes
                # the newest execution's frontier, so the next run resumes here.
                conn.execute(
                    "INSERT INTO exs (ex_num, worker_count, resume_epoch) VALUES (?, ?, ?)",
                    (store.next_execution, last.worker_count if last else 1, epoch),
                )
    check = Store.open(directory)
    if check.resume_epoch != epoch:
        raise StoreError(
            f"rewind did not take: the store now resumes at {check.resume_epoch}"
            + (f"; the original store is in {backup_path}" if backup_path else "")
        )
    return {
        "from_epoch": resume,
        "to_epoch": epoch,
        "deleted_snapshots": deleted,
        "kafka_sink_starts": sorted(f"{s.step_id} {s.state_key}" for s, _ in starts),
        "backup": str(backup_path) if backup_path else None,
        "source": {
            key: {
                "before": _position(before.get(key)),
                "after": _position(after.get(key)),
            }
            for key in sorted(set(before) | set(after))
        },
    }


def _kafka_sink_starts(store: Store, epoch: int) -> list[tuple[Snapshot, bytes]]:
    """Kafka sink partitions that first wrote at epoch `epoch` or later, with the state to give
    them at `epoch - 1`.

    Such a partition has no snapshot below `epoch`, so the resumed run would build it as new:
    its output tail starting from its ledger group's mark, well after the rewound epochs, so not
    reading back (and so writing again) what it committed in them. Its snapshots hold the tail
    position from before its first write (`started_from`); resuming it from that position makes
    it skip everything it committed since.
    """
    loaded = {(s.step_id, s.state_key) for s in store.snapshots_at(epoch)}
    out = []
    for step, keys in store.step_keys.items():
        for key, epochs in keys.items():
            later = [e for e in epochs if e >= epoch]
            if (step, key) in loaded or not later:
                continue
            first = store.snapshot(step, key, later[0])
            if first is None or first.deleted:
                continue
            try:
                value = first.value()
            except (pickle.UnpicklingError, ImportError, AttributeError):
                continue
            if type(value).__name__ == "SinkState" and hasattr(value, "tail_from"):
                began = getattr(value, "started_from", None)
                start = replace(value, tail_from=began or value.tail_from, floors={})
                out.append((first, pickle.dumps(start, protocol=4)))
    return out


def _position(snap: Snapshot | None):
    if snap is None or snap.deleted:
        return None
    value = snap.value()
    return list(value) if isinstance(value, tuple) else value


# --- rewind the Kafka source's offsets -----------------------------------------------------------


@dataclass
class OffsetChange:
    topic: str
    partition: int
    old: int | None
    new: int
    snapshot: Snapshot | None  # None: the position lives in the consumer group

    @property
    def key(self) -> str:
        return f"{self.topic}/{self.partition}"

    @property
    def where(self) -> str:
        if self.snapshot is None:
            return "consumer group"
        return f"store (epoch {self.snapshot.epoch}, partition {self.snapshot.partition})"


def store_topic(store: Store) -> str | None:
    step = store.source_step()
    topics = {kafka_key(k)[0] for k in store.step_keys.get(step, {}) if kafka_key(k)}
    return topics.pop() if len(topics) == 1 else None


def kafka_positions(store: Store) -> dict[tuple[str, int], Snapshot]:
    step = store.source_step()
    if step is None:
        return {}
    out = {}
    for snap in store.snapshots_at(store.resume_epoch, step):
        key = kafka_key(snap.state_key)
        if key is None:
            raise StoreError(
                f"the store's source ({step}) is not the Kafka source (key {snap.state_key!r}); "
                "use --epoch, or a fresh store"
            )
        if not snap.deleted:
            out[key] = snap
    return out


class KafkaView:
    """The few broker calls a rewind needs, through one consumer of the given group."""

    def __init__(self, settings, group: str):
        from connectors import kafka

        self._consumer = kafka.consumer(settings, group_id=group)

    def partitions(self, topic: str) -> list[int]:
        meta = self._consumer.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or meta.error is not None:
            raise StoreError(f"Kafka topic {topic!r}: {meta.error if meta else 'not found'}")
        return sorted(meta.partitions)

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        return self._consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)

    def offsets_for_time(self, topic: str, when: datetime) -> dict[int, int]:
        stamp = int(when.timestamp() * 1000)
        asked = [TopicPartition(topic, p, stamp) for p in self.partitions(topic)]
        out = {}
        for tp in self._consumer.offsets_for_times(asked, timeout=30):
            if tp.error is not None:
                raise StoreError(f"offsets_for_times {topic}/{tp.partition}: {tp.error}")
            # -1: no record at or after that time: start at the end of the partition
            out[tp.partition] = (
                tp.offset if tp.offset >= 0 else self.watermarks(topic, tp.partition)[1]
            )
        return out

    def committed(self, topic: str, partition: int) -> int | None:
        (tp,) = self._consumer.committed([TopicPartition(topic, partition)], timeout=30)
        return tp.offset if tp.offset >= 0 else None

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        self._consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
        )

    def close(self) -> None:
        self._consumer.close()


def plan_offsets(
    store: Store,
    wanted: dict[tuple[str, int], int],
    kafka: KafkaView | None,
) -> list[OffsetChange]:
    """Where each wanted position lives, its current value, checked against the partition."""
    positions = kafka_positions(store)
    changes = []
    for (topic, partition), offset in sorted(wanted.items()):
        snap = positions.get((topic, partition))
        old = snap.value() if snap is not None else None
        if kafka is not None:
            if partition not in kafka.partitions(topic):
                raise StoreError(f"{topic} has no partition {partition}")
            low, high = kafka.watermarks(topic, partition)
            if not low <= offset <= high:
                raise StoreError(
                    f"offset {offset} of {topic}/{partition} is outside the records the broker "
                    f"holds ({low}..{high})"
                )
            if snap is None:
                old = kafka.committed(topic, partition)
        elif snap is None:
            raise StoreError(
                f"the store holds no position for {topic}/{partition}; it starts from the "
                "consumer group's offset, which needs the broker (drop --no-verify)"
            )
        changes.append(OffsetChange(topic, partition, old, offset, snap))
    return changes


def apply_offsets(
    store: Store,
    changes: list[OffsetChange],
    kafka: KafkaView | None,
    *,
    backup: bool = True,
    backup_dir: Path | None = None,
) -> Path | None:
    resume = store.resume_epoch
    backup_path = _backup(store, backup_dir, backup)
    by_part: dict[int, list[OffsetChange]] = {}
    for change in changes:
        if change.snapshot is not None:
            by_part.setdefault(change.snapshot.partition, []).append(change)
    for part in store.partitions:
        with writing(part) as conn:
            for change in by_part.get(part.index, []):
                snap = change.snapshot
                updated = conn.execute(
                    "UPDATE snaps SET ser_change = ? "
                    "WHERE step_id = ? AND state_key = ? AND snap_epoch = ?",
                    (dump_offset(change.new), snap.step_id, snap.state_key, snap.epoch),
                ).rowcount
                if updated != 1:
                    raise StoreError(f"snapshot of {change.key} at epoch {snap.epoch} vanished")
            # Snapshots at or after the resume epoch are never loaded (a crash in mid-epoch
            # leaves them); drop them so they cannot shadow what the next run writes.
            conn.execute("DELETE FROM snaps WHERE snap_epoch >= ?", (resume,))
    in_group = {(c.topic, c.partition): c.new for c in changes if c.snapshot is None}
    if in_group:
        if kafka is None:
            raise StoreError("committing to the consumer group needs the broker")
        kafka.commit(in_group)
    return backup_path


def rewind_offsets(
    directory: Path,
    settings,
    *,
    offsets: dict[tuple[str, int], int] | None = None,
    when: datetime | None = None,
    topic: str | None = None,
    group: str | None = None,
    verify: bool = True,
    dry_run: bool = False,
    backup: bool = True,
    backup_dir: Path | None = None,
) -> dict:
    ensure_stopped(directory)
    store = Store.open(directory)
    group = group or settings.kafka_consumer_group
    kafka = KafkaView(settings, group) if verify or when is not None else None
    try:
        if when is not None:
            topic = topic or store_topic(store) or settings.kafka_topic_raw
            offsets = {(topic, p): o for p, o in kafka.offsets_for_time(topic, when).items()}
        changes = plan_offsets(store, offsets or {}, kafka)
        backup_path = None
        if not dry_run:
            backup_path = apply_offsets(store, changes, kafka, backup=backup, backup_dir=backup_dir)
    finally:
        if kafka is not None:
            kafka.close()
    return {
        "resume_epoch": store.resume_epoch,
        "group": group,
        "dry_run": dry_run,
        "backup": str(backup_path) if backup_path else None,
        "changes": [
            {
                "partition": c.key,
                "where": c.where,
                "old": c.old,
                "new": c.new,
                "reprocess": None if c.old is None else c.old - c.new,
            }
            for c in changes
        ],
    }
