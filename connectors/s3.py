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

**When a replay overwrites instead of duplicating.** The name depends only on which rows went
into the flush, so a replay writes the same names exactly when its flushes cut the source
partition at the same offsets as the first run:

* stable — a flush triggered by `SINK_MAX_BATCH_ROWS` when the source re-delivers the same
  records in the same batches from the same starting offset (the JSON Lines source does); a
  re-run of a whole file with the same settings; a retry of a failed write (same rows, same names);
* not stable — flushes cut by `SINK_LINGER_S`, by the epoch checkpoint or by the end of input,
  which depend on wall-clock timing; a Kafka source whose polls return differently sized batches.
  Then a replay after a crash writes objects whose offset ranges overlap objects of the first
  attempt: some events are archived twice (never lost). Readers that need exactness deduplicate on
  `event_id`.

Exactly-once under crashes will need the sink to make the objects of an epoch visible only when
the epoch commits, e.g. write to `_staging/<epoch>/...`, record the staged keys in the partition's
snapshot, and on the next epoch's snapshot (or on resume) copy the committed ones into place and
delete staged objects that belong to no committed snapshot; alternatively cut objects only at
offset boundaries fixed in advance (`offset // N`) and carry the open segment in the recovery
state.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any
from urllib.parse import quote

import boto3
import polars as pl
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from connectors.base import SOURCE_PATTERN, Batch, Rejected, SinkWriter, TransientSinkError
from dataflows.config import Settings
from operators.model import ENRICHED_SCHEMA, as_dicts

DUMMY_KEY = "test"
MAX_KEY_BYTES = 1024  # S3's limit on object key length


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
        first = -1 if first is None else first
        last = -1 if last is None else last
        name = f"{partition_label(part)}-{first:012d}-{last:012d}.parquet"
        key = f"{prefix}tenant={quote(str(tenant), safe='')}/date={day}/hour={hour}/{name}"
        out.append((key, rows.drop("_part", "_offset", "_date", "_hour")))
    return out


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=True)
    return buffer.getvalue()


class S3ArchiveSink(SinkWriter):
    """Every valid event as Parquet, one object per (tenant, date, hour, source partition) and
    flush (see the module docstring for the key layout and when a replay overwrites)."""

    name = "s3"

    def __init__(self, settings: Settings):
        self._settings = settings
        self._bucket = settings.s3_bucket
        self._prefix = settings.s3_prefix
        self._client = None
        self._bucket_missing = False

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
            except TransientSinkError as exc:
                # Retry only the objects not yet put; each keeps its rows, so its name.
                remaining = pl.concat([g for _, g in groups[i:]], how="vertical_relaxed")
                raise TransientSinkError(str(exc), remaining=remaining, rejected=rejected) from exc
        return rejected
