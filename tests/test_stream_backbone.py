"""The event backbone against a real broker: produce → consume, DLQ, crashes, shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError

from streaming.broker import free_port
from streaming.consumer import Failure, Message, StreamConsumer
from streaming.dlq import read_dlq
from streaming.producer import DeliveryError, EventProducer
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, parse_event
from streamrec.settings import Settings

pytestmark = pytest.mark.kafka
WORKER = Path(__file__).parent / "workers" / "record_ids.py"


def make_events(n: int, users: int = 50) -> list[Event]:
    t0 = datetime.now(UTC) - timedelta(hours=1)
    return [
        parse_event({
            "event_id": str(uuid.uuid4()), "event_type": "view", "user_id": f"u{i % users}",
            "item_id": f"i{i % 97}", "ts": (t0 + timedelta(milliseconds=i)).isoformat(),
        })
        for i in range(n)
    ]


def produce(settings: Settings, events: list[Event]) -> None:
    with EventProducer(settings.kafka_bootstrap, settings.topic_events) as producer:
        producer.send_many(events)


def collect(settings: Settings, group: str, expected: int, timeout_s: float = 60) -> list[str]:
    seen: list[str] = []

    def handle(batch: list[Message[Event]]) -> list[Failure]:
        seen.extend(m.value.event_id for m in batch)
        return []

    consumer = StreamConsumer(settings, [settings.topic_events], group, parse_event, handle)
    deadline = time.monotonic() + timeout_s
    consumer.run(until=lambda: len(seen) >= expected or time.monotonic() > deadline)
    return seen


@pytest.fixture
def topics(kafka_settings: Settings) -> Settings:
    ensure_topics(kafka_settings.kafka_bootstrap, stream_topics(kafka_settings), 4)
    return kafka_settings


def test_round_trip_10k_events_nothing_lost(topics: Settings) -> None:
    events = make_events(10_000)
    produce(topics, events)
    seen = collect(topics, "roundtrip", 10_000)
    assert len(seen) == 10_000
    assert set(seen) == {e.event_id for e in events}


def test_records_behind_is_what_the_broker_holds_beyond_the_polled_position(
    topics: Settings,
) -> None:
    produce(topics, make_events(3_000))
    behind: list[tuple[int, int]] = []
    seen: list[int] = []

    def handle(batch: list[Message[Event]]) -> list[Failure]:
        seen.append(len(batch))
        behind.append((consumer.records_behind(), consumer.records_behind(["elsewhere"])))
        return []

    settings = topics.model_copy(update={"consumer_batch_size": 500})
    consumer = StreamConsumer(settings, [settings.topic_events], "behind", parse_event, handle)
    consumer.run(until=lambda: sum(seen) >= 3_000)
    # Each batch leaves exactly the rest of the log behind, as of the last fetch, which
    # may not have covered every partition yet; other topics hold nothing of it.
    assert all(0 <= b <= 3_000 - done and other == 0
               for (b, other), done in zip(behind, accumulate(seen), strict=True))
    assert behind[-1][0] == 0 and max(b for b, _ in behind) > 0


def test_records_are_keyed_by_user_so_a_user_stays_on_one_partition(topics: Settings) -> None:
    events = make_events(400, users=7)
    with EventProducer(topics.kafka_bootstrap, topics.topic_events) as producer:
        futures = [(e.user_id, producer.send(e)) for e in events]
    partitions: dict[str, set[int]] = {}
    for user, fut in futures:
        partitions.setdefault(user, set()).add(fut.get(timeout=10).partition)
    assert all(len(p) == 1 for p in partitions.values())


def test_invalid_records_go_to_the_dlq_with_a_reason_and_valid_ones_flow(
    topics: Settings,
) -> None:
    valid = make_events(300)
    future_ts = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    bad = [
        b"not json at all",
        json.dumps({"event_id": str(uuid.uuid4()), "event_type": "teleport", "user_id": "u1",
                    "item_id": "i1", "ts": "2026-01-01T00:00:00Z"}).encode(),
        json.dumps({"event_id": str(uuid.uuid4()), "event_type": "view", "user_id": "u1",
                    "item_id": "i1", "ts": "2026-01-01T00:00:00"}).encode(),
        json.dumps({"event_id": str(uuid.uuid4()), "event_type": "view", "user_id": "u1",
                    "item_id": "i1", "ts": future_ts}).encode(),
    ]
    raw = KafkaProducer(bootstrap_servers=topics.kafka_bootstrap, acks="all")
    for i, e in enumerate(valid):
        raw.send(topics.topic_events, key=e.user_id.encode(), value=e.to_json())
        if i % 100 == 0:
            raw.send(topics.topic_events, key=b"u1", value=bad[i // 100])
    raw.send(topics.topic_events, key=b"u1", value=bad[3])
    raw.flush()
    raw.close()

    seen = collect(topics, "dlq-test", 300)
    assert set(seen) == {e.event_id for e in valid}

    dead = read_dlq(topics, topics.topic_events, limit=10)
    assert sorted(d["value"] for d in dead) == sorted(b.decode() for b in bad)
    reasons = {d["value"]: d["error"] for d in dead}
    assert "Invalid JSON" in reasons[bad[0].decode()]
    assert "event_type" in reasons[bad[1].decode()]
    assert "zone" in reasons[bad[2].decode()]
    assert "in the future" in reasons[bad[3].decode()]
    for d in dead:
        assert d["error.type"] == "validation"
        assert d["source.topic"] == topics.topic_events
        assert int(d["source.offset"]) >= 0


def test_a_poison_record_is_isolated_after_retries_and_the_rest_is_handled(
    topics: Settings,
) -> None:
    events = make_events(200)
    poison = events[57].event_id
    produce(topics, events)
    handled: list[str] = []

    def handle(batch: list[Message[Event]]) -> list[Failure]:
        if any(m.value.event_id == poison for m in batch):
            raise RuntimeError("feature store rejected the row")
        handled.extend(m.value.event_id for m in batch)
        return []

    consumer = StreamConsumer(topics, [topics.topic_events], "poison", parse_event, handle,
                              max_retries=2, backoff_s=0.01)
    consumer.run(until=lambda: len(handled) >= 199, max_idle_s=10)
    assert set(handled) == {e.event_id for e in events} - {poison}
    dead = read_dlq(topics, topics.topic_events)
    assert len(dead) == 1
    assert dead[0]["error.type"] == "handler"
    assert "feature store rejected the row" in dead[0]["error"]
    assert parse_event(dead[0]["value"]).event_id == poison


def test_broker_side_rejections_surface_as_delivery_errors(topics: Settings) -> None:
    admin = KafkaAdminClient(bootstrap_servers=topics.kafka_bootstrap)
    tiny = f"{topics.topic_events}-tiny"
    admin.create_topics([NewTopic(tiny, 1, 1, topic_configs={"max.message.bytes": "64"})])
    admin.close()
    event = make_events(1)[0]
    with pytest.raises(DeliveryError) as err, EventProducer(topics.kafka_bootstrap, tiny) as p:
        p.send(event)
    assert err.value.failures[0][0] == event


def test_an_unreachable_broker_is_reported_not_swallowed() -> None:
    started = time.monotonic()
    with pytest.raises(KafkaTimeoutError):
        EventProducer(f"127.0.0.1:{free_port()}", max_block_ms=500)
    assert time.monotonic() - started < 5


def _start_worker(settings: Settings, group: str, out: Path, delay: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), settings.kafka_bootstrap, settings.topic_events, group,
         str(out), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigkill_mid_batch_then_restart_loses_nothing(topics: Settings, tmp_path: Path) -> None:
    events = make_events(6_000)
    produce(topics, events)
    out = tmp_path / "handled.txt"
    kills = 0
    for _ in range(2):
        proc = _start_worker(topics, "crashy", out, delay=0.2)
        before = len(_lines(out))
        deadline = time.monotonic() + 60
        while len(_lines(out)) < before + 1_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-stream: handled but maybe not committed
        proc.wait(timeout=10)
        kills += 1
    proc = _start_worker(topics, "crashy", out, delay=0.0)
    deadline = time.monotonic() + 90
    expected = {e.event_id for e in events}
    while not expected <= set(_lines(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    handled = _lines(out)
    assert set(handled) == expected  # nothing lost
    redelivered = sum(c - 1 for c in Counter(handled).values())
    # At-least-once: only records handled but not yet committed are seen again.
    assert redelivered <= kills * 4 * 500


def test_sigterm_finishes_the_batch_commits_and_exits_cleanly(
    topics: Settings, tmp_path: Path
) -> None:
    events = make_events(3_000)
    produce(topics, events)
    out = tmp_path / "handled.txt"
    proc = _start_worker(topics, "graceful", out, delay=0.3)
    deadline = time.monotonic() + 30
    while len(_lines(out)) < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout
    first_run = _lines(out)
    # A restart continues exactly after the committed batch: no record is seen twice.
    proc = _start_worker(topics, "graceful", out, delay=0.0)
    deadline = time.monotonic() + 60
    while len(set(_lines(out))) < 3_000 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    handled = _lines(out)
    assert len(first_run) >= 500
    assert len(handled) == 3_000 == len(set(handled))


def test_kafka_status_exits_zero_only_when_the_broker_answers(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from streamrec.cli import app
    from streamrec.settings import get_settings

    runner = CliRunner()
    for bootstrap, code in [(kafka_settings.kafka_bootstrap, 0), (f"127.0.0.1:{free_port()}", 1)]:
        monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", bootstrap)
        get_settings.cache_clear()
        assert runner.invoke(app, ["kafka", "status"]).exit_code == code
    get_settings.cache_clear()
