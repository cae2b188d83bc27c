"""Temporal-holdout evaluation of feature-based rankers, per request, against baselines.

Protocol
    Labelled examples (:mod:`training.labels`) of a window are split by time: the newest
    ``holdout_fraction`` of the *requests* (a request is never split) is the holdout, the
    rest is training data (:func:`temporal_split`). Every model ranks the candidates of
    each held-out request — the items that were shown (or, without impressions, the
    positive and its sampled negatives) — with the features as of just before the request.

Metrics (:func:`request_metrics`, means over requests)
    ``auc``: the share of (positive, negative) pairs of a request ordered correctly (ties
    one half), over requests with both; ``ndcg@10`` (binary gains, ideal DCG of the
    request's positives), ``recall@k`` (positives in the top k / positives) and ``hr@10``
    (any positive in the top 10) over requests with at least one positive. Ties in a
    model's scores are broken by a seeded random order, the same for every model. With
    slates of 10 the @10 cut-offs hold the whole slate: recall@10 and hr@10 are then 1 for
    every model and only the ordering metrics (NDCG, AUC) tell models apart.

Baselines (:mod:`training.baselines`)
    ``popularity`` scores a candidate by its interactions (views, clicks, carts,
    purchases of the event log) before the holdout starts; ``covisitation`` scores it from
    the user's interactions before the request (up to its moment, holdout period
    included — serving knows them too), with the co-visitation matrix fitted on the
    interactions before the holdout.

Examples
--------
>>> import numpy as np
>>> requests = np.array(["r1", "r1", "r1", "r2", "r2"])
>>> labels = np.array([0, 1, 0, 1, 0])
>>> m = request_metrics(requests, labels, np.array([0.9, 0.5, 0.1, 0.7, 0.2]))
>>> round(m["auc"], 3), round(m["ndcg@10"], 3), m["hr@10"], m["requests"]
(0.75, 0.815, 1.0, 2.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from streamrec.contract import EventType
from training.baselines import CoVisitation, Popularity
from training.data import Interactions
from training.dataset import TrainingSet
from training.evaluation import Queries
from training.ranking_batch import RankingBatch

__all__ = [
    "BASELINES",
    "HOLDOUT_METRICS",
    "BatchScorer",
    "Holdout",
    "evaluate_holdout",
    "interactions_from_log",
    "request_metrics",
    "temporal_split",
]

HOLDOUT_METRICS: tuple[str, ...] = ("auc", "ndcg@10", "recall@10", "recall@50", "hr@10")
BASELINES: tuple[str, ...] = ("popularity", "covisitation")

_HISTORY_CAP = 50  # co-visitation reads the last 10; the cap bounds the query size


class BatchScorer(Protocol):
    """Anything that scores the rows of a :class:`RankingBatch` (higher is better)."""

    def score(self, batch: RankingBatch) -> np.ndarray:
        """One score per row."""
        ...


def request_metrics(
    requests: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    metrics: Iterable[str] = HOLDOUT_METRICS,
    seed: int = 0,
) -> dict[str, float]:
    """Per-request ranking metrics, averaged (module docs), plus ``requests`` (with a
    positive) and ``examples``."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if not (len(requests) == y.size == s.size):
        raise ValueError("requests, labels and scores must have one value per row")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    codes = pd.factorize(pd.Series(requests, dtype=object))[0]
    n_groups = int(codes.max()) + 1 if codes.size else 0
    jitter = np.random.default_rng(seed).random(y.size)
    order = np.lexsort((jitter, -s, codes))
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, np.arange(n_groups))
    rank = np.empty(y.size, dtype=np.int64)
    rank[order] = np.arange(y.size) - starts[sorted_codes] + 1  # 1-based within request
    positives = np.bincount(codes, weights=y, minlength=n_groups)
    sizes = np.bincount(codes, minlength=n_groups)
    has_positive = positives > 0
    out: dict[str, float] = {}
    for name in metrics:
        if name == "auc":
            # Average ranks within a request, ascending score; ties share their rank.
            frame = pd.DataFrame({"g": codes, "s": s})
            avg = frame.groupby("g")["s"].rank(method="average").to_numpy()
            negatives = sizes - positives
            both = has_positive & (negatives > 0)
            pos_ranks = np.bincount(codes, weights=avg * y, minlength=n_groups)
            with np.errstate(invalid="ignore", divide="ignore"):
                auc = (pos_ranks - positives * (positives + 1) / 2) / (positives * negatives)
            out[name] = float(auc[both].mean()) if both.any() else float("nan")
            continue
        kind, _, cut = name.partition("@")
        k = int(cut)
        top = rank <= k
        if kind == "ndcg":
            gains = np.bincount(codes, weights=y * top / np.log2(rank + 1), minlength=n_groups)
            ideal_len = np.minimum(positives, k).astype(np.int64)
            ideal = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
            value = gains[has_positive] / ideal[ideal_len[has_positive]]
        elif kind == "recall":
            hits = np.bincount(codes, weights=y * top, minlength=n_groups)
            value = hits[has_positive] / positives[has_positive]
        elif kind == "hr":
            hits = np.bincount(codes, weights=y * top, minlength=n_groups)
            value = (hits[has_positive] > 0).astype(np.float64)
        else:
            raise ValueError(f"unknown metric {name!r}: use auc, ndcg@k, recall@k or hr@k")
        out[name] = float(value.mean()) if value.size else float("nan")
    out["requests"] = float(has_positive.sum())
    out["examples"] = float(y.size)
    return out


# --- the split ------------------------------------------------------------------------------


def temporal_split(
    data: TrainingSet, holdout_fraction: float
) -> tuple[TrainingSet, TrainingSet, datetime]:
    """``(train, holdout, cut)``: the newest ``holdout_fraction`` of the requests held out.

    A request belongs to the side of its (first) time; ``cut`` is the first held-out
    request's time, and every training request is earlier or at the same moment.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must be in (0, 1)")
    frame = data.examples
    first = frame.groupby("request_id", sort=False)["ts"].transform("min")
    # Requests, not rows: the quantile of distinct request times.
    request_times = frame.assign(first=first).drop_duplicates("request_id")["first"]
    ordered = np.sort(request_times.to_numpy())
    if ordered.size < 2:
        raise ValueError("need at least two requests to hold some out")
    at = min(max(round(ordered.size * (1.0 - holdout_fraction)), 1), ordered.size - 1)
    cut = ordered[at]
    held = (first >= cut).to_numpy()
    return (
        data.take(np.flatnonzero(~held)),
        data.take(np.flatnonzero(held)),
        pd.Timestamp(cut).to_pydatetime(),
    )


# --- baselines ------------------------------------------------------------------------------


def interactions_from_log(log: pa.Table, catalog: Iterable[str] = ()) -> Interactions:
    """Non-impression events of an archived log as :class:`Interactions` (time order).

    ``catalog`` adds item ids that must have an index (e.g. every candidate).
    """
    frame = log.select(["event_type", "user_id", "item_id", "ts", "device", "country"]).to_pandas()
    frame = frame[(frame["event_type"] != EventType.IMPRESSION.value) & frame["item_id"].notna()]
    items = pd.Index(pd.unique(pd.concat([frame["item_id"], pd.Series(list(catalog))])))
    users = pd.Index(pd.unique(frame["user_id"]))
    stamps = pd.to_datetime(frame["ts"], utc=True)
    return Interactions.from_arrays(
        catalog=items.to_numpy(str),
        users=users.to_numpy(str),
        user=users.get_indexer(frame["user_id"]),
        item=items.get_indexer(frame["item_id"]),
        ts=(stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(),
        context={c: frame[c].fillna("").to_numpy(str) for c in ("device", "country")},
    )


def _request_queries(
    data: Interactions, test: TrainingSet
) -> tuple[Queries, np.ndarray, np.ndarray]:
    """One query per held-out request (the user's interactions before it), each row's
    query, and each row's candidate item index."""
    frame = test.examples
    first = frame.groupby("request_id", sort=False)["ts"].transform("min")
    seconds = (pd.to_datetime(first, utc=True) - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    request_codes = pd.factorize(frame["request_id"])[0]
    req = pd.DataFrame({"code": request_codes, "user": frame["user_id"], "ts": seconds})
    req = req.drop_duplicates("code").sort_values("code")
    catalog_index = pd.Index(data.catalog)
    user_index = pd.Index(data.users)
    sequences = data.sequences()
    histories, times = [], []
    for user, ts in zip(req["user"], req["ts"], strict=True):
        u = user_index.get_indexer([user])[0]
        if u < 0:
            histories.append(np.zeros(0, dtype=np.int64))
            times.append(np.zeros(0))
            continue
        seq = sequences[u]
        before = seq[: np.searchsorted(data.ts[seq], ts, side="left")][-_HISTORY_CAP:]
        histories.append(data.item[before].astype(np.int64))
        times.append(data.ts[before])
    indptr = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum([h.size for h in histories], out=indptr[1:])
    queries = Queries(
        catalog=data.catalog,
        user=np.maximum(user_index.get_indexer(req["user"]), 0),
        indptr=indptr,
        history=np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64),
        history_ts=np.concatenate(times) if times else np.zeros(0),
        target=np.zeros(len(histories), dtype=np.int64),
        ts=req["ts"].to_numpy(),
        context={},
    )
    return queries, request_codes, catalog_index.get_indexer(frame["item_id"].astype(str))


def _baseline_scores(model: Popularity | CoVisitation, queries: Queries, rows: np.ndarray,
                     items: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = np.zeros(rows.size, dtype=np.float64)
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(0, len(queries) + batch_size, batch_size))
    for b, start in enumerate(range(0, len(queries), batch_size)):
        part = queries.rows(start, min(start + batch_size, len(queries)))
        scores = np.asarray(model.score(part))
        picked = order[bounds[b] : bounds[b + 1]]
        out[picked] = scores[rows[picked] - start, items[picked]]
    return out


@dataclass(frozen=True)
class Holdout:
    """A temporal holdout: training rows, held-out rows, and the interactions baselines use.

    ``interactions`` are the event log's interactions up to the end of the holdout (those
    at or after ``cut`` only ever serve as a later request's history), with every
    candidate item in its catalog.
    """

    train: TrainingSet
    test: TrainingSet
    interactions: Interactions
    cut: datetime


def evaluate_holdout(
    holdout: Holdout,
    models: Mapping[str, BatchScorer],
    *,
    baselines: Iterable[str] = BASELINES,
    metrics: Iterable[str] = HOLDOUT_METRICS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Metrics of every model and baseline on the held-out requests, keyed by name.

    Examples
    --------
    >>> import pandas as pd
    >>> from datetime import UTC, datetime
    >>> from training.dataset import TrainingSet
    >>> examples = pd.DataFrame({"user_id": ["u"] * 2, "item_id": ["a", "b"],
    ...     "request_id": ["r"] * 2, "label": [1, 0],
    ...     "ts": [datetime(2026, 1, 1, tzinfo=UTC)] * 2})
    >>> test = TrainingSet(examples, RankingBatch.from_frame(
    ...     examples.rename(columns={"ts": "event_timestamp"})))
    >>> data = Interactions.from_arrays(["a", "b"], ["u"], [0, 0], [0, 0], [1.0, 2.0])
    >>> class First:
    ...     def score(self, batch):
    ...         return (batch.item_ids == "a").astype(float)
    >>> result = evaluate_holdout(Holdout(test, test, data, datetime(2026, 1, 1, tzinfo=UTC)),
    ...                           {"first": First()})
    >>> result["first"]["ndcg@10"], result["popularity"]["auc"]
    (1.0, 1.0)
    """
    test = holdout.test
    names = list(metrics)
    labels, requests = test.labels, test.requests
    results = {
        name: request_metrics(requests, labels, np.asarray(model.score(test.batch)),
                              metrics=names, seed=seed)
        for name, model in models.items()
    }
    wanted = list(baselines)
    if wanted:
        data = holdout.interactions
        cut_s = holdout.cut.timestamp()
        before = data.take(data.ts < cut_s)
        queries, rows, items = _request_queries(data, test)
        if (items < 0).any():
            raise ValueError("some candidates are not in the interactions' catalog")
        fitted = {
            "popularity": lambda: Popularity().fit(before),
            "covisitation": lambda: CoVisitation().fit(before),
        }
        for name in wanted:
            if name not in fitted:
                raise ValueError(f"unknown baseline {name!r}: use {', '.join(BASELINES)}")
            scores = _baseline_scores(fitted[name](), queries, rows, items)
            results[name] = request_metrics(requests, labels, scores, metrics=names, seed=seed)
    return results
