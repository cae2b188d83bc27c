"""The API's Prometheus metrics, in a registry of its own per app instance.

A registry per app keeps two apps in one process (tests, the benchmark) from sharing or
double-registering series; ``GET /metrics`` renders it.

==================================================  ==========================================
``streamrec_api_stage_seconds{stage}``              recommendation latency per stage:
                                                    ``queue`` (waiting for a thread),
                                                    ``user``, ``candidates``, ``features``,
                                                    ``ranker``, ``online``, ``total``
``streamrec_api_feature_age_seconds``               request time - the user's newest event
``streamrec_api_fallbacks_total{reason}``           degraded answers, by cause
``streamrec_api_errors_total{stage}``               dependency errors caught (no 5xx)
``streamrec_api_requests_total{endpoint,status}``   answers by endpoint and status class
``streamrec_api_candidates{source}``                candidates per request, by source
``streamrec_api_batch_size``                        requests answered together (queued while
                                                    a thread was busy)
``streamrec_api_item_features_total{source}``       candidates' item features served from the
                                                    ``cache`` or read from the ``store``
``streamrec_api_impressions_total{outcome}``        impressions ``sent``, ``dropped`` (full
                                                    queue) or ``failed`` (Kafka refused)
``streamrec_api_model_reloads_total{kind,outcome}`` champion swaps: ``loaded``, ``refused``
                                                    (tampered), ``failed``
``streamrec_api_model_info{kind,version}``          1 for the version being served
``streamrec_api_catalog_items{space}``              items in the nearest-neighbour indexes
==================================================  ==========================================

Examples
--------
>>> metrics = ServingMetrics()
>>> metrics.fallbacks.labels(reason="no_ranker").inc()
>>> b"streamrec_api_fallbacks_total" in metrics.render()
True
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["STAGES", "RequestCounter", "ServingMetrics"]

STAGES = ("queue", "user", "candidates", "features", "ranker", "online", "total")
"""Timed stages of a recommendation, in pipeline order (``total`` spans all)."""

# Milliseconds matter here: the budget is 20 ms at p99.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25,
    0.5, 1.0,
)
_AGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86_400)
_COUNT_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 200, 500)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class ServingMetrics:
    """Every series the API exports, registered in :attr:`registry`."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram(
            "streamrec_api_stage_seconds",
            "Recommendation latency per pipeline stage.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.feature_age = Histogram(
            "streamrec_api_feature_age_seconds",
            "Request time minus the user's newest event (user_realtime.last_event_ts).",
            buckets=_AGE_BUCKETS,
            registry=registry,
        )
        self.fallbacks = Counter(
            "streamrec_api_fallbacks",
            "Recommendations answered with a fallback (degraded), by cause.",
            ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "streamrec_api_errors",
            "Dependency errors caught while answering (the request still succeeded).",
            ["stage"],
            registry=registry,
        )
        self.requests = Counter(
            "streamrec_api_requests",
            "Answers by endpoint and status class.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.candidates = Histogram(
            "streamrec_api_candidates",
            "Candidates per recommendation, by source (after de-duplication).",
            ["source"],
            buckets=_COUNT_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "streamrec_api_batch_size",
            "Recommendations computed together: those that queued while a thread was busy.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.item_features = Counter(
            "streamrec_api_item_features",
            "Candidates' item features, from the near cache (cache) or the online store (store).",
            ["source"],
            registry=registry,
        )
        self.impressions = Counter(
            "streamrec_api_impressions",
            "Impressions logged to Kafka: sent, dropped (queue full) or failed.",
            ["outcome"],
            registry=registry,
        )
        self.model_reloads = Counter(
            "streamrec_api_model_reloads",
            "Champion model swaps: loaded, refused (tampered) or failed.",
            ["kind", "outcome"],
            registry=registry,
        )
        self.model_info = Gauge(
            "streamrec_api_model_info",
            "1 for the model version being served.",
            ["kind", "version"],
            registry=registry,
        )
        self.catalog_items = Gauge(
            "streamrec_api_catalog_items",
            "Items in the nearest-neighbour indexes, per embedding space.",
            ["space"],
            registry=registry,
        )
        self.trending_events = Counter(
            "streamrec_api_trending_events",
            "Events the API's trending feed has read from Kafka.",
            registry=registry,
        )
        for stage in STAGES:  # export every series from the start, even at zero
            self.stage_seconds.labels(stage=stage)
        for outcome in ("sent", "dropped", "failed"):
            self.impressions.labels(outcome=outcome)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting answers by route template and status class (``2xx``…).

    The route is known only after routing, which Starlette records in the request scope;
    unmatched paths count as ``unmatched`` so arbitrary URLs cannot grow the label set.
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.requests = metrics.requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.requests.labels(endpoint=endpoint, status=f"{status // 100}xx").inc()
