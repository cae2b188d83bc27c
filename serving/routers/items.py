"""``GET /v1/items/{item_id}/similar``: an item's neighbours."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from serving.deps import RuntimeDep
from serving.runtime import ServingRuntime
from serving.schemas import Message, SimilarItem, SimilarItems

router = APIRouter(prefix="/v1", tags=["items"])


def similar_items(runtime: ServingRuntime, item_id: str, k: int) -> SimilarItems:
    """Nearest items in embedding space and the item's co-visitation neighbours."""
    catalog = runtime.catalog.catalog

    def describe(item: str, score: float) -> SimilarItem:
        return SimilarItem(item_id=item, score=round(score, 6), title=catalog.title(item),
                           category=catalog.category(item))

    nearest = [describe(item, sim) for item, sim in catalog.similar(item_id, k)]
    co_visited: list[SimilarItem] = []
    found = runtime.neighbors.read([item_id])
    if found is not None:
        items, weights = found[0][0] or [], found[1][0]
        values = [1.0] * len(items) if weights is None else [float(w) for w in weights]
        top = max(values, default=0.0) or 1.0
        co_visited = [describe(item, w / top)
                      for item, w in zip(items[:k], values[:k], strict=False)]
    known = bool(nearest or co_visited or item_id in catalog.number)
    return SimilarItems(item_id=item_id, found=known, items=nearest, co_visited=co_visited)


@router.get(
    "/items/{item_id}/similar",
    summary="Items similar to an item",
    description="Nearest neighbours in the graph embedding space (text space for an item "
    "without a graph vector, such as a brand-new one) and the item's co-visitation "
    "neighbours (`item_neighbors`). An unknown item is a normal case: `found` is false "
    "and both lists are empty.",
    response_model=SimilarItems,
    responses={
        200: {"content": {"application/json": {"example": {
            "item_id": "i000734", "found": True,
            "items": [{"item_id": "i000912", "score": 0.93, "title": "Lightweight trail "
                       "running shoe Pacer X", "category": "Shoes/Running"}],
            "co_visited": [{"item_id": "i000233", "score": 1.0, "title": "Breathable "
                            "running jacket Kinetic 2", "category": "Sportswear"}],
        }}}},
        401: {"model": Message}, 403: {"model": Message},
    },
)
async def get_similar(
    item_id: Annotated[str, Path(min_length=1, max_length=128, examples=["i000734"])],
    runtime: RuntimeDep,
    k: Annotated[int, Query(ge=1, le=100, description="How many of each.")] = 10,
) -> SimilarItems:
    return await run_in_threadpool(similar_items, runtime, item_id, k)
