"""S3: the client (boto3) and the Parquet archive of every valid event.

Credentials:
- `S3_ENDPOINT_URL` set (the default, the local moto server): `AWS_ACCESS_KEY_ID` /
  `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) when set, otherwise the dummy pair
  "test"/"test". boto3's other credential sources (profiles, instance metadata) are not
  consulted, so a local run never picks up real AWS credentials by accident.
- `S3_ENDPOINT_URL` empty: real AWS, with boto3's usual credential chain.

Archive layout (bucket `S3_BUCKET`, created when missing; every key prefixed by `S3_PREFIX`):

    tenant=<tenant>/date=<YYYY-MM-DD>/hour=<HH>/<source partition>-<first offset>-<last offset>.parquet

`date`/`hour` are the event's UTC time, the tenant is percent-encoded. A flushed batch becomes one
object per (tenant, date, hour, source partition), named after that group's source partition and
the lowest and highest `source` offsets among its rows (`events.raw/3/1288` → partition
`events.raw-3`, offset 1288; `sample.jsonl:12` → `sample.jsonl`, 12). Objects are zstd Parquet
with the columns of `ENRICHED_SCHEMA`.

**Exactly once under crashes** (the protocol and its failure cases: docs/exactly-once.md, "S3").
All rows of one source partition reach one sink partition in offset order, and every flush cuts
the source at an offset (an epoch's checkpoint always flushes), so an object holds *every* row
of its (tenant, date, hour, source partition) group whose offset lies in its name's range. Two
objects of one group therefore share rows exactly when their offset ranges overlap, and within
one run the objects of a group never overlap. After each put the sink removes every *other*
object of the group whose range overlaps the new one: such an object was left by an attempt
whose epoch never committed (a crash before the snapshot was persisted), and everything in it
from the resume offset on is being written again by this run. Objects of committed epochs lie
wholly before the resume offset, so they never overlap and are never touched. A replay with
other flush boundaries, a crash between a put and its clean-up and a second crash during the
replay all end with every event archived once (see the doc). The objects of a group are listed
once per run (`<group>-` prefix, up to `GROUP_CACHE` groups remembered), then tracked in memory:
this run is the only writer of its source partitions.

Rows without a source offset (never produced by the pipeline's sources) are named by a hash of
their event ids instead and take no part in the clean-up.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

import boto3
import polars as pl
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from connectors.base import SOURCE_PATTERN, Batch, Rejected, SinkWriter, TransientSinkError
from dataflows.config import Settings
from operators.model import ENRICHED_SCHEMA, as_dicts

log = logging.getLogger(__name__)

DUMMY_KEY = "test"
MAX_KEY_BYTES = 1024  # S3's limit on object key length
GROUP_CACHE = 4096  # groups whose objects a writer keeps track of (more are listed again)


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """The keyword arguments `client` hands to boto3 (before any overrides)."""
    kwargs: dict[str, Any] = {"region_name": settings.s3_region}
    endpoint = settings.s3_endpoint_url or None
    if endpoint is not None:
        kwargs["endpoint_url"] = endpoint
        kwargs["aws_access_key_id"] = os.environ.get("AWS_ACCESS_KEY_ID") or DUMMY_KEY
        kwargs["aws_secret_access_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY") or DUMMY_KEY
        token = os.environ.get("AWS_SESSION_TOKEN")
        if token and os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["aws_session_token"] = token
    return kwargs


def client(settings: Settings, **overrides: Any):
    """A boto3 S3 client; keyword arguments go to boto3.client and win over the defaults."""
    return boto3.client("s3", **{**client_kwargs(settings), **overrides})


# --- errors ------------------------------------------------------------------------------------

# Codes that mean "this object cannot be stored": its rows go to the DLQ. Every other error
# (5xx, throttling, timeouts, credentials, permissions, a missing bucket) is treated as transient:
# the sink blocks and logs until the store or its configuration is fixed, and never dead-letters
# data because of a configuration problem.
_PERMANENT_CODES = {
    "KeyTooLongError",
    "EntityTooLarge",
    "InvalidArgument",
    "InvalidRequest",
    "InvalidObjectName",
    "MetadataTooLarge",
    "InvalidDigest",
    "BadDigest",
}


def _error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def _reason(exc: ClientError) -> str:
    code, status = _error_code(exc)
    return f"HTTP {status} {code}: {exc.response.get('Error', {}).get('Message', '')}".strip()


# --- naming ------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def partition_label(partition: str) -> str:
    """A source partition as a file-name part: `events.raw/3` → `events.raw-3`."""
    return _UNSAFE.sub("-", partition).strip("-") or "unknown"


def object_groups(frame: pl.DataFrame, prefix: str = "") -> list[tuple[str, pl.DataFrame]]:
    """(key, rows) per object of a batch of events: one per (tenant, date, hour, source
    partition), named after the lowest and highest source offsets of its rows."""
    source = pl.col("source").fill_null("")
    keyed = frame.with_columns(
        # as connectors.base.split_source, over the whole column
        pl.when(source.str.contains(SOURCE_PATTERN))
        .then(source.str.extract(SOURCE_PATTERN, 1))
        .otherwise(source)
        .alias("_part"),
        source.str.extract(SOURCE_PATTERN, 2).cast(pl.Int64).alias("_offset"),
        pl.col("timestamp").dt.strftime("%Y-%m-%d").alias("_date"),
        pl.col("timestamp").dt.strftime("%H").alias("_hour"),
    )
    out = []
    groups = keyed.partition_by("tenant", "_date", "_hour", "_part", as_dict=True, maintain_order=True)
    for (tenant, day, hour, part), rows in groups.items():
        first, last = rows["_offset"].min(), rows["_offset"].max()
        if first is None:  # no offsets to name the object by: name it by its events
            ids = "\n".join(sorted(rows["event_id"].fill_null("").to_list())).encode()
            digest = hashlib.blake2b(ids, digest_size=8).hexdigest()
            name = f"{partition_label(part)}-x{digest}.parquet"
        else:
            name = f"{partition_label(part)}-{first:012d}-{last:012d}.parquet"
        key = f"{prefix}tenant={quote(str(tenant), safe='')}/date={day}/hour={hour}/{name}"
        out.append((key, rows.drop("_part", "_offset", "_date", "_hour")))
    return out


_OBJECT_NAME = re.compile(r"^(.+)-(\d+)-(\d+)\.parquet$")


def object_range(key: str) -> tuple[str, int, int] | None:
    """(group, first offset, last offset) of an archive key; the group is the key up to the
    source partition label (`.../hour=09/events.raw-2`). None for a key named otherwise."""
    match = _OBJECT_NAME.match(key)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=True)
    return buffer.getvalue()


class S3ArchiveSink(SinkWriter):
    """Every valid event as Parquet, one object per (tenant, date, hour, source partition) and
    flush; objects overlapping a new one are removed (see the module docstring)."""

    name = "s3"

    def __init__(self, settings: Settings):
        self._settings = settings
        self._bucket = settings.s3_bucket
        self._prefix = settings.s3_prefix
        self._client = None
        self._bucket_missing = False
        # group → {key: (first, last)} of objects this run did not write that may still overlap
        # one it writes (listed on the group's first write, least recently used first)
        self._others: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()

    def _s3(self):
        if self._client is None:
            # The sink base owns retrying; botocore's own retries are kept short.
            from botocore.config import Config

            self._client = client(
                self._settings,
                config=Config(
                    retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                ),
            )
        return self._client

    def setup(self) -> None:
        self._call(self._ensure_bucket, "creating the bucket")

    def _ensure_bucket(self) -> None:
        s3 = self._s3()
        try:
            s3.head_bucket(Bucket=self._bucket)
            return
        except ClientError as exc:
            code, status = _error_code(exc)
            if status != 404 and code not in ("404", "NoSuchBucket"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self._bucket}
        if self._settings.s3_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._settings.s3_region}
        try:
            s3.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _call(self, function, what: str):
        """Run one S3 call; anything but an object-level rejection becomes TransientSinkError."""
        try:
            return function()
        except (BotoConnectionError, BotoCoreError) as exc:
            self._client = None
            raise TransientSinkError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except ClientError as exc:
            code, _status = _error_code(exc)
            if code in _PERMANENT_CODES:
                raise
            if code == "NoSuchBucket":
                self._bucket_missing = True
            raise TransientSinkError(f"{what}: {_reason(exc)}") from exc

    def write(self, batch: Batch) -> list[Rejected]:
        frame = batch if isinstance(batch, pl.DataFrame) else pl.DataFrame(batch, schema=ENRICHED_SCHEMA)
        if self._bucket_missing:
            self._call(self._ensure_bucket, "re-creating the bucket")
            self._bucket_missing = False
        rejected: list[Rejected] = []
        groups = object_groups(frame, self._prefix)
        for i, (key, rows) in enumerate(groups):
            if len(key.encode()) > MAX_KEY_BYTES:
                reason = (
                    f"KeyTooLongError: object key is {len(key.encode())} bytes, "
                    f"S3 allows {MAX_KEY_BYTES}"
                )
                rejected.extend(Rejected(row, reason) for row in as_dicts(rows))
                continue
            body = parquet_bytes(rows)
            try:
                self._call(
                    lambda: self._s3().put_object(
                        Bucket=self._bucket,
                        Key=key,
                        Body=body,
                        ContentType="application/vnd.apache.parquet",
                    ),
                    f"putting {key}",
                )
            except ClientError as exc:  # this object cannot be stored
                reason = _reason(exc)
                rejected.extend(Rejected(row, reason) for row in as_dicts(rows))
                continue
            except TransientSinkError as exc:
                raise self._retry_from(groups, i, exc, rejected) from exc
            try:
                self._call(
                    lambda key=key: self._remove_overlapping(key),
                    f"removing objects overlapping {key}",
                )
            except TransientSinkError as exc:
                # Put again (same rows, same name) and then clean up.
                raise self._retry_from(groups, i, exc, rejected) from exc
        return rejected

    @staticmethod
    def _retry_from(
        groups: list[tuple[str, pl.DataFrame]],
        i: int,
        exc: TransientSinkError,
        rejected: list[Rejected],
    ) -> TransientSinkError:
        """Retry only the objects not yet done; each keeps its rows, so its name."""
        remaining = pl.concat([g for _, g in groups[i:]], how="vertical_relaxed")
        return TransientSinkError(str(exc), remaining=remaining, rejected=rejected)

    def _remove_overlapping(self, key: str) -> None:
        """Delete the other objects of `key`'s group whose offset range overlaps its own."""
        parsed = object_range(key)
        if parsed is None:
            return
        group, first, last = parsed
        others = self._others.get(group)
        if others is None:
            others = self._list_group(group)
            self._others[group] = others
            while len(self._others) > GROUP_CACHE:
                self._others.popitem(last=False)
        else:
            self._others.move_to_end(group)
        others.pop(key, None)  # this run's object now, whoever wrote it before
        for other, (other_first, other_last) in sorted(others.items()):
            if other_last < first:
                # Wholly before this object: a later write of this run starts later still.
                del others[other]
            elif other_first <= last:
                self._s3().delete_object(Bucket=self._bucket, Key=other)
                log.warning(
                    "s3: removed %s, left by an attempt whose epoch did not commit; its rows "
                    "are in %s and the objects this run writes after it",
                    other, key,
                )
                del others[other]

    def _list_group(self, group: str) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        pages = self._s3().get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=f"{group}-"
        )
        for page in pages:
            for item in page.get("Contents", ()):
                parsed = object_range(item["Key"])
                if parsed is not None and parsed[0] == group:
                    found[item["Key"]] = (parsed[1], parsed[2])
        return found
