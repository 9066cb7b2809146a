"""The S3 archive sink: key layout without a server, the rest against the local moto server
(each test has its own bucket)."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import orjson
import polars as pl
import pytest
from botocore.exceptions import ClientError

from connectors import s3
from connectors.base import TransientSinkError
from connectors.s3 import S3ArchiveSink, object_groups
from dataflows.config import Settings
from operators.model import ENRICHED_SCHEMA
from tests.connectors.sinkkit import Driver, event, events, frame, outage


def test_object_keys_group_by_tenant_date_hour_and_source_partition():
    rows = [
        event(0, tenant="acme", source="events.raw/2/100"),
        event(1, tenant="acme", source="events.raw/2/105"),
        event(2, tenant="acme", source="events.raw/3/7"),
        event(3, tenant="a/b c", source="events.raw/2/101"),
        event(4, tenant="acme", source="events.raw/2/103", at=datetime(2026, 11, 20, 10, 30, tzinfo=UTC)),
        event(5, tenant="acme", source="sample.jsonl:42"),
    ]
    groups = object_groups(frame(rows), "archive/")
    assert [(key, g["event_id"].to_list()) for key, g in groups] == [
        ("archive/tenant=acme/date=2026-11-20/hour=09/events.raw-2-000000000100-000000000105.parquet", ["ev-000000", "ev-000001"]),
        ("archive/tenant=acme/date=2026-11-20/hour=09/events.raw-3-000000000007-000000000007.parquet", ["ev-000002"]),
        ("archive/tenant=a%2Fb%20c/date=2026-11-20/hour=09/events.raw-2-000000000101-000000000101.parquet", ["ev-000003"]),
        ("archive/tenant=acme/date=2026-11-20/hour=10/events.raw-2-000000000103-000000000103.parquet", ["ev-000004"]),
        ("archive/tenant=acme/date=2026-11-20/hour=09/sample.jsonl-000000000042-000000000042.parquet", ["ev-000005"]),
    ]
    assert all(g.columns == list(ENRICHED_SCHEMA) for _, g in groups)


class StubS3:
    def __init__(self, errors: dict[str, tuple[int, str]]):
        self.errors = errors
        self.puts = []

    def put_object(self, Bucket, Key, Body, ContentType):  # noqa: N803 - boto3's names
        for fragment, (status, code) in self.errors.items():
            if fragment in Key:
                raise ClientError(
                    {"Error": {"Code": code, "Message": f"{code} says no"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                    "PutObject",
                )
        self.puts.append(Key)


def test_object_level_rejections_and_transient_errors():
    sink = S3ArchiveSink(Settings())
    sink._client = StubS3({"tenant=bad": (400, "InvalidArgument")})
    rows = [event(0, tenant="good"), event(1, tenant="bad"), event(2, tenant="good2")]
    rejected = sink.write(frame(rows))
    assert [(r.row["event_id"], r.error) for r in rejected] == [
        ("ev-000001", "HTTP 400 InvalidArgument: InvalidArgument says no")
    ]
    assert len(sink._client.puts) == 2

    sink._client = StubS3({"tenant=slow": (503, "SlowDown")})
    rows = [event(0, tenant="good"), event(1, tenant="slow"), event(2, tenant="zlast")]
    with pytest.raises(TransientSinkError) as caught:
        sink.write(frame(rows))
    # Only the objects not yet put are retried, each with the same rows (so the same name).
    assert caught.value.remaining["event_id"].to_list() == ["ev-000001", "ev-000002"]

    sink._client = StubS3({"tenant=": (403, "AccessDenied")})  # configuration: block, never DLQ
    with pytest.raises(TransientSinkError):
        sink.write(frame(rows[:1]))


@pytest.fixture
def bucket_settings(unique: str):
    settings = Settings(s3_bucket=unique, s3_prefix="archive/")
    yield settings
    client = s3.client(settings)
    try:
        for key in object_keys(settings):
            client.delete_object(Bucket=unique, Key=key)
        client.delete_bucket(Bucket=unique)
    except ClientError:
        pass


def object_keys(settings: Settings) -> list[str]:
    client = s3.client(settings)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def read_object(settings: Settings, key: str) -> pl.DataFrame:
    body = s3.client(settings).get_object(Bucket=settings.s3_bucket, Key=key)["Body"].read()
    return pl.read_parquet(io.BytesIO(body))


def archive(settings: Settings) -> dict[str, pl.DataFrame]:
    return {key: read_object(settings, key) for key in object_keys(settings)}


@pytest.mark.servers
def test_creates_the_bucket_and_round_trips_exact_values(bucket_settings):
    rows = [event(i, tenant="acme" if i % 3 else "globex") for i in range(30)]
    rows.append(event(30, at=datetime(2026, 11, 20, 23, 59, 59, 999000, tzinfo=UTC), user_id=None))
    driver = Driver(lambda: S3ArchiveSink(bucket_settings))
    driver.epoch(frame(rows))
    driver.close()
    assert driver.dead == []
    stored = archive(bucket_settings)
    assert sorted(stored) == [
        "archive/tenant=acme/date=2026-11-20/hour=09/events.raw-2-000000001001-000000001029.parquet",
        "archive/tenant=acme/date=2026-11-20/hour=23/events.raw-2-000000001030-000000001030.parquet",
        "archive/tenant=globex/date=2026-11-20/hour=09/events.raw-2-000000001000-000000001027.parquet",
    ]
    everything = pl.concat(stored.values()).sort("event_id")
    assert everything.schema == frame(rows).schema
    assert everything.to_dicts() == frame(rows).sort("event_id").to_dicts()


@pytest.mark.servers
def test_same_batch_twice_overwrites_instead_of_duplicating(bucket_settings):
    batch = events(0, 200)
    driver = Driver(lambda: S3ArchiveSink(bucket_settings))
    driver.epoch(batch)
    first = archive(bucket_settings)
    driver.epoch(batch)
    driver.close()
    second = archive(bucket_settings)
    assert sorted(second) == sorted(first)
    assert all(second[k].equals(first[k]) for k in first)
    assert sum(f.height for f in second.values()) == 200


@pytest.mark.servers
def test_poison_rows_go_to_the_dlq_and_the_rest_is_archived(bucket_settings):
    rows = [event(i) for i in range(10)]
    rows[4] = event(4, tenant="t" * 1100)  # its object key would exceed S3's 1024 bytes
    driver = Driver(lambda: S3ArchiveSink(bucket_settings))
    driver.epoch(frame(rows))
    driver.close()
    stored = archive(bucket_settings)
    assert sorted(pl.concat(stored.values())["event_id"].to_list()) == [
        f"ev-{i:06d}" for i in range(10) if i != 4
    ]
    (record,) = driver.dead
    assert record["reason"] == "sink_failed" and record["stage"] == "sink:s3"
    assert record["error"].startswith("KeyTooLongError")
    assert orjson.loads(record["payload"])["event_id"] == "ev-000004"


@pytest.mark.servers
def test_server_stopped_mid_write_loses_and_duplicates_nothing(bucket_settings):
    # moto keeps everything in memory: the restart empties it, bucket included. The sink must
    # notice (NoSuchBucket), create the bucket again and write what it was handed.
    driver = Driver(lambda: S3ArchiveSink(bucket_settings))
    driver.epoch(events(0, 100))
    with outage("s3", down_s=3):
        driver.epoch(events(100, 100))  # blocks until the server is back
    driver.epoch(events(200, 100))
    driver.close()
    assert driver.sink.stats.retries > 0
    assert driver.dead == []
    ids = pl.concat(archive(bucket_settings).values())["event_id"].to_list()
    assert sorted(ids) == [f"ev-{i:06d}" for i in range(100, 300)]
