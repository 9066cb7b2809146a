"""The sink base without servers: flush triggers, retries and backoff, backpressure, DLQ."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime

import orjson
import polars as pl
import pytest

from connectors.base import (
    FanOutDeadLetters,
    JsonLinesDeadLetters,
    Rejected,
    Retrier,
    SinkPolicy,
    SinkStats,
    SinkWriter,
    StoreSink,
    TransientSinkError,
    dead_letter_identity,
    rejection_records,
    split_source,
)
from dataflows.metrics import InMemoryMetrics, NoopMetrics
from operators.placement import sink_part


class FakeWriter(SinkWriter):
    """Records every write; fails transiently `fail_times` times; rejects rows with `bad`."""

    name = "fake"

    def __init__(self, fail_times: int = 0):
        self.writes: list = []
        self.attempts = 0
        self.fail_times = fail_times
        self.setups = 0
        self.closed = False

    def setup(self) -> None:
        self.setups += 1

    def write(self, batch):
        self.attempts += 1
        if self.attempts <= self.fail_times:
            raise TransientSinkError(f"server down ({self.attempts})")
        rows = batch.to_dicts() if isinstance(batch, pl.DataFrame) else batch
        good = [r for r in rows if not r.get("bad")]
        self.writes.append(good)
        return [Rejected(r, "server says no: bad row") for r in rows if r.get("bad")]

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_sink(writer, *, policy=None, clock=None, sleeps=None, dead=None, metrics=None):
    sleeps = [] if sleeps is None else sleeps
    dead = [] if dead is None else dead
    sink = StoreSink(
        lambda: writer,
        stream="aggregates",
        parts=4,
        policy=policy or SinkPolicy(max_batch_rows=10, linger_s=5.0, retries=3, backoff_s=0.1),
        dead_letters=dead.extend,
        metrics=metrics or NoopMetrics(),
        sleep=sleeps.append,
        clock=clock or Clock(),
        rng=random.Random(7),
    )
    return sink, sleeps, dead


def rows(n: int, start: int = 0, **extra) -> list[dict]:
    return [{"i": i, "source": f"f.jsonl:{i}", **extra} for i in range(start, start + n)]


def written(writer: FakeWriter) -> list[int]:
    return [r["i"] for batch in writer.writes for r in batch]


# --- write-ahead: flushes written on the partition's own thread ---------------------------------


class GatedWriter(FakeWriter):
    """Writes only when the test opens the gate; notes the thread of each write."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.threads: list[str] = []

    def write(self, batch):
        assert self.gate.wait(5)
        self.threads.append(threading.current_thread().name)
        return super().write(batch)


def write_ahead_policy(depth: int) -> SinkPolicy:
    return SinkPolicy(max_batch_rows=10, linger_s=5.0, retries=3, backoff_s=0.1, write_ahead=depth)


def test_write_ahead_writes_in_order_on_its_own_thread_and_the_checkpoint_waits():
    writer = GatedWriter()
    sink, _, _ = make_sink(writer, policy=write_ahead_policy(2))
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(10)])
    part.write_batch([rows(10, 10)])  # two flushes handed over, neither written yet
    assert writer.writes == []
    checkpoint = threading.Thread(target=part.snapshot)
    checkpoint.start()
    checkpoint.join(0.2)
    assert checkpoint.is_alive()  # the checkpoint waits for the writes
    writer.gate.set()
    checkpoint.join(5)
    assert not checkpoint.is_alive()
    assert written(writer) == list(range(20))
    assert set(writer.threads) == {"sink fake aggregates"}
    part.close()
    assert writer.closed


def test_write_ahead_blocks_the_dataflow_when_its_queue_is_full():
    writer = GatedWriter()
    sink, _, _ = make_sink(writer, policy=write_ahead_policy(1))
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(10)])  # taken by the writer thread, which waits at the gate
    part.write_batch([rows(10, 10)])  # waits in the queue
    third = threading.Thread(target=part.write_batch, args=([rows(10, 20)],))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # backpressure: the queue holds one flush
    writer.gate.set()
    third.join(5)
    part.snapshot()
    assert written(writer) == list(range(30))


def test_write_ahead_failure_is_raised_in_the_dataflow_and_nothing_after_it_is_written():
    class Broken(FakeWriter):
        def write(self, batch):
            if not self.writes:
                self.writes.append("attempted")
                raise ValueError("a bug")
            return super().write(batch)

    writer = Broken()
    sink, _, _ = make_sink(writer, policy=write_ahead_policy(2))
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(10)])
    with pytest.raises(ValueError, match="a bug"):
        part.snapshot()
    with pytest.raises(ValueError, match="a bug"):
        part.write_batch([rows(10, 10)])
    assert writer.writes == ["attempted"]


# --- flush triggers -------------------------------------------------------------------------


def test_flushes_on_size():
    writer = FakeWriter()
    sink, _, _ = make_sink(writer)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(4)])
    part.write_batch([rows(5, 4)])
    assert writer.writes == []  # 9 rows < 10
    part.write_batch([rows(3, 9)])
    assert written(writer) == list(range(12))
    assert [len(b) for b in writer.writes] == [10, 2]  # written in chunks of at most 10


def test_big_buffer_is_written_in_chunks_of_max_rows():
    writer = FakeWriter()
    sink, _, _ = make_sink(writer)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(25)])
    assert [len(b) for b in writer.writes] == [10, 10, 5]
    assert written(writer) == list(range(25))


def test_flushes_on_age_when_items_arrive():
    writer, clock = FakeWriter(), Clock()
    sink, _, _ = make_sink(writer, clock=clock)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(1)])
    clock.now += 4.9
    part.write_batch([rows(1, 1)])
    assert writer.writes == []
    clock.now += 0.2  # the oldest row is now 5.1 s old
    part.write_batch([rows(1, 2)])
    assert written(writer) == [0, 1, 2]


def test_age_counts_from_the_oldest_buffered_row():
    writer, clock = FakeWriter(), Clock()
    sink, _, _ = make_sink(writer, clock=clock)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(1)])
    clock.now += 6
    part.write_batch([rows(1, 1)])  # flushes both
    clock.now += 1
    part.write_batch([rows(1, 2)])  # a fresh buffer: 0 s old
    assert written(writer) == [0, 1]


def test_snapshot_flushes_everything_and_keeps_no_state():
    writer = FakeWriter()
    sink, _, _ = make_sink(writer)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(3)])
    assert part.snapshot() is None
    assert written(writer) == [0, 1, 2]
    assert part.snapshot() is None  # nothing buffered: no write
    assert len(writer.writes) == 1


def test_close_flushes_then_closes_the_writer():
    writer = FakeWriter()
    sink, _, _ = make_sink(writer)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(2)])
    part.close()
    assert written(writer) == [0, 1]
    assert writer.closed


def test_dataframe_batches_are_concatenated():
    writer = FakeWriter()
    sink, _, _ = make_sink(writer)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([pl.DataFrame(rows(2)), pl.DataFrame(rows(0)), pl.DataFrame(rows(3, 2))])
    part.snapshot()
    assert len(writer.writes) == 1
    assert written(writer) == [0, 1, 2, 3, 4]


def test_setup_runs_once_per_sink():
    writer = FakeWriter()
    sink, _, _ = make_sink(writer)
    for part in sink.list_parts():
        sink.build_part("step", part, None)
    assert writer.setups == 1


def test_partitions_are_fixed_and_keys_placed_with_what_emitted_them():
    sink, _, _ = make_sink(FakeWriter())
    assert sink.list_parts() == ["part-000", "part-001", "part-002", "part-003"]
    # operators.placement (tested there): a source partition's number, a shard's routing hash
    assert [sink.part_fn(f"events.raw/{p}") % 4 for p in range(6)] == [0, 1, 2, 3, 0, 1]
    assert sink.part_fn("shard-003") == sink_part("shard-003")


# --- retries and backpressure -------------------------------------------------------------------


def test_transient_errors_are_retried_with_exponential_backoff_and_jitter():
    writer = FakeWriter(fail_times=3)
    sink, sleeps, dead = make_sink(writer)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(10)])
    assert writer.attempts == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps, start=1):
        nominal = 0.1 * 2 ** (attempt - 1)
        assert nominal / 2 <= delay <= nominal  # "equal jitter": half to all of it
    assert len(set(sleeps)) == 3
    assert written(writer) == list(range(10))
    assert dead == []
    assert sink.stats.retries == 3
    assert sink.stats.backpressure_episodes == 0


def test_backpressure_keeps_retrying_with_capped_backoff_until_the_server_recovers(caplog):
    writer = FakeWriter(fail_times=12)
    policy = SinkPolicy(max_batch_rows=10, linger_s=5, retries=3, backoff_s=0.1, backoff_max_s=1.0)
    sink, sleeps, _ = make_sink(writer, policy=policy)
    part = sink.build_part("step", "part-000", None)
    with caplog.at_level("WARNING", logger="connectors.sink"):
        part.write_batch([rows(10)])
    assert writer.attempts == 13
    assert len(sleeps) == 12
    assert all(0.5 <= s <= 1.0 for s in sleeps[4:])  # capped at backoff_max_s
    assert written(writer) == list(range(10))  # nothing dropped, written once
    assert sink.stats.backpressure_episodes == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("BACKPRESSURE" in m for m in messages) == 12 - 3  # every failure logged
    assert any("succeeded again after 13 attempts" in m for m in messages)


def test_delay_never_overflows():
    policy = SinkPolicy(backoff_s=0.2, backoff_max_s=30)
    rng = random.Random(1)
    assert 15 <= policy.delay(10_000, rng) <= 30


def test_setup_waits_out_an_outage():
    class SlowStart(FakeWriter):
        def setup(self):
            self.setups += 1
            if self.setups < 3:
                raise TransientSinkError("connection refused")

    writer = SlowStart()
    sink, sleeps, _ = make_sink(writer)
    sink.build_part("step", "part-000", None)
    assert writer.setups == 3
    assert len(sleeps) == 2


def test_other_exceptions_propagate():
    class Broken(FakeWriter):
        def write(self, batch):
            raise ValueError("a bug")

    sink, sleeps, _ = make_sink(Broken())
    part = sink.build_part("step", "part-000", None)
    with pytest.raises(ValueError, match="a bug"):
        part.write_batch([rows(10)])
    assert sleeps == []


def test_remaining_narrows_the_retry_and_early_rejections_are_kept():
    class Partial(FakeWriter):
        def write(self, batch):
            self.attempts += 1
            if self.attempts == 1:
                raise TransientSinkError(
                    "2 items got 429",
                    remaining=batch[2:4],
                    rejected=[Rejected(batch[4], "mapper_parsing_exception")],
                )
            self.writes.append(list(batch))
            return []

    writer = Partial()
    sink, sleeps, dead = make_sink(writer)
    part = sink.build_part("step", "part-000", None)
    part.write_batch([rows(5)])
    part.snapshot()
    assert [r["i"] for r in writer.writes[0]] == [2, 3]
    assert len(sleeps) == 1
    assert [orjson.loads(d["payload"])["i"] for d in dead] == [4]
    assert sink.stats.rows_written == 4 and sink.stats.rows_rejected == 1


# --- permanent rejections → DLQ ----------------------------------------------------------------


def test_permanent_rejections_go_to_the_dlq_and_the_rest_is_written():
    writer = FakeWriter()
    metrics = InMemoryMetrics()
    sink, _, dead = make_sink(writer, metrics=metrics)
    part = sink.build_part("step", "part-000", None)
    batch = rows(4)
    batch[2] = {**batch[2], "bad": True, "correlation_id": "corr-2"}
    part.write_batch([batch])
    part.snapshot()
    assert written(writer) == [0, 1, 3]
    assert len(dead) == 1
    record = dead[0]
    assert record["reason"] == "sink_failed"
    assert record["stage"] == "sink:fake"
    assert record["error"] == "server says no: bad row"
    assert record["source"] == "f.jsonl:2"
    assert record["correlation_id"] == "corr-2"
    assert orjson.loads(record["payload"]) == batch[2]
    assert metrics.value("pipeline_dlq_records_total", reason="sink_failed") == 1
    assert metrics.value("pipeline_sink_failures_total", sink="fake") == 1
    assert metrics.value("pipeline_events_out_total", stream="aggregates", sink="fake") == 3


def test_dead_letter_target_is_retried_too():
    attempts = []

    def flaky(records):
        attempts.append(len(records))
        if len(attempts) < 3:
            raise TransientSinkError("kafka down")

    writer = FakeWriter()
    sink = StoreSink(
        lambda: writer,
        stream="s",
        parts=1,
        policy=SinkPolicy(max_batch_rows=1, retries=3, backoff_s=0.01),
        dead_letters=flaky,
        metrics=NoopMetrics(),
        sleep=lambda s: None,
    )
    part = sink.build_part("step", "part-000", None)
    part.write_batch([[{"i": 0, "bad": True}]])
    assert attempts == [1, 1, 1]


def test_jsonl_dead_letters_append(tmp_path):
    target = JsonLinesDeadLetters(tmp_path / "dlq" / "sink-failed.jsonl")
    target([{"a": 1}])
    target([{"a": 2}, {"a": 3}])
    lines = (tmp_path / "dlq" / "sink-failed.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line) for line in lines] == [{"a": 1}, {"a": 2}, {"a": 3}]


def _restart(target: JsonLinesDeadLetters) -> JsonLinesDeadLetters:
    """The same file seen by a new process (nothing remembered in memory)."""
    JsonLinesDeadLetters._seen.pop(target.path.absolute(), None)
    return JsonLinesDeadLetters(target.path)


def _sink_failed(i: int, **row) -> dict:
    row = {
        "event_id": f"ev-{i}",
        "source": f"events.raw/3/{1000 + i}",
        "correlation_id": f"c-{i}",
        **row,
    }
    return rejection_records("postgres", [Rejected(row, "bad row")])[0]


def test_jsonl_dead_letters_are_appended_once_even_after_a_replay(tmp_path):
    path = tmp_path / "dlq" / "sink-failed.jsonl"
    target = JsonLinesDeadLetters(path)
    target([_sink_failed(1), _sink_failed(2)])
    target([_sink_failed(2), _sink_failed(3), _sink_failed(3)])  # the same row again: skipped
    # A crash, and the replay hands the same rejected rows over again (with a new failed_at).
    target = _restart(target)
    target([_sink_failed(1), _sink_failed(3), _sink_failed(4)])
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [orjson.loads(r["payload"])["event_id"] for r in records] == [
        "ev-1",
        "ev-2",
        "ev-3",
        "ev-4",
    ]
    # The same event rejected by another store is another dead letter.
    other = rejection_records("s3", [Rejected(orjson.loads(records[0]["payload"]), "too long")])
    target(other)
    assert len(path.read_bytes().splitlines()) == 5


def test_jsonl_dead_letters_identity_of_rows_without_a_source_offset():
    window = {
        "tenant": "acme",
        "event_type": "click",
        "window": "1m",
        "window_start": "x",
        "count": 3,
        "revision": 0,
    }
    (a,) = rejection_records("redis", [Rejected(window, "WRONGTYPE")])
    (b,) = rejection_records("redis", [Rejected(window, "WRONGTYPE")])
    (c,) = rejection_records("redis", [Rejected({**window, "count": 4}, "WRONGTYPE")])
    assert a["source"] == "sink:redis"
    assert dead_letter_identity(a) == dead_letter_identity({**b, "failed_at": "later"})
    assert dead_letter_identity(a) != dead_letter_identity(c)  # another row: another dead letter


def test_jsonl_dead_letters_cut_a_line_torn_by_a_crash(tmp_path):
    path = tmp_path / "sink-failed.jsonl"
    target = JsonLinesDeadLetters(path)
    target([_sink_failed(1)])
    whole = path.read_bytes()
    torn = orjson.dumps(_sink_failed(2))
    path.write_bytes(whole + torn[: len(torn) // 2])  # the process died in the middle of an append
    target = _restart(target)
    target([_sink_failed(2)])  # the replay hands the record over again
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line)["source"] for line in lines] == [
        "events.raw/3/1001",
        "events.raw/3/1002",
    ]
    # A torn tail that appears while this process runs is cut before the next append, too.
    path.write_bytes(path.read_bytes() + b'{"reason": "sink_fa')
    target([_sink_failed(3)])
    assert [orjson.loads(line)["source"] for line in path.read_bytes().splitlines()] == [
        "events.raw/3/1001",
        "events.raw/3/1002",
        "events.raw/3/1003",
    ]


def test_jsonl_dead_letters_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    from connectors import base

    path = tmp_path / "sink-failed.jsonl"
    target = JsonLinesDeadLetters(path)
    target([_sink_failed(1)])
    real_write = base.os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base.os, "write", disk_full)
    with pytest.raises(TransientSinkError, match="No space left"):
        target([_sink_failed(2)])
    monkeypatch.setattr(base.os, "write", real_write)
    target([_sink_failed(2)])  # the retry
    assert [orjson.loads(line)["source"] for line in path.read_bytes().splitlines()] == [
        "events.raw/3/1001",
        "events.raw/3/1002",
    ]


def test_fan_out_without_targets_logs_each_record(caplog):
    with caplog.at_level("ERROR", logger="connectors.sink"):
        FanOutDeadLetters([])([{"reason": "sink_failed", "payload": "x"}])
    assert "sink_failed" in caplog.text


def test_retrier_returns_the_result():
    retrier = Retrier("x", SinkPolicy(), SinkStats(), sleep=lambda s: None)
    assert retrier.run(lambda a: a * 2, 21, "doubling") == (42, [])


def test_split_source():
    assert split_source("events.raw/3/1288") == ("events.raw/3", 1288)
    assert split_source("sample.jsonl:12") == ("sample.jsonl", 12)
    assert split_source("odd") == ("odd", None)


def test_latency_is_measured_from_the_oldest_ingested_at():
    writer = FakeWriter()
    metrics = InMemoryMetrics()
    sink, _, _ = make_sink(writer, metrics=metrics)
    part = sink.build_part("step", "part-000", None)
    old = datetime(2020, 1, 1, tzinfo=UTC)
    frame = pl.DataFrame(
        {"i": [0, 1], "ingested_at": [old, datetime.now(UTC)]},
        schema={"i": pl.Int64, "ingested_at": pl.Datetime("ms", "UTC")},
    )
    part.write_batch([frame])
    part.snapshot()
    (latency,) = metrics.observations("pipeline_end_to_sink_latency_seconds", sink="fake")
    assert latency > 365 * 86400
