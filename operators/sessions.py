"""Sessions by `session_id`: a session closes after `gap` of event-time inactivity.

`session_partials` cuts one batch into per-session segments with polars (a new segment starts where
two consecutive events of a session are more than `gap` apart). `SessionState` (one per shard)
merges segments that come within `gap` of each other and emits a session once the shard's
watermark passes `end + gap`. The open state of a session is freed when it closes; a compact closed
record is kept for `retention_ms` so that a late event can still correct it (re-emitted with
`revision + 1`), then that is freed too.

A session's identity for downstream stores is `(session_id, start)`.
"""

from __future__ import annotations

import heapq
import sys
from dataclasses import dataclass, field
from itertools import chain, islice
from operator import attrgetter, itemgetter
from typing import ClassVar

import polars as pl

from operators.event_time import END_WATERMARK
from operators.sharding import ShardClock, rows_by_shard
from operators.snapshot_log import SnapshotLog
from operators.windows import iso_ms


def session_partials(events: pl.DataFrame, gap_ms: int, shards: int) -> dict[int, list[tuple]]:
    """Per-shard session segments of one batch: rows `(session_id, tenant, user_id, start, end,
    count)`."""
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


def _encode_groups(session_ids: list[str], groups: list[list[Session]]) -> dict:
    # A few long lists pickle several times faster than an object per session.
    segments = list(chain.from_iterable(groups))
    return {
        "session_ids": session_ids,
        "segments_per_id": list(map(len, groups)),
        "segments": {name: list(map(attrgetter(name), segments)) for name in Session.__slots__},
    }


def _decode_groups(chunk: dict) -> tuple[list[str], list[list[Session]]]:
    segments = iter(map(Session, *chunk["segments"].values()))
    return chunk["session_ids"], [list(islice(segments, n)) for n in chunk["segments_per_id"]]


def _new_log() -> SnapshotLog:
    return SnapshotLog(_encode_groups, _decode_groups)


@dataclass
class SessionState:
    """The sessions of one shard."""

    gap_ms: int
    retention_ms: int
    clock: ShardClock = field(default_factory=ShardClock)
    sessions: dict[str, list[Session]] = field(default_factory=dict)
    # heap of (when, session_id): when to look at a session id again (close or expire). An entry
    # may be early (the session grew since): it is then pushed again for the session's new end, so
    # a session that grows event by event keeps one entry instead of one per batch.
    deadlines: list[tuple[int, str]] = field(default_factory=list)
    horizon_ms: int = -(2**62)
    dropped_events: int = 0
    log: SnapshotLog = field(default_factory=_new_log, repr=False, compare=False)

    state_kind: ClassVar[str] = "open_sessions"

    def state_size(self) -> int:
        """Session ids held: sessions still open and closed ones kept for late corrections."""
        return len(self.sessions)

    def __getstate__(self) -> dict:
        # Snapshots happen every epoch: the sessions are sealed into chunks (see `SnapshotLog`), of
        # which only the one with the sessions changed since the last snapshot is pickled anew. The
        # deadlines are left out: `__setstate__` derives them from the sessions.
        return {
            "gap_ms": self.gap_ms,
            "retention_ms": self.retention_ms,
            "clock": self.clock,
            "horizon_ms": self.horizon_ms,
            "dropped_events": self.dropped_events,
            "chunks": self.log.seal(self.sessions),
        }

    def __setstate__(self, state: dict) -> None:
        self.log = _new_log()
        if "chunks" not in state and "segments" not in state:
            # written before the columnar form: the attributes as such
            self.__dict__.update(state)
            self.log.changed.update(self.sessions)
            return
        self.gap_ms = state["gap_ms"]
        self.retention_ms = state["retention_ms"]
        self.clock = state["clock"]
        self.horizon_ms = state["horizon_ms"]
        self.dropped_events = state["dropped_events"]
        # A deleted session can have an earlier version in an older chunk; deletion comes with
        # expiry, so that version has expired too.
        horizon, gap = self.horizon_ms, self.gap_ms
        self.sessions = self.log.restore(
            state, lambda _, group: any(s.end + gap > horizon for s in group)
        )
        # snapshots written before the deadlines were derived hold them
        self.deadlines = state.get("deadlines") or self._derived_deadlines()

    def _derived_deadlines(self) -> list[tuple[int, str]]:
        """One entry per session id (see `_next_due`)."""
        gap, retention = self.gap_ms, self.retention_ms
        deadlines = [
            (_next_due(group, gap, retention), session_id)
            for session_id, group in self.sessions.items()
        ]
        heapq.heapify(deadlines)
        return deadlines

    def apply(self, partition: str, watermark_ms: int, partials: list[tuple] | None) -> list[dict]:
        return self.apply_all([(partition, watermark_ms, partials)])

    def apply_all(self, inputs: list[tuple[str, int, list[tuple] | None]]) -> list[dict]:
        """Merge several batches, taking in every watermark before anything closes."""
        for partition, watermark_ms, partials in inputs:
            if partials is not None:
                self._absorb(partials)
            self.clock.update(partition, watermark_ms)
        return self._emit(self.clock.watermark_ms)

    def flush(self) -> list[dict]:
        return self._emit(END_WATERMARK)

    def _absorb(self, partials: list[tuple]) -> None:
        gap = self.gap_ms
        sessions, deadlines = self.sessions, self.deadlines
        intern, push, touch = sys.intern, heapq.heappush, self.log.changed.add
        past_retention = self.horizon_ms - gap  # a segment ending by then closed too long ago
        for session_id, tenant, user_id, start, end, count in partials:
            if end <= past_retention:
                self.dropped_events += count
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

    def _emit(self, watermark: int) -> list[dict]:
        """Emit sessions that closed (or changed after closing); free those past retention.

        Every session id keeps a deadline entry due no later than its next close or expiry (an
        entry that comes early is pushed again for that), so nothing past the horizon outlives
        this call. Rows come in the order of their close, then session id: the same rows in the
        same order whatever entries the deadline heap held (a restored state holds fewer)."""
        closed = []
        gap, retention = self.gap_ms, self.retention_ms
        horizon = max(self.horizon_ms, watermark - retention)
        sessions, deadlines = self.sessions, self.deadlines
        push, pop, touch = heapq.heappush, heapq.heappop, self.log.changed.add
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
        self.horizon_ms = horizon
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
