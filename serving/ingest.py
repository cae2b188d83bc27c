"""Batch ingestion: validate each record on its own, publish the valid ones, report per record.

Three plain steps that the HTTP layer only wires together:

1. :func:`validate_records` checks every record against the event contract separately, so
   one bad record never costs the others their place.
2. :class:`~serving.publisher.Publisher` sends the valid ones keyed by ``user_id`` and waits
   for Kafka's acknowledgements.
3. :func:`build_report` pairs both into one result per record, and :func:`status_code`
   picks the HTTP status: 200 if anything was accepted, 503 if Kafka lost any valid
   record (the client must retry), 422 if every record broke the contract.

Examples
--------
>>> from datetime import UTC, datetime, timedelta
>>> now = datetime(2026, 1, 2, tzinfo=UTC)
>>> good = {"event_id": "0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a", "event_type": "view",
...         "user_id": "u1", "item_id": "i1", "ts": "2026-01-01T23:59:00Z"}
>>> checked = validate_records([good, {**good, "event_type": "like"}],
...                            max_future_skew=timedelta(minutes=5), now=now)
>>> report = build_report(checked, [Delivered("events", 2, 41)])
>>> [r.status for r in report.results], status_code(report)
(['accepted', 'rejected'], 200)
>>> report.results[1].errors[0].loc
['event_type']
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from serving.publisher import Outcome, Publisher, explain
from serving.schemas import (
    AcceptedResult,
    FailedResult,
    FieldError,
    IngestReport,
    RecordResult,
    RejectedResult,
)
from streaming.producer import Delivered
from streamrec.contract import Event, ValidationError, error_details, parse_event

__all__ = ["build_report", "ingest", "status_code", "validate_records"]

_NOT_AN_OBJECT = FieldError(loc=[], msg="Input should be a JSON object (one event)",
                            type="model_type")


def validate_records(
    records: Sequence[Any], *, max_future_skew: timedelta | None, now: datetime
) -> list[Event | RejectedResult]:
    """Each record parsed as an :class:`~streamrec.contract.Event` or rejected with its errors.

    ``now`` is fixed per batch so every record meets the same clock-skew bound.
    """
    checked: list[Event | RejectedResult] = []
    for index, record in enumerate(records):
        # parse_event would read a string as JSON text; in a JSON body only objects qualify.
        if not isinstance(record, dict):
            checked.append(RejectedResult(index=index, errors=[_NOT_AN_OBJECT]))
            continue
        try:
            checked.append(parse_event(record, max_future_skew=max_future_skew, now=now))
        except ValidationError as exc:
            errors = [FieldError(**e) for e in error_details(exc)]
            checked.append(RejectedResult(index=index, errors=errors))
    return checked


def build_report(
    checked: Sequence[Event | RejectedResult], outcomes: Sequence[Outcome]
) -> IngestReport:
    """Merge validation results with Kafka outcomes (one per valid event, in order)."""
    if len(outcomes) != sum(isinstance(c, Event) for c in checked):
        raise ValueError("need exactly one outcome per valid event")
    pending = iter(outcomes)
    results: list[RecordResult] = []
    first_failure: Exception | None = None
    for index, item in enumerate(checked):
        if isinstance(item, RejectedResult):
            results.append(item)
            continue
        outcome = next(pending)
        if isinstance(outcome, Delivered):
            results.append(AcceptedResult(index=index, event_id=item.event_id,
                                          partition=outcome.partition, offset=outcome.offset))
        else:
            first_failure = first_failure or outcome
            results.append(FailedResult(index=index, event_id=item.event_id,
                                        error=explain(outcome)))
    counts = {"accepted": 0, "rejected": 0, "failed": 0}
    for r in results:
        counts[r.status] += 1
    return IngestReport(**counts, results=results, detail=_detail(counts, first_failure))


def _detail(counts: dict[str, int], failure: Exception | None) -> str | None:
    if failure is not None:
        if counts["accepted"] == 0:
            head = f"Kafka is unavailable, nothing was stored: {explain(failure)}."
        else:
            head = f"Kafka did not acknowledge {counts['failed']} record(s): {explain(failure)}."
        return (f"{head} Retry the failed records after Retry-After seconds; re-sending "
                "accepted ones is harmless because event_id is the idempotency key.")
    if counts["accepted"] == 0:
        return "Every record breaks the event contract; see the errors of each result."
    return None


def status_code(report: IngestReport) -> int:
    """503 if Kafka lost any valid record, else 200 if any was accepted, else 422."""
    if report.failed:
        return 503
    return 200 if report.accepted else 422


def ingest(
    records: Sequence[Any],
    *,
    publisher: Publisher,
    topic: str,
    max_future_skew: timedelta | None,
    now: datetime | None = None,
) -> IngestReport:
    """Validate, publish and report one batch. Blocking: run it in a worker thread."""
    checked = validate_records(records, max_future_skew=max_future_skew,
                               now=now or datetime.now(UTC))
    events = [e for e in checked if isinstance(e, Event)]
    outcomes = (
        publisher.publish(topic, [(e.user_id.encode(), e.to_json()) for e in events])
        if events else []
    )
    return build_report(checked, outcomes)
