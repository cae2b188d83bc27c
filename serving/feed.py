"""The API's own view of the live event stream: trending counts and recent purchases.

:class:`EventFeed` is a background thread with a plain ``KafkaConsumer`` *without a
consumer group*: every API replica reads every partition of the ``events`` topic for
itself (a shared group would give each replica only a share of the traffic), commits
nothing, and on start seeks to ``serving_trending_lookback_s`` ago so its counts are warm
within seconds. Kafka being down only delays it: it retries with backoff and the API keeps
answering from what it has.

Records are read leniently (``orjson`` and the handful of fields needed, no full contract
validation): the feature writer is the component that dead-letters bad records; here a
record that does not parse is just skipped.

Examples
--------
>>> trending, purchases = TrendingCounts(half_life_s=600), RecentPurchases()
>>> apply_record(b'{"event_type": "purchase", "user_id": "u1", "item_id": "i9", '
...              b'"ts": "2026-01-02T03:04:05Z", "context": {"device": "mobile"}}',
...              trending, purchases)
True
>>> trending.refresh(5); trending.top(ALL), purchases.of("u1")
((('i9', 4.0),), frozenset({'i9'}))
>>> apply_record(b"not json", trending, purchases)
False
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from functools import partial
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from serving.foreground import Foreground
from serving.metrics import ServingMetrics
from serving.trending import ALL, RecentPurchases, TrendingCounts, event_weight
from streamrec.settings import Settings

__all__ = ["EventFeed", "apply_record"]

log = logging.getLogger(__name__)

_TOP_N = 500
"""Items kept per scope's top list: candidates need tens, the fallback a few hundred."""

_FETCH_MIN_BYTES = 1 << 20
"""Enough records (~3,000 events) that a busy topic is read in a few fetches a second."""

_STEP = 100
"""Records decoded and folded in one go (~1 ms) while requests are in flight: the unit of
work that yields to them."""

_MAX_POLL = 5000
"""Records taken in one poll with no request in flight. Polls of 100 cost ~25% more CPU
per record than polls of 5,000 (200k records: 2.0-2.1 s vs 1.5-1.8 s), which matters when
the feed catches up on the lookback at start."""


def apply_record(raw: bytes, trending: TrendingCounts, purchases: RecentPurchases) -> bool:
    """Count one ``events`` record; ``False`` (and nothing counted) if it does not parse."""
    try:
        record: Any = orjson.loads(raw)
        event_type = record["event_type"]
        ts_s = datetime.fromisoformat(record["ts"]).timestamp()
        user_id = record["user_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return False
    weight = event_weight(event_type)
    item_id = record.get("item_id")
    if not weight or not isinstance(item_id, str):
        return True  # impressions say nothing about popularity
    context = record.get("context") or {}
    device = context.get("device") if isinstance(context, dict) else None
    country = context.get("country") if isinstance(context, dict) else None
    trending.add(
        item_id, weight, ts_s=ts_s,
        device=device if isinstance(device, str) else None,
        country=country.upper() if isinstance(country, str) else None,
    )
    if event_type == "purchase" and isinstance(user_id, str):
        purchases.add(user_id, item_id)
    return True


class EventFeed:
    """Feeds :class:`TrendingCounts` and :class:`RecentPurchases` from Kafka in a thread.

    Parameters
    ----------
    settings
        Bootstrap servers, the ``events`` topic, lookback and half-life.
    trending, purchases
        What the feed fills.
    metrics
        Counts the events read.
    refresh_s
        Top lists are recomputed at most this often.
    fetch_wait_ms
        The broker holds a fetch until it has a batch's worth of records or this long has
        passed. A fetch costs the client about as much as decoding a hundred records, so
        at a thousand events a second answering each fetch at once (Kafka's default) cost
        ~7x the CPU of the batched reads; counts are still at most this much later.
    foreground
        Requests in flight: records are decoded and folded, and top lists re-ranked, in
        steps that wait for a moment without one (:mod:`serving.foreground`), at most
        ``settings.serving_background_defer_ms`` behind.
    """

    def __init__(
        self,
        settings: Settings,
        trending: TrendingCounts,
        purchases: RecentPurchases,
        metrics: ServingMetrics,
        *,
        refresh_s: float = 0.5,
        fetch_wait_ms: int = 200,
        foreground: Foreground | None = None,
    ) -> None:
        self.settings = settings
        self.foreground = foreground or Foreground()
        self.defer_s = settings.serving_background_defer_ms / 1000
        self.trending = trending
        self.purchases = purchases
        self.metrics = metrics
        self.refresh_s = refresh_s
        self.fetch_wait_ms = fetch_wait_ms
        self.events = 0
        self._stop = threading.Event()
        self._live = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamrec-event-feed",
                                        daemon=True)

    @property
    def live(self) -> bool:
        """True once the feed has caught up with the topic at least once."""
        return self._live.is_set()

    def wait_live(self, timeout: float) -> bool:
        """Block until :attr:`live` (for tests and start-up scripts)."""
        return self._live.wait(timeout)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                consumer = self._connect()
            except (KafkaError, OSError) as exc:
                log.warning("trending feed cannot reach Kafka (%s); retrying in %.1fs",
                            exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if consumer is None:  # the topic does not exist (yet)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            try:
                self._consume(consumer)
            except KafkaError as exc:
                log.warning("trending feed lost Kafka (%s); reconnecting", exc)
            finally:
                consumer.close()

    def _connect(self) -> KafkaConsumer | None:
        settings = self.settings
        consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            client_id="streamrec-api-trending",
            max_poll_records=_MAX_POLL,
            fetch_min_bytes=_FETCH_MIN_BYTES,
            fetch_max_wait_ms=self.fetch_wait_ms,
            request_timeout_ms=20_000,
            # Fail fast and let the loop retry: a stop request is noticed between attempts.
            bootstrap_timeout_ms=2_000,
            reconnect_backoff_max_ms=2_000,
        )
        partitions = consumer.partitions_for_topic(settings.topic_events)
        if not partitions:
            consumer.close()
            return None
        tps = [TopicPartition(settings.topic_events, p) for p in sorted(partitions)]
        consumer.assign(tps)
        since_ms = int((time.time() - settings.serving_trending_lookback_s) * 1000)
        starts = consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        ends = consumer.end_offsets(tps)
        for tp in tps:
            found = starts.get(tp)
            # No record at or after the moment: nothing recent on that partition.
            consumer.seek(tp, found.offset if found is not None else ends[tp])
        log.info("trending feed reading %s from %.0fs ago", settings.topic_events,
                 settings.serving_trending_lookback_s)
        return consumer

    def _consume(self, consumer: KafkaConsumer) -> None:
        last_refresh = 0.0
        quiet = self.foreground.quiet
        deadline: float | None = None  # set while records may be waiting in the client
        while not self._stop.is_set():
            if deadline is None:
                deadline = time.monotonic() + self.defer_s
            quiet(deadline)
            # Records are decoded as they are polled: a step at a time while requests are
            # in flight, all that was fetched when none is.
            step = _STEP if self.foreground.in_flight else _MAX_POLL
            polled = consumer.poll(timeout_ms=200, max_records=step)
            read = 0
            for records in polled.values():
                for record in records:
                    apply_record(record.value, self.trending, self.purchases)
                read += len(records)
            if read:
                self.events += read
                self.metrics.trending_events.inc(read)
            now = time.monotonic()
            if now - last_refresh >= self.refresh_s or not read:
                # Decayed top lists are as good a moment later: off the requests' turns.
                self.trending.refresh(_TOP_N, pause=partial(quiet, deadline))
                last_refresh = now
            if read < step:  # drained: the next records start a new wait
                deadline = None
            if not read and not self._live.is_set() and self._caught_up(consumer):
                self._live.set()
                log.info("trending feed live: %d events, %d items trending", self.events,
                         len(self.trending.top(ALL)))

    @staticmethod
    def _caught_up(consumer: KafkaConsumer) -> bool:
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None and consumer.position(tp) < high:
                return False
        return True
