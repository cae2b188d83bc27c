"""The incremental real-time feature engine against hand-computed rows and a brute-force oracle."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features import reference
from features.definitions import (
    ITEM_VIEW,
    RECENT_ITEMS_MAX,
    TIMESTAMP_FIELD,
    USER_VIEW,
    W1H,
    W5M,
    W24H,
    Kind,
    epoch_us,
    fingerprint,
)
from features.realtime import RealtimeFeatureEngine
from streamrec.contract import Event, Item

T0 = datetime(2025, 6, 2, 12, 0, 10, tzinfo=UTC)
_ids = iter(range(1, 1 << 60))


def ev(
    kind: str = "view",
    *,
    minutes: float = 0.0,
    seconds: float = 0.0,
    user: str = "u1",
    item: str | None = "i1",
    items: list[str] | None = None,
    session: str | None = None,
    eid: str | None = None,
    **context: str,
) -> Event:
    """One event at ``T0 + minutes + seconds``; a fresh, increasing event id unless given."""
    return Event(
        event_id=eid or str(uuid.UUID(int=next(_ids))),
        event_type=kind,
        user_id=user,
        item_id=None if items else item,
        items=items,
        ts=T0 + timedelta(minutes=minutes, seconds=seconds),
        session_id=session,
        context=context or None,
    )


def cat(item_id: str, category: str) -> Item:
    return Item(item_id=item_id, title=item_id, category=category, created_at=T0)


# --- definitions --------------------------------------------------------------------------


def test_feature_schema_matches_rows() -> None:
    engine = RealtimeFeatureEngine()
    engine.apply([ev("click", country="DE", device="mobile")])
    user, item = engine.user_row("u1"), engine.item_row("i1")
    assert list(user) == ["user_id", TIMESTAMP_FIELD, *USER_VIEW.names]
    assert list(item) == ["item_id", TIMESTAMP_FIELD, *ITEM_VIEW.names]
    python_type = {Kind.INT: int, Kind.FLOAT: float, Kind.STRING: str, Kind.STRING_LIST: list}
    for view, row in ((USER_VIEW, user), (ITEM_VIEW, item)):
        for feature in view.features:
            assert type(row[feature.name]) is python_type[feature.kind], feature.name
    assert user[TIMESTAMP_FIELD] == T0 and user["last_event_ts"] == T0.timestamp()
    assert "views_5m" in USER_VIEW.names and "purchases_24h" in ITEM_VIEW.names


def test_window_edges_are_bucket_edges() -> None:
    # T0 = 12:00:10. 5m: 30 s buckets, the window starts at 11:55:30. 1h: 5 min buckets,
    # starts at 11:05:00. 24h: 1 h buckets, starts at 13:00:00 the day before.
    edges = [
        ev(seconds=-280 - 1e-6),  # 11:55:29.999999, out of 5m
        ev(seconds=-280),  # 11:55:30, in 5m
        ev(minutes=-55, seconds=-11),  # 11:04:59, out of 1h
        ev(minutes=-55, seconds=-10),  # 11:05:00, in 1h
        ev(minutes=-23 * 60, seconds=-10),  # 13:00:00 yesterday, in 24h
        ev(minutes=-23 * 60, seconds=-11),  # 12:59:59 yesterday, out of 24h
        ev(),  # the anchor
    ]
    engine = RealtimeFeatureEngine(allowed_lateness=timedelta(days=2))
    engine.apply(edges)
    row = engine.user_row("u1")
    assert (row["views_5m"], row["views_1h"], row["views_24h"]) == (2, 4, 6)
    assert W5M.covers(epoch_us(T0), epoch_us(edges[1].ts))
    assert not W1H.covers(epoch_us(T0), epoch_us(edges[2].ts))
    assert not W24H.covers(epoch_us(T0), epoch_us(edges[5].ts))
    # Windows slide with the anchor: 30 s later the 11:55:30 bucket has left the 5m window.
    engine.apply([ev("click", seconds=30)])
    row = engine.user_row("u1")
    assert (row["views_5m"], row["clicks_5m"], row["views_1h"]) == (1, 1, 4)


def test_counts_per_event_type_and_impressions_per_event() -> None:
    engine = RealtimeFeatureEngine()
    engine.apply(
        [
            ev("view"),
            ev("click"),
            ev("add_to_cart"),
            ev("add_to_cart", item="i2"),
            ev("purchase"),
            ev("impression", items=["i1", "i2", "i3"]),
        ]
    )
    row = engine.user_row("u1")
    assert [row[f"{n}_5m"] for n in ("views", "clicks", "add_to_carts", "purchases")] == [
        1,
        1,
        2,
        1,
    ]
    assert row["impressions_5m"] == 1  # one impression event, however many items it lists


def test_recent_items_distinct_newest_first_without_impressions() -> None:
    engine = RealtimeFeatureEngine()
    engine.apply(
        [
            ev(item="a", minutes=1),
            ev(item="b", minutes=2),
            ev(item="a", minutes=3),  # a moves to the front, once
            ev("impression", items=["x", "y"], minutes=4),  # shown, not interacted with
            ev(item="c", minutes=0.5),  # late: slots in by its own time
        ]
    )
    assert engine.user_row("u1")["recent_items"] == ["a", "b", "c"]
    # Equal timestamps are ordered by event id, whatever the arrival order.
    for order in ([0, 1], [1, 0]):
        tie = RealtimeFeatureEngine()
        pair = [ev(item="p", eid=str(uuid.UUID(int=1))), ev(item="q", eid=str(uuid.UUID(int=2)))]
        tie.apply([pair[i] for i in order])
        assert tie.user_row("u1")["recent_items"] == ["q", "p"]
    # Only the newest RECENT_ITEMS_MAX distinct items are kept; older ones cannot come back.
    many = RealtimeFeatureEngine()
    many.apply([ev(item=f"n{k}", seconds=k) for k in range(RECENT_ITEMS_MAX + 5)])
    many.apply([ev(item="n0", seconds=0.5)])
    expected = [f"n{k}" for k in range(RECENT_ITEMS_MAX + 4, 4, -1)]
    assert many.user_row("u1")["recent_items"] == expected


def test_last_category_from_catalog_resolved_when_the_row_is_built() -> None:
    engine = RealtimeFeatureEngine(catalog_lookup={"b": "books"}.get)
    engine.apply([ev(item="a"), ev("impression", items=["z"], seconds=5)])
    assert engine.user_row("u1")["last_category"] == ""  # a is unknown so far
    engine.catalog_update(cat("a", "shoes"))
    assert engine.user_row("u1")["last_category"] == "shoes"
    engine.apply([ev(item="b", seconds=10)])
    assert engine.user_row("u1")["last_category"] == "books"  # from the fallback lookup
    engine.catalog_update(cat("b", "comics"))  # the fed catalog wins over the fallback
    assert engine.user_row("u1")["last_category"] == "comics"


def test_a_late_catalog_record_names_the_users_whose_rows_lacked_its_category() -> None:
    engine = RealtimeFeatureEngine()
    engine.apply([ev(user="u1", item="a"), ev(user="u2", item="a"), ev(user="u3", item="b"),
                  ev(user="u4", item="a", seconds=1), ev(user="u4", item="c", seconds=2)])
    for user in ("u1", "u2", "u3", "u4"):
        engine.user_row(user)  # rows built, and written, with last_category ""
    assert engine.catalog_update(cat("a", "shoes")) == {"u1", "u2"}  # u4 has moved on to c
    assert engine.catalog_update(cat("a", "boots")) == set()  # known now: rows are current
    assert engine.user_row("u1")["last_category"] == "boots"
    # A restored engine knows who still waits: rows written before the snapshot lack it too.
    restored = RealtimeFeatureEngine()
    restored.restore(engine.snapshot())
    assert restored.catalog_update(cat("b", "books")) == {"u3"}
    assert restored.catalog_update(cat("c", "cups")) == {"u4"}


def test_last_device_and_country_from_the_newest_event_that_has_them() -> None:
    engine = RealtimeFeatureEngine()
    engine.apply(
        [
            ev(seconds=0, device="mobile", country="DE"),
            ev(seconds=10, device="desktop"),
            ev(seconds=20),  # no context at all
            ev(seconds=5, device="tablet", country="FR"),  # late: newer country, older device
        ]
    )
    row = engine.user_row("u1")
    assert (row["last_device"], row["last_country"]) == ("desktop", "FR")
    fresh = RealtimeFeatureEngine()
    fresh.apply([ev()])
    assert (fresh.user_row("u1")["last_device"], fresh.user_row("u1")["last_country"]) == ("", "")


def test_sessions_by_id_and_by_inactivity_gap() -> None:
    engine = RealtimeFeatureEngine(allowed_lateness=timedelta(hours=1))
    engine.apply([ev(session="s1", minutes=0), ev(session="s1", minutes=10)])
    row = engine.user_row("u1")
    assert (row["session_events"], row["session_duration_s"]) == (2, 600.0)
    # Without a session id, events join while no gap exceeds 30 minutes.
    engine.apply([ev(minutes=20), ev(minutes=45), ev(minutes=80)])  # 80 - 45 > 30: new session
    row = engine.user_row("u1")
    assert (row["session_events"], row["session_duration_s"]) == (1, 0.0)
    engine.apply([ev(minutes=62)])  # a late event bridges 45 and 80
    row = engine.user_row("u1")
    assert (row["session_events"], row["session_duration_s"]) == (4, 3600.0)
    # Exactly the gap apart still counts as one session.
    engine.apply([ev(minutes=110)])
    row = engine.user_row("u1")
    assert (row["session_events"], row["session_duration_s"]) == (5, 5400.0)
    # The gap rule splits a named session too; the newest event decides which session counts.
    engine.apply([ev(session="s1", minutes=115)])
    row = engine.user_row("u1")
    assert (row["session_events"], row["session_duration_s"]) == (1, 0.0)


def test_item_counts_impression_lists_and_smoothed_ctr() -> None:
    engine = RealtimeFeatureEngine()
    shown = [ev("impression", items=["i1", "i2", "i1"], seconds=k) for k in range(4)]
    result = engine.apply([*shown, ev("click", item="i1", seconds=5)])
    assert result.changed_items == {"i1", "i2"}
    assert result.items.applied == 9  # 4 impressions x 2 distinct items + 1 click
    i1, i2 = engine.item_row("i1"), engine.item_row("i2")
    assert (i1["impressions_1h"], i1["clicks_1h"], i2["impressions_24h"]) == (4, 1, 4)
    assert i1["ctr_1h"] == (1 + 1) / (4 + 20) and i2["ctr_24h"] == 1 / 24
    # An hour and a bit later the 1h window has moved past all of it; 24h still holds it.
    engine.apply([ev("view", item="i1", minutes=66)])
    i1 = engine.item_row("i1")
    assert (i1["impressions_1h"], i1["ctr_1h"], i1["impressions_24h"]) == (0, 1 / 20, 4)
    assert i1["ctr_24h"] == 2 / 24 and i1["views_1h"] == 1


def test_too_late_and_duplicates_never_change_features() -> None:
    engine = RealtimeFeatureEngine(allowed_lateness=timedelta(minutes=10))
    first = ev("click", minutes=0)
    r = engine.apply([first, ev(minutes=30), first])
    # The re-delivery is 30 minutes behind now, so it is too late before it is a duplicate.
    assert (r.users.applied, r.users.duplicates, r.users.too_late) == (2, 0, 1)
    before = engine.user_row("u1"), engine.item_row("i1")
    again = ev(minutes=25)
    r = engine.apply([again, again, ev(minutes=19), ev("purchase", minutes=20)])
    assert (r.users.applied, r.users.duplicates, r.users.too_late) == (2, 1, 1)
    assert (r.items.applied, r.items.duplicates, r.items.too_late) == (2, 1, 1)
    r = engine.apply([again])
    assert r.changed_users == set() and r.changed_items == set() and r.users.duplicates == 1
    row = engine.user_row("u1")
    assert (row["views_1h"], row["purchases_1h"], row["clicks_1h"]) == (2, 1, 1)
    assert row[TIMESTAMP_FIELD] == before[0][TIMESTAMP_FIELD]


def test_an_event_exactly_at_the_lateness_horizon_is_remembered() -> None:
    engine = RealtimeFeatureEngine(allowed_lateness=timedelta(minutes=10))
    edge = ev(minutes=0)
    # Enough events at the horizon's far end to make the user prune its remembered ids.
    engine.apply([edge, *(ev(minutes=10) for _ in range(100))])
    r = engine.apply([edge])
    assert (r.users.applied, r.users.duplicates, r.items.duplicates) == (0, 1, 1)
    assert engine.user_row("u1")["views_1h"] == 101
    assert engine.apply([ev(minutes=0, seconds=-1e-6)]).users.too_late == 1


def test_unknown_entity_raises_key_error() -> None:
    engine = RealtimeFeatureEngine()
    with pytest.raises(KeyError):
        engine.user_row("nobody")
    with pytest.raises(KeyError):
        engine.item_row("nothing")


# --- against the brute-force oracle -------------------------------------------------------

_CATEGORIES = {f"i{k}": f"c{k % 3}" for k in range(10)}


def random_stream(rng: random.Random, n: int, lateness: timedelta) -> list[Event]:
    """Out-of-order, duplicated, multi-user traffic that crosses every window edge."""
    users = [f"u{k}" for k in range(rng.randint(1, 4))]
    # Sometimes more distinct items than recent_items keeps.
    items = [f"i{k}" for k in range(rng.choice([rng.randint(1, 9), rng.randint(20, 40)]))]
    clock = datetime(2025, 3, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(86_400))
    lateness_s = lateness.total_seconds()
    # Fast streams make late events overtake many others; slow ones cross the 24h window.
    fast = rng.random() < 0.5
    events: list[Event] = []
    for _ in range(n):
        if events and rng.random() < 0.08:  # a re-delivery, possibly much later
            events.append(rng.choice(events))
            continue
        if fast:
            steps = [0.0, rng.uniform(0, 3), rng.uniform(0, 3), rng.uniform(0, 30)]
        else:
            steps = [0.0, rng.uniform(0, 20), rng.uniform(0, 600), 3000.0, 5400.0]
        clock += timedelta(seconds=rng.choice(steps))
        if rng.random() < 0.2:  # land exactly on a bucket edge
            clock = clock.replace(second=rng.choice([0, 30]), microsecond=0)
        delay = rng.choice(
            [0.0, 0.0, 0.0, rng.uniform(0, lateness_s), rng.uniform(lateness_s, 3 * lateness_s)]
        )
        kind = rng.choice(["view", "view", "click", "add_to_cart", "purchase", "impression"])
        shown = (
            [rng.choice(items) for _ in range(rng.randint(1, 4))]
            if kind == "impression" and rng.random() < 0.8
            else None
        )
        context: dict[str, Any] = {}
        if rng.random() < 0.5:
            context["device"] = rng.choice(["mobile", "desktop", "tablet"])
        if rng.random() < 0.5:
            context["country"] = rng.choice(["DE", "FR", "US"])
        events.append(
            Event(
                event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                event_type=kind,
                user_id=rng.choice(users),
                item_id=None if shown else rng.choice(items),
                items=shown,
                ts=clock - timedelta(seconds=delay),
                session_id=rng.choice([None, None, "s1", "s2"]),
                context=context or None,
            )
        )
    return events


def random_batches(rng: random.Random, events: list[Event]) -> list[list[Event]]:
    # Few large batches, or batches of one or two events (rows are checked after each).
    wanted = rng.choice([rng.randint(0, 12), len(events) // 2, len(events)])
    cuts = sorted(rng.sample(range(1, len(events)), min(len(events) - 1, wanted)))
    return [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]


def make_engine(lateness: timedelta) -> RealtimeFeatureEngine:
    # Half the catalog arrives as records, the other half answers through the fallback.
    engine = RealtimeFeatureEngine(
        catalog_lookup={k: v for k, v in _CATEGORIES.items() if k < "i5"}.get,
        allowed_lateness=lateness,
    )
    for item_id, category in _CATEGORIES.items():
        if item_id >= "i5":
            engine.catalog_update(cat(item_id, category))
    return engine


def expected_rows(
    events: list[Event], lateness: timedelta
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    verdict = reference.accept(events, lateness)
    users = {u: reference.user_row(u, evs, _CATEGORIES.get) for u, evs in verdict.users.items()}
    items = {i: reference.item_row(i, evs) for i, evs in verdict.items.items()}
    return users, items


def all_rows(
    engine: RealtimeFeatureEngine, users: set[str], items: set[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    return {u: engine.user_row(u) for u in users}, {i: engine.item_row(i) for i in items}


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 250),
    lateness=st.sampled_from([timedelta(0), timedelta(minutes=7), timedelta(hours=1)]),
)
def test_engine_equals_brute_force_under_any_batching(
    seed: int, n: int, lateness: timedelta
) -> None:
    rng = random.Random(seed)
    events = random_stream(rng, n, lateness)
    verdict = reference.accept(events, lateness)
    arrival: dict[str, int] = {}  # an accepted event is always its id's first arrival
    for position, event in enumerate(events):
        arrival.setdefault(event.event_id, position)
    engine = make_engine(lateness)
    done = 0
    for batch in random_batches(rng, events):
        result = engine.apply(iter(batch))  # any iterable, not only lists
        statuses = verdict.user_status[done : done + len(batch)]
        item_statuses = [
            s for per in verdict.item_status[done : done + len(batch)] for s in per.values()
        ]
        for update, verdicts in ((result.users, statuses), (result.items, item_statuses)):
            assert (update.applied, update.duplicates, update.too_late) == tuple(
                verdicts.count(s)
                for s in (reference.ACCEPTED, reference.DUPLICATE, reference.TOO_LATE)
            )
        assert result.changed_users == {
            e.user_id for e, s in zip(batch, statuses, strict=True) if s == reference.ACCEPTED
        }
        assert result.changed_items == {
            i
            for per in verdict.item_status[done : done + len(batch)]
            for i, s in per.items()
            if s == reference.ACCEPTED
        }
        done += len(batch)

        def so_far(accepted: list[Event], done: int = done) -> list[Event]:
            return [e for e in accepted if arrival[e.event_id] < done]

        assert all_rows(engine, result.changed_users, result.changed_items) == (
            {
                u: reference.user_row(u, so_far(verdict.users[u]), _CATEGORIES.get)
                for u in result.changed_users
            },
            {i: reference.item_row(i, so_far(verdict.items[i])) for i in result.changed_items},
        )
    users, items = expected_rows(events, lateness)
    assert all_rows(engine, set(users), set(items)) == (users, items)
    assert len(engine.users) == len(users) and len(engine.items) == len(items)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 250))
def test_snapshot_restore_mid_stream_continues_identically(seed: int, n: int) -> None:
    rng = random.Random(seed)
    lateness = timedelta(minutes=rng.choice([7, 60]))
    events = random_stream(rng, n, lateness)
    whole = make_engine(lateness)
    whole.apply(events)
    engine = make_engine(lateness)
    for batch in random_batches(rng, events):
        engine.apply(batch)
        restored = RealtimeFeatureEngine(
            catalog_lookup={k: v for k, v in _CATEGORIES.items() if k < "i5"}.get,
            allowed_lateness=lateness,
        )
        restored.restore(engine.snapshot())
        engine = restored  # keep going on the restored copy only
    users, items = expected_rows(events, lateness)
    assert all_rows(engine, set(users), set(items)) == all_rows(whole, set(users), set(items))
    assert engine.snapshot() == whole.snapshot()


def test_snapshot_is_versioned_plain_json_and_refuses_other_rules() -> None:
    engine = RealtimeFeatureEngine(allowed_lateness=timedelta(minutes=5))
    engine.apply([ev("impression", items=["i1", "i2"], session="s", device="mobile")])
    data = orjson.loads(engine.snapshot())
    assert (data["format"], data["version"], data["definitions"]) == (
        "streamrec.realtime",
        1,
        fingerprint(),
    )
    with pytest.raises(ValueError, match="allowed_lateness"):
        RealtimeFeatureEngine(allowed_lateness=timedelta(hours=1)).restore(engine.snapshot())
    with pytest.raises(ValueError, match="different feature definitions"):
        other = {**data, "definitions": {**data["definitions"], "recent_items_max": 5}}
        RealtimeFeatureEngine(allowed_lateness=timedelta(minutes=5)).restore(orjson.dumps(other))
    with pytest.raises(ValueError, match="version"):
        RealtimeFeatureEngine().restore(orjson.dumps({**data, "version": 99}))


def test_dedup_memory_stays_bounded_on_a_long_stream() -> None:
    lateness = timedelta(minutes=10)
    engine = RealtimeFeatureEngine(allowed_lateness=lateness)
    # Two users with one event per second each, three items with one every 1.5 s, for 6 h.
    user_live = int(lateness.total_seconds()) + 1  # ids that could still be accepted
    item_live = user_live * 2 // 3 + 1
    first = None
    for hour in range(6):
        batch = [
            ev(user=f"u{k % 2}", item=f"i{k % 3}", seconds=3600 * hour + k // 2)
            for k in range(7200)
        ]
        first = first or batch[0]
        engine.apply(batch)
        # Per entity at most twice the live ids (pruning doubles its threshold), whatever
        # the length of the stream: 43,200 events pass, a few thousand ids stay.
        assert engine.users.remembered_ids() <= 2 * (2 * user_live)
        assert engine.items.remembered_ids() <= 3 * (2 * item_live)
    # A re-delivery of a forgotten id is too late, so forgetting it changed nothing.
    r = engine.apply([first])
    assert (r.users.too_late, r.items.too_late, r.changed_users, r.changed_items) == (
        1,
        1,
        set(),
        set(),
    )
