"""Keyed state lives in a fixed number of shards.

Window and session state is partitioned into `shards` keys (not one key per tenant or session),
so each batch costs at most one message per shard, and the watermark reaches every shard with
every batch even when a shard gets no events. The shard of a key is a CRC32, stable across
processes and versions, so a recovery store stays valid after an upgrade.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import polars as pl

from operators.event_time import NO_WATERMARK


def shard_key(shard: int) -> str:
    return f"shard-{shard:03d}"


def shard_column(keys: pl.Series, shards: int) -> pl.Series:
    """The shard of each key, hashing each distinct key once."""
    uniques = keys.unique()
    table = {k: zlib.crc32(k.encode()) % shards for k in uniques.to_list()}
    return keys.replace_strict(table, return_dtype=pl.UInt32).alias("shard")


@dataclass(slots=True)
class ShardInput:
    """What one source partition's batch brings to one shard: its watermark and partial state."""

    partition: str
    watermark_ms: int
    partials: pl.DataFrame | None = None


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


def split_by_shard(partials: pl.DataFrame, shard_of: pl.Series) -> dict[int, pl.DataFrame]:
    if partials.height == 0:
        return {}
    parts = partials.with_columns(shard_of).partition_by("shard", as_dict=True, include_key=False)
    return {key[0]: frame for key, frame in parts.items()}
