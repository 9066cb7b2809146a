"""The PostgreSQL sink against the local server: each test has its own schema."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import orjson
import psycopg
import pytest

from connectors import postgres
from connectors.postgres import EVENT_COLUMNS, PostgresSink
from dataflows.config import Settings
from operators.model import ENRICHED_SCHEMA
from tests.connectors.sinkkit import Driver, aggregate, event, events, frame, outage


def test_events_table_has_every_enriched_column():
    # A new column in ENRICHED_SCHEMA needs a migration that adds it to `events`.
    assert set(EVENT_COLUMNS) == set(ENRICHED_SCHEMA)


def test_transient_and_permanent_errors_are_told_apart():
    assert postgres.is_transient(psycopg.OperationalError("connection refused"))
    assert postgres.is_transient(psycopg.errors.AdminShutdown())
    assert postgres.is_transient(psycopg.errors.SerializationFailure())
    assert not postgres.is_transient(psycopg.errors.CharacterNotInRepertoire())
    assert postgres.is_permanent(psycopg.errors.CharacterNotInRepertoire())
    assert postgres.is_permanent(psycopg.errors.NotNullViolation())
    assert postgres.is_permanent(psycopg.errors.ProgramLimitExceeded())
    assert not postgres.is_permanent(psycopg.errors.UndefinedTable())


@pytest.fixture
def pg(unique: str):
    settings = Settings(postgres_schema=unique)
    conn = postgres.sink_connection(settings)
    yield settings, conn
    conn.close()
    with postgres.sink_connection(settings) as cleanup:
        cleanup.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')


def select(conn, schema: str, query: str) -> list[tuple]:
    return conn.execute(query.replace("{s}", f'"{schema}"')).fetchall()


def event_rows(conn, schema: str) -> list[dict]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(f'SELECT * FROM "{schema}".events ORDER BY event_id').fetchall()


def expected_event(row: dict) -> dict:
    out = dict(row)
    out["properties"] = orjson.loads(row["properties"]) if row["properties"] is not None else None
    return out


@pytest.mark.servers
def test_migrations_are_idempotent_and_versioned(pg, unique):
    settings, conn = pg
    assert postgres.migrate(conn, unique) == 1
    assert postgres.migrate(conn, unique) == 1
    assert select(conn, unique, "SELECT version FROM {s}.schema_version") == [(1,)]
    assert postgres.is_native_partitioned(conn, unique) != postgres.has_timescaledb(conn)
    tables = {
        r[0]
        for r in select(
            conn, unique, f"SELECT tablename FROM pg_tables WHERE schemaname = '{unique}'"
        )
    }
    assert {"events", "aggregates", "sessions", "schema_version"} <= tables


@pytest.mark.servers
def test_events_round_trip_exact_values(pg, unique):
    settings, conn = pg
    rows = [event(i) for i in range(3)] + [
        event(3, user_id=None, session_id=None, properties=None, geo_lat=None, geo_lon=None,
              at=datetime(2026, 11, 21, 23, 59, 59, 999000, tzinfo=UTC)),
    ]
    driver = Driver(lambda: PostgresSink(settings, "events"))
    driver.epoch(frame(rows))
    driver.close()
    assert driver.dead == []
    stored = event_rows(conn, unique)
    assert [{k: v for k, v in r.items()} for r in stored] == [expected_event(r) for r in rows]
    if postgres.is_native_partitioned(conn, unique):
        days = [d for _, d in postgres.event_partitions(conn, unique)]
        assert {date(2026, 11, 20), date(2026, 11, 21)} <= set(days)
        where = select(
            conn, unique, "SELECT tableoid::regclass::text FROM {s}.events WHERE event_id = 'ev-000003'"
        )
        assert where[0][0].endswith("events_p20261121")


@pytest.mark.servers
def test_same_events_twice_change_nothing(pg, unique):
    settings, conn = pg
    batch = events(0, 50)
    driver = Driver(lambda: PostgresSink(settings, "events"))
    driver.epoch(batch)
    first = event_rows(conn, unique)
    driver.epoch(batch)
    driver.epoch(batch.slice(10, 5), batch.slice(0, 3))  # duplicates inside one flush, too
    driver.close()
    assert event_rows(conn, unique) == first
    assert len(first) == 50


@pytest.mark.servers
def test_poison_event_goes_to_the_dlq_with_the_servers_reason(pg, unique):
    settings, conn = pg
    rows = [event(i) for i in range(40)]
    rows[17] = event(17, user_agent="bad\x00agent")
    rows[31] = event(31, properties='{"n": "\\u0000"}')
    driver = Driver(lambda: PostgresSink(settings, "events"))
    driver.epoch(frame(rows))
    driver.close()
    ids = [r["event_id"] for r in event_rows(conn, unique)]
    assert ids == [f"ev-{i:06d}" for i in range(40) if i not in (17, 31)]
    assert [orjson.loads(d["payload"])["event_id"] for d in driver.dead] == ["ev-000017", "ev-000031"]
    for record in driver.dead:
        assert record["reason"] == "sink_failed"
        assert record["stage"] == "sink:postgres"
    assert "0x00" in driver.dead[0]["error"] and "SQLSTATE 22021" in driver.dead[0]["error"]
    assert "\\u0000" in driver.dead[1]["error"] or "SQLSTATE 22P05" in driver.dead[1]["error"]
    assert driver.dead[0]["source"] == "events.raw/2/1017"
    assert driver.dead[0]["correlation_id"] == "corr-17"


@pytest.mark.servers
def test_aggregates_keep_the_highest_revision(pg, unique):
    settings, conn = pg
    start, end = "2026-11-20T09:00:00.000Z", "2026-11-20T09:01:00.000Z"
    r0 = aggregate("acme", "click", "1m", start, end, 10, 4, 0)
    r1 = aggregate("acme", "click", "1m", start, end, 12, 5, 1)
    other = aggregate("acme", "pageview", "1m", start, end, 3, 3, 0)
    driver = Driver(lambda: PostgresSink(settings, "aggregates"))
    driver.epoch([r0, other])
    driver.epoch([r1])
    driver.epoch([r0])  # a stale revision arriving late changes nothing
    driver.epoch([r0, r1, other])  # both revisions in one batch: the higher wins
    driver.close()
    rows = select(
        conn, unique,
        'SELECT tenant, event_type, "window", window_start, window_end, count, unique_users, revision '
        "FROM {s}.aggregates ORDER BY event_type",
    )
    t0 = datetime(2026, 11, 20, 9, tzinfo=UTC)
    assert rows == [
        ("acme", "click", "1m", t0, t0 + timedelta(minutes=1), 12, 5, 1),
        ("acme", "pageview", "1m", t0, t0 + timedelta(minutes=1), 3, 3, 0),
    ]
    assert driver.dead == []


@pytest.mark.servers
def test_aggregates_twice_same_state_and_poison_row(pg, unique):
    settings, conn = pg
    good = [
        aggregate("acme", "click", "5m", f"2026-11-20T09:{m:02d}:00.000Z", f"2026-11-20T09:{m + 5:02d}:00.000Z", m, 1, 0)
        for m in range(0, 50, 5)
    ]
    bad = aggregate("acme", "click", "5m", "not-a-time", "2026-11-20T10:00:00.000Z", 1, 1, 0)
    driver = Driver(lambda: PostgresSink(settings, "aggregates"))
    driver.epoch(good[:5] + [bad] + good[5:])
    state = select(conn, unique, "SELECT * FROM {s}.aggregates ORDER BY window_start")
    driver.epoch(good[:5] + [bad] + good[5:])
    driver.close()
    assert select(conn, unique, "SELECT * FROM {s}.aggregates ORDER BY window_start") == state
    assert len(state) == 10
    assert len(driver.dead) == 2  # once per write
    assert orjson.loads(driver.dead[0]["payload"]) == bad
    assert "not-a-time" in driver.dead[0]["error"] and "SQLSTATE 22007" in driver.dead[0]["error"]


@pytest.mark.servers
def test_sessions_upsert_by_revision_and_a_start_moved_earlier_replaces_the_row(pg, unique):
    settings, conn = pg

    def session(sid, start, end, count, revision):
        return {"tenant": "acme", "user_id": "u-1", "session_id": sid, "start": start, "end": end,
                "duration_s": 1.5, "event_count": count, "revision": revision}

    a0 = session("s-a", "2026-11-20T10:00:00.000Z", "2026-11-20T10:10:00.000Z", 5, 0)
    a1 = session("s-a", "2026-11-20T09:55:00.000Z", "2026-11-20T10:10:00.000Z", 6, 1)  # late event
    b0 = session("s-b", "2026-11-20T10:00:00.000Z", "2026-11-20T10:01:00.000Z", 2, 0)
    b1 = session("s-b", "2026-11-20T10:00:00.000Z", "2026-11-20T10:02:00.000Z", 3, 1)
    driver = Driver(lambda: PostgresSink(settings, "sessions"))
    driver.epoch([a0, b0])
    driver.epoch([a1, b1])
    after = select(conn, unique, 'SELECT session_id, start, "end", event_count, revision FROM {s}.sessions ORDER BY 1, 2')
    driver.epoch([a0, b0])  # replay of older revisions
    driver.epoch([a0, a1, b0, b1])  # all in one batch
    driver.close()
    t = lambda h, m: datetime(2026, 11, 20, h, m, tzinfo=UTC)  # noqa: E731
    assert after == [("s-a", t(9, 55), t(10, 10), 6, 1), ("s-b", t(10, 0), t(10, 2), 3, 1)]
    assert select(conn, unique, 'SELECT session_id, start, "end", event_count, revision FROM {s}.sessions ORDER BY 1, 2') == after

    # A fresh table given everything at once ends the same.
    conn.execute(f'TRUNCATE "{unique}".sessions')
    driver = Driver(lambda: PostgresSink(settings, "sessions"))
    driver.epoch([a0, b1, a1, b0])
    driver.close()
    assert select(conn, unique, 'SELECT session_id, start, "end", event_count, revision FROM {s}.sessions ORDER BY 1, 2') == after


@pytest.mark.servers
def test_a_replay_with_other_revisions_never_regresses_a_window(pg, unique):
    # The first attempt wrote rev0 count=10 and rev1 count=11, then crashed before its snapshot
    # was persisted; the replay batches differently and emits rev0 count=12 and nothing more.
    settings, conn = pg
    start, end = "2026-11-20T09:00:00.000Z", "2026-11-20T09:01:00.000Z"
    first = [aggregate("acme", "click", "1m", start, end, 10, 4, 0),
             aggregate("acme", "click", "1m", start, end, 11, 5, 1)]
    replay = aggregate("acme", "click", "1m", start, end, 12, 5, 0)
    query = 'SELECT count, unique_users, revision FROM {s}.aggregates'
    crashed = Driver(lambda: PostgresSink(settings, "aggregates"))
    crashed.epoch(first[:1])
    crashed.epoch(first[1:])
    resumed = Driver(lambda: PostgresSink(settings, "aggregates"))
    resumed.epoch([replay])
    assert select(conn, unique, query) == [(12, 5, 0)]
    # Anything the replay or a late duplicate brings that is not further along changes nothing.
    resumed.epoch(first, [replay])
    resumed.epoch([aggregate("acme", "click", "1m", start, end, 11, 5, 7)])
    assert select(conn, unique, query) == [(12, 5, 0)]
    # A later, fuller emission wins whatever its revision; unique users break a count tie.
    resumed.epoch([aggregate("acme", "click", "1m", start, end, 12, 6, 0)])
    assert select(conn, unique, query) == [(12, 6, 0)]
    resumed.epoch([aggregate("acme", "click", "1m", start, end, 13, 6, 1),
                   aggregate("acme", "click", "1m", start, end, 12, 6, 9)])
    resumed.close()
    assert select(conn, unique, query) == [(13, 6, 1)]
    assert crashed.dead == resumed.dead == []


@pytest.mark.servers
def test_a_replay_with_other_revisions_never_regresses_a_session(pg, unique):
    settings, conn = pg

    def session(sid, start, end, count, revision):
        return {"tenant": "acme", "user_id": "u-1", "session_id": sid, "start": f"2026-11-20T{start}:00.000Z",
                "end": f"2026-11-20T{end}:00.000Z", "duration_s": 1.5, "event_count": count, "revision": revision}

    def stored():
        return select(conn, unique, 'SELECT session_id, to_char(start, \'HH24:MI\'), to_char("end", \'HH24:MI\'), '
                      "event_count, revision FROM {s}.sessions ORDER BY 1, 2")

    # First attempt: s-a closed with 5 events, then a late event moved its start to 09:55;
    # s-b grew from 2 to 3 events. Then a crash before the snapshot was persisted.
    crashed = Driver(lambda: PostgresSink(settings, "sessions"))
    crashed.epoch([session("s-a", "10:00", "10:10", 5, 0), session("s-b", "10:00", "10:01", 2, 0)])
    crashed.epoch([session("s-a", "09:55", "10:10", 6, 1), session("s-b", "10:00", "10:02", 3, 1)])
    assert stored() == [("s-a", "09:55", "10:10", 6, 1), ("s-b", "10:00", "10:02", 3, 1)]

    resumed = Driver(lambda: PostgresSink(settings, "sessions"))
    # The replay re-emits the old start at revision 0 (covered by a fuller stored row: not
    # inserted) and s-b at revision 0 with fewer events than stored (ignored)...
    resumed.epoch([session("s-a", "10:00", "10:10", 5, 0), session("s-b", "10:00", "10:01", 2, 0)])
    assert stored() == [("s-a", "09:55", "10:10", 6, 1), ("s-b", "10:00", "10:02", 3, 1)]
    # ...then s-b at revision 0 with more events than ever written (wins), and s-a's old start
    # with two events the first attempt never saw (7 > 6: kept beside the 09:55 row for now).
    resumed.epoch([session("s-b", "10:00", "10:03", 4, 0), session("s-a", "10:00", "10:12", 7, 0)])
    assert stored() == [("s-a", "09:55", "10:10", 6, 1), ("s-a", "10:00", "10:12", 7, 0),
                        ("s-b", "10:00", "10:03", 4, 0)]
    # The final emission covers both s-a rows and replaces them.
    resumed.epoch([session("s-a", "09:55", "10:12", 8, 1)])
    resumed.epoch([session("s-a", "09:55", "10:10", 6, 1), session("s-a", "10:00", "10:12", 7, 0)])
    resumed.close()
    assert stored() == [("s-a", "09:55", "10:12", 8, 1), ("s-b", "10:00", "10:03", 4, 0)]
    assert crashed.dead == resumed.dead == []


@pytest.mark.servers
def test_retention_drops_old_partitions(pg, unique, monkeypatch, capsys):
    settings, conn = pg
    driver = Driver(lambda: PostgresSink(settings, "events"))
    old = [event(i, at=datetime(2026, 9, 1 + i, 12, tzinfo=UTC)) for i in range(3)]
    recent = [event(10, at=datetime(2026, 11, 19, 12, tzinfo=UTC))]
    driver.epoch(frame(old + recent))
    driver.close()
    if not postgres.is_native_partitioned(conn, unique):
        pytest.skip("TimescaleDB: retention is drop_chunks")
    now = datetime(2026, 10, 3, 6, tzinfo=UTC)  # 30 days back: 2026-09-03 06:00
    assert postgres.drop_old_partitions(conn, unique, 30, now=now, dry_run=True) == [
        "events_p20260901", "events_p20260902",
    ]
    assert postgres.drop_old_partitions(conn, unique, 30, now=now) == [
        "events_p20260901", "events_p20260902",
    ]
    assert [r["event_id"] for r in event_rows(conn, unique)] == ["ev-000002", "ev-000010"]
    # The command: every partition more than 30 days before today (2026-09-03 at least).
    monkeypatch.setenv("POSTGRES_SCHEMA", unique)
    assert postgres.main(["retention", "--days", "30"]) == 0
    assert "events_p20260903" in capsys.readouterr().out
    # A write to a dropped day recreates its partition.
    driver = Driver(lambda: PostgresSink(settings, "events"))
    driver.epoch(frame(old))
    driver.close()
    assert len(event_rows(conn, unique)) == 4


@pytest.mark.servers
def test_server_stopped_mid_write_loses_and_duplicates_nothing(pg, unique):
    settings, conn = pg
    driver = Driver(lambda: PostgresSink(settings, "events"))
    driver.epoch(events(0, 200))
    conn.close()
    with outage("postgres", down_s=3):
        driver.epoch(events(200, 300))  # blocks, retrying, until the server is back
    driver.epoch(events(400, 200))  # overlaps the batch written during the outage
    driver.close()
    assert driver.sink.stats.retries > 0
    assert driver.dead == []
    with postgres.sink_connection(settings) as fresh:
        ids = [r[0] for r in select(fresh, unique, "SELECT event_id FROM {s}.events ORDER BY 1")]
    assert ids == [f"ev-{i:06d}" for i in range(600)]


@pytest.mark.servers
def test_a_schema_dropped_while_running_is_migrated_again(pg, unique):
    settings, conn = pg
    driver = Driver(lambda: PostgresSink(settings, "events"))
    driver.epoch(events(0, 10))
    conn.execute(f'DROP SCHEMA "{unique}" CASCADE')  # the database was reset under the sink
    driver.epoch(events(10, 10))
    driver.close()
    assert driver.sink.stats.retries >= 1
    assert [r["event_id"] for r in event_rows(conn, unique)] == [f"ev-{i:06d}" for i in range(10, 20)]
