"""``streamrec backfill``: archived events → an emptied online store → the reference features."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from typer.testing import CliRunner, Result

from features import reference
from features.backfill import archived_hours, backfill
from features.definitions import ITEM_VIEW, USER_VIEW, epoch_us
from features.store import OnlineFeatureReader, OnlineFeatureWriter, apply_repo
from streaming.archiver import event_log_dirs, run_archiver
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics, stream_topics
from streamrec.cli import app
from streamrec.contract import Event, EventType, Item
from streamrec.settings import Settings, get_settings

Row = Mapping[str, Any]


def _ready_topics(settings: Settings, partitions: int) -> None:
    """Create the topics and wait for their leaders (a busy broker elects them late)."""
    topics = stream_topics(settings)
    ensure_topics(settings.kafka_bootstrap, topics, partitions)
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","))
    try:
        admin.wait_for_topics(topics, timeout_ms=30_000)
    finally:
        admin.close()


def _archived_stream(settings: Settings) -> tuple[list[Event], dict[str, str]]:
    """Six simulated days of traffic (all in the past), with producer retries and very late
    events, archived; half of the impressions come as the API logs them, on their own topic.

    Returns the events in the order they were produced and the catalog's categories.
    """
    sim = Simulator(SimulatorConfig(seed=11, n_users=120, n_items=200,
                                    start=datetime.now(UTC) - timedelta(days=10)))
    records = list(sim.events(5_000))
    events = [r for r in records if isinstance(r, Event)]
    # Five early events arrive last (days late: the stream would reject them as too late),
    # and five are delivered twice, as a producer retry does.
    late, on_time = events[10:15], events[:10] + events[15:]
    arrival = [*on_time, *late, *events[100:105]]
    items = [r for r in records if isinstance(r, Item)]
    _ready_topics(settings, 2)
    shown = [e.event_id for e in events if e.event_type is EventType.IMPRESSION]
    served = set(shown[::2])
    with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                       settings.topic_items) as producer:
        producer.send_many([*items, *(e for e in arrival if e.event_id not in served)])
    with EventProducer(settings.kafka_bootstrap, settings.topic_impressions) as producer:
        producer.send_many([e for e in arrival if e.event_id in served])
    archived = 0
    deadline = time.monotonic() + 120
    while archived < len(arrival):  # a busy broker may pause a run longer than its idle limit
        assert time.monotonic() < deadline, f"archived {archived} of {len(arrival)} events"
        run = run_archiver(settings, max_idle_s=3.0, batch_wait_s=0.5)
        archived += run["event_rows"] + run["impression_rows"]
    assert archived == len(arrival)
    return arrival, {i.item_id: i.category for i in items}


def _expected(events: Sequence[Event], categories: dict[str, str]) -> tuple[dict, dict]:
    """The oracle's rows over the log in event-time order, what a backfill promises."""
    ordered = sorted(events, key=lambda e: (epoch_us(e.ts), e.event_id))
    verdict = reference.accept(ordered)
    users = {u: reference.user_row(u, evs, categories.get) for u, evs in verdict.users.items()}
    items = {i: reference.item_row(i, evs) for i, evs in verdict.items.items()}
    return users, items


def _mismatches(settings: Settings, view: Any, want: dict[str, Row]) -> list[tuple]:
    reader = OnlineFeatureReader(settings)
    try:
        keys = sorted(want)
        got = reader.read([f"{view.name}:{n}" for n in view.names], {view.join_key: keys})
    finally:
        reader.close()
    out = []
    for i, key in enumerate(keys):
        for name in view.names:
            value, expected = got[name][i], want[key][name]
            if hasattr(value, "tolist"):
                value = value.tolist()
            ok = (value is not None and abs(value - expected) < 1e-9
                  if isinstance(expected, float) else value == expected)
            if not ok:
                out.append((key, name, value, expected))
    return out


def _row_with(row: Row, **changes: Any) -> dict[str, Any]:
    return {**row, **changes}


@pytest.mark.kafka
def test_backfill_rebuilds_an_emptied_online_store_to_the_reference(
    online_store_settings: Settings,
) -> None:
    settings = online_store_settings
    apply_repo(settings)  # a fresh, empty online store: everything was lost
    arrival, categories = _archived_stream(settings)
    stream_verdict = reference.accept(arrival)
    assert reference.TOO_LATE in stream_verdict.user_status  # what the stream would drop

    # As of the first day only: rows from that day's events, nothing later.
    first_day = min(e.ts for e in arrival).date()
    upto = [e for e in arrival if e.ts.date() <= first_day]
    partial = backfill(settings, last_day=first_day)
    want_users, want_items = _expected(upto, categories)
    assert (partial.users, partial.items) == (len(want_users), len(want_items))
    assert not _mismatches(settings, USER_VIEW, want_users)
    assert not _mismatches(settings, ITEM_VIEW, want_items)

    users, items = _expected(arrival, categories)
    # One user's row online is newer than anything in the log (the stream got ahead of the
    # archive): a backfill must keep it.
    ahead = sorted(users)[0]
    newer = _row_with(users[ahead], event_timestamp=datetime.now(UTC) + timedelta(hours=1),
                      views_24h=12_345)
    with OnlineFeatureWriter(settings) as writer:
        writer.write(USER_VIEW.name, [newer])

    report = backfill(settings)
    assert report.duplicates == 5
    assert report.events == len(arrival) - 5
    assert (report.users, report.items) == (len(users), len(items))
    assert not _mismatches(settings, USER_VIEW, {u: r for u, r in users.items() if u != ahead})
    assert not _mismatches(settings, ITEM_VIEW, items)
    assert not _mismatches(settings, USER_VIEW, {ahead: newer})


@pytest.mark.kafka
def test_cli_refuses_while_the_feature_writer_consumes(kafka_settings: Settings) -> None:
    settings = kafka_settings
    group = f"feature-writer-{uuid.uuid4().hex[:8]}"
    _ready_topics(settings, 1)
    env = {
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMREC_HOME": str(settings.home),
        "STREAMREC_FEATURE_WRITER_GROUP": group,
    }
    runner = CliRunner()

    def backfill_cli(*args: str) -> Result:
        get_settings.cache_clear()  # the command reads the environment given here
        try:
            return runner.invoke(app, ["backfill", *args], env=env)
        finally:
            get_settings.cache_clear()

    writer = KafkaConsumer(settings.topic_events, bootstrap_servers=settings.kafka_bootstrap,
                           group_id=group)
    try:
        writer.poll(timeout_ms=5000)  # joins the group
        refused = backfill_cli()
    finally:
        writer.close()
    assert refused.exit_code == 1
    assert "feature writer is running" in refused.stderr

    forced = backfill_cli("--force", "--to", "2026-01-31")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout.splitlines()[-1])["events"] == 0
    assert backfill_cli("--from", "2026-02-01", "--to", "2026-01-31").exit_code == 2

def _hour_folders(root: Path, stamps: list[datetime]) -> None:
    for ts in stamps:
        (root / f"date={ts:%Y-%m-%d}" / f"hour={ts:%H}").mkdir(parents=True, exist_ok=True)


def test_archived_hours_are_in_event_time_order_within_the_days(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    t0 = datetime(2026, 3, 1, 22, tzinfo=UTC)
    stamps = [t0 + timedelta(hours=h) for h in (5, 0, 27, 2, 1)]
    events, served = event_log_dirs(settings)
    _hour_folders(events, stamps)
    (events / "_manifests").mkdir()
    # Served impressions: one hour also in the client log, one only here.
    _hour_folders(served, [t0 + timedelta(hours=2), t0 + timedelta(hours=4)])

    def names(first: date | None = None, last: date | None = None) -> list[str]:
        return [f"{h.parent.name}/{h.name}" for h, *_ in archived_hours(settings, first, last)]

    assert archived_hours(settings)[2] == [events / "date=2026-03-02" / "hour=00",
                                           served / "date=2026-03-02" / "hour=00"]
    assert names() == ["date=2026-03-01/hour=22", "date=2026-03-01/hour=23",
                       "date=2026-03-02/hour=00", "date=2026-03-02/hour=02",
                       "date=2026-03-02/hour=03", "date=2026-03-03/hour=01"]
    assert names(date(2026, 3, 2), date(2026, 3, 2)) == ["date=2026-03-02/hour=00",
                                                         "date=2026-03-02/hour=02",
                                                         "date=2026-03-02/hour=03"]
    assert names(last=date(2026, 2, 28)) == []

