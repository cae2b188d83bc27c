"""The event contract v1: what is accepted, what is refused, and how errors read."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.contract import (
    Device,
    Event,
    EventType,
    ValidationError,
    describe_error,
    error_details,
    parse_canonical_event,
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


# --- the canonical fast path ----------------------------------------------------------------

_MISSING = object()
_UUID_LOWER = "0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a"
_IDS = ["", "x" * 129, 5, None, _MISSING]
# Per field: the values producers usually send, then unusual, non-canonical and invalid ones.
_FIELD_VARIANTS: dict[str, tuple[list[Any], list[Any]]] = {
    "event_id": ([_UUID_LOWER], [_UUID_LOWER.upper(), "0B7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a",
                                 "123", 5, _UUID_LOWER + "\n", "{" + _UUID_LOWER + "}", None,
                                 _MISSING]),
    "event_type": ([t.value for t in EventType], ["VIEW", "buy", 1, None, _MISSING]),
    "user_id": (["u1", "x" * 128, "ü-1"], _IDS),
    "item_id": (["i1", _MISSING], _IDS),
    "items": ([_MISSING, ["a", "b"]], [None, [], ["a"] * 1000, ["a"] * 1001, "a", [1],
                                        ["", "b"]]),
    "ts": (["2026-06-01T11:59:00Z", "2026-06-01T11:59:00.123Z", "2026-06-01T11:59:00.123456Z"],
           ["2026-06-01T11:59:00.1Z", "2026-06-01T11:59:00.1234567Z",
            "2026-06-01T11:59:00+00:00", "2026-06-01T13:59:00+02:00", "2026-06-01T06:59:00-05:00",
            "2026-06-01 11:59:00Z", "2026-06-01T11:59:00z", "2026-06-01T11:59:00",
            "2026-06-01T12:04:59Z", "2026-06-01T12:06:00Z", "2026-02-30T00:00:00Z",
            "2026-06-01T24:00:00Z", 1780000000, "yesterday", None, _MISSING]),
    "session_id": (["s1", _MISSING], _IDS),
    "request_id": (["r1", _MISSING], _IDS),
    "context": ([_MISSING, {"device": "mobile"}, {"device": "tablet", "country": "FR", "ab": "b"}],
                [None, {}, {"device": "MOBILE"}, {"device": "fridge"}, {"device": None},
                 {"country": "de"}, {"country": "XX"}, {"country": 49}, {"page": "p" * 2048},
                 {"page": "p" * 2049}, {"query": "q" * 1025}, {"referrer": None}, {"ab": 3},
                 {"flags": {"x": True}}, "mobile"]),
    "position": ([_MISSING, 3], [None, 0, 10_000, 10_001, -1, 3.0, "3", True]),
    "schema_version": ([_MISSING, 1], [2, 1.0, "1", True, None]),
    "colour": ([_MISSING], ["red"]),
}


@st.composite
def _wire_events(draw: st.DrawFn) -> bytes:
    doc = {}
    for name, (usual, unusual) in _FIELD_VARIANTS.items():
        # Mostly usual values, so that both verdicts are common and every field is probed.
        doc[name] = draw(st.sampled_from(unusual if draw(st.integers(0, 7)) == 0 else usual))
    raw = json.dumps({k: v for k, v in doc.items() if v is not _MISSING})
    if draw(st.integers(0, 7)) == 0:  # a repeated key: the last one wins
        raw = raw[:-1] + ', "user_id": "dup"}'
    return raw.encode()


def _assert_fast_path_agrees(raw: bytes, skew: timedelta | None) -> bool:
    """The fast path accepts only what parse_event accepts, to the same Event; its verdict."""
    fast = parse_canonical_event(raw, now=NOW, max_future_skew=skew)
    context = {"now": NOW, "max_future_skew": skew}
    try:  # the full validator, as parse_event ran it before the fast path existed
        slow: Event | None = Event.model_validate_json(raw, context=context)
    except ValidationError:
        slow = None
    if slow is not None:
        # Every valid event's wire form takes the fast path, to the same value.
        assert parse_canonical_event(slow.to_json(), now=NOW, max_future_skew=skew) == slow
    if fast is None:
        return False
    assert slow is not None, raw
    # The same values, of the same types, with the same fields set, the same wire form.
    assert fast == slow and repr(fast) == repr(slow)
    assert fast.model_fields_set == slow.model_fields_set
    for name in Event.model_fields:
        assert type(getattr(fast, name)) is type(getattr(slow, name)), name
    assert fast.ts.tzinfo is slow.ts.tzinfo is UTC
    if fast.context is not None:
        assert slow.context is not None
        assert fast.context.model_fields_set == slow.context.model_fields_set
        assert fast.context.model_extra == slow.context.model_extra
    assert fast.to_json() == slow.to_json()
    # ... and what validating the decoded dict gives (the workers' former decode path).
    assert Event.model_validate(orjson.loads(raw), context=context) == fast
    return True


_BASES = [
    {"event_id": _UUID_LOWER, "event_type": "click", "user_id": "u1", "item_id": "i1",
     "ts": "2026-06-01T11:59:00Z"},
    {"event_id": _UUID_LOWER, "event_type": "impression", "user_id": "u1", "items": ["a", "b"],
     "ts": "2026-06-01T11:59:00.123456Z", "context": {"device": "mobile"}},
]


@pytest.mark.parametrize("skew", [timedelta(minutes=5), None])
@pytest.mark.parametrize("base", _BASES, ids=["click", "impression"])
def test_the_canonical_fast_path_agrees_on_every_single_field_deviation(
    base: dict[str, Any], skew: timedelta | None
) -> None:
    accepted = 0
    for name, (usual, unusual) in _FIELD_VARIANTS.items():
        for value in [*usual, *unusual]:
            doc = {**base, name: value}
            raw = json.dumps({k: v for k, v in doc.items() if v is not _MISSING}).encode()
            accepted += _assert_fast_path_agrees(raw, skew)
    assert accepted > 20  # the fast path is taken, not just always declined


@settings(max_examples=2000, deadline=None)
@given(raw=_wire_events(), skew=st.sampled_from([timedelta(minutes=5), None]))
def test_the_canonical_fast_path_agrees_on_random_combinations(
    raw: bytes, skew: timedelta | None
) -> None:
    _assert_fast_path_agrees(raw, skew)


def test_parse_event_takes_the_fast_path_for_canonical_wire_json() -> None:
    canonical = parse_event(json.dumps(event()), now=NOW).to_json()
    assert parse_canonical_event(canonical, now=NOW) == parse_event(canonical, now=NOW)
    # Valid but not canonical: left to the full validator, which accepts it.
    offset = json.dumps(event(ts="2026-06-01T13:59:00+02:00"))
    assert parse_canonical_event(offset, now=NOW) is None
    assert parse_event(offset, now=NOW).ts == datetime(2026, 6, 1, 11, 59, tzinfo=UTC)
