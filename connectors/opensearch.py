"""OpenSearch: the client, the error-events sink and index retention.

Error/exception events go to daily indices named by the *event's* UTC date,
`<OPENSEARCH_INDEX_PREFIX>-YYYY.MM.DD` (default `events-errors-2026.11.22`), with
`_id = event_id`: a re-written or replayed event lands on the same document, so writes are
idempotent. Reads go through the alias `<prefix>` (`events-errors`), which the index template
attaches to every new daily index.

The template (`<prefix>`, pattern `<prefix>-*`) maps `error_message`/`error_stack` as `text`,
every other string as `keyword`, the timestamps as `date`, and `geo_location` (built from
`geo_lat`/`geo_lon`) as `geo_point`.

Writes are one `_bulk` request per batch. Per item: 2xx is written; 429 and 5xx are retried (the
base retries just those rows); any other 4xx is a permanent rejection (the server's
`type: reason` goes to the DLQ). Connection errors and a 429/5xx for the whole request are
transient.

Maintenance: `python -m connectors.opensearch retention --days 30` deletes the daily indices
older than 30 days (see docs/runbook.md).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl
from opensearchpy import OpenSearch
from opensearchpy import exceptions as os_errors

from connectors.base import Batch, Rejected, SinkWriter, TransientSinkError
from dataflows.config import Settings
from operators.model import as_dicts

log = logging.getLogger(__name__)

TEXT_FIELDS = ("error_message", "error_stack")
DATE_FIELDS = ("timestamp", "ingested_at", "processed_at")
KEYWORD_IGNORE_ABOVE = 8191  # longer strings are kept in _source but not indexed


def client(settings: Settings, **kwargs: Any) -> OpenSearch:
    """A client for `settings.opensearch_url`.

    Credentials, when needed, go in the URL (`https://user:password@host:9200`). Keyword
    arguments go to opensearchpy.OpenSearch; requests time out after 30 s unless overridden.
    """
    kwargs.setdefault("timeout", 30)
    return OpenSearch(hosts=[settings.opensearch_url], **kwargs)


def index_template(prefix: str) -> dict:
    return {
        "index_patterns": [f"{prefix}-*"],
        "priority": 100,
        "template": {
            "settings": {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "1s"},
            "aliases": {prefix: {}},
            "mappings": {
                "dynamic_templates": [
                    {
                        "strings_as_keywords": {
                            "match_mapping_type": "string",
                            "mapping": {"type": "keyword", "ignore_above": KEYWORD_IGNORE_ABOVE},
                        }
                    }
                ],
                "properties": {
                    **{name: {"type": "text"} for name in TEXT_FIELDS},
                    **{
                        name: {"type": "date", "format": "strict_date_optional_time||epoch_millis"}
                        for name in DATE_FIELDS
                    },
                    "geo_location": {"type": "geo_point"},
                    "geo_lat": {"type": "double"},
                    "geo_lon": {"type": "double"},
                    "version": {"type": "integer"},
                },
            },
        },
    }


def index_for(prefix: str, day: str) -> str:
    """`prefix` + the event's UTC date: `events-errors-2026.11.22` for day `2026-11-22`."""
    return f"{prefix}-{day.replace('-', '.')}"


def document(row: dict) -> dict:
    """The indexed document of an event row (null fields left out, `geo_location` added)."""
    doc = {k: v for k, v in row.items() if v is not None}
    lat, lon = row.get("geo_lat"), row.get("geo_lon")
    if lat is not None and lon is not None:
        doc["geo_location"] = {"lat": lat, "lon": lon}
    return doc


def _is_transient_status(status: int) -> bool:
    return status == 429 or status >= 500


def _reason(error: Any) -> str:
    if isinstance(error, dict):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict):
            text += f" (caused by {cause.get('type')}: {cause.get('reason')})"
        return text
    return str(error)


class OpenSearchSink(SinkWriter):
    """Indexes event rows into daily indices by event date, `_id = event_id`."""

    name = "opensearch"

    def __init__(self, settings: Settings):
        self._settings = settings
        self._prefix = settings.opensearch_index_prefix
        self._client: OpenSearch | None = None

    def _os(self) -> OpenSearch:
        if self._client is None:
            # No client-side retries: the sink base owns retrying (and backpressure).
            self._client = client(self._settings, max_retries=0, retry_on_timeout=False)
        return self._client

    def setup(self) -> None:
        try:
            self._os().indices.put_index_template(
                name=self._prefix, body=index_template(self._prefix)
            )
        except (os_errors.ConnectionError, os_errors.ConnectionTimeout) as exc:
            raise TransientSinkError(f"putting the index template: {exc}") from exc
        except os_errors.TransportError as exc:
            if isinstance(exc.status_code, int) and _is_transient_status(exc.status_code):
                raise TransientSinkError(f"putting the index template: {exc}") from exc
            raise

    def write(self, batch: Batch) -> list[Rejected]:
        rows = as_dicts(batch) if isinstance(batch, pl.DataFrame) else batch
        body = bytearray()
        for row in rows:
            day = str(row["timestamp"])[:10]
            action = {"index": {"_index": index_for(self._prefix, day), "_id": row["event_id"]}}
            body += orjson.dumps(action) + b"\n" + orjson.dumps(document(row)) + b"\n"
        try:
            response = self._os().bulk(body=bytes(body))
        except (os_errors.ConnectionError, os_errors.ConnectionTimeout) as exc:
            raise TransientSinkError(f"bulk request: {exc}") from exc
        except os_errors.TransportError as exc:
            if isinstance(exc.status_code, int) and _is_transient_status(exc.status_code):
                raise TransientSinkError(f"bulk request: HTTP {exc.status_code} {exc.error}") from exc
            raise
        if not response.get("errors"):
            return []
        rejected: list[Rejected] = []
        retry: list[int] = []
        for i, item in enumerate(response["items"]):
            result = next(iter(item.values()))
            status = result.get("status", 500)
            if status < 300:
                continue
            if _is_transient_status(status):
                retry.append(i)
            else:
                rejected.append(Rejected(rows[i], f"HTTP {status} {_reason(result.get('error'))}"))
        if retry:
            first = next(iter(response["items"][retry[0]].values()))
            raise TransientSinkError(
                f"{len(retry)} of {len(rows)} bulk items failed with HTTP {first.get('status')} "
                f"({_reason(first.get('error'))})",
                remaining=[rows[i] for i in retry],
                rejected=rejected,
            )
        return rejected

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# --- retention ----------------------------------------------------------------------------------


def daily_indices(os_client: OpenSearch, prefix: str) -> list[tuple[str, datetime]]:
    """The daily indices of `prefix` with their UTC day, oldest first."""
    names = os_client.indices.get(index=f"{prefix}-*", expand_wildcards="all", ignore_unavailable=True)
    out = []
    for name in names:
        suffix = name[len(prefix) + 1 :]
        try:
            day = datetime.strptime(suffix, "%Y.%m.%d").replace(tzinfo=UTC)
        except ValueError:
            continue
        out.append((name, day))
    return sorted(out, key=lambda item: item[1])


def delete_old_indices(
    os_client: OpenSearch,
    prefix: str,
    days: int,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete the daily indices whose whole day is more than `days` days old; returns their names."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    old = [name for name, day in daily_indices(os_client, prefix) if day + timedelta(days=1) <= cutoff]
    if old and not dry_run:
        for start in range(0, len(old), 50):  # keep the URL short
            os_client.indices.delete(index=",".join(old[start : start + 50]))
    return old


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connectors.opensearch", description="OpenSearch maintenance."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("template", help="install or update the index template (idempotent)")
    retention = commands.add_parser("retention", help="delete daily indices older than --days")
    retention.add_argument("--days", type=int, required=True)
    retention.add_argument("--dry-run", action="store_true", help="only list what would go")
    args = parser.parse_args(argv)
    settings = Settings()
    prefix = settings.opensearch_index_prefix
    if args.command == "template":
        OpenSearchSink(settings).setup()
        print(f"index template {prefix} installed (pattern {prefix}-*, alias {prefix})")
        return 0
    if args.days < 1:
        parser.error("--days must be at least 1")
    deleted = delete_old_indices(client(settings), prefix, args.days, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(deleted)} index(es)" + "".join(f"\n  {n}" for n in deleted))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
