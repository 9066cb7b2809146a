"""The OpenSearch sink against the local server: each test has its own index prefix."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from connectors import opensearch
from connectors.base import TransientSinkError
from connectors.opensearch import OpenSearchSink, document, index_for
from dataflows.config import Settings
from operators.model import as_dicts
from tests.connectors.sinkkit import Driver, event, events, frame, outage


def test_index_names_follow_the_event_date():
    assert index_for("events-errors", "2026-11-22") == "events-errors-2026.11.22"


def test_document_drops_nulls_and_adds_geo_location():
    doc = document({"event_id": "a", "geo_lat": 1.5, "geo_lon": -2.0, "url": None})
    assert doc == {"event_id": "a", "geo_lat": 1.5, "geo_lon": -2.0, "geo_location": {"lat": 1.5, "lon": -2.0}}
    assert "geo_location" not in document({"event_id": "a", "geo_lat": 1.5, "geo_lon": None})


class FakeClient:
    """A bulk endpoint answering with given per-item statuses."""

    def __init__(self, statuses):
        self.statuses = statuses
        self.bodies = []

    def bulk(self, body):
        self.bodies.append(body)
        lines = body.splitlines()
        items = []
        for i, status in enumerate(self.statuses[: len(lines) // 2]):
            result = {"_index": "x", "_id": orjson.loads(lines[2 * i])["index"]["_id"], "status": status}
            if status >= 300:
                result["error"] = {"type": "es_rejected_execution_exception" if status == 429 else "mapper_parsing_exception", "reason": f"status {status}"}
            items.append({"index": result})
        return {"errors": any(s >= 300 for s in self.statuses), "items": items}


def test_bulk_items_429_are_retried_and_4xx_rejected():
    sink = OpenSearchSink(Settings())
    sink._client = FakeClient([201, 429, 400, 200, 503])
    rows = as_dicts(events(0, 5, type="error"))
    with pytest.raises(TransientSinkError) as caught:
        sink.write(rows)
    assert [r["event_id"] for r in caught.value.remaining] == ["ev-000001", "ev-000004"]
    assert [(r.row["event_id"], r.error) for r in caught.value.rejected] == [
        ("ev-000002", "HTTP 400 mapper_parsing_exception: status 400")
    ]


@pytest.fixture
def os_settings(unique: str):
    settings = Settings(opensearch_index_prefix=f"{unique}-errors")
    yield settings
    client = opensearch.client(settings)
    client.indices.delete(index=f"{unique}-errors-*", ignore_unavailable=True, expand_wildcards="all")
    client.indices.delete_index_template(name=f"{unique}-errors", ignore=[404])


def search_all(settings: Settings) -> dict[str, dict]:
    client = opensearch.client(settings)
    alias = settings.opensearch_index_prefix
    client.indices.refresh(index=alias)
    result = client.search(index=alias, body={"query": {"match_all": {}}, "size": 10_000})
    assert result["hits"]["total"]["value"] == len(result["hits"]["hits"])
    return {h["_id"]: {"_index": h["_index"], **h["_source"]} for h in result["hits"]["hits"]}


def error_rows(start: int, n: int, **kwargs) -> list[dict]:
    return [event(i, type="exception" if i % 2 else "error", **kwargs) for i in range(start, start + n)]


@pytest.mark.servers
def test_round_trip_exact_values_daily_indices_and_mapping(os_settings, unique):
    rows = error_rows(0, 3) + [event(3, type="error", at=datetime(2026, 11, 22, 0, 0, 0, 1000, tzinfo=UTC), geo_lat=None, geo_lon=None)]
    driver = Driver(lambda: OpenSearchSink(os_settings))
    driver.epoch(frame(rows))
    driver.close()
    assert driver.dead == []
    stored = search_all(os_settings)
    expected = {r["event_id"]: document(r) for r in as_dicts(frame(rows))}
    assert {k: {f: v for f, v in d.items() if f != "_index"} for k, d in stored.items()} == expected
    assert stored["ev-000000"]["_index"] == f"{unique}-errors-2026.11.20"
    assert stored["ev-000003"]["_index"] == f"{unique}-errors-2026.11.22"
    client = opensearch.client(os_settings)
    mapping = client.indices.get_mapping(index=f"{unique}-errors-2026.11.20")
    props = next(iter(mapping.values()))["mappings"]["properties"]
    assert props["error_message"]["type"] == "text"
    assert props["error_stack"]["type"] == "text"
    assert props["tenant"]["type"] == "keyword"
    assert props["url"]["type"] == "keyword"
    assert props["timestamp"]["type"] == "date"
    assert props["geo_location"]["type"] == "geo_point"
    # Full-text on the message, a geo query on the location.
    hits = client.search(index=unique + "-errors", body={"query": {"match": {"error_message": "undefined"}}})
    assert hits["hits"]["total"]["value"] == 4
    near = {"geo_distance": {"distance": "10km", "geo_location": {"lat": 51.5, "lon": -0.1}}}
    hits = client.search(index=unique + "-errors", body={"query": near})
    assert hits["hits"]["total"]["value"] == 3


@pytest.mark.servers
def test_same_batch_twice_same_documents(os_settings):
    batch = frame(error_rows(0, 40))
    driver = Driver(lambda: OpenSearchSink(os_settings))
    driver.epoch(batch)
    first = search_all(os_settings)
    driver.epoch(batch)
    driver.epoch(batch.slice(0, 10), batch.slice(5, 10))
    driver.close()
    assert search_all(os_settings) == first
    assert len(first) == 40


@pytest.mark.servers
def test_poison_document_goes_to_the_dlq_with_the_servers_reason(os_settings):
    rows = error_rows(0, 20)
    rows[7] = event(7, type="error", geo_lat=200.0)  # no such latitude
    driver = Driver(lambda: OpenSearchSink(os_settings))
    driver.epoch(frame(rows))
    driver.close()
    stored = search_all(os_settings)
    assert sorted(stored) == [f"ev-{i:06d}" for i in range(20) if i != 7]
    (record,) = driver.dead
    assert record["reason"] == "sink_failed"
    assert record["stage"] == "sink:opensearch"
    assert record["error"].startswith("HTTP 400 ")
    assert "latitude" in record["error"]
    assert orjson.loads(record["payload"])["event_id"] == "ev-000007"
    assert record["source"] == "events.raw/2/1007"


@pytest.mark.servers
def test_retention_deletes_old_daily_indices(os_settings, unique, monkeypatch, capsys):
    rows = [event(i, type="error", at=datetime(2026, 9, 1 + i, 12, tzinfo=UTC)) for i in range(3)]
    driver = Driver(lambda: OpenSearchSink(os_settings))
    driver.epoch(frame(rows))
    driver.close()
    client = opensearch.client(os_settings)
    prefix = os_settings.opensearch_index_prefix
    now = datetime(2026, 10, 3, 6, tzinfo=UTC)
    assert opensearch.delete_old_indices(client, prefix, 30, now=now, dry_run=True) == [
        f"{prefix}-2026.09.01", f"{prefix}-2026.09.02",
    ]
    assert opensearch.delete_old_indices(client, prefix, 30, now=now) == [
        f"{prefix}-2026.09.01", f"{prefix}-2026.09.02",
    ]
    assert sorted(search_all(os_settings)) == ["ev-000002"]
    monkeypatch.setenv("OPENSEARCH_INDEX_PREFIX", prefix)
    assert opensearch.main(["retention", "--days", "30"]) == 0
    assert f"{prefix}-2026.09.03" in capsys.readouterr().out


@pytest.mark.servers
def test_server_stopped_mid_write_loses_and_duplicates_nothing(os_settings):
    driver = Driver(lambda: OpenSearchSink(os_settings))
    driver.epoch(frame(error_rows(0, 100)))
    with outage("opensearch", down_s=3):
        driver.epoch(frame(error_rows(100, 150)))  # blocks until the server is back
    driver.epoch(frame(error_rows(200, 100)))
    driver.close()
    assert driver.sink.stats.retries > 0
    assert driver.dead == []
    assert sorted(search_all(os_settings)) == [f"ev-{i:06d}" for i in range(300)]
