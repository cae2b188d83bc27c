"""A context-aware sequential ranker in PyTorch (SASRec-style causal self-attention).

Model
    The user is their recent items: item embeddings plus learned positions (the last
    position is always the newest item) go through pre-norm causal transformer blocks, as
    in SASRec (Kang & McAuley, 2018). The state after item ``t`` is fused with the context
    of the request that follows it (hour of day, device, country; an MLP over
    ``[state, context]`` added to the state), and scores item ``j`` as
    ``<u, e_j> + b_j`` with the same item embeddings as the input (weight tying) and a
    per-item bias.

Ids
    Items with at least ``min_count`` training interactions get their own embedding row.
    Any other id (rare at training time, or never seen: new items, another dataset's
    catalog) is hashed into one of ``hash_buckets`` shared rows with a stable CRC-32, so
    scoring never fails on an unknown id. Context strings are hashed the same way;
    missing context has its own row, so the model works without any context.

Training
    Each position's next item is the positive; ``negatives`` items, drawn once per batch
    with probability ∝ ``(count + 1) ** 0.75`` and shared by all its positions, are the
    negatives (accidental hits masked out). The default loss is a sampled softmax with
    the logQ correction (so it estimates the full softmax); ``loss="bce"`` gives the
    binary cross-entropy the architecture names, ``softplus(-s⁺) + mean softplus(s⁻)``.
    Softmax is the default because it is clearly better here: on ml-latest-small, with
    the same 1,024 negatives, BCE reached validation NDCG@10 0.015 after 11 epochs where
    the softmax had 0.047 (and 0.063 at its best); SASRec with a softmax loss is known to
    beat its BCE original (Klenitskiy & Vasilev, RecSys 2023). AdamW with a 5% warm-up
    and cosine decay. Long histories are cut into windows of ``max_len``; batches group
    windows of similar length so that little time goes into padding. With ``negatives`` at
    least the number of item rows, every row is a negative and the loss is the exact
    full softmax (no sampling, no correction); on ml-latest-small one such epoch took
    87 s against 4-8 s with 1,024 negatives (2 shared CPU cores), so it is not the
    default. With validation
    queries, training stops when NDCG@10 has not improved for ``patience`` epochs and
    keeps the best epoch's weights.

Hybrid with co-visitation
    With ``covisitation_recent = K > 0`` and validation queries, the ranker is a documented
    hybrid: after the network is trained (and early-stopped), a
    :class:`CoVisitationPrior` is built from the same training interactions, and the final
    score of candidate ``c`` is ``w_0 * network(c) + sum_k w_(k+1) * f_k(c)`` where
    ``f_k`` is the co-visitation feature of ``c`` with the user's ``k``-th most recent
    item. The ``K + 1`` weights are fitted by L-BFGS to the log-likelihood of the
    validation targets under a softmax over the catalog minus each user's history (the
    ranking task), with the network frozen. The validation targets are never in the
    training interactions, so neither the network nor the blend sees a test item. On
    ml-latest-small the network alone reaches NDCG@10 ~0.05 and co-visitation ~0.07; the
    two are complementary (the network learns long-range taste and popularity, the
    co-visitation rows the immediate neighbours of the newest items).

Inference and persistence
    Full-catalog scoring runs in batches under :func:`torch.inference_mode`.
    :meth:`Ranker.save` writes the weights as safetensors plus a JSON of configuration and
    vocabulary (no pickle anywhere); :meth:`Ranker.export` gives a
    :mod:`torch.export` program of the scoring graph, and :meth:`Ranker.use_exported`
    makes the ranker score through it.

Examples
--------
>>> from training.data import Interactions
>>> from training.evaluation import leave_one_out
>>> data = Interactions.from_arrays(
...     catalog=list("abcd"), users=["u", "v"],
...     user=[0, 0, 0, 1, 1, 1], item=[0, 1, 2, 0, 1, 2], ts=range(6))
>>> split = leave_one_out(data)
>>> ranker = Ranker(RankerConfig(dim=8, heads=1, layers=1, epochs=2, negatives=4)).fit(
...     split.train)
>>> ranker.score(split.queries).shape
(2, 4)
>>> ranker.score_items(["a", "never-seen"], ["c", "also-new"]).shape
(2,)
"""

from __future__ import annotations

import itertools
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.sparse import csr_matrix
from torch import nn

from training.baselines import CoVisitation
from training.data import CONTEXT_FIELDS, Interactions
from training.evaluation import Queries, evaluate

__all__ = [
    "CONTEXT_INPUTS",
    "CoVisitationPrior",
    "EpochLog",
    "ItemVocab",
    "Ranker",
    "RankerConfig",
    "SequenceModel",
    "last_items",
    "stable_hash",
]

#: Context the ranker can use: hour of day (UTC, from the event time) and the event's
#: categorical context.
CONTEXT_INPUTS: tuple[str, ...] = ("hour", *CONTEXT_FIELDS)
FORMAT = "streamrec-ranker/2"
WEIGHTS_FILE = "ranker.safetensors"
META_FILE = "ranker.json"
#: Most float values (queries x catalog x (1 + features)) the hybrid's weights are
#: fitted on: the score rows are held in memory at once (1 GiB).
BLEND_VALUES = 1 << 28


def stable_hash(values: Sequence[str] | np.ndarray, buckets: int) -> np.ndarray:
    """CRC-32 of each string modulo ``buckets`` (the same in every process and run).

    Examples
    --------
    >>> stable_hash(["a", "b", "a"], 1000).tolist()
    [907, 681, 907]
    """
    # CRC-32 of a short string is cheaper than finding the distinct ones first.
    return np.fromiter((zlib.crc32(str(v).encode()) % buckets for v in values),
                       dtype=np.int64, count=len(values))


class ItemVocab:
    """Item ids to embedding rows: 0 is padding, then known ids, then hash buckets.

    Examples
    --------
    >>> vocab = ItemVocab(["a", "b"], buckets=10)
    >>> vocab.n_rows, vocab.rows(["b", "a"]).tolist()
    (13, [2, 1])
    >>> 3 <= int(vocab.rows(["unseen"])[0]) < 13
    True
    """

    def __init__(self, ids: Sequence[str], buckets: int) -> None:
        if buckets < 1:
            raise ValueError("buckets must be at least 1 (unknown ids are hashed into them)")
        self.ids = [str(i) for i in ids]
        self.buckets = buckets
        self._index = {item_id: row for row, item_id in enumerate(self.ids, 1)}
        if len(self._index) != len(self.ids):
            raise ValueError("item ids must be unique")

    @property
    def n_rows(self) -> int:
        """Padding row + known ids + buckets."""
        return 1 + len(self.ids) + self.buckets

    def rows(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """The embedding row of each id (``int64``)."""
        # One dictionary lookup per id: sorting strings (np.unique) cost more than it saved.
        names = [str(i) for i in ids]
        get = self._index.get
        rows = np.fromiter(map(get, names, itertools.repeat(0)), dtype=np.int64,
                           count=len(names))
        unknown = np.flatnonzero(rows == 0)
        if unknown.size:
            rows[unknown] = 1 + len(self.ids) + stable_hash(
                [names[i] for i in unknown.tolist()], self.buckets)
        return rows


@dataclass(frozen=True)
class RankerConfig:
    """Hyper-parameters of :class:`Ranker` (JSON-serialisable; saved with the weights).

    Parameters
    ----------
    max_len
        Most recent items the model looks at.
    dim, heads, layers, dropout
        Transformer width, attention heads, blocks and dropout rate.
    context
        Context inputs to use, from :data:`CONTEXT_INPUTS`; inputs that are missing from
        every training interaction are dropped at fit time.
    context_buckets
        Hash buckets of each categorical context input.
    min_count
        Items with fewer training interactions share hashed rows.
    hash_buckets
        Rows shared by rare and unknown item ids.
    loss
        ``"bce"`` (positives vs. sampled negatives) or ``"softmax"`` (sampled softmax).
    negatives
        Negatives sampled per batch, shared by its positions (at least the number of
        item rows: all of them).
    sampling_exponent
        Negatives are drawn with probability ∝ ``(count + 1) ** sampling_exponent``: 0 is
        uniform, 1 follows popularity (harder negatives).
    epochs, patience
        Most epochs, and epochs without validation gain before stopping.
    batch_size, lr, weight_decay
        Windows per step, Adam learning rate and (decoupled) weight decay.
    seed
        Seeds initialisation, shuffling and sampling.
    covisitation_recent
        How many of the user's last items add their co-visitation rows to the score, each
        with its own weight fitted on the validation queries (see
        :class:`CoVisitationPrior` and :meth:`Ranker.fit`); 0 gives the pure sequence
        model.
    covisitation_window
        Co-visits count up to this many positions apart (as in
        :class:`~training.baselines.CoVisitation`).
    """

    max_len: int = 200
    dim: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2
    context: tuple[str, ...] = CONTEXT_INPUTS
    context_buckets: int = 256
    min_count: int = 1
    hash_buckets: int = 1024
    loss: Literal["bce", "softmax"] = "softmax"
    negatives: int = 1024
    sampling_exponent: float = 0.75
    epochs: int = 40
    patience: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    covisitation_recent: int = 0
    covisitation_window: int = 10

    def __post_init__(self) -> None:
        unknown = set(self.context) - set(CONTEXT_INPUTS)
        if unknown:
            raise ValueError(f"unknown context inputs {sorted(unknown)}; use {CONTEXT_INPUTS}")
        if self.dim % self.heads:
            raise ValueError("dim must be a multiple of heads")
        if self.loss not in ("bce", "softmax"):
            raise ValueError("loss must be 'bce' or 'softmax'")
        if min(self.max_len, self.layers, self.negatives, self.epochs, self.batch_size) < 1:
            raise ValueError("max_len, layers, negatives, epochs and batch_size must be >= 1")
        if self.covisitation_recent < 0 or self.covisitation_window < 1:
            raise ValueError("covisitation_recent must be >= 0 and covisitation_window >= 1")


def encode_context(
    inputs: Sequence[str], ts: np.ndarray, context: Mapping[str, np.ndarray], buckets: int
) -> np.ndarray:
    """``(n, len(inputs))`` ids: 0 when missing, hour 1..24, categories 1..buckets."""
    columns = []
    for name in inputs:
        if name == "hour":
            columns.append(1 + (np.floor_divide(ts, 3600).astype(np.int64) % 24))
            continue
        values = np.asarray(context.get(name, np.full(ts.size, "")), dtype=str)
        present = values != ""
        column = np.zeros(ts.size, dtype=np.int64)
        if present.any():
            column[present] = 1 + stable_hash(values[present], buckets)
        columns.append(column)
    return np.stack(columns, axis=1) if columns else np.zeros((ts.size, 0), dtype=np.int64)


class CoVisitationPrior:
    """Co-visitation of a user's last items with each candidate, as score features.

    ``matrix`` is :class:`~training.baselines.CoVisitation`'s row-normalised item-item
    matrix ("what comes near this item") in item-row space (see :class:`ItemVocab`; row 0,
    padding, is empty). The features of candidate ``c`` after last items ``l_0`` (the
    newest), ``l_1``, ... are ``log1p(matrix[l_k, c] / smoothing)``: 0 without any
    co-visit, growing with its share of the row. The ranker adds them to its scores with
    one learned weight per ``k``.

    Parameters
    ----------
    matrix
        ``(rows, rows)`` sparse matrix.
    smoothing
        Co-visit share at which a feature reaches ``log 2``.

    Examples
    --------
    >>> from training.data import Interactions
    >>> data = Interactions.from_arrays(["a", "b", "c"], ["u"], [0, 0, 0], [0, 1, 2],
    ...                                 [1, 2, 3])
    >>> prior = CoVisitationPrior.fit(data, np.array([1, 2, 3]), n_rows=4, window=1)
    >>> # after a: b always; after b: a a third of the time (backwards), c two thirds
    >>> last = np.array([[1], [2]])  # one user after a, one after b
    >>> prior.features(last, np.array([1, 2, 3])).double().round(decimals=2).tolist()
    [[[0.0, 6.91, 0.0]], [[5.81, 0.0, 6.5]]]
    """

    def __init__(self, matrix: csr_matrix, smoothing: float = 1e-3) -> None:
        self.matrix = csr_matrix(matrix, dtype=np.float32)
        self.smoothing = smoothing

    @classmethod
    def fit(
        cls, train: Interactions, item_rows: np.ndarray, n_rows: int, window: int
    ) -> CoVisitationPrior:
        """Co-visitation of ``train`` with catalog item ``i`` mapped to row ``item_rows[i]``."""
        covisits = CoVisitation(window=window).fit(train).matrix
        to_rows = csr_matrix(
            (np.ones(item_rows.size, dtype=np.float32), (np.arange(item_rows.size), item_rows)),
            shape=(item_rows.size, n_rows),
        )
        return cls(to_rows.T @ covisits @ to_rows)

    def features(self, last: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        """``(B, K, C)`` features of ``candidates`` (rows) after ``last`` (``(B, K)`` rows)."""
        unique, inverse = np.unique(last, return_inverse=True)
        block = self.matrix[unique][:, candidates].toarray()
        values = block[inverse.reshape(-1)].reshape(*last.shape, candidates.size)
        return torch.from_numpy(np.log1p(values / self.smoothing, dtype=np.float32))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The matrix as named tensors (for safetensors)."""
        m = self.matrix
        return {
            "covisitation.indptr": torch.from_numpy(m.indptr.astype(np.int64)),
            "covisitation.indices": torch.from_numpy(m.indices.astype(np.int64)),
            "covisitation.data": torch.from_numpy(m.data),
            "covisitation.shape": torch.tensor(m.shape, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> CoVisitationPrior:
        """Inverse of :meth:`tensors`."""
        n, m = tensors["covisitation.shape"].tolist()
        return cls(csr_matrix(
            (tensors["covisitation.data"].numpy(), tensors["covisitation.indices"].numpy(),
             tensors["covisitation.indptr"].numpy()), shape=(n, m)))


def last_items(histories: Sequence[np.ndarray], k: int) -> np.ndarray:
    """``(B, k)`` item rows: column 0 the newest item of each history, 0 where none.

    Examples
    --------
    >>> last_items([np.array([4, 5, 6]), np.array([7])], 2).tolist()
    [[6, 5], [7, 0]]
    """
    out = np.zeros((len(histories), k), dtype=np.int64)
    for i, h in enumerate(histories):
        tail = h[::-1][:k]
        out[i, : tail.size] = tail
    return out


class _Block(nn.Module):
    """Pre-norm transformer block; ``allowed[b, 0, i, j]`` says whether i may attend to j."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class SequenceModel(nn.Module):
    """The network: ``forward(seq, ctx, candidates)`` scores candidates for each sequence.

    Parameters
    ----------
    n_rows
        Item embedding rows (see :class:`ItemVocab`).
    max_len, dim, heads, layers, dropout
        Architecture.
    context_sizes
        Embedding rows of each context input (empty: no context branch).
    prior_inputs
        Co-visitation features per candidate (:class:`CoVisitationPrior`) that
        :meth:`hybrid` mixes into the network's scores; :meth:`forward` is the network
        alone.

    Examples
    --------
    >>> import torch
    >>> model = SequenceModel(n_rows=10, max_len=4, dim=8, heads=2, layers=1, dropout=0.0,
    ...                       context_sizes=[25])
    >>> seq = torch.tensor([[0, 0, 3, 5]])  # left-padded: 3 then 5
    >>> model(seq, torch.tensor([[13]]), torch.arange(1, 10)).shape
    torch.Size([1, 9])
    """

    def __init__(
        self,
        n_rows: int,
        max_len: int,
        dim: int,
        heads: int,
        layers: int,
        dropout: float,
        context_sizes: Sequence[int] = (),
        prior_inputs: int = 0,
    ) -> None:
        super().__init__()
        self.scale = math.sqrt(dim)
        self.items = nn.Embedding(n_rows, dim, padding_idx=0)
        self.bias = nn.Parameter(torch.zeros(n_rows))
        self.positions = nn.Parameter(torch.zeros(max_len, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.context = nn.ModuleList(nn.Embedding(size, dim) for size in context_sizes)
        self.fuse = (
            nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
            if context_sizes else None
        )
        # [network, feature 0, feature 1, ...]: fitted on held-out queries after the
        # network is trained (Ranker.fit), never by the network's optimiser.
        self.blend = nn.Parameter(torch.ones(1 + prior_inputs), requires_grad=False)
        nn.init.normal_(self.items.weight, std=dim**-0.5)
        nn.init.normal_(self.positions, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def states(self, seq: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim)``: the state after each position of left-padded ``seq``."""
        n = seq.shape[1]
        pad = seq == 0
        # Positions are counted from the end, so the newest item always has the last one.
        x = self.items(seq) * self.scale + self.positions[self.positions.shape[0] - n :]
        x = self.drop(x).masked_fill(pad[..., None], 0.0)
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        # Padding rows may attend to themselves so that no row is fully masked (NaN).
        allowed = (causal & ~pad[:, None, :]) | torch.eye(n, dtype=torch.bool,
                                                          device=seq.device)
        allowed = allowed[:, None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def fused(self, state: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Mix ``ctx`` (``(..., n_inputs)`` ids) into ``state`` (``(..., dim)``)."""
        if self.fuse is None:
            return state
        c = self.context[0](ctx[..., 0])
        for i in range(1, len(self.context)):
            c = c + self.context[i](ctx[..., i])
        return state + self.fuse(torch.cat([state, c], dim=-1))

    def hybrid(
        self, scores: torch.Tensor, features: torch.Tensor, blend: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``blend[0] * scores + sum_k blend[1 + k] * features[:, k]``: ``(B, C)`` scores
        of the network and ``(B, K, C)`` co-visitation features (``blend``: this
        model's, unless given)."""
        w = self.blend if blend is None else blend
        return w[0] * scores + torch.einsum("bkc,k->bc", features, w[1:])

    def forward(
        self, seq: torch.Tensor, ctx: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """``(B, C)`` scores of ``candidates`` (rows) after ``seq`` in context ``ctx``."""
        user = self.fused(self.states(seq)[:, -1], ctx)
        return user @ self.items(candidates).T + self.bias[candidates]


@dataclass(frozen=True)
class EpochLog:
    """What one training epoch did."""

    epoch: int
    loss: float
    seconds: float
    validation: dict[str, float] | None = None
    best: bool = False


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over 5% of the steps, then cosine decay to
    a tenth (steadier than a constant rate)."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    return factor


class _NegativeSampler:
    """Draws the negatives of a batch: rows with probability ∝ (count + 1) ** exponent.

    Asking for at least as many negatives as there are item rows gives every row (a full
    softmax). ``log_q`` holds each row's log sampling probability, for the logQ
    correction of the sampled softmax.
    """

    def __init__(self, row_counts: np.ndarray, negatives: int, exponent: float) -> None:
        weights = (row_counts.astype(np.float64) + 1.0) ** exponent
        weights[0] = 0.0  # padding
        q = weights / weights.sum()
        self.full = negatives >= q.size - 1
        self.negatives = negatives
        self.cum = np.cumsum(q)
        self.every_row = torch.arange(1, q.size)
        self.log_q = torch.from_numpy(np.log(np.maximum(q, 1e-30))).float()
        if self.full:
            self.log_q.zero_()

    def sample(self, rng: np.random.Generator) -> torch.Tensor:
        if self.full:
            return self.every_row
        draws = np.searchsorted(self.cum, rng.random(self.negatives) * self.cum[-1],
                                side="right")
        return torch.from_numpy(np.clip(draws, 1, self.cum.size - 1))


@dataclass
class _Windows:
    """Training windows of ``max_len + 1`` item rows, left-padded, with their contexts.

    Position ``t`` reads ``items[:t + 1]`` and answers the request of ``t + 1``.
    """

    items: np.ndarray
    context: np.ndarray
    lengths: np.ndarray  # inputs per window (items - 1)


class Ranker:
    """Fits, scores, saves and exports a :class:`SequenceModel` (see the module docs).

    Parameters
    ----------
    config
        Hyper-parameters.

    Examples
    --------
    >>> import tempfile
    >>> from training.data import Interactions
    >>> from training.evaluation import leave_one_out
    >>> data = Interactions.from_arrays(list("abc"), ["u"], [0, 0, 0], [0, 1, 2], [1, 2, 3])
    >>> split = leave_one_out(data)
    >>> ranker = Ranker(RankerConfig(dim=8, heads=1, layers=1, epochs=1)).fit(split.train)
    >>> folder = tempfile.mkdtemp()
    >>> ranker.save(folder)
    >>> again = Ranker.load(folder)
    >>> bool((again.score(split.queries) == ranker.score(split.queries)).all())
    True
    """

    def __init__(self, config: RankerConfig | None = None) -> None:
        self.config = config or RankerConfig()
        self.vocab = ItemVocab([], buckets=self.config.hash_buckets)
        self.context_inputs: tuple[str, ...] = ()
        self.model: SequenceModel | None = None
        self.history: list[EpochLog] = []
        self.train_seconds = 0.0
        self.prior: CoVisitationPrior | None = None
        self._forward: Callable[..., torch.Tensor] | None = None
        self._catalog: tuple[np.ndarray, torch.Tensor] | None = None

    # --- building ----------------------------------------------------------------------

    def _build(self, item_ids: Sequence[str], context_inputs: Sequence[str]) -> SequenceModel:
        cfg = self.config
        self.vocab = ItemVocab(item_ids, buckets=cfg.hash_buckets)
        self.context_inputs = tuple(context_inputs)
        sizes = [25 if name == "hour" else cfg.context_buckets + 1 for name in context_inputs]
        self.model = SequenceModel(
            self.vocab.n_rows, cfg.max_len, cfg.dim, cfg.heads, cfg.layers, cfg.dropout, sizes,
            prior_inputs=cfg.covisitation_recent,
        )
        self._forward = self.model
        self._catalog = None
        return self.model

    def _require_model(self) -> SequenceModel:
        if self.model is None:
            raise RuntimeError("the ranker is not fitted; call fit() or Ranker.load()")
        return self.model

    def _scorer(self) -> Callable[..., torch.Tensor]:
        """The scoring function (eager model or exported program), in inference state."""
        self._require_model().eval()
        assert self._forward is not None  # set together with the model
        return self._forward

    def _windows(self, train: Interactions) -> _Windows:
        cfg = self.config
        rows = self.vocab.rows(train.catalog)[train.item]
        ctx = encode_context(self.context_inputs, train.ts, train.context, cfg.context_buckets)
        n_ctx = ctx.shape[1]
        spans = []
        for seq in train.sequences():
            for end in range(seq.size, 1, -cfg.max_len):
                spans.append(seq[max(0, end - cfg.max_len - 1) : end])
        w = _Windows(
            items=np.zeros((len(spans), cfg.max_len + 1), dtype=np.int64),
            context=np.zeros((len(spans), cfg.max_len + 1, n_ctx), dtype=np.int64),
            lengths=np.array([s.size - 1 for s in spans], dtype=np.int64),
        )
        for i, span in enumerate(spans):
            w.items[i, -span.size :] = rows[span]
            w.context[i, -span.size :] = ctx[span]
        return w

    # --- training ----------------------------------------------------------------------

    def fit(
        self,
        train: Interactions,
        *,
        validation: Queries | None = None,
        on_epoch: Callable[[EpochLog], None] | None = None,
    ) -> Self:
        """Train on ``train``; with ``validation``, stop early and keep the best epoch.

        Parameters
        ----------
        train
            Training interactions (e.g. ``leave_one_out(data).train``).
        validation
            Queries to early-stop on; their targets must not be in ``train`` (use the
            queries of ``leave_one_out(train_plus_validation)``).
        on_epoch
            Called after each epoch (progress reporting).
        """
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        counts = train.item_counts()
        inputs = [
            name for name in cfg.context
            if name == "hour" or (train.context.get(name, np.zeros(0)) != "").any()
        ]
        model = self._build(train.catalog[counts >= cfg.min_count].tolist(), inputs)
        self.prior = None
        windows = self._windows(train)
        if not windows.lengths.size:
            raise ValueError("no user has two interactions: nothing to learn from")
        row_counts = np.bincount(self.vocab.rows(train.catalog)[train.item],
                                 minlength=self.vocab.n_rows)
        sampler = _NegativeSampler(row_counts, cfg.negatives, cfg.sampling_exponent)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(windows.lengths.size / cfg.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
        best_score, best_state, stale = -math.inf, None, 0
        self.history = []
        started = time.perf_counter()
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            loss = self._epoch(model, optimizer, schedule, windows, sampler, rng)
            log = EpochLog(epoch, loss, time.perf_counter() - t0)
            if validation is not None:
                result = evaluate(self, validation, metrics=("ndcg@10", "recall@10"))
                improved = result["ndcg@10"] > best_score
                if improved:
                    best_score, stale = result["ndcg@10"], 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    stale += 1
                log = replace(log, validation=result, best=improved)
            self.history.append(log)
            if on_epoch is not None:
                on_epoch(log)
            if validation is not None and stale >= cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        if cfg.covisitation_recent and validation is not None:
            self._fit_blend(train, validation)
        self.train_seconds = time.perf_counter() - started
        return self

    def recount_covisitation(self, train: Interactions) -> Self:
        """Rebuild the hybrid's co-visitation prior from ``train``, keeping its weights.

        The weights are fitted with the prior of the data the network trained on, which
        cannot contain the validation items; before the test the prior is recounted on
        the training data with them, the data every baseline is refitted on (the network
        is not retrained: that would cost a second training run). No-op for the pure
        sequence model.
        """
        if self.prior is not None:
            self.prior = self._count_prior(train)
        return self

    def _count_prior(self, train: Interactions) -> CoVisitationPrior:
        return CoVisitationPrior.fit(
            train, self.vocab.rows(train.catalog), self.vocab.n_rows,
            self.config.covisitation_window,
        )

    def _fit_blend(self, train: Interactions, validation: Queries) -> None:
        """Build the co-visitation prior of ``train`` and fit the hybrid's weights.

        The weights maximise the log-likelihood of the validation targets under a
        softmax over the catalog minus each user's history (the ranking task), with the
        network frozen: a handful of parameters, fitted on data the network never
        trained on. The first queries are used, as many as :data:`BLEND_VALUES` allows
        (at least 256).
        """
        model = self._require_model()
        self.prior = self._count_prior(train)
        per_query = validation.n_items * (1 + self.config.covisitation_recent)
        queries = validation.rows(0, min(len(validation), max(256, BLEND_VALUES // per_query)))
        scores, features = [], []
        with torch.no_grad():
            for batch in queries.batches(256):
                network, prior = self._network_and_prior(*self._query_inputs(batch))
                assert prior is not None  # set above
                scores.append(network)
                features.append(prior)
        network, prior = torch.cat(scores), torch.cat(features)
        history = torch.from_numpy(queries.excluded())
        target = torch.from_numpy(queries.target.astype(np.int64))
        blend = model.blend.detach().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([blend], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = model.hybrid(network, prior, blend).masked_fill(history, -math.inf)
            loss = F.cross_entropy(logits, target)
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            model.blend.copy_(blend)

    def _batches(self, windows: _Windows, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffled batches of windows with similar lengths (little padding)."""
        size = self.config.batch_size
        order = rng.permutation(windows.lengths.size)
        pool = size * 32
        batches = []
        for start in range(0, order.size, pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(windows.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + size] for i in range(0, chunk.size, size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _epoch(
        self,
        model: SequenceModel,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        windows: _Windows,
        sampler: _NegativeSampler,
        rng: np.random.Generator,
    ) -> float:
        cfg = self.config
        model.train()
        total, positions = 0.0, 0
        for batch in self._batches(windows, rng):
            n = int(windows.lengths[batch].max())
            items = windows.items[batch, -(n + 1) :]
            seq = torch.from_numpy(items[:, :-1])
            ctx = torch.from_numpy(windows.context[batch, -n:])  # of the request answered
            target = torch.from_numpy(items[:, 1:])
            valid = torch.from_numpy((items[:, :-1] != 0) & (items[:, 1:] != 0))
            user = model.fused(model.states(seq), ctx)[valid]
            pos = target[valid]
            neg = sampler.sample(rng)
            neg_logit = user @ model.items(neg).T + model.bias[neg]
            pos_logit = (user * model.items(pos)).sum(-1) + model.bias[pos]
            if sampler.full and cfg.loss == "softmax":
                # The negatives are every row, row r in column r - 1: the exact softmax.
                loss = F.cross_entropy(neg_logit, pos - 1)
            elif cfg.loss == "bce":
                hit = pos[:, None] == neg[None, :]
                neg_loss = F.softplus(neg_logit).masked_fill(hit, 0.0).mean(-1)
                loss = (F.softplus(-pos_logit) + neg_loss).mean()
            else:
                # logQ correction: the sampled softmax then estimates the full one.
                hit = pos[:, None] == neg[None, :]
                logits = torch.cat([
                    (pos_logit - sampler.log_q[pos])[:, None],
                    (neg_logit - sampler.log_q[neg]).masked_fill(hit, -1e9),
                ], 1)
                loss = F.cross_entropy(logits, torch.zeros(pos.size(0), dtype=torch.long))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * pos.size(0)
            positions += pos.size(0)
        return total / max(positions, 1)

    # --- scoring -----------------------------------------------------------------------

    def _sequences(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """Left-padded rows of the last ``max_len`` items of each history (item rows)."""
        cap = self.config.max_len
        n = max(1, min(cap, max((h.size for h in histories), default=1)))
        seq = np.zeros((len(histories), n), dtype=np.int64)
        for i, h in enumerate(histories):
            tail = h[-n:]
            if tail.size:
                seq[i, n - tail.size :] = tail
        return torch.from_numpy(seq)

    def _catalog_rows(self, catalog: np.ndarray) -> torch.Tensor:
        if self._catalog is None or self._catalog[0] is not catalog:
            self._catalog = (catalog, torch.from_numpy(self.vocab.rows(catalog)))
        return self._catalog[1]

    def _network_and_prior(
        self, histories: Sequence[np.ndarray], ctx: np.ndarray, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's ``(B, C)`` scores (eager or exported) and, with a co-visitation
        prior, its ``(B, K, C)`` features."""
        scores = self._scorer()(self._sequences(histories), torch.from_numpy(ctx), candidates)
        if self.prior is None:
            return scores, None
        last = last_items(histories, self.config.covisitation_recent)
        return scores, self.prior.features(last, candidates.numpy())

    def _score_rows(
        self, histories: Sequence[np.ndarray], ctx: np.ndarray, candidates: torch.Tensor
    ) -> np.ndarray:
        """``(B, C)`` final scores: the network's, or the hybrid with a prior."""
        with torch.inference_mode():
            scores, features = self._network_and_prior(histories, ctx, candidates)
            if features is not None:
                scores = self._require_model().hybrid(scores, features)
        return scores.numpy()

    def _query_inputs(
        self, queries: Queries
    ) -> tuple[list[np.ndarray], np.ndarray, torch.Tensor]:
        """Histories (item rows), context ids and the catalog's rows, for ``queries``."""
        candidates = self._catalog_rows(queries.catalog)
        histories = np.split(candidates.numpy()[queries.history], queries.indptr[1:-1])
        ctx = encode_context(
            self.context_inputs, queries.ts, queries.context, self.config.context_buckets)
        return histories, ctx, candidates

    def score(self, queries: Queries, *, batch_size: int = 512) -> np.ndarray:
        """Scores of the whole catalog for each query (the evaluation's Scorer)."""
        out = np.empty((len(queries), queries.n_items), dtype=np.float32)
        for start in range(0, len(queries), batch_size):
            batch = queries.rows(start, min(start + batch_size, len(queries)))
            out[start : start + len(batch)] = self._score_rows(*self._query_inputs(batch))
        return out

    def score_items(
        self,
        history: Sequence[str],
        candidates: Sequence[str],
        *,
        at: datetime | None = None,
        context: Mapping[str, str] | None = None,
    ) -> np.ndarray:
        """Scores of ``candidates`` for one user with ``history`` (ids, oldest first).

        Unknown ids are hashed, never rejected. ``at`` (the request time) gives the hour
        of day; without it the hour counts as missing.
        """
        ts = np.array([at.timestamp() if at is not None else 0.0])
        ctx = encode_context(
            self.context_inputs, ts, {k: np.array([v]) for k, v in (context or {}).items()},
            self.config.context_buckets,
        )
        if at is None and "hour" in self.context_inputs:
            ctx[:, self.context_inputs.index("hour")] = 0
        rows = self.vocab.rows(list(history)) if history else np.zeros(0, dtype=np.int64)
        candidate_rows = torch.from_numpy(self.vocab.rows(list(candidates)))
        return self._score_rows([rows], ctx, candidate_rows)[0]

    # --- persistence and export --------------------------------------------------------

    def save(self, folder: Path | str) -> None:
        """Write ``ranker.safetensors`` (weights and co-visitation matrix) and
        ``ranker.json`` (config, vocabulary)."""
        model = self._require_model()
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if self.prior is not None:
            tensors.update(self.prior.tensors())
        save_file(tensors, path / WEIGHTS_FILE, metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "config": asdict(self.config),
            "context_inputs": list(self.context_inputs),
            "items": self.vocab.ids,
            "train_seconds": self.train_seconds,
            "epochs": [asdict(log) for log in self.history],
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: Path | str) -> Ranker:
        """A ranker saved by :meth:`save`, ready to score."""
        path = Path(folder)
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path / META_FILE}: not a {FORMAT} file")
        config = dict(meta["config"])
        config["context"] = tuple(config["context"])
        ranker = cls(RankerConfig(**config))
        model = ranker._build(meta["items"], meta["context_inputs"])
        tensors = load_file(path / WEIGHTS_FILE)
        if "covisitation.indptr" in tensors:
            ranker.prior = CoVisitationPrior.from_tensors(tensors)
        model.load_state_dict(
            {k: v for k, v in tensors.items() if not k.startswith("covisitation.")})
        model.eval()
        ranker.train_seconds = float(meta.get("train_seconds", 0.0))
        ranker.history = [EpochLog(**log) for log in meta.get("epochs", [])]
        return ranker

    def export(self) -> torch.export.ExportedProgram:
        """The scoring graph ``(seq, ctx, candidates) -> scores`` as a torch.export program.

        Batch size, sequence length (up to ``max_len``) and candidate count are dynamic.
        Persist the weights with :meth:`save`: a saved ``.pt2`` program is unpickled on
        load, which is not safe for untrusted files.
        """
        model = self._require_model().eval()
        cfg = self.config
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        length = torch.export.Dim("length", min=1, max=cfg.max_len)
        count = torch.export.Dim("candidates", min=1, max=1 << 24)
        seq = torch.ones(2, min(3, cfg.max_len), dtype=torch.int64)
        ctx = torch.ones(2, len(self.context_inputs), dtype=torch.int64)
        candidates = torch.arange(1, 4, dtype=torch.int64)
        return torch.export.export(
            model, (seq, ctx, candidates),
            dynamic_shapes=({0: batch, 1: length}, {0: batch}, {0: count}),
        )

    def use_exported(self) -> Self:
        """Score through the exported program from now on (eager weights stay loaded)."""
        self._forward = self.export().module()
        return self
