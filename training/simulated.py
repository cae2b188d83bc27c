"""A streamrec home filled from the simulator, as the running pipeline would have filled it.

Training needs an event log, a catalog and the offline log of real-time features; in a
deployment the archiver and the feature writer produce them from Kafka. For tests,
benchmarks and ``streamrec train`` demonstrations :func:`simulate_home` produces the same
files without a broker, through the same code: the simulator's records go through the
archiver's :class:`~streaming.archiver.Archiver` (same Parquet layout and names), the
real-time engine (:class:`~features.realtime.RealtimeFeatureEngine`) folds the events and
its rows go to Feast's offline folders through
:meth:`~features.store.OnlineFeatureWriter.append_offline`, and every catalog record
becomes an ``item_profile`` row stamped with its creation time.

Rows are written the way the feature writer coalesces them: a user's row after each
``user_flush_s`` of event time in which the user changed, an item's row after each
``item_flush_s`` (items move slowly and an impression touches many). The online store is
not written; batch views (``user_stats``, ``item_stats``, embeddings) stay empty unless
their Spark jobs run on the home afterwards.

Run it from the shell to prepare a home for ``streamrec train``::

    python -m training.simulated --home /tmp/sim --events 200000

Examples
--------
>>> import tempfile
>>> from streamrec.settings import Settings
>>> settings = Settings(home=tempfile.mkdtemp())
>>> apply_repo(settings)  # doctest: +ELLIPSIS
Created project streamrec...
>>> world = simulate_home(settings, SimulatorConfig(n_users=30, n_items=60, n_categories=4),
...                       n_events=400)
>>> world.events, world.user_rows > 0, world.item_rows > 0
(400, True, True)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from features.definitions import TIMESTAMP_FIELD
from features.realtime import RealtimeFeatureEngine
from features.store import OnlineFeatureWriter, apply_repo, registry_exists
from streaming.archiver import (
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    Archiver,
    event_rows,
    events_dir,
    item_rows,
    items_dir,
)
from streaming.consumer import Message
from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Event, Item
from streamrec.settings import Settings

__all__ = ["SimulatedHome", "SimulatorConfig", "profile_row", "simulate_home"]

Progress = Callable[[str], None]

_ROWS_PER_PART = 200_000


@dataclass(frozen=True)
class SimulatedHome:
    """What :func:`simulate_home` wrote."""

    simulator: Simulator
    events: int
    items: int
    start: datetime
    end: datetime
    """Just after the newest event."""
    user_rows: int
    item_rows: int
    seconds: float


def profile_row(item: Item) -> dict[str, Any]:
    """The ``item_profile`` row of a catalog record, valid from its creation."""
    return {
        "item_id": item.item_id,
        TIMESTAMP_FIELD: item.created_at,
        "category": item.category,
        "title": item.title,
        "price": item.price,
        "created_at_s": int(item.created_at.timestamp()),
    }


class _Log:
    """One topic's archive, fed in batches like the archiver's consumer would."""

    def __init__(self, archive: Archiver, topic: str) -> None:
        self.archive = archive
        self.topic = topic
        self.offset = 0
        self.pending: list[Message[Any]] = []

    def add(self, record: Event | Item) -> None:
        self.pending.append(Message(record, self.topic, 0, self.offset, None, b"", 0))
        self.offset += 1

    def flush(self) -> None:
        if self.pending:
            self.archive.write(self.pending)
            self.pending = []


class _OfflineRows:
    """Rows of one view, appended as offline parts named by their sequence (re-runnable)."""

    def __init__(self, writer: OnlineFeatureWriter, view: str) -> None:
        self.writer = writer
        self.view = view
        self.rows: list[dict[str, Any]] = []
        self.parts = 0
        self.written = 0

    def extend(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= _ROWS_PER_PART:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.append_offline(self.view, self.rows, part=f"sim-{self.parts:06d}")
            self.written += len(self.rows)
            self.parts += 1
            self.rows = []


def simulate_home(
    settings: Settings,
    config: SimulatorConfig,
    n_events: int,
    *,
    user_flush_s: float = 1.0,
    item_flush_s: float = 60.0,
    progress: Progress | None = None,
) -> SimulatedHome:
    """Simulate ``n_events`` events into ``settings.home`` (see the module docs).

    Applies the Feast repository first if the home has none. Run it on an empty home: the
    archive and the offline parts of a second run would sit next to the first one's.
    """
    started = time.perf_counter()
    if not registry_exists(settings):
        apply_repo(settings)
    sim = Simulator(config)
    engine = RealtimeFeatureEngine(
        allowed_lateness=timedelta(seconds=settings.feature_allowed_lateness_s)
    )
    events = _Log(
        Archiver(events_dir(settings), EVENT_SCHEMA, event_rows, partition_by_hour=True),
        settings.topic_events,
    )
    catalog = _Log(
        Archiver(items_dir(settings), ITEM_SCHEMA, item_rows, partition_by_hour=False),
        settings.topic_items,
    )
    writer = OnlineFeatureWriter(settings)
    users_out = _OfflineRows(writer, "user_realtime")
    items_out = _OfflineRows(writer, "item_realtime")
    profiles = _OfflineRows(writer, "item_profile")
    n_items = 0

    def add_item(item: Item) -> None:
        nonlocal n_items
        engine.catalog_update(item)
        catalog.add(item)
        profiles.extend([profile_row(item)])
        n_items += 1

    for item in sim.catalog():
        add_item(item)
    tick: list[Event] = []
    tick_end = item_due = -1.0
    dirty_items: set[str] = set()
    n = 0
    first = last = sim.start

    def close_tick() -> None:
        result = engine.apply(tick)
        users_out.extend([engine.user_row(u) for u in result.changed_users])
        dirty_items.update(result.changed_items)
        tick.clear()

    for record in sim.events(n_events):
        if isinstance(record, Item):
            add_item(record)
            continue
        ts = record.ts.timestamp()
        if ts >= tick_end:
            if tick:
                close_tick()
            tick_end = ts + user_flush_s
            if ts >= item_due:
                items_out.extend([engine.item_row(i) for i in dirty_items])
                dirty_items.clear()
                item_due = ts + item_flush_s
        if n == 0:
            first = record.ts
        last = record.ts
        tick.append(record)
        events.add(record)
        n += 1
        if len(events.pending) >= 20_000:
            events.flush()
            if progress is not None:
                progress(f"simulated {n:,} events (event time {record.ts:%Y-%m-%d %H:%M})")
    if tick:
        close_tick()
    items_out.extend([engine.item_row(i) for i in dirty_items])
    for out in (events, catalog, users_out, items_out, profiles):
        out.flush()
    writer.close()
    return SimulatedHome(
        simulator=sim,
        events=n,
        items=n_items,
        start=first,
        end=last + timedelta(microseconds=1),
        user_rows=users_out.written,
        item_rows=items_out.written,
        seconds=time.perf_counter() - started,
    )


def _main(
    home: Annotated[Path, typer.Option(help="The streamrec home to fill (empty).")],
    events: Annotated[int, typer.Option(min=1, help="Events to simulate.")] = 200_000,
    users: Annotated[int, typer.Option(min=1, help="Simulated users.")] = 2_000,
    items: Annotated[int, typer.Option(min=1, help="Initial catalog size.")] = 2_000,
    categories: Annotated[int, typer.Option(min=1, max=20, help="Catalog categories.")] = 16,
    slate: Annotated[int, typer.Option(min=1, max=100, help="Items per impression.")] = 10,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
    start: Annotated[
        datetime, typer.Option(help="Simulated time of the first session (UTC).")
    ] = datetime(2025, 1, 1),
) -> None:
    """Fill HOME from the simulator; print a JSON summary as the last line."""
    settings = Settings(home=home)
    config = SimulatorConfig(
        n_users=users, n_items=items, n_categories=categories, slate_size=slate, seed=seed,
        start=start.replace(tzinfo=start.tzinfo or UTC),
    )
    world = simulate_home(
        settings, config, events, progress=lambda m: print(m, file=sys.stderr, flush=True)
    )
    print(
        json.dumps(
            {
                "events": world.events,
                "items": world.items,
                "start": world.start.isoformat(),
                "end": world.end.isoformat(),
                "user_rows": world.user_rows,
                "item_rows": world.item_rows,
                "total_s": round(world.seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    typer.run(_main)
