"""PostgreSQL (psycopg 3): connections, migrations, the `events`/`aggregates`/`sessions` sinks and
retention.

Tables (in `POSTGRES_SCHEMA`, created by versioned, idempotent migrations; see `MIGRATIONS`):

* `events` — pageview/click events, time-partitioned by `timestamp`: a TimescaleDB hypertable with
  1-day chunks when the `timescaledb` extension is installed in the database, else native
  `PARTITION BY RANGE ("timestamp")` with one partition per UTC day (`events_pYYYYMMDD`, created
  on demand for the days of each batch) and a BRIN index on `timestamp`. Primary key
  `(event_id, "timestamp")` (a partitioned table's key must contain the partition key); rows are
  inserted with `ON CONFLICT DO NOTHING`, so a replay changes nothing.
* `aggregates` — one row per `(tenant, event_type, "window", window_start)`, upserted only when the
  incoming row is further along than the stored one in the monotone order
  `(count, unique_users, revision)` (counts only grow, so a replay whose revisions differ from
  the first attempt's can never lower a window's totals).
* `sessions` — one row per `(session_id, start)`, upserted the same way by
  `(event_count, end, revision)`; a session whose start moved earlier (a late event merged into
  it) replaces the row(s) it covers.

A write is one transaction: COPY (CSV, serialized by polars) into a temporary table, then one
`INSERT ... SELECT ... ON CONFLICT`. Transient failures (connection loss, server shutting down or
starting, serialization failures, out of resources) raise `TransientSinkError`; the base retries.
Data errors (classes 22, 23, 54: bad encoding, NUL bytes, invalid JSON, NOT NULL, oversized keys)
are permanent: the batch is bisected until the failing rows are isolated, which are returned as
rejected with the server's message; every other row is written. A missing schema or table (the
database was reset, a table dropped) re-runs the migrations before the retry.

Maintenance: `python -m connectors.postgres migrate` and
`python -m connectors.postgres retention --days 30` (see docs/runbook.md).
"""

from __future__ import annotations

import argparse
import io
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
from psycopg import sql

from connectors.base import Batch, Rejected, SinkWriter, TransientSinkError
from dataflows.config import Settings
from operators.model import as_dicts

log = logging.getLogger(__name__)


def connect(settings: Settings, **kwargs: Any) -> psycopg.Connection:
    """A new connection to `settings.postgres_dsn`; keyword arguments go to psycopg.connect.

    Fails after 10 s when the server does not answer (override with `connect_timeout`).
    """
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(settings.postgres_dsn, **kwargs)


def sink_connection(settings: Settings) -> psycopg.Connection:
    """An autocommit connection in UTC with TCP keepalives, as the sinks and tools use it."""
    return connect(
        settings,
        autocommit=True,
        options="-c TimeZone=UTC",
        keepalives=1,
        keepalives_idle=30,
        keepalives_interval=10,
        keepalives_count=3,
    )


# --- errors ----------------------------------------------------------------------------------

# SQLSTATE classes/codes worth retrying: connection exceptions, insufficient resources, operator
# intervention (shutdown, starting up, statement timeout), system errors, serialization/deadlock,
# lock timeouts.
_TRANSIENT_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_CODES = ("40001", "40P01", "55P03")
# SQLSTATE classes that mean "this data cannot be stored": data exceptions, integrity violations,
# program limits (e.g. an index row too large).
_PERMANENT_CLASSES = ("22", "23", "54")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:  # client side: could not connect, connection lost
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_CODES


def is_permanent(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None)
    return state is not None and state[:2] in _PERMANENT_CLASSES and not _is_missing_partition(exc)


# The schema or a table is gone (the database was reset or a table dropped while running): run
# the migrations again, then retry.
_MISSING_OBJECT_CODES = ("3F000", "42P01")


def _is_missing_partition(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) == "23514" and "no partition" in str(exc)


def server_reason(exc: psycopg.Error) -> str:
    message = exc.diag.message_primary or str(exc).splitlines()[0]
    detail = exc.diag.message_detail
    return f"{message}{f' ({detail})' if detail else ''} [SQLSTATE {exc.sqlstate}]"


# --- migrations ------------------------------------------------------------------------------

EVENT_COLUMNS: dict[str, str] = {
    "event_id": "text NOT NULL",
    "timestamp": "timestamptz NOT NULL",
    "schema_urn": "text NOT NULL",
    "version": "integer NOT NULL",
    "type": "text NOT NULL",
    "tenant": "text NOT NULL",
    "user_id": "text",
    "session_id": "text",
    "ip": "text",
    "user_agent": "text",
    "url": "text",
    "properties": "jsonb",
    "error_message": "text",
    "error_stack": "text",
    "correlation_id": "text",
    "ingested_at": "timestamptz",
    "source": "text",
    "geo_country": "text",
    "geo_region": "text",
    "geo_city": "text",
    "geo_lat": "double precision",
    "geo_lon": "double precision",
    "ua_browser": "text",
    "ua_browser_major": "text",
    "ua_os": "text",
    "ua_os_major": "text",
    "ua_device_family": "text",
    "ua_device_type": "text",
    "processed_at": "timestamptz",
}
AGGREGATE_COLUMNS: dict[str, str] = {
    "tenant": "text NOT NULL",
    "event_type": "text NOT NULL",
    "window": "text NOT NULL",
    "window_start": "timestamptz NOT NULL",
    "window_end": "timestamptz NOT NULL",
    "count": "bigint NOT NULL",
    "unique_users": "bigint NOT NULL",
    "revision": "integer NOT NULL",
}
SESSION_COLUMNS: dict[str, str] = {
    "session_id": "text NOT NULL",
    "start": "timestamptz NOT NULL",
    "end": "timestamptz NOT NULL",
    "tenant": "text NOT NULL",
    "user_id": "text",
    "duration_s": "double precision NOT NULL",
    "event_count": "bigint NOT NULL",
    "revision": "integer NOT NULL",
}


def _columns_sql(columns: dict[str, str]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
        for name, kind in columns.items()
    )


def has_timescaledb(conn: psycopg.Connection) -> bool:
    """TimescaleDB is installed in this database (the stack creates it when available)."""
    return conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() is not None


def _v1_tables(conn: psycopg.Connection, schema: str) -> None:
    s = sql.Identifier(schema)
    timescale = has_timescaledb(conn)
    conn.execute(
        sql.SQL("CREATE TABLE {}.events ({}, PRIMARY KEY (event_id, {})){}").format(
            s,
            _columns_sql(EVENT_COLUMNS),
            sql.Identifier("timestamp"),
            sql.SQL("") if timescale else sql.SQL(' PARTITION BY RANGE ("timestamp")'),
        )
    )
    if timescale:
        conn.execute(
            "SELECT create_hypertable(%s::regclass, 'timestamp', "
            "chunk_time_interval => interval '1 day', if_not_exists => true)",
            [f"{_quote(schema)}.events"],
        )
    else:
        conn.execute(
            sql.SQL('CREATE INDEX events_timestamp_brin ON {}.events USING brin ("timestamp")').format(s)
        )
    conn.execute(
        sql.SQL(
            "CREATE TABLE {}.aggregates ({}, updated_at timestamptz NOT NULL DEFAULT now(), "
            'PRIMARY KEY (tenant, event_type, "window", window_start))'
        ).format(s, _columns_sql(AGGREGATE_COLUMNS))
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE {}.sessions ({}, updated_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (session_id, start))"
        ).format(s, _columns_sql(SESSION_COLUMNS))
    )


# Append only: (version, description, function). Never edit an applied migration; add one.
MIGRATIONS: list[tuple[int, str, Callable[[psycopg.Connection, str], None]]] = [
    (1, "events (time-partitioned), aggregates, sessions", _v1_tables),
]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def migrate(conn: psycopg.Connection, schema: str) -> int:
    """Apply the migrations `schema` has not seen yet, under an advisory lock (so concurrent
    workers take turns); returns the schema's version afterwards. Idempotent."""
    s = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('event-pipeline:migrate'))")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version (version integer PRIMARY KEY, "
                "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(s)
        )
        current = conn.execute(
            sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(s)
        ).fetchone()[0]
        for version, description, apply in MIGRATIONS:
            if version <= current:
                continue
            log.info("postgres: migrating schema %s to version %d: %s", schema, version, description)
            apply(conn, schema)
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_version (version, description) VALUES (%s, %s)").format(s),
                [version, description],
            )
            current = version
    return current


# --- partitions and retention ----------------------------------------------------------------

_PARTITION_NAME = re.compile(r"^events_p(\d{8})$")


def is_native_partitioned(conn: psycopg.Connection, schema: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = 'events'",
            [schema],
        ).fetchone()
        is not None
    )


def ensure_partitions(conn: psycopg.Connection, schema: str, days: Sequence[date]) -> None:
    """Create the daily partitions of `events` for `days` that do not exist yet (idempotent; an
    advisory lock keeps concurrent workers from racing)."""
    if not days:
        return
    s = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('event-pipeline:partitions'))")
        for day in sorted(set(days)):
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.{} PARTITION OF {}.events "
                    "FOR VALUES FROM ({}) TO ({})"
                ).format(
                    s,
                    sql.Identifier(f"events_p{day:%Y%m%d}"),
                    s,
                    sql.Literal(start),
                    sql.Literal(start + timedelta(days=1)),
                )
            )


def event_partitions(conn: psycopg.Connection, schema: str) -> list[tuple[str, date]]:
    """The daily partitions of a natively partitioned `events`: (name, day), oldest first."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
        "WHERE n.nspname = %s AND p.relname = 'events'",
        [schema],
    ).fetchall()
    out = []
    for (name,) in rows:
        match = _PARTITION_NAME.match(name)
        if match:
            out.append((name, datetime.strptime(match.group(1), "%Y%m%d").date()))
    return sorted(out, key=lambda item: item[1])


def drop_old_partitions(
    conn: psycopg.Connection,
    schema: str,
    days: int,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Drop the `events` partitions (or TimescaleDB chunks) whose every row is more than `days`
    days old; returns their names."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    if not is_native_partitioned(conn, schema):
        if not has_timescaledb(conn):
            raise RuntimeError(f"{schema}.events is neither partitioned nor a hypertable")
        if dry_run:
            rows = conn.execute(
                "SELECT show_chunks(%s::regclass, older_than => %s)",
                [f"{_quote(schema)}.events", cutoff],
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT drop_chunks(%s::regclass, older_than => %s)",
                [f"{_quote(schema)}.events", cutoff],
            ).fetchall()
        return [str(r[0]) for r in rows]
    dropped = []
    for name, day in event_partitions(conn, schema):
        day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        if day_end > cutoff:
            break
        if not dry_run:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
        dropped.append(name)
    return dropped


# --- the sink --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """How one table is written: its columns and the statement that moves rows from the staging
    table (`{stage}`) into it (`{table}`)."""

    name: str
    columns: dict[str, str]
    upsert: str


_EVENTS_UPSERT = """
INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage}
ON CONFLICT (event_id, "timestamp") DO NOTHING
"""

# Which row of a window wins: the furthest along in the monotone progress order
# (count, unique_users, revision). Counts only grow, so a replay after a crash (whose revisions
# and intermediate totals may differ from the first attempt's) can never bring a window back to
# lower totals, and a later, fuller emission always wins. Within a batch only the furthest row of
# each key is inserted; an equal tuple is the same row and changes nothing (updated_at included).
_AGGREGATES_UPSERT = """
INSERT INTO {table} ({cols})
SELECT DISTINCT ON (tenant, event_type, "window", window_start) {cols} FROM {stage}
ORDER BY tenant, event_type, "window", window_start, count DESC, unique_users DESC, revision DESC
ON CONFLICT (tenant, event_type, "window", window_start) DO UPDATE SET
  window_end = excluded.window_end, count = excluded.count,
  unique_users = excluded.unique_users, revision = excluded.revision, updated_at = now()
WHERE (excluded.count, excluded.unique_users, excluded.revision)
    > ({table}.count, {table}.unique_users, {table}.revision)
"""

# Sessions only ever grow; their progress order is (event_count, end, revision). When a late
# event moves a session's start earlier, the new row covers the old one (same session id, earlier
# or equal start, later or equal end) and is further along: delete the stored rows a batch row
# covers and outranks, and never insert a row that a stored or batch row covers and outranks.
# So a replay of older (or differently numbered) emissions cannot bring a superseded row back.
_SESSIONS_UPSERT = """
DELETE FROM {table} s USING {stage} b
WHERE s.session_id = b.session_id AND s.start > b.start AND s."end" <= b."end"
  AND (s.event_count, s."end", s.revision) < (b.event_count, b."end", b.revision);
INSERT INTO {table} ({cols})
SELECT DISTINCT ON (session_id, start) {cols} FROM {stage} b
WHERE NOT EXISTS (
    SELECT 1 FROM {table} s WHERE s.session_id = b.session_id AND s.start < b.start
      AND s."end" >= b."end"
      AND (s.event_count, s."end", s.revision) > (b.event_count, b."end", b.revision))
  AND NOT EXISTS (
    SELECT 1 FROM {stage} o WHERE o.session_id = b.session_id AND o.start < b.start
      AND o."end" >= b."end"
      AND (o.event_count, o."end", o.revision) > (b.event_count, b."end", b.revision))
ORDER BY session_id, start, event_count DESC, "end" DESC, revision DESC
ON CONFLICT (session_id, start) DO UPDATE SET
  "end" = excluded."end", tenant = excluded.tenant, user_id = excluded.user_id,
  duration_s = excluded.duration_s, event_count = excluded.event_count,
  revision = excluded.revision, updated_at = now()
WHERE (excluded.event_count, excluded."end", excluded.revision)
    > ({table}.event_count, {table}."end", {table}.revision)
"""

TABLES = {
    "events": Table("events", EVENT_COLUMNS, _EVENTS_UPSERT),
    "aggregates": Table("aggregates", AGGREGATE_COLUMNS, _AGGREGATES_UPSERT),
    "sessions": Table("sessions", SESSION_COLUMNS, _SESSIONS_UPSERT),
}

_ISO_MS = "%Y-%m-%dT%H:%M:%S%.3fZ"


def csv_frame(batch: Batch, columns: Sequence[str]) -> pl.DataFrame:
    """The batch as the table's columns, ready for `write_csv` (datetimes as ISO-8601 UTC).

    Rows given as dicts become text columns (PostgreSQL parses each value), so a bad value is
    rejected by the server with its reason rather than coerced here."""
    if isinstance(batch, pl.DataFrame):
        present = set(batch.columns)
        frame = batch.select(
            [pl.col(c) if c in present else pl.lit(None, pl.String).alias(c) for c in columns]
        )
        stamps = [c for c, t in frame.schema.items() if isinstance(t, pl.Datetime)]
        return frame.with_columns(pl.col(stamps).dt.strftime(_ISO_MS)) if stamps else frame
    return pl.DataFrame(
        {c: [None if r.get(c) is None else str(r[c]) for r in batch] for c in columns},
        schema={c: pl.String for c in columns},
    )


class PostgresSink(SinkWriter):
    """Writes one stream into one table (`events`, `aggregates` or `sessions`)."""

    name = "postgres"

    def __init__(self, settings: Settings, table: str):
        self._settings = settings
        self._schema = settings.postgres_schema
        self._table = TABLES[table]
        self._conn: psycopg.Connection | None = None
        self._known_days: set[date] = set()
        self._native: bool | None = None
        self._needs_setup = False
        s = sql.Identifier(self._schema)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self._table.columns)
        self._stage = sql.Identifier(f"_stage_{table}")
        # The staging table has the target's column types but none of its constraints, so a
        # row that breaks one fails in the INSERT, where bisecting finds it.
        self._create_stage = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS "
            "SELECT {} FROM {}.{} WITH NO DATA"
        ).format(self._stage, cols, s, sql.Identifier(table))
        self._copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(self._stage, cols)
        self._upsert = sql.SQL(self._table.upsert).format(
            table=sql.SQL("{}.{}").format(s, sql.Identifier(table)), stage=self._stage, cols=cols
        )

    # -- connection --

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = sink_connection(self._settings)
            self._conn.execute(self._create_stage)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
        self._conn = None

    def _transient(self, exc: Exception, what: str) -> TransientSinkError:
        self._drop_connection()
        return TransientSinkError(f"{what}: {type(exc).__name__}: {exc}".strip())

    # -- SinkWriter --

    def setup(self) -> None:
        try:
            conn = sink_connection(self._settings)
        except psycopg.Error as exc:
            raise TransientSinkError(f"connecting: {exc}") from exc
        try:
            migrate(conn, self._schema)
            if self._table.name == "events" and is_native_partitioned(conn, self._schema):
                today = datetime.now(UTC).date()
                ensure_partitions(conn, self._schema, [today, today + timedelta(days=1)])
        except psycopg.Error as exc:
            if is_transient(exc):
                raise TransientSinkError(f"migrating: {exc}") from exc
            raise
        finally:
            conn.close()

    def write(self, batch: Batch) -> list[Rejected]:
        if self._needs_setup:
            self.setup()
            self._needs_setup = False
        frame = csv_frame(batch, list(self._table.columns))
        try:
            conn = self._connection()
            if self._table.name == "events":
                self._ensure_days(conn, frame)
            return self._write_range(conn, batch, frame, 0, frame.height)
        except psycopg.Error as exc:
            if exc.sqlstate in _MISSING_OBJECT_CODES:
                log.error(
                    "postgres: %s is missing (%s); running the migrations again",
                    self._table.name, str(exc).splitlines()[0],
                )
                self._needs_setup = True
                self._known_days.clear()
                self._native = None
                raise self._transient(exc, f"writing {self._table.name}") from exc
            if is_transient(exc):
                raise self._transient(exc, f"writing {self._table.name}") from exc
            raise

    def close(self) -> None:
        self._drop_connection()

    # -- internals --

    def _ensure_days(self, conn: psycopg.Connection, frame: pl.DataFrame) -> None:
        if self._native is None:
            self._native = is_native_partitioned(conn, self._schema)
        if not self._native:
            return
        days = {
            datetime.strptime(text[:10], "%Y-%m-%d").date()
            for text in frame["timestamp"].str.slice(0, 10).unique().drop_nulls().to_list()
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)
        }
        missing = days - self._known_days
        if missing:
            ensure_partitions(conn, self._schema, sorted(missing))
            self._known_days |= missing

    def _write_range(
        self, conn: psycopg.Connection, batch: Batch, frame: pl.DataFrame, lo: int, hi: int
    ) -> list[Rejected]:
        """Write rows [lo, hi); on a data error, bisect down to the rows the server refuses."""
        if lo >= hi:
            return []
        try:
            self._write_once(conn, frame.slice(lo, hi - lo))
            return []
        except psycopg.Error as exc:
            if _is_missing_partition(exc):  # dropped by retention since we created it
                self._known_days.clear()
                self._ensure_days(conn, frame)
                return self._write_range(conn, batch, frame, lo, hi)
            if not is_permanent(exc):
                raise
            if hi - lo == 1:
                return [Rejected(_row(batch, lo), server_reason(exc))]
        mid = (lo + hi) // 2
        return self._write_range(conn, batch, frame, lo, mid) + self._write_range(
            conn, batch, frame, mid, hi
        )

    def _write_once(self, conn: psycopg.Connection, frame: pl.DataFrame) -> None:
        data = io.BytesIO()
        frame.write_csv(data, include_header=False)
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(self._copy) as copy:
                copy.write(data.getbuffer())
            cur.execute(self._upsert)


def _row(batch: Batch, index: int) -> dict:
    if isinstance(batch, pl.DataFrame):
        return as_dicts(batch.slice(index, 1))[0]
    return batch[index]


# --- maintenance commands --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connectors.postgres", description="PostgreSQL maintenance."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending migrations (idempotent)")
    retention = commands.add_parser(
        "retention", help="drop events partitions (or chunks) older than --days"
    )
    retention.add_argument("--days", type=int, required=True)
    retention.add_argument("--dry-run", action="store_true", help="only list what would go")
    args = parser.parse_args(argv)
    settings = Settings()
    with sink_connection(settings) as conn:
        if args.command == "migrate":
            version = migrate(conn, settings.postgres_schema)
            print(f"schema {settings.postgres_schema} at version {version}")
        else:
            if args.days < 1:
                parser.error("--days must be at least 1")
            dropped = drop_old_partitions(
                conn, settings.postgres_schema, args.days, dry_run=args.dry_run
            )
            verb = "would drop" if args.dry_run else "dropped"
            print(f"{verb} {len(dropped)} partition(s)" + "".join(f"\n  {n}" for n in dropped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
