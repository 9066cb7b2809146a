"""Which store each valid event goes to, by event type.

Every valid event is archived (S3); these routes pick the extra stores on top of that.
"""

from __future__ import annotations

import polars as pl

TIMESERIES_TYPES = ("pageview", "click")  # → TimescaleDB/PostgreSQL
ERROR_TYPES = ("error", "exception")  # → OpenSearch


def timeseries_events(events: pl.DataFrame) -> pl.DataFrame | None:
    return _of_types(events, TIMESERIES_TYPES)


def error_events(events: pl.DataFrame) -> pl.DataFrame | None:
    return _of_types(events, ERROR_TYPES)


def _of_types(events: pl.DataFrame, types: tuple[str, ...]) -> pl.DataFrame | None:
    picked = events.filter(pl.col("type").is_in(types))
    return picked if picked.height else None
