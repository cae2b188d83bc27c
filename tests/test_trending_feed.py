"""The API's trending feed: lenient decoding of ``events`` records and exact top lists."""

from __future__ import annotations

import heapq
import random

import orjson
import pytest

from serving.feed import apply_record
from serving.trending import ALL, RecentPurchases, Scope, TrendingCounts, scopes_of
from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Item


def _record(**fields: object) -> bytes:
    base: dict[str, object] = {"event_type": "view", "user_id": "u1", "item_id": "i1",
                               "ts": "2026-01-02T03:04:05Z"}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize("raw", [
    b"not json", b"[1, 2]", b"null", _record(ts="yesterday"), _record(ts=17),
    _record(event_type=None), _record(user_id=None),
])
def test_a_record_that_does_not_parse_is_skipped(raw: bytes) -> None:
    trending, purchases = TrendingCounts(half_life_s=60), RecentPurchases()
    assert apply_record(raw, trending, purchases) is False
    trending.refresh(5)
    assert trending.top(ALL) == ()


@pytest.mark.parametrize("raw", [
    _record(item_id=7), _record(item_id=None), _record(event_type="impression"),
    _record(event_type="no_such_type"), _record(context="mobile"),
    _record(context={"device": 3, "country": ["DE"]}),
])
def test_odd_but_readable_records_never_crash_the_feed(raw: bytes) -> None:
    trending, purchases = TrendingCounts(half_life_s=60), RecentPurchases()
    assert apply_record(raw, trending, purchases) is True
    trending.refresh(5)
    assert trending.scopes() in ([], [ALL])


def test_purchases_and_context_scopes_are_counted() -> None:
    trending, purchases = TrendingCounts(half_life_s=60), RecentPurchases()
    assert apply_record(_record(event_type="purchase", context={"device": "mobile",
                                                               "country": "de"}),
                        trending, purchases)
    trending.refresh(5)
    assert purchases.of("u1") == frozenset({"i1"})
    for scope in scopes_of("mobile", "DE"):
        assert trending.top(scope) == (("i1", 4.0),)
    assert trending.top(Scope("desktop", None)) == ()


def test_top_lists_are_what_heapq_nlargest_gave() -> None:
    """Same items, same order (ties: first counted first) and same values as the sort of
    all counts, refreshed every few hundred events of a simulated stream."""
    sim = Simulator(SimulatorConfig(n_users=200, n_items=400, n_categories=6, seed=4))
    trending, purchases = TrendingCounts(half_life_s=600), RecentPurchases()
    reference: dict[Scope, dict[str, float]] = {}  # the raw counts each refresh read
    rng = random.Random(1)
    for i, record in enumerate(sim.events(6000)):
        if isinstance(record, Item):
            continue
        assert apply_record(record.to_json(), trending, purchases)
        if i % 500 == 499:
            n = rng.choice([5, 50, 1000])
            changed = set(trending._dirty)  # only scopes with new counts are re-ranked
            trending.refresh(n)
            scale = 2.0 ** (-(trending._newest_s - trending._t0) / trending.half_life_s)
            for scope in changed:
                values = reference[scope] = dict(trending._counts[scope])
                best = heapq.nlargest(n, values.items(), key=lambda kv: kv[1])
                assert trending.top(scope) == tuple((item, v * scale) for item, v in best)
    assert len(reference) > 10


def test_ties_keep_the_order_items_were_first_counted() -> None:
    counts = TrendingCounts(half_life_s=60)
    for item in ("c", "a", "b", "a"):
        counts.add(item, 1.0, ts_s=0.0, device=None, country=None)
    counts.add("c", 1.0, ts_s=0.0, device=None, country=None)
    counts.refresh(2)
    assert counts.top(ALL) == (("c", 2.0), ("a", 2.0))


def test_derived_values_are_rebuilt_after_a_refresh() -> None:
    counts = TrendingCounts(half_life_s=60)
    built: list[int] = []

    def build(top: tuple[tuple[str, float], ...]) -> int:
        built.append(len(top))
        return len(top)

    counts.add("a", 1.0, ts_s=0.0, device=None, country=None)
    counts.refresh(5)
    assert counts.derived(ALL, "n", build) == 1
    assert counts.derived(ALL, "n", build) == 1
    counts.add("b", 1.0, ts_s=0.0, device=None, country=None)
    counts.refresh(5)
    assert counts.derived(ALL, "n", build) == 2
    assert built == [1, 2]
