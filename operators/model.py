"""Shapes that flow between the operators.

The dataflow moves *batches*, not single events: a source partition hands over one `RawBatch` per
poll and every operator after it works on whole columns (polars) so the per-event Python cost stays
small. Only the DLQ travels as a list of dicts (it is rare and irregular by nature).
"""

from __future__ import annotations

import time
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from itertools import accumulate

import polars as pl
import pyarrow as pa


class DlqReason(StrEnum):
    """The fixed vocabulary of why a record was rejected."""

    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_SCHEMA_URN = "missing_schema_urn"
    UNKNOWN_SCHEMA = "unknown_schema"
    UNSUPPORTED_VERSION = "unsupported_version"
    MISSING_FIELD = "missing_field"
    BAD_TIMESTAMP = "bad_timestamp"
    BAD_TYPE = "bad_type"
    TOO_LARGE = "too_large"
    ENRICHMENT_FAILED = "enrichment_failed"
    SINK_FAILED = "sink_failed"


@dataclass(slots=True)
class RawRecord:
    """One record exactly as read, plus where it came from."""

    value: bytes
    source: str  # "path:line" or "topic/partition/offset"
    ingested_at: float  # epoch seconds at which the pipeline read it


class PolledRecords(Sequence[RawRecord]):
    """The records of one poll of a Kafka topic partition, as columns: the values one after the
    other in `values`, and three arrays of native-endian int64 (`bytes`) with the end of each value
    in `values`, its offset and the epoch milliseconds at which the pipeline read it (its Kafka
    timestamp). That is how the compiled reader hands them over (`connectors.kafka`), without an
    object per record.

    Validation decodes `values` by `ends` and builds the `source`/`ingested_at` columns from the
    arrays directly; indexing builds the `RawRecord` (for the records the Python path looks at).
    """

    __slots__ = ("ends", "ingested_ms", "label", "offsets", "values")

    def __init__(self, label: str, values: bytes, ends: bytes, offsets: bytes, ingested_ms: bytes):
        self.label = label  # "topic/partition": a record's source is "<label>/<offset>"
        self.values = values
        self.ends = ends
        self.offsets = offsets
        self.ingested_ms = ingested_ms

    @classmethod
    def of(
        cls, label: str, values: list[bytes], offsets: list[int], ingested_ms: list[int]
    ) -> PolledRecords:
        """From a value, offset and timestamp per record (as `Consumer.consume` gives them)."""
        ends = array("q", accumulate(map(len, values)))
        return cls(
            label,
            b"".join(values),
            ends.tobytes(),
            array("q", offsets).tobytes(),
            array("q", ingested_ms).tobytes(),
        )

    def __len__(self) -> int:
        return len(self.ends) // 8

    def __getitem__(self, i: int) -> RawRecord:  # type: ignore[override] - no slices
        ends = memoryview(self.ends).cast("q")
        i = range(len(ends))[i]  # IndexError past either end, as a list
        start = ends[i - 1] if i > 0 else 0
        return RawRecord(
            self.values[start : ends[i]],
            f"{self.label}/{memoryview(self.offsets).cast('q')[i]}",
            memoryview(self.ingested_ms).cast("q")[i] / 1000,
        )

    def __iter__(self) -> Iterator[RawRecord]:
        return map(self.__getitem__, range(len(self)))

    def last_offset(self) -> int:
        return memoryview(self.offsets).cast("q")[-1]


@dataclass(slots=True)
class RawBatch:
    """What one source partition hands over per poll."""

    partition: str
    records: Sequence[RawRecord]  # a list, or the columns of a Kafka poll


@dataclass(slots=True)
class EventBatch:
    """Valid events of one source partition as columns (see `EVENT_SCHEMA` / `ENRICHED_SCHEMA`),
    together with the records rejected on the way."""

    partition: str
    events: pl.DataFrame
    dlq: list[dict] = field(default_factory=list)


# Columns of a validated event. `timestamp` is the event time; `properties` is the original object
# serialized as JSON text; `error_*` flatten the optional `error` object.
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "schema_urn": pl.String(),
    "version": pl.Int32(),
    "type": pl.String(),
    "tenant": pl.String(),
    "timestamp": pl.Datetime("ms", "UTC"),
    "user_id": pl.String(),
    "session_id": pl.String(),
    "ip": pl.String(),
    "user_agent": pl.String(),
    "url": pl.String(),
    "properties": pl.String(),
    "error_message": pl.String(),
    "error_stack": pl.String(),
    "correlation_id": pl.String(),
    "ingested_at": pl.Datetime("ms", "UTC"),
    "source": pl.String(),
}

# Columns that enrichment adds.
ENRICHMENT_SCHEMA: dict[str, pl.DataType] = {
    "geo_country": pl.String(),
    "geo_region": pl.String(),
    "geo_city": pl.String(),
    "geo_lat": pl.Float64(),
    "geo_lon": pl.Float64(),
    "ua_browser": pl.String(),
    "ua_browser_major": pl.String(),
    "ua_os": pl.String(),
    "ua_os_major": pl.String(),
    "ua_device_family": pl.String(),
    "ua_device_type": pl.String(),
    "processed_at": pl.Datetime("ms", "UTC"),
}

ENRICHED_SCHEMA: dict[str, pl.DataType] = {**EVENT_SCHEMA, **ENRICHMENT_SCHEMA}

_CORRELATION_NAMESPACE = uuid.UUID("6f1c3b52-2a4e-4d0e-9a57-0d3c1f1b8e21")


def derive_correlation_id(seed: str) -> str:
    """A stable correlation id for an event that carries none (same seed → same id)."""
    return str(uuid.uuid5(_CORRELATION_NAMESPACE, seed))


# How datetimes are written in every output: ISO-8601 UTC with millisecond precision.
ISO_MS_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"


# Output rows: a frame, or dicts where rows are few and irregular (DLQ records, window totals).
Rows = pl.DataFrame | list[dict]


def as_dicts(rows: Rows) -> list[dict]:
    """Rows as dicts, datetimes as ISO-8601 UTC text with millisecond precision."""
    if isinstance(rows, list):
        return rows
    stamps = [c for c, t in rows.schema.items() if isinstance(t, pl.Datetime)]
    return rows.with_columns(pl.col(stamps).dt.strftime(ISO_MS_FORMAT)).to_dicts()


_last_iso: tuple[int, str] = (0, "")


def utc_now_iso() -> str:
    """The wall clock as ISO-8601 UTC with milliseconds; formatted once per millisecond (a batch's
    DLQ records are mostly stamped within one)."""
    global _last_iso
    ms = time.time_ns() // 1_000_000
    if ms != _last_iso[0]:
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _last_iso = (ms, text.replace("+00:00", "Z"))
    return _last_iso[1]


def dlq_record(
    *,
    reason: DlqReason,
    error: str,
    stage: str,
    payload: str,
    source: str,
    correlation_id: str | None = None,
) -> dict:
    """A DLQ record: why, where, and the original payload, so it can be fixed and replayed."""
    return {
        "reason": reason.value,
        "error": error,
        "stage": stage,
        "payload": payload,
        "source": source,
        "correlation_id": correlation_id or derive_correlation_id(source),
        "failed_at": utc_now_iso(),
    }


# A column as compiled code (`native/src/columns.rs`) hands it over: the values, the int64
# offsets of text (else None) and the validity bitmap (None: no nulls), each as bytes.
BufferColumn = tuple[bytes, bytes | None, bytes | None]


def frame_of_buffers(
    schema: dict[str, pa.DataType], rows: int, columns: list[BufferColumn]
) -> pl.DataFrame:
    """A polars frame of `rows` rows from compiled code's column buffers, typed by `schema`
    (Arrow types), without a Python object per value."""
    arrays = [arrow_array(t, rows, c) for t, c in zip(schema.values(), columns, strict=True)]
    return frame_of_arrays(list(schema), arrays)


def frame_of_arrays(names: list[str], arrays: list[pa.Array]) -> pl.DataFrame:
    """A polars frame of Arrow arrays, column by column: `pl.from_arrow` of a table converts its
    columns on polars' thread pool and waits for it, and in a busy process that thread first
    waits for a core."""
    return pl.DataFrame([pl.Series(name, array) for name, array in zip(names, arrays, strict=True)])


def arrow_array(arrow_type: pa.DataType, rows: int, column: BufferColumn) -> pa.Array:
    """One `BufferColumn` as an Arrow array of `arrow_type`, over the same bytes."""
    data, offsets, validity = column
    buffers = [None if validity is None else pa.py_buffer(validity)]
    if offsets is not None:
        buffers.append(pa.py_buffer(offsets))
    buffers.append(pa.py_buffer(data))
    return pa.Array.from_buffers(arrow_type, rows, buffers)


def string_view_array(rows: int, column: BufferColumn, shared: pa.Buffer) -> pa.Array:
    """A compiled string view column, (data, views, validity), as an Arrow string_view array
    whose long values point into `shared` (buffer 0: the text they were read from, kept alive
    by the array) or `data` (buffer 1)."""
    data, views, validity = column
    buffers = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(views)]
    return pa.Array.from_buffers(pa.string_view(), rows, [*buffers, shared, pa.py_buffer(data)])


ArrowColumn = tuple[str, str, int, list[tuple[int, int] | None]]


def texts_and_millis(frame: pl.DataFrame, names: tuple[str, ...]) -> pl.DataFrame:
    """The columns `names` as text, then `timestamp` as epoch milliseconds (Int64), column by
    column: polars hands a select of several expressions to its thread pool and waits for it,
    and in a busy process that thread first waits for a core."""
    texts = [frame.get_column(name) for name in names]
    texts = [c if c.dtype == pl.String else c.cast(pl.String) for c in texts]
    return pl.DataFrame([*texts, frame.get_column("timestamp").dt.epoch("ms")])


def arrow_columns(
    frame: pl.DataFrame, *, string_views: bool = False
) -> tuple[list[pa.Array], list[ArrowColumn]]:
    """The columns of `frame` as Arrow arrays and, for compiled code (`native/`), each as (name,
    Arrow type name, array offset, buffers as (address, size)). Strings come as large_string, or
    with `string_views` as polars holds them (string_view: no copy). The addresses are only valid
    while the arrays are alive: keep them until the call returns."""
    level = pl.CompatLevel.newest() if string_views else pl.CompatLevel.oldest()
    table = frame.to_arrow(compat_level=level)
    # one chunk (what polars mostly holds) is taken as it is: combining it costs ~20 µs a column
    arrays = [c.chunk(0) if c.num_chunks == 1 else c.combine_chunks() for c in table.columns]
    columns = [
        (name, str(a.type), a.offset, [None if b is None else (b.address, b.size) for b in bufs])
        for name, a, bufs in zip(table.column_names, arrays, map(pa.Array.buffers, arrays))
    ]
    return arrays, columns
