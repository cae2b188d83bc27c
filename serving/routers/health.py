"""Liveness probe."""

from __future__ import annotations

from fastapi import APIRouter

from serving.schemas import Health

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
