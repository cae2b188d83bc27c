"""Labels from the stream: impressions joined with the actions that follow them, in event time.

An impression (``event_type="impression"``, ``items`` in shown order, ``request_id``) opens
one *slot* per shown item: (request, item, position). A later click, add-to-cart or
purchase by the same user on that item within the attribution window
(``STREAMREC_LABEL_ATTRIBUTION_WINDOW_S``, 30 min) labels the slot positive; a slot whose
window has closed without one is a negative. Each slot yields exactly one
:class:`LabelledExample`.

Attribution
    An action that carries ``request_id`` matches that request's slot only. One without it
    goes to the *last touch*: the newest open slot of (user, item) whose window holds the
    action. Views are not actions here (a view follows every click on a slate).

Event time, lateness and duplicates (:class:`LabelJoiner`)
    The watermark is the newest event time seen. A slot closes when the watermark passes
    ``impression + window + allowed_lateness``: the extra slack
    (``STREAMREC_FEATURE_ALLOWED_LATENESS_S``, the feature engine's rule) lets an action
    that arrives a little late still count. An impression older than
    ``watermark - allowed_lateness`` is too late and dropped (the actions it needed may
    already be forgotten). An action that arrives before its impression (the two come
    through different topics) waits up to the allowed lateness for it. An action for a
    slot that has already closed is counted in :attr:`LabelJoiner.stats`
    (``late_actions``), never emitted again. A re-delivered ``event_id`` changes nothing.

Online and batch
    Online (``streamrec worker learner``) positives are emitted at once, so the learner
    adapts within seconds; their ``action`` is the action that labelled them. Batch
    labelling (:func:`label_event_log`) holds positives until their slot closes, so
    ``action`` is the strongest one of the window (purchase > add to cart > click). The
    label itself is the same either way.

The labelled-examples table
    :func:`label_event_log` feeds the archived event log of a window through the joiner and
    writes ``<home>/offline/labelled_examples/date=YYYY-MM-DD/hour=HH/labels.parquet``
    (:data:`LABEL_SCHEMA`), one file per UTC hour of impression time: labelling a window
    again replaces its hours, so overlapping runs never duplicate an example.

Sampled negatives (no impressions)
    A cold system or a replayed public dataset has interactions but no impressions. For a
    window without a single impression, every interaction (a view counts, for replays that
    only have views) becomes a positive "request" of its own (``request_id``
    ``sampled:<event_id>``; repeats of the same item by the user within the attribution
    window only strengthen its ``action``), and ``STREAMREC_LABEL_SAMPLED_NEGATIVES``
    catalog items that existed at that moment, drawn with probability ∝ (interactions in
    the window + 1) ** 0.75, stand in as its negatives. Such rows are flagged
    ``sampled=True`` and have ``position = -1``. They teach "what this user picks over
    what the catalog offers", not "what they click among what was shown": a model trained
    on them leans on popularity more than one trained on impressions.

Examples
--------
>>> from datetime import UTC, datetime, timedelta
>>> t0 = datetime(2026, 1, 2, 12, tzinfo=UTC)
>>> def event(n, kind, minutes, **fields):
...     return Event(event_id=f"00000000-0000-4000-8000-{n:012d}", event_type=kind,
...                  user_id="u1", ts=t0 + timedelta(minutes=minutes), **fields)
>>> joiner = LabelJoiner(attribution_window_s=1800, allowed_lateness_s=600)
>>> joiner.add(event(1, "impression", 0, items=["a", "b", "c"], request_id="r1"))
[]
>>> [(x.item_id, x.label, x.action) for x in joiner.add(event(2, "click", 1, item_id="b"))]
[('b', 1, 'click')]
>>> joiner.add(event(2, "click", 1, item_id="b"))  # a duplicate changes nothing
[]
>>> late = joiner.add(event(3, "view", 45, item_id="z"))  # watermark: 45 min > 0 + 30 + 10
>>> sorted((x.item_id, x.position, x.label) for x in late)
[('a', 0, 0), ('c', 2, 0)]
>>> joiner.stats.positives, joiner.stats.negatives, joiner.stats.duplicates
(1, 2, 1)
"""

from __future__ import annotations

import heapq
import math
import os
import uuid
import zlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.archiver import EVENT_SCHEMA, event_log_dirs, load_catalog
from streamrec.contract import Context, Device, Event, EventType
from streamrec.settings import Settings, get_settings

__all__ = [
    "ACTION_TYPES",
    "LABEL_SCHEMA",
    "LabelJoiner",
    "LabelStats",
    "LabelledExample",
    "event_log_end",
    "examples_table",
    "label_event_log",
    "labels_dir",
    "read_event_log",
    "read_labelled_examples",
]

ACTION_TYPES: tuple[EventType, ...] = (
    EventType.CLICK,
    EventType.ADD_TO_CART,
    EventType.PURCHASE,
)
"""Actions that label a shown item positive, weakest first."""

_STRENGTH = {t.value: n for n, t in enumerate((EventType.VIEW, *ACTION_TYPES))}

LABEL_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("request_id", pa.string()),
        ("position", pa.int32()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("label", pa.int8()),
        ("action", pa.string()),
        ("device", pa.string()),
        ("country", pa.string()),
        ("sampled", pa.bool_()),
    ]
)
"""Columns of the labelled-examples table (``ts``: the impression's event time)."""

_HOUR = timedelta(hours=1)
_FILE = "labels.parquet"


@dataclass(frozen=True, slots=True)
class LabelledExample:
    """One shown item and whether the user acted on it.

    Parameters
    ----------
    user_id, item_id, request_id
        Who was shown what, in which request.
    position
        0-based slot in the shown list (``-1`` for sampled negatives and their positive).
    ts
        The impression's event time (UTC): the moment features must be taken *before*.
    label
        1 when an action followed within the attribution window, else 0.
    action
        ``None`` or the action type: ``"click"``, ``"add_to_cart"``, ``"purchase"``
        (``"view"`` too for sampled rows).
    device, country
        The impression's context, ``None`` when unknown.
    """

    user_id: str
    item_id: str
    request_id: str
    position: int
    ts: datetime
    label: int
    action: str | None
    device: str | None
    country: str | None


@dataclass
class LabelStats:
    """What a :class:`LabelJoiner` did with its events (exported as worker metrics)."""

    events: int = 0
    duplicates: int = 0
    impressions: int = 0
    slots: int = 0
    positives: int = 0
    negatives: int = 0
    late_impressions: int = 0
    """Impressions older than the watermark minus the allowed lateness: dropped."""
    late_actions: int = 0
    """Actions inside a slot's window that arrived after the slot had closed."""
    unattributed_actions: int = 0
    """Actions that followed no impression of the item (organic browsing)."""


@dataclass(slots=True)
class _Slot:
    user_id: str
    item_id: str
    request_id: str
    position: int
    ts: datetime
    ts_s: float
    device: str | None
    country: str | None
    action: str | None = None
    emitted: bool = False

    def example(self) -> LabelledExample:
        return LabelledExample(
            self.user_id,
            self.item_id,
            self.request_id,
            self.position,
            self.ts,
            int(self.action is not None),
            self.action,
            self.device,
            self.country,
        )


@dataclass(frozen=True, slots=True)
class _Action:
    event_id: str
    kind: str
    ts_s: float
    request_id: str | None


_Key = tuple[str, str]


@dataclass
class _Closed:
    """Slots that have closed, remembered a while to recognise late actions."""

    by_pair: dict[_Key, list[tuple[float, str]]] = field(default_factory=dict)
    heap: list[tuple[float, int, _Key]] = field(default_factory=list)


class LabelJoiner:
    """Incremental, event-time join of impressions with later actions into labels.

    Feed events in arrival order with :meth:`add`; each call returns the examples that
    became final. :meth:`flush` ends the stream: every open slot is emitted (unlabelled
    ones as negatives). Memory is bounded by the slots and actions of the last
    ``attribution_window_s + allowed_lateness_s`` of event time.

    Parameters
    ----------
    attribution_window_s
        How long after an impression an action still labels it; default
        ``Settings.label_attribution_window_s``.
    allowed_lateness_s
        Extra event time a slot stays open for late actions; default
        ``Settings.feature_allowed_lateness_s``.
    emit_positives_at_once
        ``True`` (online): a positive is emitted with the first action that labels it.
        ``False`` (batch): it waits for its slot to close and carries the strongest action.

    Examples
    --------
    >>> from datetime import UTC, datetime, timedelta
    >>> t0 = datetime(2026, 1, 2, tzinfo=UTC)
    >>> joiner = LabelJoiner(1800, allowed_lateness_s=60, emit_positives_at_once=False)
    >>> shown = Event(event_id="00000000-0000-4000-8000-000000000001",
    ...               event_type="impression", user_id="u", items=["a", "b"],
    ...               request_id="r", ts=t0)
    >>> def act(n, kind, minutes):
    ...     return Event(event_id=f"00000000-0000-4000-8000-00000000000{n}", event_type=kind,
    ...                  user_id="u", item_id="a", request_id="r",
    ...                  ts=t0 + timedelta(minutes=minutes))
    >>> joiner.add(shown) + joiner.add(act(2, "click", 1)) + joiner.add(act(3, "purchase", 9))
    []
    >>> sorted((x.item_id, x.label, x.action) for x in joiner.flush())
    [('a', 1, 'purchase'), ('b', 0, None)]
    """

    def __init__(
        self,
        attribution_window_s: float | None = None,
        *,
        allowed_lateness_s: float | None = None,
        emit_positives_at_once: bool = True,
    ) -> None:
        if attribution_window_s is None or allowed_lateness_s is None:
            settings = get_settings()
            if attribution_window_s is None:
                attribution_window_s = settings.label_attribution_window_s
            if allowed_lateness_s is None:
                allowed_lateness_s = settings.feature_allowed_lateness_s
        if attribution_window_s <= 0 or allowed_lateness_s < 0:
            raise ValueError("the window must be positive and the lateness not negative")
        self.window_s = float(attribution_window_s)
        self.lateness_s = float(allowed_lateness_s)
        self.emit_positives_at_once = emit_positives_at_once
        self.stats = LabelStats()
        self.watermark_s = -math.inf
        self._seq = 0
        self._slots: dict[_Key, _Slot] = {}  # (request_id, item_id)
        self._open: dict[_Key, list[_Key]] = {}  # (user_id, item_id) -> slot keys
        self._closing: list[tuple[float, int, _Key]] = []  # (close time, seq, slot key)
        self._closed = _Closed()
        self._waiting: dict[_Key, list[_Action]] = {}  # (user_id, item_id) -> early actions
        self._waiting_heap: list[tuple[float, int, _Key]] = []
        self._seen: dict[str, float] = {}
        self._seen_heap: list[tuple[float, str]] = []

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> LabelJoiner:
        """A joiner with the window and lateness of ``settings``."""
        return cls(
            settings.label_attribution_window_s,
            allowed_lateness_s=settings.feature_allowed_lateness_s,
            **options,
        )

    @property
    def horizon_s(self) -> float:
        """Event time a slot (and everything that may still touch it) stays in memory."""
        return self.window_s + self.lateness_s

    def open_slots(self) -> int:
        """Slots waiting for their window to close."""
        return len(self._slots)

    # --- input --------------------------------------------------------------------------

    def add(self, event: Event) -> list[LabelledExample]:
        """Fold one event in; return the examples that became final."""
        self.stats.events += 1
        ts_s = event.ts.timestamp()
        if event.event_id in self._seen:
            self.stats.duplicates += 1
            return []
        if ts_s >= self.watermark_s - self.horizon_s:
            # Older events cannot touch an open slot; forgetting their ids is safe.
            self._seen[event.event_id] = ts_s
            heapq.heappush(self._seen_heap, (ts_s, event.event_id))
        self.watermark_s = max(self.watermark_s, ts_s)
        out: list[LabelledExample] = []
        if event.event_type is EventType.IMPRESSION:
            self._impression(event, ts_s, out)
        elif event.event_type.value in _STRENGTH and event.event_type is not EventType.VIEW:
            self._action(event, ts_s, out)
        self._advance(out)
        return out

    def add_many(self, events: Iterable[Event]) -> list[LabelledExample]:
        """:meth:`add` for each event, in order; all the examples that became final."""
        out: list[LabelledExample] = []
        for event in events:
            out += self.add(event)
        return out

    def flush(self) -> list[LabelledExample]:
        """End of input: emit every open slot (unlabelled ones as negatives)."""
        out: list[LabelledExample] = []
        for _, _, key in sorted(self._closing):
            self._close(key, out)
        self._closing.clear()
        for actions in self._waiting.values():
            self.stats.unattributed_actions += len(actions)
        self._waiting.clear()
        self._waiting_heap.clear()
        return out

    # --- impressions and actions ----------------------------------------------------------

    def _impression(self, event: Event, ts_s: float, out: list[LabelledExample]) -> None:
        if ts_s < self.watermark_s - self.lateness_s:
            self.stats.late_impressions += 1
            return
        self.stats.impressions += 1
        request = event.request_id or event.event_id
        ctx = event.context
        device = ctx.device.value if ctx is not None and ctx.device is not None else None
        country = ctx.country if ctx is not None else None
        close_s = ts_s + self.horizon_s
        for position, item in enumerate(event.shown_items):
            key = (request, item)
            if key in self._slots:
                continue  # a repeated item, or the same request logged twice
            slot = _Slot(event.user_id, item, request, position, event.ts, ts_s, device, country)
            self._slots[key] = slot
            self._open.setdefault((event.user_id, item), []).append(key)
            heapq.heappush(self._closing, (close_s, self._next(), key))
            self.stats.slots += 1
            for action in self._waiting.pop((event.user_id, item), ()):
                if self._fits(slot, action):
                    self._label(slot, action.kind, out)
                else:
                    self._wait((event.user_id, item), action)

    def _action(self, event: Event, ts_s: float, out: list[LabelledExample]) -> None:
        assert event.item_id is not None  # the contract requires it for actions
        pair = (event.user_id, event.item_id)
        action = _Action(event.event_id, event.event_type.value, ts_s, event.request_id)
        slot = self._match(pair, action)
        if slot is not None:
            self._label(slot, action.kind, out)
        elif self._matched_closed(pair, action):
            self.stats.late_actions += 1
        elif ts_s >= self.watermark_s - self.lateness_s:
            self._wait(pair, action)
        else:
            self.stats.unattributed_actions += 1

    def _fits(self, slot: _Slot, action: _Action) -> bool:
        if action.request_id is not None and action.request_id != slot.request_id:
            return False
        return slot.ts_s <= action.ts_s <= slot.ts_s + self.window_s

    def _match(self, pair: _Key, action: _Action) -> _Slot | None:
        if action.request_id is not None:
            slot = self._slots.get((action.request_id, pair[1]))
            ok = slot is not None and slot.user_id == pair[0] and self._fits(slot, action)
            return slot if ok else None
        best: _Slot | None = None
        for key in self._open.get(pair, ()):
            slot = self._slots[key]
            if self._fits(slot, action) and (best is None or slot.ts_s > best.ts_s):
                best = slot
        return best

    def _matched_closed(self, pair: _Key, action: _Action) -> bool:
        return any(
            (action.request_id is None or action.request_id == request)
            and ts_s <= action.ts_s <= ts_s + self.window_s
            for ts_s, request in self._closed.by_pair.get(pair, ())
        )

    def _label(self, slot: _Slot, kind: str, out: list[LabelledExample]) -> None:
        if slot.emitted:
            return
        if slot.action is None or _STRENGTH[kind] > _STRENGTH[slot.action]:
            slot.action = kind
        if self.emit_positives_at_once:
            slot.emitted = True
            self.stats.positives += 1
            out.append(slot.example())

    def _wait(self, pair: _Key, action: _Action) -> None:
        self._waiting.setdefault(pair, []).append(action)
        heapq.heappush(self._waiting_heap, (action.ts_s, self._next(), pair))

    # --- time -----------------------------------------------------------------------------

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _advance(self, out: list[LabelledExample]) -> None:
        """Close slots and forget state the watermark has passed."""
        watermark = self.watermark_s
        while self._closing and self._closing[0][0] < watermark:
            self._close(heapq.heappop(self._closing)[2], out)
        early = watermark - self.lateness_s
        while self._waiting_heap and self._waiting_heap[0][0] < early:
            _, _, pair = heapq.heappop(self._waiting_heap)
            actions = self._waiting.get(pair)
            if not actions:
                continue
            keep = [a for a in actions if a.ts_s >= early]
            self.stats.unattributed_actions += len(actions) - len(keep)
            if keep:
                self._waiting[pair] = keep
            else:
                del self._waiting[pair]
        forget = watermark - self.horizon_s
        while self._seen_heap and self._seen_heap[0][0] < forget:
            _, event_id = heapq.heappop(self._seen_heap)
            self._seen.pop(event_id, None)
        closed = self._closed
        while closed.heap and closed.heap[0][0] < watermark:
            _, _, pair = heapq.heappop(closed.heap)
            kept = [
                c for c in closed.by_pair.get(pair, ()) if self._remember_until(c[0]) >= watermark
            ]
            if kept:
                closed.by_pair[pair] = kept
            else:
                closed.by_pair.pop(pair, None)

    def _close(self, key: _Key, out: list[LabelledExample]) -> None:
        slot = self._slots.pop(key)
        pair = (slot.user_id, slot.item_id)
        keys = self._open[pair]
        keys.remove(key)
        if not keys:
            del self._open[pair]
        if not slot.emitted:
            if slot.action is None:
                self.stats.negatives += 1
            else:
                self.stats.positives += 1
            out.append(slot.example())
        self._closed.by_pair.setdefault(pair, []).append((slot.ts_s, slot.request_id))
        heapq.heappush(self._closed.heap, (self._remember_until(slot.ts_s), self._next(), pair))

    def _remember_until(self, ts_s: float) -> float:
        """Watermark until which a closed slot is kept to recognise late actions: one more
        horizon after it closed."""
        return ts_s + self.horizon_s + self.horizon_s


# --- the archived event log ---------------------------------------------------------------


def _hours(start: datetime, end: datetime) -> Iterator[datetime]:
    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while hour < end:
        yield hour
        hour += _HOUR


def read_event_log(settings: Settings, start: datetime, end: datetime) -> pa.Table:
    """Archived events (client events and served impressions) with ``start <= ts < end``.

    Columns of :data:`~streaming.archiver.EVENT_SCHEMA`, in event-time order (ties in
    archive order). Only the ``date=/hour=`` folders of the range are read.
    """
    files = [
        path
        for root in event_log_dirs(settings)
        for hour in _hours(start, end)
        for path in sorted((root / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}").glob("part-*"))
    ]
    if not files:
        return EVENT_SCHEMA.empty_table()
    table = _between(pa.concat_tables(pq.read_table(f, schema=EVENT_SCHEMA) for f in files),
                     start, end)
    return table.sort_by([("ts", "ascending"), ("kafka_partition", "ascending"),
                          ("kafka_offset", "ascending")])


def event_log_end(settings: Settings) -> datetime | None:
    """Just after the newest archived event (``None`` for an empty log).

    Reads only the newest ``date=/hour=`` folder of each archive.
    """
    newest: datetime | None = None
    for root in event_log_dirs(settings):
        hours = sorted(root.glob("date=*/hour=*")) if root.is_dir() else []
        for folder in reversed(hours):
            files = sorted(folder.glob("part-*"))
            if not files:
                continue
            top = max(pc.max(pq.read_table(f, columns=["ts"])["ts"]).as_py() for f in files)
            if newest is None or top > newest:
                newest = top
            break
    return None if newest is None else newest.astimezone(UTC) + timedelta(microseconds=1)


def _between(table: pa.Table, start: datetime, end: datetime) -> pa.Table:
    """Rows with ``start <= ts < end``."""
    stamps = table["ts"]
    return table.filter(
        pc.and_(
            pc.greater_equal(stamps, pa.scalar(start, stamps.type)),
            pc.less(stamps, pa.scalar(end, stamps.type)),
        )
    )


def _events(table: pa.Table) -> Iterator[Event]:
    """Archived rows as events, without validating them again (the archiver did)."""
    contexts: dict[tuple[Any, ...], Context] = {}
    for row in table.select(
        ["event_id", "event_type", "user_id", "item_id", "items", "ts", "device", "country",
         "request_id", "position"]
    ).to_pylist():
        ctx_key = (row["device"], row["country"])
        ctx = contexts.get(ctx_key)
        if ctx is None:
            ctx = contexts[ctx_key] = Context.model_construct(
                device=Device(row["device"]) if row["device"] else None,
                country=row["country"],
            )
        yield Event.model_construct(
            event_id=row["event_id"],
            event_type=EventType(row["event_type"]),
            user_id=row["user_id"],
            item_id=row["item_id"],
            items=row["items"],
            ts=row["ts"],
            context=ctx,
            request_id=row["request_id"],
            position=row["position"],
        )


def examples_table(examples: Iterable[LabelledExample], *, sampled: bool = False) -> pa.Table:
    """Examples as a :data:`LABEL_SCHEMA` table."""
    rows = list(examples)
    return pa.table(
        {
            "user_id": pa.array([x.user_id for x in rows], pa.string()),
            "item_id": pa.array([x.item_id for x in rows], pa.string()),
            "request_id": pa.array([x.request_id for x in rows], pa.string()),
            "position": pa.array([x.position for x in rows], pa.int32()),
            "ts": pa.array([x.ts for x in rows], pa.timestamp("us", tz="UTC")),
            "label": pa.array([x.label for x in rows], pa.int8()),
            "action": pa.array([x.action for x in rows], pa.string()),
            "device": pa.array([x.device for x in rows], pa.string()),
            "country": pa.array([x.country for x in rows], pa.string()),
            "sampled": pa.array([sampled] * len(rows), pa.bool_()),
        },
        schema=LABEL_SCHEMA,
    )


def labels_dir(settings: Settings) -> Path:
    """The labelled-examples table: ``<home>/offline/labelled_examples``."""
    return settings.home / "offline" / "labelled_examples"


def _hour_folder(settings: Settings, hour: datetime) -> Path:
    return labels_dir(settings) / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}"


def _sampled_examples(
    settings: Settings, log: pa.Table, start: datetime, end: datetime
) -> list[LabelledExample]:
    """Interactions as positives with catalog negatives (windows without impressions)."""
    window_s = settings.label_attribution_window_s
    positives: list[LabelledExample] = []
    open_at: dict[_Key, tuple[float, int]] = {}
    for event in _events(log):
        if event.event_type is EventType.IMPRESSION or event.item_id is None:
            continue
        if not start <= event.ts < end:
            continue
        ts_s = event.ts.timestamp()
        pair = (event.user_id, event.item_id)
        opened = open_at.get(pair)
        kind = event.event_type.value
        if opened is not None and ts_s - opened[0] <= window_s:
            first = positives[opened[1]]
            if _STRENGTH[kind] > _STRENGTH[first.action or "view"]:
                positives[opened[1]] = _replace_action(first, kind)
            continue
        open_at[pair] = (ts_s, len(positives))
        ctx = event.context
        positives.append(
            LabelledExample(
                event.user_id, event.item_id, f"sampled:{event.event_id}", -1, event.ts, 1,
                kind, ctx.device.value if ctx and ctx.device else None,
                ctx.country if ctx else None,
            )
        )
    if not positives:
        return []
    catalog = load_catalog(settings).to_pydict()
    created = {i: c.timestamp() for i, c in zip(catalog["item_id"], catalog["created_at"],
                                                 strict=True)}
    counts: dict[str, int] = {}
    for x in positives:
        counts[x.item_id] = counts.get(x.item_id, 0) + 1
    items = sorted(set(created) | set(counts), key=lambda i: (created.get(i, -math.inf), i))
    born = [created.get(i, -math.inf) for i in items]
    weights = (np.array([counts.get(i, 0) for i in items], dtype=np.float64) + 1.0) ** 0.75
    cum = np.cumsum(weights)
    # Seeded by the window: labelling it again draws the very same negatives.
    rng = np.random.default_rng(zlib.crc32(f"{start.isoformat()}|{end.isoformat()}".encode()))
    k = settings.label_sampled_negatives
    out: list[LabelledExample] = []
    for x in positives:
        available = max(bisect_right(born, x.ts.timestamp()), 1)
        draws = np.searchsorted(cum[:available], rng.random(k) * cum[available - 1], "right")
        out.append(x)
        for d in np.minimum(draws, available - 1).tolist():
            item = items[d]
            if item == x.item_id:
                item = items[(d + 1) % available]
            out.append(
                LabelledExample(x.user_id, item, x.request_id, -1, x.ts, 0, None, x.device,
                                x.country)
            )
    return out


def _replace_action(x: LabelledExample, kind: str) -> LabelledExample:
    return LabelledExample(x.user_id, x.item_id, x.request_id, x.position, x.ts, x.label, kind,
                           x.device, x.country)


def label_event_log(settings: Settings, start: datetime, end: datetime) -> pa.Table:
    """Label the impressions of ``[start, end)`` from the archived event log and store them.

    The window is widened to whole UTC hours. Events up to ``end + window + lateness``
    are read, so label a window only once the log reaches that far (the examples are final
    then). Windows without any impression get sampled negatives (module docs). Each hour
    of the window is written to ``labels_dir(settings)``, replacing what was there (an
    hour without examples loses its file).

    Returns
    -------
    pyarrow.Table
        The window's examples (:data:`LABEL_SCHEMA`), in impression-time order.
    """
    start = next(_hours(start, end), start.astimezone(UTC))
    hours = list(_hours(start, end))
    if not hours:
        return LABEL_SCHEMA.empty_table()
    end = hours[-1] + _HOUR
    joiner = LabelJoiner.from_settings(settings, emit_positives_at_once=False)
    log = read_event_log(settings, start, end + timedelta(seconds=joiner.horizon_s))
    has_impressions = pc.any(pc.equal(log["event_type"], EventType.IMPRESSION.value)).as_py()
    if has_impressions:
        examples = [x for x in joiner.add_many(_events(log)) + joiner.flush()
                    if start <= x.ts < end]
        table = examples_table(examples)
    else:
        table = examples_table(_sampled_examples(settings, log, start, end), sampled=True)
    table = table.sort_by([("ts", "ascending"), ("request_id", "ascending"),
                           ("position", "ascending")])
    for hour in hours:
        _replace_hour(_hour_folder(settings, hour), _between(table, hour, hour + _HOUR))
    return table


def _replace_hour(folder: Path, part: pa.Table) -> None:
    target = folder / _FILE
    if not part.num_rows:
        target.unlink(missing_ok=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{_FILE}.{uuid.uuid4().hex}.tmp"  # readers skip dot-files
    try:
        pq.write_table(part, temporary, compression="zstd")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def read_labelled_examples(settings: Settings, start: datetime, end: datetime) -> pa.Table:
    """Stored examples with ``start <= ts < end`` (:data:`LABEL_SCHEMA`), in time order."""
    files = [
        path
        for hour in _hours(start, end)
        if (path := _hour_folder(settings, hour) / _FILE).is_file()
    ]
    if not files:
        return LABEL_SCHEMA.empty_table()
    table = _between(pa.concat_tables(pq.read_table(f, schema=LABEL_SCHEMA) for f in files),
                     start, end)
    return table.sort_by([("ts", "ascending"), ("request_id", "ascending"),
                          ("position", "ascending")])
