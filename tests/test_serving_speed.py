"""The serving fast paths give the numbers of the plain ones.

The ranker's item-parts cache against its full forward pass, the catalog's stable vector
objects the cache relies on, the cache's invalidation when a vector changes, and a frozen
heap that still collects.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.catalog import Catalog
from serving.models import settle_heap
from training.context_ranker import GRAPH_DIM, TEXT_DIM, ContextRanker, ContextRankerConfig
from training.ranking_batch import RankingBatch

CONFIG = ContextRankerConfig(dim=8, hidden=(16,), attention_hidden=8, epochs=2, batch_size=64)
ITEMS = [f"i{j}" for j in range(40)]
CATEGORIES = ["Shoes", "Books", "Games", None]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _catalog(seed: int = 0) -> Catalog:
    rng = np.random.default_rng(seed)
    catalog = Catalog()
    catalog.upsert_profiles(
        {"item_id": item, "category": CATEGORIES[j % 4], "title": item, "price": 10.0 + j,
         "created_at_s": 1000 + j, "ts_us": 1}
        for j, item in enumerate(ITEMS)
    )
    # Every fifth item has no text vector, every seventh no graph vector.
    catalog.upsert_vectors(
        ITEMS, [1] * len(ITEMS),
        rng.normal(size=(len(ITEMS), GRAPH_DIM)).astype(np.float32),
        rng.normal(size=(len(ITEMS), TEXT_DIM)).astype(np.float32),
        graph_valid=np.array([j % 7 != 0 for j in range(len(ITEMS))]),
        text_valid=np.array([j % 5 != 0 for j in range(len(ITEMS))]),
    )
    return catalog


def _request(catalog: Catalog, user: str, items: list[str], recent: list[str]) -> RankingBatch:
    features = {
        "user_realtime__recent_items": [recent] * len(items),
        "user_realtime__views_1h": [3] * len(items),
        "item_realtime__clicks_24h": list(range(len(items))),
        **catalog.item_features(items),
    }
    return RankingBatch.for_request(user, items, features, ts_s=5000.0, device="mobile",
                                    country="de")


def _uncached(ranker: ContextRanker, batch: RankingBatch) -> np.ndarray:
    """The eager network on the full encoding: no cache, no TorchScript."""
    net = ranker.net
    assert net is not None
    with torch.inference_mode():
        return torch.sigmoid(net(*ranker._encode(batch).inputs(slice(None)))).numpy()


@pytest.fixture(scope="module")
def ranker(tmp_path_factory: pytest.TempPathFactory) -> ContextRanker:
    catalog = _catalog()
    rng = np.random.default_rng(1)
    batches = [_request(catalog, f"u{u}", list(rng.choice(ITEMS, 12, replace=False)),
                        list(rng.choice(ITEMS, 3, replace=False))) for u in range(20)]
    train = RankingBatch.concat(batches)
    labels = (rng.random(len(train)) < 0.4).astype(float)
    folder = tmp_path_factory.mktemp("ranker")
    ContextRanker(CONFIG).fit(train, labels).save(folder)
    return ContextRanker.load(folder)  # optimized: the TorchScript scorer, as served


def test_cached_item_parts_score_like_the_full_forward(ranker: ContextRanker) -> None:
    catalog = _catalog()
    batch = _request(catalog, "u1", ITEMS[:30], ["i3", "i4", "unknown"])
    expected = _uncached(ranker, batch)
    first = ranker.score(batch)  # every candidate computed and cached
    cached = len(ranker._items)
    again = ranker.score(_request(catalog, "u2", ITEMS[:30], ["i5"]))  # all cache hits
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
    assert cached >= 30 and len(ranker._items) == cached
    np.testing.assert_allclose(again, _uncached(ranker, _request(catalog, "u2", ITEMS[:30],
                                                                  ["i5"])), rtol=1e-5, atol=1e-6)


def test_a_changed_vector_is_scored_anew(ranker: ContextRanker) -> None:
    catalog = _catalog()
    items = ITEMS[1:9]
    before = ranker.score(_request(catalog, "u1", items, ["i2"]))
    graph = np.random.default_rng(7).normal(size=(1, GRAPH_DIM)).astype(np.float32)
    catalog.upsert_vectors(["i3"], [2], graph, None)
    batch = _request(catalog, "u1", items, ["i2"])
    after = ranker.score(batch)
    np.testing.assert_allclose(after, _uncached(ranker, batch), rtol=1e-5, atol=1e-6)
    changed = items.index("i3")
    assert after[changed] != pytest.approx(before[changed], abs=1e-7)
    np.testing.assert_array_equal(np.delete(after, changed), np.delete(before, changed))


def test_vectors_without_weak_references_are_computed_every_time(ranker: ContextRanker) -> None:
    catalog = _catalog()
    batch = _request(catalog, "u1", ITEMS[:10], [])
    as_lists = RankingBatch(
        batch.user_ids, batch.item_ids, batch.ts_s, batch.device, batch.country,
        {k: ([None if v is None else v.tolist() for v in values] if k.endswith("_vector")
             else values) for k, values in batch.features.items()},
    )
    size = len(ranker._items)
    np.testing.assert_allclose(ranker.score(as_lists), _uncached(ranker, batch), rtol=1e-5,
                               atol=1e-6)
    # Only the rows without any vector object (both missing) could be remembered.
    assert len(ranker._items) - size <= sum(
        g is None and t is None for g, t in zip(batch.column("item_embeddings__graph_vector"),
                                                batch.column("item_embeddings__text_vector"),
                                                strict=True))


def test_a_full_cache_starts_over_and_stays_right(ranker: ContextRanker) -> None:
    catalog = _catalog()
    small = type(ranker._items)(ranker._items.width, capacity=8)
    ranker._items, kept = small, ranker._items
    try:
        for start in (0, 10, 20, 0):
            batch = _request(catalog, "u1", ITEMS[start : start + 10], ["i1"])
            np.testing.assert_allclose(ranker.score(batch), _uncached(ranker, batch),
                                       rtol=1e-5, atol=1e-6)
            assert len(small) <= 8
    finally:
        ranker._items = kept


def test_retraining_forgets_cached_parts(tmp_path: Path) -> None:
    catalog = _catalog()
    batch = _request(catalog, "u1", ITEMS[:12], ["i1", "i2"])
    labels = np.array([1.0, 0.0] * 6)
    model = ContextRanker(CONFIG).fit(batch, labels, valid=(batch, labels))
    model.score(batch)
    model.fit(batch, 1.0 - labels, valid=(batch, 1.0 - labels))
    np.testing.assert_allclose(model.score(batch), _uncached(model, batch), rtol=1e-5,
                               atol=1e-6)


def test_catalog_hands_out_the_same_read_only_vectors_until_they_change() -> None:
    catalog = _catalog()
    first = catalog.item_features(["i1", "i2", "nope", "i5"])
    second = catalog.item_features(["i2", "i1"])
    graphs = first["item_embeddings__graph_vector"]
    assert second["item_embeddings__graph_vector"][1] is graphs[0]
    assert graphs[2] is None and first["item_embeddings__text_vector"][3] is None  # i5: none
    assert not graphs[0].flags.writeable
    new = np.full((1, GRAPH_DIM), 0.5, dtype=np.float32)
    catalog.upsert_vectors(["i1"], [5], new, None)
    third = catalog.item_features(["i1", "i2"])["item_embeddings__graph_vector"]
    assert third[0] is not graphs[0] and np.array_equal(third[0], new[0])
    assert third[1] is graphs[1]
    # Growing the matrix replaces every view (they belonged to the old matrix).
    catalog.upsert_vectors([f"n{j}" for j in range(2000)], [1] * 2000,
                           np.zeros((2000, GRAPH_DIM), dtype=np.float32), None)
    grown = catalog.item_features(["i2"])["item_embeddings__graph_vector"][0]
    assert grown is not graphs[1] and np.array_equal(grown, graphs[1])


def test_a_settled_heap_still_collects_new_garbage() -> None:
    settle_heap()
    try:
        assert gc.get_freeze_count() > 0

        class Node:
            other: Node

        node = Node()
        node.other = node  # a cycle: only the collector frees it
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
