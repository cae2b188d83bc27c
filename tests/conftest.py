"""Shared fixtures. One real Kafka broker (KRaft, from Maven Central jars) per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaming.broker import LocalKafka, free_port
from streamrec.settings import Settings


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A real single-node broker on free loopback ports, stopped when the session ends.

    ``STREAMREC_TEST_KAFKA=host:port`` points the suite at an existing broker instead.
    """
    external = os.environ.get("STREAMREC_TEST_KAFKA")
    if external:
        port = external.rsplit(":", 1)[1]
        yield LocalKafka(home=tmp_path_factory.mktemp("kafka-ext"), port=int(port))
        return
    broker = LocalKafka(
        home=tmp_path_factory.mktemp("kafka"),
        port=free_port(),
        controller_port=free_port(),
        cache_dir=Settings().cache_dir,
        heap="384m",
        partitions=4,
    )
    broker.start(quiet=True)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_settings(kafka_broker: LocalKafka, tmp_path: Path) -> Settings:
    """Settings pointing at the session broker, with topic names unique to this test.

    Unique topics keep tests independent while sharing one broker.
    """
    suffix = uuid.uuid4().hex[:8]
    return Settings(
        kafka_bootstrap=kafka_broker.bootstrap,
        topic_events=f"events-{suffix}",
        topic_items=f"items-{suffix}",
        topic_impressions=f"impressions-{suffix}",
        home=tmp_path / "streamrec",
    )
