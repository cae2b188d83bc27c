"""``POST /v1/recommendations``: top-k items for a user, in milliseconds."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Response

from serving.deps import RecommenderDep, RuntimeDep
from serving.recommend import Stopwatch, recommend
from serving.schemas import (
    RECOMMENDATION_REQUEST_EXAMPLE,
    MalformedBody,
    Message,
    RecommendationRequest,
    RecommendationResponse,
)

router = APIRouter(prefix="/v1", tags=["recommendations"])

DESCRIPTION = """
Recommends `k` items for `user_id` in the request's `context`:

1. **candidates** (up to `STREAMREC_SERVING_MAX_CANDIDATES`, 200): nearest neighbours of
   the user's recent items in the graph embedding space (text space for items without a
   graph vector), co-visitation neighbours, trending in the request's device and country
   and overall, and new catalog items of the categories the user browses — or the
   `candidates` you pass;
2. **features**: one batched read of the `ranker_features` service from Feast's online
   store for the user and every candidate;
3. **scores**: the PyTorch ranker blended with the River online model
   (`STREAMREC_SERVING_ONLINE_WEIGHT`), minus purchased items and, with `exclude_seen`,
   the user's recent items; at most `ceil(k * STREAMREC_SERVING_CATEGORY_SHARE)` items per
   category.

Every item carries a short `reason`. The slate is logged to the `impressions` topic with
the response's `request_id` (asynchronously; logging never delays or fails the answer).

**Unknown users are normal**: they get context-aware trending and new items. **Nothing
here answers 5xx because a dependency is down**: without the online store the answer is
trending and new items by popularity, without a model the other model or popularity;
`degraded` is then true and `fallbacks` says what was replaced.

The `Server-Timing` header gives each stage's duration in milliseconds (`queue`, `user`,
`candidates`, `features`, `ranker`, `online`, `total`). Under overload — a request waited
longer than `STREAMREC_SERVING_QUEUE_TIMEOUT_MS` for its turn — the answer is trending and
new items at once, with `fallbacks: ["overload"]`.
"""

_ITEM = {"item_id": "i000734", "score": 0.4127, "reason": "similar to Cushioned trail "
         "running shoe Stride Pro you viewed", "source": "similar",
         "category": "Shoes/Running"}
_RESPONSE = {
    "request_id": "5f0c3c8e2a4b4e7f9d1a2b3c4d5e6f70",
    "user_id": "u000042",
    "items": [
        _ITEM,
        {"item_id": "i001208", "score": 0.3311, "reason": "trending on mobile in DE",
         "source": "trending_context", "category": "Electronics/Phones"},
        {"item_id": "i020011", "score": 0.2874, "reason": "new in Shoes/Running",
         "source": "fresh", "category": "Shoes/Running"},
    ],
    "model_versions": {"ranker": "v0003-20261124T101500Z", "online": "v0041-20261124T113000Z"},
    "feature_age_s": 0.84,
    "degraded": False,
    "fallbacks": [],
}
_DEGRADED = {
    **_RESPONSE,
    "items": [{**_RESPONSE["items"][1], "score": 1.0}],  # type: ignore[index]
    "model_versions": {"ranker": None, "online": None},
    "feature_age_s": None,
    "degraded": True,
    "fallbacks": ["feature_store"],
}


@router.post(
    "/recommendations",
    summary="Recommend items to a user",
    description=DESCRIPTION,
    response_model=RecommendationResponse,
    responses={
        200: {
            "description": "The top-k items, best first.",
            "headers": {"Server-Timing": {
                "description": "Stage durations, e.g. `user;dur=0.4, candidates;dur=1.1, "
                "features;dur=6.2, ranker;dur=2.0, online;dur=1.3, total;dur=11.5`.",
                "schema": {"type": "string"},
            }},
            "content": {"application/json": {"examples": {
                "full": {"summary": "every part available", "value": _RESPONSE},
                "degraded": {"summary": "online store down: trending fallback",
                             "value": _DEGRADED},
            }}},
        },
        401: {"model": Message, "description": "API keys are configured and none (or an "
              "unknown one) was sent."},
        403: {"model": Message, "description": "The key lacks the `read` scope."},
        413: {"model": Message, "description": "Body too large."},
        422: {
            "model": MalformedBody,
            "description": "The body breaks the schema; `detail` names each field.",
            "content": {"application/json": {"example": {"detail": [{
                "type": "less_than_equal", "loc": ["body", "k"],
                "msg": "Input should be less than or equal to 100", "input": 500,
                "ctx": {"le": 100},
            }]}}},
        },
    },
)
async def post_recommendations(
    request: Annotated[RecommendationRequest, Body(openapi_examples={
        "home": {"summary": "home page on a phone", "value": RECOMMENDATION_REQUEST_EXAMPLE},
        "rerank": {"summary": "rank your own candidates", "value": {
            "user_id": "u000042", "k": 2, "candidates": ["i000734", "i001208", "i000017"],
        }},
        "cold": {"summary": "a user never seen before", "value": {
            "user_id": "visitor-8c1f", "context": {"device": "desktop", "country": "FR"},
        }},
    })],
    runtime: RuntimeDep,
    recommender: RecommenderDep,
) -> Response:
    watch = Stopwatch()
    admission = runtime.admission
    if admission.admit():
        admission.started()
        runtime.foreground.enter()
        service_s = None
        try:
            answer = await recommender.submit((request, watch))
            if "overload" not in answer.fallbacks:
                # A batch's stages served all its requests: each costs its share.
                service_s = (watch.stages["total"] - watch.stages["queue"]) / watch.batch
        finally:
            runtime.foreground.leave()
            admission.finished(service_s)
    else:  # it would wait past the budget: the fallback answer, right here (sub-ms)
        answer = recommend(runtime, request, watch, shed=True)
    # Serialised once by pydantic-core; returning the model would validate it again.
    return Response(answer.model_dump_json(), media_type="application/json",
                    headers={"Server-Timing": watch.server_timing()})
