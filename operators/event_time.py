"""Event time per source partition: the watermark and which events are late.

The watermark of a partition is `max event time seen so far − allowed lateness`. It follows event
time only, so a catch-up or a replay of the same partition classifies every event exactly as live
processing did. An event is *late* when its timestamp is older than the watermark just before it
(row by row, in partition order, so the answer does not depend on how records were batched).

An event cannot move the watermark further than `max_future_s` past its `ingested_at` (for Kafka
input the record's broker timestamp, so a replay bounds it the same way): one event from a client
whose clock is hours ahead would otherwise close every open window and make the rest of the
stream late. The event itself keeps its timestamp and window.

One exception is wall time: when a partition has been idle for `idle_close_s`, its watermark may
advance to `now − allowed lateness`, so that a quiet stream's last windows still close. On resume
the idle timer restarts, so downtime never counts as idleness (unlike Bytewax's EventClock, which
adds the downtime to the watermark).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import polars as pl

# Watermark of a partition that has seen nothing yet: earlier than any event.
NO_WATERMARK = -(2**62)
# Watermark of a partition that has ended: later than any event; closes everything.
END_WATERMARK = 2**62


@dataclass(slots=True)
class ClockState:
    partition: str = ""
    max_event_ms: int = NO_WATERMARK
    watermark_ms: int = NO_WATERMARK


class PartitionClock:
    """Tracks one source partition's watermark and marks late events."""

    def __init__(
        self,
        *,
        allowed_lateness_s: float,
        idle_close_s: float,
        max_future_s: float | None = None,
        state: ClockState | None = None,
        wall_clock=time.time,
    ):
        self._lateness_ms = int(allowed_lateness_s * 1000)
        self._max_future_ms = None if max_future_s is None else int(max_future_s * 1000)
        self._idle_close_s = idle_close_s
        self._wall_clock = wall_clock
        self.state = state or ClockState()
        self.last_input_wall = wall_clock()
        self.last_ahead = 0  # events of the last batch beyond `max_future_s`
        self._last_idle_check = self.last_input_wall

    @property
    def watermark_ms(self) -> int:
        return self.state.watermark_ms

    def observe(self, events: pl.DataFrame) -> pl.Series:
        """Advance over `events` (in partition order) and return the boolean `late` mask."""
        self.last_input_wall = self._wall_clock()
        if events.height == 0:
            return pl.Series("late", [], dtype=pl.Boolean)
        ts = pl.col("timestamp").dt.epoch("ms")
        advance = ts  # how far each event moves the watermark
        ahead = pl.lit(0)
        if self._max_future_ms is not None:
            bound = pl.col("ingested_at").dt.epoch("ms") + self._max_future_ms
            advance = pl.min_horizontal(ts, bound)
            ahead = (ts > bound).sum()
        # Highest event time seen before each row: the running max shifted by one row,
        # starting from what earlier batches saw. One polars call for the whole batch.
        state = self.state
        seen_before = advance.cum_max().shift(1, fill_value=state.max_event_ms)
        watermark_before = (
            seen_before.clip(lower_bound=state.max_event_ms) - self._lateness_ms
        ).clip(lower_bound=state.watermark_ms)
        # one expression (a struct): polars hands a select of several to its thread pool
        marked = events.select(
            pl.struct(
                (ts < watermark_before).alias("late"),
                advance.max().alias("max"),
                ahead.alias("ahead"),
            ).alias("marked")
        ).unnest("marked")
        self.last_ahead = int(marked["ahead"][0])
        state.max_event_ms = max(state.max_event_ms, marked["max"][0])
        state.watermark_ms = max(state.watermark_ms, state.max_event_ms - self._lateness_ms)
        return marked["late"]

    def idle_deadline(self) -> float:
        """Wall time (epoch s) of the next idleness check."""
        return max(self.last_input_wall, self._last_idle_check) + self._idle_close_s

    def advance_if_idle(self) -> bool:
        """Move the watermark with the wall clock if the partition is idle; True if it moved."""
        now = self._wall_clock()
        if now < self.idle_deadline():
            return False
        self._last_idle_check = now
        wall_watermark = int(now * 1000) - self._lateness_ms
        if wall_watermark <= self.state.watermark_ms:
            return False
        self.state.watermark_ms = wall_watermark
        return True

    def end(self) -> None:
        """The partition has ended (end of a file): everything may close."""
        self.state.watermark_ms = END_WATERMARK
