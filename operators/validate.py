"""Decode raw records and validate them against their contract: `RawBatch` → `EventBatch`.

Per record, in this order (the first failing check decides the DLQ reason):

1. more than 1 MiB                                   → `too_large` (payload: the first 4 KiB)
2. not UTF-8 or not JSON                             → `malformed_json`
3. JSON, but not an object                           → `not_an_object`
4. `schema_urn` absent, null or ""                   → `missing_schema_urn`
   `schema_urn` not a string                         → `bad_type`
5. `schema_urn` not registered                       → `unknown_schema`
6. `version` absent or null                          → `unsupported_version`
   (without a version no contract can be chosen, so this is a version problem, not a missing field)
   `version` not an integer (`"1"`, `1.0`, `true`)   → `bad_type`
   `version` not registered for that urn             → `unsupported_version`
7. the contract's fields, in declared order:
   required field absent, null or ""                 → `missing_field`
   value of the wrong JSON type (booleans are never integers; a timestamp that is neither text nor an
   integer)                                          → `bad_type`
   timestamp text that is not ISO-8601, has no offset (naive), or any timestamp outside
   1970-01-01T00:00:00Z .. 2200-01-01T00:00:00Z (exclusive)  → `bad_timestamp`
   Optional fields may be absent or null; fields the contract does not declare are ignored.

A rejected record becomes `dlq_record(stage="validate", ...)` whose `error` names the field, with the
original text as payload (decoded with replacement characters where it is not UTF-8), the record's
`source`, and as correlation id the record's `correlation_id`, else one derived from its `event_id`,
else one derived from `source` (the same id `dlq_record` would derive). Should a record ever trip an
unexpected error inside this module, it is rejected as `bad_type` ("could not be validated") rather
than stopping the dataflow.

A valid record becomes one row of `EVENT_SCHEMA`: `timestamp` in UTC milliseconds (sub-millisecond
digits are truncated), `properties` as compact JSON text, `error.message`/`error.stack` flattened into
`error_message`/`error_stack`, `correlation_id` the event's own or `derive_correlation_id(event_id)`,
`ingested_at`/`source` from the `RawRecord`.

Speed: records are first offered to the compiled decoder (`native/`, Rust, built by `make install`):
it parses, checks and extracts in one pass and hands back the rows as Arrow column buffers, about
three times cheaper than the Python path. It takes only records it can vouch for: a record it is not
sure the Python path would accept with exactly the same row (invalid JSON, a failed check, a
timestamp layout other than `YYYY-MM-DDTHH:MM:SS[.f]` with `Z` or `±HH[:]MM`, a repeated key or
`-0` inside `properties`) goes through the Python path, which decides it. So every DLQ reason and message
comes from Python, and the two must agree on every record the compiled decoder accepts (tested
against each other). Without the compiled decoder every record takes the Python path.

The Python path: for each contract a specialised check-and-extract function is generated from its
definition (the "fast path"). It checks that the event is of its urn and version, and either returns
the finished row or gives up; giving up sends the record through the generic, interpreted checks
(the "reference path"), which decide the DLQ reason and message, or build the row themselves. The
two must agree on every record that the fast path accepts (tested). Rows are collected as tuples and
become one `pl.DataFrame` per batch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import orjson
import polars as pl
import pyarrow as pa

from operators import model
from operators.contracts import Contract, ContractRegistry, FieldSpec, default_registry
from operators.model import (
    EVENT_SCHEMA,
    DlqReason,
    EventBatch,
    PolledRecords,
    RawBatch,
    RawRecord,
    arrow_array,
    derive_correlation_id,
    dlq_record,
    frame_of_arrays,
    string_view_array,
)

log = logging.getLogger(__name__)

STAGE = "validate"
MAX_RECORD_BYTES = 1 << 20  # 1 MiB; larger records are rejected unread
TOO_LARGE_SAMPLE_BYTES = 4096  # how much of a too-large record goes into its DLQ payload
MIN_TIMESTAMP_MS = 0  # 1970-01-01T00:00:00Z
MAX_TIMESTAMP_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z, exclusive

EVENT_COLUMNS = tuple(EVENT_SCHEMA)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_fromisoformat = datetime.fromisoformat
_dumps = orjson.dumps


def _make_derive() -> tuple[Callable[[str], str], bytes | None]:
    """`derive_correlation_id`, about 5x cheaper than going through the `uuid` module.

    uuid5 is sha1(namespace bytes + name) with the version and variant bits set, formatted as
    8-4-4-4-12 hex digits. Should the model ever derive ids differently (checked on a few probes), its
    own function is used instead.
    """
    namespace = getattr(model, "_CORRELATION_NAMESPACE", None)
    if namespace is None:
        return derive_correlation_id, None
    prefix = namespace.bytes

    def derive(seed: str) -> str:
        x = _sha1(prefix + seed.encode()).hexdigest()
        return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"

    for probe in ("", "probe", "ünïcode-✓", "5b1e3c1e-2c7f-4d1a-9e0b-3f2a1c0d9e8f"):
        if derive(probe) != derive_correlation_id(probe):
            return derive_correlation_id, None
    return derive, prefix


_sha1 = hashlib.sha1
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
# `_DERIVE_PREFIX` is None when the model's own (slower) function has to be used.
_derive, _DERIVE_PREFIX = _make_derive()


def _json_text(value: object) -> str:
    return _dumps(value).decode()


# --- reference path: generic checks that name the problem ----------------------------------------


class _Reject(Exception):
    __slots__ = ("error", "reason")

    def __init__(self, reason: DlqReason, error: str):
        self.reason = reason
        self.error = error


_JSON_TYPE = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}
_EXPECTED = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "timestamp": "an ISO-8601 timestamp string or an epoch-milliseconds integer",
}


def _show(value: object, limit: int = 80) -> str:
    """A short JSON rendering of a value for error messages."""
    text = _dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: object) -> str:
    return f"{_JSON_TYPE.get(type(value), type(value).__name__)} {_show(value)}"


def _bad_type(path: str, expected: str, value: object) -> _Reject:
    return _Reject(DlqReason.BAD_TYPE, f"field '{path}' must be {expected}, got {_describe(value)}")


def _checked_timestamp(path: str, value: object) -> int:
    cls = value.__class__
    if cls is str:
        try:
            parsed = _fromisoformat(value)
        except ValueError:
            raise _Reject(
                DlqReason.BAD_TIMESTAMP,
                f"field '{path}' is not an ISO-8601 timestamp: {_show(value)}",
            ) from None
        if parsed.tzinfo is None:
            raise _Reject(
                DlqReason.BAD_TIMESTAMP,
                f"field '{path}' has no UTC offset (needs 'Z' or '+hh:mm'): {_show(value)}",
            )
        try:
            ms = (parsed - _EPOCH) // _MS
        except OverflowError:
            ms = -1
    elif cls is int:
        ms = value
    else:
        raise _bad_type(path, _EXPECTED["timestamp"], value)
    if not MIN_TIMESTAMP_MS <= ms < MAX_TIMESTAMP_MS:
        raise _Reject(
            DlqReason.BAD_TIMESTAMP,
            f"field '{path}' is outside 1970-01-01T00:00:00Z..2200-01-01T00:00:00Z: {_show(value)}",
        )
    return ms


def _checked_value(spec: FieldSpec, path: str, value: object) -> object:
    """The column value of a present (non-null) field; raises `_Reject` if its type is wrong."""
    cls = value.__class__
    kind = spec.type
    if kind == "timestamp":
        return _checked_timestamp(path, value)
    if kind == "string":
        ok = cls is str
    elif kind == "integer":
        ok = cls is int
    elif kind == "number":
        ok = cls is int or cls is float
    elif kind == "boolean":
        ok = cls is bool
    elif kind == "object":
        ok = cls is dict
    elif kind == "array":
        ok = cls is list
    else:  # parse_contract only admits the kinds above
        ok = False
    if not ok:
        raise _bad_type(path, _EXPECTED.get(kind, kind), value)
    if kind == "number":
        return float(value)
    if (kind == "object" and spec.fields is None) or kind == "array":
        return _json_text(value)
    return value


def _check_fields(obj: dict, specs: tuple[FieldSpec, ...], prefix: str, flat: dict) -> None:
    for spec in specs:
        path = prefix + spec.name
        value = obj.get(spec.name)
        if value is None or (spec.required and value == ""):
            if spec.required:
                state = (
                    "missing" if spec.name not in obj else "null" if value is None else "empty"
                )
                raise _Reject(DlqReason.MISSING_FIELD, f"required field '{path}' is {state}")
            continue
        converted = _checked_value(spec, path, value)
        if spec.fields is not None:
            _check_fields(value, spec.fields, path + ".", flat)
        else:
            flat[path] = converted


@dataclass(frozen=True, slots=True)
class _Plan:
    contract: Contract
    # column → dotted path of the field that fills it (only columns the contract fills)
    paths: dict[str, str]
    # generated fast path: (obj, ingested_ms, source) → row tuple, or None to defer
    fast: Callable[[dict, int, str], tuple | None]
    fast_source: str


def _reference_row(plan: _Plan, obj: dict, ingested_ms: int, source: str) -> tuple:
    """The row of a valid event, or `_Reject` saying what is wrong with it."""
    flat: dict[str, object] = {}
    _check_fields(obj, plan.contract.fields, "", flat)
    row = []
    for column in EVENT_COLUMNS:
        if column == "ingested_at":
            row.append(ingested_ms)
        elif column == "source":
            row.append(source)
        elif column == "correlation_id":
            row.append(flat.get(plan.paths.get(column, "")) or _derive(flat["event_id"]))
        else:
            path = plan.paths.get(column)
            row.append(None if path is None else flat.get(path))
    return tuple(row)


def _resolve(obj: dict, plans: dict[tuple[str, int], _Plan], registry: ContractRegistry) -> _Plan:
    urn = obj.get("schema_urn")
    if urn is None or urn == "":
        state = "missing" if "schema_urn" not in obj else "null" if urn is None else "empty"
        raise _Reject(DlqReason.MISSING_SCHEMA_URN, f"field 'schema_urn' is {state}")
    if urn.__class__ is not str:
        raise _bad_type("schema_urn", "a string", urn)
    versions = registry.versions(urn)
    if not versions:
        known = ", ".join(registry.urns) or "none"
        raise _Reject(
            DlqReason.UNKNOWN_SCHEMA,
            f"field 'schema_urn': {_show(urn)} is not a registered contract (registered: {known})",
        )
    version = obj.get("version")
    listed = ", ".join(map(str, versions))
    if version is None:
        state = "missing" if "version" not in obj else "null"
        raise _Reject(
            DlqReason.UNSUPPORTED_VERSION,
            f"field 'version' is {state}, so no version of {urn} can be chosen "
            f"(registered: {listed})",
        )
    if version.__class__ is not int:
        raise _bad_type("version", "an integer", version)
    plan = plans.get((urn, version))
    if plan is None:
        raise _Reject(
            DlqReason.UNSUPPORTED_VERSION,
            f"field 'version': {version} is not registered for {urn} (registered: {listed})",
        )
    return plan


# --- fast path: a check-and-extract function generated per contract -----------------------------

# Expression that is true when a present, non-null value `{v}` has the wrong type.
_WRONG_TYPE = {
    "string": "{v}.__class__ is not str",
    "integer": "{v}.__class__ is not int",
    "number": "({v}.__class__ is not float and {v}.__class__ is not int)",
    "boolean": "{v}.__class__ is not bool",
    "object": "{v}.__class__ is not dict",
    "array": "{v}.__class__ is not list",
}


def _generate_fast(contract: Contract, paths: dict[str, str]) -> tuple[Callable, str]:
    counter = itertools.count()
    var_of: dict[str, str] = {}
    lines = ["def fast(obj, ingested_ms, source):", "    get = obj.get"]
    # This function also decides whether the event belongs to this contract at all.
    envelope = {
        "schema_urn": "if {v} != " + repr(contract.schema_urn) + ": return None",
        "version": "if {v} != " + str(contract.version) + " or {v}.__class__ is not int: return None",
    }

    def emit(specs: tuple[FieldSpec, ...], getter: str, indent: int, prefix: str) -> None:
        pad = " " * indent
        for spec in specs:
            path = prefix + spec.name
            v = f"v{next(counter)}"
            var_of[path] = v
            lines.append(f"{pad}{v} = {getter}({spec.name!r})")
            if not prefix and spec.name in envelope:
                lines.append(pad + envelope[spec.name].format(v=v))
                continue
            if spec.type == "timestamp":
                # Naive datetimes fail the subtraction with TypeError, which is what we want.
                inner = pad if spec.required else pad + "    "
                if not spec.required:
                    lines.append(f"{pad}if {v} is not None:")
                lines.extend([
                    f"{inner}if {v}.__class__ is str:",
                    f"{inner}    try: {v} = (_fromiso({v}) - _EPOCH) // _MS",
                    f"{inner}    except (ValueError, TypeError, OverflowError): return None",
                    f"{inner}elif {v}.__class__ is not int: return None",
                    f"{inner}if not {MIN_TIMESTAMP_MS} <= {v} < {MAX_TIMESTAMP_MS}: return None",
                ])
                continue
            wrong = _WRONG_TYPE[spec.type].format(v=v)
            if spec.fields is not None:  # object with declared members: check and flatten them
                if spec.required:
                    lines.append(f"{pad}if {wrong}: return None")
                    emit(spec.fields, f"{v}.get", indent, path + ".")
                else:
                    start = len(lines)
                    lines.append(f"{pad}if {v} is None:")
                    lines.append("")  # filled below with the member defaults
                    lines.append(f"{pad}elif {wrong}: return None")
                    lines.append(f"{pad}else:")
                    before = set(var_of)
                    emit(spec.fields, f"{v}.get", indent + 4, path + ".")
                    members = [var_of[p] for p in var_of if p not in before]
                    lines[start + 1] = f"{pad}    {' = '.join(members)} = None"
                continue
            if spec.required:
                if spec.type == "string":
                    lines.append(f"{pad}if {wrong} or not {v}: return None")
                else:
                    lines.append(f"{pad}if {wrong}: return None")
            else:
                lines.append(f"{pad}if {wrong} and {v} is not None: return None")
            convert = None
            if spec.type in ("object", "array"):
                convert = f"_dumps({v}).decode()"
            elif spec.type == "number":
                convert = f"float({v})"
            if convert is not None:
                if spec.required:
                    lines.append(f"{pad}{v} = {convert}")
                else:
                    lines.append(f"{pad}if {v} is not None: {v} = {convert}")

    emit(contract.fields, "get", 4, "")
    row: list[str] = []
    for column in EVENT_COLUMNS:
        if column == "ingested_at":
            row.append("ingested_ms")
        elif column == "source":
            row.append("source")
        elif column == "correlation_id":  # the event's own, else derived from event_id
            own = var_of.get(paths.get(column, ""))
            event_id = var_of["event_id"]
            if own is None:
                own = "cid"
                lines.append("    cid = None")
            lines.append(f"    if not {own}:")
            if _DERIVE_PREFIX is None:
                lines.append(f"        {own} = _derive({event_id})")
            else:  # `_derive` inlined
                lines.append(f"        x = _sha1(_PREFIX + {event_id}.encode()).hexdigest()")
                lines.append(
                    f'        {own} = f"{{x[:8]}}-{{x[8:12]}}-5{{x[13:16]}}-{{_VARIANT[x[16]]}}'
                    f'{{x[17:20]}}-{{x[20:32]}}"'
                )
            row.append(own)
        else:
            path = paths.get(column)
            row.append(var_of[path] if path is not None else "None")
    lines.append(f"    return ({', '.join(row)},)")
    source = "\n".join(lines) + "\n"
    namespace = {
        "_fromiso": _fromisoformat, "_EPOCH": _EPOCH, "_MS": _MS, "_dumps": _dumps,
        "_derive": _derive, "_sha1": _sha1, "_PREFIX": _DERIVE_PREFIX, "_VARIANT": _VARIANT,
    }  # fmt: skip
    code = compile(source, f"<validator {contract.schema_urn} v{contract.version}>", "exec")
    exec(code, namespace)  # noqa: S102 - source generated above from a verified contract
    return namespace["fast"], source


def compile_contract(contract: Contract) -> _Plan:
    paths = {column: ".".join(path) for column, (path, _spec) in contract.columns().items()}
    fast, source = _generate_fast(contract, paths)
    return _Plan(contract, paths, fast, source)


@lru_cache(maxsize=8)
def _plans(registry: ContractRegistry) -> dict[tuple[str, int], _Plan]:
    return {(c.schema_urn, c.version): compile_contract(c) for c in registry}


# --- the operator -------------------------------------------------------------------------------


def _text(value: bytes | bytearray | memoryview | str, limit: int | None = None) -> str:
    if isinstance(value, str):
        return value if limit is None else value[:limit]
    data = bytes(value) if limit is None else bytes(value[:limit])
    return data.decode("utf-8", errors="replace")


def _dlq_correlation(obj: object, source: str) -> str:
    """The record's own correlation id, else one derived from its event id, else from `source`
    (what `dlq_record` would derive itself, only cheaper)."""
    if obj.__class__ is dict:
        own = obj.get("correlation_id")
        if own.__class__ is str and own:
            return own
        event_id = obj.get("event_id")
        if event_id.__class__ is str and event_id:
            return _derive(event_id)
    return _derive(source)


def _dlq(record: RawRecord, reason: DlqReason, error: str, obj: object = None,
         payload: str | None = None) -> dict:
    return dlq_record(
        reason=reason,
        error=error,
        stage=STAGE,
        payload=_text(record.value) if payload is None else payload,
        source=record.source,
        correlation_id=_dlq_correlation(obj, record.source),
    )


def _slow(
    obj: object, record: RawRecord, ingested_ms: int, plans: dict, registry: ContractRegistry
) -> tuple | dict:
    """Row or DLQ record for a parsed record the fast path did not accept."""
    try:
        if obj.__class__ is not dict:
            kind = _JSON_TYPE.get(type(obj), type(obj).__name__)
            raise _Reject(DlqReason.NOT_AN_OBJECT, f"record is a JSON {kind}, expected an object")
        plan = _resolve(obj, plans, registry)
        return _reference_row(plan, obj, ingested_ms, record.source)
    except _Reject as rejected:
        return _dlq(record, rejected.reason, rejected.error, obj)


def decode_record(record: RawRecord, registry: ContractRegistry | None = None) -> tuple | dict:
    """One record: its `EVENT_SCHEMA` row (a tuple in column order) or its DLQ record."""
    batch = decode_batch(RawBatch("", [record]), registry)
    if batch.dlq:
        return batch.dlq[0]
    return batch.events.row(0)


def _decode_rows(
    records: Sequence[RawRecord], registry: ContractRegistry
) -> tuple[list[tuple], list[int], list[dict]]:
    """The Python path over `records`: the rows of the valid ones, their positions in `records`,
    and the DLQ records of the others."""
    plans = _plans(registry)
    rows: list[tuple] = []
    positions: list[int] = []
    dlq: list[dict] = []
    keep, at = rows.append, positions.append
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    fast = None  # fast path of the contract the previous valid event had (it checks urn/version)
    last_ingested, ingested_ms = None, 0
    for position, record in enumerate(records):
        try:
            value = record.value
            if len(value) > MAX_RECORD_BYTES:
                dlq.append(
                    _dlq(
                        record,
                        DlqReason.TOO_LARGE,
                        f"record is {len(value)} bytes, more than the limit of {MAX_RECORD_BYTES} "
                        f"bytes; payload holds its first {TOO_LARGE_SAMPLE_BYTES} bytes",
                        payload=_text(value, TOO_LARGE_SAMPLE_BYTES),
                    )
                )
                continue
            try:
                obj = loads(value)
            except decode_error as exc:
                dlq.append(
                    _dlq(record, DlqReason.MALFORMED_JSON, f"record is not valid JSON: {exc}")
                )
                continue
            if record.ingested_at != last_ingested:
                last_ingested = record.ingested_at
                ingested_ms = round(last_ingested * 1000)
            if obj.__class__ is dict:
                if fast is not None:
                    row = fast(obj, ingested_ms, record.source)
                    if row is not None:
                        keep(row)
                        at(position)
                        continue
                urn = obj.get("schema_urn")
                version = obj.get("version")
                if urn.__class__ is str and version.__class__ is int:
                    plan = plans.get((urn, version))
                    if plan is not None and plan.fast is not fast:
                        row = plan.fast(obj, ingested_ms, record.source)
                        if row is not None:
                            fast = plan.fast
                            keep(row)
                            at(position)
                            continue
            result = _slow(obj, record, ingested_ms, plans, registry)
            if result.__class__ is tuple:
                keep(result)
                at(position)
            else:
                dlq.append(result)
        except Exception as exc:  # noqa: BLE001 - a record must never stop the dataflow
            dlq.append(
                _dlq(
                    record,
                    DlqReason.BAD_TYPE,
                    f"record could not be validated ({type(exc).__name__}: {exc})",
                )
            )
    return rows, positions, dlq


def _rows_frame(rows: list[tuple]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema=EVENT_SCHEMA)
    return pl.DataFrame(dict(zip(EVENT_COLUMNS, zip(*rows))), schema=EVENT_SCHEMA)


def decode_batch(batch: RawBatch, registry: ContractRegistry | None = None) -> EventBatch:
    """Decode and validate every record of `batch`; never raises because of a record's content.

    The compiled decoder (`_native_decoder`) takes the records it can vouch for; the rest, and
    all of them without it, go through the Python path. Rows stay in record order."""
    if registry is None:
        registry = default_registry()
    records = batch.records
    native = _native_decoder(registry)
    if native is not None:
        try:
            if isinstance(records, PolledRecords):
                deferred, columns = native.decode_packed(
                    records.values,
                    records.ends,
                    records.label,
                    records.offsets,
                    records.ingested_ms,
                )
            else:
                deferred, columns = native.decode([r.value for r in records])
        except BaseException as exc:  # PyO3 raises a Rust panic as a BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            # a bug there must not stop the dataflow: the Python path decides this batch
            log.exception("the compiled decoder failed on a batch of %s", batch.partition)
            native = None
    if native is None:
        rows, _, dlq = _decode_rows(records, registry)
        return EventBatch(partition=batch.partition, events=_rows_frame(rows), dlq=dlq)
    if not deferred:
        return EventBatch(batch.partition, _native_frame(columns, records), [])
    rows, positions, dlq = _decode_rows([records[i] for i in deferred], registry)
    deferred_set = set(deferred)
    accepted = [i for i in range(len(records)) if i not in deferred_set]
    events = _native_frame(columns, records, accepted)
    if rows:  # rare: records only the Python path accepts; merged back into record order
        order = accepted + [deferred[p] for p in positions]
        events = (
            pl.concat([events, _rows_frame(rows)])
            .with_columns(pl.Series("_order", order, pl.UInt32))
            .sort("_order")
            .drop("_order")
        )
    return EventBatch(partition=batch.partition, events=events, dlq=dlq)


# --- the compiled decoder -----------------------------------------------------------------------

# Output columns the compiled decoder fills (`ingested_at` and `source` come from the records)
# with their layout, and the Arrow type of each layout.
_NATIVE_KINDS = {pl.String: "text", pl.Int32: "int32", pl.Datetime: "millis"}
_NATIVE_COLUMNS = tuple(
    (c, _NATIVE_KINDS[EVENT_SCHEMA[c].base_type()])
    for c in EVENT_COLUMNS
    if c not in ("ingested_at", "source")
)
_ARROW_TYPES = {  # text: string views (`string_view_array`)
    "int32": pa.int32(),
    "millis": pa.timestamp("ms", tz="UTC"),
}


def _field_specs(specs: tuple[FieldSpec, ...]) -> list[tuple]:
    return [
        (s.name, s.type, s.required, None if s.fields is None else _field_specs(s.fields))
        for s in specs
    ]


@lru_cache(maxsize=8)
def _native_decoder(registry: ContractRegistry):
    """The compiled fast path (`native/`) for `registry`, or None where it is not built (the
    Python path then validates every record, several times slower)."""
    if _DERIVE_PREFIX is None:
        return None
    try:
        from pipeline_native import ContractDecoder
    except ImportError:
        log.warning("the compiled decoder (pipeline_native) is not installed: validating in Python")
        return None
    contracts = [
        (plan.contract.schema_urn, plan.contract.version, _field_specs(plan.contract.fields),
         plan.paths)
        for plan in _plans(registry).values()
    ]  # fmt: skip
    try:
        return ContractDecoder(
            list(_NATIVE_COLUMNS),
            contracts,
            _DERIVE_PREFIX,
            MAX_RECORD_BYTES,
            MIN_TIMESTAMP_MS,
            MAX_TIMESTAMP_MS,
        )
    except ValueError as exc:  # a contract it cannot express (e.g. a number filling a text column)
        log.warning("the compiled decoder refuses these contracts (%s): validating in Python", exc)
        return None


def _native_frame(
    columns: list[tuple], records: Sequence[RawRecord], accepted: list[int] | None = None
) -> pl.DataFrame:
    """The frame of the compiled decoder's columns for `records` (those at `accepted`: all).
    Built in Arrow and converted once: polars expressions on top (the `source` text, the column
    order) cost half a millisecond a batch, most of the work on the small batches of a live
    stream. For a Kafka poll the decoder writes `ingested_at` and `source` as well."""
    n = len(records) if accepted is None else len(accepted)
    kinds = [kind for _, kind in _NATIVE_COLUMNS]
    polled = isinstance(records, PolledRecords)
    if polled:
        kinds += ["millis", "text"]
    # text values point into the poll's buffer unless they had escapes: no copy
    shared = pa.py_buffer(records.values if polled else b"")
    arrays = [
        string_view_array(n, column, shared)
        if kind == "text"
        else arrow_array(_ARROW_TYPES[kind], n, column)
        for kind, column in zip(kinds, columns, strict=True)
    ]
    if not polled:
        chosen = records if accepted is None else [records[i] for i in accepted]
        ingested = pa.array([round(r.ingested_at * 1000) for r in chosen], pa.int64())
        source = pa.array([record.source for record in chosen], pa.large_string())
        arrays += [ingested.cast(_ARROW_TYPES["millis"]), source]
    return frame_of_arrays(list(EVENT_COLUMNS), arrays)
