"""The archiver writes every valid event once, even when it is SIGKILLed mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from kafka import TopicPartition

from streaming.archiver import (
    EVENT_SCHEMA,
    Archiver,
    archived_positions,
    event_rows,
    events_dir,
    impressions_dir,
    load_catalog,
    part_name,
)
from streaming.consumer import Message
from streaming.producer import EventProducer
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, Item, parse_event
from streamrec.settings import Settings


def _events(n: int, start: datetime, offset: int = 0) -> list[Event]:
    return [
        parse_event({
            "event_id": str(uuid.uuid4()),
            "event_type": ["view", "click", "add_to_cart", "purchase"][i % 4],
            "user_id": f"u{i % 37}", "item_id": f"i{i % 101}",
            # Spread over three hours so files land in several hour folders.
            "ts": (start + timedelta(seconds=(i + offset) % 10_800)).isoformat(),
            "context": {"device": "mobile", "country": "DE", "ab": i % 3},
        })
        for i in range(n)
    ]


def _impressions(n: int, start: datetime, offset: int) -> list[Event]:
    """What serving logs: one slate per request, on the ``impressions`` topic."""
    return [
        parse_event({
            "event_id": str(uuid.uuid4()),
            "event_type": "impression",
            "user_id": f"u{i % 37}", "items": [f"i{(i + j) % 101}" for j in range(5)],
            "request_id": f"r{offset + i}",
            "ts": (start + timedelta(seconds=(i + offset) % 10_800)).isoformat(),
        })
        for i in range(n)
    ]


def _read_ids(root: Path) -> list[str]:
    # The folder exists (manifests, hour folders) before its first part file is renamed in.
    if not root.exists() or next(root.rglob("part-*.parquet"), None) is None:
        return []
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table(columns=["event_id"])
    return table.column("event_id").to_pylist()


def test_part_files_record_their_offsets_and_resume_after_the_highest(tmp_path: Path) -> None:
    start = datetime(2026, 1, 1, 22, tzinfo=UTC)
    archiver = Archiver(tmp_path, EVENT_SCHEMA, event_rows, partition_by_hour=True)
    evs = _events(10, start)
    batch = [Message(e, "events", 2, 100 + i, None, e.to_json(), 0) for i, e in enumerate(evs)]
    archiver.write(batch)
    assert archived_positions(tmp_path) == {2: 110}
    assert archiver.resume_positions({TopicPartition("events", 2), TopicPartition("events", 0)}) \
        == {TopicPartition("events", 2): 110}
    # Rewriting the same batch (a re-delivery) replaces the files instead of adding rows.
    archiver.write(batch)
    assert sorted(_read_ids(tmp_path)) == sorted(e.event_id for e in evs)
    assert (tmp_path / "date=2026-01-01" / "hour=22" / part_name(2, 100, 109)).exists()


def test_files_of_a_batch_without_manifest_are_removed_on_resume(tmp_path: Path) -> None:
    start = datetime(2026, 1, 1, 22, 59, 55, tzinfo=UTC)  # the batch spans two hour folders
    archiver = Archiver(tmp_path, EVENT_SCHEMA, event_rows, partition_by_hour=True)
    evs = _events(20, start)
    first = [Message(e, "events", 0, i, None, e.to_json(), 0) for i, e in enumerate(evs[:10])]
    archiver.write(first)
    # A crash after one hour file of the next batch was renamed into place, before its
    # manifest: that file must not survive the restart, or its rows would be duplicated.
    second = [Message(e, "events", 0, 10 + i, None, e.to_json(), 0)
              for i, e in enumerate(evs[10:])]
    orphan = tmp_path / "date=2026-01-01" / "hour=23" / part_name(0, 10, 19)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"partial")
    assert archiver.resume_positions({TopicPartition("events", 0)}) \
        == {TopicPartition("events", 0): 10}
    assert not orphan.exists()
    archiver.write(second)
    assert sorted(_read_ids(tmp_path)) == sorted(e.event_id for e in evs)


@pytest.mark.kafka
def test_sigkilled_archiver_restarts_without_loss_or_duplicates(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    settings = kafka_settings
    ensure_topics(settings.kafka_bootstrap, stream_topics(settings), 4)
    start = datetime.now(UTC) - timedelta(hours=4)
    produced: list[Event] = []
    served: list[Event] = []
    done = threading.Event()

    def produce() -> None:
        with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                           settings.topic_items) as producer, EventProducer(
                               settings.kafka_bootstrap, settings.topic_impressions,
                               settings.topic_items) as impressions:
            producer.send_item(Item(item_id="i1", title="Trail shoe", category="Shoes",
                                    price=99.0, created_at=start))
            for k in range(25):
                chunk = _events(1_000, start, offset=k * 1_000)
                producer.send_many(chunk)
                slates = _impressions(40, start, offset=k * 40)
                impressions.send_many(slates)
                producer.flush(timeout=120)  # generous: CI boxes can be busy
                impressions.flush(timeout=120)
                produced.extend(chunk)
                served.extend(slates)
                time.sleep(0.15)
            producer.send_item(Item(item_id="i1", title="Trail shoe v2", category="Shoes",
                                    price=89.0, created_at=start))
        done.set()

    env = {
        **os.environ,
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMREC_TOPIC_EVENTS": settings.topic_events,
        "STREAMREC_TOPIC_ITEMS": settings.topic_items,
        "STREAMREC_TOPIC_IMPRESSIONS": settings.topic_impressions,
        "STREAMREC_HOME": str(settings.home),
        "STREAMREC_CONSUMER_BATCH_SIZE": "700",
    }
    cmd = [sys.executable, "-m", "streamrec", "worker", "archiver"]
    producer = threading.Thread(target=produce)
    producer.start()
    root = events_dir(settings)
    for _ in range(4):  # kill it repeatedly while events stream in
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        seen = len(_read_ids(root))
        deadline = time.monotonic() + 40
        while len(_read_ids(root)) < seen + 2_000 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    producer.join(timeout=120)
    assert done.is_set()
    final = subprocess.run([*cmd, "--max-idle-s", "6"], env=env, capture_output=True,
                           text=True, timeout=180)
    assert final.returncode == 0, final.stderr[-2000:]

    ids = _read_ids(root)
    assert len(ids) == len(produced) == 25_000
    assert set(ids) == {e.event_id for e in produced}
    served_ids = _read_ids(impressions_dir(settings))
    assert len(served_ids) == len(served) == 1_000
    assert set(served_ids) == {e.event_id for e in served}
    catalog = load_catalog(settings).to_pylist()
    assert [(r["item_id"], r["title"], r["price"]) for r in catalog] == [
        ("i1", "Trail shoe v2", 89.0)
    ]
