"""Baselines the ranker must beat: popularity, item co-visitation and EASE.

Each one is fitted on :class:`~training.data.Interactions` and scores the whole catalog
for :class:`~training.evaluation.Queries` (the :class:`~training.evaluation.Scorer`
protocol), so all of them go through the same evaluation as the ranker.

Examples
--------
>>> from training.data import Interactions
>>> from training.evaluation import evaluate, leave_one_out
>>> data = Interactions.from_arrays(  # u: a b x, v: a b y, w: c a b
...     catalog=["a", "b", "c", "x", "y"], users=["u", "v", "w"],
...     user=[0, 0, 0, 1, 1, 1, 2, 2, 2], item=[0, 1, 3, 0, 1, 4, 2, 0, 1], ts=range(9))
>>> split = leave_one_out(data)
>>> w = split.queries.rows(2, 3)  # history c a, target b
>>> for model in (Popularity(), CoVisitation(), EASE(l2=1.0)):
...     print(type(model).__name__, evaluate(model.fit(split.train), w, metrics=["hr@1"]))
Popularity {'hr@1': 1.0, 'users': 1.0}
CoVisitation {'hr@1': 1.0, 'users': 1.0}
EASE {'hr@1': 1.0, 'users': 1.0}
"""

from __future__ import annotations

from typing import Self

import numpy as np
import torch
from scipy.sparse import coo_matrix, csr_matrix, diags

from training.data import Interactions
from training.evaluation import Queries

__all__ = ["EASE", "CoVisitation", "Popularity"]


class Popularity:
    """Score = how often the item occurs in the training interactions.

    Examples
    --------
    >>> from training.data import Interactions
    >>> data = Interactions.from_arrays(["a", "b"], ["u"], [0, 0, 0], [1, 1, 0], [1, 2, 3])
    >>> Popularity().fit(data).counts.tolist()
    [1.0, 2.0]
    """

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.float32)

    def fit(self, train: Interactions) -> Self:
        self.counts = train.item_counts().astype(np.float32)
        return self

    def score(self, queries: Queries) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(queries), self.counts.size))


class CoVisitation:
    """Items that users had close to the user's recent items, in sequence order.

    Two interactions of the same user at most ``window`` positions (and, optionally,
    ``max_gap_s`` seconds) apart make a co-visit, weighted ``1 / distance``; a co-visit in
    the reverse order (the candidate came first) counts ``backward`` times as much. Each
    row is normalised to sum to 1 (an estimate of "what comes near this item"), and
    candidates are damped by ``popularity ** alpha``. A user's score adds the rows of their
    ``recent`` last history items, the most recent weighted 1, the one before it
    ``recency_decay``, and so on.

    Examples
    --------
    >>> from training.data import Interactions
    >>> data = Interactions.from_arrays(
    ...     catalog=["a", "b", "c"], users=["u", "v"],
    ...     user=[0, 0, 1, 1], item=[0, 1, 0, 2], ts=range(4))
    >>> model = CoVisitation(window=1, backward=0.0).fit(data)
    >>> model.matrix.toarray().round(2).tolist()  # after "a": "b" half the time, "c" half
    [[0.0, 0.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        *,
        window: int = 5,
        backward: float = 0.5,
        max_gap_s: float | None = None,
        alpha: float = 0.0,
        recent: int = 10,
        recency_decay: float = 0.8,
    ) -> None:
        if window < 1 or recent < 1:
            raise ValueError("window and recent must be at least 1")
        self.window = window
        self.backward = backward
        self.max_gap_s = max_gap_s
        self.alpha = alpha
        self.recent = recent
        self.recency_decay = recency_decay
        self.matrix = csr_matrix((0, 0), dtype=np.float32)

    def fit(self, train: Interactions) -> Self:
        order = np.argsort(train.user, kind="stable")  # by user, time order inside
        user, item, ts = train.user[order], train.item[order], train.ts[order]
        rows, cols, vals = [], [], []
        for d in range(1, self.window + 1):
            near = user[d:] == user[:-d]
            if self.max_gap_s is not None:
                near &= ts[d:] - ts[:-d] <= self.max_gap_s
            first, then = item[:-d][near], item[d:][near]
            weight = np.full(first.size, 1.0 / d, dtype=np.float32)
            rows += [first, then]
            cols += [then, first]
            vals += [weight, weight * self.backward]
        n = train.n_items
        matrix = coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
        ).tocsr()
        matrix.setdiag(0.0)  # an item co-visiting itself says nothing
        matrix.eliminate_zeros()
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        matrix = diags(1.0 / np.maximum(totals, 1e-12)) @ matrix
        if self.alpha:
            damp = np.maximum(train.item_counts(), 1).astype(np.float64) ** -self.alpha
            matrix = matrix @ diags(damp)
        self.matrix = csr_matrix(matrix, dtype=np.float32)
        return self

    def score(self, queries: Queries) -> np.ndarray:
        lengths = queries.history_lengths()
        ends = np.repeat(queries.indptr[1:], lengths)
        age = ends - 1 - np.arange(queries.history.size)  # 0 for the most recent item
        weights = np.where(age < self.recent, self.recency_decay ** age, 0.0)
        return np.asarray((queries.history_matrix(weights) @ self.matrix).toarray())


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck, 2019): closed-form item-item weights.

    ``B = argmin ||X - X B||² + l2 ||B||²`` with ``diag(B) = 0``, solved as
    ``P = (XᵀX + l2·I)⁻¹``, ``B = -P / diag(P)``; a user's scores are their binary history
    row times ``B``. Items without training interactions have zero weights and are left
    out of the inversion (an exact shortcut). Costs one ``items x items`` inversion
    (float32 by default, through torch so it uses every thread it is allowed).

    Parameters
    ----------
    l2
        Ridge strength; tune it on a validation split (see
        :func:`~training.evaluation.tune`).

    Examples
    --------
    >>> from training.data import Interactions
    >>> data = Interactions.from_arrays(
    ...     catalog=["a", "b", "c"], users=["u", "v", "w"],
    ...     user=[0, 0, 1, 1, 2], item=[0, 1, 0, 1, 2], ts=range(5))
    >>> model = EASE(l2=0.5).fit(data)
    >>> (model.weights.diagonal() == 0).all().item(), round(model.weights[0, 1].item(), 2)
    (True, 0.8)
    """

    def __init__(self, l2: float = 500.0, *, dtype: torch.dtype = torch.float32) -> None:
        if l2 <= 0:
            raise ValueError("l2 must be positive")
        self.l2 = l2
        self.dtype = dtype
        self.items = np.zeros(0, dtype=np.int64)
        self.weights = torch.zeros(0, 0, dtype=dtype)
        self.n_items = 0

    def fit(self, train: Interactions) -> Self:
        x = train.user_item_matrix(binary=True)
        self.n_items = train.n_items
        self.items = np.flatnonzero(x.getnnz(axis=0))
        x = x[:, self.items]
        gram = torch.from_numpy((x.T @ x).toarray()).to(self.dtype)
        gram.diagonal().add_(self.l2)
        p = torch.cholesky_inverse(torch.linalg.cholesky(gram))
        del gram
        weights = p.div_(-p.diagonal().clone())  # column j divided by -P[j, j]
        weights.diagonal().zero_()
        self.weights = weights.contiguous()  # LAPACK hands back column-major
        return self

    def score(self, queries: Queries) -> np.ndarray:
        history = queries.history_matrix()[:, self.items].tocoo()
        indices = torch.from_numpy(np.vstack([history.row, history.col]).astype(np.int64))
        sparse = torch.sparse_coo_tensor(
            indices, torch.from_numpy(history.data).to(self.dtype), history.shape,
            check_invariants=False,
        )
        scores = np.zeros((len(queries), self.n_items), dtype=np.float32)
        scores[:, self.items] = torch.sparse.mm(sparse, self.weights).numpy()
        return scores
