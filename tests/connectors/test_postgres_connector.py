from __future__ import annotations

import pytest

from connectors import postgres
from dataflows.config import Settings


@pytest.mark.servers
def test_write_then_read(settings: Settings, unique: str):
    table = f"conn_{unique}"
    with postgres.connect(settings) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL, n bigint)")
        try:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {table} (id, name, n) VALUES (%s, %s, %s)",
                    [(1, "alpha", 10), (2, "beta", 20), (3, "gamma", 2**40)],
                )
            conn.commit()
            # A second connection sees exactly the committed rows.
            with postgres.connect(settings) as other:
                rows = other.execute(f"SELECT id, name, n FROM {table} ORDER BY id").fetchall()
            assert rows == [(1, "alpha", 10), (2, "beta", 20), (3, "gamma", 2**40)]
        finally:
            conn.rollback()
            conn.execute(f"DROP TABLE {table}")
            conn.commit()


@pytest.mark.servers
def test_connects_as_the_pipeline_role(settings: Settings):
    with postgres.connect(settings) as conn:
        user, db = conn.execute("SELECT current_user, current_database()").fetchone()
    assert (user, db) == ("pipeline", "pipeline")
