"""The feature writer: events → real-time features in Feast, exactly-once in effect.

It consumes ``events`` and ``impressions`` (what the API served: contract-v1 impression
events, which Spark's event log counts too, so stream and batch features agree) and ``items``
(for the categories behind ``last_category``), merges the partitions of both event topics in
event time (:mod:`streaming.alignment`: a backlog must not make on-time
events look late), folds each micro-batch into
:class:`features.realtime.RealtimeFeatureEngine`, and
upserts the rows of every user and item the batch changed into Feast's online store
(``user_realtime``, ``item_realtime``). Every row carries the event time of the newest
event it includes, so freshness is measurable and point-in-time joins are correct.

Crash safety — state and offsets move together:

* After a commit, when ``snapshot_interval_s`` has passed (and at shutdown), the writer
  stores one file: the engine's snapshot plus the exact offsets it reflects
  (``<home>/state/feature-writer.snapshot``, written atomically).
* On (re)start it restores that snapshot and resumes every partition at the snapshot's
  offset — not at the group's committed offset, which may be ahead. Events between the
  snapshot and the crash are replayed into the restored state; the engine deduplicates by
  ``event_id``, so nothing counts twice and nothing is lost. Without a snapshot it replays
  each partition from the beginning, rebuilding the state from the retained log.
* Replayed rows are rewritten to the online store (the store keeps the newest row per
  entity), and the offline log part written after snapshot *n* is named after *n*, so a
  replay replaces it instead of adding duplicate rows.

Scale-out: item aggregates need every event of an item, and events are keyed by user, so
this worker is deployed as ONE replica per topic (it still reads all partitions). Running
several replicas would split item counts between them.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
from kafka import TopicPartition

from features.definitions import ITEM_VIEW, USER_VIEW, epoch_us
from features.realtime import RealtimeFeatureEngine
from features.store import OnlineFeatureWriter
from streaming.alignment import EventTimeAligner
from streaming.consumer import Failure, Message, StreamConsumer
from streaming.metrics import (
    FEATURE_EVENTS,
    FEATURE_ROWS,
    FRESHNESS,
    WorkerReporter,
    status_folder,
)
from streamrec.contract import Event, Item, parse_canonical_event, parse_event, parse_item
from streamrec.settings import Settings

log = logging.getLogger(__name__)

_MAGIC = b"streamrec.feature-writer.v1\n"


_GC_THRESHOLDS = (200_000, 20, 100)

_ITEM_WRITE_CHUNK = 1_000
"""Item rows per write while input keeps coming: ~50 ms of SQLite writes."""


def tune_gc() -> None:
    """Make CPython's cyclic garbage collector cheap for this long-running writer.

    Each event allocates a dozen tracked objects (the validated event, its context, the
    batch records), most of which live until their batch is folded in, so they survive the
    young generation and push the collector into full collections that scan the whole heap,
    every imported library included, to find almost nothing: with the default thresholds
    that was a third of the writer's CPU. Freezing what exists at start (modules, Feast's
    registry) and collecting the young generation every 200,000 allocations instead of 700
    (more than a full batch keeps alive, so most of a batch's objects are gone before the
    collector looks) brings it to 1-2 %. The writer's own objects form no reference cycles;
    the few that libraries leave behind are still collected, by the older generations.
    Process-wide, hence called where the worker starts.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


def snapshot_path(settings: Settings) -> Path:
    return settings.home / "state" / "feature-writer.snapshot"


@dataclass
class WriterStats:
    """What the writer did, for logs, metrics and tests."""

    events: int = 0
    duplicates: int = 0
    too_late: int = 0
    user_rows: int = 0
    item_rows: int = 0
    snapshots: int = 0
    # Per event: its event time → the moment its features were committed online. Bounded,
    # so a long-running worker keeps the recent distribution only.
    freshness_ms: deque[float] = field(default_factory=lambda: deque(maxlen=500_000))


def write_snapshot(
    path: Path, sequence: int, offsets: Mapping[TopicPartition, int], engine_state: bytes
) -> None:
    """One file: a JSON header line with the offsets, then the engine's own snapshot."""
    header = orjson.dumps(
        {
            "sequence": sequence,
            "offsets": [[tp.topic, tp.partition, off] for tp, off in sorted(offsets.items())],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(_MAGIC + header + b"\n" + engine_state)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_snapshot(path: Path) -> tuple[int, dict[TopicPartition, int], bytes] | None:
    """``(sequence, offsets, engine_state)`` of a snapshot file, ``None`` when absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path} is not a feature-writer snapshot")
    header, _, state = data[len(_MAGIC) :].partition(b"\n")
    meta = orjson.loads(header)
    offsets = {TopicPartition(t, p): o for t, p, o in meta["offsets"]}
    return int(meta["sequence"]), offsets, state


class FeatureWriter:
    """Folds events into real-time features and writes them to Feast (see module doc).

    Parameters
    ----------
    settings
        Topics, home folder (snapshot, offline log) and the Feast configuration.
    allowed_lateness
        Events older than an entity's newest event by more than this are counted as too
        late and change nothing (they are still archived by the archiver).
    snapshot_interval_s
        How often state + offsets are persisted; also bounds the replay after a crash.

    User rows are written when ``feature_flush_interval_ms`` has passed since the last
    write, or at once when the input is drained — so a quiet stream is written per event
    batch and a busy one coalesces each user's updates within the interval. Item rows are
    written every ``feature_item_flush_interval_ms``, drained or not, and while input keeps
    coming a round of them is spread over the next batches, ``_ITEM_WRITE_CHUNK`` rows each,
    so it never holds the next user rows up for long. Items get the longer interval: an
    impression touches ten of them, and their hour- and day-long counts move slowly, while
    a user's click must reach the ranker within a second (written per poll at 5,000
    events/s, items cost most of the writer's time). A writer far behind its input (a
    restart, a replay, a burst) — at least ``feature_backlog_flush_interval_ms`` of input
    at its current rate — stretches the user interval to that and the item interval by
    the same factor: its rows are that stale anyway, and each entity is then written once
    per couple of seconds instead of five times a second, so the backlog drains faster.
    Nearer the head the configured intervals hold, so a live stream that falls a little
    behind (a loaded machine) stays as fresh as it can. Events are never held back for
    this: they are applied as they come; only the online writes coalesce.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        allowed_lateness: timedelta | None = None,
        snapshot_interval_s: float | None = None,
        writer: OnlineFeatureWriter | None = None,
    ) -> None:
        self.settings = settings
        lateness = allowed_lateness or timedelta(seconds=settings.feature_allowed_lateness_s)
        self.engine = RealtimeFeatureEngine(allowed_lateness=lateness)
        self.writer = writer or OnlineFeatureWriter(settings, exclusive=True)
        self.snapshot_interval_s = (
            settings.feature_snapshot_interval_s
            if snapshot_interval_s is None
            else snapshot_interval_s
        )
        self.flush_interval_s = settings.feature_flush_interval_ms / 1000
        self.item_flush_interval_s = settings.feature_item_flush_interval_ms / 1000
        self.backlog_flush_interval_s = settings.feature_backlog_flush_interval_ms / 1000
        self.stats = WriterStats()
        self._path = snapshot_path(settings)
        self._sequence = 0
        self._committed: dict[TopicPartition, int] = {}
        self._aligner: EventTimeAligner[Event] = EventTimeAligner()
        self._consumer: StreamConsumer[Event | Item] | None = None
        self._last_snapshot = time.monotonic()
        self._offline_users: list[dict[str, Any]] = []
        self._offline_items: list[dict[str, Any]] = []
        # Entities changed since the last online write: under load one row per entity per
        # flush instead of one per batch, the main lever on write volume.
        self._dirty_users: set[str] = set()
        # Items in the order they first changed: a round spread over several writes takes
        # the longest-waiting first, so none waits for more than a round.
        self._dirty_items: dict[str, None] = {}
        self._unwritten_ts: list[float] = []
        self._users_flushed = self._items_flushed = time.monotonic()
        self._rate = 0.0  # events/s applied between the last two user flushes

    # -- consumer hooks ----------------------------------------------------------------
    def decode(self, raw: bytes) -> Event | Item:
        # Events in the wire form producers write take the contract's fast path; the rest
        # (catalog records, other valid forms, invalid records) the full validators.
        event = parse_canonical_event(raw)
        if event is not None:
            return event
        data = orjson.loads(raw)
        return parse_event(data) if "event_type" in data else parse_item(data)

    def on_assign(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Restore the snapshot (once) and resume every partition where it left off."""
        # Every assigned partition is rewound below, so records held for alignment would
        # only come again.
        self._aligner = EventTimeAligner()
        snap = read_snapshot(self._path)
        if snap is None:
            log.info("no snapshot: rebuilding feature state from the beginning of the log")
            return dict.fromkeys(assigned)
        sequence, offsets, state = snap
        if sequence != self._sequence or not self._committed:
            self.engine.restore(state)
            self._sequence = sequence
            self._committed = dict(offsets)
            self._offline_users.clear()
            self._offline_items.clear()
            log.info(
                "restored feature state of snapshot %d (%d partitions)", sequence, len(offsets)
            )
        return {tp: offsets.get(tp) for tp in assigned}

    def handle(self, batch: list[Message[Event | Item]]) -> list[Failure]:
        per_partition: dict[tuple[str, int], list[tuple[int, int, Event]]] = {}
        for m in batch:
            value = m.value
            if isinstance(value, Item):
                # Catalog records only feed lookups; they need no event-time order. A user
                # row built before its newest item's category was known is written again.
                self._dirty_users |= self.engine.catalog_update(value)
            else:
                per_partition.setdefault((m.topic, m.partition), []).append(
                    (epoch_us(value.ts), m.offset, value)
                )
        for (topic, partition), records in per_partition.items():
            self._aligner.add(TopicPartition(topic, partition), records)
        self.release()
        return []

    @property
    def event_topics(self) -> tuple[str, str]:
        """The topics whose records are events: client events and served impressions."""
        return self.settings.topic_events, self.settings.topic_impressions

    def release(self) -> None:
        """Apply what event-time alignment lets through; write rows when the flush is due."""
        if self._consumer is not None and len(self._aligner):
            topics = self.event_topics
            assigned = {tp for tp in self._consumer.assignment() if tp.topic in topics}
            released = self._aligner.release(assigned, self._consumer.caught_up)
            if released:
                events = [r.value for r in released]
                result = self.engine.apply(events)
                self._dirty_users |= result.changed_users
                self._dirty_items.update(dict.fromkeys(result.changed_items))
                self._unwritten_ts.extend(e.ts.timestamp() for e in events)
                self.stats.events += result.users.applied
                self.stats.duplicates += result.users.duplicates
                self.stats.too_late += result.users.too_late
                FEATURE_EVENTS.labels("applied").inc(result.users.applied)
                FEATURE_EVENTS.labels("duplicate").inc(result.users.duplicates)
                FEATURE_EVENTS.labels("too_late").inc(result.users.too_late)
        drained = self._drained()
        now = time.monotonic()
        stretch = 1.0 if drained else self._stretch()
        if (self._unwritten_ts or self._dirty_users) and (
            drained or now - self._users_flushed >= self.flush_interval_s * stretch
        ):
            self._flush_users()
        if self._dirty_items and now - self._items_flushed >= self.item_flush_interval_s * stretch:
            # Busy, the round of item writes is spread over the next batches, a chunk each,
            # so that it never holds the users' next rows up for long; idle, it is written
            # at once (a quiet stream's items are online within the interval).
            self._flush_items(None if drained else _ITEM_WRITE_CHUNK)

    def _stretch(self) -> float:
        """By how much a writer far behind its input stretches its flush intervals (>= 1).

        At least ``backlog_flush_interval_s`` behind — event records behind (both event
        topics; the catalog is not in the rate) over the current rate — the user interval
        becomes that long and the item interval grows by the same factor.
        """
        if self._consumer is None or self.flush_interval_s <= 0:
            return 1.0
        # Before the first write has measured a rate, the rate since start: a writer that
        # starts behind its input coalesces from its first write on.
        rate = self._rate or len(self._unwritten_ts) / max(
            time.monotonic() - self._users_flushed, 1e-3
        )
        if rate <= 0:
            return 1.0
        behind = self._consumer.records_behind(self.event_topics) + len(self._aligner)
        if behind / rate < self.backlog_flush_interval_s:
            return 1.0
        return max(1.0, self.backlog_flush_interval_s / self.flush_interval_s)

    def _drained(self) -> bool:
        if self._consumer is None:
            return True
        caught_up = self._consumer.caught_up
        return not len(self._aligner) and all(caught_up(tp) for tp in self._consumer.assignment())

    def flush(self) -> None:
        """Write the rows of every entity changed since the last write, once each."""
        self._flush_users()
        self._flush_items()

    def _flush_users(self) -> None:
        rows = [self.engine.user_row(u) for u in self._dirty_users]
        if rows:
            self.writer.write(USER_VIEW.name, rows)
            self._offline_users.extend(rows)
            self.stats.user_rows += len(rows)
            FEATURE_ROWS.labels(USER_VIEW.name).inc(len(rows))
        written = time.time()
        # Freshness is the user view's: what the ranker needs within a second of a click.
        delays = [written - ts for ts in self._unwritten_ts]
        self.stats.freshness_ms.extend(d * 1000 for d in delays)
        for d in delays:
            FRESHNESS.observe(d)
        now = time.monotonic()
        self._rate = len(delays) / max(now - self._users_flushed, 1e-3)
        self._dirty_users.clear()
        self._unwritten_ts.clear()
        self._users_flushed = now

    def _flush_items(self, limit: int | None = None) -> None:
        """Write the changed items' rows, or ``limit`` of them; the round ends with the last."""
        dirty = self._dirty_items
        chosen = list(dirty if limit is None else islice(dirty, limit))
        rows = [self.engine.item_row(i) for i in chosen]
        if rows:
            self.writer.write(ITEM_VIEW.name, rows)
            self._offline_items.extend(rows)
            self.stats.item_rows += len(rows)
            FEATURE_ROWS.labels(ITEM_VIEW.name).inc(len(rows))
        for item_id in chosen:
            del dirty[item_id]
        if not dirty:
            self._items_flushed = time.monotonic()

    def after_commit(self, positions: dict[TopicPartition, int]) -> None:
        self._committed.update(positions)
        if time.monotonic() - self._last_snapshot >= self.snapshot_interval_s:
            self.snapshot()

    def _positions(self) -> dict[TopicPartition, int]:
        """Offsets the state reflects: records still held by the aligner are not in it."""
        out = dict(self._committed)
        for tp in out:
            held = self._aligner.position(tp)
            if held is not None:
                out[tp] = held
        return out

    # -- state ---------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Write pending rows and this interval's offline log part, then state + offsets."""
        self.flush()
        part = f"s{self._sequence:010d}"
        if self._offline_users:
            self.writer.append_offline(USER_VIEW.name, self._offline_users, part=part)
        if self._offline_items:
            self.writer.append_offline(ITEM_VIEW.name, self._offline_items, part=part)
        self._offline_users.clear()
        self._offline_items.clear()
        self._sequence += 1
        write_snapshot(self._path, self._sequence, self._positions(), self.engine.snapshot())
        self._last_snapshot = time.monotonic()
        self.stats.snapshots += 1

    # -- running -------------------------------------------------------------------------
    def consumer(self) -> StreamConsumer[Event | Item]:
        s = self.settings
        self._consumer = StreamConsumer(
            # A backlog is folded in (and committed) up to feature_batch_size records at a
            # time; a live stream's polls return far fewer.
            s.model_copy(update={"consumer_batch_size": s.feature_batch_size}),
            [s.topic_events, s.topic_impressions, s.topic_items],
            s.feature_writer_group,
            self.decode,
            self.handle,
            on_assign=self.on_assign,
            after_commit=self.after_commit,
            on_idle=self.release,
            # Smaller per-partition fetches keep partitions close in event time (alignment).
            consumer_config={"max_partition_fetch_bytes": 512 * 1024},
        )
        return self._consumer

    def status(self) -> dict[str, Any]:
        """Worker-specific fields of the periodic status line."""
        recent = list(self.stats.freshness_ms)[-20_000:]
        out: dict[str, Any] = {
            "events": self.stats.events,
            "too_late": self.stats.too_late,
            "duplicates": self.stats.duplicates,
            "user_rows": self.stats.user_rows,
            "item_rows": self.stats.item_rows,
        }
        if recent:
            recent.sort()
            out["freshness_p50_ms"] = round(recent[len(recent) // 2], 1)
            out["freshness_p99_ms"] = round(recent[int(len(recent) * 0.99)], 1)
        return out

    def run(
        self,
        *,
        max_idle_s: float | None = None,
        install_signals: bool = True,
        consumer: StreamConsumer[Event | Item] | None = None,
        metrics_port: int = 0,
    ) -> WriterStats:
        """Consume until SIGTERM (or ``max_idle_s`` without input); snapshot on the way out."""
        tune_gc()
        consumer = consumer or self._consumer or self.consumer()
        if install_signals:
            consumer.install_signal_handlers()
        reporter = WorkerReporter("features", consumer.stats, extra=self.status,
                                  status_dir=status_folder(self.settings))
        reporter.start(metrics_port)
        try:
            consumer.run(max_idle_s=max_idle_s)
        finally:
            reporter.stop()
            if self._committed:
                self.snapshot()
            self.writer.close()
        return self.stats
