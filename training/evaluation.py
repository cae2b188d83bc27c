"""The offline evaluation protocol: leave-one-out split, full ranking, top-k metrics.

Protocol
    Every interaction is one implicit interaction (see :mod:`training.data`). Each user's
    interactions in timestamp order (ties in arrival order): the last one is the test
    item, all earlier ones are the history, and training data is every interaction except
    the users' test items. Users with a single interaction have no history to rank from:
    they are not evaluated and their interaction stays in training (it is nobody's test
    item). Validation repeats the split on the training data, so its target is each
    user's second-to-last interaction (:func:`leave_one_out` applied twice).

Ranking
    A model scores the WHOLE catalog for each test user (no sampled negatives). The
    candidates are every catalog item except the user's history items; the target itself
    always stays a candidate, even when the user had it before (repeat consumption), so a
    hit is always possible. Ties are broken uniformly at random and each metric is its
    exact expectation over that draw: a model cannot gain (or lose) by giving many items
    the same score.

Metrics (per test user, then averaged)
    With one target at rank ``r`` (1-based): NDCG@k = 1/log2(r + 1) when r <= k, else 0;
    HitRate@k = [r <= k]; Recall@k equals HitRate@k for a single target (both are
    reported); AUC = share of the other candidates scored below the target (ties count
    one half).

Examples
--------
>>> import numpy as np
>>> from training.data import Interactions
>>> data = Interactions.from_arrays(catalog=["a", "b", "c", "d"], users=["u"],
...                                 user=[0, 0, 0], item=[0, 1, 2], ts=[1.0, 2.0, 3.0])
>>> split = leave_one_out(data)
>>> split.queries.target.tolist(), split.queries.history.tolist(), len(split.train)
([2], [0, 1], 2)
>>> class Constant:
...     def score(self, queries):
...         return np.zeros((len(queries), 4), dtype=np.float32)
>>> m = evaluate(Constant(), split.queries, metrics=("hr@1", "auc"))
>>> m["hr@1"], m["auc"]  # target ties with "d": first half the time
(0.5, 0.5)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from scipy.sparse import csr_matrix

from training.data import Interactions

__all__ = [
    "DEFAULT_METRICS",
    "Queries",
    "RankCounts",
    "Scorer",
    "Split",
    "evaluate",
    "evaluate_per_query",
    "leave_one_out",
    "metric_values",
    "rank_counts",
    "tune",
]

#: What ``streamrec evaluate`` reports for every model.
DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@50", "hr@10", "auc")
_METRIC = re.compile(r"^(ndcg|recall|hr)@([1-9][0-9]*)$|^auc$")


@dataclass(frozen=True, eq=False)
class Queries:
    """One ranking request per test user: their history, context and hidden target.

    Parameters
    ----------
    catalog
        Item ids of the dataset (the item indexes below point into it).
    user
        User index of each query.
    indptr, history, history_ts
        The histories in CSR layout: query ``q`` has items
        ``history[indptr[q]:indptr[q + 1]]`` (time order) seen at ``history_ts``.
    target
        The hidden item of each query.
    ts
        Time of each query (the target interaction's time).
    context
        Context strings of each query (the target interaction's device, country, ...).
    """

    catalog: np.ndarray
    user: np.ndarray
    indptr: np.ndarray
    history: np.ndarray
    history_ts: np.ndarray
    target: np.ndarray
    ts: np.ndarray
    context: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.target.size)

    @property
    def n_items(self) -> int:
        """Catalog size: the width of a score matrix."""
        return int(self.catalog.size)

    def rows(self, start: int, stop: int) -> Queries:
        """Queries ``start:stop`` as their own :class:`Queries` (histories re-based)."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return Queries(
            catalog=self.catalog,
            user=self.user[start:stop],
            indptr=self.indptr[start : stop + 1] - lo,
            history=self.history[lo:hi],
            history_ts=self.history_ts[lo:hi],
            target=self.target[start:stop],
            ts=self.ts[start:stop],
            context={name: col[start:stop] for name, col in self.context.items()},
        )

    def batches(self, size: int) -> Iterator[Queries]:
        """Consecutive batches of at most ``size`` queries."""
        for start in range(0, len(self), size):
            yield self.rows(start, min(start + size, len(self)))

    def history_lengths(self) -> np.ndarray:
        """Number of history items of each query."""
        return np.diff(self.indptr)

    def history_rows(self) -> np.ndarray:
        """For each history entry, the query it belongs to."""
        return np.repeat(np.arange(len(self)), self.history_lengths())

    def history_matrix(self, weights: np.ndarray | None = None) -> csr_matrix:
        """Sparse (queries x catalog): 1 for each history item, or the sum of ``weights``
        (one per history entry) over its occurrences."""
        values = np.ones(self.history.size, dtype=np.float32) if weights is None else weights
        # Copies: scipy keeps the index arrays it is given and sorts them in place, which
        # would scramble the histories' time order.
        matrix = csr_matrix(
            (values.astype(np.float32), self.history.copy(), self.indptr.copy()),
            shape=(len(self), self.n_items),
        )
        matrix.sum_duplicates()
        if weights is None:
            matrix.data[:] = 1.0
        return matrix

    def excluded(self) -> np.ndarray:
        """Boolean (queries x catalog): the history items, minus each query's target."""
        mask = np.zeros((len(self), self.n_items), dtype=bool)
        mask[self.history_rows(), self.history] = True
        mask[np.arange(len(self)), self.target] = False
        return mask


@dataclass(frozen=True, eq=False)
class Split:
    """Training interactions and the queries that hold out each user's last one."""

    train: Interactions
    queries: Queries


def leave_one_out(data: Interactions) -> Split:
    """Hold out each user's last interaction (users with at least two interactions).

    Examples
    --------
    >>> from training.data import Interactions
    >>> data = Interactions.from_arrays(
    ...     catalog=["a", "b", "c"], users=["u", "v"],
    ...     user=[0, 1, 0, 0], item=[0, 2, 1, 2], ts=[1.0, 1.0, 2.0, 3.0])
    >>> split = leave_one_out(data)
    >>> split.queries.user.tolist(), split.queries.target.tolist()
    ([0], [2])
    >>> split.train.item.tolist()  # v's only interaction stays in training
    [0, 2, 1]
    >>> leave_one_out(split.train).queries.target.tolist()  # validation: second-to-last
    [1]
    """
    sequences = data.sequences()
    users = np.array([u for u, seq in enumerate(sequences) if seq.size >= 2], dtype=np.int32)
    last = np.array([sequences[u][-1] for u in users], dtype=np.int64)
    keep = np.ones(len(data), dtype=bool)
    keep[last] = False
    history = [sequences[u][:-1] for u in users]
    idx = np.concatenate(history) if history else np.zeros(0, dtype=np.int64)
    indptr = np.zeros(users.size + 1, dtype=np.int64)
    np.cumsum([h.size for h in history], out=indptr[1:])
    queries = Queries(
        catalog=data.catalog,
        user=users,
        indptr=indptr,
        history=data.item[idx],
        history_ts=data.ts[idx],
        target=data.item[last],
        ts=data.ts[last],
        context={name: col[last] for name, col in data.context.items()},
    )
    return Split(train=data.take(keep), queries=queries)


class Scorer(Protocol):
    """Anything that scores the whole catalog for a batch of queries (higher is better)."""

    def score(self, queries: Queries) -> np.ndarray:
        """A ``(len(queries), queries.n_items)`` float array."""
        ...


@dataclass(frozen=True)
class RankCounts:
    """Where each target landed among its candidates.

    ``above``: candidates scored strictly higher; ``tied``: candidates scored equal (the
    target excluded); ``candidates``: rankable items other than the target.
    """

    above: np.ndarray
    tied: np.ndarray
    candidates: np.ndarray

    @staticmethod
    def concat(parts: Sequence[RankCounts]) -> RankCounts:
        """Counts of several batches, in order."""
        return RankCounts(
            np.concatenate([p.above for p in parts]),
            np.concatenate([p.tied for p in parts]),
            np.concatenate([p.candidates for p in parts]),
        )


def rank_counts(scores: np.ndarray, target: np.ndarray, excluded: np.ndarray) -> RankCounts:
    """Rank each target among the non-excluded items of its row.

    Parameters
    ----------
    scores
        ``(n, n_items)`` scores.
    target
        ``(n,)`` target item of each row.
    excluded
        ``(n, n_items)`` boolean: items that are not candidates (the target never is
        excluded, whatever this says).

    Examples
    --------
    >>> import numpy as np
    >>> scores = np.array([[0.9, 0.5, 0.5, 0.7, 0.1]])
    >>> excluded = np.array([[True, False, False, False, False]])
    >>> c = rank_counts(scores, np.array([1]), excluded)
    >>> c.above.tolist(), c.tied.tolist(), c.candidates.tolist()
    ([1], [1], [3])
    """
    scores = np.asarray(scores)
    n = scores.shape[0]
    if scores.shape != excluded.shape or target.shape != (n,):
        raise ValueError(
            f"scores {scores.shape}, excluded {excluded.shape} and target {target.shape} "
            "do not match"
        )
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows = np.arange(n)
    others = ~excluded
    others[rows, target] = False
    t = scores[rows, target][:, None]
    return RankCounts(
        above=np.count_nonzero((scores > t) & others, axis=1),
        tied=np.count_nonzero((scores == t) & others, axis=1),
        candidates=np.count_nonzero(others, axis=1),
    )


def _parse(metric: str) -> tuple[str, int]:
    match = _METRIC.match(metric)
    if match is None:
        raise ValueError(f"unknown metric {metric!r}: use ndcg@k, recall@k, hr@k or auc")
    return (match.group(1), int(match.group(2))) if match.group(1) else ("auc", 0)


def metric_values(counts: RankCounts, metric: str) -> np.ndarray:
    """Per-query expected value of ``metric`` under random tie-breaking.

    The target's rank is uniform on ``above + 1 .. above + tied + 1``.

    Examples
    --------
    >>> import numpy as np
    >>> c = RankCounts(above=np.array([0, 0, 9]), tied=np.array([0, 1, 0]),
    ...                candidates=np.array([5, 5, 20]))
    >>> metric_values(c, "hr@1").tolist(), metric_values(c, "hr@10").tolist()
    ([1.0, 0.5, 0.0], [1.0, 1.0, 1.0])
    >>> metric_values(c, "ndcg@10").round(4).tolist()  # 1, (1 + 1/log2 3)/2, 1/log2 11
    [1.0, 0.8155, 0.2891]
    """
    kind, k = _parse(metric)
    above = counts.above.astype(np.float64)
    tied = counts.tied.astype(np.float64)
    if kind == "auc":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                counts.candidates > 0,
                (counts.candidates - above - 0.5 * tied) / counts.candidates,
                np.nan,
            )
    lo = np.minimum(above, k)  # ranks <= lo are taken by items above the target
    hi = np.minimum(above + tied + 1, k)
    if kind in ("hr", "recall"):
        return (hi - lo) / (tied + 1)
    # gain[r] = sum of 1/log2(j + 1) for j = 1..r
    gain = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    return (gain[hi.astype(np.int64)] - gain[lo.astype(np.int64)]) / (tied + 1)


def evaluate_per_query(
    model: Scorer,
    queries: Queries,
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Each metric for each query (``nan`` for AUC when a query has no other candidate).

    Scores are computed batch by batch, so memory stays at ``batch_size`` x catalog.
    """
    names = list(metrics)
    for name in names:
        _parse(name)
    parts = []
    for batch in queries.batches(batch_size):
        scores = np.asarray(model.score(batch))
        if scores.shape != (len(batch), batch.n_items):
            raise ValueError(
                f"{type(model).__name__}.score returned shape {scores.shape}, "
                f"expected {(len(batch), batch.n_items)}"
            )
        parts.append(rank_counts(scores, batch.target, batch.excluded()))
    empty = np.zeros(0, dtype=np.int64)
    counts = RankCounts.concat(parts) if parts else RankCounts(empty, empty, empty)
    return {name: metric_values(counts, name) for name in names}


def evaluate(
    model: Scorer,
    queries: Queries,
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean of each metric over the queries, plus ``users`` (how many were ranked)."""
    values = evaluate_per_query(model, queries, metrics=metrics, batch_size=batch_size)
    result = {
        name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        for name, v in values.items()
    }
    result["users"] = float(len(queries))
    return result


P = TypeVar("P")


def tune(
    fit: Callable[[P, Interactions], Scorer],
    grid: Iterable[P],
    validation: Split,
    *,
    metric: str = "ndcg@10",
    on_result: Callable[[P, dict[str, float]], None] | None = None,
) -> tuple[P, dict[str, float]]:
    """The grid value whose model, fitted on ``validation.train``, scores best.

    Parameters
    ----------
    fit
        ``fit(value, train)`` builds and fits a model with one hyper-parameter value.
    grid
        Values to try, in order (the first best one wins ties).
    validation
        A split of the training data (``leave_one_out(split.train)``).
    metric
        What to maximise.
    on_result
        Called after each value, e.g. to print progress.

    Returns
    -------
    The best value and its validation metrics.
    """
    best: tuple[P, dict[str, float]] | None = None
    for value in grid:
        result = evaluate(fit(value, validation.train), validation.queries,
                          metrics=(metric, *(m for m in DEFAULT_METRICS if m != metric)))
        if on_result is not None:
            on_result(value, result)
        if best is None or result[metric] > best[1][metric]:
            best = (value, result)
    if best is None:
        raise ValueError("empty grid")
    return best
