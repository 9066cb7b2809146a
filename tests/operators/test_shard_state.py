"""Window and session state over a longer random stream: exact totals, and snapshots (taken every
batch, and in the layouts written before the chunks) that resume exactly where an uninterrupted run
goes."""

import pickle
import random

import polars as pl
import pytest

from operators import sessions as sessions_module
from operators import windows as windows_module
from operators.event_time import PartitionClock
from operators.model import as_dicts
from operators.sessions import Session, SessionState, session_partials
from operators.windows import Cell, WindowState, window_partials
from tests.dataflows import truth
from tests.operators.conftest import COMPILED

T0 = 1_700_000_000_000
GAP_MS = 600_000
SHARDS = 3
# "" and an id containing the separator of packed user sets must count like any other id
USERS = [f"u{i}" for i in range(40)] + ["", "x\x00y", None]


def session_id(rng: random.Random, stamp: int) -> str | None:
    """Ten ids active in alternate quarter hours: a session closes, its id comes back after more
    than the gap (another session), and a late event in between can join the two."""
    if rng.random() < 0.1:
        return None
    return f"s{(stamp // 900_000) % 2 * 10 + rng.randrange(10)}"


def random_batches(seed: int, batches: int = 40, size: int = 150) -> list[pl.DataFrame]:
    """Events of a few tenants, types, users and sessions, 5% of them up to 50 minutes late; every
    timestamp distinct, so "the first event of a session" is never a tie."""
    rng = random.Random(seed)
    frames, now, used = [], T0, set()
    for _ in range(batches):
        rows = []
        for _ in range(size):
            now += rng.randrange(1, 4000)
            stamp = now - rng.randrange(60_000, 3_000_000) if rng.random() < 0.05 else now
            while stamp in used:
                stamp -= 1
            used.add(stamp)
            rows.append(
                {
                    "event_id": f"e{len(used)}",
                    "tenant": rng.choice(["acme", "globex"]),
                    "type": rng.choice(["click", "view"]),
                    "timestamp": stamp,
                    "user_id": rng.choice(USERS),
                    "session_id": session_id(rng, stamp),
                }
            )
        frames.append(
            pl.DataFrame(rows).with_columns(pl.col("timestamp").cast(pl.Datetime("ms", "UTC")))
        )
    return frames


def run(batches, retention_ms: int, resume_at: int | None = None, restore=None) -> list[list]:
    """Rows per step and shard, as the dataflow would emit them, then the events each state dropped
    past retention; at `resume_at` every state is replaced by `restore(state)`.

    Every state is snapshotted after every batch, as the dataflow does each epoch, so a snapshot
    is sealed from many chunks."""
    snapshots: dict[int, bytes] = {}
    clock = PartitionClock(allowed_lateness_s=60, idle_close_s=30)
    windows = [WindowState(retention_ms=retention_ms) for _ in range(SHARDS)]
    sessions = [SessionState(gap_ms=GAP_MS, retention_ms=retention_ms) for _ in range(SHARDS)]
    out = []
    for i, events in enumerate(batches):
        if i == resume_at:
            windows = [restore(state, snapshots) for state in windows]
            sessions = [restore(state, snapshots) for state in sessions]
        clock.observe(events)
        window_parts = window_partials(events, SHARDS)
        session_parts = session_partials(events, GAP_MS, SHARDS)
        for shard in range(SHARDS):
            out.append(windows[shard].apply("p0", clock.watermark_ms, window_parts.get(shard)))
            out.append(
                as_dicts(sessions[shard].apply("p0", clock.watermark_ms, session_parts.get(shard)))
            )
        for state in windows + sessions:
            snapshots[id(state)] = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    out.extend(as_dicts(state.flush()) for state in windows + sessions)
    out.append([state.dropped_events for state in windows + sessions])
    return out


def latest_snapshot(state, snapshots):
    """The state as its last snapshot holds it (the one a resumed dataflow loads)."""
    return pickle.loads(snapshots[id(state)])


class OldCell:
    """Pickles as a `Cell` did before it had `packed` and `added`: those stay unset on loading."""

    def __init__(self, count: int, users: set[str], revision: int):
        self.slots = {"count": count, "users": users, "revision": revision}

    def __reduce_ex__(self, protocol):
        return Cell.__new__, (Cell,), (None, self.slots)


def unpacked(users: set[str] | str) -> set[str]:
    return set(users.split("\x00")[1:-1]) if isinstance(users, str) else users


def old_layout(state, _snapshots):
    """The state as the previous version pickled it: its attributes, users as plain sets (and
    the sessions, without a table, as objects with their deadlines)."""
    attributes = {k: v for k, v in vars(state).items() if k not in ("log", "table")}
    attributes |= {"horizon_ms": state.horizon_ms, "dropped_events": state.dropped_events}
    if isinstance(state, SessionState):
        groups = state.table.groups()
        attributes["sessions"] = {sid: [Session(*s) for s in group] for sid, group in groups}
        attributes["deadlines"] = list(state.table.deadlines)
    if isinstance(state, WindowState):
        attributes["cells"] = {
            key: OldCell(count, unpacked(users), revision)
            for key, count, users, revision in state.table.entries()
        }
    restored = type(state).__new__(type(state))
    restored.__setstate__(pickle.loads(pickle.dumps(attributes)))
    return restored


def lists_layout(state, _snapshots):
    """The state as versions before the chunks pickled it: a list per column (sessions with the
    deadlines as they were)."""
    if isinstance(state, WindowState):
        entries = state.table.entries()
        keys, counts, users, revisions = zip(*entries, strict=True) if entries else [()] * 4
        attributes = {
            **{k: getattr(state, k) for k in ("retention_ms", "clock", "horizon_ms")},
            "dropped_events": state.dropped_events,
            "keys": list(keys),
            "counts": list(counts),
            "users": list(users),
            "revisions": list(revisions),
        }
        restored = WindowState.__new__(WindowState)
        restored.__setstate__(pickle.loads(pickle.dumps(attributes)))
        return restored
    groups = state.table.groups()
    segments = [s for _, group in groups for s in group]
    attributes = {
        **{k: getattr(state, k) for k in ("gap_ms", "retention_ms", "clock", "horizon_ms")},
        "dropped_events": state.dropped_events,
        "deadlines": list(state.table.deadlines),
        "session_ids": [sid for sid, _ in groups],
        "segments_per_id": [len(group) for _, group in groups],
        "segments": {name: [s[i] for s in segments] for i, name in enumerate(Session.__slots__)},
    }
    restored = SessionState.__new__(SessionState)
    restored.__setstate__(pickle.loads(pickle.dumps(attributes)))
    return restored


PYTHON_TABLES = (sessions_module.SessionTable, windows_module.WindowTable)


def other_engine(state, snapshots):
    """The state as its last snapshot holds it, loaded by the other table: a process with the
    compiled module resuming from a store written without it, or the other way round. The rest
    of the run goes on with that table."""
    module = windows_module if isinstance(state, WindowState) else sessions_module
    python_table = isinstance(state.table, PYTHON_TABLES)
    module.compiled = COMPILED[module] if python_table else None
    restored = latest_snapshot(state, snapshots)
    assert isinstance(restored.table, PYTHON_TABLES) != python_table
    return restored


@pytest.mark.usefixtures("table_engine")
def test_final_windows_and_sessions_are_exact():
    batches = random_batches(seed=7)
    *steps, dropped = run(batches, retention_ms=86_400_000)
    assert not any(dropped)
    rows = [row for step in steps for row in step]
    events = (
        pl.concat(batches).rename({"timestamp": "ts"}).with_columns(pl.col("ts").dt.epoch("ms"))
    )
    windows = [row for row in rows if "window" in row]
    assert truth.final_windows(windows) == truth.window_totals(events)
    assert any(row["revision"] for row in windows)  # late events corrected emitted windows
    sessions = [row for row in rows if "session_id" in row]
    assert truth.final_sessions(sessions) == truth.sessions(events, gap_ms=GAP_MS)


@pytest.mark.parametrize("retention_ms", [0, 1_200_000, 86_400_000])
@pytest.mark.parametrize("resume_at", [1, 17, 39])
@pytest.mark.parametrize("restore", [latest_snapshot, lists_layout, old_layout])
@pytest.mark.usefixtures("table_engine")
def test_a_restored_state_continues_like_an_uninterrupted_one(retention_ms, resume_at, restore):
    batches = random_batches(seed=resume_at)
    expected = run(batches, retention_ms)
    if retention_ms:
        assert any(row["revision"] for step in expected[:-1] for row in step)  # late corrections
    if retention_ms < 3_000_000:
        assert any(expected[-1])  # some late events were past retention
    assert run(batches, retention_ms, resume_at, restore) == expected


@pytest.mark.parametrize("retention_ms", [0, 1_200_000, 86_400_000])
@pytest.mark.parametrize("resume_at", [1, 17, 39])
@pytest.mark.usefixtures("table_engine")
def test_a_state_resumes_in_the_other_table(retention_ms, resume_at):
    batches = random_batches(seed=resume_at)
    expected = run(batches, retention_ms)
    assert run(batches, retention_ms, resume_at, other_engine) == expected


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.usefixtures("compiled_sessions", "compiled_windows")
def test_the_compiled_tables_emit_what_the_python_ones_do(seed, monkeypatch):
    """Step by step, on streams with ties in time (which event comes first decides a session's
    tenant and user; windows that end together are emitted in key order) and several shards."""
    rng = random.Random(seed)
    batches = [
        batch.with_columns(
            pl.col("timestamp") - pl.duration(milliseconds=pl.col("timestamp").dt.epoch("ms") % 7),
            pl.Series(
                "tenant", [rng.choice(["acme", "globex", "é✓"]) for _ in range(batch.height)]
            ),
        )
        for batch in random_batches(seed=seed, batches=30)
    ]
    compiled_run = run(batches, retention_ms=1_200_000)
    monkeypatch.setattr(sessions_module, "compiled", None)
    monkeypatch.setattr(windows_module, "compiled", None)
    assert compiled_run == run(batches, retention_ms=1_200_000)
