"""The S3 archive sink: key layout without a server, the rest against the local moto server
(each test has its own bucket)."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta

import orjson
import polars as pl
import pytest
from botocore.exceptions import ClientError

from connectors import s3
from connectors.base import SinkPolicy, TransientSinkError
from connectors.s3 import S3ArchiveSink, object_groups, object_range
from dataflows.config import Settings
from operators.model import ENRICHED_SCHEMA
from tests.connectors.sinkkit import BASE_TIME, Driver, event, events, frame, outage


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


def test_object_range_parses_only_archive_names():
    key = "archive/tenant=acme/date=2026-11-20/hour=09/events.raw-2-000000000100-000000000105.parquet"
    assert object_range(key) == ("archive/tenant=acme/date=2026-11-20/hour=09/events.raw-2", 100, 105)
    assert object_range("x/sample.jsonl-000000000042-1234567890123.parquet") == ("x/sample.jsonl", 42, 1234567890123)
    assert object_range("x/unknown-x0123456789abcdef.parquet") is None
    assert object_range("x/notes.txt") is None


def test_rows_without_an_offset_are_named_by_their_events():
    rows = [event(0, source="somewhere"), event(1, source="somewhere")]
    ((key, _),) = object_groups(frame(rows))
    assert key.startswith("tenant=acme/date=2026-11-20/hour=09/somewhere-x") and object_range(key) is None
    assert object_groups(frame(rows[::-1]))[0][0] == key  # the same events, the same name


class StubS3:
    def __init__(self, errors: dict[str, tuple[int, str]]):
        self.errors = errors
        self.puts = []

    def get_paginator(self, name):
        return self

    def paginate(self, Bucket, Prefix):  # noqa: N803 - boto3's names
        return [{"Contents": [{"Key": k} for k in self.puts if k.startswith(Prefix)]}]

    def delete_object(self, Bucket, Key):  # noqa: N803
        self.puts.remove(Key)

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


# --- exactly once under crash + replay -------------------------------------------------------
#
# A source stream for one sink partition: the rows of two source partitions, interleaved, each in
# offset order, over two tenants and two event hours. A run starts at a committed position (a
# flush boundary of an earlier run: what its last persisted snapshot had written), flushes at
# its own boundaries, and either crashes (the partition is abandoned, possibly in the middle of
# a write) or runs to the end. The resumed run is a new sink partition built from the older
# snapshot (the store sink's state is empty), so only what S3 holds carries over.


class Crash(BaseException):
    """The process dies: nothing after it runs, nothing catches it."""


def source_stream(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    offsets = {0: 500, 1: 7000}
    rows = []
    for i in range(n):
        p = rng.choice((0, 1))
        offsets[p] += rng.choice((1, 1, 1, 2))  # gaps: records that went to the DLQ
        rows.append(
            event(
                i,
                event_id=f"ev-{p}-{offsets[p]}",
                tenant=rng.choice(("acme", "globex")),
                at=BASE_TIME + timedelta(minutes=50 + i * 20 // n),  # 09:50 … 10:10
                source=f"events.raw/{p}/{offsets[p]}",
            )
        )
    return rows


class FakeS3:
    """Just enough of the S3 API for the archive sink, in memory. `crash_after` mutating calls
    (puts and deletes) raise Crash."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.crash_after: int | None = None

    def _mutate(self) -> None:
        if self.crash_after is not None:
            if self.crash_after == 0:
                self.crash_after = None
                raise Crash()
            self.crash_after -= 1

    def head_bucket(self, Bucket):  # noqa: N803 - boto3's names
        return {}

    def put_object(self, Bucket, Key, Body, ContentType):  # noqa: N803
        self._mutate()
        self.objects[Key] = Body

    def delete_object(self, Bucket, Key):  # noqa: N803
        self._mutate()
        self.objects.pop(Key, None)

    def get_paginator(self, name):
        return self

    def paginate(self, Bucket, Prefix):  # noqa: N803
        return [{"Contents": [{"Key": k} for k in sorted(self.objects) if k.startswith(Prefix)]}]

    def archived_ids(self) -> list[str]:
        return [i for body in self.objects.values() for i in pl.read_parquet(io.BytesIO(body))["event_id"]]


REPLAY_POLICY = SinkPolicy(max_batch_rows=10_000, linger_s=1e9, retries=3, backoff_s=0.01, backoff_max_s=0.05)


def run_attempt(new_writer, rows: list[dict], start: int, cuts: list[int], stop: int | None) -> list[int]:
    """Hand over rows[start:] flushing at `cuts`; stop (crash) before row `stop`, or run to the
    end and close. Returns the boundaries whose flush completed (snapshot candidates)."""
    driver = Driver(new_writer, policy=REPLAY_POLICY)
    end = len(rows) if stop is None else stop
    done = []
    position = start
    try:
        for cut in [c for c in sorted(set(cuts)) if start < c < end] + [end]:
            driver.part.write_batch([frame(rows[position:cut])])
            position = cut
            if cut < end or stop is None:
                driver.part.flush()
                done.append(cut)
        if stop is None:
            driver.close()
    except Crash:
        pass
    return done


def crash_and_replay(new_writer, rows: list[dict], rng: random.Random, crashes: int, arm=None) -> None:
    """`crashes` crashed attempts, each resumed from a flush boundary it (or an earlier attempt)
    completed, with other flush boundaries each time; then a run to the end. `arm(rng)` may make
    an attempt crash in the middle of a write; `arm(None)` disarms."""
    committed = 0
    for _ in range(crashes):
        cuts = rng.sample(range(committed + 1, len(rows)), k=min(6, len(rows) - committed - 1))
        stop = rng.randrange(committed + 1, len(rows) + 1)
        if arm is not None:
            arm(rng)
        done = run_attempt(new_writer, rows, committed, cuts, stop)
        if arm is not None:
            arm(None)
        committed = rng.choice([committed, *done])  # the last snapshot that was persisted
    run_attempt(new_writer, rows, committed, rng.sample(range(len(rows)), k=5), None)


@pytest.mark.parametrize("seed", range(40))
def test_crash_and_replay_with_other_flush_boundaries_archives_every_event_once(seed):
    rng = random.Random(seed)
    rows = source_stream(120, seed)
    store = FakeS3()

    def new_writer():
        sink = S3ArchiveSink(Settings(s3_bucket="replay", s3_prefix="archive/"))
        sink._client = store
        return sink

    def arm(rng):  # a crash after some puts or deletes: between a put and its clean-up, too
        store.crash_after = None if rng is None else rng.choice([None, rng.randrange(0, 12)])

    crash_and_replay(new_writer, rows, rng, crashes=rng.randrange(1, 4), arm=arm)
    assert sorted(store.archived_ids()) == sorted(r["event_id"] for r in rows)


def test_objects_of_committed_epochs_are_never_touched():
    rows = source_stream(100, 7)
    store = FakeS3()

    def new_writer():
        sink = S3ArchiveSink(Settings(s3_bucket="replay"))
        sink._client = store
        return sink

    run_attempt(new_writer, rows, 0, [20, 50, 70], stop=90)  # crashes; the snapshot at 50 persisted
    committed_ids = {r["event_id"] for r in rows[:50]}
    before = dict(store.objects)
    committed = {
        key: body for key, body in before.items()
        if set(pl.read_parquet(io.BytesIO(body))["event_id"]) <= committed_ids
    }
    assert committed and len(committed) < len(before)
    run_attempt(new_writer, rows, 50, [55, 80], None)
    assert {k: store.objects.get(k) for k in committed} == committed
    assert sorted(store.archived_ids()) == sorted(r["event_id"] for r in rows)


class CrashingClient:
    """A boto3 client that dies (Crash) on the put or delete after `crash_after` of them."""

    def __init__(self, client, crash_after: int | None):
        self._client = client
        self.crash_after = crash_after

    def __getattr__(self, name):
        return getattr(self._client, name)

    def _tick(self) -> None:
        if self.crash_after is not None:
            if self.crash_after == 0:
                raise Crash()
            self.crash_after -= 1

    def put_object(self, **kwargs):
        self._tick()
        return self._client.put_object(**kwargs)

    def delete_object(self, **kwargs):
        self._tick()
        return self._client.delete_object(**kwargs)


def moto_writer(settings: Settings, crash_after: int | None = None):
    def new_writer():
        sink = S3ArchiveSink(settings)
        sink._client = CrashingClient(sink._s3(), crash_after)
        return sink

    return new_writer


def archived(settings: Settings) -> list[str]:
    return sorted(i for f in archive(settings).values() for i in f["event_id"].to_list())


def etags(settings: Settings) -> dict[str, str]:
    client = s3.client(settings)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=settings.s3_bucket):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


@pytest.mark.servers
def test_crash_after_upload_then_replays_with_other_boundaries_archive_every_event_once(bucket_settings):
    rows = source_stream(300, 3)
    everything = sorted(r["event_id"] for r in rows)
    # Attempt 1: epochs end at 60 and 150, linger flushes at 100 and 210; everything up to 210
    # is uploaded, then the process dies. Only the snapshot at 60 was persisted.
    assert run_attempt(moto_writer(bucket_settings), rows, 0, [60, 100, 150, 210], stop=240) == [60, 100, 150, 210]
    committed_ids = {r["event_id"] for r in rows[:60]}
    committed = {
        k: tag for k, tag in etags(bucket_settings).items()
        if set(read_object(bucket_settings, k)["event_id"]) <= committed_ids
    }
    assert committed
    # Attempt 2 resumes from the snapshot at 60 and flushes elsewhere (130, then 260); it dies
    # in the middle of a write, after its fourth put or delete (so between a put and its clean-up).
    assert run_attempt(moto_writer(bucket_settings, crash_after=4), rows, 60, [130, 260], None) == []
    assert len(archived(bucket_settings)) > len(set(archived(bucket_settings)))  # duplicates, for now
    # Attempt 3 resumes from 60 again (attempt 2 persisted nothing), with yet other boundaries.
    run_attempt(moto_writer(bucket_settings), rows, 60, [61, 90, 200, 299], None)
    assert archived(bucket_settings) == everything
    after = etags(bucket_settings)
    assert {k: after.get(k) for k in committed} == committed  # committed objects untouched
    # And a run over the same source from the start (a re-run without recovery) replaces, too.
    run_attempt(moto_writer(bucket_settings), rows, 0, [150], None)
    assert archived(bucket_settings) == everything


@pytest.mark.servers
@pytest.mark.parametrize("seed", range(3))
def test_random_crashes_and_replays_against_the_server(bucket_settings, seed):
    rng = random.Random(1000 + seed)
    rows = source_stream(150, seed)
    crash = {"after": None}

    def new_writer():
        return moto_writer(bucket_settings, crash["after"])()

    def arm(rng):
        crash["after"] = None if rng is None else rng.choice([None, rng.randrange(0, 10)])

    crash_and_replay(new_writer, rows, rng, crashes=3, arm=arm)
    assert archived(bucket_settings) == sorted(r["event_id"] for r in rows)
