from __future__ import annotations

import time

import pytest

from connectors import redis as redis_connector
from dataflows.config import Settings


def test_client_uses_the_url():
    client = redis_connector.client(Settings(redis_url="redis://example.invalid:6380/3"))
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("example.invalid", 6380, 3)


@pytest.mark.servers
def test_set_get_with_ttl(settings: Settings, unique: str):
    client = redis_connector.client(settings)
    key = f"test:{unique}"
    try:
        assert client.set(key, b"value-1", ex=settings.redis_ttl_s) is True
        assert client.get(key) == b"value-1"
        ttl = client.ttl(key)
        assert settings.redis_ttl_s - 5 <= ttl <= settings.redis_ttl_s
    finally:
        client.delete(key)


@pytest.mark.servers
def test_key_expires(settings: Settings, unique: str):
    client = redis_connector.client(settings, decode_responses=True)
    key = f"test:{unique}:short"
    client.set(key, "soon-gone", px=200)
    assert client.get(key) == "soon-gone"
    deadline = time.monotonic() + 5
    while client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get(key) is None
