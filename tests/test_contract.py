"""The event contract v1: what is accepted, what is refused, and how errors read."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from streamrec.contract import (
    Device,
    EventType,
    ValidationError,
    describe_error,
    error_details,
    parse_event,
    parse_item,
)

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a", "event_type": "click",
        "user_id": "u1", "item_id": "i1", "ts": "2026-06-01T11:59:00Z",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def errors(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as exc:
        parse_event(json.dumps(data), now=NOW)
    return {".".join(map(str, e["loc"])): e["msg"] for e in error_details(exc.value)}


def test_a_full_event_round_trips_through_its_wire_form() -> None:
    e = parse_event(json.dumps(event(
        session_id="s1", request_id="r1", position=3,
        context={"device": "tablet", "country": "fr", "page": "/p/1", "query": "shoes",
                 "ab_bucket": 7, "flags": {"x": True}},
    )), now=NOW)
    assert e.event_type is EventType.CLICK
    assert e.context is not None and e.context.device is Device.TABLET
    assert e.context.country == "FR"
    assert e.context.model_extra == {"ab_bucket": "7", "flags": '{"x":true}'}
    assert parse_event(e.to_json(), now=NOW) == e
    assert b"null" not in e.to_json()


def test_timestamps_are_normalised_to_utc() -> None:
    e = parse_event(event(ts="2026-06-01T13:30:00+02:00"), now=NOW)
    assert e.ts == datetime(2026, 6, 1, 11, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("override", "field", "fragment"),
    [
        ({"event_id": "123"}, "event_id", "must be a UUID"),
        ({"event_id": 5}, "event_id", "must be a UUID"),
        ({"event_type": "buy"}, "event_type", "'view', 'click'"),
        ({"user_id": ""}, "user_id", "at least 1 character"),
        ({"user_id": "u" * 129}, "user_id", "at most 128 characters"),
        ({"ts": "2026-06-01T11:59:00"}, "ts", "must carry a zone offset"),
        ({"ts": 1780000000}, "ts", "timestamp string"),
        ({"ts": "yesterday"}, "ts", "RFC 3339"),
        ({"ts": "2026-06-01T12:06:00Z"}, "ts", "in the future"),
        ({"context": {"device": "fridge"}}, "context.device", "'mobile'"),
        ({"context": {"country": "XX"}}, "context.country", "ISO 3166-1"),
        ({"position": -1}, "position", "greater than or equal to 0"),
        ({"schema_version": 2}, "schema_version", "unsupported schema version"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_invalid_fields_are_named_with_a_readable_reason(
    override: dict[str, Any], field: str, fragment: str
) -> None:
    found = errors(event(**override))
    assert field in found, found
    assert fragment in found[field]


def test_missing_required_fields_are_all_reported_at_once() -> None:
    assert set(errors({})) == {"event_id", "event_type", "user_id", "ts"}


def test_item_presence_depends_on_the_event_type() -> None:
    assert "item_id is required" in errors(event(item_id=None))[""]
    assert "only allowed on impressions" in errors(event(items=["a"]))[""]
    assert "needs item_id or a non-empty items list" in \
        errors(event(event_type="impression", item_id=None, items=[]))[""]
    shown = parse_event(event(event_type="impression", item_id=None, items=["a", "b"]), now=NOW)
    assert shown.shown_items == ["a", "b"]


def test_the_future_skew_limit_is_configurable_and_can_be_switched_off() -> None:
    later = event(ts=(NOW + timedelta(minutes=20)).isoformat())
    with pytest.raises(ValidationError):
        parse_event(later, now=NOW)
    assert parse_event(later, now=NOW, max_future_skew=timedelta(hours=1))
    assert parse_event(later, now=NOW, max_future_skew=None)


def test_event_ids_are_canonicalised_to_lowercase() -> None:
    upper = str(uuid.uuid4()).upper()
    assert parse_event(event(event_id=upper), now=NOW).event_id == upper.lower()


def test_describe_error_gives_one_line_per_record() -> None:
    with pytest.raises(ValidationError) as exc:
        parse_event(b"{broken", now=NOW)
    assert describe_error(exc.value).startswith("record: Invalid JSON")
    assert describe_error(KeyError("x")) == "KeyError: 'x'"


def test_catalog_records_validate_too() -> None:
    item = parse_item({"item_id": "i1", "title": "Trail shoe", "category": "Shoes",
                       "price": 89.5, "created_at": "2026-01-01T00:00:00Z",
                       "attributes": {"size": 42, "brand": "Aero"}}, now=NOW)
    assert item.attributes == {"size": "42", "brand": "Aero"}
    assert parse_item(item.to_json(), now=NOW) == item
    for bad, field in [({"price": -1}, "price"), ({"price": float("nan")}, "price"),
                       ({"title": ""}, "title"), ({"created_at": "2026-01-01"}, "created_at")]:
        data = {"item_id": "i1", "title": "t", "category": "c",
                "created_at": "2026-01-01T00:00:00Z", **bad}
        with pytest.raises(ValidationError) as exc:
            parse_item(data, now=NOW)
        assert field in {e["loc"][0] for e in error_details(exc.value)}
