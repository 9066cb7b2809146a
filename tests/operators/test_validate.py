"""decode_batch: every DLQ reason with its exact record, valid rows with exact values."""

from __future__ import annotations

import random
import shutil
from datetime import UTC, datetime
from pathlib import Path

import orjson
import polars as pl
import pytest

from operators.contracts import (
    CONTRACTS_DIR,
    ContractRegistry,
    contract_file_name,
    register_new,
)
from operators.model import EVENT_SCHEMA, RawBatch, RawRecord, derive_correlation_id
from operators.validate import (
    MAX_RECORD_BYTES,
    _derive,
    _plans,
    _reference_row,
    _Reject,
    decode_batch,
    decode_record,
)

WEB = "urn:nc:events:web"
INGESTED_AT = 1_714_550_460.25  # 2024-05-01T08:01:00.250Z
INGESTED = datetime(2024, 5, 1, 8, 1, 0, 250_000, tzinfo=UTC)
SOURCE = "events.jsonl:17"
EVENT_ID = "7d9a4c2e-1b3f-4a5e-8c6d-0e1f2a3b4c5d"


def event(**changes: object) -> dict:
    """A valid v1 event; a change to `...` (Ellipsis) removes the field."""
    base = {
        "schema_urn": WEB,
        "version": 1,
        "event_id": EVENT_ID,
        "type": "pageview",
        "timestamp": "2024-05-01T08:00:00.123Z",
        "tenant": "acme",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def raw(value: dict | list | bytes | str | int | None, source: str = SOURCE) -> RawRecord:
    data = value if isinstance(value, bytes) else orjson.dumps(value)
    return RawRecord(value=data, source=source, ingested_at=INGESTED_AT)


def decode_one(value, source: str = SOURCE):
    batch = decode_batch(RawBatch("p0", [raw(value, source)]))
    assert batch.partition == "p0"
    return batch


def rejected(value, source: str = SOURCE) -> dict:
    batch = decode_one(value, source)
    assert batch.events.height == 0, "expected a rejection"
    assert len(batch.dlq) == 1
    record = dict(batch.dlq[0])
    failed_at = record.pop("failed_at")
    assert datetime.fromisoformat(failed_at).tzinfo is not None and failed_at.endswith("Z")
    return record


def expected_dlq(reason: str, error: str, payload: str, correlation_id: str) -> dict:
    return {
        "reason": reason,
        "error": error,
        "stage": "validate",
        "payload": payload,
        "source": SOURCE,
        "correlation_id": correlation_id,
    }


FROM_EVENT_ID = derive_correlation_id(EVENT_ID)


class Prefix(str):
    """An expected error text of which only the start is fixed (the rest comes from orjson)."""
FROM_SOURCE = derive_correlation_id(SOURCE)


# --- the DLQ reasons ----------------------------------------------------------------------------

CASES = [
    # (id, record, reason, error, correlation id)
    ("truncated", b'{"schema_urn": "urn:nc:events:web", "version": 1, "ev', "malformed_json",
     Prefix("record is not valid JSON: "), FROM_SOURCE),
    ("empty line", b"", "malformed_json", Prefix("record is not valid JSON: "), FROM_SOURCE),
    ("trailing garbage", b'{"a": 1} x', "malformed_json", Prefix("record is not valid JSON: "),
     FROM_SOURCE),
    ("single quotes", b"{'schema_urn': 'urn:nc:events:web'}", "malformed_json",
     Prefix("record is not valid JSON: "), FROM_SOURCE),
    ("array", [event()], "not_an_object", "record is a JSON array, expected an object", FROM_SOURCE),
    ("string", "pageview", "not_an_object", "record is a JSON string, expected an object",
     FROM_SOURCE),
    ("number", 42, "not_an_object", "record is a JSON integer, expected an object", FROM_SOURCE),
    ("null", None, "not_an_object", "record is a JSON null, expected an object", FROM_SOURCE),
    ("urn absent", event(schema_urn=...), "missing_schema_urn", "field 'schema_urn' is missing",
     FROM_EVENT_ID),
    ("urn null", event(schema_urn=None), "missing_schema_urn", "field 'schema_urn' is null",
     FROM_EVENT_ID),
    ("urn empty", event(schema_urn=""), "missing_schema_urn", "field 'schema_urn' is empty",
     FROM_EVENT_ID),
    ("urn number", event(schema_urn=7), "bad_type",
     "field 'schema_urn' must be a string, got integer 7", FROM_EVENT_ID),
    ("urn unknown", event(schema_urn="urn:nc:events:mobile"), "unknown_schema",
     ("field 'schema_urn': \"urn:nc:events:mobile\" is not a registered contract "
     "(registered: urn:nc:events:web)"), FROM_EVENT_ID),
    ("version absent", event(version=...), "unsupported_version",
     "field 'version' is missing, so no version of urn:nc:events:web can be chosen (registered: 1)",
     FROM_EVENT_ID),
    ("version null", event(version=None), "unsupported_version",
     "field 'version' is null, so no version of urn:nc:events:web can be chosen (registered: 1)",
     FROM_EVENT_ID),
    ("version 2", event(version=2), "unsupported_version",
     "field 'version': 2 is not registered for urn:nc:events:web (registered: 1)", FROM_EVENT_ID),
    ("version 0", event(version=0), "unsupported_version",
     "field 'version': 0 is not registered for urn:nc:events:web (registered: 1)", FROM_EVENT_ID),
    ("version text", event(version="1"), "bad_type",
     "field 'version' must be an integer, got string \"1\"", FROM_EVENT_ID),
    ("version bool", event(version=True), "bad_type",
     "field 'version' must be an integer, got boolean true", FROM_EVENT_ID),
    ("version float", event(version=1.0), "bad_type",
     "field 'version' must be an integer, got number 1.0", FROM_EVENT_ID),
    ("event_id absent", event(event_id=...), "missing_field",
     "required field 'event_id' is missing", FROM_SOURCE),
    ("event_id empty", event(event_id=""), "missing_field", "required field 'event_id' is empty",
     FROM_SOURCE),
    ("type null", event(type=None), "missing_field", "required field 'type' is null",
     FROM_EVENT_ID),
    ("tenant empty", event(tenant=""), "missing_field", "required field 'tenant' is empty",
     FROM_EVENT_ID),
    ("timestamp absent", event(timestamp=...), "missing_field",
     "required field 'timestamp' is missing", FROM_EVENT_ID),
    ("timestamp empty", event(timestamp=""), "missing_field",
     "required field 'timestamp' is empty", FROM_EVENT_ID),
    ("event_id number", event(event_id=12345), "bad_type",
     "field 'event_id' must be a string, got integer 12345", FROM_SOURCE),
    ("type object", event(type={"name": "pageview"}), "bad_type",
     "field 'type' must be a string, got object {\"name\":\"pageview\"}", FROM_EVENT_ID),
    ("tenant list", event(tenant=["acme"]), "bad_type",
     "field 'tenant' must be a string, got array [\"acme\"]", FROM_EVENT_ID),
    ("user_id bool", event(user_id=True), "bad_type",
     "field 'user_id' must be a string, got boolean true", FROM_EVENT_ID),
    ("properties array", event(properties=[1, 2]), "bad_type",
     "field 'properties' must be an object, got array [1,2]", FROM_EVENT_ID),
    ("properties text", event(properties="{}"), "bad_type",
     "field 'properties' must be an object, got string \"{}\"", FROM_EVENT_ID),
    ("error text", event(error="boom"), "bad_type",
     "field 'error' must be an object, got string \"boom\"", FROM_EVENT_ID),
    ("error.message number", event(error={"message": 5}), "bad_type",
     "field 'error.message' must be a string, got integer 5", FROM_EVENT_ID),
    ("timestamp bool", event(timestamp=True), "bad_type",
     ("field 'timestamp' must be an ISO-8601 timestamp string or an epoch-milliseconds integer, "
     "got boolean true"), FROM_EVENT_ID),
    ("timestamp float", event(timestamp=1714550400123.0), "bad_type",
     ("field 'timestamp' must be an ISO-8601 timestamp string or an epoch-milliseconds integer, "
     "got number 1714550400123.0"), FROM_EVENT_ID),
    ("timestamp words", event(timestamp="yesterday"), "bad_timestamp",
     "field 'timestamp' is not an ISO-8601 timestamp: \"yesterday\"", FROM_EVENT_ID),
    ("timestamp month 13", event(timestamp="2024-13-01T00:00:00Z"), "bad_timestamp",
     "field 'timestamp' is not an ISO-8601 timestamp: \"2024-13-01T00:00:00Z\"", FROM_EVENT_ID),
    ("timestamp digits", event(timestamp="1714550400123"), "bad_timestamp",
     "field 'timestamp' is not an ISO-8601 timestamp: \"1714550400123\"", FROM_EVENT_ID),
    ("timestamp naive", event(timestamp="2024-05-01T10:00:00"), "bad_timestamp",
     "field 'timestamp' has no UTC offset (needs 'Z' or '+hh:mm'): \"2024-05-01T10:00:00\"",
     FROM_EVENT_ID),
    ("timestamp date only", event(timestamp="2024-05-01"), "bad_timestamp",
     "field 'timestamp' has no UTC offset (needs 'Z' or '+hh:mm'): \"2024-05-01\"", FROM_EVENT_ID),
    ("timestamp 1969", event(timestamp="1969-12-31T23:59:59.999Z"), "bad_timestamp",
     ("field 'timestamp' is outside 1970-01-01T00:00:00Z..2200-01-01T00:00:00Z: "
     "\"1969-12-31T23:59:59.999Z\""), FROM_EVENT_ID),
    ("timestamp 1969 by offset", event(timestamp="1970-01-01T00:30:00+01:00"), "bad_timestamp",
     ("field 'timestamp' is outside 1970-01-01T00:00:00Z..2200-01-01T00:00:00Z: "
     "\"1970-01-01T00:30:00+01:00\""), FROM_EVENT_ID),
    ("timestamp 2200", event(timestamp="2200-01-01T00:00:00Z"), "bad_timestamp",
     ("field 'timestamp' is outside 1970-01-01T00:00:00Z..2200-01-01T00:00:00Z: "
     "\"2200-01-01T00:00:00Z\""), FROM_EVENT_ID),
    ("timestamp year 1", event(timestamp="0001-01-01T00:00:00+02:00"), "bad_timestamp",
     ("field 'timestamp' is outside 1970-01-01T00:00:00Z..2200-01-01T00:00:00Z: "
     "\"0001-01-01T00:00:00+02:00\""), FROM_EVENT_ID),
    ("epoch negative", event(timestamp=-1), "bad_timestamp",
     "field 'timestamp' is outside 1970-01-01T00:00:00Z..2200-01-01T00:00:00Z: -1", FROM_EVENT_ID),
    ("epoch 2200", event(timestamp=7_258_118_400_000), "bad_timestamp",
     "field 'timestamp' is outside 1970-01-01T00:00:00Z..2200-01-01T00:00:00Z: 7258118400000",
     FROM_EVENT_ID),
]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "reason", "error", "correlation_id"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_rejections(value, reason: str, error: str, correlation_id: str):
    data = value if isinstance(value, bytes) else orjson.dumps(value)
    record = rejected(data)
    if isinstance(error, Prefix):
        assert record["error"].startswith(error) and len(record["error"]) > len(error)
        record["error"] = error
    assert record == expected_dlq(reason, error, data.decode(), correlation_id)


def test_every_reason_of_this_stage_is_covered():
    reasons = {case[2] for case in CASES} | {"too_large"}
    assert reasons == {
        "malformed_json", "not_an_object", "missing_schema_urn", "unknown_schema",
        "unsupported_version", "missing_field", "bad_timestamp", "bad_type", "too_large",
    }  # fmt: skip


def test_invalid_utf8_is_malformed_and_payload_is_replaced_text():
    data = b'{"schema_urn": "urn:nc:events:web", "type": "caf\xe9"}'
    record = rejected(data)
    assert record["reason"] == "malformed_json"
    assert record["error"].startswith("record is not valid JSON: str is not valid UTF-8")
    assert record["payload"] == '{"schema_urn": "urn:nc:events:web", "type": "caf\ufffd"}'
    assert record["correlation_id"] == FROM_SOURCE


def test_too_large_keeps_a_4k_sample():
    blob = "é" * MAX_RECORD_BYTES  # two bytes each: the cut at 4096 bytes falls between characters
    data = orjson.dumps(event(properties={"blob": blob}))
    record = rejected(data)
    assert record == expected_dlq(
        "too_large",
        f"record is {len(data)} bytes, more than the limit of 1048576 bytes; payload holds its "
        "first 4096 bytes",
        data[:4096].decode("utf-8", errors="replace"),
        FROM_SOURCE,
    )
    assert len(record["payload"].encode()) <= 4096 + 3


def test_exactly_one_mib_is_accepted():
    data = orjson.dumps(event(properties={"pad": ""}))
    data = data.replace(b'"pad":""', b'"pad":"' + b"x" * (MAX_RECORD_BYTES - len(data)) + b'"')
    assert len(data) == MAX_RECORD_BYTES
    batch = decode_one(data)
    assert batch.dlq == [] and batch.events.height == 1
    assert len(decode_one(data[:-2] + b'x"}').dlq) == 1  # one byte more


def test_dlq_correlation_id_prefers_the_events_own():
    record = rejected(event(type=None, correlation_id="req-42"))
    assert record["correlation_id"] == "req-42"
    # unusable own ids fall back to the event id
    assert rejected(event(type=None, correlation_id=""))["correlation_id"] == FROM_EVENT_ID
    assert rejected(event(type=None, correlation_id=9))["correlation_id"] == FROM_EVENT_ID


def test_first_problem_in_declared_order_decides():
    record = rejected(event(event_id=1, tenant=...))
    assert record["reason"] == "bad_type" and "'event_id'" in record["error"]
    record = rejected(event(schema_urn="urn:x:y", version="one", event_id=...))
    assert record["reason"] == "unknown_schema"


# --- valid events -------------------------------------------------------------------------------


def row_of(value: dict) -> dict:
    batch = decode_one(value)
    assert batch.dlq == []
    assert batch.events.height == 1
    return batch.events.row(0, named=True)


def test_full_event_row():
    row = row_of(
        event(
            timestamp="2024-05-01T10:00:00.123+02:00",
            user_id="u-1",
            session_id="s-1",
            ip="81.2.69.142",
            user_agent="curl/8.5.0",
            url="https://acme.example.com/cart?x=1",
            correlation_id="req-42",
            properties={"title": "Cart ✓", "items": [1, 2.5, None], "nested": {"a": True}},
            error={"message": "TypeError: x is undefined", "stack": "at f (app.js:1:2)\nat g"},
            unknown_extra="ignored",
        )
    )
    assert row == {
        "event_id": EVENT_ID,
        "schema_urn": WEB,
        "version": 1,
        "type": "pageview",
        "tenant": "acme",
        "timestamp": datetime(2024, 5, 1, 8, 0, 0, 123_000, tzinfo=UTC),
        "user_id": "u-1",
        "session_id": "s-1",
        "ip": "81.2.69.142",
        "user_agent": "curl/8.5.0",
        "url": "https://acme.example.com/cart?x=1",
        "properties": '{"title":"Cart ✓","items":[1,2.5,null],"nested":{"a":true}}',
        "error_message": "TypeError: x is undefined",
        "error_stack": "at f (app.js:1:2)\nat g",
        "correlation_id": "req-42",
        "ingested_at": INGESTED,
        "source": SOURCE,
    }


def test_minimal_event_row():
    row = row_of(event())
    assert row == {
        "event_id": EVENT_ID,
        "schema_urn": WEB,
        "version": 1,
        "type": "pageview",
        "tenant": "acme",
        "timestamp": datetime(2024, 5, 1, 8, 0, 0, 123_000, tzinfo=UTC),
        "user_id": None,
        "session_id": None,
        "ip": None,
        "user_agent": None,
        "url": None,
        "properties": None,
        "error_message": None,
        "error_stack": None,
        "correlation_id": FROM_EVENT_ID,
        "ingested_at": INGESTED,
        "source": SOURCE,
    }


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (1_714_550_400_123, datetime(2024, 5, 1, 8, 0, 0, 123_000, tzinfo=UTC)),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (7_258_118_399_999, datetime(2199, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),
        ("2024-05-01T08:00:00Z", datetime(2024, 5, 1, 8, tzinfo=UTC)),
        ("2024-05-01T08:00:00+00:00", datetime(2024, 5, 1, 8, tzinfo=UTC)),
        ("2024-05-01T10:30:00+02:30", datetime(2024, 5, 1, 8, tzinfo=UTC)),
        ("2024-04-30T23:00:00.5-09:00", datetime(2024, 5, 1, 8, 0, 0, 500_000, tzinfo=UTC)),
        ("2024-05-01T08:00:00.123999Z", datetime(2024, 5, 1, 8, 0, 0, 123_000, tzinfo=UTC)),
        ("2024-05-01 08:00:00Z", datetime(2024, 5, 1, 8, tzinfo=UTC)),
        ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
        ("1970-01-01T01:00:00+01:00", datetime(1970, 1, 1, tzinfo=UTC)),
        ("2199-12-31T23:59:59.999Z", datetime(2199, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),
    ],
)
def test_timestamps_become_utc_milliseconds(timestamp, expected: datetime):
    assert row_of(event(timestamp=timestamp))["timestamp"] == expected


def test_optional_fields_null_absent_or_empty():
    row = row_of(event(user_id=None, session_id="", error=None, properties={}, url=...))
    assert row["user_id"] is None
    assert row["session_id"] == ""
    assert row["url"] is None
    assert row["error_message"] is None and row["error_stack"] is None
    assert row["properties"] == "{}"
    row = row_of(event(error={}))
    assert row["error_message"] is None and row["error_stack"] is None
    row = row_of(event(error={"message": "boom", "code": 3}))
    assert row["error_message"] == "boom" and row["error_stack"] is None


def test_correlation_id_derived_when_own_is_empty():
    assert row_of(event(correlation_id=""))["correlation_id"] == FROM_EVENT_ID
    assert row_of(event(correlation_id=None))["correlation_id"] == FROM_EVENT_ID


def test_mixed_batch_keeps_order_and_schema():
    values = [
        event(event_id="a"),
        b"{oops",
        event(event_id="b", timestamp=1_714_550_400_000),
        event(event_id="c", version=9),
        event(event_id="d", timestamp="2024-05-01T08:00:00+02:00"),
    ]
    records = [raw(v, source=f"f:{i}") for i, v in enumerate(values)]
    batch = decode_batch(RawBatch("p1", records))
    assert batch.partition == "p1"
    assert batch.events.schema == pl.Schema(EVENT_SCHEMA)
    assert batch.events["event_id"].to_list() == ["a", "b", "d"]
    assert batch.events["source"].to_list() == ["f:0", "f:2", "f:4"]
    assert [d["source"] for d in batch.dlq] == ["f:1", "f:3"]
    assert [d["reason"] for d in batch.dlq] == ["malformed_json", "unsupported_version"]


def test_empty_and_all_bad_batches_have_the_schema():
    empty = decode_batch(RawBatch("p", []))
    assert empty.events.schema == pl.Schema(EVENT_SCHEMA) and empty.events.height == 0
    bad = decode_batch(RawBatch("p", [raw(b"nope"), raw([1])]))
    assert bad.events.schema == pl.Schema(EVENT_SCHEMA) and bad.events.height == 0
    assert len(bad.dlq) == 2


def test_decode_record():
    row = decode_record(raw(event()))
    assert isinstance(row, tuple) and row[0] == EVENT_ID
    assert decode_record(raw(b"[]"))["reason"] == "not_an_object"


def test_default_registry_is_used_when_none_given():
    records = [raw(event())]
    assert decode_batch(RawBatch("p", records)).events.equals(
        decode_batch(RawBatch("p", records), None).events
    )


# --- a new version is just a new contract file ----------------------------------------------------


def test_registry_with_a_second_version(tmp_path: Path):
    directory = tmp_path / "contracts"
    shutil.copytree(CONTRACTS_DIR, directory)
    data = orjson.loads((CONTRACTS_DIR / "urn_nc_events_web.v1.json").read_bytes())
    data["version"] = 2
    data["fields"] = [
        {**f, "required": True} if f["name"] == "user_id" else f for f in data["fields"]
    ] + [{"name": "consent", "type": "boolean", "required": True}]
    (directory / contract_file_name(WEB, 2)).write_bytes(orjson.dumps(data))
    register_new(directory)
    registry = ContractRegistry.load(directory)

    batch = decode_batch(
        RawBatch(
            "p",
            [
                raw(event(version=2, user_id="u", consent=False), "a"),
                raw(event(version=2, user_id="u"), "b"),
                raw(event(version=2, consent=True), "c"),
                raw(event(version=2, user_id="u", consent="yes"), "d"),
                raw(event(version=1), "e"),
            ],
        ),
        registry,
    )
    assert batch.events["source"].to_list() == ["a", "e"]
    assert batch.events["version"].to_list() == [2, 1]
    assert [(d["source"], d["reason"], d["error"]) for d in batch.dlq] == [
        ("b", "missing_field", "required field 'consent' is missing"),
        ("c", "missing_field", "required field 'user_id' is missing"),
        ("d", "bad_type", "field 'consent' must be a boolean, got string \"yes\""),
    ]
    # and the default registry still knows v1 only
    assert decode_one(event(version=2, user_id="u", consent=False)).dlq[0]["reason"] == (
        "unsupported_version"
    )


# --- fast path and reference path agree; nothing raises ------------------------------------------


def _variants(rng: random.Random) -> list[dict]:
    values = [
        None, "", "x", 0, 1, -1, True, False, 1.5, [], [1], {}, {"message": "m"},
        {"message": 1}, "2024-05-01T08:00:00Z", "2024-05-01T08:00:00", 1_714_550_400_000,
        "2024-05-01T08:00:00+05:45", 7_258_118_400_000, "1970-01-01T00:00:00Z",
    ]  # fmt: skip
    names = [
        "schema_urn", "version", "event_id", "type", "timestamp", "tenant", "user_id", "ip",
        "correlation_id", "properties", "error", "url", "session_id", "user_agent",
    ]  # fmt: skip
    out = [event(), event(properties={"a": [1, {"b": None}]}, error={"stack": "s"})]
    for _ in range(3000):
        value = event(user_id="u", properties={"k": 1})
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(names)
            if name in ("schema_urn", "version") and rng.random() < 0.8:
                continue
            value[name] = rng.choice(values) if rng.random() < 0.9 else ...
        out.append({k: v for k, v in value.items() if v is not ...})
    return out


def test_fast_path_agrees_with_reference_path():
    (plan,) = _plans(ContractRegistry.load(CONTRACTS_DIR)).values()
    accepted = 0
    for value in _variants(random.Random(5)):
        if value.get("schema_urn") != WEB or value.get("version") != 1:
            continue
        if type(value.get("version")) is not int:
            continue
        fast = plan.fast(value, 123, "src")
        try:
            reference = _reference_row(plan, value, 123, "src")
        except _Reject:
            reference = None
        assert fast == reference, value
        accepted += reference is not None
    assert accepted > 100


def test_arbitrary_input_never_raises():
    rng = random.Random(11)
    records = []
    for i, value in enumerate(_variants(rng)):
        data = orjson.dumps(value)
        cut = rng.random()
        if cut < 0.1:
            data = data[: rng.randint(0, len(data))]
        elif cut < 0.2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        records.append(RawRecord(data, f"f:{i}", INGESTED_AT))
    records.append(RawRecord(b"[" * 5000, "deep", INGESTED_AT))
    records.append(RawRecord(b'{"a": 1e999}', "inf", INGESTED_AT))
    records.append(RawRecord(b'{"a": 123456789012345678901234567890}', "bigint", INGESTED_AT))
    records.append(RawRecord(b'"\\ud800"', "surrogate", INGESTED_AT))
    batch = decode_batch(RawBatch("p", records))
    assert batch.events.height + len(batch.dlq) == len(records)
    assert batch.events.height > 100 and len(batch.dlq) > 100
    assert all(d["reason"] != "bad_type" or "could not be validated" not in d["error"]
               for d in batch.dlq)


def test_fast_correlation_derivation_matches_the_model():
    rng = random.Random(3)
    for _ in range(2000):
        seed = "".join(rng.choice("abc-_0123456789éλ✓") for _ in range(rng.randint(0, 40)))
        assert _derive(seed) == derive_correlation_id(seed)


def test_ingested_at_is_per_record():
    records = [
        RawRecord(orjson.dumps(event(event_id="a")), "s:1", 1_714_550_400.0),
        RawRecord(orjson.dumps(event(event_id="b")), "s:2", 1_714_550_400.0),
        RawRecord(orjson.dumps(event(event_id="c")), "s:3", 1_714_550_401.0006),
        RawRecord(b"{", "s:4", 1_714_550_402.0),
        RawRecord(orjson.dumps(event(event_id="d", user_id=5)), "s:5", 1_714_550_403.0),
        RawRecord(orjson.dumps(event(event_id="e", error={})), "s:6", 1_714_550_404.0),
    ]
    events = decode_batch(RawBatch("p", records)).events
    assert events["ingested_at"].dt.epoch("ms").to_list() == [
        1_714_550_400_000, 1_714_550_400_000, 1_714_550_401_001, 1_714_550_404_000,
    ]  # fmt: skip
