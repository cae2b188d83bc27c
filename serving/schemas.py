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

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from streamrec.contract import Context, Id

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


# --- recommendations ----------------------------------------------------------------------

RECOMMENDATION_REQUEST_EXAMPLE: dict[str, Any] = {
    "user_id": "u000042",
    "context": {"device": "mobile", "country": "DE", "page": "home"},
    "k": 10,
    "exclude_seen": True,
}


class RecommendationRequest(BaseModel):
    """Body of ``POST /v1/recommendations``."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id = Field(description="Who asks; an unknown user gets context-aware trending "
                        "and new items.")
    context: Context | None = Field(
        None, description="Where the slate is shown (event-contract context: `device`, "
        "`country`, `page`, …); trending is computed per device and country."
    )
    k: int = Field(10, ge=1, le=100, description="How many items to return.")
    exclude_seen: bool = Field(
        True, description="Leave out the user's recent items (`user_realtime.recent_items`)."
    )
    candidates: list[Id] | None = Field(
        None, min_length=1, max_length=1000,
        description="Rank these items instead of generating candidates (only the first "
        "`STREAMREC_SERVING_MAX_CANDIDATES` are scored).",
    )


class RecommendedItem(BaseModel):
    """One recommended item, best first."""

    item_id: str
    score: float = Field(description="Blended model probability (or the fallback's "
                         "popularity score when `degraded`).")
    reason: str = Field(description="Why it is here, for people: \"similar to … you "
                        "viewed\", \"trending on mobile in DE\", \"new in Shoes\".")
    source: str = Field(description="Candidate source: `similar`, `co_visited`, "
                        "`trending_context`, `trending`, `fresh` or `requested`.")
    category: str | None = None


class ModelVersions(BaseModel):
    """Registry versions that scored this answer (`null`: not available)."""

    ranker: str | None = None
    online: str | None = None


class RecommendationResponse(BaseModel):
    """Top-k items for a user, with everything needed to audit the answer."""

    request_id: str = Field(description="Also on the logged impression; clicks that follow "
                            "should carry it.")
    user_id: str
    items: list[RecommendedItem]
    model_versions: ModelVersions
    feature_age_s: float | None = Field(
        description="Seconds since the user's newest event seen by the feature store "
        "(`null` for a user without real-time features)."
    )
    degraded: bool = Field(description="True when a fallback replaced part of the pipeline.")
    fallbacks: list[str] = Field(
        default_factory=list,
        description="What was replaced: `feature_store`, `ranker`, `online_model`, "
        "`candidates`.",
    )


class SimilarItem(BaseModel):
    item_id: str
    score: float = Field(description="Cosine similarity (embeddings) or relative "
                         "co-occurrence weight (co-visitation).")
    title: str | None = None
    category: str | None = None


class SimilarItems(BaseModel):
    """Neighbours of one item in embedding space and by co-visitation."""

    item_id: str
    found: bool = Field(description="False for an item no index or neighbour list knows.")
    items: list[SimilarItem] = Field(description="Nearest in graph space (text space for "
                                     "an item without a graph vector).")
    co_visited: list[SimilarItem] = Field(description="Most often in the same sessions.")


class UserFeatures(BaseModel):
    """Debug view of what serving knows about a user."""

    user_id: str
    found: bool = Field(description="False when the store has no row for the user.")
    feature_age_s: float | None
    features: dict[str, Any] = Field(description="`<view>__<feature>` of the user views.")
    recent_purchases: list[str] = Field(description="From the API's in-process cache.")


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    """Whether this replica can serve full-quality answers, and what is missing."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, Check]
