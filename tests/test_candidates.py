"""Candidate sources give exactly what the straightforward per-item code gave.

The reference functions below are the first implementation of :mod:`serving.candidates`
(a dict of best candidates per item, sorted; ``zip_longest`` round-robin): the vectorised
sources must return the same items, in the same order, with the same priors, reasons and
sources, on a small random catalog with duplicated seeds, unknown items, tied weights and
seeds that only have a text vector.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import zip_longest

import numpy as np
import pytest

from serving.candidates import (
    Candidate,
    Ranked,
    co_visited,
    merge,
    recency_weight,
    similar_to_recent,
    trending,
)
from serving.catalog import Catalog
from serving.trending import ALL, Scope, TrendingCounts

GRAPH, TEXT = 8, 6


def _catalog(n: int = 150, seed: int = 3) -> Catalog:
    rng = np.random.default_rng(seed)
    catalog = Catalog(graph_dim=GRAPH, text_dim=TEXT)
    ids = [f"i{i}" for i in range(n)]
    catalog.upsert_profiles([{"item_id": item, "category": f"c{i % 4}", "title": f"T{i}",
                              "price": 1.0, "created_at_s": i, "ts_us": 1}
                             for i, item in enumerate(ids)])
    graph_valid = np.arange(n) % 5 != 0  # every fifth item: text vector only
    catalog.upsert_vectors(ids, [1] * n, rng.normal(size=(n, GRAPH)).astype(np.float32),
                           rng.normal(size=(n, TEXT)).astype(np.float32),
                           graph_valid=graph_valid)
    return catalog


def _name(catalog: Catalog, item_id: str) -> str:
    return catalog.title(item_id) or item_id


def _best(entries: list[tuple[str, float, str]], source: str) -> list[Candidate]:
    best: dict[str, Candidate] = {}
    for item, prior, reason in entries:
        seen = best.get(item)
        if seen is None or prior > seen.prior:
            best[item] = Candidate(item, prior, source, reason)
    return sorted(best.values(), key=lambda c: -c.prior)


def reference_similar(catalog: Catalog, recent: Sequence[str], *, seeds: int,
                      per_seed: int) -> list[Candidate]:
    chosen = list(recent[:seeds])
    position = {item: i for i, item in enumerate(chosen)}
    entries = []
    for seed, hits, _space in catalog.neighbours(chosen, per_seed):
        weight = recency_weight(position[seed])
        reason = f"similar to {_name(catalog, seed)} you viewed"
        entries += [(item, max(similarity, 0.0) * weight, reason) for item, similarity in hits]
    return _best(entries, "similar")


def reference_co_visited(catalog: Catalog, recent: Sequence[str], neighbors: list, weights: list,
                         *, per_seed: int) -> list[Candidate]:
    entries = []
    for position, (seed, items, scores) in enumerate(zip(recent, neighbors, weights,
                                                         strict=True)):
        if not items:
            continue
        items = items[:per_seed]
        values = ([1.0] * len(items) if scores is None
                  else [float(s) for s in scores[: len(items)]])
        top = max(values, default=0.0) or 1.0
        weight = recency_weight(position)
        reason = f"often viewed with {_name(catalog, seed)}"
        entries += [(item, max(score, 0.0) / top * weight, reason)
                    for item, score in zip(items, values, strict=False)]
    return _best(entries, "co_visited")


def reference_merge(sources: Sequence[Sequence[Candidate]], *, limit: int,
                    exclude: frozenset[str]) -> list[Candidate]:
    taken: dict[str, Candidate] = {}
    for row in zip_longest(*sources):
        for candidate in row:
            if candidate is None or candidate.item_id in taken or candidate.item_id in exclude:
                continue
            taken[candidate.item_id] = candidate
            if len(taken) >= limit:
                return list(taken.values())
    return list(taken.values())


def test_neighbours_are_the_nearest_items_by_cosine() -> None:
    catalog = _catalog()
    index = catalog.number
    graph, has = catalog.graph.rows(np.arange(len(catalog)))
    unit = graph / np.maximum(np.linalg.norm(graph, axis=1, keepdims=True), 1e-12)
    for seed, hits, space in catalog.neighbours(["i1", "i7", "i5", "nope"], 10):
        assert seed != "i5" or space == "text"
        if space == "graph":
            sims = unit[[catalog.number[i] for i, _ in hits]] @ unit[index[seed]]
            np.testing.assert_allclose(sims, [s for _, s in hits], atol=1e-5)
            exact = unit[has] @ unit[index[seed]]
            assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
            assert hits[0][1] == pytest.approx(np.sort(exact)[-2], abs=1e-5)
        assert seed not in [item for item, _ in hits]
    assert [seed for seed, _, _ in catalog.neighbours(["i5", "i1", "nope", "i7"], 3)] == [
        "i1", "i7", "i5"]


def test_similar_candidates_equal_the_straightforward_code() -> None:
    catalog = _catalog()
    rng = random.Random(5)
    items = [f"i{i}" for i in range(150)] + ["unknown"]
    for _ in range(60):
        recent = [rng.choice(items) for _ in range(rng.randint(0, 8))]
        for seeds, per_seed in ((5, 12), (3, 40)):
            got = similar_to_recent(catalog, recent, seeds=seeds, per_seed=per_seed)
            assert list(got) == reference_similar(catalog, recent, seeds=seeds,
                                                  per_seed=per_seed)


def test_co_visited_candidates_equal_the_straightforward_code() -> None:
    catalog = _catalog()
    rng = random.Random(9)
    pool = [f"i{i}" for i in range(40)] + ["gone1", "gone2"]
    for _ in range(200):
        recent = [rng.choice(pool) for _ in range(rng.randint(1, 5))]
        neighbors: list = []
        weights: list = []
        for _ in recent:
            row = rng.sample(pool, rng.randint(0, 12)) if rng.random() > 0.15 else None
            neighbors.append(row)
            size = len(row or ()) - rng.choice([0, 0, 0, 2])
            # Small integers: co-visitation counts tie often.
            scores = [float(rng.randint(-1, 3)) for _ in range(max(size, 0))]
            weights.append(rng.choice([None, scores, np.asarray(scores, dtype=np.float32)]))
        per_seed = rng.choice([3, 8, 40])
        got = co_visited(catalog, recent, neighbors, weights, per_seed=per_seed)
        assert list(got) == reference_co_visited(catalog, recent, neighbors, weights,
                                                 per_seed=per_seed)


def test_merge_equals_the_straightforward_round_robin() -> None:
    rng = random.Random(2)
    for _ in range(200):
        sources: list[Sequence[Candidate]] = []
        for s in range(rng.randint(0, 6)):
            n = rng.randint(0, 15)
            cands = [Candidate(f"i{rng.randint(0, 30)}", rng.random(), f"s{s}", "r")
                     for _ in range(n)]
            sources.append(cands if s % 2 else Ranked(
                [c.item_id for c in cands], [c.prior for c in cands],
                [c.reason for c in cands], f"s{s}"))
        exclude = frozenset(f"i{rng.randint(0, 30)}" for _ in range(3))
        limit = rng.randint(0, 40)
        assert merge(sources, limit=limit, exclude=exclude) == reference_merge(
            sources, limit=limit, exclude=exclude)


def test_ranked_reads_like_a_list_of_candidates() -> None:
    ranked = Ranked(["a", "b", "c"], [0.9, 0.5, 0.1], ["r1", "r2", "r3"], "co_visited")
    as_list = [Candidate("a", 0.9, "co_visited", "r1"), Candidate("b", 0.5, "co_visited", "r2"),
               Candidate("c", 0.1, "co_visited", "r3")]
    assert list(ranked) == as_list
    assert len(ranked) == 3 and ranked[-1] == as_list[-1]
    assert ranked[1:] == as_list[1:]


def test_neighbours_follow_a_catalog_change() -> None:
    catalog = _catalog()
    before = catalog.neighbours(["i1"], 5)
    assert catalog.neighbours(["i1"], 5) == before  # served from the memo, same answer
    vector = catalog.graph.rows(np.array([catalog.number["i1"]]))[0]
    catalog.upsert_profiles([{"item_id": "twin", "category": "c0", "title": "Twin",
                              "price": 1.0, "created_at_s": 1, "ts_us": 1}])
    catalog.upsert_vectors(["twin"], [1], vector, None)
    after = catalog.neighbours(["i1"], 5)
    assert after[0][1][0][0] == "twin"
    assert [item for item, _ in after[0][1][1:]] == [item for item, _ in before[0][1][:4]]
    assert catalog.neighbours(["i1"], 3)[0][1] == after[0][1][:3]


def test_trending_candidates_follow_each_refresh() -> None:
    counts = TrendingCounts(half_life_s=3600)
    counts.add("a", 1.0, ts_s=0.0, device="mobile", country="DE")
    counts.refresh(10)
    first = trending(counts, ALL, n=5)
    assert first == [Candidate("a", 1.0, "trending", "trending now")]
    first.clear()  # a caller's list is its own
    assert trending(counts, ALL, n=5) == [Candidate("a", 1.0, "trending", "trending now")]
    counts.add("b", 4.0, ts_s=0.0, device="mobile", country="DE")
    counts.refresh(10)
    assert [(c.item_id, c.prior) for c in trending(counts, ALL, n=5)] == [("b", 1.0),
                                                                          ("a", 0.25)]
    assert trending(counts, Scope("mobile", "DE"), n=1) == [
        Candidate("b", 1.0, "trending_context", "trending on mobile in DE")]
