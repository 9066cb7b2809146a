import pickle
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
import pytest

from operators import windows
from operators.sessions import session_partials
from operators.windows import WindowState, python_window_partials, window_partials

both_tables = pytest.mark.usefixtures("window_engine")
python_table = pytest.mark.usefixtures("python_windows")

T0 = 1_699_999_980  # 2023-11-14T22:13:00Z, a multiple of 60 but not of 300


def events(rows):
    """rows: (tenant, type, epoch_s, user_id)"""
    return pl.DataFrame(
        {
            "tenant": [r[0] for r in rows],
            "type": [r[1] for r in rows],
            "timestamp": [datetime.fromtimestamp(r[2], UTC) for r in rows],
            "user_id": [r[3] for r in rows],
        },
        schema={
            "tenant": pl.String,
            "type": pl.String,
            "timestamp": pl.Datetime("ms", "UTC"),
            "user_id": pl.String,
        },
    )


def one_shard(frame):
    parts = window_partials(frame, 1)
    return parts.get(0)


def chunk_users(state, key):
    """A cell's users as a snapshot chunk holds them (both tables write the same)."""
    return state.table.encode([key])["users"][0]


def by_window(rows):
    return {(r["window"], r["window_start"]): r for r in rows}


def test_partials_count_and_distinct_users_per_minute():
    frame = events(
        [("a", "click", T0 + 1, "u1"), ("a", "click", T0 + 2, "u1"), ("a", "click", T0 + 61, None)]
    )
    (partials,) = python_window_partials(frame, 1).values()
    got = {start: (count, sorted(users)) for _, _, start, count, users in partials}
    assert got == {T0 * 1000: (2, ["u1"]), (T0 + 60) * 1000: (1, [])}


def test_shards_split_keys_stably():
    frame = events([(f"t{i}", "click", T0, "u") for i in range(50)])
    parts = python_window_partials(frame, 4)
    assert sum(len(rows) for rows in parts.values()) == 50
    again = python_window_partials(frame, 4)
    assert {k: sorted(row[0] for row in rows) for k, rows in parts.items()} == {
        k: sorted(row[0] for row in rows) for k, rows in again.items()
    }


def test_compiled_events_go_to_the_shards_of_the_python_partials(compiled_windows):
    """Events of each tenant and type land in the shard the Python partials put them in (a
    recovery store's shards stay valid whichever table wrote it)."""
    frame = events([(f"t{i}", ["click", "view"][i % 2], T0 + i, f"u{i % 7}") for i in range(200)])
    python = {
        shard: sorted((row[0], row[1]) for row in rows)
        for shard, rows in python_window_partials(frame, 5).items()
    }
    compiled_parts = window_partials(frame, 5)
    assert sorted(compiled_parts) == sorted(python)
    for shard, shard_events in compiled_parts.items():
        assert len(shard_events) == len(python[shard])
        table = compiled_windows.WindowTable(0)
        table.absorb(pickle.loads(pickle.dumps(shard_events)))  # as it crosses processes
        emitted = table.emit(windows.END_WATERMARK)
        assert sorted({(r["tenant"], r["event_type"]) for r in emitted}) == python[shard]


@both_tables
def test_window_tables_take_the_same_input_whatever_its_shape():
    """Tenants and types as categoricals, user ids all null, and empty batches."""
    frame = events([("a", "click", T0 + 1, None), ("b", "view", T0 + 2, None)]).with_columns(
        pl.col("tenant", "type").cast(pl.Categorical)
    )
    state = WindowState(retention_ms=0)
    assert window_partials(frame.clear(), 3) == {}
    for shard_input in window_partials(frame, 1).values():
        state.apply("p0", T0 * 1000, shard_input)
    rows = [(r["tenant"], r["window"], r["count"], r["unique_users"]) for r in state.flush()]
    assert sorted(rows) == [(t, w, 1, 0) for t in "ab" for w in ("1h", "1m", "5m")]


@both_tables
def test_window_emits_once_when_watermark_passes_its_end():
    state = WindowState(retention_ms=86_400_000)
    frame = events([("a", "click", T0 + 5, "u1"), ("a", "click", T0 + 10, "u2")])
    assert state.apply("p0", (T0 + 59) * 1000, one_shard(frame)) == []
    rows = state.apply("p0", (T0 + 60) * 1000, None)
    assert rows == [
        {
            "tenant": "a",
            "event_type": "click",
            "window": "1m",
            "window_start": "2023-11-14T22:13:00.000Z",
            "window_end": "2023-11-14T22:14:00.000Z",
            "count": 2,
            "unique_users": 2,
            "revision": 0,
        }
    ]
    assert state.apply("p0", (T0 + 61) * 1000, None) == []


@both_tables
def test_late_event_reemits_closed_window_with_next_revision_and_total():
    state = WindowState(retention_ms=86_400_000)
    state.apply("p0", (T0 + 120) * 1000, one_shard(events([("a", "click", T0 + 5, "u1")])))
    rows = state.apply("p0", (T0 + 120) * 1000, one_shard(events([("a", "click", T0 + 7, "u2")])))
    one_minute = by_window(rows)[("1m", "2023-11-14T22:13:00.000Z")]
    assert (one_minute["count"], one_minute["unique_users"], one_minute["revision"]) == (2, 2, 1)
    # the 5m window [22:10, 22:15) closed too and is revised; the 1h window is still open
    assert [(r["window"], r["revision"]) for r in rows] == [("1m", 1), ("5m", 1)]


@both_tables
def test_watermark_is_the_lowest_partition():
    state = WindowState(retention_ms=0)
    frame = one_shard(events([("a", "click", T0 + 5, "u1")]))
    assert state.apply("p0", (T0 + 3600) * 1000, frame) != []  # only p0 known: closes
    state2 = WindowState(retention_ms=0)
    state2.apply("p1", (T0 + 30) * 1000, None)
    assert state2.apply("p0", (T0 + 3600) * 1000, frame) == []  # p1 holds it back
    assert len(state2.apply("p1", (T0 + 60) * 1000, None)) == 1


@both_tables
def test_windows_past_retention_are_freed_and_never_reemitted_as_new():
    state = WindowState(retention_ms=60_000)
    frame = one_shard(events([("a", "click", T0 + 5, "u1")]))
    state.apply("p0", (T0 + 4 * 3600) * 1000, frame)
    assert state.state_size() == 0
    assert state.apply("p0", (T0 + 4 * 3600) * 1000, frame) == []
    assert state.dropped_events == 3  # one event, counted once per window size


@both_tables
def test_flush_emits_everything_open():
    state = WindowState(retention_ms=0)
    state.apply("p0", T0 * 1000, one_shard(events([("a", "click", T0 + 5, "u1")])))
    assert sorted(r["window"] for r in state.flush()) == ["1h", "1m", "5m"]


@both_tables
def test_emitted_cells_keep_users_packed_and_late_users_count_once():
    state = WindowState(retention_ms=86_400_000)
    first = events(
        [("a", "click", T0 + 5, "u1"), ("a", "click", T0 + 6, ""), ("a", "click", T0 + 7, None)]
    )
    state.apply("p0", (T0 + 60) * 1000, one_shard(first))
    key = ("a", "click", "1m", T0 * 1000)
    assert sorted(chunk_users(state, key).split("\x00")) == ["", "", "", "u1"]  # one string
    late = events(
        [("a", "click", T0 + 8, "u1"), ("a", "click", T0 + 9, "u2"), ("a", "click", T0 + 9, "")]
    )
    (row,) = [
        r for r in state.apply("p0", (T0 + 60) * 1000, one_shard(late)) if r["window"] == "1m"
    ]
    assert (row["count"], row["unique_users"], row["revision"]) == (6, 3, 1)
    odd = events([("a", "click", T0 + 10, "x\x00y")])  # holds the separator: back to a set
    (row,) = [r for r in state.apply("p0", (T0 + 60) * 1000, one_shard(odd)) if r["window"] == "1m"]
    assert (row["unique_users"], chunk_users(state, key)) == (4, {"u1", "", "u2", "x\x00y"})


@both_tables
def test_a_burst_of_late_users_into_a_closed_window_counts_each_once():
    """More users than are searched for one by one: added through one set, same result."""
    state = WindowState(retention_ms=86_400_000)
    first = [("a", "click", T0 + 5, f"u{i}") for i in range(300)]
    state.apply("p0", (T0 + 60) * 1000, one_shard(events(first)))
    # 200 users, 100 of them new, each twice, and one more event of an old user
    late = [("a", "click", T0 + 6, f"u{i}") for i in range(200, 400)] * 2
    late.append(("a", "click", T0 + 7, "u0"))
    (row,) = [
        r
        for r in state.apply("p0", (T0 + 60) * 1000, one_shard(events(late)))
        if r["window"] == "1m"
    ]
    assert (row["count"], row["unique_users"], row["revision"]) == (701, 400, 1)
    users = chunk_users(state, ("a", "click", "1m", T0 * 1000))
    assert isinstance(users, str)
    assert sorted(users.split("\x00")[1:-1]) == sorted(f"u{i}" for i in range(400))


@python_table
def test_an_open_cell_snapshots_its_users_by_extending_the_text_packed_before():
    key = ("a", "click", "1h", (T0 - T0 % 3600) * 1000)
    state = WindowState(retention_ms=86_400_000)

    def add(*users):
        state.apply("p0", T0 * 1000, one_shard(events([("a", "click", T0, u) for u in users])))

    def restored_users():
        return pickle.loads(pickle.dumps(state)).table.cells[key].users

    add("u1", "")
    assert restored_users() == {"u1", ""}
    packed = state.table.cells[key].packed
    add("u2", "u1")  # u1 is no news
    assert state.table.cells[key].added == ["u2"]
    assert restored_users() == {"u1", "", "u2"}
    assert state.table.cells[key].packed == packed + "u2\x00"  # extended, not packed anew
    add("x\x00y")  # holds the separator: the snapshot pickles the set from now on
    assert restored_users() == {"u1", "", "u2", "x\x00y"}
    assert state.table.cells[key].packed is None
    add("u3")
    assert restored_users() == {"u1", "", "u2", "x\x00y", "u3"}
    (row,) = [r for r in state.flush() if r["window"] == "1h"]
    assert row["unique_users"] == 5


def test_compiled_events_refuse_text_that_is_not_utf8(compiled_windows):
    """Arrow text is UTF-8; what is not (bytes handed over as text) is refused, not misread."""
    text = pa.array(["acme", "acme"], type=pa.string_view())
    not_utf8 = pa.array([b"\xffclick", b"click"], type=pa.binary_view()).view(pa.string_view())
    times = pa.array([T0 * 1000, T0 * 1000], type=pa.int64())
    named = {"tenant": text, "type": not_utf8, "user_id": text, "timestamp": times}
    columns = [
        (
            name,
            str(a.type),
            a.offset,
            [None if b is None else (b.address, b.size) for b in a.buffers()],
        )
        for name, a in named.items()
    ]
    with pytest.raises(ValueError, match="text is not UTF-8"):
        compiled_windows.window_events(2, columns, 2)


def test_a_compiled_table_refuses_the_events_of_the_other_table(compiled_windows):
    """Session and window events have the same shape (three text columns and the time), not the
    same columns: each table takes only its own, also after a round trip through pickle."""
    frame = events([("a", "click", T0, "u1")]).with_columns(pl.lit("s1").alias("session_id"))
    (session_events,) = session_partials(frame, 60_000, 1).values()
    with pytest.raises(ValueError, match="shard events of Sessions, expected Windows"):
        compiled_windows.WindowTable(0).absorb(pickle.loads(pickle.dumps(session_events)))
