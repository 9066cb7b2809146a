from __future__ import annotations

import pytest

from connectors import s3
from dataflows.config import Settings

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def test_local_endpoint_defaults_to_dummy_credentials(monkeypatch):
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    kwargs = s3.client_kwargs(Settings(s3_endpoint_url="http://127.0.0.1:5000"))
    assert kwargs == {
        "region_name": "us-east-1",
        "endpoint_url": "http://127.0.0.1:5000",
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
    }


def test_local_endpoint_takes_credentials_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    kwargs = s3.client_kwargs(Settings(s3_endpoint_url="http://127.0.0.1:5000"))
    assert (kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"]) == (
        "AKIDEXAMPLE",
        "secret",
    )


def test_empty_endpoint_means_aws_with_the_default_chain():
    for endpoint in ("", None):
        kwargs = s3.client_kwargs(Settings(s3_endpoint_url=endpoint, s3_region="eu-west-1"))
        assert kwargs == {"region_name": "eu-west-1"}


@pytest.mark.servers
def test_create_bucket_put_get(settings: Settings, unique: str):
    client = s3.client(settings)
    bucket = f"test-{unique}"
    client.create_bucket(Bucket=bucket)
    body = b"\x00parquet-bytes\xff" * 100
    client.put_object(Bucket=bucket, Key="dt=2024-01-01/part-0.parquet", Body=body)
    client.put_object(Bucket=bucket, Key="dt=2024-01-02/part-0.parquet", Body=b"second")
    got = client.get_object(Bucket=bucket, Key="dt=2024-01-01/part-0.parquet")["Body"].read()
    assert got == body
    listed = client.list_objects_v2(Bucket=bucket, Prefix="dt=")
    assert [o["Key"] for o in listed["Contents"]] == [
        "dt=2024-01-01/part-0.parquet",
        "dt=2024-01-02/part-0.parquet",
    ]
