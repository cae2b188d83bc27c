"""Labels from impressions and actions, and point-in-time correct training data."""

from __future__ import annotations

import doctest
import importlib
import itertools
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.definitions import TIMESTAMP_FIELD
from features.store import OnlineFeatureWriter, apply_repo
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
from streaming.simulator import Simulator
from streamrec.contract import Context, Event
from streamrec.settings import Settings
from training.dataset import FEATURE_LAG, point_in_time_features, training_set
from training.labels import (
    LabelJoiner,
    label_event_log,
    labels_dir,
    read_labelled_examples,
)
from training.simulated import SimulatorConfig, simulate_home

T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)
_ids = itertools.count(1)


def event(kind: str, minutes: float, *, user: str = "u1", event_id: str | None = None,
          **fields: object) -> Event:
    return Event(
        event_id=event_id or f"00000000-0000-4000-8000-{next(_ids):012d}",
        event_type=kind,
        user_id=user,
        ts=T0 + timedelta(minutes=minutes),
        context=Context(device="mobile", country="DE"),
        **fields,
    )


def shown(minutes: float, items: list[str], request: str, **kw: object) -> Event:
    return event("impression", minutes, items=items, request_id=request, **kw)


def labels(examples: list) -> set[tuple[str, str, int, str | None]]:
    return {(x.request_id, x.item_id, x.label, x.action) for x in examples}


# --- the label join --------------------------------------------------------------------------


def test_click_is_emitted_at_once_and_slots_close_as_negatives() -> None:
    joiner = LabelJoiner(1800, allowed_lateness_s=600)
    assert joiner.add(shown(0, ["a", "b", "c"], "r1")) == []
    clicked = joiner.add(event("click", 2, item_id="b", request_id="r1"))
    assert labels(clicked) == {("r1", "b", 1, "click")}
    assert clicked[0].position == 1 and clicked[0].ts == T0
    assert (clicked[0].device, clicked[0].country) == ("mobile", "DE")
    # Still open: the window (30 min) plus lateness (10 min) has not passed.
    assert joiner.add(event("view", 39, item_id="z")) == []
    closed = joiner.add(event("view", 41, item_id="z"))
    assert labels(closed) == {("r1", "a", 0, None), ("r1", "c", 0, None)}
    assert joiner.open_slots() == 0
    assert (joiner.stats.positives, joiner.stats.negatives) == (1, 2)


def test_duplicate_events_change_nothing() -> None:
    joiner = LabelJoiner(1800, allowed_lateness_s=600)
    impression = shown(0, ["a", "b"], "r1")
    click = event("click", 1, item_id="a")
    out = joiner.add(impression) + joiner.add(impression) + joiner.add(click) + joiner.add(click)
    out += joiner.flush()
    assert labels(out) == {("r1", "a", 1, "click"), ("r1", "b", 0, None)}
    assert joiner.stats.duplicates == 2 and joiner.stats.slots == 2


def test_request_id_matches_its_request_only_and_last_touch_otherwise() -> None:
    joiner = LabelJoiner(1800, allowed_lateness_s=600)
    joiner.add(shown(0, ["a", "b"], "r1"))
    joiner.add(shown(5, ["a", "c"], "r2"))
    # Carries r1: labels r1's slot although r2 showed "a" more recently.
    assert labels(joiner.add(event("click", 6, item_id="a", request_id="r1"))) == {
        ("r1", "a", 1, "click")
    }
    # No request id: the newest open impression of the item gets it (last touch).
    assert labels(joiner.add(event("add_to_cart", 7, item_id="a"))) == {
        ("r2", "a", 1, "add_to_cart")
    }
    # Another user's click never labels u1's slots.
    assert joiner.add(event("click", 8, item_id="b", user="u2")) == []
    # A view is not an action.
    assert joiner.add(event("view", 9, item_id="c")) == []
    rest = joiner.flush()
    assert labels(rest) == {("r1", "b", 0, None), ("r2", "c", 0, None)}


def test_late_and_early_events() -> None:
    joiner = LabelJoiner(1800, allowed_lateness_s=600)
    # A click that arrives before its impression (other topic, other lag) waits for it.
    assert joiner.add(event("click", 3, item_id="a", request_id="r1")) == []
    assert labels(joiner.add(shown(2, ["a", "b"], "r1"))) == {("r1", "a", 1, "click")}
    # A click late in arrival but within the window and the lateness still counts.
    joiner.add(event("view", 38, item_id="x"))  # watermark 38 min
    assert labels(joiner.add(event("click", 20, item_id="b"))) == {("r1", "b", 1, "click")}
    # An action outside the window (35 min after the impression) labels nothing.
    joiner.add(shown(40, ["c"], "r2"))
    joiner.add(event("view", 60, item_id="x"))
    # Slot r2/c closes at 40 + 30 + 10 = 80 min: it is a negative by then.
    assert labels(joiner.add(event("view", 81, item_id="x"))) == {("r2", "c", 0, None)}
    # A click inside r2's window arriving after the slot closed: counted, not re-emitted.
    assert joiner.add(event("click", 50, item_id="c")) == []
    assert joiner.stats.late_actions == 1
    # An impression older than the watermark minus the lateness is dropped.
    assert joiner.add(shown(60, ["d"], "r3")) == []
    assert joiner.stats.late_impressions == 1
    assert joiner.flush() == []


def test_batch_mode_holds_positives_for_the_strongest_action() -> None:
    joiner = LabelJoiner(1800, allowed_lateness_s=600, emit_positives_at_once=False)
    joiner.add(shown(0, ["a"], "r1"))
    assert joiner.add(event("click", 1, item_id="a")) == []
    assert joiner.add(event("purchase", 20, item_id="a")) == []
    assert joiner.add(event("add_to_cart", 25, item_id="a")) == []
    assert labels(joiner.add(event("view", 50, item_id="z"))) == {("r1", "a", 1, "purchase")}


def test_memory_stays_bounded_on_a_long_stream() -> None:
    joiner = LabelJoiner(1800, allowed_lateness_s=600)
    for n in range(2000):  # one impression and a click every 2 minutes, for ~2.8 days
        joiner.add(shown(2 * n, [f"i{n}", f"j{n}"], f"r{n}"))
        joiner.add(event("click", 2 * n + 1, item_id=f"i{n}"))
    assert joiner.open_slots() <= 2 * 21  # 40 minutes of slots
    assert len(joiner._seen) <= 2 * 41  # ids of the last window + lateness
    assert sum(len(v) for v in joiner._closed.by_pair.values()) <= 2 * 41


# --- the labelled-examples table -----------------------------------------------------------


def archive(settings: Settings, events: list[Event]) -> None:
    log = Archiver(events_dir(settings), EVENT_SCHEMA, event_rows, partition_by_hour=True)
    log.write([Message(e, "events", 0, n, None, b"", 0) for n, e in enumerate(events)])


def test_label_event_log_is_idempotent_per_hour(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    impression = shown(10, ["a", "b"], "r1")
    archive(settings, [impression, impression, event("click", 12, item_id="b"),
                       event("purchase", 30, item_id="b"), shown(70, ["c"], "r2"),
                       event("view", 200, item_id="z")])
    first = label_event_log(settings, T0, T0 + timedelta(hours=2))
    again = label_event_log(settings, T0 + timedelta(minutes=30), T0 + timedelta(hours=2))
    assert first.to_pylist() == again.to_pylist()
    assert [(r["item_id"], r["label"], r["action"], r["position"], r["sampled"])
            for r in first.to_pylist()] == [
        ("a", 0, None, 0, False), ("b", 1, "purchase", 1, False), ("c", 0, None, 0, False)
    ]
    files = sorted(p.relative_to(labels_dir(settings)).as_posix()
                   for p in labels_dir(settings).rglob("*.parquet"))
    assert files == ["date=2026-03-02/hour=12/labels.parquet",
                     "date=2026-03-02/hour=13/labels.parquet"]
    stored = read_labelled_examples(settings, T0, T0 + timedelta(hours=2))
    assert stored.to_pylist() == first.to_pylist()


def test_without_impressions_catalog_negatives_stand_in(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, label_sampled_negatives=3)
    catalog = Simulator(SimulatorConfig(n_users=5, n_items=40, n_categories=4, seed=3,
                                        start=T0 - timedelta(days=1))).catalog()
    Archiver(items_dir(settings), ITEM_SCHEMA, item_rows, partition_by_hour=False).write(
        [Message(item, "items", 0, n, None, b"", 0) for n, item in enumerate(catalog)]
    )
    archive(settings, [event("view", 1, item_id="i000001"), event("click", 2, item_id="i000001"),
                       event("view", 3, item_id="i000002")])
    table = label_event_log(settings, T0, T0 + timedelta(hours=1)).to_pandas()
    assert table["sampled"].all() and (table["position"] == -1).all()
    positives = table[table["label"] == 1]
    # The view and click of one item within the window are one positive, the click counts.
    assert positives[["item_id", "action"]].values.tolist() == [
        ["i000001", "click"], ["i000002", "view"]
    ]
    for request, rows in table.groupby("request_id"):
        assert request.startswith("sampled:") and len(rows) == 4
        assert rows["label"].sum() == 1
        assert (rows.loc[rows["label"] == 0, "item_id"] != rows.loc[rows["label"] == 1,
                                                                   "item_id"].iloc[0]).all()
    again = label_event_log(settings, T0, T0 + timedelta(hours=1)).to_pandas()
    assert again.equals(table.reset_index(drop=True))


# --- point in time ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Offline rows at known times: each row's value is its minute offset from T0."""
    settings = Settings(home=tmp_path_factory.mktemp("pit"))
    apply_repo(settings)
    writer = OnlineFeatureWriter(settings)
    user_row = {f: 0 for f in (
        "views_5m", "clicks_5m", "add_to_carts_5m", "purchases_5m", "impressions_5m",
        "views_1h", "clicks_1h", "add_to_carts_1h", "purchases_1h", "impressions_1h",
        "views_24h", "clicks_24h", "add_to_carts_24h", "purchases_24h", "impressions_24h",
        "session_events")}
    user_row |= {"recent_items": [], "last_category": None, "last_device": None,
                 "last_country": None, "session_duration_s": 0.0}

    def user(minutes: int) -> dict:
        at = T0 + timedelta(minutes=minutes)
        return {**user_row, "user_id": "u1", TIMESTAMP_FIELD: at, "views_24h": minutes,
                "recent_items": [f"m{minutes}"], "last_event_ts": at.timestamp()}

    # Out of time order across parts, and one exactly at the label time.
    writer.append_offline("user_realtime", [user(30), user(-60)], part="b")
    writer.append_offline("user_realtime", [user(-5), user(0), user(90)], part="a")
    stats = {"popularity_7d": 1, "unique_users_7d": 1, "ctr_7d": 0.1, "popularity_30d": 1,
             "unique_users_30d": 1, "ctr_30d": 0.1}
    writer.append_offline("item_stats", [
        {"item_id": "i1", TIMESTAMP_FIELD: T0 - timedelta(days=1), **stats, "popularity_7d": -1440},
        {"item_id": "i1", TIMESTAMP_FIELD: T0 + timedelta(minutes=1), **stats,
         "popularity_7d": 1},
        # Only rows older than the 3-day TTL, and only rows after the label: both missing.
        {"item_id": "old", TIMESTAMP_FIELD: T0 - timedelta(days=4), **stats},
        {"item_id": "new", TIMESTAMP_FIELD: T0 + timedelta(days=1), **stats},
    ])
    writer.close()
    yield settings


@pytest.mark.parametrize("engine", ["asof", "feast"])
def test_no_feature_value_comes_from_after_its_label(timeline: Settings, engine: str) -> None:
    examples = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u1"],
            "item_id": ["i1", "i1", "old", "new", "i1"],
            "request_id": ["r1", "r1", "r2", "r2", "r3"],
            "label": [1, 0, 0, 0, 1],
            "ts": [T0, T0, T0 + timedelta(minutes=45), T0 + timedelta(minutes=45),
                   T0 + timedelta(minutes=90)],
        }
    )
    data = training_set(timeline, examples, engine=engine)
    views = data.batch.column("user_realtime__views_24h")
    # At T0 the row stamped T0 (it counts the impression itself) is not used: -5 is.
    assert views == [-5, -5, 30, 30, 30]
    assert [list(v) for v in data.batch.column("user_realtime__recent_items")] == [
        ["m-5"], ["m-5"], ["m30"], ["m30"], ["m30"]
    ]
    popularity = data.batch.column("item_stats__popularity_7d")
    assert popularity == [-1440, -1440, None, None, 1]
    for row, ts in enumerate(data.batch.ts_s):
        assert ts == examples["ts"][row].timestamp()
        used = data.batch.column("user_realtime__last_event_ts")[row]
        assert used < ts  # strictly before the label
    assert data.labels.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_engines_agree_on_a_simulated_shop(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    apply_repo(settings)
    world = simulate_home(settings, SimulatorConfig(n_users=40, n_items=80, n_categories=4,
                                                    seed=11), n_events=3000)
    examples = label_event_log(settings, world.start, world.end).to_pandas().iloc[-600:]
    entities = pd.DataFrame(
        {"user_id": examples["user_id"], "item_id": examples["item_id"],
         TIMESTAMP_FIELD: examples["ts"] - FEATURE_LAG}
    )
    fast = point_in_time_features(settings, entities, engine="asof")
    feast = point_in_time_features(settings, entities, engine="feast")
    assert list(fast.columns) == list(feast.columns)
    assert fast["user_realtime__views_24h"].notna().mean() > 0.9
    for column in fast.columns:
        for a, b in zip(fast[column], feast[column], strict=True):
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                assert list(a) == list(b), column
            elif a is None or (isinstance(a, float) and math.isnan(a)):
                assert b is None or (isinstance(b, float) and math.isnan(b)), column
            else:
                assert a == b, column


@pytest.mark.parametrize(
    "name", ["training.labels", "training.dataset", "training.holdout", "training.train_loop"]
)
def test_docstring_examples_run(name: str) -> None:
    failures, tried = doctest.testmod(importlib.import_module(name),
                                      optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
