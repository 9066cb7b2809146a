import pickle
from datetime import UTC, datetime

import polars as pl
import pytest

from operators.model import arrow_columns
from operators.sessions import (
    SESSION_SCHEMA,
    SessionState,
    python_session_partials,
    session_partials,
)

both_tables = pytest.mark.usefixtures("session_engine")

T0 = 1_700_000_000
GAP = 1800


def events(rows):
    """rows: (session_id, epoch_s, user_id)"""
    return pl.DataFrame(
        {
            "session_id": [r[0] for r in rows],
            "tenant": ["acme"] * len(rows),
            "user_id": [r[2] for r in rows],
            "timestamp": [datetime.fromtimestamp(r[1], UTC) for r in rows],
        },
        schema={
            "session_id": pl.String,
            "tenant": pl.String,
            "user_id": pl.String,
            "timestamp": pl.Datetime("ms", "UTC"),
        },
    )


def dicts(frame: pl.DataFrame) -> list[dict]:
    """A shard's output rows, checked to be in the sessions' schema."""
    assert frame.schema == pl.Schema(SESSION_SCHEMA)
    return frame.to_dicts()


def partials(rows):
    return session_partials(events(rows), GAP * 1000, 1).get(0)


def test_python_partials_split_a_session_at_gaps():
    frame = python_session_partials(
        events(
            [
                ("s1", T0, "u"),
                ("s1", T0 + 100, None),
                ("s1", T0 + 100 + GAP + 1, "u"),
                ("s2", T0, None),
            ]
        ),
        GAP * 1000,
        1,
    )[0]
    got = sorted(frame)
    assert got == [
        ("s1", "acme", "u", T0 * 1000, (T0 + 100) * 1000, 2),
        ("s1", "acme", "u", (T0 + 101 + GAP) * 1000, (T0 + 101 + GAP) * 1000, 1),
        ("s2", "acme", None, T0 * 1000, T0 * 1000, 1),
    ]


@both_tables
def test_session_closes_after_gap_of_event_time_and_frees_state():
    state = SessionState(gap_ms=GAP * 1000, retention_ms=0)
    assert (
        dicts(state.apply("p0", T0 * 1000, partials([("s1", T0, "u"), ("s1", T0 + 60, "u")]))) == []
    )
    assert dicts(state.apply("p0", (T0 + 60 + GAP - 1) * 1000, None)) == []
    rows = dicts(state.apply("p0", (T0 + 60 + GAP) * 1000, None))
    assert rows == [
        {
            "tenant": "acme",
            "user_id": "u",
            "session_id": "s1",
            "start": "2023-11-14T22:13:20.000Z",
            "end": "2023-11-14T22:14:20.000Z",
            "duration_s": 60.0,
            "event_count": 2,
            "revision": 0,
        }
    ]
    assert len(state.table) == 0


@both_tables
def test_segments_from_different_batches_merge_within_gap():
    state = SessionState(gap_ms=GAP * 1000, retention_ms=0)
    state.apply("p0", T0 * 1000, partials([("s1", T0, "u")]))
    state.apply("p0", T0 * 1000, partials([("s1", T0 + GAP, None)]))
    (row,) = dicts(state.flush())
    assert (row["event_count"], row["duration_s"], row["user_id"]) == (2, GAP, "u")


@both_tables
def test_late_event_revises_a_closed_session():
    state = SessionState(gap_ms=GAP * 1000, retention_ms=86_400_000)
    state.apply("p0", T0 * 1000, partials([("s1", T0, "u"), ("s1", T0 + 10, "u")]))
    (first,) = dicts(state.apply("p0", (T0 + 10 + GAP) * 1000, None))
    (second,) = dicts(state.apply("p0", (T0 + 10 + GAP) * 1000, partials([("s1", T0 + 5, "u")])))
    assert (first["event_count"], first["revision"]) == (2, 0)
    assert (second["event_count"], second["revision"], second["start"]) == (3, 1, first["start"])
    # after retention the closed session is freed
    state.apply("p0", (T0 + 10 + GAP + 86_400) * 1000, None)
    assert len(state.table) == 0


@both_tables
def test_a_session_growing_batch_by_batch_keeps_one_deadline_and_closes_at_its_last_event():
    state = SessionState(gap_ms=GAP * 1000, retention_ms=86_400_000)
    for i in range(100):  # live input: one event per batch, the watermark following event time
        t = T0 + 60 * i
        assert dicts(state.apply("p0", t * 1000, partials([("s1", t, "u")]))) == []
    assert len(state.table.deadlines) == 1
    last = T0 + 60 * 99
    assert dicts(state.apply("p0", (last + GAP - 1) * 1000, None)) == []  # early entry pushed again
    (row,) = dicts(state.apply("p0", (last + GAP) * 1000, None))
    assert (row["event_count"], row["duration_s"], row["revision"]) == (100, 60 * 99, 0)
    assert dicts(state.apply("p0", (last + GAP + 3600) * 1000, None)) == []


@both_tables
def test_an_event_within_the_gap_after_a_close_reopens_the_session_until_its_new_close():
    state = SessionState(gap_ms=GAP * 1000, retention_ms=86_400_000)
    state.apply("p0", T0 * 1000, partials([("s1", T0, "u")]))
    (first,) = dicts(state.apply("p0", (T0 + GAP) * 1000, None))
    # late, but within the gap of the closed session: it grows, and closes again GAP after it
    assert dicts(state.apply("p0", (T0 + GAP) * 1000, partials([("s1", T0 + 100, "u")]))) == []
    assert dicts(state.apply("p0", (T0 + 100 + GAP - 1) * 1000, None)) == []
    (second,) = dicts(state.apply("p0", (T0 + 100 + GAP) * 1000, None))
    assert (first["event_count"], first["revision"]) == (1, 0)
    assert (second["event_count"], second["revision"], second["duration_s"]) == (2, 1, 100.0)


@both_tables
def test_a_pickled_state_keeps_every_segment_and_derives_its_deadlines():
    state = SessionState(gap_ms=GAP * 1000, retention_ms=86_400_000)
    state.apply("p0", T0 * 1000, partials([("s1", T0, "u"), ("sé✓", T0, None), ("s3", T0, "")]))
    emitted = dicts(state.apply("p0", (T0 + GAP) * 1000, None))
    state.apply("p0", (T0 + GAP) * 1000, partials([("s1", T0 + 2 * GAP + 5, "v")]))

    restored = pickle.loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    assert sorted(restored.table.groups()) == sorted(state.table.groups())
    expires = (T0 + GAP) * 1000 + 86_400_000
    assert sorted(restored.table.deadlines) == [
        ((T0 + 3 * GAP + 5) * 1000, "s1"),  # its second segment closes before the first expires
        (expires, "s3"),
        (expires, "sé✓"),
    ]
    assert sorted((r["session_id"], r["user_id"]) for r in emitted) == [
        ("s1", "u"),
        ("s3", ""),
        ("sé✓", None),
    ]
    assert dicts(restored.apply("p0", (T0 + 3 * GAP + 5) * 1000, None)) == dicts(
        state.apply("p0", (T0 + 3 * GAP + 5) * 1000, None)
    )


@both_tables
def test_a_table_seals_only_what_changed_and_restores_its_chunks_as_they_are():
    state = SessionState(gap_ms=GAP * 1000, retention_ms=86_400_000)
    state.apply("p0", T0 * 1000, partials([(f"s{i}", T0 + i, "u") for i in range(8)]))
    first = state.table.seal()
    assert state.table.seal() == first  # nothing changed: the same chunks, nothing new
    state.apply("p0", T0 * 1000, partials([("s0", T0 + 9, "u")]))
    second = state.table.seal()
    assert second[: len(first)] == first and len(second) == len(first) + 1
    assert state.snapshot_stats() == {
        "chunks": 2,
        "bytes": sum(map(len, second)),
        "entries": 9,  # s0 twice: its first version is dead in the first chunk
        "live": 8,
    }

    restored = pickle.loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    assert sorted(restored.table.groups()) == sorted(state.table.groups())
    assert restored.snapshot_stats() == state.snapshot_stats()
    assert restored.table.seal() == second  # taken over as they were


@both_tables
def test_every_segment_of_a_restored_session_id_expires_on_time():
    # Two closed sessions under one id: restored, the id has one deadline entry (the earlier
    # expiry); the later session must still be freed at its own expiry, not linger.
    retention_ms = 8 * GAP * 1000
    state = SessionState(gap_ms=GAP * 1000, retention_ms=retention_ms)
    state.apply("p0", T0 * 1000, partials([("s1", T0, "u"), ("s1", T0 + 3 * GAP, "u")]))
    state.apply("p0", (T0 + 4 * GAP) * 1000, None)  # both closed and emitted
    restored = pickle.loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    for current in (state, restored):
        first_expiry = (T0 + GAP) * 1000 + retention_ms
        current.apply("p0", first_expiry, None)
        assert [start for _, _, start, *_ in dict(current.table.groups())["s1"]] == [
            (T0 + 3 * GAP) * 1000
        ]
        current.apply("p0", first_expiry + 3 * GAP * 1000, None)
        assert "s1" not in current.table
        assert current.table.deadlines == []


@pytest.mark.usefixtures("compiled_sessions")
def test_compiled_session_events_cross_processes_as_pickles():
    rows = [("s1", T0, "u"), ("sé✓", T0 + 1, None), ("s3", T0 + 2, ""), (None, T0, "x")]
    by_shard = session_partials(events(rows), GAP * 1000, 2)
    assert sum(len(e) for e in by_shard.values()) == 3  # the event without a session is left out
    for shard_events in by_shard.values():
        copy = pickle.loads(pickle.dumps(shard_events))
        states = [SessionState(gap_ms=GAP * 1000, retention_ms=0) for _ in range(2)]
        states[0].apply("p0", T0 * 1000, shard_events)
        states[1].apply("p0", T0 * 1000, copy)
        assert dicts(states[0].flush()) == dicts(states[1].flush()) != []
        state = shard_events.__getstate__()
        with pytest.raises(ValueError, match="truncated"):
            copy.__setstate__(state[:-3])
        with pytest.raises(ValueError, match="trailing"):
            copy.__setstate__(state + b"\0")


def test_compiled_session_events_refuse_columns_they_do_not_know(compiled_sessions):
    frame = events([("s1", T0, "u")]).select(
        "session_id", "tenant", "user_id", pl.col("timestamp").dt.epoch("s")
    )
    _arrays, columns = arrow_columns(frame, string_views=True)
    with pytest.raises(ValueError, match="expected"):
        compiled_sessions.session_events(1, columns[::-1], 1)
    with pytest.raises(ValueError, match="shards"):
        compiled_sessions.session_events(1, columns, 0)
