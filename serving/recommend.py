"""One recommendation, as a pipeline of plain steps the HTTP layer only calls.

1. :func:`read_user` — the user views of the ``ranker_features`` service, recent items and
   newest event time among them (one small online read, never cached);
2. :func:`generate` — candidates from the catalog indexes, co-visitation, trending and new
   items (:mod:`serving.candidates`), minus purchased and (``exclude_seen``) recent items;
3. :func:`read_features` — one batched ``OnlineFeatureReader.read`` of the service's item
   views for the candidates, through a near cache (:mod:`serving.feature_cache`: stream
   views at most ``serving_item_features_max_age_ms`` old) and with ``item_realtime`` read
   as its packed twin (:mod:`features.packed`); the catalog views (``item_profile``,
   ``item_embeddings``) come from the catalog snapshot that also backs the indexes
   (``serving_catalog_features``);
4. :func:`score` — ranker and online model on one :class:`RankingBatch`, blended with
   ``serving_online_weight``;
5. :func:`diversify` — at most ``ceil(k * serving_category_share)`` items per category;
6. the answer, and its impression queued for Kafka.

Any dependency that fails is replaced, never propagated: the online store down → trending
and new items ranked by popularity (``fallbacks: ["feature_store"]``); a model missing or
failing → the other model, or popularity; a request that waited longer than
``serving_queue_timeout_ms`` for a thread (overload) → trending and new items at once
(``fallbacks: ["overload"]``). Each stage's duration is measured
(:class:`Stopwatch`), exported to Prometheus and returned to the client in a
``Server-Timing`` header.

Examples
--------
>>> diversify([0, 1, 2, 3], ["Shoes", "Shoes", "Shoes", "Books"], k=3, share=0.5)
[0, 1, 3]
>>> blend(np.array([0.2, 0.8]), np.array([0.6, 0.4]), weight=0.25).round(2).tolist()
[0.3, 0.7]
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from features.packed import PACKED
from features.store import RANKER_SERVICE
from serving.candidates import (
    Candidate,
    co_visited,
    context_scope,
    fresh,
    merge,
    similar_to_recent,
    source_counts,
    trending,
)
from serving.catalog import CATALOG_VIEWS
from serving.impressions import Shown
from serving.metrics import STAGES
from serving.models import LoadedModel
from serving.runtime import ServingRuntime, StoreUnavailable
from serving.schemas import (
    ModelVersions,
    RecommendationRequest,
    RecommendationResponse,
    RecommendedItem,
)
from serving.trending import ALL
from training.ranking_batch import RankingBatch

__all__ = ["Stopwatch", "UserState", "blend", "diversify", "generate", "read_features",
           "read_user", "recommend", "score"]

log = logging.getLogger(__name__)

class Stopwatch:
    """Durations of consecutive stages: :meth:`lap` closes the stage that just ran.

    ``clock`` is wall time by default; ``time.thread_time`` makes the stages CPU time of
    the calling thread (``bench/serve_cpu.py``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start = self._last = clock()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = self.clock()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        return self.clock() - self.start

    def server_timing(self) -> str:
        """The ``Server-Timing`` header value (milliseconds, three decimals)."""
        return ", ".join(f"{name};dur={s * 1000:.3f}" for name, s in self.stages.items())


@dataclass(frozen=True)
class UserState:
    """What the online store knows about the user right now: every user feature of the
    ranker's service (``<view>__<feature>``), read once per request."""

    features: Mapping[str, Any] = field(default_factory=dict)

    @property
    def recent(self) -> tuple[str, ...]:
        return tuple(self.features.get("user_realtime__recent_items") or ())

    @property
    def last_event_ts(self) -> float | None:
        last = self.features.get("user_realtime__last_event_ts")
        return None if last is None else float(last)

    @property
    def known(self) -> bool:
        return self.last_event_ts is not None


def read_user(rt: ServingRuntime, user_id: str) -> UserState:
    """The user's features in the ranker's service; raises ``StoreUnavailable``."""
    refs = rt.store.service_features(RANKER_SERVICE, join_key="user_id")
    row = rt.store.read(refs, {"user_id": [user_id]}, full_feature_names=True)
    return UserState({name: values[0] for name, values in row.items() if "__" in name})


def generate(
    rt: ServingRuntime,
    request: RecommendationRequest,
    user: UserState,
    exclude: frozenset[str],
) -> list[Candidate]:
    """Up to ``serving_max_candidates`` candidates, sources interleaved, ``exclude`` left out."""
    settings = rt.settings
    limit = settings.serving_max_candidates
    context = request.context
    device = context.device.value if context is not None and context.device else None
    country = context.country if context is not None else None
    catalog = rt.catalog.catalog
    if request.candidates is not None:
        return requested(rt, request.candidates[:limit], device, country, exclude)
    recent = user.recent
    sources: list[Sequence[Candidate]] = []
    if recent:
        sources.append(similar_to_recent(catalog, recent, seeds=settings.serving_ann_seeds,
                                         per_seed=settings.serving_ann_neighbors))
        seeds = recent[: settings.serving_ann_seeds]
        found = rt.neighbors.read(seeds)
        if found is not None:
            sources.append(co_visited(catalog, seeds, *found,
                                      per_seed=settings.serving_ann_neighbors))
    scope = context_scope(rt.trending, device, country)
    n = settings.serving_trending_per_scope
    if scope != ALL:
        sources.append(trending(rt.trending, scope, n=n))
    sources.append(trending(rt.trending, ALL, n=n))
    categories = [c for item in recent if (c := catalog.category(item)) is not None]
    sources.append(fresh(catalog, categories))
    # Deeper into the overall list: fills the budget when the other sources run dry.
    sources.append(trending(rt.trending, ALL, n=limit)[n:])
    return merge(sources, limit=limit, exclude=exclude)


def requested(
    rt: ServingRuntime, item_ids: Sequence[str], device: str | None, country: str | None,
    exclude: frozenset[str],
) -> list[Candidate]:
    """The caller's own candidates, explained by trending where they trend."""
    scope = context_scope(rt.trending, device, country)
    known = {c.item_id: c for c in trending(rt.trending, scope, n=500)}
    out = []
    for item in dict.fromkeys(item_ids):
        if item in exclude:
            continue
        hit = known.get(item)
        out.append(Candidate(item, hit.prior if hit else 0.0, "requested",
                             hit.reason if hit else "picked for you"))
    return out


def read_features(rt: ServingRuntime, ids: Sequence[str]) -> dict[str, Sequence[Any]]:
    """The item views of the ``ranker_features`` service for the candidates ``ids`` (the
    user's views are :func:`read_user`'s).

    The item views come from one batched online read through the near cache, stream views
    as their packed twins (``features.packed``: one stored vector per candidate instead of
    one value per feature, unpacked into float arrays with NaN for no row); the catalog
    views from the catalog snapshot when ``serving_catalog_features`` is on.
    """
    catalog = rt.settings.serving_catalog_features
    without = (*CATALOG_VIEWS, *PACKED) if catalog else tuple(PACKED)
    refs = rt.store.service_features(RANKER_SERVICE, without=without, join_key="item_id")
    packed = [f"{p.name}:{p.feature}" for p in PACKED.values()]
    features = rt.store.read_cached([*refs, *packed], "item_id", ids)
    if catalog:
        features.update(rt.catalog.catalog.item_features(ids))
    return features


def blend(ranker: np.ndarray, online: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - weight) * ranker + weight * online``."""
    return (1.0 - weight) * ranker + weight * online


@dataclass
class Scored:
    """Scores of a batch and how they were obtained."""

    scores: np.ndarray
    versions: dict[str, str | None] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


def _score_with(model: LoadedModel | None, batch: RankingBatch, rt: ServingRuntime,
                stage: str) -> np.ndarray | None:
    if model is None:
        return None
    try:
        scores = np.asarray(model.model.score(batch), dtype=np.float64)
    except Exception:  # a model failing must cost quality, not the answer
        log.exception("%s %s failed to score", model.kind, model.version)
        rt.metrics.errors.labels(stage=stage).inc()
        return None
    if scores.shape != (len(batch),) or not np.isfinite(scores).all():
        log.error("%s %s returned unusable scores (shape %s)", model.kind, model.version,
                  scores.shape)
        rt.metrics.errors.labels(stage=stage).inc()
        return None
    return scores


def score(
    rt: ServingRuntime, batch: RankingBatch, priors: np.ndarray, watch: Stopwatch
) -> Scored:
    """Ranker and online model blended; one of them alone, or ``priors``, when missing."""
    models = rt.models.snapshot()
    ranker = _score_with(models["ranker"], batch, rt, "ranker")
    watch.lap("ranker")
    online = _score_with(models["online"], batch, rt, "online")
    watch.lap("online")
    versions = {
        kind: model.version if got is not None and model is not None else None
        for kind, model, got in (("ranker", models["ranker"], ranker),
                                 ("online", models["online"], online))
    }
    fallbacks = [name for name, got in (("ranker", ranker), ("online_model", online))
                 if got is None]
    if ranker is not None and online is not None:
        scores = blend(ranker, online, rt.settings.serving_online_weight)
    else:
        scores = next((s for s in (ranker, online) if s is not None), priors)
    return Scored(scores, versions, fallbacks)


def diversify(
    order: Sequence[int], categories: Sequence[str | None], *, k: int, share: float
) -> list[int]:
    """The first ``k`` of ``order`` with at most ``ceil(k * share)`` per category.

    Items without a category are not capped. When the cap leaves fewer than ``k``, the
    best of the capped items fill the rest: a short answer helps nobody.
    """
    cap = max(1, math.ceil(k * share))
    taken: list[int] = []
    held: list[int] = []
    per_category: dict[str, int] = {}
    for i in order:
        category = categories[i]
        if category is not None:
            if per_category.get(category, 0) >= cap:
                held.append(i)
                continue
            per_category[category] = per_category.get(category, 0) + 1
        taken.append(i)
        if len(taken) == k:
            return taken
    if len(taken) < k:
        keep = set(taken) | set(held[: k - len(taken)])
        taken = [i for i in order if i in keep]
    return taken


def recommend(
    rt: ServingRuntime,
    request: RecommendationRequest,
    watch: Stopwatch | None = None,
    *,
    shed: bool = False,
) -> RecommendationResponse:
    """Answer one request (blocking; the router runs it off the event loop).

    ``shed`` (or a wait for a thread beyond ``serving_queue_timeout_ms``) answers from the
    in-process fallback only: no store read, no model.
    """
    watch = watch or Stopwatch()
    watch.lap("queue")
    metrics = rt.metrics
    now_s = time.time()
    fallbacks: list[str] = []
    user_id = request.user_id
    overloaded = shed or watch.stages["queue"] * 1000 > rt.settings.serving_queue_timeout_ms
    store_up = not overloaded
    user = UserState()
    if overloaded:
        fallbacks.append("overload")
    else:
        try:
            user = read_user(rt, user_id)
        except StoreUnavailable:
            store_up = False
            fallbacks.append("feature_store")
            metrics.errors.labels(stage="user").inc()
    watch.lap("user")

    exclude = rt.purchases.of(user_id)
    if request.exclude_seen and user.recent:
        exclude = exclude | frozenset(user.recent)
    candidates = generate(rt, request, user, exclude)
    if not overloaded:  # the histogram describes the full pipeline's candidates
        for source, count in source_counts(candidates).items():
            metrics.candidates.labels(source=source).observe(count)
    watch.lap("candidates")

    ids = [c.item_id for c in candidates]
    priors = np.array([c.prior for c in candidates], dtype=np.float64)
    catalog = rt.catalog.catalog
    categories: list[str | None]
    scored: Scored
    features = None
    if store_up and ids:
        try:
            features = read_features(rt, ids)
        except StoreUnavailable:
            store_up = False
            fallbacks.append("feature_store")
            metrics.errors.labels(stage="features").inc()
        watch.lap("features")
    if features is not None:
        context = request.context
        batch = RankingBatch.for_request(
            user_id, ids, features, ts_s=now_s,
            device=context.device.value if context is not None and context.device else None,
            country=context.country if context is not None else None,
            user=user.features,
        )
        scored = score(rt, batch, priors, watch)
        categories = [c if c is not None else catalog.category(i) for i, c in
                      zip(ids, features["item_profile__category"], strict=True)]
    else:
        scored = Scored(priors, {"ranker": None, "online": None}, [])
        categories = [catalog.category(i) for i in ids]
    fallbacks.extend(scored.fallbacks)
    if not candidates:
        fallbacks.append("candidates")

    order = np.argsort(-scored.scores, kind="stable").tolist()
    chosen = diversify(order, categories, k=request.k,
                       share=rt.settings.serving_category_share)
    items = [
        RecommendedItem(item_id=ids[i], score=round(float(scored.scores[i]), 6),
                        reason=candidates[i].reason, source=candidates[i].source,
                        category=categories[i])
        for i in chosen
    ]
    request_id = uuid.uuid4().hex
    feature_age = None if user.last_event_ts is None else max(0.0, now_s - user.last_event_ts)
    if feature_age is not None:
        metrics.feature_age.observe(feature_age)
    for reason in fallbacks:
        metrics.fallbacks.labels(reason=reason).inc()
    if items:
        rt.impressions.log(Shown(user_id, tuple(item.item_id for item in items), request_id,
                                 request.context, datetime.fromtimestamp(now_s, UTC)))
    watch.lap("respond")
    total = watch.total()
    watch.stages["total"] = total
    observe = metrics.stage_seconds.labels
    for stage, seconds in watch.stages.items():
        if stage in STAGES:
            observe(stage=stage).observe(seconds)
    return RecommendationResponse(
        request_id=request_id,
        user_id=user_id,
        items=items,
        model_versions=ModelVersions(**scored.versions),
        feature_age_s=None if feature_age is None else round(feature_age, 3),
        degraded=bool(fallbacks),
        fallbacks=fallbacks,
    )


def features_of_user(rt: ServingRuntime, user_id: str) -> tuple[dict[str, Any], float | None]:
    """Every feature of the user views (debug endpoint); raises ``StoreUnavailable``."""
    try:
        store = rt.store.reader().store
        refs = [f"{view}:{f.name}" for view in ("user_realtime", "user_stats")
                for f in store.get_feature_view(view, allow_registry_cache=True).features]
    except Exception as exc:  # no registry yet, or the store's config is broken
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
    row = rt.store.read(refs, {"user_id": [user_id]}, full_feature_names=True)
    values: Mapping[str, Any] = {k: v[0] for k, v in row.items() if "__" in k}
    last = values.get("user_realtime__last_event_ts")
    age = None if last is None else max(0.0, time.time() - float(last))
    return dict(values), age
