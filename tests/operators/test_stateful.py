"""The shard logic reports what its snapshots weigh, summed over the shards of a kind."""

import pickle

import polars as pl

from dataflows import metrics
from operators.sessions import SessionState
from operators.stateful import _ShardLogic
from operators.windows import WindowState, window_partials

T0 = 1_700_000_000_000


def test_snapshot_bytes_are_summed_per_kind_over_the_shards():
    recorder = metrics.InMemoryMetrics()
    metrics.install(recorder)
    try:
        windows = [_ShardLogic(WindowState(retention_ms=60_000)) for _ in range(2)]
        sessions = _ShardLogic(SessionState(gap_ms=60_000, retention_ms=60_000))
        windows[0].on_batch([])  # an empty delivery changes nothing
        events = pl.DataFrame(
            {
                "tenant": "acme",
                "type": "click",
                "timestamp": [T0] * 3,
                "user_id": ["u1", "u2", "u1"],
            }
        ).with_columns(pl.col("timestamp").cast(pl.Datetime("ms", "UTC")))
        windows[1]._state.apply("p0", T0, window_partials(events, 1)[0])
        sizes = [len(logic.snapshot()) for logic in windows]
        assert recorder.value("pipeline_state_snapshot_bytes", kind="window_cells") == sum(sizes)
        snapshot = sessions.snapshot()
        assert recorder.value("pipeline_state_snapshot_bytes", kind="open_sessions") == len(
            snapshot
        )
        assert pickle.loads(snapshot).state_size() == 0
    finally:
        metrics.install(None)
