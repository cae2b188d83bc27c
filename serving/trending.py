"""What is popular right now, per request context, and what each user just bought.

Both live in the API process and are fed by :class:`~serving.feed.EventFeed` from the
``events`` topic, so they keep working when the online store is down — they are the
fallback of a degraded answer — and react to an event within a poll.

:class:`TrendingCounts` keeps exponentially decayed interaction counts per item in several
*scopes*: overall, per device, per country and per (device, country). Decay follows event
time with a half-life, stored the usual way: an event at ``t`` adds
``weight * 2 ** ((t - t0) / half_life)`` for a fixed reference ``t0``, so nothing has to be
decayed on the way and only the reference moves (rarely) to keep numbers finite. Requests
read :meth:`TrendingCounts.top`, a list per scope recomputed by the feeding thread at most
every ``refresh_s``, never sorted on the request path.

:class:`RecentPurchases` remembers the last items each user bought (bounded per user and in
users, least recently active forgotten first): the "already purchased" filter.

Examples
--------
>>> counts = TrendingCounts(half_life_s=3600)
>>> counts.add("i1", 2.0, ts_s=1000.0, device="mobile", country="DE")
>>> counts.add("i2", 1.0, ts_s=1000.0, device="desktop", country="DE")
>>> counts.add("i2", 1.0, ts_s=4600.0, device="desktop", country="FR")
>>> counts.refresh(n=10)
>>> [item for item, _ in counts.top(Scope("mobile", "DE"))]
['i1']
>>> [(item, round(score, 2)) for item, score in counts.top(ALL)]
[('i2', 1.5), ('i1', 1.0)]
>>> purchases = RecentPurchases(per_user=2)
>>> for item in ("a", "b", "c"):
...     purchases.add("u1", item)
>>> sorted(purchases.of("u1"))
['b', 'c']
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from functools import lru_cache
from typing import NamedTuple, TypeVar, cast

import numpy as np

__all__ = ["ALL", "RecentPurchases", "Scope", "TrendingCounts", "scope_label"]


class Scope(NamedTuple):
    """A slice of traffic: a device, a country, both, or neither (:data:`ALL`).

    A named tuple: every event looks up its four scopes, and a tuple hashes in C.
    """

    device: str | None = None
    country: str | None = None


ALL = Scope()

Top = tuple[tuple[str, float], ...]
"""A scope's top list: ``(item_id, decayed count)``, best first."""

T = TypeVar("T")


def scope_label(scope: Scope) -> str:
    """Words for a reason: ``on mobile in DE``, ``in DE``, ``on mobile`` or ``now``.

    >>> scope_label(Scope("mobile", "DE")), scope_label(ALL)
    ('on mobile in DE', 'now')
    """
    parts = []
    if scope.device:
        parts.append(f"on {scope.device}")
    if scope.country:
        parts.append(f"in {scope.country}")
    return " ".join(parts) or "now"


@lru_cache(maxsize=4096)
def scopes_of(device: str | None, country: str | None) -> tuple[Scope, ...]:
    """The scopes an event (or a request) belongs to, most specific first."""
    scopes = []
    if device and country:
        scopes.append(Scope(device, country))
    if country:
        scopes.append(Scope(None, country))
    if device:
        scopes.append(Scope(device, None))
    scopes.append(ALL)
    return tuple(scopes)


# Beyond 2**_REBASE_EXP the weights are rescaled: far below float64's 2**1023.
_REBASE_EXP = 400.0
_FORGET_BELOW = 1e-3
"""A count decayed below this (about ten half-lives of a single view) is dropped."""


class TrendingCounts:
    """Exponentially decayed item counts per scope, with cached top lists.

    Parameters
    ----------
    half_life_s
        An interaction counts half as much this many seconds later.

    :meth:`add` and :meth:`refresh` are for one feeding thread; :meth:`top` may be called
    from any thread (it reads an immutable snapshot).
    """

    def __init__(self, half_life_s: float) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = half_life_s
        self._t0: float | None = None
        self._counts: dict[Scope, dict[str, float]] = {}
        self._dirty: set[Scope] = set()
        self._tops: Mapping[Scope, Top] = {}
        # Safe from any thread: one dict assignment per entry; a stale entry is rebuilt.
        self._derived: dict[tuple[Scope, Hashable], tuple[Top, object]] = {}
        self._newest_s = 0.0

    def add(
        self, item_id: str, weight: float, *, ts_s: float, device: str | None,
        country: str | None,
    ) -> None:
        """Count ``weight`` for ``item_id`` at event time ``ts_s`` in every matching scope."""
        if self._t0 is None:
            self._t0 = ts_s
        exponent = (ts_s - self._t0) / self.half_life_s
        if exponent > _REBASE_EXP:
            self._rebase(ts_s)
            exponent = 0.0
        value = weight * 2.0 ** exponent
        for scope in scopes_of(device, country):
            counts = self._counts.get(scope)
            if counts is None:
                counts = self._counts[scope] = {}
            counts[item_id] = counts.get(item_id, 0.0) + value
            self._dirty.add(scope)
        if ts_s > self._newest_s:
            self._newest_s = ts_s

    def _rebase(self, ts_s: float) -> None:
        assert self._t0 is not None
        factor = 2.0 ** (-(ts_s - self._t0) / self.half_life_s)
        self._t0 = ts_s
        for counts in self._counts.values():
            for item in list(counts):
                value = counts[item] * factor
                if value < _FORGET_BELOW:
                    del counts[item]
                else:
                    counts[item] = value
        self._dirty.update(self._counts)

    def refresh(self, n: int, pause: Callable[[], object] | None = None) -> None:
        """Recompute the top ``n`` of every scope that changed since the last refresh,
        calling ``pause`` before each (the feed yields to requests there).

        Scores are expressed as decayed counts *as of the newest event seen*, so they read
        as "interactions, recently".
        """
        if not self._dirty or self._t0 is None:
            return
        scale = 2.0 ** (-(self._newest_s - self._t0) / self.half_life_s)
        tops = dict(self._tops)
        for scope in self._dirty:
            if pause is not None:
                pause()
            counts = self._counts.get(scope, {})
            items = list(counts)
            values = np.fromiter(counts.values(), dtype=np.float64, count=len(items))
            best = _largest(values, n)
            tops[scope] = tuple(zip([items[i] for i in best.tolist()],
                                    (values[best] * scale).tolist(), strict=True))
        self._dirty = set()
        self._tops = tops

    def top(self, scope: Scope) -> Top:
        """``(item_id, decayed count)`` of the scope, best first, as of the last refresh."""
        return self._tops.get(scope, ())

    def derived(self, scope: Scope, key: Hashable, build: Callable[[Top], T]) -> T:
        """``build(self.top(scope))``, memoised under ``key`` until the scope's top list
        changes: what requests make of a top list is made once per refresh, not per request.
        """
        top = self.top(scope)
        held = self._derived.get((scope, key))
        if held is not None and held[0] is top:
            return cast(T, held[1])
        value = build(top)
        self._derived[(scope, key)] = (top, value)
        return value

    def scopes(self) -> list[Scope]:
        """Scopes with a top list."""
        return list(self._tops)


def _largest(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest ``values``, largest first, ties in position order
    (what ``heapq.nlargest`` gives, in numpy: a refresh ranks thousands of items).

    >>> _largest(np.array([1.0, 3.0, 2.0, 3.0]), 3).tolist()
    [1, 3, 2]
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if len(values) > n:
        nth = np.partition(values, len(values) - n)[len(values) - n]
        chosen = np.flatnonzero(values >= nth)
    else:
        chosen = np.arange(len(values))
    return chosen[np.argsort(-values[chosen], kind="stable")][:n]


class RecentPurchases:
    """The last ``per_user`` items each of the last ``max_users`` buyers purchased.

    Thread-safe: one feeding thread adds, request threads read.
    """

    def __init__(self, per_user: int = 50, max_users: int = 200_000) -> None:
        self.per_user = per_user
        self.max_users = max_users
        self._by_user: OrderedDict[str, dict[str, None]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user_id: str, item_id: str) -> None:
        with self._lock:
            items = self._by_user.get(user_id)
            if items is None:
                items = self._by_user[user_id] = {}
                if len(self._by_user) > self.max_users:
                    self._by_user.popitem(last=False)
            else:
                self._by_user.move_to_end(user_id)
            items.pop(item_id, None)
            items[item_id] = None
            if len(items) > self.per_user:
                del items[next(iter(items))]

    def of(self, user_id: str) -> frozenset[str]:
        """Items the user bought recently (empty for anyone else)."""
        with self._lock:
            items = self._by_user.get(user_id)
            return frozenset(items) if items else frozenset()


def event_weight(event_type: str) -> float:
    """How much an interaction says about popularity; impressions say nothing.

    >>> event_weight("view"), event_weight("purchase"), event_weight("impression")
    (1.0, 4.0, 0.0)
    """
    return _WEIGHTS.get(event_type, 0.0)


_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 4.0}
