"""Brute-force real-time features: the oracle every faster engine is tested against.

It follows :mod:`features.definitions` word for word and keeps nothing incremental:

1. :func:`accept` walks the arrival order and decides, per entity, which events are accepted,
   duplicates or too late (remembering every id forever, which is obviously correct).
2. :func:`user_row` and :func:`item_row` compute each feature directly from an entity's
   accepted events. A batch engine (Spark) that reads a log without too-late events computes
   the same rows from the deduplicated log.

It is quadratic where the engine is incremental; use it on test-sized streams only.

Examples
--------
>>> from datetime import UTC, datetime
>>> from streamrec.contract import Event
>>> e = Event(event_id="7d3c1d3e-0000-4000-8000-000000000001", event_type="click",
...           user_id="u1", item_id="i1", ts=datetime(2026, 1, 2, tzinfo=UTC))
>>> verdict = accept([e, e])
>>> verdict.user_status, {k: len(v) for k, v in verdict.users.items()}
(['accepted', 'duplicate'], {'u1': 1})
>>> user_row("u1", verdict.users["u1"], {}.get)["clicks_1h"]
1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from features.definitions import (
    ALLOWED_LATENESS,
    COUNTED_TYPES,
    EPOCH,
    ITEM_WINDOWS,
    RECENT_ITEMS_MAX,
    SESSION_GAP,
    TIMESTAMP_FIELD,
    US_PER_S,
    USER_WINDOWS,
    count_name,
    epoch_us,
    event_items,
    smoothed_ctr,
)
from streamrec.contract import Event, EventType

__all__ = [
    "ACCEPTED",
    "DUPLICATE",
    "TOO_LATE",
    "Acceptance",
    "accept",
    "item_row",
    "user_row",
]

ACCEPTED, DUPLICATE, TOO_LATE = "accepted", "duplicate", "too_late"


@dataclass
class Acceptance:
    """Verdicts of one arrival-ordered stream.

    ``users``/``items`` hold each entity's accepted events in arrival order;
    ``user_status[i]`` is event ``i``'s verdict for its user, ``item_status[i]`` maps each of
    its items to the verdict of that item.
    """

    users: dict[str, list[Event]] = field(default_factory=dict)
    items: dict[str, list[Event]] = field(default_factory=dict)
    user_status: list[str] = field(default_factory=list)
    item_status: list[dict[str, str]] = field(default_factory=list)


def _judge(accepted: list[Event], event: Event, lateness_us: int) -> str:
    if accepted:
        anchor = max(epoch_us(e.ts) for e in accepted)
        if epoch_us(event.ts) < anchor - lateness_us:
            return TOO_LATE
        if any(e.event_id == event.event_id for e in accepted):
            return DUPLICATE
    accepted.append(event)
    return ACCEPTED


def accept(events: Iterable[Event], allowed_lateness: timedelta = ALLOWED_LATENESS) -> Acceptance:
    """Replay ``events`` in arrival order and record every entity's verdicts."""
    lateness_us = allowed_lateness // timedelta(microseconds=1)
    out = Acceptance()
    for event in events:
        out.user_status.append(_judge(out.users.setdefault(event.user_id, []), event, lateness_us))
        out.item_status.append(
            {
                item_id: _judge(out.items.setdefault(item_id, []), event, lateness_us)
                for item_id in event_items(event)
            }
        )
    return out


def _newest_first(events: Iterable[Event]) -> list[Event]:
    return sorted(events, key=lambda e: (epoch_us(e.ts), e.event_id), reverse=True)


def _counts(events: Sequence[Event], windows: Sequence[Any], anchor: int) -> dict[str, int]:
    return {
        count_name(t, w): sum(
            1 for e in events if e.event_type == t and w.covers(anchor, epoch_us(e.ts))
        )
        for w in windows
        for t in COUNTED_TYPES
    }


def _sessions(times: list[int]) -> list[list[int]]:
    """Split sorted times into runs wherever consecutive events are more than the gap apart."""
    gap = SESSION_GAP // timedelta(microseconds=1)
    runs = [[times[0]]]
    for t in times[1:]:
        if t - runs[-1][-1] > gap:
            runs.append([t])
        else:
            runs[-1].append(t)
    return runs


def user_row(
    user_id: str, events: Sequence[Event], category_of: Callable[[str], str | None]
) -> dict[str, Any]:
    """The ``user_realtime`` row of a user from all of its accepted events."""
    anchor = max(epoch_us(e.ts) for e in events)
    newest_first = _newest_first(events)
    recent: list[str] = []
    for e in newest_first:
        if e.event_type != EventType.IMPRESSION and e.item_id not in recent:
            recent.append(e.item_id)  # type: ignore[arg-type]
    recent = recent[:RECENT_ITEMS_MAX]
    devices = [e.context.device.value for e in newest_first if e.context and e.context.device]
    countries = [e.context.country for e in newest_first if e.context and e.context.country]
    newest = newest_first[0]
    newest_ts = epoch_us(newest.ts)
    session_times = sorted(
        epoch_us(e.ts) for e in events if (e.session_id or "") == (newest.session_id or "")
    )
    run = next(r for r in _sessions(session_times) if r[0] <= newest_ts <= r[-1])
    return {
        "user_id": user_id,
        TIMESTAMP_FIELD: EPOCH + timedelta(microseconds=anchor),
        **_counts(events, USER_WINDOWS, anchor),
        "recent_items": recent,
        "last_category": (category_of(recent[0]) or "") if recent else "",
        "last_device": devices[0] if devices else "",
        "last_country": countries[0] if countries else "",
        "session_events": len(run),
        "session_duration_s": (run[-1] - run[0]) / US_PER_S,
        "last_event_ts": anchor / US_PER_S,
    }


def item_row(item_id: str, events: Sequence[Event]) -> dict[str, Any]:
    """The ``item_realtime`` row of an item from all of its accepted events."""
    anchor = max(epoch_us(e.ts) for e in events)
    counts = _counts(events, ITEM_WINDOWS, anchor)
    ctrs = {
        f"ctr_{w.name}": smoothed_ctr(
            counts[count_name(EventType.CLICK, w)], counts[count_name(EventType.IMPRESSION, w)]
        )
        for w in ITEM_WINDOWS
    }
    return {
        "item_id": item_id,
        TIMESTAMP_FIELD: EPOCH + timedelta(microseconds=anchor),
        **counts,
        **ctrs,
        "last_event_ts": anchor / US_PER_S,
    }
