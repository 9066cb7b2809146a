"""The shard logic reports what its snapshots weigh, summed over the shards of a kind."""

import pickle

from dataflows import metrics
from operators.sessions import SessionState
from operators.stateful import _ShardLogic
from operators.windows import WindowState

T0 = 1_700_000_000_000


def test_snapshot_bytes_are_summed_per_kind_over_the_shards():
    recorder = metrics.InMemoryMetrics()
    metrics.install(recorder)
    try:
        windows = [_ShardLogic(WindowState(retention_ms=60_000)) for _ in range(2)]
        sessions = _ShardLogic(SessionState(gap_ms=60_000, retention_ms=60_000))
        windows[0].on_batch([])  # an empty delivery changes nothing
        windows[1]._state.apply("p0", T0, [("acme", "click", T0, 3, ["u1", "u2"])])
        sizes = [len(logic.snapshot()) for logic in windows]
        assert recorder.value("pipeline_state_snapshot_bytes", kind="window_cells") == sum(sizes)
        snapshot = sessions.snapshot()
        assert recorder.value("pipeline_state_snapshot_bytes", kind="open_sessions") == len(
            snapshot
        )
        assert pickle.loads(snapshot).state_size() == 0
    finally:
        metrics.install(None)
