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

from serving.limits import BodySizeLimit
from serving.publisher import ProducerFactory, Publisher, api_producer
from serving.routers import events, health
from streamrec.contract import Event
from streamrec.settings import Settings, get_settings

DESCRIPTION = """
Ingestion (and, later, recommendations) for **streamrec**, a streaming recommender.

* `POST /v1/events` writes user events into Kafka, validated one by one against the
  event contract v1 (the `Event` schema below), with a result per record.
* `GET /healthz` tells whether the process is alive.

Configuration comes from `STREAMREC_*` environment variables. The API starts and stays up
while Kafka is down: writes then answer 503 with `Retry-After`, and the API reconnects on
the next request once Kafka is back.
"""

TAGS = [
    {"name": "events", "description": "Ingest user actions into the event log."},
    {"name": "health", "description": "Probes for orchestrators."},
]


def create_app(
    settings: Settings | None = None, *, producer_factory: ProducerFactory = api_producer
) -> FastAPI:
    """Build the API for ``settings`` (default: read from the environment).

    Parameters
    ----------
    settings
        Kafka address, topic names and API limits.
    producer_factory
        Builds the ``KafkaProducer`` from the settings; called lazily, on the first request
        that writes and again after a Kafka failure, never at start-up.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings, producer_factory)
        app.state.publisher = publisher
        try:
            yield
        finally:
            await run_in_threadpool(publisher.close)

    app = FastAPI(
        title="streamrec API",
        version=version("streamrec"),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    app.include_router(health.router)
    app.include_router(events.router)
    app.openapi = _openapi_with_contract(app)  # type: ignore[method-assign]
    return app


def _openapi_with_contract(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema plus the event contract, which no route parses as a whole body."""
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
        return app.openapi_schema  # type: ignore[return-value]

    return openapi
