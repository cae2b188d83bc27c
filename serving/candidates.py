"""Candidate generation: a few hundred plausible items for one request, each with a reason.

Four sources, each a plain function returning :class:`Candidate` lists best first:

* :func:`similar_to_recent` — nearest neighbours of the user's recent items in graph space
  (text space for items without a graph vector): "similar to <title> you viewed";
* :func:`co_visited` — the ``item_neighbors`` rows of the recent items (co-occurrence in
  sessions): "often viewed with <title>";
* :func:`trending` — the in-process decayed counts of the request's context and overall:
  "trending on mobile in DE";
* :func:`fresh` — the newest catalog items of the categories the user is browsing (all
  categories for a cold user): "new in Shoes".

:func:`merge` interleaves the sources round-robin — so no single source crowds out the
others — drops duplicates (the first reason wins) and excluded items, and stops at the
limit. Every candidate carries a ``prior`` in [0, 1] from its source, the score of the
fallback ranking when no model is available.

Examples
--------
>>> a = [Candidate("i1", 0.9, "similar", "similar to X you viewed"),
...      Candidate("i2", 0.8, "similar", "similar to X you viewed")]
>>> b = [Candidate("i2", 1.0, "trending", "trending now"),
...      Candidate("i3", 0.5, "trending", "trending now")]
>>> [(c.item_id, c.source) for c in merge([a, b], limit=10, exclude={"i3"})]
[('i1', 'similar'), ('i2', 'trending')]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest

import numpy as np

from serving.catalog import Catalog
from serving.trending import ALL, Scope, TrendingCounts, scope_label, scopes_of

__all__ = [
    "Candidate",
    "co_visited",
    "context_scope",
    "fresh",
    "merge",
    "recency_weight",
    "similar_to_recent",
    "source_counts",
    "trending",
]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One proposed item: where it came from, why, and the source's own score."""

    item_id: str
    prior: float
    source: str
    reason: str


def recency_weight(position: int) -> float:
    """How much a recent item at ``position`` (0 = newest) speaks for the user now.

    >>> [round(recency_weight(p), 2) for p in range(4)]
    [1.0, 0.67, 0.5, 0.4]
    """
    return 2.0 / (2.0 + position)


def _name(catalog: Catalog, item_id: str) -> str:
    return catalog.title(item_id) or item_id


def similar_to_recent(
    catalog: Catalog, recent: Sequence[str], *, seeds: int, per_seed: int
) -> list[Candidate]:
    """Nearest neighbours of the ``seeds`` newest recent items, best (similarity x recency)
    first."""
    chosen = list(recent[:seeds])
    if not chosen:
        return []
    position = {item: i for i, item in enumerate(chosen)}
    best: dict[str, Candidate] = {}
    for seed, hits, _space in catalog.neighbours(chosen, per_seed):
        weight = recency_weight(position[seed])
        reason = f"similar to {_name(catalog, seed)} you viewed"
        for item, similarity in hits:
            prior = max(similarity, 0.0) * weight
            seen = best.get(item)
            if seen is None or prior > seen.prior:
                best[item] = Candidate(item, prior, "similar", reason)
    return sorted(best.values(), key=lambda c: -c.prior)


def co_visited(
    catalog: Catalog,
    recent: Sequence[str],
    neighbors: Sequence[Sequence[str] | None],
    weights: Sequence[Sequence[float] | np.ndarray | None],
    *,
    per_seed: int,
) -> list[Candidate]:
    """The best ``per_seed`` co-visitation neighbours of each recent item (``item_neighbors``
    rows in ``recent`` order), weight relative to the seed's best neighbour x recency."""
    best: dict[str, Candidate] = {}
    for position, (seed, items, scores) in enumerate(
        zip(recent, neighbors, weights, strict=True)
    ):
        if not items:
            continue
        items = items[:per_seed]
        values = [1.0] * len(items) if scores is None else [float(s) for s in
                                                             scores[: len(items)]]
        top = max(values, default=0.0) or 1.0
        weight = recency_weight(position)
        reason = f"often viewed with {_name(catalog, seed)}"
        for item, score in zip(items, values, strict=False):
            prior = max(score, 0.0) / top * weight
            seen = best.get(item)
            if seen is None or prior > seen.prior:
                best[item] = Candidate(item, prior, "co_visited", reason)
    return sorted(best.values(), key=lambda c: -c.prior)


def context_scope(counts: TrendingCounts, device: str | None, country: str | None) -> Scope:
    """The most specific scope of the request that has trending data (else :data:`ALL`)."""
    return next((s for s in scopes_of(device, country) if counts.top(s)), ALL)


def trending(counts: TrendingCounts, scope: Scope, *, n: int) -> list[Candidate]:
    """The top ``n`` items of ``scope``, prior relative to the scope's best."""
    top = counts.top(scope)[:n]
    if not top:
        return []
    best = top[0][1] or 1.0
    reason = f"trending {scope_label(scope)}"
    source = "trending" if scope == ALL else "trending_context"
    return [Candidate(item, value / best, source, reason) for item, value in top]


def fresh(catalog: Catalog, categories: Sequence[str]) -> list[Candidate]:
    """The newest items of ``categories`` (all categories with new items when empty)."""
    chosen = list(dict.fromkeys(categories)) or catalog.fresh_categories()
    lists = [catalog.fresh(category) for category in chosen]
    out = []
    # Interleaved: the newest of each category before the second newest of any.
    for rank, row in enumerate(zip_longest(*lists)):
        for category, item in zip(chosen, row, strict=True):
            if item is not None:
                out.append(Candidate(item, 0.5 / (1 + rank), "fresh", f"new in {category}"))
    return out


def merge(
    sources: Sequence[Sequence[Candidate]], *, limit: int, exclude: set[str] | frozenset[str]
) -> list[Candidate]:
    """Round-robin over ``sources``: unique items, none of ``exclude``, at most ``limit``."""
    taken: dict[str, Candidate] = {}
    for row in zip_longest(*sources):
        for candidate in row:
            if candidate is None or candidate.item_id in taken:
                continue
            if candidate.item_id in exclude:
                continue
            taken[candidate.item_id] = candidate
            if len(taken) >= limit:
                return list(taken.values())
    return list(taken.values())


def source_counts(candidates: Iterable[Candidate]) -> Mapping[str, int]:
    """Candidates per source (for the ``streamrec_api_candidates`` histogram)."""
    counts: dict[str, int] = {}
    for candidate in candidates:
        counts[candidate.source] = counts.get(candidate.source, 0) + 1
    return counts
