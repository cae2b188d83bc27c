"""Probes and metrics: liveness, readiness with the failing dependency, Prometheus."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from serving.deps import MetricsDep, RuntimeDep
from serving.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Liveness",
    description="200 while the process serves HTTP. Checks no dependency: a Kafka outage "
    "must not get a healthy API process restarted.",
    response_model=Health,
)
async def healthz() -> Health:
    return Health()


_READY = {"status": "ready", "checks": {
    "feature_store": {"ok": True, "detail": "sqlite online store answers"},
    "catalog": {"ok": True, "detail": "20416 items, 20398 with graph vectors, 20416 with "
                "text vectors"},
    "ranker_model": {"ok": True, "detail": "serving v0003-20261124T101500Z"},
    "online_model": {"ok": True, "detail": "serving v0041-20261124T113000Z"},
}}
_NOT_READY = {"status": "not_ready", "checks": {
    **_READY["checks"],  # type: ignore[dict-item]
    "feature_store": {"ok": False, "detail": "ConnectionError: Error 111 connecting to "
                      "redis:6379. Connection refused."},
    "ranker_model": {"ok": False, "detail": "no ranker champion in the registry yet"},
}}


@router.get(
    "/readyz",
    summary="Readiness",
    description="200 when this replica can give full-quality answers: the online store "
    "answers a read, the catalog indexes had their first load and both models (ranker, "
    "online) are loaded. Otherwise 503, with each "
    "dependency's state in `checks`. A replica that is not ready still answers "
    "recommendations, degraded.",
    response_model=Readiness,
    responses={
        200: {"content": {"application/json": {"example": _READY}}},
        503: {"model": Readiness, "description": "A dependency is missing.",
              "content": {"application/json": {"example": _NOT_READY}}},
    },
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks = await run_in_threadpool(runtime.readiness)
    ready = all(check["ok"] for check in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)  # type: ignore[arg-type]
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Latency histograms per recommendation stage (`streamrec_api_stage_seconds`)"
    ", feature age, fallbacks, caught dependency errors, requests by status, impressions "
    "sent/dropped/failed, model reloads and the served versions, in Prometheus' text format.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example":
        "streamrec_api_stage_seconds_bucket{le=\"0.01\",stage=\"features\"} 1832.0\n"}}}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
