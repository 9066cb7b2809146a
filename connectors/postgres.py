"""PostgreSQL connections (psycopg 3) from Settings."""

from __future__ import annotations

from typing import Any

import psycopg

from dataflows.config import Settings


def connect(settings: Settings, **kwargs: Any) -> psycopg.Connection:
    """A new connection to `settings.postgres_dsn`; keyword arguments go to psycopg.connect.

    Fails after 10 s when the server does not answer (override with `connect_timeout`).
    """
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(settings.postgres_dsn, **kwargs)
