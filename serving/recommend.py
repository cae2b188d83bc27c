"""One recommendation, as a pipeline of plain steps the HTTP layer only calls.

1. :func:`read_users` — the user views of the ``ranker_features`` service, recent items and
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

Requests that queued together go through the stages together (:func:`recommend_many`):
the fixed costs of a store read and of a model call are then paid once per batch, exactly
when the cores are short.

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

import itertools
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
           "read_users", "recommend", "recommend_many", "score"]

log = logging.getLogger(__name__)

class Stopwatch:
    """Durations of consecutive stages: :meth:`lap` closes the stage that just ran.

    ``clock`` is wall time by default; ``time.thread_time`` makes the stages CPU time of
    the calling thread (``bench/serve_cpu.py``). ``batch`` is how many requests shared the
    stages (:func:`recommend_many`).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start = self._last = clock()
        self.stages: dict[str, float] = {}
        self.batch = 1

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


def read_users(rt: ServingRuntime, user_ids: Sequence[str]) -> list[UserState]:
    """Each user's features in the ranker's service, in one read; raises
    ``StoreUnavailable``."""
    refs = rt.store.service_features(RANKER_SERVICE, join_key="user_id")
    rows = rt.store.read(refs, {"user_id": list(user_ids)}, full_feature_names=True)
    columns = [(name, values) for name, values in rows.items() if "__" in name]
    return [UserState({name: values[i] for name, values in columns})
            for i in range(len(user_ids))]


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
    user's views are :func:`read_users`').

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


def score(rt: ServingRuntime, pending: Sequence[_Pending], now_s: float) -> list[Scored]:
    """Ranker and online model blended for each request with features; one of them alone,
    or the candidates' priors, when missing."""
    models = rt.models.snapshot()
    batches: dict[int, RankingBatch] = {}
    for i, p in enumerate(pending):
        if p.features is not None:
            context = p.request.context
            batches[i] = RankingBatch.for_request(
                p.request.user_id, p.ids, p.features, ts_s=now_s,
                device=context.device.value if context is not None and context.device
                else None,
                country=context.country if context is not None else None,
                user=p.user.features,
            )
    found: dict[str, dict[int, np.ndarray | None]] = {}
    for kind in ("ranker", "online"):  # each model's stage is named after it
        found[kind] = {i: _score_with(models[kind], b, rt, kind) for i, b in batches.items()}
        _lap([pending[i] for i in batches], kind)
    out = []
    weight = rt.settings.serving_online_weight
    for i, p in enumerate(pending):
        priors = np.array([c.prior for c in p.candidates], dtype=np.float64)
        if i not in batches:
            out.append(Scored(priors, {"ranker": None, "online": None}, []))
            continue
        ranker, online = found["ranker"][i], found["online"][i]
        versions = {
            kind: model.version if got is not None and model is not None else None
            for kind, model, got in (("ranker", models["ranker"], ranker),
                                     ("online", models["online"], online))
        }
        fallbacks = [name for name, got in (("ranker", ranker), ("online_model", online))
                     if got is None]
        if ranker is not None and online is not None:
            scores = blend(ranker, online, weight)
        else:
            scores = next((s for s in (ranker, online) if s is not None), priors)
        out.append(Scored(scores, versions, fallbacks))
    return out


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


@dataclass
class _Pending:
    """One request on its way through :func:`recommend_many`."""

    request: RecommendationRequest
    watch: Stopwatch
    fallbacks: list[str]
    user: UserState = field(default_factory=UserState)
    candidates: list[Candidate] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    """The candidates' item ids."""
    features: dict[str, Sequence[Any]] | None = None

    @property
    def store_up(self) -> bool:
        return not self.fallbacks  # overload or a failed read: no (further) store reads


def _lap(pending: Sequence[_Pending], stage: str) -> None:
    for p in pending:
        p.watch.lap(stage)


def recommend(
    rt: ServingRuntime,
    request: RecommendationRequest,
    watch: Stopwatch | None = None,
    *,
    shed: bool = False,
) -> RecommendationResponse:
    """Answer one request: :func:`recommend_many` of one."""
    return recommend_many(rt, [request], [watch or Stopwatch()], shed=shed)[0]


def recommend_many(
    rt: ServingRuntime,
    requests: Sequence[RecommendationRequest],
    watches: Sequence[Stopwatch],
    *,
    shed: bool = False,
) -> list[RecommendationResponse]:
    """Answer requests that arrived together, each as if alone (blocking; the router's
    :class:`serving.batching.Batcher` runs it off the event loop).

    The stages run for all of them at once: one store read for their users, one near-cache
    read for the union of their candidates, and each model called on every request in
    turn. Each request's stopwatch gets every stage's full duration, which is what it
    waited; ``Stopwatch.batch`` says how many shared it.

    ``shed`` (or a wait for a thread beyond ``serving_queue_timeout_ms``) answers from the
    in-process fallback only: no store read, no model.
    """
    timeout_s = rt.settings.serving_queue_timeout_ms / 1000
    now_s = time.time()
    if not shed:
        rt.metrics.batch_size.observe(len(requests))
    pending = []
    for request, watch in zip(requests, watches, strict=True):
        watch.lap("queue")
        watch.batch = len(requests)
        overloaded = shed or watch.stages["queue"] > timeout_s
        pending.append(_Pending(request, watch, ["overload"] if overloaded else []))
    _users(rt, [p for p in pending if p.store_up])
    _lap(pending, "user")
    for p in pending:
        _candidates(rt, p)
    _lap(pending, "candidates")
    featured = [p for p in pending if p.store_up and p.candidates]
    if featured:
        _features(rt, featured)
        _lap(featured, "features")
    scored = score(rt, pending, now_s)
    answers = [_answer(rt, p, s, now_s) for p, s in zip(pending, scored, strict=True)]
    _lap(pending, "respond")
    observe = rt.metrics.stage_seconds.labels
    for p in pending:
        stages = p.watch.stages
        stages["total"] = p.watch.total()
        for stage, seconds in stages.items():
            if stage in STAGES:
                observe(stage=stage).observe(seconds)
    return answers


def _users(rt: ServingRuntime, pending: Sequence[_Pending]) -> None:
    if not pending:
        return
    try:
        users = read_users(rt, [p.request.user_id for p in pending])
    except StoreUnavailable:
        rt.metrics.errors.labels(stage="user").inc(len(pending))
        for p in pending:
            p.fallbacks.append("feature_store")
        return
    for p, user in zip(pending, users, strict=True):
        p.user = user


def _candidates(rt: ServingRuntime, p: _Pending) -> None:
    user = p.user
    exclude = rt.purchases.of(p.request.user_id)
    if p.request.exclude_seen and user.recent:
        exclude = exclude | frozenset(user.recent)
    p.candidates = generate(rt, p.request, user, exclude)
    p.ids = [c.item_id for c in p.candidates]
    if "overload" not in p.fallbacks:  # the histogram describes the full pipeline's
        for source, count in source_counts(p.candidates).items():
            rt.metrics.candidates.labels(source=source).observe(count)


def _features(rt: ServingRuntime, pending: Sequence[_Pending]) -> None:
    """:func:`read_features` once for the union of the requests' candidates."""
    lists = [p.ids for p in pending]
    union = lists[0] if len(lists) == 1 else list(dict.fromkeys(itertools.chain(*lists)))
    try:
        columns = read_features(rt, union)
    except StoreUnavailable:
        rt.metrics.errors.labels(stage="features").inc(len(pending))
        for p in pending:
            p.fallbacks.append("feature_store")
        return
    if len(lists) == 1:
        pending[0].features = columns
        return
    where = {item: i for i, item in enumerate(union)}
    for p, ids in zip(pending, lists, strict=True):
        rows = [where[item] for item in ids]
        p.features = {name: _rows(values, rows) for name, values in columns.items()}


def _rows(values: Sequence[Any], rows: list[int]) -> Sequence[Any]:
    if isinstance(values, np.ndarray):
        return values[rows]
    return [values[i] for i in rows]


def _answer(rt: ServingRuntime, p: _Pending, scored: Scored, now_s: float
            ) -> RecommendationResponse:
    request, user, candidates, ids = p.request, p.user, p.candidates, p.ids
    catalog = rt.catalog.catalog
    categories: list[str | None]
    if p.features is not None:
        categories = [c if c is not None else catalog.category(i) for i, c in
                      zip(ids, p.features["item_profile__category"], strict=True)]
    else:
        categories = [catalog.category(i) for i in ids]
    fallbacks = p.fallbacks + scored.fallbacks
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
    metrics = rt.metrics
    feature_age = None if user.last_event_ts is None else max(0.0, now_s - user.last_event_ts)
    if feature_age is not None:
        metrics.feature_age.observe(feature_age)
    for reason in fallbacks:
        metrics.fallbacks.labels(reason=reason).inc()
    if items:
        rt.impressions.log(Shown(request.user_id, tuple(item.item_id for item in items),
                                 request_id, request.context,
                                 datetime.fromtimestamp(now_s, UTC)))
    return RecommendationResponse(
        request_id=request_id,
        user_id=request.user_id,
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
