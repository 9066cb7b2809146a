"""The one sink base for every store: batching, flushing, retries, backpressure and the DLQ.

A store implements only

* `write(batch) -> list[Rejected]` — write one batch (a polars DataFrame or a list of row dicts,
  whatever its stream carries); return the rows the server *permanently* refused, with the server's
  reason. Raise `TransientSinkError` when the server is unreachable, overloaded or restarting; the
  whole batch (or `remaining`, when the store knows which rows are still unwritten) is retried.
  Every write must be idempotent: a retried or replayed batch leaves the same end state.
* `setup()` (optional) — idempotent migrations, templates, buckets; run once per sink and process
  before the first write, under the same retry loop.
* `close()` (optional) — release connections.

Everything else lives here, once:

* `StoreSink` is a Bytewax `FixedPartitionedSink` with a fixed set of partitions
  (`part-000`..), one store writer per partition. Items are `(key, batch)`; the key picks the
  partition (`operators.placement.sink_part`: the partition on the worker of the step that
  emitted the items, so they are written without being handed to another process).
* Each partition buffers batches and flushes when it holds `max_batch_rows` rows, when the oldest
  buffered row is `linger_s` old (checked when items arrive), at every epoch (`snapshot()`), and at
  the end of input (`close()`). So everything handed over before a checkpoint is written before
  that epoch completes, and the partition's recovery state is empty.
* With `write_ahead` > 0 a partition writes its flushes on a thread of its own, in order, while
  the dataflow goes on (store I/O releases the GIL); at most `write_ahead` flushes wait for it,
  then the dataflow blocks (backpressure). The checkpoint waits until they are all written, and a
  write that failed for good is raised in the dataflow at the next call. With 0 the dataflow
  writes itself.
* Transient failures are retried `retries` times with exponential backoff and jitter; after that the
  partition applies **backpressure**: it keeps retrying with the backoff capped at
  `backoff_max_s`, logging every failure, and blocks its worker until the server is back. Nothing
  is dropped and an outage never crashes the job.
* Permanently rejected rows become `dlq_record(reason=sink_failed, stage="sink:<name>", ...)` and are
  handed to `dead_letters` (a callable taking a list of records), under the same retry loop.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import queue
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson
import polars as pl
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from dataflows import metrics as pipeline_metrics
from dataflows.config import Settings
from dataflows.metrics import Metrics, NoopMetrics
from operators.model import DlqReason, dlq_record
from operators.placement import sink_part

log = logging.getLogger("connectors.sink")

Batch = pl.DataFrame | list[dict]
DeadLetters = Callable[[list[dict]], None]


# --- what a store implements ------------------------------------------------------------------


@dataclass(slots=True)
class Rejected:
    """A row the server permanently refused, and the server's reason."""

    row: dict
    error: str


class TransientSinkError(Exception):
    """The server could not take the batch now (down, overloaded, restarting); try again later.

    `remaining`: the part of the batch still unwritten, when the store knows it (e.g. the items of a
    bulk request that got 429/5xx); None means "retry the whole batch". `rejected`: rows the server
    permanently refused before the failure (they go to the DLQ at once).
    """

    def __init__(
        self,
        message: str,
        *,
        remaining: Batch | None = None,
        rejected: Sequence[Rejected] = (),
    ):
        super().__init__(message)
        self.remaining = remaining
        self.rejected = list(rejected)


class SinkWriter(ABC):
    """One store's writer. One instance per sink partition (so per worker thread)."""

    name: str = "sink"

    def setup(self) -> None:
        """Idempotent preparation (migrations, templates, buckets); raise TransientSinkError while
        the server is unreachable."""

    @abstractmethod
    def write(self, batch: Batch) -> list[Rejected]:
        """Write `batch` idempotently; return the rows the server permanently rejected."""

    def close(self) -> None:
        """Release connections."""


# --- policy -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkPolicy:
    max_batch_rows: int = 5000
    linger_s: float = 1.0
    retries: int = 3
    backoff_s: float = 0.2
    backoff_max_s: float = 30.0
    write_ahead: int = 0  # flushes that may wait for the partition's writer thread (0: no thread)

    @classmethod
    def from_settings(cls, settings: Settings) -> SinkPolicy:
        return cls(
            max_batch_rows=settings.sink_max_batch_rows,
            linger_s=settings.sink_linger_s,
            retries=settings.sink_retries,
            backoff_s=settings.sink_backoff_s,
            backoff_max_s=settings.sink_backoff_max_s,
            write_ahead=settings.sink_write_ahead,
        )

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (1-based): exponential, capped at
        `backoff_max_s`, with "equal jitter" (between half and all of it)."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** min(attempt - 1, 62))
        return base * (0.5 + 0.5 * rng.random())


@dataclass
class SinkStats:
    """Counters of one sink (all its partitions in this process)."""

    rows_written: int = 0
    rows_rejected: int = 0
    flushes: int = 0
    retries: int = 0  # failed attempts that were retried
    backpressure_episodes: int = 0  # times the retries were used up and backpressure began
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


# --- batches ----------------------------------------------------------------------------------


def batch_len(batch: Batch) -> int:
    return batch.height if isinstance(batch, pl.DataFrame) else len(batch)


def concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    if isinstance(batches[0], pl.DataFrame):
        return pl.concat(batches, how="vertical_relaxed")
    return [row for batch in batches for row in batch]


def chunks(batch: Batch, size: int) -> list[Batch]:
    n = batch_len(batch)
    if n <= size:
        return [batch]
    if isinstance(batch, pl.DataFrame):
        return [batch.slice(i, size) for i in range(0, n, size)]
    return [batch[i : i + size] for i in range(0, n, size)]


SOURCE_PATTERN = r"^(.*)[/:](\d+)$"  # "<partition>/<offset>" or "<file>:<line>"
_SOURCE = re.compile(SOURCE_PATTERN)


def split_source(source: str) -> tuple[str, int | None]:
    """`events.raw/3/1288` → (`events.raw/3`, 1288); `sample.jsonl:12` → (`sample.jsonl`, 12)."""
    match = _SOURCE.match(source or "")
    if match is None:
        return source or "", None
    return match.group(1), int(match.group(2))


# --- dead letters -----------------------------------------------------------------------------


def dead_letter_identity(record: dict) -> bytes:
    """What makes two DLQ records the same dead letter (a 16-byte digest): the stage and the
    source when the source names one input record (`events.raw/3/1288`, `sample.jsonl:12`); for
    rows without one (window and session rows carry the source `sink:<store>`), the whole record
    except `failed_at`, so only an identical rejection counts as the same."""
    stage, source = record.get("stage"), record.get("source")
    if stage and isinstance(source, str) and split_source(source)[1] is not None:
        text = f"{stage}|{source}".encode()
    else:
        text = orjson.dumps(
            {k: v for k, v in record.items() if k != "failed_at"},
            option=orjson.OPT_SORT_KEYS,
            default=str,
        )
    return hashlib.blake2b(text, digest_size=16).digest()


class JsonLinesDeadLetters:
    """Appends DLQ records to one JSON Lines file (shared by every partition of the process), each
    dead letter once.

    Crash safety: the identities (`dead_letter_identity`) of the records already in the file are
    loaded on the first call of the process, and a record whose identity is there is not appended
    again, so a replay after a crash (which hands the same rejected rows to the DLQ again) adds
    nothing. Each call appends its new records at the end of the file and `fsync`s before
    returning, so what the sink counted as written before a checkpoint survives a machine crash
    too. A line torn by a crash in the middle of an append is cut off before the next append (its
    record is handed over again by the replay); a failed append is truncated back. Appends hold an
    exclusive `flock` on the file (and a lock within the process), so lines never interleave. A
    row is rejected by the one sink partition that owns it, so processes sharing the file never
    append the same dead letter in one run; after a restart every process loads the file anew.
    """

    _lock = threading.Lock()
    _seen: ClassVar[dict[Path, set[bytes]]] = {}  # per file: identities of its records

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, records: list[dict]) -> None:
        key = self.path.absolute()
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                created = not self.path.exists()
                with self.path.open("a+b", buffering=0) as handle:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when closed
                    seen = self._seen.get(key)
                    if seen is None:
                        seen = self._seen[key] = self._load(handle)
                    fresh, ids = [], set()
                    for record in records:
                        identity = dead_letter_identity(record)
                        if identity not in seen and identity not in ids:
                            ids.add(identity)
                            fresh.append(record)
                    if fresh:
                        self._append(handle, b"".join(orjson.dumps(r) + b"\n" for r in fresh))
                        seen |= ids
                if created:
                    _fsync_directory(self.path.parent)
        except OSError as exc:  # a full or read-only disk: hold on and retry, never drop
            raise TransientSinkError(f"appending to {self.path}: {exc}") from exc

    def _load(self, handle) -> set[bytes]:
        handle.seek(0)
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning(
                "dead letters %s: cutting off a torn last line (%d bytes) left by a crash",
                self.path,
                len(data) - end,
            )
            os.ftruncate(handle.fileno(), end)
            os.fsync(handle.fileno())
        seen = set()
        for line in data[:end].splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                seen.add(dead_letter_identity(record))
        return seen

    def _append(self, handle, data: bytes) -> None:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line: cut it off first
            self._seen.setdefault(self.path.absolute(), set()).update(self._load(handle))
            size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # O_APPEND: every write lands at the end
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            try:  # leave no partial line behind; the records are handed over again
                os.ftruncate(fd, size)
            except OSError:
                self._seen.pop(self.path.absolute(), None)  # reload (and cut) on the next call
            raise


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FanOutDeadLetters:
    """Hands each DLQ record list to every target; with no target, logs each record at ERROR so a
    rejected row is never silently lost."""

    def __init__(self, targets: Sequence[DeadLetters]):
        self.targets = list(targets)

    def __call__(self, records: list[dict]) -> None:
        if not self.targets:
            for record in records:
                log.error(
                    "dead letter (no DLQ target configured): %s", orjson.dumps(record).decode()
                )
        for target in self.targets:
            target(records)


def rejection_records(name: str, rejected: Sequence[Rejected]) -> list[dict]:
    out = []
    for item in rejected:
        row = item.row
        source = row.get("source") or f"sink:{name}"
        out.append(
            dlq_record(
                reason=DlqReason.SINK_FAILED,
                error=item.error,
                stage=f"sink:{name}",
                payload=orjson.dumps(row, default=str).decode(),
                source=source,
                correlation_id=row.get("correlation_id"),
            )
        )
    return out


# --- the retry loop ---------------------------------------------------------------------------


class Retrier:
    """Runs a call until it succeeds: `policy.retries` quick retries with jittered exponential
    backoff on `TransientSinkError`, then backpressure (capped backoff, forever, every failure
    logged). Any other exception propagates."""

    def __init__(
        self,
        name: str,
        policy: SinkPolicy,
        stats: SinkStats,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ):
        self.name = name
        self.policy = policy
        self.stats = stats
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.metrics = metrics or NoopMetrics()

    def run(self, call: Callable[[Any], Any], arg: Any, what: str) -> tuple[Any, list[Rejected]]:
        """`call(arg)` until it returns. A `TransientSinkError` with `remaining` narrows `arg` to
        the remaining rows; its `rejected` rows are collected. Returns (result, rejected)."""
        attempt = 0
        rejected: list[Rejected] = []
        started = time.monotonic()
        while True:
            try:
                result = call(arg)
            except TransientSinkError as exc:
                rejected.extend(exc.rejected)
                if exc.remaining is not None:
                    arg = exc.remaining
                    if batch_len(arg) == 0:
                        return [], rejected
                attempt += 1
                delay = self.policy.delay(attempt, self.rng)
                self.stats.add(retries=1)
                self.metrics.sink_retries(self.name)
                if attempt <= self.policy.retries:
                    log.warning(
                        "sink %s: %s failed (attempt %d of %d before backpressure), retrying in "
                        "%.2fs: %s",
                        self.name,
                        what,
                        attempt,
                        self.policy.retries + 1,
                        delay,
                        exc,
                    )
                else:
                    if attempt == self.policy.retries + 1:
                        self.stats.add(backpressure_episodes=1)
                    log.error(
                        "sink %s: BACKPRESSURE — %s still failing after %d attempts (%.0fs); "
                        "holding the batch and retrying in %.1fs: %s",
                        self.name,
                        what,
                        attempt,
                        time.monotonic() - started,
                        delay,
                        exc,
                    )
                self.sleep(delay)
                continue
            if attempt > self.policy.retries:
                log.warning(
                    "sink %s: %s succeeded again after %d attempts (%.0fs of backpressure)",
                    self.name,
                    what,
                    attempt + 1,
                    time.monotonic() - started,
                )
            return result, rejected


# --- the Bytewax adapter ----------------------------------------------------------------------


class _WriteAhead:
    """Calls `write(batch)` for each submitted batch on a thread of its own, in order.

    `submit` blocks while `depth` batches are waiting (backpressure); `wait` returns once all are
    written. After a write raised, the rest are not written and every later call raises it.
    """

    def __init__(self, write: Callable[[Batch], None], depth: int, name: str):
        self._write = write
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        self._check()
        self._queue.put(batch)

    def wait(self) -> None:
        self._queue.join()
        self._check()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if self._failure is None:
                    self._write(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the dataflow's thread
                self._failure = exc
            finally:
                self._queue.task_done()


# Dead letters of every partition go through one target; its writes are not interleaved.
_DEAD_LETTERS_LOCK = threading.Lock()


class _StorePartition(StatefulSinkPartition[Batch, None]):
    def __init__(
        self,
        writer: SinkWriter,
        stream: str,
        policy: SinkPolicy,
        retrier: Retrier,
        dead_letters: DeadLetters,
        stats: SinkStats,
        clock: Callable[[], float],
        metrics: Metrics,
    ):
        self._writer = writer
        self._stream = stream
        self._policy = policy
        self._retrier = retrier
        self._dead_letters = dead_letters
        self._stats = stats
        self._clock = clock
        self._metrics = metrics
        self._buffer: list[Batch] = []
        self._rows = 0
        self._oldest: float | None = None
        self._ahead = (
            _WriteAhead(self._write, policy.write_ahead, f"sink {writer.name} {stream}")
            if policy.write_ahead > 0
            else None
        )

    def write_batch(self, values: list[Batch]) -> None:
        for batch in values:
            n = batch_len(batch)
            if n == 0:
                continue
            self._buffer.append(batch)
            self._rows += n
            if self._oldest is None:
                self._oldest = self._clock()
        if self._rows >= self._policy.max_batch_rows or (
            self._oldest is not None and self._clock() - self._oldest >= self._policy.linger_s
        ):
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        batch = concat(self._buffer)
        self._buffer, self._rows, self._oldest = [], 0, None
        if self._ahead is None:
            self._write(batch)
        else:
            self._ahead.submit(batch)

    def _write(self, batch: Batch) -> None:
        name = self._writer.name
        for chunk in chunks(batch, self._policy.max_batch_rows):
            size = batch_len(chunk)
            self._metrics.batch_size(f"{name}_{self._stream}", size)
            returned, early = self._retrier.run(self._writer.write, chunk, f"writing {size} rows")
            rejected = early + list(returned or ())
            written = size - len(rejected)
            self._stats.add(flushes=1, rows_written=written, rows_rejected=len(rejected))
            self._metrics.events_out(self._stream, name, written)
            oldest = oldest_ingested_at(chunk)
            if oldest is not None:
                self._metrics.end_to_sink_latency(name, time.time() - oldest)
            if rejected:
                records = rejection_records(name, rejected)
                for item, record in zip(rejected, records, strict=True):
                    log.warning(
                        "sink %s: server rejected a row: %s",
                        name,
                        item.error,
                        extra={
                            "correlation_id": record["correlation_id"],
                            "sink": name,
                            "stream": self._stream,
                            "source": record["source"],
                        },
                    )
                with _DEAD_LETTERS_LOCK:
                    self._retrier.run(
                        _call_with, (self._dead_letters, records), "writing dead letters"
                    )
                self._metrics.sink_failures(name, len(records))
                self._metrics.dlq_records(DlqReason.SINK_FAILED.value, len(records))

    def snapshot(self) -> None:
        # The epoch's checkpoint: everything handed over so far is written before it completes.
        self.flush()
        if self._ahead is not None:
            self._ahead.wait()

    def close(self) -> None:
        try:
            self.snapshot()
        finally:
            if self._ahead is not None:
                self._ahead.stop()
            self._writer.close()


def _call_with(pair: tuple[Callable, Any]) -> None:
    function, argument = pair
    function(argument)


def oldest_ingested_at(batch: Batch) -> float | None:
    """Epoch seconds of the oldest `ingested_at` of a batch, the basis of
    `pipeline_end_to_sink_latency_seconds`: a DataFrame's column minimum; for list rows the
    smallest value among the rows that have one. None when no row has one (window, session and
    DLQ rows carry no `ingested_at`, so their batches are not observed)."""
    if isinstance(batch, pl.DataFrame):
        if "ingested_at" not in batch.columns:
            return None
        return _epoch_s(batch["ingested_at"].min())
    stamps = [_epoch_s(v) for row in batch if (v := row.get("ingested_at")) is not None]
    return min((s for s in stamps if s is not None), default=None)


def _epoch_s(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


_SETUP_LOCK = threading.Lock()


class StoreSink(FixedPartitionedSink[Batch, None]):
    """A Bytewax sink over a `SinkWriter` factory: `parts` partitions, each with its own writer."""

    def __init__(
        self,
        new_writer: Callable[[], SinkWriter],
        *,
        stream: str,
        parts: int,
        policy: SinkPolicy,
        dead_letters: DeadLetters,
        metrics: Metrics | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self._new_writer = new_writer
        self._stream = stream
        self._parts = parts
        self._policy = policy
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._set_up = False
        self.stats = SinkStats()

    def list_parts(self) -> list[str]:
        return [f"part-{i:03d}" for i in range(self._parts)]

    def part_fn(self, item_key: str) -> int:
        return sink_part(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _StorePartition:
        metrics = self._metrics or pipeline_metrics.get()
        writer = self._new_writer()
        # Series at zero from the start, so that `increase()` sees the first retry or failure.
        metrics.events_out(self._stream, writer.name, 0)
        metrics.sink_retries(writer.name, 0)
        metrics.sink_failures(writer.name, 0)
        retrier = Retrier(
            writer.name, self._policy, self.stats, sleep=self._sleep, rng=self._rng, metrics=metrics
        )
        with _SETUP_LOCK:
            if not self._set_up:
                retrier.run(lambda _: writer.setup(), None, "setting up")
                self._set_up = True
        return _StorePartition(
            writer,
            self._stream,
            self._policy,
            retrier,
            self._dead_letters,
            self.stats,
            self._clock,
            metrics,
        )
