"""Independent answers for a generated stream, computed without the pipeline's operators.

Windows come from a polars group-by over the valid events; sessions and lateness from plain
Python loops over the events in stream order.
"""

from __future__ import annotations

from collections import Counter

import orjson
import polars as pl

WINDOW_MS = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000}


def valid_events(items) -> pl.DataFrame:
    """One row per valid generated event, in stream order."""
    rows = []
    for item in items:
        if item.bad is None:
            event = orjson.loads(item.line)
            rows.append(
                {
                    "event_id": event["event_id"],
                    "tenant": event["tenant"],
                    "type": event["type"],
                    "user_id": event.get("user_id"),
                    "session_id": event.get("session_id"),
                    "ts": item.event_ms,
                }
            )
    return pl.DataFrame(
        rows,
        schema={
            "event_id": pl.String,
            "tenant": pl.String,
            "type": pl.String,
            "user_id": pl.String,
            "session_id": pl.String,
            "ts": pl.Int64,
        },
    )


def dlq_reasons(items) -> Counter:
    return Counter(item.bad for item in items if item.bad is not None)


def late_event_ids(events: pl.DataFrame, allowed_lateness_ms: int) -> set[str]:
    """Events older than `max event time seen before them − allowed lateness`."""
    late, seen_max = set(), None
    for event_id, ts in events.select("event_id", "ts").iter_rows():
        if seen_max is not None and ts < seen_max - allowed_lateness_ms:
            late.add(event_id)
        seen_max = ts if seen_max is None else max(seen_max, ts)
    return late


def window_totals(events: pl.DataFrame) -> dict[tuple, tuple[int, int]]:
    """(tenant, type, window, window_start ISO) → (count, unique users)."""
    totals = {}
    for label, size in WINDOW_MS.items():
        grouped = (
            events.with_columns((pl.col("ts") // size * size).alias("start"))
            .group_by("tenant", "type", "start")
            .agg(pl.len().alias("count"), pl.col("user_id").drop_nulls().n_unique().alias("users"))
        )
        for tenant, etype, start, count, users in grouped.iter_rows():
            totals[(tenant, etype, label, iso(start))] = (count, users)
    return totals


def sessions(events: pl.DataFrame, gap_ms: int) -> dict[tuple, tuple]:
    """(session_id, start ISO) → (end ISO, event count, tenant, first non-null user id)."""
    by_session: dict[str, list] = {}
    for session_id, ts, tenant, user_id in events.select(
        "session_id", "ts", "tenant", "user_id"
    ).iter_rows():
        if session_id is not None:
            by_session.setdefault(session_id, []).append((ts, tenant, user_id))
    result = {}
    for session_id, rows in by_session.items():
        rows.sort(key=lambda r: r[0])
        current: list = []
        for row in rows:
            if current and row[0] - current[-1][0] > gap_ms:
                result.update(_session(session_id, current))
                current = []
            current.append(row)
        result.update(_session(session_id, current))
    return result


def _session(session_id: str, rows: list) -> dict:
    user = next((r[2] for r in rows if r[2] is not None), None)
    return {(session_id, iso(rows[0][0])): (iso(rows[-1][0]), len(rows), rows[0][1], user)}


def iso(epoch_ms: int) -> str:
    return pl.select(
        pl.lit(epoch_ms).cast(pl.Datetime("ms", "UTC")).dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
    ).item()


def final_windows(rows: list[dict]) -> dict[tuple, tuple[int, int]]:
    """The highest revision of every emitted window."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["tenant"], row["event_type"], row["window"], row["window_start"])
        if key not in best or row["revision"] > best[key]["revision"]:
            best[key] = row
    return {key: (row["count"], row["unique_users"]) for key, row in best.items()}


def final_sessions(rows: list[dict]) -> dict[tuple, tuple]:
    """The highest revision of every emitted session; a row superseded by a later revision of the
    same session id that covers it (a late event moved the session's start) is dropped."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["session_id"], row["start"])
        if key not in best or row["revision"] > best[key]["revision"]:
            best[key] = row
    final = {}
    for key, row in best.items():
        superseded = any(
            other is not row
            and other["session_id"] == row["session_id"]
            and other["revision"] > row["revision"]
            and other["start"] <= row["start"] <= other["end"]
            for other in best.values()
        )
        if not superseded:
            final[key] = (row["end"], row["event_count"], row["tenant"], row["user_id"])
    return final
