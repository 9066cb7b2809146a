"""Per-record logic of the two baselines (`bench/naive_flow.py`, `bench/quix_app.py`).

The job written "the obvious way": one JSON document at a time, a straightforward dict check of
the `urn:nc:events:web` v1 contract, GeoIP2 and user-agent lookups behind `functools.lru_cache`,
and the event time as epoch milliseconds for the windows. It depends only on orjson, geoip2 and
ua-parser, so it also runs in the Quix Streams virtualenv, which does not have the project's
packages.
"""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from pathlib import Path

import geoip2.database
import geoip2.errors
import orjson
from ua_parser import parse as parse_ua

ROOT = Path(__file__).resolve().parent.parent
GEOIP_DB = ROOT / "dataflows" / "data" / "GeoLite2-City-Test.mmdb"
SCHEMA_URN = "urn:nc:events:web"
CORRELATION_NAMESPACE = uuid.UUID("6f1c3b52-2a4e-4d0e-9a57-0d3c1f1b8e21")
WINDOWS_S = {"1m": 60, "5m": 300, "1h": 3600}

REQUIRED = ("event_id", "type", "tenant")
OPTIONAL = ("user_id", "session_id", "ip", "user_agent", "url", "correlation_id")

_reader = geoip2.database.Reader(str(GEOIP_DB))


def event_ms(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return int(parsed.timestamp() * 1000)
    return None


def validate(raw: bytes) -> tuple[dict | None, str | None]:
    """(event, None) for a valid record, (None, reason) otherwise."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, "malformed_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    if not obj.get("schema_urn"):
        return None, "missing_schema_urn"
    if obj["schema_urn"] != SCHEMA_URN:
        return None, "unknown_schema"
    if obj.get("version") != 1 or isinstance(obj.get("version"), bool):
        return None, "unsupported_version"
    for name in REQUIRED:
        if not obj.get(name):
            return None, "missing_field"
        if not isinstance(obj[name], str):
            return None, "bad_type"
    if obj.get("timestamp") is None:
        return None, "missing_field"
    ms = event_ms(obj["timestamp"])
    if ms is None or not 0 <= ms < 7_258_118_400_000:
        return None, "bad_timestamp"
    for name in OPTIONAL:
        if obj.get(name) is not None and not isinstance(obj[name], str):
            return None, "bad_type"
    error = obj.get("error") or {}
    if not isinstance(error, dict) or not isinstance(obj.get("properties") or {}, dict):
        return None, "bad_type"
    event = {
        "event_id": obj["event_id"],
        "schema_urn": SCHEMA_URN,
        "version": 1,
        "type": obj["type"],
        "tenant": obj["tenant"],
        "timestamp_ms": ms,
        **{name: obj.get(name) for name in OPTIONAL},
        "properties": orjson.dumps(obj.get("properties")).decode() if "properties" in obj else None,
        "error_message": error.get("message"),
        "error_stack": error.get("stack"),
    }
    if not event["correlation_id"]:
        event["correlation_id"] = str(uuid.uuid5(CORRELATION_NAMESPACE, obj["event_id"]))
    return event, None


@functools.lru_cache(maxsize=100_000)
def geo(ip: str) -> tuple:
    try:
        city = _reader.city(ip)
    except (geoip2.errors.AddressNotFoundError, ValueError):
        return (None, None, None, None, None)
    subdivisions = city.subdivisions
    return (
        city.country.iso_code,
        subdivisions[0].iso_code if len(subdivisions) else None,
        city.city.names.get("en"),
        city.location.latitude,
        city.location.longitude,
    )


@functools.lru_cache(maxsize=100_000)
def user_agent(ua: str) -> tuple:
    result = parse_ua(ua)
    agent, os, device = result.user_agent, result.os, result.device
    return (
        agent.family if agent else "Other",
        agent.major if agent else None,
        os.family if os else "Other",
        os.major if os else None,
        device.family if device else "Other",
    )


def enrich(event: dict, ingested_ms: int) -> dict:
    g = geo(event["ip"]) if event["ip"] else (None,) * 5
    u = user_agent(event["user_agent"]) if event["user_agent"] else (None,) * 5
    (
        event["geo_country"],
        event["geo_region"],
        event["geo_city"],
        event["geo_lat"],
        event["geo_lon"],
    ) = g
    (
        event["ua_browser"],
        event["ua_browser_major"],
        event["ua_os"],
        event["ua_os_major"],
        event["ua_device_family"],
    ) = u
    event["ingested_at_ms"] = ingested_ms
    event["processed_at_ms"] = int(datetime.now(UTC).timestamp() * 1000)
    return event


def process(raw: bytes, ingested_ms: int) -> dict:
    """The enriched event, or `{"reason": ..., "payload": ...}` for a rejected record."""
    event, reason = validate(raw)
    if event is None:
        return {"reason": reason, "payload": raw.decode("utf-8", "replace")}
    return enrich(event, ingested_ms)
