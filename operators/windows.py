"""Tumbling event-time windows (1m, 5m, 1h): count and exact unique users per tenant × event type.

Two steps, so that the per-event work is columnar:
1. `window_partials` pre-aggregates one batch with polars: one row per (tenant, type, window,
   window_start) with the batch's count and distinct user ids.
2. `WindowState` (one per shard) merges partials into cells and emits a cell when the shard's
   watermark passes the window's end. A partial that lands in an already emitted cell (a late
   event under the `reaggregate` policy) re-emits the cell with `revision + 1` and corrected totals.
   Emitted cells are kept for `retention_ms` past their end so late corrections stay exact, then
   freed; anything older than that horizon is dropped and counted (never re-emitted as revision 0).

`unique_users` is exact: each cell holds the set of distinct non-null user ids.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

import polars as pl

from operators.event_time import END_WATERMARK
from operators.sharding import ShardClock, shard_column, split_by_shard

WINDOW_SIZES_MS: dict[str, int] = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000}

CellKey = tuple[str, str, str, int]  # tenant, event_type, window label, window_start_ms


def iso_ms(epoch_ms: int) -> str:
    return (
        datetime.fromtimestamp(epoch_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def window_partials(events: pl.DataFrame, shards: int) -> dict[int, pl.DataFrame]:
    """Per-shard partial aggregates of one batch (`tenant`, `type`, `timestamp`, `user_id`)."""
    if events.height == 0:
        return {}
    ts = pl.col("timestamp").dt.epoch("ms")
    per_size = [
        events.select(
            "tenant",
            "type",
            "user_id",
            pl.lit(label).alias("window"),
            (ts // size * size).alias("start_ms"),
        )
        for label, size in WINDOW_SIZES_MS.items()
    ]
    partials = (
        pl.concat(per_size)
        .group_by("tenant", "type", "window", "start_ms")
        .agg(
            pl.len().alias("count"),
            pl.col("user_id").drop_nulls().unique().alias("users"),
        )
    )
    keys = partials["tenant"] + "\x1f" + partials["type"]
    return split_by_shard(partials, shard_column(keys, shards))


@dataclass(slots=True)
class Cell:
    count: int = 0
    users: set[str] = field(default_factory=set)
    revision: int = -1  # -1: not emitted yet


@dataclass
class WindowState:
    """The windows of one shard."""

    retention_ms: int
    clock: ShardClock = field(default_factory=ShardClock)
    cells: dict[CellKey, Cell] = field(default_factory=dict)
    pending: list[tuple[int, CellKey]] = field(default_factory=list)  # heap: not yet emitted
    emitted: list[tuple[int, CellKey]] = field(default_factory=list)  # heap: awaiting expiry
    # Windows that ended at or before this horizon are gone for good.
    horizon_ms: int = -(2**62)
    dropped_events: int = 0

    state_kind: ClassVar[str] = "window_cells"

    def state_size(self) -> int:
        """Cells held: windows not emitted yet and emitted ones kept for late corrections."""
        return len(self.cells)

    def apply(self, partition: str, watermark_ms: int, partials: pl.DataFrame | None) -> list[dict]:
        """Merge one batch's partials, advance the watermark, return the rows to emit."""
        return self.apply_all([(partition, watermark_ms, partials)])

    def apply_all(self, inputs: list[tuple[str, int, pl.DataFrame | None]]) -> list[dict]:
        """Like `apply` for several batches at once: every watermark is taken in before anything
        closes, so a partition that is behind holds windows back even within one delivery."""
        revised: set[CellKey] = set()
        for partition, watermark_ms, partials in inputs:
            if partials is not None:
                self._absorb(partials, revised)
            self.clock.update(partition, watermark_ms)
        return self._emit(self.clock.watermark_ms, revised)

    def _absorb(self, partials: pl.DataFrame, revised: set[CellKey]) -> None:
        for tenant, etype, label, start, count, users in partials.iter_rows():
            key = (tenant, etype, label, start)
            cell = self.cells.get(key)
            if cell is None:
                end = start + WINDOW_SIZES_MS[label]
                if end <= self.horizon_ms:
                    self.dropped_events += count
                    continue
                cell = self.cells[key] = Cell()
                heapq.heappush(self.pending, (end, key))
            elif cell.revision >= 0:
                revised.add(key)
            cell.count += count
            cell.users.update(users)

    def flush(self) -> list[dict]:
        """End of input: emit every window that has not been emitted."""
        return self._emit(END_WATERMARK, set())

    def _emit(self, watermark: int, revised: set[CellKey]) -> list[dict]:
        rows = [self._emit_cell(key) for key in sorted(revised)]
        while self.pending and self.pending[0][0] <= watermark:
            _, key = heapq.heappop(self.pending)
            rows.append(self._emit_cell(key))
        self._expire(watermark - self.retention_ms)
        return rows

    def _emit_cell(self, key: CellKey) -> dict:
        cell = self.cells[key]
        end = key[3] + WINDOW_SIZES_MS[key[2]]
        if cell.revision < 0:
            heapq.heappush(self.emitted, (end, key))
        cell.revision += 1
        return _row(key, end, cell)

    def _expire(self, horizon: int) -> None:
        if horizon <= self.horizon_ms:
            return
        self.horizon_ms = horizon
        while self.emitted and self.emitted[0][0] <= horizon:
            _, key = heapq.heappop(self.emitted)
            del self.cells[key]


def _row(key: CellKey, end_ms: int, cell: Cell) -> dict:
    tenant, etype, label, start = key
    return {
        "tenant": tenant,
        "event_type": etype,
        "window": label,
        "window_start": iso_ms(start),
        "window_end": iso_ms(end_ms),
        "count": cell.count,
        "unique_users": len(cell.users),
        "revision": cell.revision,
    }
