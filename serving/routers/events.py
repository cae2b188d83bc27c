"""``POST /v1/events``: batch ingestion into the ``events`` topic."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from serving.deps import PublisherDep, SettingsDep
from serving.ingest import ingest, status_code
from serving.schemas import EVENT_EXAMPLE, EventBatch, IngestReport, MalformedBody, Message

router = APIRouter(prefix="/v1", tags=["events"])

_EVENT = EVENT_EXAMPLE
_BAD_EVENT = {**_EVENT, "event_id": "not-a-uuid", "event_type": "like"}
_ACCEPTED = {"index": 0, "status": "accepted", "event_id": _EVENT["event_id"],
             "partition": 3, "offset": 1041}
_REJECTED = {
    "index": 1,
    "status": "rejected",
    "errors": [
        {"loc": ["event_id"], "msg": "Value error, must be a UUID, e.g. "
         "0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a", "type": "value_error"},
        {"loc": ["event_type"], "msg": "Input should be 'view', 'click', 'add_to_cart', "
         "'purchase' or 'impression'", "type": "enum"},
    ],
}
_RETRY = ("Retry the failed records after Retry-After seconds; re-sending accepted ones is "
          "harmless because event_id is the idempotency key.")

DESCRIPTION = """
Validates **each record separately** against the event contract (schema v1, see the
`Event` schema), so one bad record never rejects the others, then writes the valid ones
to Kafka keyed by `user_id` and answers with one result per record, in request order.

A record is reported `accepted` only **after Kafka acknowledged it** (`acks=all`), with
the partition and offset it was stored at.

| status | when | what to do |
|---|---|---|
| 200 | at least one record accepted, others may be `rejected` | fix the rejected ones |
| 422 | every record `rejected`, or the body itself is malformed | fix the records |
| 413 | body over `STREAMREC_API_MAX_BODY_BYTES` (default 4 MiB) | send smaller batches |
| 503 | Kafka unreachable or lost some records (`failed`); has `Retry-After` | retry |

**Retries are safe.** `event_id` is the idempotency key of the whole pipeline: a record
that reaches the log twice counts once downstream. On a 503, resend the `failed` records
(or simply the whole batch) after `Retry-After` seconds.

At most `STREAMREC_API_MAX_BATCH` (default 1000) records per request.
"""


@router.post(
    "/events",
    summary="Ingest a batch of user events",
    description=DESCRIPTION,
    response_model=IngestReport,
    responses={
        200: {
            "description": "At least one record was stored; per-record results.",
            "content": {"application/json": {"example": {
                "accepted": 1, "rejected": 1, "failed": 0, "results": [_ACCEPTED, _REJECTED],
            }}},
        },
        413: {"model": Message, "description": "Body too large; nothing was read."},
        422: {
            "model": IngestReport | MalformedBody,
            "description": "Every record broke the contract (per-record results), or the "
            "body is malformed (FastAPI's standard `detail` list).",
            "content": {"application/json": {"examples": {
                "all_rejected": {"summary": "every record rejected", "value": {
                    "accepted": 0, "rejected": 1, "failed": 0,
                    "results": [{**_REJECTED, "index": 0}],
                    "detail": "Every record breaks the event contract; see the errors of "
                    "each result.",
                }},
                "too_many": {"summary": "batch over the limit", "value": {"detail": [{
                    "type": "too_long", "loc": ["body", "events"],
                    "msg": "at most 1000 events per request, got 1500; split the batch",
                }]}},
            }}},
        },
        503: {
            "model": IngestReport,
            "description": "Kafka is unreachable or lost records; see `Retry-After`.",
            "headers": {"Retry-After": {
                "description": "Seconds to wait before retrying.", "schema": {"type": "integer"},
            }},
            "content": {"application/json": {"example": {
                "accepted": 0, "rejected": 0, "failed": 1,
                "results": [{"index": 0, "status": "failed", "event_id": _EVENT["event_id"],
                             "error": "KafkaUnavailable: cannot reach Kafka at kafka:9092: "
                             "KafkaTimeoutError: Bootstrap failed"}],
                "detail": "Kafka is unavailable (…); nothing was stored. " + _RETRY,
            }}},
        },
    },
)
async def post_events(
    batch: Annotated[EventBatch, Body(openapi_examples={
        "one": {"summary": "a single click", "value": {"events": [_EVENT]}},
        "mixed": {"summary": "one valid, one invalid record",
                  "value": {"events": [_EVENT, _BAD_EVENT]}},
    })],
    settings: SettingsDep,
    publisher: PublisherDep,
) -> JSONResponse:
    if len(batch.events) > settings.api_max_batch:
        raise RequestValidationError([_too_long(len(batch.events), settings.api_max_batch)])
    report = await run_in_threadpool(
        ingest,
        batch.events,
        publisher=publisher,
        topic=settings.topic_events,
        max_future_skew=timedelta(seconds=settings.max_future_skew_s),
    )
    code = status_code(report)
    headers = {"Retry-After": str(settings.api_retry_after_s)} if code == 503 else None
    return JSONResponse(report.model_dump(mode="json", exclude_none=True), code, headers)


def _too_long(got: int, limit: int) -> dict[str, Any]:
    return {
        "type": "too_long",
        "loc": ("body", "events"),
        "msg": f"at most {limit} events per request, got {got}; split the batch",
        "ctx": {"max_length": limit},
    }
