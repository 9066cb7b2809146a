"""Tumbling event-time windows (1m, 5m, 1h): count and exact unique users per tenant × event type.

Two steps, so that the per-event work is columnar:
1. `window_partials` pre-aggregates one batch with polars: one row per (tenant, type, minute) with
   the batch's count and distinct user ids.
2. `WindowState` (one per shard) folds each partial into the cells of every window size it falls in
   and emits a cell when the shard's watermark passes the window's end. A partial that lands in an
   already emitted cell (a late event under the `reaggregate` policy) re-emits the cell with
   `revision + 1` and corrected totals. Emitted cells are kept for `retention_ms` past their end so
   late corrections stay exact, then freed; anything older than that horizon is dropped and
   counted (never re-emitted as revision 0).

`unique_users` is exact: each cell holds its distinct non-null user ids, as a set while the window
is open and, once emitted, packed into one string (a few bytes per user instead of a set slot and a
string object each). Most cells of a shard are emitted ones waiting out the retention, so this is
what keeps memory and snapshots small; a late event only searches and extends the string. An open
cell also keeps the text its last snapshot packed and the users added since: each epoch's snapshot
extends that text instead of pickling a 1 h window's users one string at a time.
"""

from __future__ import annotations

import heapq
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import ClassVar

import polars as pl

from operators.event_time import END_WATERMARK
from operators.sharding import ShardClock, rows_by_shard
from operators.snapshot_log import SnapshotLog

WINDOW_SIZES_MS: dict[str, int] = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000}
# Partials are per window of the smallest size; every size is a whole number of them.
_BASE_MS = min(WINDOW_SIZES_MS.values())

CellKey = tuple[str, str, str, int]  # tenant, event_type, window label, window_start_ms

# Delimits the user ids of an emitted cell; a cell with a user id containing it stays a set.
_SEPARATOR = "\x00"


@lru_cache(maxsize=4096)
def _minute_prefix(minute: int) -> str:
    """`YYYY-MM-DDTHH:MM:` of a minute since the epoch (emitted times cluster in a few minutes)."""
    return datetime.fromtimestamp(minute * 60, UTC).isoformat(timespec="minutes")[:-6] + ":"


_SECONDS = [f"{second:02d}." for second in range(60)]
_MILLIS = [f"{ms:03d}Z" for ms in range(1000)]


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds, `2023-11-14T22:13:05.120Z`, several times faster than
    formatting a datetime (every emitted row has two)."""
    minute, ms = divmod(epoch_ms, 60_000)
    second, ms = divmod(ms, 1000)
    return f"{_minute_prefix(minute)}{_SECONDS[second]}{_MILLIS[ms]}"


# Window bounds repeat across keys and emissions.
_window_iso = lru_cache(maxsize=4096)(iso_ms)


def window_partials(events: pl.DataFrame, shards: int) -> dict[int, list[tuple]]:
    """Per-shard partial aggregates of one batch (`tenant`, `type`, `timestamp`, `user_id`): rows
    `(tenant, type, start_ms, count, users)`, one per tenant, type and window of the smallest size.
    The shard folds each row into every window size, so the user ids of a batch cross into Python
    once, not once per size."""
    if events.height == 0:
        return {}
    start = pl.col("timestamp").dt.epoch("ms") // _BASE_MS * _BASE_MS
    partials = events.group_by("tenant", "type", start.alias("start_ms")).agg(
        pl.len().alias("count"),
        pl.col("user_id").drop_nulls().unique().alias("users"),
    )
    return rows_by_shard(partials, partials["tenant"] + "\x1f" + partials["type"], shards)


@dataclass(slots=True)
class Cell:
    count: int
    users: set[str] | str  # a set until the cell is emitted, then packed (see `_pack`)
    revision: int = -1  # -1: not emitted yet
    # An open cell's users as its last snapshot packed them, and those added since: the next
    # snapshot appends these instead of pickling the whole set again (see `_snapshot_users`).
    packed: str | None = None
    added: list[str] | None = None


def _pack(users: set[str]) -> set[str] | str:
    """The user ids each followed by the separator, after a leading one (so `<sep>id<sep>` finds
    an id), or the set itself if a user id contains the separator."""
    packed = _SEPARATOR.join(["", *users, ""])
    return packed if packed.count(_SEPARATOR) == len(users) + 1 else users


# Up to this many users are added to packed text by searching it for each (cheaper than a set of
# a large cell's users); more are added through one set of the packed users (a burst of late
# events into a large closed window would otherwise search and copy the text once per user).
_SEARCHED_ADDS = 64


def _unpack(users: str) -> list[str]:
    """The user ids of packed text (see `_pack`)."""
    return users.split(_SEPARATOR)[1:-1]


def _add_packed(users: str, more: list[str]) -> set[str] | str:
    """Packed `users` with `more` added, packed too; a set again if a new user id contains the
    separator."""
    if any(_SEPARATOR in user for user in more):
        return {*_unpack(users), *more}
    if len(more) > _SEARCHED_ADDS:
        held = set(_unpack(users))
        new = [user for user in dict.fromkeys(more) if user not in held]
        return users + "".join(f"{user}{_SEPARATOR}" for user in new)
    for user in more:
        if f"{_SEPARATOR}{user}{_SEPARATOR}" not in users:
            users += f"{user}{_SEPARATOR}"
    return users


def _snapshot_users(cell: Cell) -> set[str] | str:
    """A cell's users as a snapshot (and an emission) holds them: packed text, or the set when a
    user id contains the separator. An open cell's 1 h of users would cost a pickled string each
    every epoch; extending the text packed for the previous snapshot costs a copy of bytes."""
    users = cell.users
    if not isinstance(users, set):
        return users
    if cell.packed is None:
        packed = _pack(users)
        cell.packed = packed if isinstance(packed, str) else None
    elif cell.added:
        more = _SEPARATOR.join(cell.added) + _SEPARATOR
        if more.count(_SEPARATOR) == len(cell.added):
            cell.packed += more
        else:  # a new user id contains the separator: the cell stays a set
            cell.packed = None
    cell.added = None
    return users if cell.packed is None else cell.packed


def _add_users(cell: Cell, users: list[str]) -> None:
    if isinstance(cell.users, str):
        cell.users = _add_packed(cell.users, users)
        return
    held = cell.users
    if cell.packed is None:  # the next snapshot packs the whole set
        held.update(users)
        return
    new = [user for user in users if user not in held]
    if new:
        held.update(new)
        if cell.added is None:
            cell.added = new
        else:
            cell.added.extend(new)


def _unique(users: set[str] | str) -> int:
    return len(users) if isinstance(users, set) else users.count(_SEPARATOR) - 1


def _encode_cells(keys: list[CellKey], current: dict[CellKey, Cell]) -> dict:
    # Columns of builtins pickle several times faster than an object per cell.
    cells = [current[key] for key in keys]
    return {
        "keys": keys,
        "counts": [cell.count for cell in cells],
        "users": [_snapshot_users(cell) for cell in cells],
        "revisions": [cell.revision for cell in cells],
    }


def _decode_cells(chunk: dict) -> tuple[list[CellKey], list[Cell]]:
    cells = []
    for count, users, revision in zip(
        chunk["counts"], chunk["users"], chunk["revisions"], strict=True
    ):
        if revision < 0 and isinstance(users, str):  # open: a set again, its packed text kept
            cells.append(Cell(count, set(_unpack(users)), revision, users))
        else:
            cells.append(Cell(count, users, revision))
    return chunk["keys"], cells


def _new_log() -> SnapshotLog:
    return SnapshotLog(_encode_cells, _decode_cells)


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
    log: SnapshotLog = field(default_factory=_new_log, repr=False, compare=False)

    state_kind: ClassVar[str] = "window_cells"

    def state_size(self) -> int:
        """Cells held: windows not emitted yet and emitted ones kept for late corrections."""
        return len(self.cells)

    def users_held(self) -> int:
        """User ids the cells hold, counted once per cell (what their memory grows with)."""
        return sum(_unique(cell.users) for cell in self.cells.values())

    def __getstate__(self) -> dict:
        # Snapshots happen every epoch: the cells are sealed into chunks (see `SnapshotLog`), of
        # which only the one with the cells changed since the last snapshot is pickled anew. The
        # heaps follow from the cells (emitted or not).
        return {
            "retention_ms": self.retention_ms,
            "clock": self.clock,
            "horizon_ms": self.horizon_ms,
            "dropped_events": self.dropped_events,
            "chunks": self.log.seal(self.cells),
        }

    def __setstate__(self, state: dict) -> None:
        self.log = _new_log()
        if "cells" in state:  # written before the columnar form: the attributes as such
            self.__dict__.update(state)
            # (their cells were pickled before cells had `packed` and `added`)
            self.cells = {k: Cell(c.count, c.users, c.revision) for k, c in self.cells.items()}
            self.log.changed.update(self.cells)
            return
        self.retention_ms = state["retention_ms"]
        self.clock = state["clock"]
        self.horizon_ms = state["horizon_ms"]
        self.dropped_events = state["dropped_events"]
        # A deleted cell can have an earlier version in an older chunk; deletion comes with
        # expiry, so that version has expired too.
        horizon = self.horizon_ms
        self.cells = self.log.restore(
            state, lambda key, _: key[3] + WINDOW_SIZES_MS[key[2]] > horizon
        )
        self.pending = []
        self.emitted = []
        for key, cell in self.cells.items():
            heap = self.pending if cell.revision < 0 else self.emitted
            heap.append((key[3] + WINDOW_SIZES_MS[key[2]], key))
        heapq.heapify(self.pending)
        heapq.heapify(self.emitted)

    def apply(self, partition: str, watermark_ms: int, partials: list[tuple] | None) -> list[dict]:
        """Merge one batch's partials, advance the watermark, return the rows to emit."""
        return self.apply_all([(partition, watermark_ms, partials)])

    def apply_all(self, inputs: list[tuple[str, int, list[tuple] | None]]) -> list[dict]:
        """Like `apply` for several batches at once: every watermark is taken in before anything
        closes, so a partition that is behind holds windows back even within one delivery."""
        revised: set[CellKey] = set()
        for partition, watermark_ms, partials in inputs:
            if partials is not None:
                self._absorb(partials, revised)
            self.clock.update(partition, watermark_ms)
        return self._emit(self.clock.watermark_ms, revised)

    def _absorb(self, partials: list[tuple], revised: set[CellKey]) -> None:
        cells, touch = self.cells, self.log.changed.add
        for tenant, etype, base_start, count, users in partials:
            for label, size in WINDOW_SIZES_MS.items():
                start = base_start - base_start % size
                key = (tenant, etype, label, start)
                cell = cells.get(key)
                if cell is None:
                    if start + size <= self.horizon_ms:
                        self.dropped_events += count
                        continue
                    # interned: the keys of a shard share a few tenant and type strings
                    key = (sys.intern(tenant), sys.intern(etype), label, start)
                    cells[key] = Cell(count, set(users))
                    touch(key)
                    heapq.heappush(self.pending, (start + size, key))
                    continue
                touch(key)
                if cell.revision >= 0:
                    revised.add(key)
                cell.count += count
                _add_users(cell, users)

    def flush(self) -> list[dict]:
        """End of input: emit every window that has not been emitted."""
        return self._emit(END_WATERMARK, set())

    def _emit(self, watermark: int, revised: set[CellKey]) -> list[dict]:
        rows = [self._emit_cell(key) for key in sorted(revised)]
        pending = self.pending
        while pending and pending[0][0] <= watermark:
            _, key = heapq.heappop(pending)
            rows.append(self._emit_cell(key))
        self._expire(watermark - self.retention_ms)
        return rows

    def _emit_cell(self, key: CellKey) -> dict:
        cell = self.cells[key]
        self.log.changed.add(key)
        tenant, etype, label, start = key
        end = start + WINDOW_SIZES_MS[label]
        if cell.revision < 0:
            heapq.heappush(self.emitted, (end, key))
        cell.revision += 1
        cell.users = _snapshot_users(cell)
        cell.packed = None
        return {
            "tenant": tenant,
            "event_type": etype,
            "window": label,
            "window_start": _window_iso(start),
            "window_end": _window_iso(end),
            "count": cell.count,
            "unique_users": _unique(cell.users),
            "revision": cell.revision,
        }

    def _expire(self, horizon: int) -> None:
        if horizon <= self.horizon_ms:
            return
        self.horizon_ms = horizon
        emitted, touch = self.emitted, self.log.changed.add
        while emitted and emitted[0][0] <= horizon:
            _, key = heapq.heappop(emitted)
            del self.cells[key]
            touch(key)
