"""The one configuration model: every setting is an environment variable.

`docs/configuration.md` documents each field; keep the two in step.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_SAMPLE = DATA_DIR / "sample.jsonl"
BUNDLED_GEOIP_CITY_DB = DATA_DIR / "GeoLite2-City-Test.mmdb"

SINK_NAMES = ("local", "kafka", "postgres", "opensearch", "redis", "s3", "weaviate")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- input and output -------------------------------------------------------------
    pipeline_input: str = Field(
        default=f"file:{BUNDLED_SAMPLE}",
        description="`file:<path>` (JSON Lines, one raw event per line) or `kafka`.",
    )
    pipeline_output_dir: Path = Field(default=Path("out"), description="Root of the local sink.")
    pipeline_sinks: str = Field(default="local", description="Comma list of sinks.")
    pipeline_batch_size: int = Field(
        default=15000, ge=1, description="Most records a source partition hands over at once."
    )
    pipeline_helper_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Nice value of Kafka's helper threads (librdkafka's, the sink writer's).",
    )

    # --- event time ---------------------------------------------------------------------
    pipeline_allowed_lateness_s: float = Field(default=60, ge=0)
    pipeline_idle_close_s: float = Field(default=30, gt=0)
    pipeline_max_future_s: float = Field(
        default=10,
        ge=0,
        description="How far past its ingestion an event's time may move the watermark.",
    )
    pipeline_late_policy: Literal["reaggregate", "drop"] = "reaggregate"
    pipeline_late_retention_s: float = Field(default=86400, ge=0)
    pipeline_session_gap_s: float = Field(default=1800, gt=0)
    pipeline_state_shards: int = Field(
        default=8,
        ge=1,
        description="Key space of window/session state; fixed for the life of a recovery store.",
    )

    # --- enrichment ---------------------------------------------------------------------
    geoip_city_db: Path = Field(default=BUNDLED_GEOIP_CITY_DB)
    ua_cache_size: int = Field(default=100_000, ge=0)
    geo_cache_size: int = Field(default=100_000, ge=0)

    # --- Kafka --------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_consumer_group: str = "event-pipeline"
    kafka_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Extra librdkafka settings as a JSON object (SASL, TLS, ...).",
    )
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="lz4",
        description="Compression of the records the Kafka sinks produce ('none' saves CPU "
        "when the broker is on the same machine).",
    )
    kafka_sink_partitions: int = Field(
        default=2,
        ge=1,
        description="Transactional producers per output topic; fixed for the life of a recovery store.",
    )
    kafka_stop_at_end: bool = Field(
        default=False, description="End the run when every input partition is read to its end."
    )
    kafka_topic_raw: str = "events.raw"
    kafka_topic_enriched: str = "events.enriched"
    kafka_topic_aggregates: str = "events.aggregates"
    kafka_topic_sessions: str = "events.sessions"
    kafka_topic_late: str = "events.late"
    kafka_topic_dlq: str = "events.dlq"

    # --- stores -------------------------------------------------------------------------
    postgres_dsn: str = "postgresql://pipeline:pipeline@127.0.0.1:5432/pipeline"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_ttl_s: int = Field(default=82_800, gt=0, lt=86_400)
    opensearch_url: str = "http://127.0.0.1:9200"
    s3_endpoint_url: str | None = "http://127.0.0.1:5000"
    s3_bucket: str = "events-archive"
    s3_region: str = "us-east-1"
    weaviate_url: str = "http://127.0.0.1:8080"
    postgres_schema: str = Field(
        default="public", min_length=1, description="Schema of the pipeline's tables."
    )
    opensearch_index_prefix: str = Field(
        default="events-errors",
        pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="Daily indices `<prefix>-YYYY.MM.DD`, read through the alias `<prefix>`.",
    )
    redis_key_prefix: str = Field(default="", description="Prepended to every Redis key.")
    s3_prefix: str = Field(default="", description="Prepended to every S3 object key.")
    s3_max_batch_rows: int = Field(
        default=50_000,
        ge=1,
        description="SINK_MAX_BATCH_ROWS of the S3 archive: fewer, larger Parquet objects.",
    )

    # --- store sinks ---------------------------------------------------------------------
    sink_max_batch_rows: int = Field(
        default=5000, ge=1, description="A sink partition flushes once it holds this many rows."
    )
    sink_linger_s: float = Field(
        default=1.0, ge=0, description="...or when its oldest buffered row is this old."
    )
    sink_retries: int = Field(
        default=3, ge=0, description="Quick retries of a transient failure before backpressure."
    )
    sink_backoff_s: float = Field(default=0.2, gt=0, description="First retry delay.")
    sink_backoff_max_s: float = Field(
        default=30.0, gt=0, description="Cap of the retry delay while a server stays down."
    )
    sink_write_ahead: int = Field(
        default=2,
        ge=0,
        description="Flushes a sink partition may queue for its writer thread (0: no thread).",
    )

    # --- metrics and logging (dataflows/metrics.py, dataflows/logging.py) ---------------
    metrics_enabled: bool = Field(
        default=True, description="Serve the pipeline's Prometheus metrics over HTTP."
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address the metrics endpoint binds; 0.0.0.0 in a pod."
    )
    metrics_port: int = Field(default=9464, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("pipeline_input")
    @classmethod
    def _check_input(cls, value: str) -> str:
        if value != "kafka" and not value.startswith("file:"):
            raise ValueError(f"PIPELINE_INPUT must be 'kafka' or 'file:<path>', got {value!r}")
        return value

    @field_validator("pipeline_sinks")
    @classmethod
    def _check_sinks(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = sorted(set(names) - set(SINK_NAMES))
        if unknown or not names:
            raise ValueError(
                f"PIPELINE_SINKS must be a comma list of {', '.join(SINK_NAMES)}; "
                f"unknown: {', '.join(unknown) or '(empty)'}"
            )
        return ",".join(names)

    @cached_property
    def sinks(self) -> frozenset[str]:
        return frozenset(self.pipeline_sinks.split(","))

    @property
    def input_path(self) -> Path | None:
        """The JSON Lines file to read, or None for Kafka input."""
        return Path(self.pipeline_input[len("file:") :]) if self.pipeline_input != "kafka" else None
