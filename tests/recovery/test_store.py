"""Recovery store tooling on real stores written by the dataflow (file input, no servers)."""

from __future__ import annotations

import json
import pickle
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from bytewax.recovery import RecoveryConfig
from bytewax.testing import run_main

from bench.workload import generate_items
from connectors.files import read_json_lines
from dataflows.config import Settings
from dataflows.main import build
from recovery.__main__ import main
from recovery.inspect import describe
from recovery.rewind import parse_offsets, rewind_to_epoch
from recovery.store import (
    Store,
    StoreError,
    active_partitions,
    init_store,
    load_value,
)

STREAMS = ("enriched", "aggregates", "sessions", "late", "dlq")
EPOCH = timedelta(seconds=0.05)


def run_flow(
    input_path: Path, out: Path, store: Path, *, backup: timedelta | None = None, batch: int = 25
) -> None:
    settings = Settings(
        pipeline_input=f"file:{input_path}",
        pipeline_output_dir=out,
        pipeline_batch_size=batch,
    )
    run_main(
        build(settings),
        epoch_interval=EPOCH,
        recovery_config=RecoveryConfig(store, backup_interval=backup),
    )


def outputs(out: Path) -> dict[str, list[dict]]:
    return {name: list(read_json_lines(out / name)) for name in STREAMS}


@pytest.fixture(scope="module")
def events_file(tmp_path_factory) -> Path:
    items = generate_items(4000, seed=3, span_s=2 * 3600, late_fraction=0.02, bad_fraction=0.02)
    path = tmp_path_factory.mktemp("input") / "events.jsonl"
    path.write_bytes(b"".join(item.line + b"\n" for item in items))
    return path


@pytest.fixture(scope="module")
def finished_store(events_file, tmp_path_factory) -> tuple[Path, Path]:
    """A complete run with the default backup interval (0): only the newest snapshots kept."""
    store = tmp_path_factory.mktemp("store")
    init_store(store, 3)
    out = tmp_path_factory.mktemp("out")
    run_flow(events_file, out, store)
    return store, out


@pytest.fixture(scope="module")
def kept_store(events_file, tmp_path_factory) -> tuple[Path, Path]:
    """A complete run whose superseded snapshots are all kept (backup interval of an hour)."""
    store = tmp_path_factory.mktemp("kept")
    init_store(store, 2)
    out = tmp_path_factory.mktemp("kept_out")
    run_flow(events_file, out, store, backup=timedelta(hours=1))
    return store, out


# --- init ----------------------------------------------------------------------------------------


def test_init_creates_once_and_is_idempotent(tmp_path):
    store = tmp_path / "recovery"
    assert main(["init", "--dir", str(store), "--partitions", "4"]) == 0
    files = sorted(p.name for p in store.iterdir())
    assert files == [f"part-{i}.sqlite3" for i in range(4)]
    stamps = {p: p.stat().st_mtime_ns for p in store.iterdir()}
    created, message = init_store(store, 4)
    assert not created and "present: 4 partitions" in message
    assert {p: p.stat().st_mtime_ns for p in store.iterdir()} == stamps
    assert Store.open(store).resume_epoch == 1


def test_init_reads_the_directory_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BYTEWAX_RECOVERY_DIRECTORY", str(tmp_path / "env-store"))
    assert main(["init", "--partitions", "2"]) == 0
    assert "created 2 recovery partitions" in capsys.readouterr().out
    assert len(list((tmp_path / "env-store").glob("part-*.sqlite3"))) == 2
    monkeypatch.delenv("BYTEWAX_RECOVERY_DIRECTORY")
    assert main(["init", "--partitions", "2"]) == 1
    assert "BYTEWAX_RECOVERY_DIRECTORY" in capsys.readouterr().err


def test_init_refuses_another_partition_count(tmp_path, capsys):
    init_store(tmp_path, 4)
    assert main(["init", "--dir", str(tmp_path), "--partitions", "8"]) == 1
    err = capsys.readouterr().err
    assert "store of 4 partitions, not 8" in err
    assert len(list(tmp_path.glob("*.sqlite3"))) == 4


def test_init_refuses_an_incomplete_store_and_foreign_files(tmp_path):
    init_store(tmp_path / "a", 3)
    (tmp_path / "a" / "part-1.sqlite3").unlink()
    with pytest.raises(StoreError, match=r"partition\(s\) \[1\] of 3 missing"):
        init_store(tmp_path / "a", 3)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="holds other files"):
        init_store(tmp_path / "b", 3)
    assert not list((tmp_path / "b").glob("*.sqlite3"))
    (tmp_path / "c" / ".old-store").mkdir(parents=True)  # a store moved aside is no obstacle
    (tmp_path / "c" / ".old-store" / "part-0.sqlite3").write_bytes(b"")
    assert init_store(tmp_path / "c", 2)[0]


def test_partitions_of_two_stores_are_not_mixed(tmp_path):
    init_store(tmp_path / "a", 2)
    init_store(tmp_path / "b", 3)
    shutil.copy(tmp_path / "b" / "part-2.sqlite3", tmp_path / "a" / "part-2.sqlite3")
    with pytest.raises(StoreError, match="different stores are mixed"):
        Store.open(tmp_path / "a")


# --- inspect -------------------------------------------------------------------------------------


def test_inspect_a_finished_file_run(finished_store, events_file, capsys):
    store_dir, out = finished_store
    assert main(["inspect", "--dir", str(store_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)

    resume = info["resume"]["epoch"]
    (execution,) = info["executions"]
    assert execution["ex_num"] == 0 and execution["resume_epoch"] == 1
    assert resume == max(execution["frontiers"].values()) > 2
    assert info["resume"]["execution"] == 1 and info["resume"]["problem"] is None
    # backup interval 0: each partition is garbage-collected up to the last finished epoch,
    # so the only epoch a run can resume from is the resume epoch itself
    assert set(info["commits"].values()) == {resume - 1}
    assert info["rewind"] == {
        "oldest_epoch": resume,
        "newest_epoch": resume,
        "note": "only the resume epoch itself: superseded snapshots are not kept "
        "(backup interval 0)",
    }
    assert info["epochs"]["ranges"][-1][1] == resume - 1
    for step in info["steps"].values():
        assert step["epochs"][1] < resume
        assert all(entry["epoch"] < resume for entry in step["at_resume"].values())

    # the file source read the whole file
    assert info["source"]["kind"] == "file"
    (position,) = info["source"]["files"].values()
    assert position == {
        "offset": events_file.stat().st_size,
        "line": events_file.read_bytes().count(b"\n"),
    }
    source_step = info["steps"][info["source"]["step"]]
    assert next(iter(source_step["at_resume"].values()))["epoch"] == resume - 1

    # each local sink's position is the size of the file it wrote
    for stream in STREAMS:
        (entry,) = info["steps"][f"event_pipeline.local_{stream}"]["at_resume"].values()
        assert entry["value"] == (out / stream / "part-0.jsonl").stat().st_size
        assert info["steps"][f"event_pipeline.local_{stream}"]["role"] == "sink"

    windows = info["steps"]["event_pipeline.windows.shard"]
    assert windows["keys"] == Settings().pipeline_state_shards
    for entry in windows["at_resume"].values():
        assert entry["value"]["not_emitted"] == 0  # end of input emitted every window
    sessions = info["steps"]["event_pipeline.sessions.shard"]
    assert sessions["keys"] == Settings().pipeline_state_shards
    for entry in sessions["at_resume"].values():
        assert entry["value"]["open"] == 0  # end of input closed every session
    clock = info["steps"]["event_pipeline.event_time.partition_clock"]["at_resume"]
    assert clock[events_file.name]["value"]["partition"] == events_file.name


def test_inspect_text_names_the_essentials(finished_store, capsys):
    store_dir, _ = finished_store
    assert main(["inspect", "--dir", str(store_dir), "--keys", "1"]) == 0
    text = capsys.readouterr().out
    assert "partitions: 3" in text
    assert "resume: execution 1 starts at epoch" in text
    assert "byte offset" in text and "events.jsonl" in text
    assert "more (--json for all)" in text
    # inspecting leaves nothing behind in the store directory
    assert sorted(p.name for p in store_dir.iterdir()) == [f"part-{i}.sqlite3" for i in range(3)]


def test_inspect_a_fresh_store(tmp_path):
    init_store(tmp_path, 2)
    info = describe(Store.open(tmp_path))
    assert info["resume"] == {"execution": 0, "epoch": 1, "fresh": True, "problem": None}
    assert info["steps"] == {} and info["source"] is None


def test_snapshot_values_cannot_run_code():
    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["true"],))

    assert load_value(pickle.dumps(("a", 1))) == ("a", 1)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load subprocess.call"):
        load_value(pickle.dumps(Evil()))


# --- rewind to an epoch --------------------------------------------------------------------------


def test_rewind_refuses_epochs_whose_snapshots_were_collected(finished_store, tmp_path, capsys):
    store_dir = tmp_path / "store"
    shutil.copytree(finished_store[0], store_dir)
    resume = Store.open(store_dir).resume_epoch
    assert main(["rewind", "--dir", str(store_dir), "--epoch", str(resume - 1)]) == 1
    err = capsys.readouterr().err
    assert f"garbage-collected up to epoch {resume - 1}" in err
    assert "backup interval" in err
    assert main(["rewind", "--dir", str(store_dir), "--epoch", str(resume + 1)]) == 1
    assert Store.open(store_dir).resume_epoch == resume


def test_rewind_refuses_an_epoch_before_the_first_source_position(kept_store, tmp_path, capsys):
    store_dir = tmp_path / "store"
    shutil.copytree(kept_store[0], store_dir)
    store = Store.open(store_dir)
    first = store.step_keys["event_pipeline.read"]["events.jsonl"][0]
    assert store.oldest_rewind_epoch == first + 1
    assert main(["rewind", "--dir", str(store_dir), "--epoch", str(first)]) == 1
    assert "the source has no position before it" in capsys.readouterr().err
    assert Store.open(store_dir).resume_epoch == store.resume_epoch


def test_rewind_to_an_epoch_then_resume_reproduces_the_run(kept_store, events_file, tmp_path):
    store_dir, original_out = kept_store
    store = Store.open(store_dir)
    resume = store.resume_epoch
    assert store.commit_epoch is None  # nothing collected within the hour
    epoch = resume // 2
    assert epoch > 2

    work = tmp_path / "store"
    shutil.copytree(store_dir, work)
    out = tmp_path / "out"
    shutil.copytree(original_out, out)
    preview = describe(store, epoch=epoch)["source"]["files"][events_file.name]
    result = rewind_to_epoch(work, epoch, backup_dir=tmp_path / "backup")

    rewound = Store.open(work)
    assert rewound.resume_epoch == epoch
    assert max(rewound.epochs) < epoch
    assert result["deleted_snapshots"] > 0
    (position,) = result["source"].values()
    assert position["before"][0] == events_file.stat().st_size
    assert 0 < position["after"][0] < position["before"][0]
    assert position["after"] == [preview["offset"], preview["line"]]  # what inspect --epoch showed
    assert Store.open(tmp_path / "backup").resume_epoch == resume  # the copy is the old store

    run_flow(events_file, out, work, backup=timedelta(hours=1))

    again = Store.open(work)
    assert again.executions[-1].resume_epoch == epoch
    before, after = outputs(original_out), outputs(out)
    # state went back together with the positions: the same windows, sessions, revisions

    def dump(rows):
        return sorted(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in rows)

    assert dump(after["aggregates"]) == dump(before["aggregates"])
    assert dump(after["sessions"]) == dump(before["sessions"])
    # events carry processing times; each is written exactly once (the file sink truncated back)
    for stream in ("enriched", "late"):
        ids = [r["event_id"] for r in after[stream]]
        assert len(ids) == len(set(ids))
        assert Counter(ids) == Counter(r["event_id"] for r in before[stream])
    assert Counter((r["source"], r["reason"]) for r in after["dlq"]) == Counter(
        (r["source"], r["reason"]) for r in before["dlq"]
    )


def test_a_store_from_before_the_placed_clocks_resumes(kept_store, events_file, tmp_path):
    """The partition clocks' step was `event_time.clock` before they were placed; its snapshots
    are left alone and the clocks start afresh (docs/runbook.md)."""
    store_dir, original_out = kept_store
    epoch = Store.open(store_dir).resume_epoch // 2
    work, out = tmp_path / "store", tmp_path / "out"
    shutil.copytree(store_dir, work)
    shutil.copytree(original_out, out)
    rewind_to_epoch(work, epoch, backup_dir=tmp_path / "backup")
    renamed = 0
    for part in sorted(work.glob("part-*.sqlite3")):
        with closing(sqlite3.connect(part)) as db, db:
            renamed += db.execute(
                "UPDATE snaps SET step_id = 'event_pipeline.event_time.clock' "
                "WHERE step_id = 'event_pipeline.event_time.partition_clock'"
            ).rowcount
    assert renamed > 0

    run_flow(events_file, out, work, backup=timedelta(hours=1))

    after, before = outputs(out), outputs(original_out)
    ids = [r["event_id"] for r in after["enriched"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {r["event_id"] for r in before["enriched"]}
    steps = describe(Store.open(work))["steps"]
    assert "event_pipeline.event_time.partition_clock" in steps


# --- a running job ---------------------------------------------------------------------------------


def test_a_store_in_use_is_not_changed(kept_store, tmp_path, capsys):
    work = tmp_path / "store"
    shutil.copytree(kept_store[0], work)
    part = min(work.glob("*.sqlite3"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sqlite3, time\n"
                f"c = sqlite3.connect({str(part)!r})\n"
                "c.execute('PRAGMA journal_mode=WAL'); c.execute('SELECT 1 FROM parts').fetchall()\n"
                "print('open', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        assert active_partitions(work) == [part]
        resume = Store.open(work).resume_epoch
        assert main(["rewind", "--dir", str(work), "--epoch", str(resume - 1)]) == 1
        assert "in use" in capsys.readouterr().err
        assert main(["inspect", "--dir", str(work)]) == 0  # reading is fine
        assert "IN USE" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 5
    while active_partitions(work) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active_partitions(work) == []
    after = Store.open(work)  # untouched by the refused rewind
    assert after.resume_epoch == resume
    assert len(after.executions) == 1


def test_parse_offsets():
    assert parse_offsets("events.raw/0=12, events.raw/10=0") == {
        ("events.raw", 0): 12,
        ("events.raw", 10): 0,
    }
    for bad in ("events.raw=1", "events.raw/0=-1", "events.raw/x=1", "", "t/0=1,t/0=2"):
        with pytest.raises(StoreError):
            parse_offsets(bad)
