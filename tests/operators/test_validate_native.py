"""The compiled decoder (`native/`) against the Python path it speeds up: for every record, the same
row or the same DLQ record, and the same rows in the same order for a whole batch."""

from __future__ import annotations

import json
import math
import random
import struct
from array import array

import polars as pl
import pytest

from bench.workload import generate
from operators import validate
from operators.contracts import default_registry
from operators.model import PolledRecords, RawBatch, RawRecord

pytest.importorskip("pipeline_native", reason="the compiled decoder is built by `make install`")

BASE = {
    "schema_urn": "urn:nc:events:web",
    "version": 1,
    "event_id": "c5a34d26-ede3-48f2-949b-0ca1616b96d8",
    "type": "pageview",
    "timestamp": "2024-05-01T08:00:00.000Z",
    "tenant": "acme",
    "user_id": "u-1",
    "session_id": "s-1",
    "ip": "81.2.69.194",
    "user_agent": "Mozilla/5.0",
    "url": "https://acme.example.com/",
    "properties": {"load_ms": 175},
}

TIMESTAMPS = [
    "2024-05-01T08:00:00Z", "2024-05-01T08:00:00.1Z", "2024-05-01T08:00:00.12Z",
    "2024-05-01T08:00:00.123Z", "2024-05-01T08:00:00.1234Z", "2024-05-01T08:00:00.123456Z",
    "2024-05-01T08:00:00.1234567Z", "2024-05-01T08:00:00.123456789Z",
    "2024-05-01T08:00:00.1234567891Z", "2024-05-01T08:00:00.Z", "2024-05-01T08:00:00.999999-05:00",
    "2024-05-01T08:00:00+05:30", "2024-05-01T08:00:00-0800", "2024-05-01T08:00:00+23:59",
    "2024-05-01T08:00:00+24:00", "2024-05-01T08:00:00-00:00", "2024-05-01T08:00:00+05:30:15",
    "2024-05-01T08:00:00+5:30", "2024-05-01T08:00:00z", "2024-05-01 08:00:00Z",
    "2024-05-01T08:00Z", "2024-05-01T08:00:00", "2024-05-01", "20240501T080000Z",
    "2024-02-29T23:59:59.999Z", "2023-02-29T00:00:00Z", "2024-04-31T00:00:00Z",
    "2024-13-01T00:00:00Z", "2024-00-10T00:00:00Z", "2024-05-01T24:00:00Z",
    "2024-05-01T23:60:00Z", "2024-05-01T23:59:60Z", "1970-01-01T00:00:00Z",
    "1970-01-01T00:00:00.001+00:01", "1969-12-31T23:59:59.999Z", "1970-01-01T05:30:00+05:30",
    "2199-12-31T23:59:59.999Z", "2200-01-01T00:00:00Z", "2199-12-31T23:59:59.999-00:01",
    "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "２０２４-05-01T08:00:00Z",
    "2024-05-01T08:00:00\u00a0Z", "", " 2024-05-01T08:00:00Z", "2024-05-01T08:00:00Z ",
    0, 1, -1, 1714550400000, 7258118399999, 7258118400000, 2**63, 2**64, -(2**63) - 1,
    1.5, 1e3, True, None, [], {},
]  # fmt: skip

ODD_VALUES = [
    None, "", " ", "x", 0, -1, 1, 2**31, 2**63 - 1, 2**64 - 1, 1.5, -0.0, 1e16, True, False,
    [], [1, "a", None], {}, {"a": 1}, "ünïcode-✓", "tab\there", "quote\"back\\slash",
    "\x00\x01\x1f\x7f\u2028\U0001f600",
]  # fmt: skip

PROPERTIES = [
    {}, {"a": 1}, {"a": -0}, {"f": 1.5}, {"f": 1e16}, {"big": 2**64 - 1}, {"neg": -(2**63)},
    {"nested": {"deep": [1, [2, {"x": None}]], "t": True, "f": False}},
    {"s": "\x00\x01\x08\x09\x0a\x0b\x0c\x0d\x1e\x1f\x20\x7f\"\\/é✓\U0001f600"},
    {"ключ": "значение", "": ""}, [1, 2], "text", 5, None, True,
]  # fmt: skip


def _json(value: object) -> bytes:
    """JSON as a producer might write it (big integers included, which orjson refuses)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _decode(values: list[bytes], *, native: bool) -> validate.EventBatch:
    records = [
        RawRecord(v, f"events.raw/0/{i}", 1714550400.1234 + i // 7) for i, v in enumerate(values)
    ]
    if native:
        return validate.decode_batch(RawBatch("p", records))
    rows, _, dlq = validate._decode_rows(records, default_registry())
    return validate.EventBatch("p", validate._rows_frame(rows), dlq)


def _assert_same(values: list[bytes]) -> validate.EventBatch:
    ours = _decode(values, native=True)
    reference = _decode(values, native=False)
    assert ours.events.schema == reference.events.schema
    assert ours.events.to_dicts() == reference.events.to_dicts()
    assert _stable(ours.dlq) == _stable(reference.dlq)
    return ours


def _stable(dlq: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "failed_at"} for record in dlq]


def _variants() -> list[bytes]:
    values = []
    for ts in TIMESTAMPS:
        values.append(_json({**BASE, "timestamp": ts}))
    for field in BASE:
        without = {k: v for k, v in BASE.items() if k != field}
        values.append(_json(without))
        for odd in ODD_VALUES:
            values.append(_json({**BASE, field: odd}))
    for odd in ODD_VALUES + ["own-id"]:
        values.append(_json({**BASE, "correlation_id": odd}))
        values.append(_json({**BASE, "error": {"message": odd, "stack": "at x"}}))
        values.append(_json({**BASE, "error": odd}))
    for props in PROPERTIES:
        values.append(_json({**BASE, "properties": props}))
    for event_id in ["", "ünïcode-✓", "x" * 300, 'a"b']:
        values.append(_json({**BASE, "event_id": event_id, "correlation_id": None}))
    head = _json(BASE)[:-1]
    values += [
        head + b',"tenant":"later"}',  # duplicate key: the last value counts
        head + b',"properties":{"a":1,"b":2,"a":3}}',
        head + b',"url":"\\ud800"}',  # lone surrogate
        head + b',"url":"\\ud83d\\ude00 \\u00e9 \\/"}',
        head + b',"extra":"\xff"}',  # not UTF-8
        head + b',"extra":1e400}',
        head + b',"extra":[' + b"[" * 300 + b"]" * 300 + b"]}",
        b"\xef\xbb\xbf" + _json(BASE),
        b"  " + _json(BASE) + b"\n ",
        _json(BASE) + b"x",
        json.dumps(BASE, indent=2).encode(),
        head + b',"properties":{"x":1.0}}',
        head + b',"properties":{"x":-0}}',
        b"[1]", b"null", b"", b"{}", b"{",
        _json({**BASE, "properties": {"pad": "x" * (1 << 20)}}),  # too large
    ]  # fmt: skip
    return values


def _grammar_cases() -> list[bytes]:
    """JSON text at the edges of the grammar the compiled decoder reads by hand: numbers, escapes,
    whitespace, literals, nesting and broken structure, in a field it reads and in one it skips."""
    head = _json(BASE)[:-1]
    numbers = [
        b"0", b"-0", b"01", b"1.", b".5", b"-", b"+1", b"1e", b"1e+", b"1E5", b"1.5e-3", b"-0.0",
        b"1e-400", b"1e400", b"-1e400", b"9223372036854775807", b"9223372036854775808",
        b"-9223372036854775808", b"-9223372036854775809", b"18446744073709551616",
        b"1" * 400, b"0.1e1", b"2e0", b"0x10", b"NaN", b"Infinity", b"--1",
    ]  # fmt: skip
    strings = [
        rb'"\x"', rb'"\u12"', rb'"\u12g4"', rb'"\uD800\u0041"', rb'"\uDC00"', rb'"\uD83D\uDE00"',
        rb'"\uD83D"', rb'"a\/b"', rb'"\b\f\n\r\t"', b'"raw\ttab"', b'"unterminated', rb'"end\"',
        rb'"\u0000"', b'"\x7f"', rb'"\"quoted\""',
    ]  # fmt: skip
    values = []
    for text in numbers + strings + [b"tru", b"truex", b"nul", b"false", b"[1,]", b"{,}"]:
        values.append(head + b',"version":' + text + b"}")
        values.append(head + b',"extra":' + text + b"}")
        values.append(head + b',"properties":{"v":' + text + b"}}")
        values.append(head + b',"properties":[' + text + b"]}")
        if text.startswith(b'"'):
            values.append(head + b',"url":' + text + b"}")
            values.append(head + b',"timestamp":' + text + b"}")
    values += [
        head + rb',"t\u0065nant":"escaped-key"}',  # an escaped key names a field
        head + b',"":1,"extra":{"":[]}}',
        head + b',"extra":{"a":1,}}',
        head + b',"extra":{"a" 1}}',
        head + b',"extra":[1 2]}',
        head + b',"extra":{"a":1}}}',
        head + b' , \t\r\n"extra" \n:\t[ 1 , { } ] \r}',
        head + b',"properties":{"a":{"b":[true,false,null,"x",1.25,-3]},"c":"\\u00e9"}}',
        head + b',"properties":' + b'{"a":' * 125 + b"1" + b"}" * 125 + b"}",  # 127 deep
        head + b',"properties":' + b'{"a":' * 126 + b"1" + b"}" * 126 + b"}",  # 128 deep
        head + b',"error":{"message":"m","stack":"s\\nat x","message":"last"}}',
        head + b',"error":{"message":"m",}}',
        b'{"schema_urn":"urn:nc:events:web"}',
        b"\t" + _json(BASE) + b"\r\n",
        b"{" + _json(BASE)[1:-1].replace(b",", b" ,\n ") + b"}",
        b'["schema_urn"]',
    ]
    return values


def test_every_variant_decodes_as_in_python():
    values = _variants()
    batch = _assert_same(values)
    assert batch.events.height > 100 and len(batch.dlq) > 100  # both sides are exercised


def test_one_record_at_a_time_as_in_python():
    for value in _variants() + _grammar_cases():
        _assert_same([value])


def test_json_at_the_edges_of_the_grammar_decodes_as_in_python():
    values = _grammar_cases()
    batch = _assert_same(values)
    assert batch.events.height > 30 and len(batch.dlq) > 30


def test_strings_with_a_special_byte_at_every_position_decode_as_in_python():
    # the string scan reads sixteen bytes at a time, then eight, then one: a quote, backslash or
    # control byte, raw (refused) or escaped, at every offset of values up to three blocks long,
    # next to bytes that need nothing (0x20, 0x7f, UTF-8)
    specials = [b'"', b"\\", b"\x00", b"\x1f", b"\n", b'\\"', b"\\\\", b"\\n", b"\\u00e9"]
    specials += [b" ", b"\x7f", "é".encode(), b"!", b"#", b"]"]
    values = [
        _json({**BASE, "user_agent": "@"}).replace(
            b'"@"', b'"' + b"x" * at + special + b"y" * (length - at - 1) + b'"'
        )
        for length in range(1, 50)
        for at in range(length)
        for special in specials
    ]
    batch = _assert_same(values)
    assert batch.events.height > 0 and len(batch.dlq) > 0


def test_random_mutations_decode_as_in_python():
    rng = random.Random(7)
    pool = _variants() + _grammar_cases() + list(generate(2000, seed=3))
    values = []
    for _ in range(3000):
        value = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 3)):
            if not value:
                break
            i = rng.randrange(len(value))
            op = rng.random()
            if op < 0.4:
                value[i] = rng.choice(b'0123456789:.-+TZ"\\{}[],ue \x00\xff')
            elif op < 0.7:
                del value[i]
            else:
                value[i:i] = rng.choice([b'"', b"\\u0041", b"0", b"1.5", b",", b"null"])
        values.append(bytes(value))
    _assert_same(values)


def test_the_workload_is_decoded_natively_and_rows_keep_record_order():
    values = list(generate(3000, seed=11))
    # a record only the Python path accepts (a timestamp layout the compiled one leaves to it)
    values.insert(5, _json({**BASE, "event_id": "py-only", "timestamp": "2024-05-01 08:00Z"}))
    batch = _assert_same(values)
    records = [RawRecord(v, f"events.raw/0/{i}", 1.0) for i, v in enumerate(values)]
    deferred, _ = validate._native_decoder(default_registry()).decode(values)
    rejected = {int(r["source"].rsplit("/", 1)[1]) for r in batch.dlq}
    assert set(deferred) == rejected | {5}
    assert batch.events["source"].to_list() == [
        r.source for i, r in enumerate(records) if i not in rejected
    ]
    assert batch.events.row(5, named=True)["event_id"] == "py-only"


def test_without_the_compiled_decoder_python_validates_everything(monkeypatch):
    values = list(generate(500, seed=5))
    native = _decode(values, native=True)
    monkeypatch.setattr(validate, "_native_decoder", lambda registry: None)
    plain = _decode(values, native=True)
    assert plain.events.equals(native.events)
    assert _stable(plain.dlq) == _stable(native.dlq)
    assert isinstance(native.events, pl.DataFrame)


def test_floats_are_written_as_orjson_writes_them():
    rng = random.Random(2)
    floats = [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(3000)]
    floats += [rng.uniform(-1e6, 1e6) for _ in range(1000)] + [1e-5, 9.99e-6, 1e16, 5e-324]
    floats = [f for f in floats if math.isfinite(f)]
    values = [_json({**BASE, "properties": {"x": f, "y": [f]}}) for f in floats]
    batch = _assert_same(values)
    assert batch.events.height == len(floats)


def test_a_kafka_poll_as_columns_decodes_as_its_records(monkeypatch):
    values = list(generate(2000, seed=13))
    values.insert(3, _json({**BASE, "event_id": "py-only", "timestamp": "2024-05-01 08:00Z"}))
    offsets = [1000 + 2 * i for i in range(len(values))]
    stamps = [1714550400000 + i // 100 for i in range(len(values))]
    polled = PolledRecords.of("events.raw/4", values, offsets, stamps)
    records = [
        RawRecord(v, f"events.raw/4/{o}", s / 1000) for v, o, s in zip(values, offsets, stamps)
    ]
    assert list(polled) == records and polled[3] == records[3] and polled[-1] == records[-1]
    with pytest.raises(IndexError):
        polled[len(records)]
    for native in (True, False):
        if not native:
            monkeypatch.setattr(validate, "_native_decoder", lambda registry: None)
        from_columns = validate.decode_batch(RawBatch("p", polled))
        from_records = validate.decode_batch(RawBatch("p", records))
        assert from_columns.events.to_dicts() == from_records.events.to_dicts()
        assert _stable(from_columns.dlq) == _stable(from_records.dlq)
        assert from_columns.dlq and from_columns.events.row(3, named=True)["event_id"] == "py-only"
    clean = PolledRecords.of("t/0", values[:3], offsets[:3], stamps[:3])  # nothing deferred
    assert validate.decode_batch(RawBatch("p", clean)).events["source"].to_list() == [
        "t/0/1000",
        "t/0/1002",
        "t/0/1004",
    ]


def test_packed_records_whose_ends_do_not_fit_are_refused():
    decoder = validate._native_decoder(default_registry())
    for ends in ([2, 1], [4], [-1]):
        with pytest.raises(ValueError, match="ends"):
            decoder.decode_packed(b"abc", array("q", ends).tobytes())


def test_the_origin_of_packed_records_comes_whole_and_one_per_record():
    decoder = validate._native_decoder(default_registry())
    value = b'{"a":1}'
    one = array("q", [len(value)]).tobytes()
    for origin in (("t/0",), ("t/0", one), ("t/0", one + one, one), ("t/0", one, b"")):
        with pytest.raises(ValueError, match="label|offset"):
            decoder.decode_packed(value, one, *origin)


def test_contracts_the_compiled_decoder_cannot_express_are_validated_in_python(monkeypatch, caplog):
    def version_as_text(specs):
        return [(n, "string" if n == "version" else t, r, m) for n, t, r, m in real(specs)]

    real = validate._field_specs
    monkeypatch.setattr(validate, "_field_specs", version_as_text)
    assert validate._native_decoder.__wrapped__(default_registry()) is None
    assert "refuses these contracts" in caplog.text


def test_a_failure_of_the_compiled_decoder_leaves_the_batch_to_python(monkeypatch, caplog):
    class Broken:
        def decode(self, values):
            raise RuntimeError("boom")

    values = list(generate(300, seed=17))
    expected = _decode(values, native=True)
    monkeypatch.setattr(validate, "_native_decoder", lambda registry: Broken())
    batch = _decode(values, native=True)
    assert batch.events.equals(expected.events)
    assert _stable(batch.dlq) == _stable(expected.dlq)
    assert "the compiled decoder failed on a batch of p" in caplog.text
