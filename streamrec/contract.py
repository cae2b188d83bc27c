"""The event contract, schema version 1: what producers send and what every worker reads.

One :class:`Event` per user action (view, click, add_to_cart, purchase, impression) and one
:class:`Item` per catalog record. Validation is strict where a wrong value would silently
corrupt features (types, enums, lengths, zone-aware timestamps, clock skew) and lenient
where producers legitimately differ (unknown context keys are kept, as strings).

Examples
--------
>>> raw = b'''{"event_id": "0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a", "event_type": "click",
...          "user_id": "u1", "item_id": "i9", "ts": "2026-01-02T03:04:05Z",
...          "context": {"device": "mobile", "country": "de", "ab": 3}}'''
>>> e = parse_event(raw)
>>> e.event_type.value, e.context.country, e.context.model_extra["ab"]
('click', 'DE', '3')
>>> parse_event(e.to_json()) == e
True
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import SchemaValidator
from pydantic_core import core_schema as cs

SCHEMA_VERSION = 1
DEFAULT_MAX_FUTURE_SKEW = timedelta(minutes=5)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")

__all__ = [
    "SCHEMA_VERSION",
    "Context",
    "Device",
    "Event",
    "EventType",
    "Item",
    "ValidationError",
    "describe_error",
    "error_details",
    "parse_canonical_event",
    "parse_event",
    "parse_item",
]

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=False)]


class EventType(StrEnum):
    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    IMPRESSION = "impression"


class Device(StrEnum):
    MOBILE = "mobile"
    DESKTOP = "desktop"
    TABLET = "tablet"
    OTHER = "other"


# ISO 3166-1 alpha-2, officially assigned codes.
ISO_COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO
    BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK
    DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR
    GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM
    KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP
    MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL
    PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST
    SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG
    VI VN VU WF WS YE YT ZA ZM ZW""".split()
)


def _parse_rfc3339(value: Any, info: ValidationInfo) -> datetime:
    """An RFC 3339 string with an explicit zone, normalised to UTC.

    Epoch numbers and naive strings are refused: their zone would be a guess, and a guess
    shifts every windowed feature by hours.
    """
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an RFC 3339 timestamp, e.g. 2026-01-02T03:04:05Z") from None
    else:
        raise ValueError("must be an RFC 3339 timestamp string with a zone")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("must carry a zone offset (e.g. 'Z' or '+01:00')")
    dt = dt.astimezone(UTC)
    ctx = info.context or {}
    skew = ctx.get("max_future_skew", DEFAULT_MAX_FUTURE_SKEW)
    if skew is not None:
        now = ctx.get("now") or datetime.now(UTC)
        if dt > now + skew:
            raise ValueError(
                f"is {(dt - now).total_seconds():.0f}s in the future; "
                f"at most {skew.total_seconds():.0f}s of clock skew is accepted"
            )
    return dt


def _stringify(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class Context(BaseModel):
    """Where and how the action happened. Unknown keys are kept, as strings."""

    model_config = ConfigDict(extra="allow", frozen=True)

    device: Device | None = None
    country: str | None = Field(None, description="ISO 3166-1 alpha-2, case-insensitive.")
    page: Annotated[str, StringConstraints(max_length=2048)] | None = None
    referrer: Annotated[str, StringConstraints(max_length=2048)] | None = None
    query: Annotated[str, StringConstraints(max_length=1024)] | None = None

    @field_validator("country")
    @classmethod
    def _country(cls, v: str | None) -> str | None:
        if v is None:
            return v
        code = v.upper()
        if code not in ISO_COUNTRIES:
            raise ValueError("must be an ISO 3166-1 alpha-2 country code, e.g. 'DE'")
        return code

    @model_validator(mode="after")
    def _extras_as_strings(self) -> Self:
        extra = self.__pydantic_extra__
        if extra:
            for key, value in extra.items():
                if not isinstance(value, str):
                    extra[key] = _stringify(value)
        return self


class Event(BaseModel):
    """One user action (schema version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(description="UUID; the idempotency key of the whole pipeline.")
    event_type: EventType
    user_id: Id
    item_id: Id | None = None
    items: list[Id] | None = Field(
        None, max_length=1000, description="Impressions only: the items shown, in order."
    )
    ts: datetime = Field(description="Event time, RFC 3339 with zone.")
    session_id: Id | None = None
    context: Context | None = None
    request_id: Id | None = Field(None, description="Set when following a recommendation.")
    position: int | None = Field(None, ge=0, le=10_000)
    schema_version: int = SCHEMA_VERSION

    @field_validator("event_id", mode="before")
    @classmethod
    def _uuid(cls, v: Any) -> str:
        # A regex instead of uuid.UUID(): a third of the cost of validating an event.
        if not isinstance(v, str) or not _UUID.match(v):
            raise ValueError("must be a UUID, e.g. 0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a")
        return v.lower()

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: Any, info: ValidationInfo) -> datetime:
        return _parse_rfc3339(v, info)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {v}; this reader speaks {SCHEMA_VERSION}")
        return v

    @model_validator(mode="after")
    def _item_presence(self) -> Self:
        if self.event_type is EventType.IMPRESSION:
            if self.item_id is None and not self.items:
                raise ValueError("an impression needs item_id or a non-empty items list")
        else:
            if self.item_id is None:
                raise ValueError(f"item_id is required for a {self.event_type.value} event")
            if self.items is not None:
                raise ValueError("items is only allowed on impressions")
        return self

    def to_json(self) -> bytes:
        """Canonical wire form: UTF-8 JSON without null fields."""
        return self.model_dump_json(exclude_none=True).encode()

    @property
    def shown_items(self) -> list[str]:
        """The items an impression showed (or the one the action is about)."""
        if self.items:
            return list(self.items)
        return [self.item_id] if self.item_id is not None else []


class Item(BaseModel):
    """One catalog record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: Id
    title: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    category: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    price: float | None = Field(None, ge=0)
    created_at: datetime
    attributes: dict[str, str] = Field(default_factory=dict)

    @field_validator("price")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("created_at", mode="before")
    @classmethod
    def _created(cls, v: Any, info: ValidationInfo) -> datetime:
        return _parse_rfc3339(v, info)

    @field_validator("attributes", mode="before")
    @classmethod
    def _attrs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): _stringify(val) for k, val in v.items()}
        return v

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def _context(max_future_skew: timedelta | None, now: datetime | None) -> dict[str, Any]:
    return {"max_future_skew": max_future_skew, "now": now}


# --- the canonical fast path ------------------------------------------------------------
# Event's validators run in Python and cost two thirds of validating an event. The wire
# form producers actually send (Event.to_json: lower-case UUID, UTC "Z" timestamps,
# upper-case countries, string extras) can be checked entirely by pydantic-core instead,
# building the very same Event. Anything else is left to the full validator, so accepting
# is the only thing this path ever decides (tests/test_contract.py holds it to that).


def _optional(schema: cs.CoreSchema) -> cs.ModelField:
    return cs.model_field(cs.with_default_schema(cs.nullable_schema(schema), default=None))


def _text(max_length: int, min_length: int = 0) -> cs.CoreSchema:
    return cs.str_schema(min_length=min_length, max_length=max_length, strict=True)


def _canonical_event_validator() -> SchemaValidator:
    ident = _text(128, min_length=1)
    context_fields = {
        "device": _optional(cs.enum_schema(Device, list(Device), sub_type="str")),
        "country": _optional(cs.literal_schema(sorted(ISO_COUNTRIES))),
        "page": _optional(_text(2048)),
        "referrer": _optional(_text(2048)),
        "query": _optional(_text(1024)),
    }
    event_fields = {
        "event_id": cs.model_field(
            cs.str_schema(pattern=r"^[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}$", strict=True)
        ),
        "event_type": cs.model_field(cs.enum_schema(EventType, list(EventType), sub_type="str")),
        "user_id": cs.model_field(ident),
        "item_id": _optional(ident),
        "items": _optional(cs.list_schema(ident, max_length=1000, strict=True)),
        # fromisoformat reads "...Z" as UTC: the value the full validator normalises to.
        "ts": cs.model_field(
            cs.no_info_after_validator_function(
                datetime.fromisoformat,
                cs.str_schema(
                    pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                    r"(?:\.[0-9]{3}|\.[0-9]{6})?Z$",
                    strict=True,
                ),
            )
        ),
        "session_id": _optional(ident),
        "context": _optional(
            cs.model_schema(
                Context,
                cs.model_fields_schema(
                    context_fields, extra_behavior="allow", extras_schema=cs.str_schema(strict=True)
                ),
                extra_behavior="allow",
            )
        ),
        "request_id": _optional(ident),
        "position": _optional(cs.int_schema(ge=0, le=10_000, strict=True)),
        "schema_version": cs.model_field(
            cs.with_default_schema(
                cs.int_schema(ge=SCHEMA_VERSION, le=SCHEMA_VERSION, strict=True),
                default=SCHEMA_VERSION,
            )
        ),
    }
    # A field added to the models must be added here too: fail at import, not silently.
    if set(event_fields) != set(Event.model_fields) or set(context_fields) != set(
        Context.model_fields
    ):
        raise RuntimeError("the canonical event schema is out of step with Event/Context")
    fields = cs.model_fields_schema(event_fields, extra_behavior="forbid")
    return SchemaValidator(cs.model_schema(Event, fields, extra_behavior="forbid"))


_CANONICAL_EVENT = _canonical_event_validator()


def parse_canonical_event(
    data: bytes | str,
    *,
    max_future_skew: timedelta | None = DEFAULT_MAX_FUTURE_SKEW,
    now: datetime | None = None,
) -> Event | None:
    """:func:`parse_event` of wire JSON in its canonical form, about 3x faster; else ``None``.

    Returns exactly the :class:`Event` that :func:`parse_event` returns, when the record is
    in the form :meth:`Event.to_json` writes (lower-case UUID, a UTC ``Z`` timestamp with
    0, 3 or 6 fractional digits, upper-case country, string-valued context extras, integers
    as JSON integers). ``None`` means only "not decided here": call :func:`parse_event`,
    which accepts the other valid forms and explains the invalid ones.

    Examples
    --------
    >>> raw = (b'{"event_id":"0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a","event_type":"view",'
    ...        b'"user_id":"u1","item_id":"i9","ts":"2026-01-02T03:04:05Z"}')
    >>> parse_canonical_event(raw) == parse_event(raw)
    True
    >>> parse_canonical_event(raw.replace(b"Z", b"+00:00")) is None  # valid, not canonical
    True
    """
    try:
        event: Event = _CANONICAL_EVENT.validate_json(data)
    except ValidationError:
        return None
    # What Event's model validator and the clock check add to the field schemas.
    if event.event_type is EventType.IMPRESSION:
        if event.item_id is None and not event.items:
            return None
    elif event.item_id is None or event.items is not None:
        return None
    if max_future_skew is not None and event.ts > (now or datetime.now(UTC)) + max_future_skew:
        return None
    return event


def parse_event(
    data: bytes | str | dict[str, Any],
    *,
    max_future_skew: timedelta | None = DEFAULT_MAX_FUTURE_SKEW,
    now: datetime | None = None,
) -> Event:
    """Validate one event from wire bytes, a JSON string or a decoded dict.

    Raises :class:`pydantic.ValidationError` with field-level detail. ``max_future_skew=None``
    turns the clock check off (replays of historical data validated long after the fact
    never trip it anyway, as it only bounds the future). Wire JSON in canonical form takes
    :func:`parse_canonical_event`'s fast path, with the same result.
    """
    ctx = _context(max_future_skew, now)
    if isinstance(data, dict):
        return Event.model_validate(data, context=ctx)
    event = parse_canonical_event(data, max_future_skew=max_future_skew, now=now)
    if event is not None:
        return event
    return Event.model_validate_json(data, context=ctx)


def parse_item(
    data: bytes | str | dict[str, Any],
    *,
    max_future_skew: timedelta | None = DEFAULT_MAX_FUTURE_SKEW,
    now: datetime | None = None,
) -> Item:
    """Validate one catalog record; see :func:`parse_event`."""
    ctx = _context(max_future_skew, now)
    if isinstance(data, dict):
        return Item.model_validate(data, context=ctx)
    return Item.model_validate_json(data, context=ctx)


def error_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Field-level errors in a JSON-safe form: ``[{"loc": [...], "msg": ..., "type": ...}]``."""
    return [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def describe_error(exc: Exception) -> str:
    """One readable line for a DLQ header or a log: ``field.path: message; ...``."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = ".".join(str(p) for p in err["loc"]) or "record"
            parts.append(f"{loc}: {err['msg']}")
        return "; ".join(parts)
    return f"{type(exc).__name__}: {exc}"
