"""Request and response bodies of the HTTP API, as documented in its OpenAPI schema.

The event records themselves are not modelled here: each one is validated on its own by
:func:`streamrec.contract.parse_event`, so a batch body only promises a list of objects.

Examples
--------
>>> r = RejectedResult(index=1, errors=[FieldError(loc=["ts"], msg="Field required",
...                                                 type="missing")])
>>> report = IngestReport(accepted=0, rejected=1, results=[r])
>>> report.model_dump(exclude_none=True)["results"][0]["errors"]
[{'loc': ['ts'], 'msg': 'Field required', 'type': 'missing'}]
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema

EVENT_EXAMPLE: dict[str, Any] = {
    "event_id": "0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a",
    "event_type": "click",
    "user_id": "u42",
    "item_id": "i9001",
    "ts": "2026-01-02T03:04:05Z",
    "session_id": "s-7f3a",
    "context": {"device": "mobile", "country": "DE", "page": "home"},
}
"""A valid v1 event, used by the API documentation's examples."""


class EventBatch(BaseModel):
    """Body of ``POST /v1/events``."""

    events: Annotated[
        list[Any],
        # Records are validated one by one after the body is parsed, so the schema points
        # at the contract for documentation while the parser only asks for a list.
        WithJsonSchema({"type": "array", "items": {"$ref": "#/components/schemas/Event"}}),
    ] = Field(
        min_length=1,
        description="Events in the v1 contract (see the `Event` schema); at most "
        "`STREAMREC_API_MAX_BATCH` (default 1000) per request.",
        examples=[[EVENT_EXAMPLE]],
    )


class FieldError(BaseModel):
    """One problem with one field of a record, as pydantic reports it."""

    loc: list[str | int] = Field(description="Path to the field inside the record.")
    msg: str = Field(description="What is wrong, readable.")
    type: str = Field(description="Machine-readable error type, e.g. `missing`, `enum`.")


class AcceptedResult(BaseModel):
    """A record Kafka acknowledged (acks=all): it is durably in the event log."""

    index: int = Field(description="Position of the record in the request's `events`.")
    status: Literal["accepted"] = "accepted"
    event_id: str
    partition: int
    offset: int


class RejectedResult(BaseModel):
    """A record that breaks the contract; sending it again unchanged fails the same way."""

    index: int
    status: Literal["rejected"] = "rejected"
    errors: list[FieldError]


class FailedResult(BaseModel):
    """A valid record Kafka did not acknowledge; send it again."""

    index: int
    status: Literal["failed"] = "failed"
    event_id: str
    error: str = Field(description="Why the delivery failed.")


RecordResult = Annotated[
    AcceptedResult | RejectedResult | FailedResult, Field(discriminator="status")
]


class IngestReport(BaseModel):
    """Outcome of a batch, one result per record in request order."""

    accepted: int = Field(description="Records acknowledged by Kafka.")
    rejected: int = Field(description="Records that break the event contract.")
    failed: int = Field(0, description="Valid records Kafka did not acknowledge.")
    results: list[RecordResult]
    detail: str | None = Field(None, description="Why the request was not fully accepted.")


class Message(BaseModel):
    """A plain error or status message."""

    detail: str


class MalformedBody(BaseModel):
    """FastAPI's standard validation error: the body itself is unusable (not JSON, no
    ``events`` list, too many records), so no record was looked at."""

    detail: list[dict[str, Any]] = Field(
        description="One entry per problem: `loc` (e.g. `[\"body\", \"events\"]`), `msg`, `type`."
    )


class Health(BaseModel):
    """Liveness of the process."""

    status: Literal["ok"] = "ok"
