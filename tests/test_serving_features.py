"""The API's fast feature path reads what a plain Feast read of the service gives.

Serving reads ``item_realtime`` as its packed twin, through a near cache, with the catalog
views from the catalog snapshot; each shortcut is held here to the straightforward read.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from api_world import populate

from features.packed import ITEM_VECTOR
from features.store import RANKER_SERVICE, OnlineFeatureReader, OnlineFeatureWriter
from serving.feature_cache import NearCache, NumericNearCache
from serving.metrics import ServingMetrics
from serving.recommend import read_features, read_users
from serving.runtime import ServingRuntime
from streaming.broker import free_port
from streamrec.settings import Settings


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and np.array_equal(a, b)
    return type(a) is type(b) and a == b if a is not None else b is None


def _same_number(a: float, b: Any) -> bool:
    """A float column's value (NaN: none; packed and catalog numbers) against the view's own."""
    return math.isnan(a) if b is None else float(b) == a


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home")
    if request.param == "redis":
        import redis

        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        settings = settings.model_copy(update={"online_store": "redis", "redis_url": url})
    return settings


def test_the_packed_twin_reads_back_as_the_view_itself(store_settings: Settings) -> None:
    world = populate(store_settings, n_users=40, n_items=80, n_events=600)
    items = [*[item.item_id for item in world.items][:60], "never-seen"]
    reader = OnlineFeatureReader(store_settings)
    refs = [f"item_realtime:{name}" for name in ITEM_VECTOR.source.names]
    plain = reader.read(refs, {"item_id": items}, full_feature_names=True)
    vectors = reader.read([f"{ITEM_VECTOR.name}:{ITEM_VECTOR.feature}"], {"item_id": items})
    packed = ITEM_VECTOR.unpack(vectors[ITEM_VECTOR.feature])
    assert set(packed) == {ref.replace(":", "__") for ref in refs}
    assert np.nansum(packed["item_realtime__views_24h"][:-1]) > 0  # not all empty
    for column, values in packed.items():
        assert values.dtype == np.float64
        assert all(_same_number(a, b) for a, b in zip(values, plain[column], strict=True)), \
            column
    assert all(np.isnan(values[-1]) for values in packed.values())


def test_a_newer_row_replaces_the_packed_twin_too(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    world = populate(settings, n_users=20, n_items=40, n_events=200)
    rows = OnlineFeatureReader(settings).read(
        ["item_realtime:views_24h"], {"item_id": [i.item_id for i in world.items]})
    item = next(i for i, views in zip(rows["item_id"], rows["views_24h"], strict=True) if views)
    row = dict(world.engine.item_row(item))
    row["views_24h"] += 5
    row["event_timestamp"] = row["event_timestamp"].replace(year=row["event_timestamp"].year + 1)
    with OnlineFeatureWriter(settings) as writer:
        writer.write("item_realtime", [row])
    vectors = OnlineFeatureReader(settings).read(
        [f"{ITEM_VECTOR.name}:{ITEM_VECTOR.feature}"], {"item_id": [item]})
    assert ITEM_VECTOR.unpack(vectors[ITEM_VECTOR.feature])[
        "item_realtime__views_24h"].tolist() == [row["views_24h"]]


@pytest.mark.parametrize("catalog", [True, False], ids=["catalog", "store-only"])
def test_request_features_equal_a_full_read_of_the_service(tmp_path: Path,
                                                            catalog: bool) -> None:
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=f"127.0.0.1:{free_port()}",
                        serving_catalog_refresh_s=0.2, serving_catalog_features=catalog,
                        serving_item_features_max_age_ms=60_000)
    world = populate(settings, n_users=40, n_items=80, n_events=600)
    runtime = ServingRuntime(settings, ServingMetrics())
    runtime.start()
    try:
        assert runtime.catalog.wait_loaded(30)
        user = world.users[0]
        ids = [*[item.item_id for item in world.items][:50], "never-seen"]
        for _ in range(2):  # the second answer comes from the near cache
            fast = {name: [value] * len(ids)
                    for name, value in read_users(runtime, [user])[0].features.items()}
            fast.update(read_features(runtime, ids))
            full = OnlineFeatureReader(settings).read(
                RANKER_SERVICE, {"user_id": [user] * len(ids), "item_id": ids},
                full_feature_names=True)
            assert set(fast) == {name for name in full if "__" in name}
            for column, values in fast.items():
                same = _same_number if isinstance(values, np.ndarray) else _same
                assert all(same(a, b) for a, b in zip(values, full[column], strict=True)), \
                    column
        hits = runtime.metrics.item_features.labels(source="cache")._value.get()
        assert hits == len(ids)
    finally:
        runtime.close()


def _counting_fetch(calls: list[list[str]]) -> Any:
    def fetch(keys: list[str]) -> dict[str, list[Any]]:
        calls.append(keys)
        return {"n": [len(calls)] * len(keys)}

    return fetch


Read = Callable[[list[str], Callable[[list[str]], dict[str, list[Any]]]], dict[str, list[Any]]]


def _cache(kind: str, **options: Any) -> Read:
    """A near cache of one column ``n`` as ``NearCache.read`` answers, whichever ``kind``."""
    if kind == "objects":
        return NearCache(["n"], **options).read
    numeric = NumericNearCache(1, **options)

    def read(keys: list[str], fetch: Callable[[list[str]], dict[str, list[Any]]]
             ) -> dict[str, list[Any]]:
        rows = numeric.read(keys, lambda missing: np.array(fetch(missing)["n"], float)[:, None])
        return {"n": rows[:, 0].tolist()}

    return read


@pytest.mark.parametrize("kind", ["objects", "numbers"])
def test_the_near_cache_reads_again_once_values_are_older_than_the_max_age(kind: str) -> None:
    calls: list[list[str]] = []
    read = _cache(kind, max_age_s=0.05)
    fetch = _counting_fetch(calls)
    assert read(["a", "b", "a"], fetch) == {"n": [1, 1, 1]}
    assert read(["b", "c"], fetch) == {"n": [1, 2]}
    time.sleep(0.06)
    assert read(["a", "c"], fetch) == {"n": [3, 3]}
    assert calls == [["a", "b"], ["c"], ["a", "c"]]
    assert read([], fetch) == {"n": []}


@pytest.mark.parametrize("kind", ["objects", "numbers"])
def test_a_failed_read_caches_nothing_and_a_full_cache_starts_over(kind: str) -> None:
    read = _cache(kind, max_age_s=60, capacity=3)

    def broken(keys: list[str]) -> dict[str, list[Any]]:
        raise ConnectionError("store down")

    with pytest.raises(ConnectionError):
        read(["a"], broken)
    calls: list[list[str]] = []
    fetch = _counting_fetch(calls)
    read(["a", "b"], fetch)
    read(["c", "d"], fetch)  # 4 > 3: forgets a and b
    read(["a", "d"], fetch)
    assert calls == [["a", "b"], ["c", "d"], ["a"]]


def test_the_numeric_cache_gives_each_key_its_own_row_under_concurrent_reads() -> None:
    cache = NumericNearCache(2, max_age_s=0.001, capacity=50)  # expiring and starting over

    def fetch(keys: list[str]) -> np.ndarray:
        time.sleep(0.0005)  # a store read: other threads run meanwhile
        return np.array([[int(k), -int(k)] for k in keys], dtype=float)

    wrong: list[tuple[str, list[float]]] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            keys = [str(k) for k in rng.integers(0, 80, size=30)]
            rows = cache.read(keys, fetch)
            wrong.extend((k, r) for k, r in zip(keys, rows.tolist(), strict=True)
                         if r != [int(k), -int(k)])

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
    assert cache.hits and cache.misses
