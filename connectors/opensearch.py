"""OpenSearch client from Settings."""

from __future__ import annotations

from typing import Any

from opensearchpy import OpenSearch

from dataflows.config import Settings


def client(settings: Settings, **kwargs: Any) -> OpenSearch:
    """A client for `settings.opensearch_url`.

    Credentials, when needed, go in the URL (`https://user:password@host:9200`). Keyword
    arguments go to opensearchpy.OpenSearch; requests time out after 30 s unless overridden.
    """
    kwargs.setdefault("timeout", 30)
    return OpenSearch(hosts=[settings.opensearch_url], **kwargs)
