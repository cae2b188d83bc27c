"""Shared fixtures. One real Kafka broker (KRaft, from Maven Central jars) per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
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
    broker = LocalKafka.on_free_ports(
        tmp_path_factory.mktemp("kafka"), cache_dir=Settings().cache_dir, heap="384m"
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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private ``redis-server`` on a free port for the session (the Redis online store).

    Skips the Redis variants with the reason when the binary is absent; ``./run test``
    installs Debian's redis-server where it can.
    """
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "no",
            "--save",
            "",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def online_store_settings(request: pytest.FixtureRequest, kafka_settings: Settings) -> Settings:
    """``kafka_settings`` with each online store in turn (Redis flushed for the test)."""
    if request.param == "sqlite":
        return kafka_settings
    import redis

    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return kafka_settings.model_copy(update={"online_store": "redis", "redis_url": url})


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module: models this small gain nothing from a second one,
    and on a shared 2-core machine two spinning threads per process slow everything down."""
    import torch  # only the modules that ask for this fixture pay for the import

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
