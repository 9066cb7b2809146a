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
from dataclasses import dataclass, field
from typing import ClassVar

import polars as pl

from operators.event_time import END_WATERMARK
from operators.sharding import ShardClock, shard_column, split_by_shard
from operators.windows import iso_ms


def session_partials(events: pl.DataFrame, gap_ms: int, shards: int) -> dict[int, pl.DataFrame]:
    """Per-shard session segments of one batch: session_id, tenant, user_id, start, end, count."""
    with_session = events.filter(pl.col("session_id").is_not_null())
    if with_session.height == 0:
        return {}
    ts = pl.col("timestamp").dt.epoch("ms")
    segments = (
        with_session.select("session_id", "tenant", "user_id", ts.alias("ts"))
        .sort("session_id", "ts")
        .with_columns(
            (pl.col("ts").diff().over("session_id").fill_null(0) > gap_ms)
            .cum_sum()
            .over("session_id")
            .alias("segment")
        )
        .group_by("session_id", "segment")
        .agg(
            pl.col("tenant").first(),
            pl.col("user_id").drop_nulls().first(),
            pl.col("ts").min().alias("start"),
            pl.col("ts").max().alias("end"),
            pl.len().alias("count"),
        )
        .drop("segment")
    )
    return split_by_shard(segments, shard_column(segments["session_id"], shards))


@dataclass(slots=True)
class Session:
    tenant: str
    user_id: str | None
    start: int
    end: int
    count: int
    revision: int = -1  # -1: not emitted yet
    dirty: bool = True  # changed since it was last emitted


@dataclass
class SessionState:
    """The sessions of one shard."""

    gap_ms: int
    retention_ms: int
    clock: ShardClock = field(default_factory=ShardClock)
    sessions: dict[str, list[Session]] = field(default_factory=dict)
    # heap of (when, session_id): when to look at a session id again (close or expire)
    deadlines: list[tuple[int, str]] = field(default_factory=list)
    horizon_ms: int = -(2**62)
    dropped_events: int = 0

    state_kind: ClassVar[str] = "open_sessions"

    def state_size(self) -> int:
        """Session ids held: sessions still open and closed ones kept for late corrections."""
        return len(self.sessions)

    def apply(self, partition: str, watermark_ms: int, partials: pl.DataFrame | None) -> list[dict]:
        return self.apply_all([(partition, watermark_ms, partials)])

    def apply_all(self, inputs: list[tuple[str, int, pl.DataFrame | None]]) -> list[dict]:
        """Merge several batches, taking in every watermark before anything closes."""
        for partition, watermark_ms, partials in inputs:
            if partials is not None:
                for (
                    session_id,
                    tenant,
                    user_id,
                    start,
                    end,
                    count,
                ) in partials.iter_rows():
                    if end + self.gap_ms <= self.horizon_ms:
                        self.dropped_events += count
                        continue
                    self._merge(session_id, Session(tenant, user_id, start, end, count))
            self.clock.update(partition, watermark_ms)
        return self._emit(self.clock.watermark_ms)

    def flush(self) -> list[dict]:
        return self._emit(END_WATERMARK)

    def _merge(self, session_id: str, new: Session) -> None:
        """Fold `new` into the segments of its session it comes within `gap` of."""
        kept = []
        for old in self.sessions.get(session_id, ()):
            if old.start - self.gap_ms <= new.end and new.start <= old.end + self.gap_ms:
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
        self.sessions[session_id] = kept
        heapq.heappush(self.deadlines, (new.end + self.gap_ms, session_id))

    def _emit(self, watermark: int) -> list[dict]:
        """Emit sessions that closed (or changed after closing); free those past retention."""
        rows = []
        horizon = max(self.horizon_ms, watermark - self.retention_ms)
        while self.deadlines and self.deadlines[0][0] <= watermark:
            _, session_id = heapq.heappop(self.deadlines)
            kept = []
            for session in self.sessions.get(session_id, ()):
                closes_at = session.end + self.gap_ms
                if closes_at <= watermark and session.dirty:
                    rows.append(_emit_session(session_id, session))
                    if closes_at > horizon:
                        heapq.heappush(self.deadlines, (closes_at + self.retention_ms, session_id))
                if closes_at > horizon:
                    kept.append(session)
            if kept:
                self.sessions[session_id] = kept
            else:
                self.sessions.pop(session_id, None)
        self.horizon_ms = horizon
        return rows


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
