from datetime import UTC, datetime

import polars as pl

from operators.event_time import NO_WATERMARK, ClockState, PartitionClock


def frame(*epoch_s: float) -> pl.DataFrame:
    stamps = [datetime.fromtimestamp(s, UTC) for s in epoch_s]
    return pl.DataFrame({"timestamp": stamps}, schema={"timestamp": pl.Datetime("ms", "UTC")})


class FakeWall:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_watermark_trails_max_event_time_by_allowed_lateness():
    clock = PartitionClock(allowed_lateness_s=60, idle_close_s=30)
    assert clock.watermark_ms == NO_WATERMARK
    late = clock.observe(frame(1000, 1100, 1050))
    assert late.to_list() == [False, False, False]
    assert clock.watermark_ms == (1100 - 60) * 1000


def test_late_is_decided_row_by_row_independent_of_batching():
    times = [1000, 1100, 1030, 1041, 1200, 1139, 1141]
    expected = [False, False, True, False, False, True, False]
    one_batch = PartitionClock(allowed_lateness_s=60, idle_close_s=30)
    assert one_batch.observe(frame(*times)).to_list() == expected
    row_by_row = PartitionClock(allowed_lateness_s=60, idle_close_s=30)
    assert [row_by_row.observe(frame(t)).item() for t in times] == expected
    assert one_batch.state == row_by_row.state


def test_watermark_never_goes_back():
    clock = PartitionClock(allowed_lateness_s=0, idle_close_s=30)
    clock.observe(frame(2000))
    clock.observe(frame(1000))
    assert clock.watermark_ms == 2_000_000


def test_idle_partition_advances_with_wall_clock_only_after_idle_close():
    wall = FakeWall(10_000.0)
    clock = PartitionClock(allowed_lateness_s=60, idle_close_s=30, wall_clock=wall)
    clock.observe(frame(5000))
    wall.now += 29
    assert not clock.advance_if_idle()
    wall.now += 1
    assert clock.advance_if_idle()
    assert clock.watermark_ms == ((10_030 - 60) * 1000)
    # the next check waits another idle period instead of spinning
    assert clock.idle_deadline() == 10_060


def test_resume_restores_event_time_watermark_without_downtime():
    wall = FakeWall(10_000.0)
    first = PartitionClock(allowed_lateness_s=60, idle_close_s=30, wall_clock=wall)
    first.observe(frame(5000))
    saved = ClockState(**{f: getattr(first.state, f) for f in first.state.__slots__})
    wall.now += 3600  # an hour of downtime
    resumed = PartitionClock(allowed_lateness_s=60, idle_close_s=30, state=saved, wall_clock=wall)
    assert resumed.watermark_ms == (5000 - 60) * 1000
    assert not resumed.advance_if_idle()  # the idle timer restarts on resume
    assert resumed.observe(frame(4950)).to_list() == [False]


def test_an_event_far_ahead_of_its_ingestion_moves_the_watermark_only_max_future_past_it():
    def ingested(*pairs: tuple[float, float]) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "timestamp": [datetime.fromtimestamp(t, UTC) for t, _ in pairs],
                "ingested_at": [datetime.fromtimestamp(i, UTC) for _, i in pairs],
            },
            schema={"timestamp": pl.Datetime("ms", "UTC"), "ingested_at": pl.Datetime("ms", "UTC")},
        )

    clock = PartitionClock(allowed_lateness_s=60, idle_close_s=30, max_future_s=10)
    # a client three hours ahead, then on-time events: none of them is late
    late = clock.observe(ingested((1000, 1000), (1000 + 3 * 3600, 1001), (1002, 1002), (990, 1003)))
    assert late.to_list() == [False, False, False, False]
    assert clock.last_ahead == 1
    assert clock.watermark_ms == (1001 + 10 - 60) * 1000
    # the watermark follows the events' time, up to 10 s past their ingestion
    assert clock.observe(ingested((1005, 1030), (1200, 1031))).to_list() == [False, False]
    assert clock.last_ahead == 1  # 1200 is more than 10 s past 1031
    assert clock.watermark_ms == (1031 + 10 - 60) * 1000
    assert clock.observe(ingested((975, 1040), (985, 1040))).to_list() == [True, False]
    assert clock.last_ahead == 0
    # unbounded, the event three hours ahead makes the rest of the stream late
    unbounded = PartitionClock(allowed_lateness_s=60, idle_close_s=30)
    unbounded.observe(ingested((1000, 1000), (1000 + 3 * 3600, 1001)))
    assert unbounded.observe(ingested((1002, 1002))).to_list() == [True]
