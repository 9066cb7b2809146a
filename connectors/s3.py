"""S3 client (boto3) from Settings.

Credentials:
- `S3_ENDPOINT_URL` set (the default, the local moto server): `AWS_ACCESS_KEY_ID` /
  `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) when set, otherwise the dummy pair
  "test"/"test". boto3's other credential sources (profiles, instance metadata) are not
  consulted, so a local run never picks up real AWS credentials by accident.
- `S3_ENDPOINT_URL` empty: real AWS, with boto3's usual credential chain.
"""

from __future__ import annotations

import os
from typing import Any

import boto3

from dataflows.config import Settings

DUMMY_KEY = "test"


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
