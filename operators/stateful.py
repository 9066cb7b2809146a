"""Bytewax operators over the pure state machines in `event_time`, `windows` and `sessions`.

`event_time_gate` runs once per source partition: it marks late events, pre-aggregates the batch
and sends every shard its partials together with the partition's watermark. `sharded_state` runs
one state machine (windows or sessions) per shard key and emits the rows it produces.
"""

from __future__ import annotations

import pickle
import threading
import time
import weakref
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic

from dataflows import metrics
from operators.event_time import END_WATERMARK, NO_WATERMARK, ClockState, PartitionClock
from operators.model import EventBatch, Rows
from operators.placement import colocated_key
from operators.sessions import session_partials
from operators.sharding import ShardInput, shard_key
from operators.windows import window_partials


@dataclass(frozen=True)
class GateConfig:
    allowed_lateness_s: float
    idle_close_s: float
    max_future_s: float
    count_late: bool  # False under the `drop` late policy: late events stay out of aggregates
    session_gap_s: float
    shards: int


@dataclass(frozen=True)
class GateOut:
    late: Stream[tuple[str, pl.DataFrame]]  # keyed by source partition
    windows: Stream[tuple[str, ShardInput]]
    sessions: Stream[tuple[str, ShardInput]]


class _EventTimeLogic(StatefulBatchLogic[EventBatch, tuple, ClockState]):
    def __init__(self, config: GateConfig, resume: ClockState | None):
        self._config = config
        self._clock = PartitionClock(
            allowed_lateness_s=config.allowed_lateness_s,
            idle_close_s=config.idle_close_s,
            max_future_s=config.max_future_s,
            state=resume,
        )

    def on_batch(self, batches: list[EventBatch]):
        out: list[tuple] = []
        late_count = ahead_count = 0
        for batch in batches:
            self._clock.state.partition = batch.partition
            late = self._clock.observe(batch.events)
            ahead_count += self._clock.last_ahead
            late_here = int(late.sum())
            if late_here:
                late_count += late_here
                out.append(("late", (batch.partition, batch.events.filter(late))))
            counted = batch.events if self._config.count_late else batch.events.filter(~late)
            out.extend(self._to_shards(counted))
        m = metrics.get()
        if late_count:
            m.late_events(late_count)
        if ahead_count:
            m.events_ahead(ahead_count)
        self._report_lag(m)
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self):
        if not self._clock.state.partition:
            return (), StatefulBatchLogic.RETAIN
        advanced = self._clock.advance_if_idle()
        self._report_lag(metrics.get())
        if advanced:
            return self._to_shards(None), StatefulBatchLogic.RETAIN
        return (), StatefulBatchLogic.RETAIN

    def _report_lag(self, m: metrics.Metrics) -> None:
        """`pipeline_event_time_lag_seconds`: wall clock minus this partition's watermark."""
        watermark = self._clock.watermark_ms
        if NO_WATERMARK < watermark < END_WATERMARK:
            m.event_time_lag(self._clock.state.partition, time.time() - watermark / 1000)

    def notify_at(self) -> datetime:
        return datetime.fromtimestamp(self._clock.idle_deadline(), UTC)

    def snapshot(self) -> ClockState:
        return replace(self._clock.state)

    def _to_shards(self, events: pl.DataFrame | None) -> list[tuple]:
        cfg = self._config
        windows = window_partials(events, cfg.shards) if events is not None else {}
        sessions = (
            session_partials(events, int(cfg.session_gap_s * 1000), cfg.shards)
            if events is not None
            else {}
        )
        watermark = self._clock.watermark_ms
        partition = self._clock.state.partition
        out = []
        for shard in range(cfg.shards):
            key = shard_key(shard)
            out.append(("windows", (key, ShardInput(partition, watermark, windows.get(shard)))))
            out.append(
                (
                    "sessions",
                    (key, ShardInput(partition, watermark, sessions.get(shard))),
                )
            )
        return out


def _select(tag: str):
    return lambda item: item[1] if item[0] == tag else None


@operator
def event_time_gate(step_id: str, up: Stream[EventBatch], config: GateConfig) -> GateOut:
    """Mark late events and send each shard its partials plus the partition's watermark.

    The clock of a partition runs on the worker that reads the partition (`colocated_key`), so a
    batch's frame is not sent to another process to be looked at. (The step was called `clock`
    while it was keyed by the partition name; a recovery store from then resumes with fresh
    clocks, see docs/runbook.md.)"""
    keyed = op.key_on("by_partition", up, lambda batch: colocated_key(batch.partition))
    tagged = op.key_rm(
        "unkey",
        op.stateful_batch("partition_clock", keyed, lambda resume: _EventTimeLogic(config, resume)),
    )
    return GateOut(
        late=op.filter_map("late", tagged, _select("late")),
        windows=op.filter_map("windows", tagged, _select("windows")),
        sessions=op.filter_map("sessions", tagged, _select("sessions")),
    )


class ShardState(Protocol):
    state_kind: str  # the `kind` label of `pipeline_state_size`

    # rows: a frame (sessions) or dicts (windows)
    def apply_all(self, inputs: list[tuple[str, int, list[tuple] | None]]) -> Rows: ...
    def flush(self) -> Rows: ...
    def state_size(self) -> int: ...


class _StateSizes:
    """A figure of every shard in this process, summed per kind: the state it holds
    (`pipeline_state_size`) or the bytes of its last snapshot (`pipeline_state_snapshot_bytes`).

    Each shard reports its own figure; the gauge is set to the sum over the shards alive in this
    process (a shard whose logic is gone drops out).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: dict[str, weakref.WeakKeyDictionary[object, int]] = {}

    def report(self, kind: str, shard: object, size: int) -> int:
        with self._lock:
            sizes = self._sizes.setdefault(kind, weakref.WeakKeyDictionary())
            sizes[shard] = size
            return sum(sizes.values())


_STATE_SIZES = _StateSizes()
_SNAPSHOT_BYTES = _StateSizes()


class _ShardLogic(StatefulBatchLogic[ShardInput, Rows, bytes]):
    def __init__(self, state: ShardState):
        self._state = state

    def on_batch(self, inputs: list[ShardInput]):
        rows = self._state.apply_all([(i.partition, i.watermark_ms, i.partials) for i in inputs])
        self._report_size()
        return ([rows] if len(rows) else ()), StatefulBatchLogic.RETAIN

    def on_eof(self):
        rows = self._state.flush()
        self._report_size()
        return ([rows] if len(rows) else ()), StatefulBatchLogic.RETAIN

    def _report_size(self) -> None:
        kind = self._state.state_kind
        metrics.get().state_size(kind, _STATE_SIZES.report(kind, self, self._state.state_size()))

    def snapshot(self) -> bytes:
        # Pickling here is the immutable copy Bytewax asks for, made once.
        data = pickle.dumps(self._state, protocol=pickle.HIGHEST_PROTOCOL)
        kind = self._state.state_kind
        metrics.get().state_snapshot_bytes(kind, _SNAPSHOT_BYTES.report(kind, self, len(data)))
        return data


@operator
def sharded_state(
    step_id: str, up: Stream[tuple[str, ShardInput]], new_state
) -> Stream[tuple[str, Rows]]:
    """Run one `new_state()` machine per shard key; emits `(shard_key, rows)` per batch."""
    return op.stateful_batch(
        "shard",
        up,
        lambda resume: _ShardLogic(pickle.loads(resume) if resume is not None else new_state()),
    )
