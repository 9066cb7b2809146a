"""End to end: the dataflow on the bundled sample with every store sink on, the stores checked
against what the local sink wrote to `out/`."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import polars as pl
import pytest
from bytewax.testing import run_main

from connectors import opensearch, postgres, s3
from connectors import redis as redis_connector
from connectors.files import read_json_lines
from dataflows.config import BUNDLED_SAMPLE, Settings
from dataflows.main import build
from dataflows.outputs import SINK_FAILED_FILE

SINKS = "local,postgres,opensearch,redis,s3"


def highest_revisions(rows: list[dict], key) -> dict:
    best: dict = {}
    for row in rows:
        k = key(row)
        if k not in best or row["revision"] > best[k]["revision"]:
            best[k] = row
    return best


@pytest.fixture(scope="module")
def run(tmp_path_factory, stack):
    unique = f"t{uuid.uuid4().hex[:12]}"
    out = tmp_path_factory.mktemp("out")
    settings = Settings(
        pipeline_input=f"file:{BUNDLED_SAMPLE}",
        pipeline_output_dir=out,
        pipeline_batch_size=1000,  # windows close between batches, so late events revise them
        pipeline_sinks=SINKS,
        postgres_schema=unique,
        opensearch_index_prefix=f"{unique}-errors",
        redis_key_prefix=f"{unique}:",
        s3_bucket=unique,
        metrics_enabled=False,
    )
    run_main(build(settings))
    streams = {name: list(read_json_lines(out / name)) for name in ("enriched", "aggregates", "sessions", "dlq")}
    yield settings, out, streams
    with postgres.sink_connection(settings) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')
    client = opensearch.client(settings)
    client.indices.delete(index=f"{unique}-errors-*", ignore_unavailable=True, expand_wildcards="all")
    client.indices.delete_index_template(name=f"{unique}-errors", ignore=[404])
    rds = redis_connector.client(settings)
    keys = list(rds.scan_iter(f"{unique}:*", count=1000))
    for start in range(0, len(keys), 1000):
        rds.delete(*keys[start : start + 1000])
    bucket = s3.client(settings)
    for key in s3_keys(settings):
        bucket.delete_object(Bucket=unique, Key=key)
    bucket.delete_bucket(Bucket=unique)


def s3_keys(settings: Settings) -> list[str]:
    client = s3.client(settings)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.mark.servers
def test_the_sample_has_every_kind_of_event(run):
    _, out, streams = run
    types = {e["type"] for e in streams["enriched"]}
    assert {"pageview", "click", "error", "exception"} <= types
    assert streams["aggregates"] and streams["sessions"]
    assert not (out / "dlq" / SINK_FAILED_FILE).exists()  # no store refused anything


@pytest.mark.servers
def test_postgres_holds_exactly_the_pageview_and_click_events(run):
    settings, _, streams = run
    expected = {
        e["event_id"]: (e["tenant"], e["type"], e["timestamp"], e["source"])
        for e in streams["enriched"]
        if e["type"] in ("pageview", "click")
    }
    with postgres.sink_connection(settings) as conn:
        rows = conn.execute(
            f"SELECT event_id, tenant, type, to_char(\"timestamp\", 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
            f'source FROM "{settings.postgres_schema}".events'
        ).fetchall()
    assert len(rows) == len(expected)
    assert {r[0]: tuple(r[1:]) for r in rows} == expected


@pytest.mark.servers
def test_opensearch_holds_exactly_the_error_and_exception_events(run):
    settings, _, streams = run
    expected = {e["event_id"]: e for e in streams["enriched"] if e["type"] in ("error", "exception")}
    client = opensearch.client(settings)
    alias = settings.opensearch_index_prefix
    client.indices.refresh(index=alias)
    hits = client.search(index=alias, body={"query": {"match_all": {}}, "size": 10_000})["hits"]
    assert hits["total"]["value"] == len(expected)
    stored = {h["_id"]: h for h in hits["hits"]}
    assert set(stored) == set(expected)
    for event_id, hit in stored.items():
        event = expected[event_id]
        assert hit["_index"] == f"{alias}-{event['timestamp'][:10].replace('-', '.')}"
        assert hit["_source"]["error_message"] == event["error_message"]
        assert hit["_source"]["timestamp"] == event["timestamp"]


@pytest.mark.servers
def test_aggregates_in_postgres_and_redis_are_the_highest_revisions(run):
    settings, _, streams = run
    key = lambda r: (r["tenant"], r["event_type"], r["window"], r["window_start"])  # noqa: E731
    expected = {
        k: (r["window_end"], r["count"], r["unique_users"], r["revision"])
        for k, r in highest_revisions(streams["aggregates"], key).items()
    }
    assert any(rev > 0 for *_, rev in expected.values())  # the sample has late corrections
    iso = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'"
    with postgres.sink_connection(settings) as conn:
        rows = conn.execute(
            f'SELECT tenant, event_type, "window", to_char(window_start, {iso}), '
            f"to_char(window_end, {iso}), count, unique_users, revision "
            f'FROM "{settings.postgres_schema}".aggregates'
        ).fetchall()
    assert {tuple(r[:4]): tuple(r[4:]) for r in rows} == expected

    rds = redis_connector.client(settings, decode_responses=True)
    prefix = settings.redis_key_prefix
    pipe = rds.pipeline(transaction=False)
    for tenant, etype, window, start in expected:
        pipe.hgetall(f"{prefix}{tenant}:{etype}:{window}:{start}")
    stored = dict(zip(expected, pipe.execute(), strict=True))
    assert {
        k: (h["window_end"], int(h["count"]), int(h["unique_users"]), int(h["revision"]))
        for k, h in stored.items()
    } == expected
    series = {(t, e, w) for t, e, w, _ in expected}
    hashes = sum(1 for k in rds.scan_iter(f"{prefix}*", count=1000) if rds.type(k) == "hash")
    assert hashes == len(expected)
    for tenant, etype, window in series:
        members = rds.zrange(f"{prefix}{tenant}:{etype}:{window}", 0, -1)
        assert sorted(members) == sorted(s for t, e, w, s in expected if (t, e, w) == (tenant, etype, window))


@pytest.mark.servers
def test_postgres_sessions_are_the_latest_revision_of_each_session(run):
    settings, _, streams = run
    latest = highest_revisions(streams["sessions"], lambda r: (r["session_id"], r["start"]))
    # A row superseded by a higher revision of the same session that starts earlier (a late
    # event moved its start) is replaced.
    expected = {
        k: (r["end"], r["event_count"], r["revision"])
        for k, r in latest.items()
        if not any(
            o["session_id"] == r["session_id"] and o["start"] < r["start"] and o["end"] >= r["end"]
            and o["revision"] > r["revision"]
            for o in latest.values()
        )
    }
    iso = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'"
    with postgres.sink_connection(settings) as conn:
        rows = conn.execute(
            f'SELECT session_id, to_char(start, {iso}), to_char("end", {iso}), event_count, revision '
            f'FROM "{settings.postgres_schema}".sessions'
        ).fetchall()
    assert {tuple(r[:2]): tuple(r[2:]) for r in rows} == expected


@pytest.mark.servers
def test_s3_holds_every_valid_event_once(run):
    settings, _, streams = run
    client = s3.client(settings)
    frames = []
    for key in s3_keys(settings):
        body = client.get_object(Bucket=settings.s3_bucket, Key=key)["Body"].read()
        part = pl.read_parquet(io.BytesIO(body))
        tenant = key.split("/")[0].removeprefix("tenant=")
        assert set(part["tenant"].to_list()) == {tenant}
        frames.append(part)
    archived = pl.concat(frames)
    assert archived.height == len(streams["enriched"])
    assert sorted(archived["event_id"].to_list()) == sorted(e["event_id"] for e in streams["enriched"])


@pytest.mark.servers
def test_a_second_run_leaves_the_databases_as_they_were(run, tmp_path):
    settings, _, streams = run
    schema = settings.postgres_schema

    def snapshot():
        with postgres.sink_connection(settings) as conn:
            counts = tuple(
                conn.execute(f'SELECT count(*) FROM "{schema}".{table}').fetchone()[0]
                for table in ("events", "aggregates", "sessions")
            )
            aggregates = conn.execute(
                f'SELECT tenant, event_type, "window", window_start, count, revision, updated_at '
                f'FROM "{schema}".aggregates ORDER BY 1, 2, 3, 4'
            ).fetchall()
        client = opensearch.client(settings)
        client.indices.refresh(index=settings.opensearch_index_prefix)
        docs = client.count(index=settings.opensearch_index_prefix)["count"]
        return counts, aggregates, docs

    before = snapshot()
    again = settings.model_copy(update={"pipeline_output_dir": Path(tmp_path)})
    run_main(build(again))
    assert snapshot() == before
