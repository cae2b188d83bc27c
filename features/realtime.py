"""Real-time features, computed incrementally from micro-batches of events.

A stream worker feeds each consumed batch to :meth:`RealtimeFeatureEngine.apply`, pushes the
rows of the entities it reports as changed to the online store, and every so often stores
:meth:`~RealtimeFeatureEngine.snapshot` next to the consumed offsets. The values follow
:mod:`features.definitions` exactly (a brute-force replay, :mod:`features.reference`, is the
test oracle); that module also states the semantics.

User and item state are separate objects (:class:`UserFeatureState`,
:class:`ItemFeatureState`) because they partition differently: events arrive keyed by
``user_id``, while item aggregates may move to a worker of their own.

Cost and memory are bounded per entity. Window counts are kept per bucket, and buckets that
have left their window are dropped. Deduplication remembers an event id only while an event
with that timestamp could still be accepted (not older than ``anchor - allowed_lateness``);
older re-deliveries are rejected as too late before the id is even looked up, so forgetting
them is safe. Both are pruned together, amortised O(1) per event.

Examples
--------
>>> from datetime import UTC, datetime
>>> from streamrec.contract import Event
>>> engine = RealtimeFeatureEngine()
>>> click = Event(event_id="0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a", event_type="click",
...               user_id="u1", item_id="i9", ts=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
>>> result = engine.apply([click, click])
>>> result.changed_users, result.changed_items, result.users.applied, result.users.duplicates
({'u1'}, {'i9'}, 1, 1)
>>> row = engine.user_row("u1")
>>> row["clicks_5m"], row["recent_items"], row["session_events"]
(1, ['i9'], 1)
>>> engine.item_row("i9")["ctr_1h"]
0.1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import orjson

from features.definitions import (
    ALLOWED_LATENESS,
    COUNTED_TYPES,
    EPOCH,
    ITEM_VIEW,
    ITEM_WINDOWS,
    RECENT_ITEMS_MAX,
    SESSION_GAP,
    TIMESTAMP_FIELD,
    US_PER_S,
    USER_VIEW,
    USER_WINDOWS,
    Window,
    epoch_us,
    event_items,
    fingerprint,
    smoothed_ctr,
)
from streamrec.contract import Event, EventType, Item

__all__ = [
    "SNAPSHOT_VERSION",
    "ApplyResult",
    "ItemFeatureState",
    "RealtimeFeatureEngine",
    "Update",
    "UserFeatureState",
]

SNAPSHOT_VERSION = 1
_SNAPSHOT_FORMAT = "streamrec.realtime"

_TOO_LATE, _DUPLICATE, _ACCEPTED = range(3)  # also the order of the counts in Update
_NEVER = -(1 << 62)  # anchor of an entity without events: nothing is too late for it
_MIN_PRUNE = 32
_ONE_US = timedelta(microseconds=1)
_GAP_US = SESSION_GAP // _ONE_US
_N_TYPES = len(COUNTED_TYPES)
_TYPE_INDEX = {t: i for i, t in enumerate(COUNTED_TYPES)}
_IMPRESSION = _TYPE_INDEX[EventType.IMPRESSION]
_CLICK = _TYPE_INDEX[EventType.CLICK]


def _lateness_us(allowed_lateness: timedelta) -> int:
    if allowed_lateness < timedelta(0):
        raise ValueError("allowed_lateness must not be negative")
    return allowed_lateness // _ONE_US


def _ring_spec(windows: tuple[Window, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((w.bucket_us, w.n_buckets) for w in windows)


def _key_spec(windows: tuple[Window, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((w * _N_TYPES, window.bucket_us) for w, window in enumerate(windows))


# A count key is bucket * 32 + slot, slot = window * types + type: 5 bits for the slot.
if max(len(USER_WINDOWS), len(ITEM_WINDOWS)) * _N_TYPES > 32:
    raise RuntimeError("too many windows x event types for the packed count keys")


@dataclass(slots=True)
class Update:
    """What one micro-batch did to one kind of entity.

    Counts are per (entity, event) pair: an impression listing three items is judged three
    times on the item side.
    """

    changed: set[str] = field(default_factory=set)
    too_late: int = 0
    duplicates: int = 0
    applied: int = 0


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Outcome of :meth:`RealtimeFeatureEngine.apply` on both entity kinds."""

    users: Update
    items: Update

    @property
    def changed_users(self) -> set[str]:
        return self.users.changed

    @property
    def changed_items(self) -> set[str]:
        return self.items.changed


class _Entity:
    """What every entity keeps: its anchor, the ids it must still recognise, window counts.

    ``counts`` maps a packed key ``bucket * 32 + window * 5 + type`` to a count: one flat dict
    of ints per entity is cheap to update and invisible to the garbage collector. It may still
    hold buckets that have left their window; :meth:`totals` skips them, pruning drops them.
    """

    __slots__ = ("anchor", "counts", "prune_at", "seen")
    RINGS: ClassVar[tuple[tuple[int, int], ...]] = ()  # (bucket_us, n_buckets) per window
    _KEYS: ClassVar[tuple[tuple[int, int], ...]] = ()  # (window * 5, bucket_us) per window

    def __init__(self) -> None:
        self.anchor = _NEVER
        self.seen: dict[str, int] = {}
        self.prune_at = _MIN_PRUNE
        self.counts: dict[int, int] = {}

    @classmethod
    def count_keys(cls, ts: int, type_index: int) -> list[int]:
        """The keys of ``counts`` an event increments (the same for every entity it counts for)."""
        return [(ts // bucket_us) * 32 + bits + type_index for bits, bucket_us in cls._KEYS]

    def add(self, event_id: str, ts: int, keys: list[int], lateness: int) -> int:
        """Judge one event and, if accepted, count it under ``keys``; returns the verdict."""
        anchor = self.anchor
        if ts < anchor - lateness:
            return _TOO_LATE
        seen = self.seen
        if event_id in seen:
            return _DUPLICATE
        seen[event_id] = ts
        if ts > anchor:
            self.anchor = anchor = ts
        counts = self.counts
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        if len(seen) > self.prune_at:
            self.prune(anchor - lateness)
        return _ACCEPTED

    def _lows(self) -> list[int]:
        """First bucket of each window as of the anchor."""
        return [self.anchor // bucket_us - n + 1 for bucket_us, n in self.RINGS]

    def totals(self) -> list[int]:
        """Counts as of the anchor, window-major: ``[window * 5 + type]``."""
        lows = self._lows()
        totals = [0] * (len(self.RINGS) * _N_TYPES)
        for key, count in self.counts.items():
            slot = key & 31
            if key >> 5 >= lows[slot // _N_TYPES]:
                totals[slot] += count
        return totals

    def prune(self, horizon: int) -> None:
        """Forget ids older than ``horizon`` (too late from now on) and expired buckets."""
        self.seen = {eid: ts for eid, ts in self.seen.items() if ts >= horizon}
        lows = self._lows()
        self.counts = {k: c for k, c in self.counts.items() if k >> 5 >= lows[(k & 31) // _N_TYPES]}
        # Doubling keeps pruning amortised O(1) per event and memory within 2x the live ids;
        # the counts grow by at most one key per window per id in between.
        self.prune_at = max(2 * len(self.seen), _MIN_PRUNE)

    def to_state(self) -> list[Any]:
        return [
            self.anchor,
            self.prune_at,
            self.seen,
            [x for kc in self.counts.items() for x in kc],
        ]

    def load_state(self, state: list[Any]) -> None:
        self.anchor, self.prune_at, self.seen, flat = state
        pairs = iter(flat)
        self.counts = dict(zip(pairs, pairs, strict=True))


class _Item(_Entity):
    __slots__ = ()
    RINGS = _ring_spec(ITEM_WINDOWS)
    _KEYS = _key_spec(ITEM_WINDOWS)


class _User(_Entity):
    """Adds what only users have: recent items, last context, sessions.

    ``recent`` maps each of the newest distinct items to the key ``(ts, event_id)`` of its
    newest interaction, in ascending key order. ``sessions`` maps a session id ("" when
    absent) to its runs ``[start, end, events]``, sorted and more than the gap apart.
    """

    __slots__ = (
        "country",
        "country_key",
        "device",
        "device_key",
        "newest",
        "newest_session",
        "recent",
        "sessions",
    )
    RINGS = _ring_spec(USER_WINDOWS)
    _KEYS = _key_spec(USER_WINDOWS)

    def __init__(self) -> None:
        super().__init__()
        self.recent: dict[str, tuple[int, str]] = {}
        self.newest: tuple[int, str] = (_NEVER, "")
        self.newest_session = ""
        self.device_key: tuple[int, str] = (_NEVER, "")
        self.device = ""
        self.country_key: tuple[int, str] = (_NEVER, "")
        self.country = ""
        self.sessions: dict[str, list[list[int]]] = {}

    def observe(self, event: Event, ts: int, type_index: int) -> None:
        key = (ts, event.event_id)
        if type_index != _IMPRESSION:
            self._remember_item(event.item_id, key)  # type: ignore[arg-type]
        ctx = event.context
        if ctx is not None:
            if ctx.device is not None and key > self.device_key:
                self.device_key, self.device = key, str(ctx.device)  # fast .value
            if ctx.country is not None and key > self.country_key:
                self.country_key, self.country = key, ctx.country
        session = event.session_id or ""
        self._sessionize(session, ts)
        if key > self.newest:
            self.newest, self.newest_session = key, session

    def _remember_item(self, item_id: str, key: tuple[int, str]) -> None:
        recent = self.recent
        if not recent or key > next(reversed(recent.values())):
            # The usual case, the newest interaction so far: move or append to the end.
            recent.pop(item_id, None)
            recent[item_id] = key
            if len(recent) > RECENT_ITEMS_MAX:
                del recent[next(iter(recent))]
            return
        # A late one. Exact top-k of per-item maxima: an item that dropped out has an older
        # newest key than all k items kept, so none of its older events can bring it back.
        old = recent.get(item_id)
        if old is not None and old > key:
            return
        if old is None and len(recent) >= RECENT_ITEMS_MAX and key < recent[next(iter(recent))]:
            return
        recent[item_id] = key
        ordered = sorted(recent.items(), key=lambda pair: pair[1])
        self.recent = dict(ordered[-RECENT_ITEMS_MAX:])

    def _sessionize(self, session: str, ts: int) -> None:
        runs = self.sessions.get(session)
        if runs is None:
            self.sessions[session] = [[ts, ts, 1]]
            return
        last = runs[-1]
        if ts >= last[0]:  # the usual, in-order case: only the last run can be in reach
            if ts <= last[1] + _GAP_US:
                if ts > last[1]:
                    last[1] = ts
                last[2] += 1
            else:
                runs.append([ts, ts, 1])
            return
        # A late event: it joins every run within the gap (at most two) into one.
        merged, kept = [ts, ts, 1], []
        for run in runs:
            if run[0] - _GAP_US <= ts <= run[1] + _GAP_US:
                merged = [min(merged[0], run[0]), max(merged[1], run[1]), merged[2] + run[2]]
            else:
                kept.append(run)
        kept.append(merged)
        kept.sort()
        self.sessions[session] = kept

    def prune(self, horizon: int) -> None:
        super().prune(horizon)
        # A run ending before this can never be reached again: accepted events are >= horizon.
        floor = horizon - _GAP_US
        for session in list(self.sessions):
            runs = [r for r in self.sessions[session] if r[1] >= floor]
            if runs:
                self.sessions[session] = runs
            else:
                del self.sessions[session]

    def newest_session_run(self) -> tuple[int, int]:
        """``(events, duration_us)`` of the newest event's session."""
        ts = self.newest[0]
        for start, end, events in self.sessions[self.newest_session]:
            if start <= ts <= end:
                return events, end - start
        raise AssertionError("the newest event's session run is never pruned")

    def recent_items(self) -> list[str]:
        return list(reversed(self.recent))

    def to_state(self) -> list[Any]:
        return [
            *super().to_state(),
            [[item, ts, eid] for item, (ts, eid) in self.recent.items()],
            [*self.newest, self.newest_session],
            [*self.device_key, self.device],
            [*self.country_key, self.country],
            self.sessions,
        ]

    def load_state(self, state: list[Any]) -> None:
        super().load_state(state[:4])
        recent, newest, device, country, self.sessions = state[4:]
        self.recent = {item: (ts, eid) for item, ts, eid in recent}
        self.newest, self.newest_session = (newest[0], newest[1]), newest[2]
        self.device_key, self.device = (device[0], device[1]), device[2]
        self.country_key, self.country = (country[0], country[1]), country[2]


# Row columns in the order the row methods produce values; the views list the counts
# window-major like the totals, so the schema and the rows cannot drift apart.
_USER_ROW = (USER_VIEW.join_key, TIMESTAMP_FIELD, *USER_VIEW.names)
_ITEM_ROW = (ITEM_VIEW.join_key, TIMESTAMP_FIELD, *ITEM_VIEW.names)


def _timestamp(ts: int) -> datetime:
    return EPOCH + timedelta(microseconds=ts)


def _decode(events: Iterable[Event]) -> tuple[Sequence[Event], list[int], list[int]]:
    """Event time and type index of each event, computed once for users and items."""
    batch = events if isinstance(events, list | tuple) else list(events)
    return batch, [epoch_us(e.ts) for e in batch], [_TYPE_INDEX[e.event_type] for e in batch]


def _no_category(item_id: str) -> str | None:
    return None


class UserFeatureState:
    """Incremental ``user_realtime`` features of every user seen.

    Parameters
    ----------
    category_of
        Category of an item id, or ``None`` when unknown; consulted when a row is built, so
        a catalog record that arrives after the events still names the category.
    allowed_lateness
        Events older than the user's anchor minus this are too late.

    Examples
    --------
    >>> from datetime import UTC, datetime
    >>> from streamrec.contract import Event
    >>> users = UserFeatureState({"i1": "shoes"}.get)
    >>> view = Event(event_id="7d3c1d3e-0000-4000-8000-000000000001", event_type="view",
    ...              user_id="u1", item_id="i1", ts=datetime(2026, 1, 2, tzinfo=UTC),
    ...              context={"device": "tablet"})
    >>> users.apply([view]).changed
    {'u1'}
    >>> row = users.row("u1")
    >>> row["views_24h"], row["last_category"], row["last_device"], row["last_country"]
    (1, 'shoes', 'tablet', '')
    """

    def __init__(
        self,
        category_of: Callable[[str], str | None] = _no_category,
        *,
        allowed_lateness: timedelta = ALLOWED_LATENESS,
    ) -> None:
        self.allowed_lateness = allowed_lateness
        self._lateness = _lateness_us(allowed_lateness)
        self._category_of = category_of
        self._users: dict[str, _User] = {}

    def apply(self, events: Iterable[Event]) -> Update:
        """Fold a micro-batch in, in arrival order."""
        return self._apply(*_decode(events))

    def _apply(self, events: Sequence[Event], times: list[int], types: list[int]) -> Update:
        users, lateness, count_keys = self._users, self._lateness, _User.count_keys
        changed: set[str] = set()
        verdicts = [0, 0, 0]
        for event, ts, type_index in zip(events, times, types, strict=True):
            user_id = event.user_id
            user = users.get(user_id)
            if user is None:
                user = users[user_id] = _User()
            verdict = user.add(event.event_id, ts, count_keys(ts, type_index), lateness)
            verdicts[verdict] += 1
            if verdict == _ACCEPTED:
                user.observe(event, ts, type_index)
                changed.add(user_id)
        return Update(changed, *verdicts)

    def row(self, user_id: str) -> dict[str, Any]:
        """The current feature row, keyed like the Feast view, with ``event_timestamp``."""
        user = self._users[user_id]
        recent = user.recent_items()
        events, duration = user.newest_session_run()
        values = [user_id, _timestamp(user.anchor), *user.totals()]
        values += (
            recent,
            (self._category_of(recent[0]) or "") if recent else "",
            user.device,
            user.country,
            events,
            duration / US_PER_S,
            user.anchor / US_PER_S,
        )
        return dict(zip(_USER_ROW, values, strict=True))

    def newest_items(self) -> Iterator[tuple[str, str]]:
        """``(user_id, item_id)`` of every user's newest non-impression item."""
        for user_id, user in self._users.items():
            if user.recent:
                yield user_id, next(reversed(user.recent))

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def __len__(self) -> int:
        return len(self._users)

    def remembered_ids(self) -> int:
        """Event ids held for deduplication, summed over users (a memory gauge)."""
        return sum(len(u.seen) for u in self._users.values())

    def to_state(self) -> dict[str, Any]:
        return {uid: u.to_state() for uid, u in self._users.items()}

    def load_state(self, state: dict[str, Any]) -> None:
        users = {}
        for uid, data in state.items():
            users[uid] = user = _User()
            user.load_state(data)
        self._users = users


class ItemFeatureState:
    """Incremental ``item_realtime`` features of every item seen.

    Examples
    --------
    >>> from datetime import UTC, datetime
    >>> from streamrec.contract import Event
    >>> items = ItemFeatureState()
    >>> shown = Event(event_id="7d3c1d3e-0000-4000-8000-000000000002", event_type="impression",
    ...               user_id="u1", items=["i1", "i2", "i1"], ts=datetime(2026, 1, 2, tzinfo=UTC))
    >>> sorted(items.apply([shown]).changed)
    ['i1', 'i2']
    >>> items.row("i1")["impressions_1h"], items.row("i1")["ctr_1h"]
    (1, 0.047619047619047616)
    """

    def __init__(self, *, allowed_lateness: timedelta = ALLOWED_LATENESS) -> None:
        self.allowed_lateness = allowed_lateness
        self._lateness = _lateness_us(allowed_lateness)
        self._items: dict[str, _Item] = {}

    def apply(self, events: Iterable[Event]) -> Update:
        """Fold a micro-batch in, in arrival order."""
        return self._apply(*_decode(events))

    def _apply(self, events: Sequence[Event], times: list[int], types: list[int]) -> Update:
        items, lateness, count_keys = self._items, self._lateness, _Item.count_keys
        changed: set[str] = set()
        verdicts = [0, 0, 0]
        for event, ts, type_index in zip(events, times, types, strict=True):
            event_id, keys = event.event_id, count_keys(ts, type_index)
            for item_id in event_items(event):
                item = items.get(item_id)
                if item is None:
                    item = items[item_id] = _Item()
                verdict = item.add(event_id, ts, keys, lateness)
                verdicts[verdict] += 1
                if verdict == _ACCEPTED:
                    changed.add(item_id)
        return Update(changed, *verdicts)

    def row(self, item_id: str) -> dict[str, Any]:
        """The current feature row, keyed like the Feast view, with ``event_timestamp``."""
        item = self._items[item_id]
        totals = item.totals()
        values = [item_id, _timestamp(item.anchor), *totals]
        values += (
            smoothed_ctr(totals[w + _CLICK], totals[w + _IMPRESSION])
            for w in range(0, len(totals), _N_TYPES)
        )
        values.append(item.anchor / US_PER_S)
        return dict(zip(_ITEM_ROW, values, strict=True))

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def remembered_ids(self) -> int:
        """Event ids held for deduplication, summed over items (a memory gauge)."""
        return sum(len(i.seen) for i in self._items.values())

    def to_state(self) -> dict[str, Any]:
        return {iid: i.to_state() for iid, i in self._items.items()}

    def load_state(self, state: dict[str, Any]) -> None:
        items = {}
        for iid, data in state.items():
            items[iid] = item = _Item()
            item.load_state(data)
        self._items = items


class RealtimeFeatureEngine:
    """User and item real-time features plus the item categories they need.

    Parameters
    ----------
    catalog_lookup
        Fallback category lookup for items that :meth:`catalog_update` has not fed (for
        example a catalog loaded at start-up); ``None`` for no fallback.
    allowed_lateness
        Events older than an entity's anchor minus this never change its features.

    Examples
    --------
    >>> from datetime import UTC, datetime, timedelta
    >>> from streamrec.contract import Event, Item
    >>> engine = RealtimeFeatureEngine(allowed_lateness=timedelta(minutes=10))
    >>> engine.catalog_update(Item(item_id="i1", title="Boots", category="shoes",
    ...                            created_at=datetime(2025, 1, 1, tzinfo=UTC)))
    set()
    >>> t0 = datetime(2026, 1, 2, 12, tzinfo=UTC)
    >>> def view(n, minutes):
    ...     return Event(event_id=f"7d3c1d3e-0000-4000-8000-00000000000{n}", event_type="view",
    ...                  user_id="u1", item_id="i1", ts=t0 + timedelta(minutes=minutes))
    >>> r = engine.apply([view(1, 0), view(2, 30), view(3, 15), view(4, 27)])
    >>> r.users.applied, r.users.too_late
    (3, 1)
    >>> row = engine.user_row("u1")
    >>> row["views_5m"], row["views_1h"], row["last_category"], row["event_timestamp"].minute
    (2, 3, 'shoes', 30)
    >>> clone = RealtimeFeatureEngine(allowed_lateness=timedelta(minutes=10))
    >>> clone.restore(engine.snapshot())
    >>> clone.user_row("u1") == row
    True
    """

    def __init__(
        self,
        catalog_lookup: Callable[[str], str | None] | None = None,
        *,
        allowed_lateness: timedelta = ALLOWED_LATENESS,
    ) -> None:
        self.allowed_lateness = allowed_lateness
        self._categories: dict[str, str] = {}
        self._catalog_lookup = catalog_lookup
        self.users = UserFeatureState(self.category, allowed_lateness=allowed_lateness)
        self.items = ItemFeatureState(allowed_lateness=allowed_lateness)
        # Users whose newest item had no known category when their row was built, by that
        # item (and the reverse): catalog records travel on their own topic and may come
        # after the events, and then those rows must be built again.
        self._awaiting: dict[str, set[str]] = {}
        self._awaited_by: dict[str, str] = {}

    def apply(self, events: Iterable[Event]) -> ApplyResult:
        """Fold a micro-batch in, in arrival order; report what changed."""
        decoded = _decode(events)
        return ApplyResult(self.users._apply(*decoded), self.items._apply(*decoded))

    def user_row(self, user_id: str) -> dict[str, Any]:
        """Current ``user_realtime`` row; ``KeyError`` for a user never seen."""
        row = self.users.row(user_id)
        recent = row["recent_items"]
        # A category is never empty (the contract), so "" means "not known yet".
        self._await_category(user_id, recent[0] if recent and not row["last_category"] else None)
        return row

    def _await_category(self, user_id: str, item_id: str | None) -> None:
        before = self._awaited_by.get(user_id)
        if before == item_id:
            return
        if before is not None:
            waiting = self._awaiting[before]
            waiting.discard(user_id)
            if not waiting:
                del self._awaiting[before]
            del self._awaited_by[user_id]
        if item_id is not None:
            self._awaited_by[user_id] = item_id
            self._awaiting.setdefault(item_id, set()).add(user_id)

    def item_row(self, item_id: str) -> dict[str, Any]:
        """Current ``item_realtime`` row; ``KeyError`` for an item never seen."""
        return self.items.row(item_id)

    def catalog_update(self, item: Item) -> set[str]:
        """Record an item's category (used by ``last_category`` from the next row on).

        Returns the users whose last row lacked this category, because it was their newest
        item and still unknown: their rows change now, although no event of theirs did.
        """
        self._categories[item.item_id] = item.category
        waiting = self._awaiting.pop(item.item_id, set())
        for user_id in waiting:
            del self._awaited_by[user_id]
        return waiting

    def category(self, item_id: str) -> str | None:
        category = self._categories.get(item_id)
        if category is None and self._catalog_lookup is not None:
            category = self._catalog_lookup(item_id)
        return category

    def snapshot(self) -> bytes:
        """The whole state as versioned JSON of plain values (no pickle)."""
        return orjson.dumps(
            {
                "format": _SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "definitions": fingerprint(),
                "allowed_lateness_us": _lateness_us(self.allowed_lateness),
                "categories": self._categories,
                "users": self.users.to_state(),
                "items": self.items.to_state(),
            }
        )

    def restore(self, data: bytes) -> None:
        """Replace the state with a :meth:`snapshot`; refuse one taken under other rules.

        A different lateness or window definition would make the restored engine disagree
        with its own past (ids already forgotten, buckets already merged), so it is an error.
        """
        state = orjson.loads(data)
        if state.get("format") != _SNAPSHOT_FORMAT or state.get("version") != SNAPSHOT_VERSION:
            raise ValueError(
                f"not a {_SNAPSHOT_FORMAT} snapshot of version {SNAPSHOT_VERSION}: "
                f"format={state.get('format')!r}, version={state.get('version')!r}"
            )
        if state["definitions"] != fingerprint():
            raise ValueError("the snapshot was taken under different feature definitions")
        if state["allowed_lateness_us"] != _lateness_us(self.allowed_lateness):
            raise ValueError(
                f"the snapshot was taken with allowed_lateness="
                f"{timedelta(microseconds=state['allowed_lateness_us'])}, "
                f"this engine uses {self.allowed_lateness}"
            )
        users = UserFeatureState(self.category, allowed_lateness=self.allowed_lateness)
        items = ItemFeatureState(allowed_lateness=self.allowed_lateness)
        users.load_state(state["users"])
        items.load_state(state["items"])
        self._categories, self.users, self.items = state["categories"], users, items
        # Rows written before the snapshot may lack a category the catalog has yet to send.
        self._awaiting, self._awaited_by = {}, {}
        for user_id, item_id in users.newest_items():
            if self.category(item_id) is None:
                self._await_category(user_id, item_id)
