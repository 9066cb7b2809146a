"""Tumbling event-time windows (1m, 5m, 1h): count and exact unique users per tenant × event type.

The event-time gate hands each shard a batch's window input (`window_partials`); the shard's
`WindowState` keeps a table of cells, one per tenant, type and window. The table folds the input
into the cell of every window size it falls in and emits a cell when the shard's watermark passes
the window's end. Input that lands in an already emitted cell (a late event under the
`reaggregate` policy) re-emits the cell with `revision + 1` and corrected totals. Emitted cells are
kept for `retention_ms` past their end so late corrections stay exact, then freed; anything older
than that horizon is dropped and counted (never re-emitted as revision 0).

Two implementations of the same table: the compiled one (`native/`, `pipeline_native`), which takes
a shard's events as columns and holds user ids as numbers, and the Python one here, the
specification it is tested against, which takes partial aggregates made with polars. The compiled
one is used where it is installed; snapshots are the same either way.

`unique_users` is exact: each cell holds its distinct non-null user ids. In the Python table they
are a set while the window is open and, once emitted, packed into one string (a few bytes per user
instead of a set slot and a string object each); most cells of a shard are emitted ones waiting out
the retention. Snapshot chunks hold every cell's users packed that way. An open cell (in either
table) also keeps the text its last snapshot packed and the users added since: each epoch's
snapshot extends that text instead of packing a 1 h window's users anew.
"""

from __future__ import annotations

import heapq
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, ClassVar

import polars as pl

from operators.event_time import END_WATERMARK
from operators.sharding import ShardClock, events_by_shard, rows_by_shard
from operators.snapshot_log import SnapshotLog

try:  # the compiled table (native/, built by `make install`)
    import pipeline_native as compiled
except ImportError:
    compiled = None
if not hasattr(compiled, "WindowTable"):  # not built, or built before it had one
    compiled = None

WINDOW_SIZES_MS: dict[str, int] = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000}
# Partials are per window of the smallest size; every size is a whole number of them.
_BASE_MS = min(WINDOW_SIZES_MS.values())

CellKey = tuple[str, str, str, int]  # tenant, event_type, window label, window_start_ms
# A cell as snapshot chunks and `WindowTable.load` hold it: count, users, revision.
CellTuple = tuple[int, set[str] | str, int]

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


def window_partials(events: pl.DataFrame, shards: int) -> dict[int, Any]:
    """A batch's window input per shard (`tenant`, `type`, `timestamp`, `user_id`), as the shard's
    table takes it: `ShardEvents` (compiled) or partial rows (`python_window_partials`)."""
    if compiled is None:
        return python_window_partials(events, shards)
    return events_by_shard(compiled.window_events, events, ("tenant", "type", "user_id"), shards)


def python_window_partials(events: pl.DataFrame, shards: int) -> dict[int, list[tuple]]:
    """Per-shard partial aggregates of one batch: rows `(tenant, type, start_ms, count, users)`,
    one per tenant, type and window of the smallest size. The shard folds each row into every
    window size, so the user ids of a batch cross into Python once, not once per size."""
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


def _encode_cells(keys: list[CellKey], table: Any) -> dict:
    return table.encode(keys)


def _decode_cells(chunk: dict) -> tuple[list[CellKey], list[CellTuple]]:
    """The keys of a chunk and their cells; chunks of either table."""
    cells = zip(chunk["counts"], chunk["users"], chunk["revisions"], strict=True)
    return chunk["keys"], list(cells)


def _new_log() -> SnapshotLog:
    return SnapshotLog(_encode_cells, _decode_cells)


def _new_table(retention_ms: int) -> Any:
    return (compiled.WindowTable if compiled is not None else WindowTable)(retention_ms)


class WindowTable:
    """The cells of one shard by key; `pending` and `emitted` are heaps of (window end, key) of the
    cells not emitted yet and of those kept for late corrections."""

    def __init__(self, retention_ms: int):
        self.retention_ms = retention_ms
        self.horizon_ms = -(2**62)  # windows that ended at or before it are gone for good
        self.dropped_events = 0
        self.cells: dict[CellKey, Cell] = {}
        self.pending: list[tuple[int, CellKey]] = []
        self.emitted: list[tuple[int, CellKey]] = []
        self._revised: set[CellKey] = set()  # emitted cells changed since the last `emit`
        self._changed: set[CellKey] = set()

    def __len__(self) -> int:
        return len(self.cells)

    def __contains__(self, key: CellKey) -> bool:
        return key in self.cells

    def users_held(self) -> int:
        """User ids the cells hold, counted once per cell (what their memory grows with)."""
        return sum(_unique(cell.users) for cell in self.cells.values())

    def entries(self) -> list[tuple[CellKey, int, set[str] | str, int]]:
        """Every cell as `load` takes it: (key, count, users as a snapshot chunk holds them,
        revision)."""
        cells = self.cells.items()
        return [(k, c.count, _snapshot_users(c), c.revision) for k, c in cells]

    def take_changed(self) -> set[CellKey]:
        """The keys of the cells written or deleted since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def encode(self, keys: list[CellKey]) -> dict:
        """The cells of `keys` as a snapshot chunk: columns of builtins pickle several times faster
        than an object per cell."""
        cells = [self.cells[key] for key in keys]
        return {
            "keys": keys,
            "counts": [cell.count for cell in cells],
            "users": [_snapshot_users(cell) for cell in cells],
            "revisions": [cell.revision for cell in cells],
        }

    def load(self, entries: list[tuple[CellKey, int, set[str] | str, int]]) -> None:
        """Replace the cells by `entries` (key, count, users, revision); which windows are pending
        or emitted follows from the revisions."""
        self.__init__(self.retention_ms)
        for key, count, users, revision in entries:
            if revision < 0 and isinstance(users, str):  # open: a set again, its packed text kept
                self.cells[key] = Cell(count, set(_unpack(users)), revision, users)
            else:
                self.cells[key] = Cell(count, users, revision)
            heap = self.pending if revision < 0 else self.emitted
            heap.append((key[3] + WINDOW_SIZES_MS[key[2]], key))
        heapq.heapify(self.pending)
        heapq.heapify(self.emitted)

    def absorb(self, partials: list[tuple]) -> None:
        """Fold a batch's partial rows into their cells (see `python_window_partials`)."""
        cells, touch = self.cells, self._changed.add
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
                    self._revised.add(key)
                cell.count += count
                _add_users(cell, users)

    def emit(self, watermark: int) -> list[dict]:
        """The rows to emit at `watermark`: emitted cells changed since the last call (by key),
        then the windows that ended by it (by end, then key); windows that ended by
        `watermark - retention` are freed."""
        revised, self._revised = self._revised, set()
        rows = [self._emit_cell(key) for key in sorted(revised)]
        pending = self.pending
        while pending and pending[0][0] <= watermark:
            _, key = heapq.heappop(pending)
            rows.append(self._emit_cell(key))
        self._expire(watermark - self.retention_ms)
        return rows

    def _emit_cell(self, key: CellKey) -> dict:
        cell = self.cells[key]
        self._changed.add(key)
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
        emitted, touch = self.emitted, self._changed.add
        while emitted and emitted[0][0] <= horizon:
            _, key = heapq.heappop(emitted)
            del self.cells[key]
            touch(key)


@dataclass
class WindowState:
    """The windows of one shard: its table and watermark."""

    retention_ms: int
    clock: ShardClock = field(default_factory=ShardClock)
    table: Any = field(init=False, repr=False, compare=False)
    log: SnapshotLog = field(default_factory=_new_log, repr=False, compare=False)

    state_kind: ClassVar[str] = "window_cells"

    def __post_init__(self) -> None:
        self.table = _new_table(self.retention_ms)

    @property
    def horizon_ms(self) -> int:
        return self.table.horizon_ms

    @property
    def dropped_events(self) -> int:
        return self.table.dropped_events

    def state_size(self) -> int:
        """Cells held: windows not emitted yet and emitted ones kept for late corrections."""
        return len(self.table)

    def users_held(self) -> int:
        return self.table.users_held()

    def snapshot_stats(self) -> dict[str, int]:
        """Its snapshot chunks (see `SnapshotLog.stats`)."""
        return self.log.stats()

    def __getstate__(self) -> dict:
        # Snapshots happen every epoch: the cells are sealed into chunks (see `SnapshotLog`), of
        # which only the one with the cells changed since the last snapshot is pickled anew. The
        # heaps follow from the cells (emitted or not).
        self.log.changed.update(self.table.take_changed())
        return {
            "retention_ms": self.retention_ms,
            "clock": self.clock,
            "horizon_ms": self.table.horizon_ms,
            "dropped_events": self.table.dropped_events,
            "chunks": self.log.seal(self.table),
        }

    def __setstate__(self, state: dict) -> None:
        self.log = _new_log()
        if "cells" in state:  # written before the columnar form: the attributes as such
            # (their cells were pickled before cells had `packed` and `added`)
            cells = {key: (c.count, c.users, c.revision) for key, c in state["cells"].items()}
            self.log.changed.update(cells)
        else:
            # A deleted cell can have an earlier version in an older chunk; deletion comes with
            # expiry, so that version has expired too.
            horizon = state["horizon_ms"]
            cells = self.log.restore(
                state, lambda key, _: key[3] + WINDOW_SIZES_MS[key[2]] > horizon
            )
        self.retention_ms = state["retention_ms"]
        self.clock = state["clock"]
        self.table = _new_table(self.retention_ms)
        self.table.load([(key, *cell) for key, cell in cells.items()])
        self.table.horizon_ms = state["horizon_ms"]
        self.table.dropped_events = state["dropped_events"]

    def apply(self, partition: str, watermark_ms: int, partials: Any) -> list[dict]:
        """Merge one batch's window input, advance the watermark, return the rows to emit."""
        return self.apply_all([(partition, watermark_ms, partials)])

    def apply_all(self, inputs: list[tuple[str, int, Any]]) -> list[dict]:
        """Like `apply` for several batches at once: every watermark is taken in before anything
        closes, so a partition that is behind holds windows back even within one delivery."""
        for partition, watermark_ms, partials in inputs:
            if partials is not None:
                self.table.absorb(partials)
            self.clock.update(partition, watermark_ms)
        return self.table.emit(self.clock.watermark_ms)

    def flush(self) -> list[dict]:
        """End of input: emit every window that has not been emitted."""
        return self.table.emit(END_WATERMARK)
