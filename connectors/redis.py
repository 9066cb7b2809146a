"""Redis client from Settings."""

from __future__ import annotations

from typing import Any

import redis

from dataflows.config import Settings


def client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client for `settings.redis_url` (bytes replies unless `decode_responses=True`).

    Keyword arguments go to redis.Redis.from_url; connecting and each reply time out after
    10 s unless overridden.
    """
    kwargs.setdefault("socket_connect_timeout", 10)
    kwargs.setdefault("socket_timeout", 10)
    return redis.Redis.from_url(settings.redis_url, **kwargs)
