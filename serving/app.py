"""The HTTP API: an app factory wiring settings, the Kafka publisher and the routers.

Run it with uvicorn's factory mode (settings come from ``STREAMREC_*`` variables)::

    uvicorn --factory serving.app:create_app --host 127.0.0.1 --port 8000

Examples
--------
The app starts and answers its liveness probe even when no broker is reachable:

>>> from starlette.testclient import TestClient
>>> from streaming.broker import free_port
>>> app = create_app(Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}"))
>>> with TestClient(app) as client:
...     client.get("/healthz").json()
{'status': 'ok'}
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from serving.auth import ApiKeyAuth, ApiKeys, scope_for, security_schemes
from serving.batching import Batcher
from serving.dashboard import install_dashboard
from serving.deps import Recommender
from serving.limits import BodySizeLimit
from serving.metrics import RequestCounter, ServingMetrics
from serving.publisher import ProducerFactory, Publisher, api_producer
from serving.recommend import recommend_many
from serving.routers import events, health, items, recommendations, users
from serving.runtime import ServingRuntime
from streamrec.contract import Event
from streamrec.settings import Settings, get_settings

DESCRIPTION = """
Recommendations and ingestion for **streamrec**, a streaming recommender.

* `POST /v1/recommendations` ranks candidates for a user with fresh features from Feast,
  a PyTorch ranker and a River online model, and logs what it showed.
* `GET /v1/items/{item_id}/similar`, `GET /v1/users/{user_id}/features` look inside.
* `POST /v1/events` writes user events into Kafka, validated one by one against the
  event contract v1 (the `Event` schema below), with a result per record.
* `GET /healthz` (alive), `GET /readyz` (dependencies), `GET /metrics` (Prometheus).

Configuration comes from `STREAMREC_*` environment variables. The API starts and stays up
while Kafka, the online store or the models are missing: recommendations then degrade to
trending and new items (`degraded: true`), writes answer 503 with `Retry-After`, and
everything reconnects by itself.

**Access.** When `STREAMREC_API_KEYS` is set (`key1:ingest+read,key2:read`), every endpoint
but `/healthz`, `/readyz`, `/metrics` and the documentation needs a key in `X-API-Key` (or
`Authorization: Bearer`): scope `ingest` for `/v1/events`, `read` for the rest. A missing
or unknown key answers 401, a key without the scope 403.
"""

TAGS = [
    {"name": "recommendations", "description": "Top-k items for a user."},
    {"name": "items", "description": "What the catalog indexes know about an item."},
    {"name": "users", "description": "What the feature store knows about a user."},
    {"name": "events", "description": "Ingest user actions into the event log."},
    {"name": "health", "description": "Probes and metrics for orchestrators."},
]


def create_app(
    settings: Settings | None = None, *, producer_factory: ProducerFactory = api_producer
) -> FastAPI:
    """Build the API for ``settings`` (default: read from the environment).

    Parameters
    ----------
    settings
        Kafka address, topic names, API limits and keys, the ``serving_*`` settings.
    producer_factory
        Builds the ``KafkaProducer`` from the settings; called lazily, on the first request
        that writes and again after a Kafka failure, never at start-up.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings, producer_factory)
        app.state.publisher = publisher
        runtime = ServingRuntime(settings, app.state.metrics)
        runtime.start()
        app.state.runtime = runtime
        recommender: Recommender = Batcher(
            lambda queued: recommend_many(runtime, *zip(*queued, strict=True)),
            threads=settings.serving_threads, max_batch=settings.serving_max_batch,
            name="streamrec-recommend")
        recommender.start()
        app.state.recommender = recommender
        try:
            yield
        finally:
            recommender.close()
            await run_in_threadpool(runtime.close)
            await run_in_threadpool(publisher.close)

    app = FastAPI(
        title="streamrec API",
        version=version("streamrec"),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics = ServingMetrics()
    keys = ApiKeys.parse(settings.api_keys.get_secret_value())
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)
    # Added last, so it runs first: an unauthenticated body is never read.
    app.add_middleware(ApiKeyAuth, keys=keys)
    app.include_router(health.router)
    app.include_router(recommendations.router)
    app.include_router(items.router)
    app.include_router(users.router)
    app.include_router(events.router)
    install_dashboard(app)
    app.openapi = _openapi_with_contract(app, secured=bool(keys))  # type: ignore[method-assign]
    return app


def _openapi_with_contract(app: FastAPI, *, secured: bool) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema plus the event contract, which no route parses as a whole body,
    and, when keys are configured, the key schemes on every operation that needs one."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _, contract = models_json_schema(
                [(Event, "validation")], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                contract["$defs"]
            )
            if secured:
                _add_security(schema)
        return app.openapi_schema  # type: ignore[return-value]

    return openapi


def _add_security(schema: dict[str, Any]) -> None:
    """Declare the key schemes, and on each operation the scope it needs (in words: OpenAPI
    scopes belong to OAuth2 only)."""
    schema["components"]["securitySchemes"] = security_schemes()
    for path, operations in schema.get("paths", {}).items():
        needed = scope_for(path)
        if needed is None:
            continue
        for operation in operations.values():
            operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
            operation["description"] = (
                f"{operation.get('description', '')}\n\n**Requires an API key with the "
                f"`{needed}` scope.**"
            ).strip()
