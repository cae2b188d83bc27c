"""A read-through near cache of online feature rows, each at most ``max_age_s`` old.

A recommendation reads the same item views for 200 candidates, and consecutive requests
share most of them (trending items, neighbours of popular items). In Feast's SQLite layout
every (item, feature) is a table row, so the read costs ~1.5 µs per value: about 6 ms per
request for ``item_realtime`` and ``item_stats``. Item aggregates over one hour or more move
little within a fraction of a second, while the issue allows features up to a second old:
this cache keeps each entity's values, read through the store's own online read
(``OnlineFeatureReader``), for ``max_age_s`` and reads only the missing or expired
entities, still as one batched read.

Age is counted from the moment the values were read from the store, so a served value is
at most ``max_age_s`` older than the store's: the feature writer's lag plus ``max_age_s``
bounds how stale it can be. User features never go through it: a user's own actions must
move their next answer.

Examples
--------
>>> calls = []
>>> def read(ids):
...     calls.append(list(ids))
...     return {"item_realtime__views_1h": [len(i) for i in ids]}
>>> cache = NearCache(("item_realtime__views_1h",), max_age_s=60.0)
>>> cache.read(["a", "bb"], read)
{'item_realtime__views_1h': [1, 2]}
>>> cache.read(["bb", "ccc"], read)
{'item_realtime__views_1h': [2, 3]}
>>> calls  # "bb" came from the cache
[['a', 'bb'], ['ccc']]
>>> cache.hits, cache.misses
(1, 3)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from itertools import compress, repeat
from typing import Any

import numpy as np

__all__ = ["NearCache", "NumericNearCache"]


class NearCache:
    """Entity values of fixed ``columns``, kept for ``max_age_s`` after their read.

    Parameters
    ----------
    columns
        Output columns, in the order ``read`` returns them.
    max_age_s
        How long read values are served from memory; ``0`` reads every entity every time.
    capacity
        Entities kept at most; a full cache starts over (cheaper than tracking recency, and
        entries live well under a second anyway).

    ``read`` is safe to call from several threads: the worst a race does is read an entity
    twice.
    """

    def __init__(self, columns: Sequence[str], *, max_age_s: float,
                 capacity: int = 200_000) -> None:
        self.columns = tuple(columns)
        self.max_age_s = max_age_s
        self.capacity = capacity
        self._rows: dict[Any, tuple[float, tuple[Any, ...]]] = {}
        self.hits = 0
        """Entities served from memory."""
        self.misses = 0
        """Entities read from the store."""

    def read(
        self, keys: Sequence[Any], fetch: Callable[[list[Any]], dict[str, list[Any]]]
    ) -> dict[str, list[Any]]:
        """The ``columns`` of ``keys``; ``fetch(missing_keys)`` reads those not fresh here
        (one call, its errors propagate and nothing is cached)."""
        now = time.monotonic()
        oldest = now - self.max_age_s
        get = self._rows.get
        found = [get(key) for key in keys]
        missing = list(dict.fromkeys(
            key for key, entry in zip(keys, found, strict=True)
            if entry is None or entry[0] < oldest
        ))
        if missing:
            fetched = fetch(missing)
            values = list(zip(*(fetched[c] for c in self.columns), strict=True))
            rows = self._rows
            if len(rows) + len(missing) > self.capacity:
                rows.clear()
            fresh = dict(zip(missing, values, strict=True))
            for key, row in fresh.items():
                rows[key] = (now, row)
            found = [entry[1] if entry is not None and entry[0] >= oldest else fresh[key]
                     for key, entry in zip(keys, found, strict=True)]
        else:
            found = [entry[1] for entry in found]  # type: ignore[index]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if not found:
            return {c: [] for c in self.columns}
        return dict(zip(self.columns, map(list, zip(*found, strict=True)), strict=True))


class NumericNearCache:
    """:class:`NearCache` for entities whose values are all numbers: rows of one float64
    matrix (NaN: no value).

    A read of 200 keys is a dictionary lookup per key and one gather, where
    :class:`NearCache` builds and transposes a tuple per key; the values come back as the
    float columns the ranker's numeric features take.

    Parameters
    ----------
    width
        Values per entity.
    max_age_s, capacity
        As :class:`NearCache`.

    ``read`` is safe to call from several threads: the matrix is read and written under a
    lock, the store is read outside it.

    Examples
    --------
    >>> calls = []
    >>> def fetch(keys):
    ...     calls.append(list(keys))
    ...     return np.array([[len(k), 2.0 * len(k)] for k in keys])
    >>> cache = NumericNearCache(2, max_age_s=60.0)
    >>> cache.read(["a", "bb"], fetch).tolist()
    [[1.0, 2.0], [2.0, 4.0]]
    >>> cache.read(["bb", "ccc", "bb"], fetch).tolist()
    [[2.0, 4.0], [3.0, 6.0], [2.0, 4.0]]
    >>> calls, cache.hits, cache.misses
    ([['a', 'bb'], ['ccc']], 2, 3)
    """

    def __init__(self, width: int, *, max_age_s: float, capacity: int = 200_000) -> None:
        self.width = width
        self.max_age_s = max_age_s
        self.capacity = capacity
        self._slots: dict[Any, int] = {}
        self._values = np.empty((0, width))
        self._read_at = np.empty(0)
        self._lock = threading.Lock()
        self.hits = 0
        """Entities served from memory."""
        self.misses = 0
        """Entities read from the store."""

    def read(self, keys: Sequence[Any], fetch: Callable[[list[Any]], np.ndarray]) -> np.ndarray:
        """``(len(keys), width)``: the rows of ``keys``; ``fetch(missing_keys)`` gives the
        rows of those not fresh here (one call, its errors propagate and nothing is
        cached)."""
        n = len(keys)
        with self._lock:
            slots = np.fromiter(map(self._slots.get, keys, repeat(-1)), np.int64, count=n)
            known = slots >= 0
            at = np.where(known, slots, 0)
            stale = ~known
            if len(self._read_at):
                stale |= self._read_at[at] < time.monotonic() - self.max_age_s
                out = self._values[at]
            else:
                out = np.empty((n, self.width))
        if not stale.any():
            self.hits += n
            return out
        missing = list(dict.fromkeys(compress(keys, stale)))
        rows = np.asarray(fetch(missing), dtype=np.float64).reshape(len(missing), self.width)
        now = time.monotonic()
        index = dict(zip(missing, range(len(missing)), strict=True))
        positions = np.flatnonzero(stale)
        out[positions] = rows[[index[keys[i]] for i in positions.tolist()]]
        with self._lock:
            self._keep(missing, rows, now)
        self.hits += n - len(missing)
        self.misses += len(missing)
        return out

    def _keep(self, keys: list[Any], rows: np.ndarray, now: float) -> None:
        """Store ``rows`` as the values of ``keys``, read at ``now`` (under the lock)."""
        slots = self._slots
        new = [key for key in keys if key not in slots]
        if len(slots) + len(new) > self.capacity:
            slots.clear()
            new = keys
        size = len(slots) + len(new)
        if size > len(self._values):
            grown = max(size, 2 * len(self._values), 1024)
            values, read_at = np.empty((grown, self.width)), np.full(grown, -np.inf)
            values[: len(self._values)] = self._values
            read_at[: len(self._read_at)] = self._read_at
            self._values, self._read_at = values, read_at
        slots.update(zip(new, range(len(slots), size), strict=True))
        at = np.fromiter(map(slots.__getitem__, keys), np.int64, count=len(keys))
        self._values[at] = rows
        self._read_at[at] = now
