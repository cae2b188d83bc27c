"""What the API showed, logged to Kafka without ever holding up an answer.

A recommendation appends one :class:`Shown` record (a tuple's worth of work) to a
bounded buffer and returns; a background thread turns each into a contract-v1 ``impression``
event (``items`` in shown order, ``request_id``, context, ``ts``) and sends it to
``settings.topic_impressions``, keyed by ``user_id`` like every user event. The online
learner joins these with the clicks that follow.

When Kafka is slow or down the buffer fills and further impressions are *dropped* and
counted (``streamrec_api_impressions_total{outcome="dropped"}``) — losing a few impressions
costs some training labels; blocking or failing recommendations would cost the product.
Records Kafka refuses are counted as ``failed``.

Examples
--------
>>> from datetime import UTC, datetime
>>> from streamrec.contract import Context
>>> shown = Shown("u1", ("i3", "i1"), "req-1", Context(device="mobile", country="de"),
...               datetime(2026, 1, 2, tzinfo=UTC))
>>> event = impression_event(shown)
>>> event.event_type.value, event.items, event.request_id, event.context.device.value
('impression', ['i3', 'i1'], 'req-1', 'mobile')
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from kafka import KafkaProducer
from kafka.errors import KafkaError

from serving.foreground import Foreground
from serving.metrics import ServingMetrics
from streaming.producer import kafka_producer
from streamrec.contract import Context, Event
from streamrec.settings import Settings

__all__ = ["ImpressionLog", "Shown", "impression_event"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Shown:
    """One answered recommendation: who saw which items, in what order, where, when."""

    user_id: str
    items: tuple[str, ...]
    request_id: str
    context: Context | None
    ts: datetime


def impression_event(shown: Shown) -> Event:
    """The contract-v1 ``impression`` event of a :class:`Shown` record."""
    return Event.model_validate(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": "impression",
            "user_id": shown.user_id,
            "items": list(shown.items),
            "ts": shown.ts,
            "request_id": shown.request_id,
            "context": shown.context,
        },
        # The API's own clock stamped it: no skew to guard against.
        context={"max_future_skew": None},
    )


class ImpressionLog:
    """A bounded buffer of :class:`Shown` records drained to Kafka by a producer thread.

    A request only appends to the buffer (no lock, no wake-up); the thread drains it every
    :attr:`DRAIN_S` and the producer batches the records for :attr:`LINGER_MS`. Impressions
    are joined with clicks seconds later, so a fraction of a second of delay costs nothing,
    while waking a thread and sending a produce request per answer would cost every
    request some CPU under load.

    Parameters
    ----------
    settings
        Bootstrap servers, ``topic_impressions``, buffer size and Kafka timeouts.
    metrics
        ``streamrec_api_impressions_total`` by outcome.
    foreground
        Requests in flight: each record is handed to the producer in a moment without one
        (:mod:`serving.foreground`), at most ``settings.serving_background_defer_ms`` after
        the drain began.
    """

    DRAIN_S = 0.1
    LINGER_MS = 100

    def __init__(self, settings: Settings, metrics: ServingMetrics,
                 foreground: Foreground | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.foreground = foreground or Foreground()
        self._buffer: deque[Shown] = deque()
        self._capacity = settings.serving_impression_queue
        self._sent = metrics.impressions.labels(outcome="sent")
        self._dropped = metrics.impressions.labels(outcome="dropped")
        self._failed = metrics.impressions.labels(outcome="failed")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamrec-impressions",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def log(self, shown: Shown) -> bool:
        """Buffer without waiting; ``False`` (and counted as dropped) when the buffer is full."""
        if len(self._buffer) >= self._capacity:
            self._dropped.inc()
            return False
        self._buffer.append(shown)  # deque appends are atomic: no lock on the request path
        return True

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered (within ``timeout_s``), then stop."""
        self._stop.set()
        self._thread.join(timeout=timeout_s + 1)

    def _connect(self) -> KafkaProducer:
        settings = self.settings
        return kafka_producer(
            settings.kafka_bootstrap,
            linger_ms=self.LINGER_MS,
            max_block_ms=settings.api_kafka_max_block_ms,
            delivery_timeout_ms=settings.api_kafka_ack_timeout_ms,
            request_timeout_ms=settings.api_kafka_ack_timeout_ms - self.LINGER_MS,
            client_id="streamrec-api-impressions",
        )

    def _run(self) -> None:
        producer: KafkaProducer | None = None
        backoff = 0.5
        while True:
            stopping = self._stop.wait(self.DRAIN_S)
            deadline = time.monotonic() + self.settings.serving_background_defer_ms / 1000
            while self._buffer:
                if not stopping:
                    self.foreground.quiet(deadline)
                while producer is None:
                    try:
                        producer = self._connect()
                        backoff = 0.5
                    except (KafkaError, OSError) as exc:
                        log.warning("impressions: cannot reach Kafka (%s); retrying in %.1fs",
                                    exc, backoff)
                        if self._stop.wait(backoff):
                            self._failed.inc(len(self._buffer))
                            return
                        backoff = min(backoff * 2, 30.0)
                if not self._send(producer, self._buffer.popleft()):
                    producer.close(timeout=1)
                    producer = None
            if stopping:
                break
        if producer is not None:
            producer.flush(timeout=5)
            producer.close(timeout=5)

    def _send(self, producer: KafkaProducer, shown: Shown) -> bool:
        """Hand one impression to the producer; ``False`` if the producer must be replaced."""
        try:
            value = impression_event(shown).to_json()
        except ValueError as exc:  # a context the contract refuses: count, never crash
            log.warning("impression of request %s not loggable: %s", shown.request_id, exc)
            self._failed.inc()
            return True
        try:
            future = producer.send(self.settings.topic_impressions,
                                   key=shown.user_id.encode(), value=value)
        except KafkaError as exc:
            log.warning("impressions: Kafka did not take a record (%s)", exc)
            self._failed.inc()
            return False
        future.add_callback(lambda _: self._sent.inc())
        future.add_errback(lambda _: self._failed.inc())
        return True
