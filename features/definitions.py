"""Every real-time feature definition, as data: one source for the stream engine and for Spark.

The stream computes these features incrementally (:mod:`features.realtime`), Spark recomputes
them from the event log, and a test holds the two to the same numbers. So everything that
decides a value lives here as a frozen constant, and the semantics below are the contract both
engines implement.

Time
    An event's time is its integer count of microseconds since the UNIX epoch,
    :func:`epoch_us` (Spark: ``unix_micros(ts)``). Integers keep bucket edges exact; floats of
    epoch seconds would put an event at ``12:00:00`` into the wrong bucket now and then.

Bucketed sliding windows
    ``bucket(ts) = floor(epoch_us(ts) / bucket_us)``. A windowed count of an entity *as of* its
    anchor ``T`` counts the entity's accepted events with
    ``bucket(T) - n_buckets + 1 <= bucket(ts) <= bucket(T)``, ``n_buckets = seconds /
    bucket_seconds``. So ``views_5m`` spans between 4.5 and 5 minutes of event time.

Anchor
    The event time of the entity's newest accepted event. It is the row's Feast
    ``event_timestamp`` (so freshness is measurable and point-in-time joins are correct) and
    the ``last_event_ts`` feature. Counts are *as of the anchor*, not as of "now": a user idle
    since yesterday keeps yesterday's ``views_5m``. Serving knows the age
    (``now - last_event_ts``) and can discount windows that have fully elapsed. The age itself
    is not stored because a stored age is stale the moment it is written.

Newest
    "Newest event" always means the largest ``(epoch_us(ts), event_id)``; the event id breaks
    ties between equal timestamps, so the answer does not depend on arrival order.

Acceptance (arrival-order dependent, by design)
    Each entity judges each event on its own: an event with
    ``ts < anchor - allowed_lateness`` is *too late* (counted in the stats, never changes a
    feature); otherwise an event whose ``event_id`` the entity already accepted is a
    *duplicate*; otherwise it is *accepted* and the anchor becomes ``max(anchor, ts)``. A
    re-delivery always carries its original ``ts``. A replay must follow the same arrival
    order to get the same acceptances.

Sessions
    A session is a maximal run of one user's accepted events that share a ``session_id`` (an
    absent id is a value of its own) with no gap longer than :data:`SESSION_GAP` between
    consecutive events in event-time order. The gap rule applies to named sessions too: it
    keeps the state bounded (a session that could be extended by any future event would have
    to be remembered forever) and matches the usual analytics definition of a session.
    ``session_events`` and ``session_duration_s`` describe the session of the newest event.

Items of an event
    :func:`event_items`: the distinct items an impression lists (its ``item_id`` when it lists
    none), or the ``item_id`` of any other event. An impression counts one impression for each
    distinct item it lists (Spark: ``array_distinct``).

Examples
--------
>>> W5M.n_buckets, W1H.n_buckets, W24H.n_buckets
(10, 12, 24)
>>> t = epoch_us(datetime(2026, 1, 2, 12, 0, 10, tzinfo=UTC))
>>> W5M.covers(t, t - 280 * US_PER_S), W5M.covers(t, t - 281 * US_PER_S)
(True, False)
>>> USER_VIEW.names[:4]
('views_5m', 'clicks_5m', 'add_to_carts_5m', 'purchases_5m')
>>> smoothed_ctr(0, 0), smoothed_ctr(3, 40)
(0.05, 0.06666666666666667)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from streamrec.contract import Event, EventType

__all__ = [
    "ALLOWED_LATENESS",
    "COUNTED_TYPES",
    "CTR_PRIOR_CLICKS",
    "CTR_PRIOR_IMPRESSIONS",
    "EPOCH",
    "ITEM_VIEW",
    "ITEM_WINDOWS",
    "RECENT_ITEMS_MAX",
    "SESSION_GAP",
    "STATS_WINDOWS",
    "TIMESTAMP_FIELD",
    "USER_VIEW",
    "USER_WINDOWS",
    "US_PER_S",
    "W1H",
    "W5M",
    "W7D",
    "W24H",
    "W30D",
    "Feature",
    "Kind",
    "RealtimeView",
    "Window",
    "count_name",
    "epoch_us",
    "event_items",
    "fingerprint",
    "smoothed_ctr",
]

US_PER_S = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def epoch_us(ts: datetime) -> int:
    """Microseconds since the UNIX epoch of a zone-aware timestamp, exactly."""
    return (ts - EPOCH) // _ONE_US


@dataclass(frozen=True, slots=True)
class Window:
    """A bucketed sliding window: ``seconds`` long, sliding by ``bucket_seconds``.

    Examples
    --------
    >>> w = Window("1h", 3600, 300)
    >>> w.n_buckets, w.bucket(299 * US_PER_S), w.bucket(300 * US_PER_S)
    (12, 0, 1)
    """

    name: str
    seconds: int
    bucket_seconds: int

    def __post_init__(self) -> None:
        if self.bucket_seconds <= 0 or self.seconds <= 0 or self.seconds % self.bucket_seconds:
            raise ValueError("a window must be a positive whole number of positive buckets")

    @property
    def n_buckets(self) -> int:
        return self.seconds // self.bucket_seconds

    @property
    def bucket_us(self) -> int:
        return self.bucket_seconds * US_PER_S

    def bucket(self, ts_us: int) -> int:
        """Index of the bucket holding ``ts_us`` (floor division, also before 1970)."""
        return ts_us // self.bucket_us

    def covers(self, anchor_us: int, ts_us: int) -> bool:
        """Whether an event at ``ts_us`` counts in this window as of ``anchor_us``."""
        last = self.bucket(anchor_us)
        return last - self.n_buckets + 1 <= self.bucket(ts_us) <= last


W5M = Window("5m", 300, 30)
W1H = Window("1h", 3600, 300)
W24H = Window("24h", 86_400, 3600)
USER_WINDOWS: tuple[Window, ...] = (W5M, W1H, W24H)
ITEM_WINDOWS: tuple[Window, ...] = (W1H, W24H)

# The order is part of the snapshot format of the engine: append, never reorder.
COUNTED_TYPES: tuple[EventType, ...] = (
    EventType.VIEW,
    EventType.CLICK,
    EventType.ADD_TO_CART,
    EventType.PURCHASE,
    EventType.IMPRESSION,
)
_PLURAL = {
    EventType.VIEW: "views",
    EventType.CLICK: "clicks",
    EventType.ADD_TO_CART: "add_to_carts",
    EventType.PURCHASE: "purchases",
    EventType.IMPRESSION: "impressions",
}

ALLOWED_LATENESS = timedelta(minutes=10)
"""Default lateness: events older than the entity's anchor minus this are too late.

Exact deduplication must remember every id that could still be accepted, about 160 bytes per
(entity, event) pair: 10 minutes at 1,000 events/s is ~100 MB for the users alone, an hour
six times that. Late-arriving stragglers beyond it still reach the event log and Spark."""
SESSION_GAP = timedelta(minutes=30)
"""Inactivity that ends a session (Google Analytics' default)."""
RECENT_ITEMS_MAX = 20
"""Length of ``recent_items``."""
CTR_PRIOR_CLICKS = 1.0
CTR_PRIOR_IMPRESSIONS = 20.0
"""CTR prior: an unseen item starts at 1/20 = 5 %, a typical feed click rate, and about 20
impressions of evidence move it halfway to the item's own rate."""

TIMESTAMP_FIELD = "event_timestamp"
"""Column of every pushed row holding the anchor (a UTC ``datetime``)."""


def count_name(event_type: EventType, window: Window) -> str:
    """Feature name of a windowed count, e.g. ``add_to_carts_1h``."""
    return f"{_PLURAL[event_type]}_{window.name}"


def smoothed_ctr(clicks: int, impressions: int) -> float:
    """Click-through rate with the prior: ``(clicks + 1) / (impressions + 20)``."""
    return (clicks + CTR_PRIOR_CLICKS) / (impressions + CTR_PRIOR_IMPRESSIONS)


def event_items(event: Event) -> tuple[str, ...]:
    """The items an event counts for, distinct, in listed order."""
    if event.items:
        return tuple(dict.fromkeys(event.items))
    return (event.item_id,) if event.item_id is not None else ()


class Kind(StrEnum):
    """Value type of a feature (the Feast repo maps these to ``Int64``, ``Float64``, ...)."""

    INT = "int64"
    FLOAT = "float64"
    STRING = "string"
    STRING_LIST = "string_list"


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    kind: Kind
    description: str


@dataclass(frozen=True, slots=True)
class RealtimeView:
    """One Feast feature view fed by the stream: its entity, windows and feature schema.

    Examples
    --------
    >>> ITEM_VIEW.join_key, ITEM_VIEW.kinds()["ctr_1h"]
    ('item_id', <Kind.FLOAT: 'float64'>)
    """

    name: str
    entity: str
    join_key: str
    windows: tuple[Window, ...]
    features: tuple[Feature, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def kinds(self) -> dict[str, Kind]:
        return {f.name: f.kind for f in self.features}


def _counts(windows: tuple[Window, ...], what: str) -> tuple[Feature, ...]:
    return tuple(
        Feature(count_name(t, w), Kind.INT, f"{t.value} events of the {what}, last {w.name}")
        for w in windows
        for t in COUNTED_TYPES
    )


_LAST_EVENT_TS = Feature(
    "last_event_ts", Kind.FLOAT, "UNIX seconds of the newest accepted event (the anchor)"
)

USER_VIEW = RealtimeView(
    name="user_realtime",
    entity="user",
    join_key="user_id",
    windows=USER_WINDOWS,
    features=(
        *_counts(USER_WINDOWS, "user"),
        Feature(
            "recent_items",
            Kind.STRING_LIST,
            f"last {RECENT_ITEMS_MAX} distinct items of non-impression events, newest first",
        ),
        Feature("last_category", Kind.STRING, "category of the newest non-impression item"),
        Feature("last_device", Kind.STRING, "device of the newest event that has one"),
        Feature("last_country", Kind.STRING, "country of the newest event that has one"),
        Feature("session_events", Kind.INT, "accepted events in the newest event's session"),
        Feature("session_duration_s", Kind.FLOAT, "seconds from that session's first event"),
        _LAST_EVENT_TS,
    ),
)

ITEM_VIEW = RealtimeView(
    name="item_realtime",
    entity="item",
    join_key="item_id",
    windows=ITEM_WINDOWS,
    features=(
        *_counts(ITEM_WINDOWS, "item"),
        *(
            Feature(f"ctr_{w.name}", Kind.FLOAT, f"smoothed click-through rate, last {w.name}")
            for w in ITEM_WINDOWS
        ),
        _LAST_EVENT_TS,
    ),
)


def fingerprint() -> dict[str, Any]:
    """Every definition that shapes incremental state; snapshots refuse to cross a change."""
    return {
        "types": [t.value for t in COUNTED_TYPES],
        "user_windows": [[w.name, w.seconds, w.bucket_seconds] for w in USER_WINDOWS],
        "item_windows": [[w.name, w.seconds, w.bucket_seconds] for w in ITEM_WINDOWS],
        "session_gap_us": SESSION_GAP // _ONE_US,
        "recent_items_max": RECENT_ITEMS_MAX,
    }


# --- Batch (Spark) statistics -------------------------------------------------------------
# Daily buckets: a stats row is as of the last instant of a UTC day (or of the run's end),
# so its 7-day window is that day and the six before it, whole days, counted like every
# bucketed window above.
W7D = Window("7d", 7 * 86_400, 86_400)
W30D = Window("30d", 30 * 86_400, 86_400)
STATS_WINDOWS: tuple[Window, ...] = (W7D, W30D)
