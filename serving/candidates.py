"""Candidate generation: a few hundred plausible items for one request, each with a reason.

Four sources, each a plain function returning a sequence of :class:`Candidate` best first:

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

The sources run on every request, so they are cheap: neighbours come from the catalog's
per-seed memo (:meth:`Catalog.near <serving.catalog.Catalog.near>`) as arrays, duplicates
are resolved in numpy, a source's candidates are built only as :func:`merge` reaches them
(:class:`Ranked`), and trending candidates are built once per refresh of the counts.

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

from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from itertools import chain, cycle, islice, repeat, zip_longest
from typing import NamedTuple, overload

import numpy as np

from serving.catalog import Catalog
from serving.trending import ALL, Scope, Top, TrendingCounts, scope_label, scopes_of

__all__ = [
    "Candidate",
    "Ranked",
    "co_visited",
    "context_scope",
    "fresh",
    "merge",
    "recency_weight",
    "similar_to_recent",
    "source_counts",
    "trending",
]


class Candidate(NamedTuple):
    """One proposed item: where it came from, why, and the source's own score.

    A named tuple: a request builds hundreds and a tuple is the cheapest immutable record.
    """

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


_record = partial(tuple.__new__, Candidate)
"""A :class:`Candidate` from a 4-tuple without the named tuple's Python-level
``__new__``: the records :func:`merge` reads cost half as much (200: 59 → 34 µs)."""


class Ranked(Sequence[Candidate]):
    """One source's candidates, best first, held as columns and made into
    :class:`Candidate` records only when read: :func:`merge` reads the first few dozen of
    each source, so most of a source's tail is never built.

    >>> ranked = Ranked(["i1", "i2"], [0.9, 0.5], ["r1", "r2"], "similar")
    >>> len(ranked), ranked[1]
    (2, Candidate(item_id='i2', prior=0.5, source='similar', reason='r2'))
    """

    __slots__ = ("item_ids", "priors", "reasons", "source")

    def __init__(
        self, item_ids: list[str], priors: list[float], reasons: list[str], source: str
    ) -> None:
        self.item_ids, self.priors, self.reasons, self.source = item_ids, priors, reasons, source

    def __len__(self) -> int:
        return len(self.item_ids)

    @overload
    def __getitem__(self, index: int) -> Candidate: ...

    @overload
    def __getitem__(self, index: slice) -> list[Candidate]: ...

    def __getitem__(self, index: int | slice) -> Candidate | list[Candidate]:
        if isinstance(index, slice):
            return list(map(_record, zip(self.item_ids[index], self.priors[index],
                                         repeat(self.source), self.reasons[index])))
        return _record((self.item_ids[index], self.priors[index], self.source,
                        self.reasons[index]))

    def __iter__(self) -> Iterator[Candidate]:
        return map(_record, zip(self.item_ids, self.priors, repeat(self.source), self.reasons))

    def __repr__(self) -> str:
        return f"Ranked({list(self)!r})"


def _best_first(
    items: Sequence[Hashable], priors: np.ndarray, reasons: Sequence[str], source: str
) -> Ranked:
    """One candidate per item, best first: the item's highest prior with the reason of its
    first entry that has it; ties in order of the items' first entries."""
    unique = list(dict.fromkeys(items))
    codes = dict(zip(unique, range(len(unique)), strict=True))
    code = np.fromiter(map(codes.__getitem__, items), dtype=np.int64, count=len(priors))
    by_prior = np.argsort(-priors, kind="stable")
    _, first = np.unique(code[by_prior], return_index=True)
    winners = by_prior[first]  # by code, and codes number the items in order of entry
    order = np.argsort(-priors[winners], kind="stable")
    chosen = winners[order].tolist()
    return Ranked([unique[i] for i in order.tolist()], priors[chosen].tolist(),
                  [reasons[i] for i in chosen], source)


def similar_to_recent(
    catalog: Catalog, recent: Sequence[str], *, seeds: int, per_seed: int
) -> Sequence[Candidate]:
    """Nearest neighbours of the ``seeds`` newest recent items, best (similarity x recency)
    first."""
    chosen = list(recent[:seeds])
    found = catalog.near(chosen, per_seed) if chosen else []
    if not found:
        return []
    position = {item: i for i, item in enumerate(chosen)}
    items = list(chain.from_iterable(near.items for _, near in found))
    priors = np.concatenate([np.maximum(near.sims, 0.0) * recency_weight(position[seed])
                             for seed, near in found])
    reasons = list(chain.from_iterable(
        repeat(f"similar to {_name(catalog, seed)} you viewed", len(near.items))
        for seed, near in found))
    return _best_first(items, priors, reasons, "similar")


def co_visited(
    catalog: Catalog,
    recent: Sequence[str],
    neighbors: Sequence[Sequence[str] | None],
    weights: Sequence[Sequence[float] | np.ndarray | None],
    *,
    per_seed: int,
) -> Sequence[Candidate]:
    """The best ``per_seed`` co-visitation neighbours of each recent item (``item_neighbors``
    rows in ``recent`` order), weight relative to the seed's best neighbour x recency."""
    items: list[str] = []
    priors: list[np.ndarray] = []
    reasons: list[str] = []
    for position, (seed, row, scores) in enumerate(
        zip(recent, neighbors, weights, strict=True)
    ):
        if not row:
            continue
        values = (np.ones(min(len(row), per_seed)) if scores is None
                  else np.asarray(scores[: min(len(row), per_seed)], dtype=np.float64))
        top = (values.max() if len(values) else 0.0) or 1.0
        items += row[: len(values)]
        priors.append(np.maximum(values, 0.0) / top * recency_weight(position))
        reasons += repeat(f"often viewed with {_name(catalog, seed)}", len(values))
    if not items:
        return []
    return _best_first(items, np.concatenate(priors), reasons, "co_visited")


def context_scope(counts: TrendingCounts, device: str | None, country: str | None) -> Scope:
    """The most specific scope of the request that has trending data (else :data:`ALL`)."""
    return next((s for s in scopes_of(device, country) if counts.top(s)), ALL)


def trending(counts: TrendingCounts, scope: Scope, *, n: int) -> list[Candidate]:
    """The top ``n`` items of ``scope``, prior relative to the scope's best."""
    return list(counts.derived(scope, ("candidates", n), partial(_trending, scope, n)))


def _trending(scope: Scope, n: int, top: Top) -> tuple[Candidate, ...]:
    top = top[:n]
    if not top:
        return ()
    best = top[0][1] or 1.0
    reason = f"trending {scope_label(scope)}"
    source = "trending" if scope == ALL else "trending_context"
    return tuple(Candidate(item, value / best, source, reason) for item, value in top)


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
    # The itertools documentation's ``roundrobin``, inlined: the first of each source, then
    # the second of each, ...; a source that runs out ends the cycle, which restarts
    # without it.
    iterators: Iterator[Iterator[Candidate]] = map(iter, sources)
    for active in range(len(sources), 0, -1):
        iterators = cycle(islice(iterators, active))
        for candidate in map(next, iterators):
            item = candidate.item_id
            if item in taken or item in exclude:
                continue
            taken[item] = candidate
            if len(taken) >= limit:
                return list(taken.values())
    return list(taken.values())


def source_counts(candidates: Iterable[Candidate]) -> Mapping[str, int]:
    """Candidates per source (for the ``streamrec_api_candidates`` histogram)."""
    counts: dict[str, int] = {}
    for candidate in candidates:
        counts[candidate.source] = counts.get(candidate.source, 0) + 1
    return counts
