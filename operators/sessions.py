"""Sessions by `session_id`: a session closes after `gap` of event-time inactivity.

The event-time gate hands each shard the session events of a batch (`session_partials`); the
shard's `SessionState` keeps a `SessionTable` of its sessions by id. The table merges what comes
within `gap` of a session and emits a session once the shard's watermark passes `end + gap`. The
open state of a session is freed when it closes; a compact closed record is kept for
`retention_ms` so that a late event can still correct it (re-emitted with `revision + 1`), then
that is freed too.

Two implementations of the same table: the compiled one (`native/`, `pipeline_native`), which
takes a shard's events as columns and cuts them into per-session segments itself, and the Python
one here, the specification it is tested against, which takes segments cut with polars. The
compiled one is used where it is installed (validation logs its absence); snapshots are the same
either way.

A session's identity for downstream stores is `(session_id, start)`.
"""

from __future__ import annotations

import heapq
import sys
from array import array
from dataclasses import astuple, dataclass, field
from itertools import chain, islice
from operator import attrgetter, itemgetter
from typing import Any, ClassVar

import polars as pl
import pyarrow as pa

from operators.event_time import END_WATERMARK
from operators.model import frame_of_buffers
from operators.sharding import ShardClock, events_by_shard, rows_by_shard
from operators.snapshot_log import SnapshotLog, load_chunk
from operators.windows import iso_ms

try:  # the compiled table (native/, built by `make install`)
    import pipeline_native as compiled
except ImportError:
    compiled = None
if not hasattr(compiled, "SessionTable"):  # not built, or built before it had one
    compiled = None

# The rows a shard emits, one per closed (or corrected) session; start and end as ISO text with
# milliseconds, as every output writes times.
SESSION_SCHEMA: dict[str, pl.DataType] = {
    "tenant": pl.String(),
    "user_id": pl.String(),
    "session_id": pl.String(),
    "start": pl.String(),
    "end": pl.String(),
    "duration_s": pl.Float64(),
    "event_count": pl.Int64(),
    "revision": pl.Int64(),
}
# ... in the Arrow types of the compiled table's columns (`session_columns` in native/)
_SESSION_ARROW = {
    **dict.fromkeys(["tenant", "user_id", "session_id", "start", "end"], pa.large_string()),
    "duration_s": pa.float64(),
    "event_count": pa.int64(),
    "revision": pa.int64(),
}

# A segment as snapshots and `SessionTable.load` hold it: (tenant, user_id, start, end, count,
# revision, dirty).
SegmentTuple = tuple[str, str | None, int, int, int, int, bool]
_END = 3  # of a SegmentTuple


def session_partials(events: pl.DataFrame, gap_ms: int, shards: int) -> dict[int, Any]:
    """A batch's session events per shard, as the shard's table takes them: `ShardEvents`
    (compiled) or segments (`python_session_partials`)."""
    if compiled is None:
        return python_session_partials(events, gap_ms, shards)
    return events_by_shard(
        compiled.session_events, events, ("session_id", "tenant", "user_id"), shards
    )


def python_session_partials(
    events: pl.DataFrame, gap_ms: int, shards: int
) -> dict[int, list[tuple]]:
    """Per-shard session segments of one batch: rows `(session_id, tenant, user_id, start, end,
    count)`; a segment is a run of a session's events, in time order, no more than `gap` apart."""
    session_id, ts, user_id = pl.col("session_id"), pl.col("ts"), pl.col("user_id")
    ordered = (
        events.select(
            "session_id", "tenant", "user_id", pl.col("timestamp").dt.epoch("ms").alias("ts")
        )
        .filter(session_id.is_not_null())
        # Rows of a session together, in time order: by hash, which sorts much faster than the
        # strings. Stable, so of events at the same time the first in the batch comes first.
        .sort(session_id.hash(), ts, maintain_order=True)
    )
    if ordered.height == 0:
        return {}
    # A segment is a run of rows: found by comparing each row with the one before (no group_by).
    row = pl.int_range(pl.len(), dtype=pl.UInt32)
    marked = ordered.with_columns(
        ((session_id != session_id.shift(1)) | (ts.diff() > gap_ms)).fill_null(True).alias("first"),
        row.alias("row"),
        # the first non-null user id at or after each row, and the row it is on
        user_id.backward_fill().alias("next_user"),
        pl.when(user_id.is_not_null()).then(row).backward_fill().alias("next_user_row"),
    ).with_columns(pl.col("first").shift(-1, fill_value=True).alias("last"))
    first, last = pl.col("first"), pl.col("last")
    last_row = pl.col("row").filter(last)
    segments = marked.select(
        session_id.filter(first),
        pl.col("tenant").filter(first),
        pl.when(pl.col("next_user_row").filter(first) <= last_row)
        .then(pl.col("next_user").filter(first))
        .alias("user_id"),
        ts.filter(first).alias("start"),
        ts.filter(last).alias("end"),
        (last_row - pl.col("row").filter(first) + 1).alias("count"),
    )
    return rows_by_shard(segments, segments["session_id"], shards)


@dataclass(slots=True)
class Session:
    tenant: str
    user_id: str | None
    start: int
    end: int
    count: int
    revision: int = -1  # -1: not emitted yet
    dirty: bool = True  # changed since it was last emitted


def _decode_groups(chunk: dict) -> tuple[list[str], list[list[SegmentTuple]]]:
    """The session ids of a chunk and their segments; chunks of either table."""
    if chunk.get("layout") == "packed":  # written by the compiled table
        session_ids = _unpack_texts(chunk["session_ids"], chunk["session_id_lengths"])
        columns = (
            _unpack_texts(chunk["tenants"], chunk["tenant_lengths"]),
            _unpack_texts(chunk["user_ids"], chunk["user_id_lengths"]),
            *(_unpack_ints("q", chunk[name]) for name in ("start", "end", "count", "revision")),
            [flag != 0 for flag in chunk["dirty"]],
        )
        per_id = _unpack_ints("I", chunk["segments_per_id"])
    else:  # lists, as the Python table writes them
        session_ids, columns = chunk["session_ids"], chunk["segments"].values()
        per_id = chunk["segments_per_id"]
    segments = iter(zip(*columns, strict=True))
    return session_ids, [list(islice(segments, n)) for n in per_id]


def _unpack_ints(typecode: str, data: bytes) -> list[int]:
    values = array(typecode, data)  # little-endian in the chunk
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _unpack_texts(data: bytes, lengths: bytes) -> list[str | None]:
    """Texts one after the other with their lengths (-1: None)."""
    texts: list[str | None] = []
    at = 0
    for length in _unpack_ints("i", lengths):
        if length < 0:
            texts.append(None)
        else:
            texts.append(data[at : at + length].decode())
            at += length
    return texts


def _new_log() -> SnapshotLog:
    return SnapshotLog(lambda session_ids, table: table.encode(session_ids), _decode_groups)


def _new_table(gap_ms: int, retention_ms: int) -> Any:
    return (compiled.SessionTable if compiled is not None else SessionTable)(gap_ms, retention_ms)


@dataclass
class SessionState:
    """The sessions of one shard: its table, watermark and retention horizon."""

    gap_ms: int
    retention_ms: int
    clock: ShardClock = field(default_factory=ShardClock)
    horizon_ms: int = -(2**62)
    dropped_events: int = 0
    table: Any = field(init=False, repr=False, compare=False)

    state_kind: ClassVar[str] = "open_sessions"

    def __post_init__(self) -> None:
        self.table = _new_table(self.gap_ms, self.retention_ms)

    def state_size(self) -> int:
        """Session ids held: sessions still open and closed ones kept for late corrections."""
        return len(self.table)

    def snapshot_stats(self) -> dict[str, int]:
        """The table's snapshot chunks (see `SnapshotLog.stats`)."""
        return self.table.snapshot_stats()

    def __getstate__(self) -> dict:
        # Snapshots happen every epoch: the table seals its sessions into chunks (see
        # `SnapshotLog`), of which only the one with the sessions changed since the last
        # snapshot is pickled anew. The deadlines are left out: the table derives them.
        return {
            "gap_ms": self.gap_ms,
            "retention_ms": self.retention_ms,
            "clock": self.clock,
            "horizon_ms": self.horizon_ms,
            "dropped_events": self.dropped_events,
            "chunks": self.table.seal(),
        }

    def __setstate__(self, state: dict) -> None:
        attributes = ("gap_ms", "retention_ms", "clock", "horizon_ms", "dropped_events")
        self.__dict__.update((name, state[name]) for name in attributes if name in state)
        self.table = _new_table(self.gap_ms, self.retention_ms)
        if "chunks" in state:
            decoded = [(data, *_decode_groups(load_chunk(data))) for data in state["chunks"]]
            self.table.restore(decoded, self.horizon_ms)
            return
        # Written before the chunks, as lists of columns or earlier as objects (with their
        # deadlines): the next snapshot writes every session anew.
        if "segments" in state:
            groups = zip(*_decode_groups(state), strict=True)
        else:
            groups = ((sid, [astuple(s) for s in g]) for sid, g in state["sessions"].items())
        self.table.load(list(groups))

    def apply(self, partition: str, watermark_ms: int, partials: Any) -> pl.DataFrame:
        return self.apply_all([(partition, watermark_ms, partials)])

    def apply_all(self, inputs: list[tuple[str, int, Any]]) -> pl.DataFrame:
        """Merge several batches, taking in every watermark before anything closes."""
        for partition, watermark_ms, partials in inputs:
            if partials is not None:
                # a segment ending by then closed too long ago
                past_retention = self.horizon_ms - self.gap_ms
                self.dropped_events += self.table.absorb(partials, past_retention)
            self.clock.update(partition, watermark_ms)
        return self._emit(self.clock.watermark_ms)

    def flush(self) -> pl.DataFrame:
        return self._emit(END_WATERMARK)

    def _emit(self, watermark: int) -> pl.DataFrame:
        """The sessions that closed, in `SESSION_SCHEMA`: the compiled table hands them over as
        columns, so no Python object is made per session on the way to the sinks."""
        horizon = max(self.horizon_ms, watermark - self.retention_ms)
        closed = self.table.emit(watermark, horizon)
        self.horizon_ms = horizon
        if isinstance(closed, list):  # the Python table's rows
            return pl.DataFrame(closed, schema=SESSION_SCHEMA, orient="row")
        return frame_of_buffers(_SESSION_ARROW, *closed)


class SessionTable:
    """The sessions of one shard by id, with when to look at each id again.

    `deadlines` is a heap of (when, session_id). An entry may be early (the session grew since):
    it is then pushed again for the session's new end, so a session that grows event by event
    keeps one entry instead of one per batch."""

    def __init__(self, gap_ms: int, retention_ms: int):
        self.gap_ms = gap_ms
        self.retention_ms = retention_ms
        self.sessions: dict[str, list[Session]] = {}
        self.deadlines: list[tuple[int, str]] = []
        self._changed: set[str] = set()  # written or deleted since the last seal
        self._log = _new_log()

    def __len__(self) -> int:
        return len(self.sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions

    def seal(self) -> list[bytes]:
        """The table's snapshot as chunks (see `SnapshotLog`): those kept, then one with the
        sessions changed since the last seal."""
        changed, self._changed = self._changed, set()
        self._log.changed.update(changed)
        return self._log.seal(self)

    def restore(self, chunks: list[tuple[bytes, list, list]], horizon: int) -> None:
        """Load a snapshot's chunks, oldest first, each with its session ids and their segments
        (`_decode_groups`): a later chunk's version of a session id replaces an earlier one's.
        Ids whose every segment closed by `horizon` are left out (they expired; a deletion leaves
        no tombstone, so an older chunk may still hold them)."""
        gap = self.gap_ms
        self._log = _new_log()
        groups = self._log.load_decoded(
            chunks, lambda _, group: any(s[_END] + gap > horizon for s in group)
        )
        self._load(groups.items())
        self._changed = set()

    def load(self, entries: list[tuple[str, list[SegmentTuple]]]) -> None:
        """Replace the sessions by `entries`, all of which the next seal writes (a snapshot from
        before the chunks); one deadline entry per id (see `_next_due`)."""
        self._log = _new_log()
        self._load(entries)
        self._changed = set(self.sessions)

    def snapshot_stats(self) -> dict[str, int]:
        """Chunks held, their bytes, entries written into them and entries still live."""
        return self._log.stats()

    def encode(self, session_ids: list[str]) -> dict:
        """The sessions of `session_ids` as a snapshot chunk: a few long lists pickle several
        times faster than an object per session."""
        groups = [self.sessions[session_id] for session_id in session_ids]
        segments = list(chain.from_iterable(groups))
        return {
            "session_ids": session_ids,
            "segments_per_id": list(map(len, groups)),
            "segments": {name: list(map(attrgetter(name), segments)) for name in Session.__slots__},
        }

    def _load(self, entries) -> None:
        self.sessions = {sid: [Session(*s) for s in group] for sid, group in entries if group}
        gap, retention = self.gap_ms, self.retention_ms
        self.deadlines = [
            (_next_due(group, gap, retention), sid) for sid, group in self.sessions.items()
        ]
        heapq.heapify(self.deadlines)

    def groups(self) -> list[tuple[str, list[SegmentTuple]]]:
        """Every session id with its segments as `load` takes them."""
        return [(sid, [astuple(s) for s in group]) for sid, group in self.sessions.items()]

    def absorb(self, partials: list[tuple], past_retention: int) -> int:
        """Fold segments in; returns how many events were dropped for ending by
        `past_retention`."""
        gap = self.gap_ms
        sessions, deadlines = self.sessions, self.deadlines
        intern, push, touch = sys.intern, heapq.heappush, self._changed.add
        dropped = 0
        for session_id, tenant, user_id, start, end, count in partials:
            if end <= past_retention:
                dropped += count
                continue
            # interned: the deadlines of a session share its id, its sessions a few tenants
            session_id = intern(session_id)
            touch(session_id)
            group = sessions.get(session_id)
            if group is None:
                sessions[session_id] = [Session(intern(tenant), user_id, start, end, count)]
            elif len(group) == 1 and _extend(group[0], tenant, user_id, start, end, count, gap):
                if group[0].revision < 0:
                    continue  # still open: its entry is due no later than its new close
                end = group[0].end  # a correction: its entry is one for expiry, too late
            else:
                new = Session(intern(tenant), user_id, start, end, count)
                sessions[session_id] = _merge(group, new, gap)
                end = new.end
            push(deadlines, (end + gap, session_id))
        return dropped

    def emit(self, watermark: int, horizon: int) -> list[dict]:
        """Emit sessions that closed (or changed after closing); free those ending by `horizon`.

        Every session id keeps a deadline entry due no later than its next close or expiry (an
        entry that comes early is pushed again for that), so nothing past the horizon outlives
        this call. Rows come in the order of their close, then session id: the same rows in the
        same order whatever entries the deadline heap held (a restored table holds fewer)."""
        closed = []
        gap, retention = self.gap_ms, self.retention_ms
        sessions, deadlines = self.sessions, self.deadlines
        push, pop, touch = heapq.heappush, heapq.heappop, self._changed.add
        while deadlines and deadlines[0][0] <= watermark:
            session_id = pop(deadlines)[1]
            group = sessions.get(session_id)
            if group is None:
                continue
            emitted = False
            for session in group:
                closes_at = session.end + gap
                if session.dirty and closes_at <= watermark:
                    closed.append((closes_at, session_id, _emit_session(session_id, session)))
                    emitted = True
            kept = [session for session in group if session.end + gap > horizon]
            expired = len(kept) < len(group)
            if expired:
                if kept:
                    sessions[session_id] = kept
                else:
                    del sessions[session_id]
            if kept:
                push(deadlines, (_next_due(kept, gap, retention), session_id))
            if emitted or expired:
                touch(session_id)
        closed.sort(key=itemgetter(0, 1))
        return [row for _, _, row in closed]


def _next_due(group: list[Session], gap: int, retention: int) -> int:
    """When to look at a session id again: the first close of a changed segment or expiry of a
    closed one."""
    return min(s.end + gap if s.dirty else s.end + gap + retention for s in group)


def _extend(
    session: Session, tenant: str, user_id: str | None, start: int, end: int, count: int, gap: int
) -> bool:
    """Fold a segment into `session` if it comes within `gap` of it (as `_merge` would)."""
    if not (session.start - gap <= end and start <= session.end + gap):
        return False
    if session.start < start:
        if session.user_id is None:
            session.user_id = user_id
    else:
        session.tenant = sys.intern(tenant)
        if user_id is not None:
            session.user_id = user_id
        session.start = start
    session.end = max(session.end, end)
    session.count += count
    session.dirty = True
    return True


def _merge(group: list[Session], new: Session, gap: int) -> list[Session]:
    """Fold into `new` the segments of `group` it comes within `gap` of; the segments kept."""
    kept = []
    for old in group:
        if old.start - gap <= new.end and new.start <= old.end + gap:
            if old.start < new.start:
                new.tenant = old.tenant
                new.user_id = old.user_id if old.user_id is not None else new.user_id
            elif new.user_id is None:
                new.user_id = old.user_id
            new.start = min(new.start, old.start)
            new.end = max(new.end, old.end)
            new.count += old.count
            new.revision = max(new.revision, old.revision)
        else:
            kept.append(old)
    kept.append(new)
    return kept


def _emit_session(session_id: str, session: Session) -> dict:
    session.revision += 1
    session.dirty = False
    return {
        "tenant": session.tenant,
        "user_id": session.user_id,
        "session_id": session_id,
        "start": iso_ms(session.start),
        "end": iso_ms(session.end),
        "duration_s": (session.end - session.start) / 1000,
        "event_count": session.count,
        "revision": session.revision,
    }
