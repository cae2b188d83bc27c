"""``GET /v1/users/{user_id}/features``: what serving knows about a user (debugging)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Path
from starlette.concurrency import run_in_threadpool

from serving.deps import RuntimeDep
from serving.recommend import features_of_user
from serving.runtime import ServingRuntime, StoreUnavailable
from serving.schemas import Message, UserFeatures

router = APIRouter(prefix="/v1", tags=["users"])


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def user_features(runtime: ServingRuntime, user_id: str) -> UserFeatures:
    values, age = features_of_user(runtime, user_id)
    return UserFeatures(
        user_id=user_id,
        found=any(v is not None for v in values.values()),
        feature_age_s=None if age is None else round(age, 3),
        features={name: _plain(v) for name, v in values.items()},
        recent_purchases=sorted(runtime.purchases.of(user_id)),
    )


@router.get(
    "/users/{user_id}/features",
    summary="A user's online features (debug)",
    description="The user's `user_realtime` and `user_stats` rows as the ranker reads them "
    "(`<view>__<feature>`), their age, and the purchases the API's own event feed saw. "
    "An unknown user answers 200 with `found: false`; 503 only when the online store "
    "cannot be read.",
    response_model=UserFeatures,
    responses={
        200: {"content": {"application/json": {"example": {
            "user_id": "u000042", "found": True, "feature_age_s": 2.4,
            "features": {"user_realtime__views_5m": 3,
                         "user_realtime__recent_items": ["i000734", "i000912"],
                         "user_realtime__last_category": "Shoes/Running",
                         "user_stats__category_affinity": "{\"Shoes/Running\": 0.6}"},
            "recent_purchases": ["i000233"],
        }}}},
        401: {"model": Message}, 403: {"model": Message},
        503: {"model": Message, "description": "The online store is unavailable."},
    },
)
async def get_user_features(
    user_id: Annotated[str, Path(min_length=1, max_length=128, examples=["u000042"])],
    runtime: RuntimeDep,
) -> UserFeatures:
    try:
        return await run_in_threadpool(user_features, runtime, user_id)
    except StoreUnavailable as exc:
        raise HTTPException(503, f"online store unavailable: {exc}") from exc
