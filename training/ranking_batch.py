"""The input every scoring model shares: (user, candidate item, request) rows with features.

A :class:`RankingBatch` holds one row per candidate: the ids, the request's moment and
context, and the columns of the ``ranker_features`` Feast service (``<view>__<feature>``,
``full_feature_names=True``). Serving builds it from one online read
(:meth:`RankingBatch.for_request`), training from a point-in-time join
(:meth:`RankingBatch.from_frame`), so the ranker and the online model see exactly the same
values in both places — the guard against training/serving skew.

:func:`numeric_matrix` turns a batch into the dense numeric features both models use
(:data:`NUMERIC_FEATURES`, documented one by one below); :func:`numeric_rows` gives the
same values as River-style dicts, plus one-hot context. For the rows of one request
(:attr:`RankingBatch.shared_request` and every user feature the same on each row) the
user's and the moment's features are computed on one row and repeated: the same numbers
for a fraction of the work.

Windowed counts of the real-time views are *as of the entity's newest event*; a user idle
for two hours still carries the ``views_1h`` of their last visit. Here a count whose whole
window has passed between that event and the request is read as 0, identically offline and
online, so a stale burst does not look like current activity.

Examples
--------
>>> batch = RankingBatch.for_request(
...     "u1", ["a", "b"],
...     {"user_realtime__views_1h": [3, 3], "user_realtime__last_event_ts": [990.0, 990.0],
...      "item_profile__category": ["Shoes", "Books"],
...      "user_realtime__last_category": ["Shoes", "Shoes"]},
...     ts_s=1000.0, device="mobile")
>>> len(batch), batch.column("item_profile__category")
(2, ['Shoes', 'Books'])
>>> x = numeric_matrix(batch)
>>> x.shape == (2, len(NUMERIC_FEATURES))
True
>>> row = numeric_rows(batch)[0]
>>> round(row["user_views_1h"], 3), row["same_category_as_last"], row["device=mobile"]
(1.386, 1.0, 1.0)
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from features.definitions import (
    COUNTED_TYPES,
    ITEM_VIEW,
    STATS_WINDOWS,
    USER_VIEW,
    Window,
    count_name,
)
from streamrec.contract import Device

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CONTEXT_COLUMNS",
    "NUMERIC_FEATURES",
    "RankingBatch",
    "numeric_matrix",
    "numeric_rows",
]

CONTEXT_COLUMNS = ("device", "country")
"""Request context carried by every row (``None`` when unknown)."""

_DAY_S = 86_400.0


@dataclass(frozen=True)
class RankingBatch:
    """Rows of (user, candidate item, request) with their ``ranker_features`` columns.

    Parameters
    ----------
    user_ids, item_ids
        Object arrays, one id per row.
    ts_s
        The request's moment per row, UNIX seconds (training: the label's time).
    device, country
        Request context per row, ``None`` when unknown.
    features
        Feature columns named ``<view>__<feature>``, one value per row, ``None`` where the
        store had no value. Columns a model needs but the batch lacks read as missing.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    ts_s: np.ndarray
    device: np.ndarray
    country: np.ndarray
    features: Mapping[str, Sequence[Any]]

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        lengths = {len(self.item_ids), len(self.ts_s), len(self.device), len(self.country)}
        lengths |= {len(v) for v in self.features.values()}
        if lengths - {n}:
            raise ValueError(f"every column needs {n} rows, got lengths {sorted(lengths)}")

    @classmethod
    def for_request(
        cls,
        user_id: str,
        item_ids: Sequence[str],
        features: Mapping[str, Sequence[Any]],
        *,
        ts_s: float,
        device: str | None = None,
        country: str | None = None,
        user: Mapping[str, Any] | None = None,
    ) -> RankingBatch:
        """One request: ``user_id`` against every candidate in ``item_ids``.

        ``features`` is what ``OnlineFeatureReader.read(RANKER_SERVICE, {"user_id": [user_id]
        * n, "item_id": item_ids}, full_feature_names=True)`` returns (key columns are
        ignored). ``user`` holds features of the user, one value each (``<view>__<feature>``),
        put on every row in place of ``features``' columns of the same names; the
        per-request numeric features are then computed from them without confirming, row
        by row, that the rows agree.
        """
        n = len(item_ids)
        columns = {k: v for k, v in features.items() if "__" in k}
        if user:
            columns.update({k: [v] * n for k, v in user.items()})
        batch = cls(
            user_ids=_objects([user_id] * n),
            item_ids=_objects(item_ids),
            ts_s=np.full(n, float(ts_s)),
            device=_objects([device] * n),
            country=_objects([country.upper() if country else None] * n),
            features=columns,
        )
        batch.__dict__["shared_request"] = True  # true by construction: skip the check
        if user and n > 1 and not any(k.startswith(_USER_VIEWS) for k in features
                                      if k not in user):
            batch.__dict__["_head"] = batch._first({k: [v] for k, v in user.items()})
        return batch

    @classmethod
    def concat(cls, batches: Sequence[RankingBatch]) -> RankingBatch:
        """The rows of ``batches``, in order, as one batch (feature names of the first)."""
        return cls(
            user_ids=np.concatenate([b.user_ids for b in batches]),
            item_ids=np.concatenate([b.item_ids for b in batches]),
            ts_s=np.concatenate([b.ts_s for b in batches]),
            device=np.concatenate([b.device for b in batches]),
            country=np.concatenate([b.country for b in batches]),
            features={k: [v for b in batches for v in b.column(k)] for k in batches[0].features},
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> RankingBatch:
        """Rows of a point-in-time join: ``user_id``, ``item_id``, ``event_timestamp``,
        optional ``device``/``country`` and the ``<view>__<feature>`` columns."""
        import pandas as pd

        stamps = pd.to_datetime(frame["event_timestamp"], utc=True)
        ts_s = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)

        def optional(name: str) -> np.ndarray:
            if name not in frame:
                return _objects([None] * len(frame))
            return _objects([None if _missing(v) else v for v in frame[name]])

        return cls(
            user_ids=_objects(frame["user_id"].astype(str)),
            item_ids=_objects(frame["item_id"].astype(str)),
            ts_s=ts_s,
            device=optional("device"),
            country=optional("country"),
            features={
                c: [None if _missing(v) else v for v in frame[c]]
                for c in frame.columns
                if "__" in c
            },
        )

    def __len__(self) -> int:
        return len(self.user_ids)

    def column(self, name: str) -> Sequence[Any]:
        """The feature column ``name``, all ``None`` when the batch lacks it."""
        values = self.features.get(name)
        return [None] * len(self) if values is None else values

    def floats(self, name: str) -> np.ndarray:
        """Column ``name`` as float64, NaN where missing; converted once per batch."""
        # Several numeric features read the same column (every window count reads the
        # anchor time), and serving scores one batch with two models: convert once.
        memo = self.__dict__.setdefault("_floats", {})
        values = memo.get(name)
        if values is None:
            raw = self.features.get(name)
            if raw is None:
                values = np.full(len(self), np.nan)
            elif isinstance(raw, list) and raw and raw.count(raw[0]) == len(raw):
                # One value on every row (a request's user features): converted once.
                values = np.full(len(raw), np.nan if raw[0] is None else raw[0], np.float64)
            else:
                try:  # the common case, a full column: numpy's C conversion
                    values = np.array(raw, dtype=np.float64)
                except TypeError:
                    values = np.array([np.nan if v is None else v for v in raw], np.float64)
            memo[name] = values
        return values

    @cached_property
    def shared_request(self) -> bool:
        """Whether every row has the same user, moment, device and country: the rows of
        one request, whose per-request parts models compute once."""
        return len(self) > 0 and all(
            len(set(column.tolist())) == 1
            for column in (self.user_ids, self.ts_s, self.device, self.country)
        )

    @cached_property
    def numeric(self) -> np.ndarray:
        """:func:`numeric_matrix` of this batch, computed on first use (shared: do not modify)."""
        head = self._user_row()
        if head is None:
            x = np.hstack([block(self) for _, block in _BLOCKS]).astype(np.float32)
        else:
            # One request: the user's and the moment's features once, on every row.
            x = np.empty((len(self), len(NUMERIC_FEATURES)), dtype=np.float32)
            for span, per_request, block in _SPANS:
                x[:, span] = block(head if per_request else self)
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0, copy=False)

    def _user_row(self) -> RankingBatch | None:
        """The first row with only the user's feature columns, when every row shares the
        user, the moment and every user feature (a request's batch); else ``None``."""
        head = self.__dict__.get("_head")  # for_request's, from the user's own values
        if head is not None:
            return head
        if len(self) < 2 or not self.shared_request:
            return None
        user = {k: v for k, v in self.features.items() if k.startswith(_USER_VIEWS)}
        # A request repeats one object per user feature, which list.count confirms at C
        # speed.
        if not all(_shared(values) for values in user.values()):
            return None
        return self._first({k: v[:1] for k, v in user.items()})

    def _first(self, features: Mapping[str, Sequence[Any]]) -> RankingBatch:
        """The first row's ids, moment and context with the user's columns of ``features``."""
        return RankingBatch(
            user_ids=self.user_ids[:1], item_ids=self.item_ids[:1], ts_s=self.ts_s[:1],
            device=self.device[:1], country=self.country[:1],
            features={k: v for k, v in features.items() if k.startswith(_USER_VIEWS)},
        )

    def take(self, index: np.ndarray | Sequence[int]) -> RankingBatch:
        """The rows at ``index``, in that order."""
        idx = np.asarray(index, dtype=np.int64)
        return RankingBatch(
            user_ids=self.user_ids[idx],
            item_ids=self.item_ids[idx],
            ts_s=self.ts_s[idx],
            device=self.device[idx],
            country=self.country[idx],
            features={k: [v[i] for i in idx] for k, v in self.features.items()},
        )


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _missing(value: Any) -> bool:
    # Point-in-time joins give NaN (floats) or NaT/None where no row matched.
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


# --- numeric features ----------------------------------------------------------------------

_Column = Callable[[RankingBatch], np.ndarray]
_Block = tuple[tuple[str, ...], Callable[[RankingBatch], np.ndarray]]
"""Names of features and the function computing them as ``(len(batch), k)`` columns: a
family of features (every window count of a view) costs a few numpy operations for all its
members, rather than a few per member."""


def _floats(batch: RankingBatch, name: str) -> np.ndarray:
    return batch.floats(name)


def _stack(batch: RankingBatch, view: str, names: Sequence[str]) -> np.ndarray:
    """The features ``names`` of ``view`` as float64 columns (a new array)."""
    columns = [batch.features.get(f"{view}__{n}") for n in names]
    if all(isinstance(c, np.ndarray) for c in columns):
        # Float columns (serving's near-cached item views): one call, NaN stays NaN.
        return np.array(columns, dtype=np.float64).T
    if all(isinstance(c, list) for c in columns):
        # One conversion for the whole family rather than one per column: the numpy
        # calls, not the values, are most of the cost for a request's few rows.
        if len(batch) == 1:
            return np.array([[np.nan if c[0] is None else c[0] for c in columns]], np.float64)
        if len(batch) and all(c[0] is not None for c in columns):
            try:
                return np.array(columns, dtype=np.float64).T
            except TypeError:  # a missing value further down: column by column
                pass
    return np.column_stack([_floats(batch, f"{view}__{n}") for n in names])


def _elapsed_s(batch: RankingBatch, view: str) -> np.ndarray:
    """Seconds from the entity's newest event to the request (NaN without a row)."""
    return np.maximum(batch.ts_s - _floats(batch, f"{view}__last_event_ts"), 0.0)


def _window_counts(prefix: str, view: str, windows: Sequence[Window]) -> _Block:
    names = [count_name(t, w) for w in windows for t in COUNTED_TYPES]
    limits = np.array([float(w.seconds) for w in windows for _ in COUNTED_TYPES])

    def block(batch: RankingBatch) -> np.ndarray:
        counts = _stack(batch, view, names)
        # The whole window has passed since the count was taken: nothing of it is left.
        counts[_elapsed_s(batch, view)[:, None] >= limits] = 0.0
        return np.log1p(counts)

    return tuple(f"{prefix}_{n}" for n in names), block


def _log_counts(view: str, names: Sequence[str], labels: Sequence[str]) -> _Block:
    def block(batch: RankingBatch) -> np.ndarray:
        return np.log1p(np.maximum(_stack(batch, view, names), 0.0))

    return tuple(labels), block


def _plain(view: str, names: Sequence[str], labels: Sequence[str]) -> _Block:
    return tuple(labels), lambda batch: _stack(batch, view, names)


def _one(label: str, column: _Column) -> _Block:
    return (label,), lambda batch: column(batch)[:, None]


def _log_elapsed(view: str) -> _Column:
    return lambda batch: np.log1p(_elapsed_s(batch, view))


def _item_age_days(batch: RankingBatch) -> np.ndarray:
    age = (batch.ts_s - _floats(batch, "item_profile__created_at_s")) / _DAY_S
    return np.log1p(np.maximum(age, 0.0))


def _price_ratio(batch: RankingBatch) -> np.ndarray:
    price = _floats(batch, "item_profile__price")
    usual = _floats(batch, "user_stats__avg_price_30d")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log((price + 1.0) / (usual + 1.0))
    return ratio


@lru_cache(maxsize=4096)
def _affinity(blob: str) -> Mapping[str, float]:
    try:
        parsed = json.loads(blob)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _shared(values: Sequence[Any]) -> bool:
    """Whether every row holds the same value (a request's user feature)."""
    first = values[0]
    if isinstance(values, list):
        try:  # C loop; a repeated object matches by identity before any comparison
            return values.count(first) == len(values)
        except (TypeError, ValueError):  # values whose == is not a bool (arrays)
            pass
    return all(v is first for v in values)


def _category_affinity(batch: RankingBatch) -> np.ndarray:
    blobs = batch.column("user_stats__category_affinity")
    categories = batch.column("item_profile__category")
    if len(batch) and _shared(blobs):
        if blobs[0] is None:
            return np.full(len(batch), np.nan)
        affinity = _affinity(blobs[0])
        return np.array([np.nan if c is None else float(affinity.get(c, 0.0))
                         for c in categories])
    return np.array(
        [
            np.nan if b is None else float(_affinity(b).get(c, 0.0)) if c is not None else np.nan
            for b, c in zip(blobs, categories, strict=True)
        ]
    )


def _same_category_as_last(batch: RankingBatch) -> np.ndarray:
    last = batch.column("user_realtime__last_category")
    categories = batch.column("item_profile__category")
    if len(batch) and _shared(last):
        if last[0] is None:
            return np.full(len(batch), np.nan)
        match = {last[0]: 1.0, None: np.nan}
        return np.fromiter(map(match.get, categories, itertools.repeat(0.0)), np.float64,
                           count=len(batch))
    return np.array(
        [
            np.nan if a is None or c is None else float(a == c)
            for a, c in zip(last, categories, strict=True)
        ]
    )


def _recency_rank(batch: RankingBatch) -> np.ndarray:
    """1 / (1 + position) of the candidate in the user's recent items, 0 when absent."""
    recent = batch.column("user_realtime__recent_items")
    if len(batch) and _shared(recent):
        if recent[0] is None:
            return np.full(len(batch), np.nan)
        # The first position of each recent item, for every candidate at once.
        rank = {}
        for position, item in enumerate(recent[0]):
            rank.setdefault(item, 1.0 / (1.0 + position))
        return np.fromiter(map(rank.get, batch.item_ids, itertools.repeat(0.0)), np.float64,
                           count=len(batch))
    out = np.zeros(len(batch))
    for i, (items, item) in enumerate(zip(recent, batch.item_ids, strict=True)):
        if items is None:
            out[i] = np.nan
        elif item in items:
            out[i] = 1.0 / (1.0 + list(items).index(item))
    return out


def _hours(batch: RankingBatch) -> np.ndarray:
    angle = 2 * np.pi * ((batch.ts_s % _DAY_S) / _DAY_S)
    return np.column_stack([np.sin(angle), np.cos(angle)])


def _stats_counts(view: str, names: Sequence[str]) -> _Block:
    return _log_counts(view, names, [f"{view.split('_')[0]}_{n}" for n in names])


_ITEM_WINDOWS = [w.name for w in ITEM_VIEW.windows]

_BLOCKS: list[_Block] = [
    # What the user did lately (stream), as of the request.
    _window_counts("user", "user_realtime", USER_VIEW.windows),
    _log_counts("user_realtime", ["session_events", "session_duration_s"],
                ["user_session_events", "user_session_duration_s"]),
    _one("user_idle_s", _log_elapsed("user_realtime")),
    # The user's longer history (batch).
    _stats_counts("user_stats", [count_name(t, w) for w in STATS_WINDOWS for t in COUNTED_TYPES]),
    _plain("user_stats", ["purchase_rate_30d"], ["user_purchase_rate_30d"]),
    _log_counts("user_stats", ["avg_price_30d"], ["user_avg_price_30d"]),
    # How the candidate is doing now (stream) and over weeks (batch).
    _window_counts("item", "item_realtime", ITEM_VIEW.windows),
    _plain("item_realtime", [f"ctr_{w}" for w in _ITEM_WINDOWS],
           [f"item_ctr_{w}" for w in _ITEM_WINDOWS]),
    _one("item_idle_s", _log_elapsed("item_realtime")),
    _stats_counts(
        "item_stats",
        [f"{k}_{w.name}" for w in STATS_WINDOWS for k in ("popularity", "unique_users")],
    ),
    _plain("item_stats", [f"ctr_{w.name}" for w in STATS_WINDOWS],
           [f"item_ctr_{w.name}" for w in STATS_WINDOWS]),
    # The catalog entry.
    _one("item_age_days", _item_age_days),
    _log_counts("item_profile", ["price"], ["item_price"]),
    # The pair.
    _one("price_vs_user_avg", _price_ratio),
    _one("category_affinity", _category_affinity),
    _one("same_category_as_last", _same_category_as_last),
    _one("recently_interacted", _recency_rank),
    # The moment (UTC hour of day on the circle).
    (("hour_sin", "hour_cos"), _hours),
]

NUMERIC_FEATURES: tuple[str, ...] = tuple(name for names, _ in _BLOCKS for name in names)
"""Names of :func:`numeric_matrix`'s columns, in order."""

_USER_VIEWS = (f"{USER_VIEW.name}__", "user_stats__")
_PER_REQUEST = ("user_", "hour_")
"""Blocks named so read only the user's views (:data:`_USER_VIEWS`) and the moment."""


def _spans() -> list[tuple[slice, bool, Callable[[RankingBatch], np.ndarray]]]:
    spans, start = [], 0
    for names, block in _BLOCKS:
        per_request = all(n.startswith(_PER_REQUEST) for n in names)
        spans.append((slice(start, start + len(names)), per_request, block))
        start += len(names)
    return spans


_SPANS = _spans()


def numeric_matrix(batch: RankingBatch) -> np.ndarray:
    """``(len(batch), len(NUMERIC_FEATURES))`` float32; missing values are 0.

    Missing (no row in the store, an unknown category, …) becomes 0, the value of "no
    activity" for every log-count, so a cold user or item is a normal input. Computed once
    per batch (:attr:`RankingBatch.numeric`) and shared by every caller: do not modify it.
    """
    return batch.numeric


_DEVICES = tuple(d.value for d in Device)


def numeric_rows(batch: RankingBatch) -> list[dict[str, float]]:
    """:func:`numeric_matrix` as one dict per row, plus one-hot ``device=<value>``."""
    x = numeric_matrix(batch)
    rows = [dict(zip(NUMERIC_FEATURES, map(float, r), strict=True)) for r in x]
    for row, device in zip(rows, batch.device, strict=True):
        for d in _DEVICES:
            row[f"device={d}"] = float(device == d)
    return rows
