"""The embedded default: a JSON Lines file as input, and a directory of JSON Lines files as output.

Both resume exactly: the source snapshots its byte offset, the sink snapshots the size of each
file it writes and truncates back to it on resume, so a crash replays into the same bytes.
"""

from __future__ import annotations

import atexit
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from connectors.base import oldest_ingested_at
from dataflows import metrics
from operators.model import RawBatch, RawRecord, as_dicts

# --- source ----------------------------------------------------------------------------------


class _JsonLinesPartition(StatefulSourcePartition[Any, tuple[int, int]]):
    def __init__(
        self,
        path: Path,
        batch_size: int,
        resume: tuple[int, int] | None,
        prepare: Callable[[RawBatch], Any],
    ):
        self._path = path
        self._prepare = prepare
        self._label = path.name
        self._batch_size = batch_size
        self._file = path.open("rb")
        self._offset, self._line = resume or (0, 0)
        self._file.seek(self._offset)

    def next_batch(self) -> list[Any]:
        records = []
        now = time.time()
        for raw in self._file:
            self._line += 1
            self._offset += len(raw)
            value = raw.rstrip(b"\r\n")
            if value.strip():
                records.append(RawRecord(value, f"{self._label}:{self._line}", now))
            if len(records) >= self._batch_size:
                break
        else:
            if not records:
                raise StopIteration
        return [self._prepare(RawBatch(self._label, records))]

    def snapshot(self) -> tuple[int, int]:
        return (self._offset, self._line)

    def close(self) -> None:
        self._file.close()


class JsonLinesSource(FixedPartitionedSource[Any, tuple[int, int]]):
    """One partition per file; each poll yields `prepare` of one `RawBatch` of up to `batch_size`
    records."""

    def __init__(self, path: Path, batch_size: int, prepare: Callable[[RawBatch], Any]):
        if not path.is_file():
            raise FileNotFoundError(f"PIPELINE_INPUT file not found: {path}")
        self._path = path
        self._batch_size = batch_size
        self._prepare = prepare

    def list_parts(self) -> list[str]:
        return [self._path.name]

    def build_part(self, step_id, for_part, resume_state):
        return _JsonLinesPartition(self._path, self._batch_size, resume_state, self._prepare)


# --- sink ------------------------------------------------------------------------------------

Batch = pl.DataFrame | list[dict]
SINK_NAME = "local"  # the `sink` label of the metrics


def to_json_lines(batch: Batch) -> bytes:
    """JSON Lines bytes for a batch; datetimes as ISO-8601 UTC with millisecond precision."""
    return b"".join(orjson.dumps(row) + b"\n" for row in as_dicts(batch))


def batch_len(batch: Batch) -> int:
    return batch.height if isinstance(batch, pl.DataFrame) else len(batch)


class RunSummary:
    """Records written per stream by this process, printed when the process exits."""

    def __init__(self, root: Path, streams: list[str]):
        self._root = root
        self._counts = Counter({name: 0 for name in streams})
        self._registered = False

    def add(self, stream: str, records: int) -> None:
        if not self._registered:
            atexit.register(self.print)
            self._registered = True
        self._counts[stream] += records

    def print(self) -> None:
        lines = [
            f"  {name:<11} {count:>9,}  → {self._root / name}/"
            for name, count in self._counts.items()
        ]
        print("records written per stream:\n" + "\n".join(lines))


class _DirectoryPartition(StatefulSinkPartition[Batch, int]):
    def __init__(
        self, path: Path, resume_size: int | None, summary: RunSummary, stream: str
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open(
            "r+b" if resume_size is not None and path.exists() else "wb"
        )
        if resume_size is not None:
            self._file.truncate(resume_size)
            self._file.seek(resume_size)
        self._summary = summary
        self._stream = stream

    def write_batch(self, items: list[Batch]) -> None:
        rows, oldest = 0, None
        for batch in items:
            self._file.write(to_json_lines(batch))
            count = batch_len(batch)
            self._summary.add(self._stream, count)
            rows += count
            stamp = oldest_ingested_at(batch)
            if stamp is not None and (oldest is None or stamp < oldest):
                oldest = stamp
        self._file.flush()
        if rows:
            m = metrics.get()
            m.events_out(self._stream, SINK_NAME, rows)
            m.batch_size(f"{SINK_NAME}_{self._stream}", rows)
            if oldest is not None:
                m.end_to_sink_latency(SINK_NAME, time.time() - oldest)

    def snapshot(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class DirectorySink(FixedPartitionedSink[Batch, int]):
    """Writes a stream's batches to `<root>/<stream>/part-0.jsonl`, counting them in `summary`."""

    def __init__(self, root: Path, stream: str, summary: RunSummary):
        self._dir = root / stream
        self._stream = stream
        self._summary = summary

    def list_parts(self) -> list[str]:
        return ["part-0"]

    def build_part(self, step_id, for_part, resume_state):
        metrics.get().events_out(self._stream, SINK_NAME, 0)
        return _DirectoryPartition(
            self._dir / f"{for_part}.jsonl", resume_state, self._summary, self._stream
        )


def read_json_lines(path: Path) -> Iterable[dict]:
    """Rows of every part file of a stream directory (for tests and tools)."""
    for part in sorted(path.glob("part-*.jsonl")):
        with part.open("rb") as handle:
            for line in handle:
                yield orjson.loads(line)
