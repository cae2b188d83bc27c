"""The consumer runtime every stream worker runs on: at-least-once, DLQ, clean shutdown.

A worker supplies two plain functions — ``decode(bytes) -> T`` and
``handle(batch: list[Message[T]]) -> list[Failure]`` — and :class:`StreamConsumer` does the
rest:

* polls batches from a consumer group (manual commits only);
* records that ``decode`` rejects go to ``<topic>.dlq`` with the reason;
* ``handle`` gets the decoded batch; records it reports as failed go to the DLQ too;
  if it *raises*, the batch is retried with backoff (a transient outage must not lose data),
  and after ``max_retries`` the batch is split record by record so one poison record lands in
  the DLQ instead of blocking its partition forever;
* offsets are committed only after the handler succeeded **and** the DLQ records were
  acknowledged — so a crash at any point re-delivers, never skips (at-least-once; the
  handlers make the effect exactly-once by deduplicating on ``event_id``);
* SIGTERM/SIGINT finish the current batch, commit and exit.

DLQ records keep the original key and bytes unchanged (so they can be replayed as they
were) and carry the reason and the source position in headers::

    dlq.error          "ts: Value error, must carry a zone offset"
    dlq.error.type     "validation" | "handler"
    dlq.source.topic / dlq.source.partition / dlq.source.offset
    dlq.group          the consumer group that rejected it
    dlq.failed.at      RFC 3339 time of the failure

Examples
--------
::

    consumer = StreamConsumer(
        settings, topics=["events"], group_id="feature-writer",
        decode=parse_event, handle=lambda batch: [],
    )
    consumer.run()          # until SIGTERM
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, NamedTuple, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from streaming.producer import kafka_producer
from streamrec.contract import describe_error
from streamrec.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Message(NamedTuple, Generic[T]):
    """A decoded record with the position it came from.

    A named tuple rather than a frozen dataclass: just as immutable, and built four times
    faster, which counts once per record in every worker.
    """

    value: T
    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes
    timestamp_ms: int


@dataclass(frozen=True)
class Failure:
    """A record the handler could not process, and why (goes to the DLQ)."""

    message: Message[Any]
    error: str


@dataclass
class ConsumerStats:
    """Counters a worker exports (and tests read)."""

    consumed: int = 0
    handled: int = 0
    dead_lettered: int = 0
    batches: int = 0
    commits: int = 0
    retries: int = 0
    lag: dict[str, int] = field(default_factory=dict)

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


Handler = Callable[[list[Message[T]]], Sequence[Failure]]
OnAssign = Callable[[set[TopicPartition]], Mapping[TopicPartition, int | None]]
Decoder = Callable[[bytes], T]


class _Rebalance(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the positions the worker's own output recorded."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        on_assign: OnAssign | None,
    ) -> None:
        self._consumer = consumer
        self._on_assign = on_assign

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Batches are handled and committed synchronously between polls: nothing in flight.
        pass

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._on_assign is None or not assigned:
            return
        for tp, position in self._on_assign(set(assigned)).items():
            if position is None:
                log.info("replaying %s:%d from the beginning", tp.topic, tp.partition)
                self._consumer.seek_to_beginning(tp)
            else:
                log.info("resuming %s:%d at offset %d from the worker's own output",
                         tp.topic, tp.partition, position)
                self._consumer.seek(tp, position)


class StreamConsumer(Generic[T]):
    """Runs ``decode`` + ``handle`` over a consumer group with at-least-once semantics.

    Parameters
    ----------
    settings
        Bootstrap servers, batch size, poll timeout and DLQ naming come from here.
    topics
        Topics to subscribe to; each record's DLQ is ``settings.dlq_topic(record.topic)``.
    group_id
        Consumer group: replicas with the same id share the partitions.
    decode
        Turns raw bytes into ``T``; an exception means the record is invalid (→ DLQ).
    handle
        Processes a decoded batch; returns the records it rejected. Raising means
        "try again later" (→ retry with backoff, then isolate the poison record).
    max_retries, backoff_s
        How often and how patiently a failing batch is retried before being split.
    max_batch_wait_s
        Keep polling until a batch holds ``settings.consumer_batch_size`` records or this
        long has passed (0: handle whatever one poll returns). Sinks that write files want
        large batches; latency-sensitive workers want 0.
    on_assign
        For workers whose output keeps its own offsets (files named by offset, state
        snapshots): called with newly assigned partitions, returns the positions to resume
        from (``None``: the beginning of the partition). Those positions win over the
        group's committed offsets, which makes the effect exactly-once even when a crash
        came between the write and the commit.
    after_commit
        Called with the committed positions after every commit — the moment a worker can
        record its own state as consistent with exactly those offsets.
    on_idle
        Called after a poll that returned nothing, for workers that hold records back
        (event-time alignment) and must release them once the input has gone quiet.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        group_id: str,
        decode: Decoder[T],
        handle: Handler[T],
        *,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        lag_every_s: float = 5.0,
        max_batch_wait_s: float = 0.0,
        on_assign: OnAssign | None = None,
        after_commit: Callable[[dict[TopicPartition, int]], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.group_id = group_id
        self.decode = decode
        self.handle = handle
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.lag_every_s = lag_every_s
        self.max_batch_wait_s = max_batch_wait_s
        self.after_commit = after_commit
        self.on_idle = on_idle
        self.stats = ConsumerStats()
        self._stop = threading.Event()
        config: dict[str, Any] = {
            "bootstrap_servers": settings.kafka_bootstrap.split(","),
            "group_id": group_id,
            "client_id": f"streamrec-{group_id}",
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": settings.consumer_batch_size,
            "fetch_max_bytes": 32 * 1024 * 1024,
            "max_partition_fetch_bytes": 8 * 1024 * 1024,
            "session_timeout_ms": 10_000,
            "heartbeat_interval_ms": 3_000,
        }
        config.update(consumer_config or {})
        self._consumer = KafkaConsumer(**config)
        self._consumer.subscribe(self.topics, listener=_Rebalance(self._consumer, on_assign))
        self._dlq = kafka_producer(settings.kafka_bootstrap, linger_ms=0)
        self._last_lag = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish its current batch, commit and return."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT → :meth:`stop` (call from the main thread)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(
        self, *, max_idle_s: float | None = None, until: Callable[[], bool] | None = None
    ) -> ConsumerStats:
        """Consume until stopped, ``until()`` is true, or ``max_idle_s`` without records."""
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                n = self.poll_once()
                now = time.monotonic()
                if n:
                    idle_since = now
                elif max_idle_s is not None and now - idle_since >= max_idle_s:
                    break
                if until is not None and until():
                    break
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            self._dlq.close(timeout=10)
        finally:
            self._consumer.close(autocommit=False)

    def assignment(self) -> set[TopicPartition]:
        """Partitions this consumer currently owns."""
        return set(self._consumer.assignment())

    def caught_up(self, tp: TopicPartition) -> bool:
        """Whether everything the broker had for ``tp`` at the last fetch was polled.

        Uses the high watermark of the last fetch response, so it costs no request.
        """
        high = self._consumer.highwater(tp)
        return high is not None and self._consumer.position(tp) >= high

    def records_behind(self, topics: Collection[str] | None = None) -> int:
        """Records the broker held beyond what was polled, at the last fetch of each partition.

        Like :meth:`caught_up` it costs no request; partitions not fetched yet count 0.
        ``topics`` limits the sum to the partitions of those topics.
        """
        behind = 0
        for tp in self._consumer.assignment():
            if topics is not None and tp.topic not in topics:
                continue
            high = self._consumer.highwater(tp)
            if high is not None:
                behind += max(0, high - self._consumer.position(tp))
        return behind

    # -- one batch ---------------------------------------------------------------------
    def poll_once(self) -> int:
        """Poll, process and commit one batch; returns the number of records seen."""
        polled = self._poll_batch()
        records = [r for part in polled.values() for r in part]
        if records:
            self.stats.consumed += len(records)
            self._process(records)
            self._commit(polled)
            self.stats.batches += 1
        elif self.on_idle is not None:
            self.on_idle()
        if time.monotonic() - self._last_lag >= self.lag_every_s:
            self._update_lag()
        return len(records)

    def _poll_batch(self) -> dict[TopicPartition, list[ConsumerRecord]]:
        limit = self.settings.consumer_batch_size
        deadline = time.monotonic() + self.max_batch_wait_s
        batch: dict[TopicPartition, list[ConsumerRecord]] = {}
        size = 0
        while True:
            polled = self._consumer.poll(
                timeout_ms=self.settings.consumer_poll_timeout_ms, max_records=limit - size
            )
            for tp, recs in polled.items():
                batch.setdefault(tp, []).extend(recs)
                size += len(recs)
            if size >= limit or time.monotonic() >= deadline or self._stop.is_set():
                return batch

    def _process(self, records: list[ConsumerRecord]) -> None:
        good: list[Message[T]] = []
        dead: list[tuple[Message[Any], str, str]] = []
        for rec in records:
            try:
                value: Any = self.decode(rec.value)
                ok = True
            except Exception as exc:  # any decode failure is the record's fault → DLQ
                value, ok = describe_error(exc), False
            msg = Message(value, rec.topic, rec.partition, rec.offset, rec.key, rec.value,
                          rec.timestamp)
            if ok:
                good.append(msg)
            else:
                dead.append((msg, value, "validation"))
        if good:
            dead.extend((f.message, f.error, "handler") for f in self._handle_with_retries(good))
            self.stats.handled += len(good)
        if dead:
            self._dead_letter(dead)

    def _handle_with_retries(self, batch: list[Message[T]]) -> list[Failure]:
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                return list(self.handle(batch))
            except Exception as exc:
                if self._stop.is_set() and attempt > 0:
                    raise  # shutting down: leave the batch uncommitted for the next owner
                self.stats.retries += 1
                log.warning("handler failed on a batch of %d (attempt %d/%d): %s",
                            len(batch), attempt + 1, self.max_retries + 1, exc)
                last = exc
                if attempt < self.max_retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
        if len(batch) == 1:
            return [Failure(batch[0], describe_error(last))]
        log.error("isolating the failing record(s) of a batch of %d", len(batch))
        failures: list[Failure] = []
        for msg in batch:
            try:
                failures.extend(self.handle([msg]))
            except Exception as exc:
                failures.append(Failure(msg, describe_error(exc)))
        return failures

    def _dead_letter(self, dead: list[tuple[Message[Any], str, str]]) -> None:
        failed_at = datetime.now(UTC).isoformat().encode()
        futures = []
        for rec, error, kind in dead:
            headers = [
                ("dlq.error", error.encode()[:16_000]),
                ("dlq.error.type", kind.encode()),
                ("dlq.source.topic", rec.topic.encode()),
                ("dlq.source.partition", str(rec.partition).encode()),
                ("dlq.source.offset", str(rec.offset).encode()),
                # Every group that consumes a topic reports what it could not process.
                ("dlq.group", self.group_id.encode()),
                ("dlq.failed.at", failed_at),
            ]
            futures.append(
                self._dlq.send(self.settings.dlq_topic(rec.topic), key=rec.key,
                               value=rec.raw, headers=headers)
            )
        self._dlq.flush()
        for f in futures:
            f.get(timeout=30)  # raises: an unacknowledged DLQ write must not be committed past
        self.stats.dead_lettered += len(dead)

    def _commit(self, polled: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        offsets = {
            tp: OffsetAndMetadata(recs[-1].offset + 1, "", -1)
            for tp, recs in polled.items() if recs
        }
        self._consumer.commit(offsets)
        self.stats.commits += 1
        if self.after_commit is not None:
            self.after_commit({tp: om.offset for tp, om in offsets.items()})

    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        assigned = list(self._consumer.assignment())
        if not assigned:
            return
        try:
            ends = self._consumer.end_offsets(assigned)
        except KafkaError as exc:
            log.debug("lag not updated: %s", exc)
            return
        self.stats.lag = {
            f"{tp.topic}:{tp.partition}": max(0, ends[tp] - self._consumer.position(tp))
            for tp in assigned if tp in ends
        }

