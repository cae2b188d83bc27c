"""The feature writer against a real broker and a real Feast store: exact, crash-safe, fresh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from features.definitions import ITEM_VIEW, USER_VIEW
from features.realtime import RealtimeFeatureEngine
from features.store import RANKER_SERVICE, OnlineFeatureReader, apply_repo, feature_store
from streaming.feature_writer import read_snapshot, snapshot_path
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, EventType, Item
from streamrec.settings import Settings

pytestmark = pytest.mark.kafka


def _records(n: int, seed: int = 3) -> list[Event | Item]:
    cfg = SimulatorConfig(seed=seed, n_users=400, n_items=600,
                          start=datetime.now(UTC) - timedelta(days=30))
    return list(Simulator(cfg).events(n))


def _reference(records: list[Event | Item], lateness: timedelta) -> RealtimeFeatureEngine:
    engine = RealtimeFeatureEngine(allowed_lateness=lateness)
    for r in records:
        if isinstance(r, Item):
            engine.catalog_update(r)
    engine.apply([r for r in records if isinstance(r, Event)])
    return engine


def _assert_online_equals(settings: Settings, engine: RealtimeFeatureEngine,
                          records: list[Event | Item]) -> None:
    users = sorted({r.user_id for r in records if isinstance(r, Event)})
    items = sorted({i for r in records if isinstance(r, Event) for i in r.shown_items})
    reader = OnlineFeatureReader(settings)
    try:
        for view, keys, row_of in [(USER_VIEW, users, engine.user_row),
                                   (ITEM_VIEW, items, engine.item_row)]:
            refs = [f"{view.name}:{n}" for n in view.names]
            got = reader.read(refs, {view.join_key: keys})
            mismatches = []
            for i, key in enumerate(keys):
                want = row_of(key)
                for name in view.names:
                    value = got[name][i]
                    expected = want[name]
                    if hasattr(value, "tolist"):
                        value = value.tolist()
                    if isinstance(expected, float):
                        ok = value is not None and abs(value - expected) < 1e-9
                    else:
                        ok = value == expected
                    if not ok:
                        mismatches.append((view.name, key, name, value, expected))
            assert not mismatches, mismatches[:5]
    finally:
        reader.close()


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMREC_TOPIC_EVENTS": settings.topic_events,
        "STREAMREC_TOPIC_ITEMS": settings.topic_items,
        "STREAMREC_HOME": str(settings.home),
        "STREAMREC_FEATURE_BATCH_SIZE": "1000",
        "STREAMREC_FEATURE_SNAPSHOT_INTERVAL_S": "1.5",
        "STREAMREC_ONLINE_STORE": settings.online_store,
        "STREAMREC_REDIS_URL": settings.redis_url,
    }


def test_sigkilled_feature_writer_ends_with_exactly_the_reference_features(
    online_store_settings: Settings,
) -> None:
    settings = online_store_settings
    ensure_topics(settings.kafka_bootstrap, stream_topics(settings), 4)
    apply_repo(settings)
    records = _records(50_000)
    done = threading.Event()

    def produce() -> None:
        with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                           settings.topic_items) as producer:
            for start in range(0, len(records), 2_500):
                producer.send_many(records[start:start + 2_500])
                producer.flush(timeout=120)  # generous: CI boxes can be busy
                time.sleep(0.2)
        done.set()

    env = _env(settings)
    cmd = [sys.executable, "-m", "streamrec", "worker", "features"]
    feeder = threading.Thread(target=produce)
    feeder.start()
    snap = snapshot_path(settings)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        before = read_snapshot(snap)
        seq = before[0] if before else 0
        deadline = time.monotonic() + 60
        # Kill only after it made progress (a newer snapshot) and then some more.
        while time.monotonic() < deadline:
            now = read_snapshot(snap)
            if now and now[0] > seq:
                break
            time.sleep(0.1)
        time.sleep(0.7)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        kills += 1
    feeder.join(timeout=180)
    assert done.is_set()
    final = subprocess.run([*cmd, "--max-idle-s", "8"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]

    reference = _reference(records, timedelta(seconds=settings.feature_allowed_lateness_s))
    _assert_online_equals(settings, reference, records)
    assert kills == 4


def test_events_become_readable_through_the_feature_service_within_seconds(
    online_store_settings: Settings,
) -> None:
    from streaming.feature_writer import FeatureWriter

    settings = online_store_settings
    ensure_topics(settings.kafka_bootstrap, stream_topics(settings), 4)
    apply_repo(settings)
    writer = FeatureWriter(settings, snapshot_interval_s=3600)
    consumer = writer.consumer()
    worker = threading.Thread(target=writer.run,
                              kwargs={"install_signals": False, "consumer": consumer})
    worker.start()
    reader = OnlineFeatureReader(settings)
    try:
        sim = Simulator(SimulatorConfig(seed=5, n_users=50, n_items=80, live=True))
        records = list(sim.events(300))
        with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                           settings.topic_items) as producer:
            producer.send_many(records)
        last = [r for r in records if isinstance(r, Event)][-1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = reader.read([f"{USER_VIEW.name}:last_event_ts"],
                              {USER_VIEW.join_key: [last.user_id]})
            if got["last_event_ts"][0] is not None and \
                    abs(got["last_event_ts"][0] - last.ts.timestamp()) < 1e-3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the newest event never became readable online")
        lag_s = datetime.now(UTC).timestamp() - last.ts.timestamp()
        assert lag_s < 5  # generous bound for a loaded CI box; the benchmark measures p99
        # Item rows follow within their own, longer interval.
        item = last.shown_items[0]
        deadline = time.monotonic() + 10
        while reader.read([f"{ITEM_VIEW.name}:views_24h"],
                          {ITEM_VIEW.join_key: [item]})["views_24h"][0] is None:
            assert time.monotonic() < deadline, "the item row never became readable online"
            time.sleep(0.05)
        # The same rows through Feast's public API and the feature service the ranker reads.
        store = feature_store(settings)
        online = store.get_online_features(
            features=store.get_feature_service(RANKER_SERVICE),
            entity_rows=[{USER_VIEW.join_key: last.user_id, ITEM_VIEW.join_key: item}],
            full_feature_names=True,
        ).to_dict()
        assert online[f"{USER_VIEW.name}__last_event_ts"][0] == pytest.approx(last.ts.timestamp())
        assert online[f"{ITEM_VIEW.name}__views_24h"][0] is not None
    finally:
        consumer.stop()
        worker.join(timeout=60)
        reader.close()
    assert writer.stats.events == sum(isinstance(r, Event) for r in records)
    assert read_snapshot(snapshot_path(settings)) is not None  # written on shutdown


def test_a_writer_behind_its_input_writes_each_entity_less_often_to_the_same_end(
    kafka_settings: Settings,
) -> None:
    """Backlog coalescing (flush intervals stretched when far behind) changes when, not what."""
    from streaming.feature_writer import FeatureWriter

    ensure_topics(kafka_settings.kafka_bootstrap, stream_topics(kafka_settings), 4)
    records = _records(30_000, seed=8)
    with EventProducer(kafka_settings.kafka_bootstrap, kafka_settings.topic_events,
                       kafka_settings.topic_items) as producer:
        producer.send_many(records)
    n = sum(isinstance(r, Event) for r in records)
    rows = {}
    # "steady" never stretches; "stretched" does whenever it is half a second behind, which
    # a 30k-event backlog keeps it on any machine.
    for name, backlog_ms in [("steady", 0.0), ("stretched", 500.0)]:
        settings = kafka_settings.model_copy(update={
            "home": kafka_settings.home / name,
            "feature_writer_group": f"fw-{name}",
            "feature_backlog_flush_interval_ms": backlog_ms,
            # Batches much shorter than the stretched interval, so that it shows.
            "feature_batch_size": 1_000,
        })
        apply_repo(settings)
        writer = FeatureWriter(settings, snapshot_interval_s=3600)
        consumer = writer.consumer()
        consumer.run(until=lambda w=writer: w.stats.events >= n)
        writer.flush()
        writer.writer.close()
        assert writer.stats.events == n
        rows[name] = writer.stats.user_rows + writer.stats.item_rows
        reference = _reference(records, timedelta(seconds=settings.feature_allowed_lateness_s))
        _assert_online_equals(settings, reference, records)
    assert rows["stretched"] < rows["steady"], rows


def test_impressions_the_api_served_move_item_impression_counts_online(
    kafka_settings: Settings,
) -> None:
    """Served impressions travel on their own topic; the stream must count them as Spark's
    event log does, or item impressions and CTR differ between training and serving."""
    from streaming.feature_writer import FeatureWriter

    settings = kafka_settings
    ensure_topics(settings.kafka_bootstrap, stream_topics(settings), 2)
    apply_repo(settings)
    records = _records(3_000, seed=9)
    shown = [r for r in records if isinstance(r, Event) and r.event_type is EventType.IMPRESSION]
    served = {e.event_id for e in shown[::2]}  # half of the slates came from the API
    assert served
    with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                       settings.topic_items) as producer:
        producer.send_many([r for r in records
                            if not (isinstance(r, Event) and r.event_id in served)])
    with EventProducer(settings.kafka_bootstrap, settings.topic_impressions) as producer:
        producer.send_many([e for e in shown if e.event_id in served])

    writer = FeatureWriter(settings, snapshot_interval_s=3600)
    n = sum(isinstance(r, Event) for r in records)
    writer.consumer().run(max_idle_s=10, until=lambda: writer.stats.events >= n)
    writer.flush()
    writer.writer.close()
    assert writer.stats.events == n

    lateness = timedelta(seconds=settings.feature_allowed_lateness_s)
    reference = _reference(records, lateness)
    _assert_online_equals(settings, reference, records)
    # The served slates are what moves these counts: without them they would differ.
    client_only = _reference([r for r in records
                              if not (isinstance(r, Event) and r.event_id in served)], lateness)
    items = {i for e in shown if e.event_id in served for i in e.shown_items}
    assert any(
        reference.item_row(i)["impressions_24h"]
        > (client_only.item_row(i)["impressions_24h"] if i in client_only.items else 0)
        for i in items
    )
