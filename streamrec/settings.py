"""All configuration in one place, read from ``STREAMREC_*`` environment variables.

Every process of the stack (API, workers, CLI, trainer) builds one :class:`Settings` and
passes it down; nothing else reads the environment. Each field documents itself so that
``streamrec config`` can print the table of variables an operator may set.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamrec"


class Settings(BaseSettings):
    """Configuration of every streamrec process.

    Examples
    --------
    >>> s = Settings(kafka_bootstrap="broker:9092")
    >>> s.kafka_bootstrap, s.topic_events, s.dlq_topic("events")
    ('broker:9092', 'events', 'events.dlq')
    """

    model_config = SettingsConfigDict(env_prefix="STREAMREC_", extra="ignore")

    # --- Kafka -------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma separated."
    )
    topic_events: str = Field("events", description="User actions, keyed by user_id.")
    topic_items: str = Field("items", description="Catalog records, keyed by item_id.")
    topic_impressions: str = Field(
        "impressions", description="What serving showed, with request_id."
    )
    dlq_suffix: str = Field(".dlq", description="Suffix of each topic's dead-letter topic.")
    topic_partitions: int = Field(4, ge=1, description="Partitions of topics streamrec creates.")
    consumer_batch_size: int = Field(
        2000, ge=1, description="Max records a worker handles per batch."
    )
    consumer_poll_timeout_ms: int = Field(500, ge=1, description="Poll wait when idle.")
    producer_linger_ms: int = Field(5, ge=0, description="Producer batching delay.")
    producer_max_block_ms: int = Field(
        5000, ge=100, description="How long a send may block when the broker is unreachable."
    )

    archiver_group: str = Field("archiver", description="Consumer group of the archiver.")
    feature_writer_group: str = Field(
        "feature-writer", description="Consumer group of the feature writer."
    )

    feature_allowed_lateness_s: float = Field(
        600.0,
        gt=0,
        description="Events older than an entity's newest by more than this are too late "
        "for real-time features (still archived). Dedup memory grows with it.",
    )
    feature_flush_interval_ms: float = Field(
        200.0,
        ge=0,
        description="Under load, the feature writer writes each changed entity at most once "
        "per interval (coalescing); idle input is written at once.",
    )
    feature_item_flush_interval_ms: float = Field(
        1000.0,
        ge=0,
        description="The same for item rows (an impression touches many items; their "
        "hour/day counts move slowly).",
    )
    feature_snapshot_interval_s: float = Field(
        30.0,
        gt=0,
        description="How often the feature writer persists state + offsets (bounds replay).",
    )

    metrics_port: int = Field(
        0, ge=0, description="Port of a worker's Prometheus /metrics endpoint (0: off)."
    )

    # --- Local broker (`streamrec kafka up`) ---------------------------------------------
    kafka_local_port: int = Field(9092, description="Client port of the local broker.")
    kafka_local_controller_port: int = Field(
        9093, description="KRaft controller port of the local broker."
    )
    kafka_local_heap: str = Field("512m", description="JVM heap of the local broker.")
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Downloaded jars and other reusable artefacts.",
    )
    home: Path = Field(
        Path(".streamrec"),
        description="Runtime state: local broker data and logs, feature store, models.",
    )

    # --- Feature store (Feast) ------------------------------------------------------------
    online_store: Literal["sqlite", "redis"] = Field(
        "sqlite",
        description="Feast online store: `sqlite` (a file under the home) or `redis`.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis of the online store when online_store=redis "
        "(redis://[:password@]host:port/db, rediss:// for TLS).",
    )

    # --- Event contract -----------------------------------------------------------------
    max_future_skew_s: float = Field(
        300.0, ge=0, description="Events stamped further in the future are rejected."
    )

    # --- API ----------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Interface the API binds to.")
    api_port: int = Field(8000, description="Port the API listens on.")
    api_max_batch: int = Field(1000, ge=1, description="Max events per POST /v1/events.")
    api_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Max request body size in bytes."
    )
    api_retry_after_s: int = Field(
        5, ge=1, description="Retry-After sent with 503 when Kafka is unreachable."
    )
    api_kafka_max_block_ms: int = Field(
        2000,
        ge=100,
        description="How long the API waits to reach Kafka (bootstrap, topic metadata) "
        "before answering 503.",
    )
    api_kafka_ack_timeout_ms: int = Field(
        5000,
        ge=1000,
        description="How long the API waits for Kafka to acknowledge a batch before "
        "reporting its records as failed (503).",
    )

    # --- Batch jobs (Spark) ---------------------------------------------------------------
    spark_master: str = Field(
        "local[*]",
        description="Spark master of the batch jobs: local[*] (this machine, all cores), "
        "spark://host:7077, yarn, ...",
    )
    spark_driver_memory: str = Field(
        "2g", description="JVM heap of the Spark driver (all of a local run's memory)."
    )

    # --- Training and evaluation ----------------------------------------------------------
    torch_threads: int = Field(
        0, ge=0,
        description="CPU threads of PyTorch training and inference (0: one per core). "
        "Fewer than the cores helps when other processes share the machine.",
    )

    def dlq_topic(self, topic: str) -> str:
        """Name of the dead-letter topic that belongs to ``topic``."""
        return f"{topic}{self.dlq_suffix}"

    @property
    def kafka_home(self) -> Path:
        """Data and logs of the local broker."""
        return self.home / "kafka"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
