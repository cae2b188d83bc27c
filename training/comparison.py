"""Every model on the same leave-one-out split: the table behind ``streamrec evaluate``.

Hyper-parameters are chosen on the validation split (each user's second-to-last
interaction, :func:`~training.evaluation.leave_one_out` applied to the training data) and
the chosen model is refitted on the full training data before the test, so that no
choice ever sees a test item:

- popularity: nothing to tune;
- co-visitation: a small grid over window, recency and popularity damping;
- EASE: its L2 strength over a log grid;
- online: the River online model (:mod:`training.online_eval`) learns the training
  interactions once, in time order, with sampled negatives; nothing is tuned (it is meant
  to run on a live stream with its defaults);
- ranker: trained on the validation split's training data and early-stopped on its
  NDCG@10 (the best epoch's weights are kept); the hybrid's blend weights are fitted on
  the validation queries. The network is not retrained: a refit would add one interaction
  per user (the validation item, under 1% of the data on MovieLens) for the price of a
  second training run; its co-visitation prior is recounted on the full training data,
  like the co-visitation baseline. At test time its input history does include the
  validation item, like every other model's.

Examples
--------
>>> from streaming.simulator import Simulator, SimulatorConfig
>>> from training.data import Interactions
>>> sim = Simulator(SimulatorConfig(n_users=40, n_items=60, n_categories=4, seed=3))
>>> data = Interactions.from_records(sim.events(3000), first_only=True)
>>> results = compare_models(data, models=("popularity", "covisitation"),
...                          covisitation_grid=[{"window": 3}])
>>> [r.name for r in results]
['popularity', 'covisitation']
>>> sorted(results[0].metrics)
['auc', 'hr@10', 'ndcg@10', 'recall@10', 'recall@50']
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.baselines import EASE, CoVisitation, Popularity
from training.data import Interactions
from training.evaluation import (
    Queries,
    Scorer,
    Split,
    evaluate_per_query,
    leave_one_out,
    tune,
)
from training.online_eval import OnlineCatalogRanker
from training.ranker import EpochLog, Ranker, RankerConfig

__all__ = [
    "COVISITATION_GRID",
    "EASE_GRID",
    "MODELS",
    "MOVIELENS_RANKER",
    "ModelResult",
    "compare_models",
]

MODELS: tuple[str, ...] = ("ranker", "online", "popularity", "covisitation", "ease")
#: The ranker for MovieLens: ratings carry no request context (the hour a rating was
#: typed in is not one), so the context branch is off.
MOVIELENS_RANKER = RankerConfig(context=())
EASE_GRID: tuple[float, ...] = (30.0, 100.0, 300.0, 1000.0)
COVISITATION_GRID: tuple[dict[str, Any], ...] = tuple(
    {"window": w, "recent": r, "alpha": a}
    for w in (2, 5, 10) for r in (3, 10, 30) for a in (0.0, 0.3)
)


@dataclass(frozen=True)
class ModelResult:
    """Test metrics (mean and standard error over users) of one fitted model."""

    name: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    fit_seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    model: Scorer | None = field(default=None, repr=False, compare=False)


def _summarise(name: str, model: Scorer, queries: Queries, seconds: float,
               params: Mapping[str, Any]) -> ModelResult:
    values = evaluate_per_query(model, queries)
    means, errors = {}, {}
    for metric, v in values.items():
        v = v[np.isfinite(v)]
        means[metric] = float(v.mean()) if v.size else float("nan")
        errors[metric] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return ModelResult(name, means, errors, seconds, dict(params), model)


def compare_models(
    data: Interactions,
    *,
    models: Sequence[str] = MODELS,
    ranker_config: RankerConfig | None = None,
    ease_grid: Iterable[float] = EASE_GRID,
    covisitation_grid: Iterable[Mapping[str, Any]] = COVISITATION_GRID,
    categories: Mapping[str, str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[ModelResult]:
    """Tune, fit and test each of ``models`` (names from :data:`MODELS`), in that order.

    Parameters
    ----------
    data
        All interactions; the split is made here.
    models
        Which models to run.
    ranker_config
        The ranker's hyper-parameters (``epochs`` is the most it may train).
    ease_grid, covisitation_grid
        Candidate hyper-parameters, chosen on the validation split.
    categories
        Item id → category, read by the online model (user-category crosses).
    log
        Receives one line per step (progress).
    """
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    split = leave_one_out(data)
    validation = leave_one_out(split.train)
    log(f"split: {len(split.train):,} training interactions, {len(split.queries):,} test "
        f"users, {len(validation.queries):,} validation users, {data.n_items:,} items")
    results = []
    for name in models:
        t0 = time.perf_counter()
        params: dict[str, Any] = {}
        model: Scorer
        if name == "popularity":
            model = Popularity().fit(split.train)
        elif name == "covisitation":
            best, _ = tune(
                lambda p, train: CoVisitation(**p).fit(train), covisitation_grid, validation,
                on_result=lambda p, r: log(f"covisitation {p}: validation ndcg@10 "
                                           f"{r['ndcg@10']:.4f}"),
            )
            params = dict(best)
            model = CoVisitation(**best).fit(split.train)
        elif name == "online":
            online = OnlineCatalogRanker(categories=categories).fit(split.train, log=log)
            params = {"negatives": online.negatives, "rows": online.model.examples,
                      "param_count": online.model.param_count}
            model = online
        elif name == "ease":
            l2, _ = tune(
                lambda v, train: EASE(l2=v).fit(train), ease_grid, validation,
                on_result=lambda v, r: log(f"ease l2={v:g}: validation ndcg@10 "
                                           f"{r['ndcg@10']:.4f}"),
            )
            params = {"l2": l2}
            model = EASE(l2=l2).fit(split.train)
        else:
            model, params = _fit_ranker(validation, ranker_config, log)
            model.recount_covisitation(split.train)
        seconds = time.perf_counter() - t0
        result = _summarise(name, model, split.queries, seconds, params)
        log(f"{name}: test ndcg@10 {result.metrics['ndcg@10']:.4f}, "
            f"recall@10 {result.metrics['recall@10']:.4f} ({seconds:.1f} s)")
        results.append(result)
    return results


def _fit_ranker(
    validation: Split, config: RankerConfig | None, log: Callable[[str], None]
) -> tuple[Ranker, dict[str, Any]]:
    def progress(e: EpochLog) -> None:
        v = e.validation or {}
        log(f"ranker epoch {e.epoch}: loss {e.loss:.4f}, validation ndcg@10 "
            f"{v.get('ndcg@10', float('nan')):.4f}{' *' if e.best else ''} ({e.seconds:.1f} s)")

    ranker = Ranker(config).fit(validation.train, validation=validation.queries,
                                on_epoch=progress)
    best = max(ranker.history, key=lambda e: (e.validation or {}).get("ndcg@10", -1.0))
    return ranker, {
        "best_epoch": best.epoch,
        "epochs_run": len(ranker.history),
        "validation_ndcg@10": (best.validation or {}).get("ndcg@10"),
        "train_seconds": round(ranker.train_seconds, 1),
    }
