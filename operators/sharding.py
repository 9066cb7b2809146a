"""Keyed state lives in a fixed number of shards.

Window and session state is partitioned into `shards` keys (not one key per tenant or session),
so each batch costs at most one message per shard, and the watermark reaches every shard with
every batch even when a shard gets no events. The shard of a key is a CRC32, stable across
processes and versions, so a recovery store stays valid after an upgrade.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from operators.event_time import NO_WATERMARK
from operators.model import arrow_columns, texts_and_millis


def shard_key(shard: int) -> str:
    return f"shard-{shard:03d}"


def rows_by_shard(frame: pl.DataFrame, keys: pl.Series, shards: int) -> dict[int, list[tuple]]:
    """The rows of `frame` (as tuples, in order) grouped by the shard of their key.

    Shard state is updated row by row in Python anyway, so the rows cross over from polars once
    here rather than through one small frame per shard (a polars call each, more with more shards).
    """
    crc32 = zlib.crc32
    by_shard: dict[int, list[tuple]] = {}
    for row, key in zip(frame.rows(), keys.to_list(), strict=True):
        shard = crc32(key.encode()) % shards
        rows = by_shard.get(shard)
        if rows is None:
            by_shard[shard] = [row]
        else:
            rows.append(row)
    return by_shard


def events_by_shard(
    split: Callable[[int, list, int], list[tuple[int, Any]]],
    events: pl.DataFrame,
    names: tuple[str, ...],
    shards: int,
) -> dict[int, Any]:
    """The compiled counterpart of `rows_by_shard`: `split` (`session_events`, `window_events`)
    of the text columns `names` and the event time, as `ShardEvents` by shard."""
    columns = texts_and_millis(events, names)
    if columns.height == 0:
        return {}
    _arrays, buffers = arrow_columns(columns, string_views=True)  # alive until read
    return dict(split(columns.height, buffers, shards))


@dataclass(slots=True)
class ShardInput:
    """What one source partition's batch brings to one shard: its watermark and partial state."""

    partition: str
    watermark_ms: int
    # what `window_partials` or `session_partials` made for the shard (rows, or session events)
    partials: Any = None


@dataclass(slots=True)
class ShardClock:
    """A shard's watermark: the lowest of the watermarks of the source partitions it has heard of."""

    partition_watermarks: dict[str, int] = field(default_factory=dict)

    def update(self, partition: str, watermark_ms: int) -> None:
        known = self.partition_watermarks.get(partition)
        if known is None or watermark_ms > known:
            self.partition_watermarks[partition] = watermark_ms

    @property
    def watermark_ms(self) -> int:
        return min(self.partition_watermarks.values(), default=NO_WATERMARK)
