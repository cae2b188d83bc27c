"""Spark's historical features: hand-computed daily stats, and stream/batch agreement.

One local Spark session serves the module (starting one costs seconds). Event logs are
written with the archiver's own writer, in its layout, so Spark reads what production reads.

The agreement test feeds one simulated stream to the incremental engine and, as an archived
log, to Spark. Its arrival order is shuffled only within 5 minutes of event time and its
re-deliveries follow their original at once, so no event is ever too late for the default
10-minute lateness (the test asserts that): the one condition under which a log, which does
not keep the arrival order, determines the stream's features.
"""

from __future__ import annotations

import json
import random
import uuid
import zlib
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds
import pytest
from pyspark.sql import DataFrame, SparkSession
from typer.testing import CliRunner

from features.batch_cli import batch_app
from features.definitions import (
    COUNTED_TYPES,
    ITEM_VIEW,
    STATS_WINDOWS,
    TIMESTAMP_FIELD,
    USER_VIEW,
    W30D,
    Window,
    count_name,
    event_items,
    smoothed_ctr,
)
from features.historical import (
    ITEM_STATS,
    USER_STATS,
    item_stats,
    prepare_events,
    read_catalog,
    read_events,
    realtime_as_of,
    run_historical,
    stats_days,
    user_stats,
)
from features.realtime import RealtimeFeatureEngine
from features.spark_session import spark_session
from features.store import OnlineFeatureReader, apply_repo, feature_store
from streaming.archiver import (
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    Archiver,
    event_rows,
    events_dir,
    item_rows,
    items_dir,
)
from streaming.consumer import Message
from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Event, EventType, Item
from streamrec.settings import Settings, get_settings

pytestmark = pytest.mark.slow

PARTITIONS = 4


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    session = spark_session(Settings(spark_driver_memory="1g"), master="local[2]")
    yield session
    session.stop()


def archive(settings: Settings, events: Sequence[Event], items: Sequence[Item]) -> None:
    """Write ``events`` (in this arrival order) and ``items`` as the archiver would.

    Events go to the partition of their user, like the producer's keyed partitioner, with
    consecutive offsets; batches of 500 as a consumer would hand them over.
    """
    log = Archiver(events_dir(settings), EVENT_SCHEMA, event_rows, partition_by_hour=True)
    offsets = [0] * PARTITIONS
    messages = []
    for e in events:
        partition = zlib.crc32(e.user_id.encode()) % PARTITIONS
        messages.append(Message(e, "events", partition, offsets[partition], None, b"", 0))
        offsets[partition] += 1
    for start in range(0, len(messages), 500):
        log.write(messages[start : start + 500])
    catalog = Archiver(items_dir(settings), ITEM_SCHEMA, item_rows, partition_by_hour=False)
    catalog.write([Message(it, "items", 0, n, None, b"", 0) for n, it in enumerate(items)])


def rows(frame: DataFrame, key: str) -> dict[Any, dict[str, Any]]:
    """Collected rows by ``key`` (Arrow keeps timestamps zone-aware)."""
    return {r[key]: r for r in frame.toArrow().to_pylist()}


def assert_close(got: dict[str, Any], want: dict[str, Any], where: Any) -> None:
    """``got`` has ``want``'s values: floats (also in dicts) within 1e-9, the rest exactly."""
    for name, value in want.items():
        if isinstance(value, float) or (isinstance(value, dict) and value):
            assert got[name] == pytest.approx(value, rel=0, abs=1e-9), (where, name)
        else:
            assert got[name] == value, (where, name)


# --- daily stats on a log small enough to compute by hand ---------------------------------

END = datetime(2026, 3, 10, 12, tzinfo=UTC)
_ids = iter(range(1, 1 << 60))


def ev(kind: str, user: str, item: str | None, ts: datetime, **extra: Any) -> Event:
    return Event(
        event_id=str(uuid.UUID(int=next(_ids))),
        event_type=kind,
        user_id=user,
        item_id=item,
        ts=ts,
        **extra,
    )


def at(day: int, hour: int = 10, minute: int = 0) -> datetime:
    """A time in February (``day`` <= 28) or March (``day`` - 28) 2026."""
    return datetime(2026, 2, 1, hour, minute, tzinfo=UTC) + timedelta(days=day - 1)


MAR = 28  # at(MAR + 9) is March 9th


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = Settings(home=tmp_path_factory.mktemp("tiny"))
    click = ev("click", "u1", "i1", at(MAR + 10, 8, 1))
    events = [
        ev("view", "u1", "i2", at(2)),  # Feb 2: in no window of Mar 9 or 10
        ev("view", "u2", "i2", at(8, 12)),  # Feb 8: in Mar 9's 30 days only
        ev("view", "u1", "i3", at(10)),  # Feb 10: 30 days of both days; i3 has no category
        ev("view", "u1", "i2", at(MAR + 5)),  # Mar 5: 7 days of both
        ev(  # the last instant of Mar 9; lists i1 twice, one impression each
            "impression", "u1", None, at(MAR + 10, 0) - timedelta(microseconds=1),
            items=["i1", "i2", "i1"],
        ),
        ev("view", "u1", "i1", at(MAR + 10, 8)),
        click,
        ev("add_to_cart", "u1", "i1", at(MAR + 10, 8, 2)),
        ev("purchase", "u1", "i1", at(MAR + 10, 8, 5)),
        ev("view", "u1", "i1", END),  # at the end: not before it, so not counted
        ev("view", "u3", "i4", datetime(2026, 1, 1, tzinfo=UTC)),  # long gone: no rows
        click,  # a re-delivery, in its own Kafka record
    ]
    created = datetime(2025, 1, 1, tzinfo=UTC)
    items = [
        Item(item_id="i1", title="Trail shoe", category="shoes", price=100.0, created_at=created),
        Item(item_id="i2", title="Space opera", category="books", price=20.0, created_at=created),
        Item(item_id="i4", title="Old thing", category="junk", price=1.0, created_at=created),
    ]
    archive(settings, events, items)
    return settings


def _counts(
    views: int = 0, clicks: int = 0, carts: int = 0, buys: int = 0, shown: int = 0
) -> dict[str, int]:
    return {"views": views, "clicks": clicks, "add_to_carts": carts, "purchases": buys,
            "impressions": shown}


def _user(w7: dict[str, int], w30: dict[str, int], rate: float, affinity: dict[str, float],
          price: float | None) -> dict[str, Any]:
    return {
        **{f"{k}_7d": v for k, v in w7.items()},
        **{f"{k}_30d": v for k, v in w30.items()},
        "purchase_rate_30d": rate,
        "category_affinity": affinity,
        "avg_price_30d": price,
    }


def test_user_stats_match_hand_computed_days(spark: SparkSession, tiny_log: Settings) -> None:
    days = stats_days(END, days=2)
    assert days == (date(2026, 3, 9), date(2026, 3, 10))
    events = prepare_events(read_events(spark, tiny_log))
    got = {
        (r["user_id"], r["date"]): r
        for r in user_stats(events, read_catalog(spark, tiny_log), days, END)
        .toArrow()
        .to_pylist()
    }
    mar9, mar10 = days
    expected = {
        ("u1", mar9): _user(_counts(views=1, shown=1), _counts(views=2, shown=1), 0.0,
                            {"books": 1.0}, 20.0),
        ("u1", mar10): _user(
            _counts(views=2, clicks=1, carts=1, buys=1, shown=1),
            _counts(views=3, clicks=1, carts=1, buys=1, shown=1),
            1 / 3, {"books": 0.2, "shoes": 0.8}, (4 * 100 + 20) / 5,
        ),
        ("u2", mar9): _user(_counts(), _counts(views=1), 0.0, {"books": 1.0}, 20.0),
        # Its only event left the window: a row of zeros, which clears the online counts.
        ("u2", mar10): _user(_counts(), _counts(), 0.0, {}, None),
    }
    assert set(got) == set(expected)
    for key, want in expected.items():
        row = got[key]
        assert list(row) == [*USER_STATS.columns, "date"]
        assert row[TIMESTAMP_FIELD] == (datetime(2026, 3, 10, tzinfo=UTC) if key[1] == mar9
                                        else END)
        row["category_affinity"] = json.loads(row["category_affinity"])
        assert list(row["category_affinity"]) == sorted(row["category_affinity"])
        assert_close(row, want, key)


def test_item_stats_match_hand_computed_days(spark: SparkSession, tiny_log: Settings) -> None:
    days = stats_days(END, days=2)
    events = prepare_events(read_events(spark, tiny_log))
    got = {
        (r["item_id"], r["date"]): r for r in item_stats(events, days, END).toArrow().to_pylist()
    }
    mar9, mar10 = days

    def item(
        pop7: int, users7: int, ctr7: float, pop30: int, users30: int, ctr30: float
    ) -> dict[str, Any]:
        return {"popularity_7d": pop7, "unique_users_7d": users7, "ctr_7d": ctr7,
                "popularity_30d": pop30, "unique_users_30d": users30, "ctr_30d": ctr30}

    expected = {
        ("i1", mar9): item(0, 0, 1 / 21, 0, 0, 1 / 21),  # one impression, nothing else yet
        ("i1", mar10): item(4, 1, 2 / 21, 4, 1, 2 / 21),
        ("i2", mar9): item(1, 1, 1 / 21, 2, 2, 1 / 21),
        ("i2", mar10): item(1, 1, 1 / 21, 1, 1, 1 / 21),
        ("i3", mar9): item(0, 0, 1 / 20, 1, 1, 1 / 20),
        ("i3", mar10): item(0, 0, 1 / 20, 1, 1, 1 / 20),
    }
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert list(got[key]) == [*ITEM_STATS.columns, "date"]
        assert_close(got[key], want, key)


def test_an_empty_log_gives_no_rows(spark: SparkSession, tmp_path: Path) -> None:
    empty = Settings(home=tmp_path)  # no event folder at all: the first run of a new home
    events = prepare_events(read_events(spark, empty))
    days = stats_days(END, days=2)
    assert user_stats(events, read_catalog(spark, empty), days, END).count() == 0
    assert item_stats(events, days, END).count() == 0


# Feast's offline store sorts with Dask, which warns about a pandas deprecation.
@pytest.mark.filterwarnings("ignore:Downcasting object dtype arrays:FutureWarning")
def test_batch_cli_writes_materializes_and_summarizes(
    spark: SparkSession, tiny_log: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMREC_HOME", str(tiny_log.home))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            batch_app, ["historical", "--end", "2026-03-10T12:00:00+00:00", "--days", "2"]
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "user_stats: 4 rows" in result.stdout and "item_stats: 6 rows" in result.stdout
    assert "days 2026-03-09..2026-03-10 as of 2026-03-10T12:00:00+00:00" in result.stdout
    assert "materialize ..." in result.stderr
    online = OnlineFeatureReader(tiny_log).read(
        ["user_stats:purchase_rate_30d", "user_stats:views_30d", "item_stats:popularity_7d"],
        {"user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i4"]},
    )
    assert online["purchase_rate_30d"][0] == pytest.approx(1 / 3)
    assert online["views_30d"] == [3, 0, None]  # u2: the zero row; u3: never had a row
    assert online["popularity_7d"] == [4, 1, None]
    # Point in time: an hour into March 10 sees the row of March 9, the end sees the last.
    moments = [datetime(2026, 3, 10, 1, tzinfo=UTC), END]
    history = (
        feature_store(tiny_log)
        .get_historical_features(
            pd.DataFrame({"user_id": ["u1", "u1"], TIMESTAMP_FIELD: moments}),
            features=["user_stats:views_30d", "user_stats:avg_price_30d"],
        )
        .to_df()
        .sort_values(TIMESTAMP_FIELD)
    )
    assert history["views_30d"].tolist() == [2, 3]
    assert history["avg_price_30d"].tolist() == pytest.approx([20.0, 84.0])


# --- the stream and Spark agree on one simulated log --------------------------------------


def arrival_order(records: Sequence[Event | Item], seed: int) -> list[Event | Item]:
    """The simulator's stream as a broker might deliver it: events shuffled within 5 minutes
    of event time, and 3 % of them delivered twice in a row. Catalog records keep their
    place before the events that name them."""
    rng = random.Random(seed)
    arrivals: list[tuple[float, int, Event | Item]] = []
    for n, record in enumerate(records):
        if isinstance(record, Event):
            arrivals.append((record.ts.timestamp() + rng.uniform(0, 300), n, record))
        else:
            # At launch: events only ever arrive late, so none that names it comes earlier.
            arrivals.append((record.created_at.timestamp(), n, record))
    out: list[Event | Item] = []
    for _, _, record in sorted(arrivals, key=lambda a: (a[0], a[1])):
        out.append(record)
        if isinstance(record, Event) and rng.random() < 0.03:
            out.append(record)
    return out


@pytest.fixture(scope="module")
def simulated(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Settings, list[Event | Item], Simulator]:
    settings = Settings(home=tmp_path_factory.mktemp("simulated"))
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=4)
    sim = Simulator(SimulatorConfig(n_users=120, n_items=300, n_categories=8, seed=11, start=start))
    stream = arrival_order(list(sim.events(3000)), seed=5)
    events = [r for r in stream if isinstance(r, Event)]
    launched = [r for r in stream if isinstance(r, Item)]
    archive(settings, events, [*sim.catalog(), *launched])
    return settings, stream, sim


def test_spark_realtime_windows_equal_the_stream_engine(
    spark: SparkSession, simulated: tuple[Settings, list[Event | Item], Simulator]
) -> None:
    settings, stream, sim = simulated
    engine = RealtimeFeatureEngine()
    for item in sim.catalog():
        engine.catalog_update(item)
    too_late = duplicates = 0
    batch: list[Event] = []

    def flush() -> None:
        nonlocal too_late, duplicates
        result = engine.apply(batch)
        too_late += result.users.too_late + result.items.too_late
        duplicates += result.users.duplicates
        batch.clear()

    for record in stream:
        if isinstance(record, Item):
            flush()
            engine.catalog_update(record)
        else:
            batch.append(record)
            if len(batch) == 200:
                flush()
    flush()
    events = [r for r in stream if isinstance(r, Event)]
    assert too_late == 0, "the precondition of the comparison"
    assert duplicates == len(events) - len({e.event_id for e in events}) > 0

    users, items = realtime_as_of(read_events(spark, settings), read_catalog(spark, settings))
    assert users.columns == [USER_VIEW.join_key, TIMESTAMP_FIELD, *USER_VIEW.names]
    assert items.columns == [ITEM_VIEW.join_key, TIMESTAMP_FIELD, *ITEM_VIEW.names]
    spark_users, spark_items = rows(users, "user_id"), rows(items, "item_id")
    assert set(spark_users) == {e.user_id for e in events}
    assert set(spark_items) == {i for e in events for i in event_items(e)}

    for user_id, row in spark_users.items():
        assert_close(row, engine.user_row(user_id), user_id)
    for item_id, row in spark_items.items():
        assert_close(row, engine.item_row(item_id), item_id)
    # The comparison means something: windows hold varied, non-trivial counts.
    assert len({r["views_24h"] for r in spark_users.values()}) > 5
    assert any(r["session_events"] > 3 for r in spark_users.values())
    assert any(len(r["recent_items"]) == 20 for r in spark_users.values())


def _stats_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith("."))


def brute_force_stats(
    events: Sequence[Event], catalog: dict[str, Item], day: date, end: datetime
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``user_stats`` and ``item_stats`` of one day, straight from the definitions."""
    def age(e: Event) -> int:
        return (day - e.ts.astimezone(UTC).date()).days

    seen = [e for e in dict((e.event_id, e) for e in reversed(events)).values()
            if 0 <= age(e) <= 30 and e.ts < end]

    def within(e: Event, w: Window) -> bool:
        return age(e) < w.n_buckets

    users: dict[str, dict[str, Any]] = {}
    for user_id in {e.user_id for e in seen}:
        mine = [e for e in seen if e.user_id == user_id]
        row = {count_name(t, w): sum(e.event_type == t and within(e, w) for e in mine)
               for w in STATS_WINDOWS for t in COUNTED_TYPES}
        acted = [catalog.get(e.item_id) for e in mine  # type: ignore[arg-type]
                 if e.event_type != EventType.IMPRESSION and within(e, W30D)]
        categories = [it.category for it in acted if it is not None]
        prices = [it.price for it in acted if it is not None and it.price is not None]
        views, buys = row["views_30d"], row["purchases_30d"]
        users[user_id] = {
            **row,
            "purchase_rate_30d": buys / views if views else 0.0,
            "category_affinity": {c: categories.count(c) / len(categories)
                                  for c in set(categories)},
            "avg_price_30d": sum(prices) / len(prices) if prices else None,
        }
    items: dict[str, dict[str, Any]] = {}
    for item_id in {i for e in seen for i in event_items(e)}:
        on = [e for e in seen if item_id in event_items(e)]
        row = {}
        for w in STATS_WINDOWS:
            acted = [e for e in on if e.event_type != EventType.IMPRESSION and within(e, w)]
            row[f"popularity_{w.name}"] = len(acted)
            row[f"unique_users_{w.name}"] = len({e.user_id for e in acted})
            row[f"ctr_{w.name}"] = smoothed_ctr(
                sum(e.event_type == EventType.CLICK for e in acted),
                sum(e.event_type == EventType.IMPRESSION and within(e, w) for e in on),
            )
        items[item_id] = row
    return users, items


def test_historical_run_matches_brute_force_is_idempotent_and_goes_online(
    spark: SparkSession, simulated: tuple[Settings, list[Event | Item], Simulator]
) -> None:
    settings, stream, sim = simulated
    events = [r for r in stream if isinstance(r, Event)]
    launched = [r for r in stream if isinstance(r, Item)]
    catalog = {it.item_id: it for it in [*sim.catalog(), *launched]}
    apply_repo(settings)
    end = max(e.ts for e in events) + timedelta(hours=1)
    lines: list[str] = []
    first = run_historical(spark, settings, end=end, days=2, progress=lines.append)
    assert first.days == stats_days(end, 2)
    assert any("materialize" in line for line in lines)
    folder = {view.name: settings.home / "offline" / view.name for view in (USER_STATS, ITEM_STATS)}
    tables = {
        name: ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pylist()
        for name, path in folder.items()
    }
    for day in first.days:
        want_users, want_items = brute_force_stats(events, catalog, day, end)
        for (name, key), want in zip(
            ((USER_STATS.name, "user_id"), (ITEM_STATS.name, "item_id")),
            (want_users, want_items),
            strict=True,
        ):
            got = {r[key]: r for r in tables[name] if r["date"] == str(day)}
            assert set(got) == set(want), (name, day)
            for entity, row in want.items():
                stored = dict(got[entity])
                if "category_affinity" in row:
                    stored["category_affinity"] = json.loads(stored["category_affinity"])
                assert_close(stored, row, (name, day, entity))
    assert len({r["views_30d"] for r in tables[USER_STATS.name]}) > 5
    assert max(r["unique_users_30d"] for r in tables[ITEM_STATS.name]) > 2
    assert first.rows == {name: len(rows) for name, rows in tables.items()}

    files = _stats_files(folder[USER_STATS.name])
    again = run_historical(spark, settings, end=end, days=1, online=False)
    assert again.rows[USER_STATS.name] < first.rows[USER_STATS.name]  # one day, not two
    # The re-run day was replaced, not appended to; the other day is untouched.
    rerun = ds.dataset(folder[USER_STATS.name], format="parquet", partitioning="hive").to_table()
    assert rerun.num_rows == first.rows[USER_STATS.name]
    assert len(_stats_files(folder[USER_STATS.name])) == len(files)

    # Online: each user's newest row (stamped `end`), as Feast materialized it.
    store = feature_store(settings)
    for view in (USER_STATS, ITEM_STATS):
        assert [f.name for f in store.get_feature_view(view.name).features] == list(view.features)
    newest = {r["user_id"]: r for r in tables[USER_STATS.name] if r[TIMESTAMP_FIELD] == end}
    users = sorted(newest)
    online = OnlineFeatureReader(settings).read(
        [f"user_stats:{name}" for name in USER_STATS.features], {"user_id": users}
    )
    for name in USER_STATS.features:
        assert online[name] == [newest[u][name] for u in users], name
