from __future__ import annotations

import pytest

from connectors import opensearch
from dataflows.config import Settings


@pytest.mark.servers
def test_index_refresh_search(settings: Settings, unique: str):
    client = opensearch.client(settings)
    index = f"test-{unique}"
    client.indices.create(
        index=index,
        body={
            "settings": {"number_of_shards": 1, "number_of_replicas": 0},
            "mappings": {"properties": {"kind": {"type": "keyword"}, "n": {"type": "long"}}},
        },
    )
    try:
        client.index(index=index, id="a", body={"kind": "error", "n": 1})
        client.index(index=index, id="b", body={"kind": "error", "n": 2})
        client.index(index=index, id="c", body={"kind": "info", "n": 3})
        client.indices.refresh(index=index)
        result = client.search(
            index=index,
            body={"query": {"term": {"kind": "error"}}, "sort": [{"n": "asc"}]},
        )
        assert result["hits"]["total"]["value"] == 2
        assert [(h["_id"], h["_source"]) for h in result["hits"]["hits"]] == [
            ("a", {"kind": "error", "n": 1}),
            ("b", {"kind": "error", "n": 2}),
        ]
        assert client.get(index=index, id="c")["_source"] == {"kind": "info", "n": 3}
    finally:
        client.indices.delete(index=index)
