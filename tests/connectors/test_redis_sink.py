"""The Redis aggregates sink against the local server: each test has its own key prefix."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from connectors import redis as redis_connector
from connectors.redis import RedisAggregatesSink, epoch_ms
from dataflows.config import Settings
from tests.connectors.sinkkit import Driver, aggregate, outage


def test_epoch_ms():
    assert epoch_ms("2026-11-20T09:00:00.000Z") == 1795165200000
    assert epoch_ms("1970-01-01T00:00:01.500Z") == 1500


def minute_rows(n: int, *, tenant: str = "acme", revision: int = 0, count_base: int = 10) -> list[dict]:
    rows = []
    for m in range(n):
        start = f"2026-11-20T{9 + m // 60:02d}:{m % 60:02d}:00.000Z"
        end_m = m + 1
        end = f"2026-11-20T{9 + end_m // 60:02d}:{end_m % 60:02d}:00.000Z"
        rows.append(aggregate(tenant, "click", "1m", start, end, count_base + m, 1 + m % 4, revision))
    return rows


@pytest.fixture
def rds(unique: str):
    settings = Settings(redis_key_prefix=f"{unique}:")
    client = redis_connector.client(settings, decode_responses=True)
    yield settings, client
    keys = list(client.scan_iter(f"{unique}:*", count=1000))
    if keys:
        client.delete(*keys)


def state(client, prefix: str) -> dict:
    """Every key under the prefix with its value (hash or sorted set)."""
    out = {}
    for key in sorted(client.scan_iter(f"{prefix}*", count=1000)):
        kind = client.type(key)
        out[key] = client.hgetall(key) if kind == "hash" else client.zrange(key, 0, -1, withscores=True)
    return out


@pytest.mark.servers
def test_round_trip_exact_values_ttl_and_series(rds, unique):
    settings, client = rds
    rows = minute_rows(3)
    driver = Driver(lambda: RedisAggregatesSink(settings))
    driver.epoch(rows)
    driver.close()
    assert driver.dead == []
    key = f"{unique}:acme:click:1m:2026-11-20T09:01:00.000Z"
    assert client.hgetall(key) == {
        "count": "11",
        "unique_users": "2",
        "revision": "0",
        "window_end": "2026-11-20T09:02:00.000Z",
    }
    assert settings.redis_ttl_s - 5 <= client.ttl(key) <= settings.redis_ttl_s < 86_400
    series = f"{unique}:acme:click:1m"
    assert client.zrevrange(series, 0, 1, withscores=True) == [
        ("2026-11-20T09:02:00.000Z", 1795165320000.0),
        ("2026-11-20T09:01:00.000Z", 1795165260000.0),
    ]
    assert 0 < client.ttl(series) <= settings.redis_ttl_s
    # "The last N windows": members of the set name the hashes.
    last = [client.hgetall(f"{series}:{m}")["count"] for m in client.zrevrange(series, 0, 2)]
    assert last == ["12", "11", "10"]


@pytest.mark.servers
def test_revisions_only_go_up_and_values_are_absolute(rds, unique):
    settings, client = rds
    r0 = aggregate("acme", "click", "5m", "2026-11-20T09:00:00.000Z", "2026-11-20T09:05:00.000Z", 10, 4, 0)
    r1 = {**r0, "count": 12, "unique_users": 5, "revision": 1}
    driver = Driver(lambda: RedisAggregatesSink(settings))
    driver.epoch([r0])
    driver.epoch([r1])
    driver.epoch([r0])  # a stale revision changes nothing
    driver.epoch([r1, r0])
    driver.close()
    key = f"{unique}:acme:click:5m:2026-11-20T09:00:00.000Z"
    assert client.hgetall(key) == {
        "count": "12", "unique_users": "5", "revision": "1", "window_end": "2026-11-20T09:05:00.000Z",
    }


@pytest.mark.servers
def test_a_replay_with_other_revisions_never_regresses_a_window(rds, unique):
    # The first attempt wrote rev0 count=10 and rev1 count=11, then crashed before its snapshot
    # was persisted; the replay batches differently and emits rev0 count=12 and nothing more.
    settings, client = rds
    r0 = aggregate("acme", "click", "1m", "2026-11-20T09:00:00.000Z", "2026-11-20T09:01:00.000Z", 10, 4, 0)
    r1 = {**r0, "count": 11, "unique_users": 5, "revision": 1}
    replay = {**r0, "count": 12, "unique_users": 5, "revision": 0}
    key = f"{unique}:acme:click:1m:2026-11-20T09:00:00.000Z"

    def stored():
        h = client.hgetall(key)
        return int(h["count"]), int(h["unique_users"]), int(h["revision"])

    crashed = Driver(lambda: RedisAggregatesSink(settings))
    crashed.epoch([r0])
    crashed.epoch([r1])
    resumed = Driver(lambda: RedisAggregatesSink(settings))
    resumed.epoch([replay])
    assert stored() == (12, 5, 0)
    resumed.epoch([r0, r1], [replay])
    resumed.epoch([{**r1, "revision": 7}])  # fewer events, whatever the revision: ignored
    assert stored() == (12, 5, 0)
    resumed.epoch([{**replay, "unique_users": 6}])  # unique users break a count tie
    assert stored() == (12, 6, 0)
    resumed.epoch([{**r0, "count": 13, "unique_users": 6, "revision": 1}, {**replay, "unique_users": 6, "revision": 9}])
    resumed.close()
    assert stored() == (13, 6, 1)
    assert client.zrange(f"{unique}:acme:click:1m", 0, -1) == ["2026-11-20T09:00:00.000Z"]
    assert crashed.dead == resumed.dead == []


@pytest.mark.servers
def test_same_batch_twice_same_state(rds, unique):
    settings, client = rds
    rows = minute_rows(30)
    driver = Driver(lambda: RedisAggregatesSink(settings))
    driver.epoch(rows)
    first = state(client, f"{unique}:")
    driver.epoch(rows)
    driver.close()
    assert state(client, f"{unique}:") == first
    assert len(first) == 31  # 30 hashes + 1 sorted set


@pytest.mark.servers
def test_series_is_trimmed_to_the_ttl_horizon_of_its_newest_window(unique):
    settings = Settings(redis_key_prefix=f"{unique}:", redis_ttl_s=600)  # 10 minutes
    client = redis_connector.client(settings, decode_responses=True)
    try:
        driver = Driver(lambda: RedisAggregatesSink(settings))
        driver.epoch(minute_rows(30))
        driver.close()
        members = client.zrange(f"{unique}:acme:click:1m", 0, -1)
        assert members[0] == "2026-11-20T09:19:00.000Z"  # newest 09:29 − 10 min
        assert len(members) == 11
    finally:
        keys = list(client.scan_iter(f"{unique}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.mark.servers
def test_poison_rows_go_to_the_dlq_with_the_servers_reason(rds, unique):
    settings, client = rds
    rows = minute_rows(10)
    taken = f"{unique}:acme:click:1m:{rows[3]['window_start']}"
    client.set(taken, "someone else's string")  # WRONGTYPE for the hash
    rows[6] = {**rows[6], "count": "many"}
    driver = Driver(lambda: RedisAggregatesSink(settings))
    driver.epoch(rows)
    driver.close()
    assert [orjson.loads(d["payload"])["window_start"] for d in driver.dead] == [
        rows[3]["window_start"], rows[6]["window_start"],
    ]
    assert all(d["reason"] == "sink_failed" and d["stage"] == "sink:redis" for d in driver.dead)
    assert driver.dead[0]["error"].startswith("WRONGTYPE")
    assert "must be numbers" in driver.dead[1]["error"] and "many" in driver.dead[1]["error"]
    assert client.get(taken) == "someone else's string"
    written = [k for k in client.scan_iter(f"{unique}:acme:click:1m:*") if client.type(k) == "hash"]
    assert len(written) == 8


def _snapshot_then_remove_after(client) -> tuple:
    """The stack runs Redis without persistence; save a snapshot before the restart so the data
    written before the outage is loaded again (the file is removed once the server is back)."""
    directory = client.config_get("dir")["dir"]
    filename = client.config_get("dbfilename")["dbfilename"]
    return Path(directory) / filename, client.save


@pytest.mark.servers
def test_server_stopped_mid_write_loses_and_duplicates_nothing(rds, unique):
    settings, client = rds
    rows = minute_rows(120)
    driver = Driver(lambda: RedisAggregatesSink(settings))
    driver.epoch(rows[:40])
    dump, save = _snapshot_then_remove_after(client)
    try:
        with outage("redis", down_s=3, before_stop=save):
            driver.epoch(rows[40:80])  # blocks until the server is back
    finally:
        dump.unlink(missing_ok=True)
    driver.epoch(rows[60:120])
    driver.close()
    assert driver.sink.stats.retries > 0
    assert driver.dead == []
    fresh = redis_connector.client(settings, decode_responses=True)
    hashes = {k: fresh.hgetall(k) for k in fresh.scan_iter(f"{unique}:acme:click:1m:*")}
    assert len(hashes) == 120
    assert sorted(int(h["count"]) for h in hashes.values()) == [10 + m for m in range(120)]
    assert fresh.zcard(f"{unique}:acme:click:1m") == 120
