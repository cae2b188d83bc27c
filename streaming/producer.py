"""The producer SDK: validated events into Kafka, keyed by ``user_id``, nothing lost silently.

Examples
--------
Against a running broker (``streamrec kafka up``)::

    from streaming.producer import EventProducer

    with EventProducer("127.0.0.1:9092") as producer:
        producer.send({"event_id": "…", "event_type": "view", "user_id": "u1",
                       "item_id": "i1", "ts": "2026-01-02T03:04:05Z"})
    # leaving the block flushes; a record the broker did not acknowledge raises DeliveryError
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from streamrec.contract import Event, Item, parse_event, parse_item

log = logging.getLogger(__name__)

Record = Event | Item
_PRUNE_AT = 50_000


class DeliveryError(Exception):
    """Some records were not acknowledged by the broker.

    ``failures`` pairs each lost record with the error Kafka reported, so the caller can
    retry exactly those.
    """

    def __init__(self, failures: list[tuple[Record, BaseException]]) -> None:
        self.failures = failures
        first = failures[0][1]
        super().__init__(
            f"{len(failures)} record(s) not acknowledged by Kafka; first error: "
            f"{type(first).__name__}: {first}"
        )


@dataclass(frozen=True)
class Delivered:
    """Where the broker stored one record."""

    topic: str
    partition: int
    offset: int


def kafka_producer(bootstrap: str, *, linger_ms: int = 5, max_block_ms: int = 5000,
                   **overrides: Any) -> KafkaProducer:
    """A KafkaProducer configured for durability: ``acks=all``, idempotent, batched.

    Idempotence keeps broker-side retries from writing a record twice; the features are
    idempotent by ``event_id`` anyway, but the raw log stays clean too.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": linger_ms,
        "batch_size": 256 * 1024,
        "max_block_ms": max_block_ms,
        # The client bootstraps eagerly in its constructor; without this an unreachable
        # broker blocks the caller for 30 s instead of max_block_ms.
        "bootstrap_timeout_ms": max_block_ms,
        "request_timeout_ms": 15_000,
        "retries": 5,
        "client_id": "streamrec-producer",
    }
    config.update(overrides)
    return KafkaProducer(**config)


class EventProducer:
    """Sends events (and catalog records) to Kafka with at-least-once delivery.

    Parameters
    ----------
    bootstrap
        Kafka bootstrap servers, comma separated.
    topic
        Destination of :meth:`send`; :meth:`send_item` uses ``items_topic``.
    linger_ms, max_block_ms
        Batching delay, and how long ``send`` may block when the broker is unreachable.
    producer
        An existing ``KafkaProducer`` to wrap (its lifetime stays the caller's).

    ``send`` validates, encodes and hands the record to the client's buffer; the broker's
    acknowledgement arrives later. :meth:`flush` waits for every pending record and raises
    :class:`DeliveryError` naming the ones that failed. Errors are never only logged.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str = "events",
        items_topic: str = "items",
        *,
        linger_ms: int = 5,
        max_block_ms: int = 5000,
        producer: KafkaProducer | None = None,
    ) -> None:
        self.topic = topic
        self.items_topic = items_topic
        self._owns_producer = producer is None
        self._producer = producer or kafka_producer(
            bootstrap, linger_ms=linger_ms, max_block_ms=max_block_ms
        )
        self._lock = threading.Lock()
        self._pending: list[tuple[Record, FutureRecordMetadata]] = []

    def send(self, event: Event | Mapping[str, Any]) -> FutureRecordMetadata:
        """Queue one event (a model or a dict, validated here) keyed by its ``user_id``."""
        ev = event if isinstance(event, Event) else parse_event(dict(event))
        return self._send(self.topic, ev.user_id, ev)

    def send_item(self, item: Item | Mapping[str, Any]) -> FutureRecordMetadata:
        """Queue one catalog record keyed by its ``item_id``."""
        it = item if isinstance(item, Item) else parse_item(dict(item))
        return self._send(self.items_topic, it.item_id, it)

    def send_many(self, records: Iterable[Record]) -> int:
        """Queue many events/items; returns how many were queued."""
        n = 0
        for rec in records:
            if isinstance(rec, Item):
                self.send_item(rec)
            else:
                self.send(rec)
            n += 1
        return n

    def _send(self, topic: str, key: str, record: Record) -> FutureRecordMetadata:
        future = self._producer.send(topic, key=key.encode(), value=record.to_json())
        with self._lock:
            self._pending.append((record, future))
            if len(self._pending) >= _PRUNE_AT:
                # Long runs without flush (simulators, replays) would otherwise hold every
                # record; acknowledged ones need no more tracking, failed ones do.
                self._pending = [
                    (r, f) for r, f in self._pending if not f.is_done or f.failed()
                ]
        return future

    def flush(self, timeout: float | None = 30.0) -> list[Delivered]:
        """Wait for every queued record; raise :class:`DeliveryError` if any was lost."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            log.warning("flush did not complete: %s", exc)
        with self._lock:
            pending, self._pending = self._pending, []
        delivered: list[Delivered] = []
        failures: list[tuple[Record, BaseException]] = []
        for record, future in pending:
            if not future.is_done:
                failures.append((record, TimeoutError("no acknowledgement before flush timeout")))
            elif future.failed():
                failures.append((record, future.exception))
            else:
                md = future.value
                delivered.append(Delivered(md.topic, md.partition, md.offset))
        if failures:
            raise DeliveryError(failures)
        return delivered

    @property
    def pending(self) -> int:
        """Records queued since the last :meth:`flush`."""
        with self._lock:
            return len(self._pending)

    def close(self, timeout: float = 10.0) -> None:
        if self._owns_producer:
            self._producer.close(timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()
