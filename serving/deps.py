"""Request dependencies: what a route may ask of the running app.

``create_app`` puts the settings and metrics on ``app.state`` and the lifespan adds the
publisher, the recommendation runtime and the batcher that runs the pipeline; routes
declare ``settings: SettingsDep``, ``publisher: PublisherDep``, ``runtime: RuntimeDep``,
``recommender: RecommenderDep`` or ``metrics: MetricsDep`` instead of reaching into
globals, so each app instance (and each test) stays independent.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.batching import Batcher
from serving.metrics import ServingMetrics
from serving.publisher import Publisher
from serving.recommend import Stopwatch
from serving.runtime import ServingRuntime
from serving.schemas import RecommendationRequest, RecommendationResponse
from streamrec.settings import Settings

Recommender = Batcher[tuple[RecommendationRequest, Stopwatch], RecommendationResponse]
"""``serving.recommend.recommend_many`` on the requests that queued together."""


async def app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def app_publisher(request: Request) -> Publisher:
    """The app's Kafka publisher (created by the lifespan, connected on first use)."""
    publisher: Publisher = request.app.state.publisher
    return publisher


SettingsDep = Annotated[Settings, Depends(app_settings)]
PublisherDep = Annotated[Publisher, Depends(app_publisher)]


async def app_runtime(request: Request) -> ServingRuntime:
    """The recommendation runtime (catalog, feed, models, store access; set by the lifespan)."""
    runtime: ServingRuntime = request.app.state.runtime
    return runtime


async def app_metrics(request: Request) -> ServingMetrics:
    """The app's Prometheus metrics."""
    metrics: ServingMetrics = request.app.state.metrics
    return metrics


async def app_recommender(request: Request) -> Recommender:
    """The batcher that runs recommendations off the event loop (set by the lifespan)."""
    recommender: Recommender = request.app.state.recommender
    return recommender


RuntimeDep = Annotated[ServingRuntime, Depends(app_runtime)]
MetricsDep = Annotated[ServingMetrics, Depends(app_metrics)]
RecommenderDep = Annotated[Recommender, Depends(app_recommender)]
