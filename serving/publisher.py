"""The API's link to Kafka: one shared producer, connected on first use, replaced after a failure.

A web process must start and answer while Kafka is down, tell its clients quickly that
their records were not stored, and pick Kafka up again by itself. :class:`Publisher`
does that around a plain ``KafkaProducer``: nothing connects until the first
:meth:`~Publisher.publish`; an attempt that cannot reach the broker fails within
``api_kafka_max_block_ms``; every record's acknowledgement is awaited at most
``api_kafka_ack_timeout_ms``; and any failure discards the producer so that the next call
builds a fresh one.

Examples
--------
Nothing listens on the port, so the call fails fast instead of raising::

    >>> from streaming.broker import free_port
    >>> from streamrec.settings import Settings
    >>> publisher = Publisher(Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}",
    ...                                api_kafka_max_block_ms=200))
    >>> [type(o).__name__ for o in publisher.publish("events", [(b"u1", b"{}")])]
    ['KafkaUnavailable']
    >>> publisher.connected
    False
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streaming.producer import Delivered, kafka_producer
from streamrec.settings import Settings

log = logging.getLogger(__name__)

ProducerFactory = Callable[[Settings], KafkaProducer]
Outcome = Delivered | Exception


class KafkaUnavailable(Exception):
    """Kafka could not be reached or did not take the records in time."""


def explain(exc: Exception) -> str:
    """One line naming the error once (kafka-python's messages already start with it)."""
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, KafkaUnavailable) or text.startswith(name):
        return text
    return f"{name}: {text}" if text else name


def api_producer(settings: Settings) -> KafkaProducer:
    """A durable producer (acks=all, idempotent) tuned for a client waiting on an answer.

    Connecting and waiting for metadata give up after ``api_kafka_max_block_ms``, and every
    record resolves (acknowledged or failed) within ``api_kafka_ack_timeout_ms``, so a flush
    never hangs past it and a discarded producer closes promptly.
    """
    ack_ms = settings.api_kafka_ack_timeout_ms
    return kafka_producer(
        settings.kafka_bootstrap,
        linger_ms=settings.producer_linger_ms,
        max_block_ms=settings.api_kafka_max_block_ms,
        bootstrap_timeout_ms=settings.api_kafka_max_block_ms,
        delivery_timeout_ms=ack_ms,
        request_timeout_ms=ack_ms - settings.producer_linger_ms,
        client_id="streamrec-api",
    )


class Publisher:
    """Sends key/value records to Kafka and reports, per record, whether the broker stored it.

    Parameters
    ----------
    settings
        Bootstrap servers and the ``api_kafka_*`` timeouts.
    factory
        Builds the ``KafkaProducer``; called on first use and again after each failure.

    Thread-safe: requests share one producer (Kafka batches their records together).
    Blocking: call it from a worker thread, never from the event loop.
    """

    def __init__(self, settings: Settings, factory: ProducerFactory = api_producer) -> None:
        self._settings = settings
        self._factory = factory
        self._lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._closed = False
        self._finished_attempts = 0
        self._last_error: KafkaUnavailable | None = None
        # Past the producer's own delivery timeout; only reached if the client misbehaves.
        self._flush_timeout_s = settings.api_kafka_ack_timeout_ms / 1000 + 1.0

    @property
    def connected(self) -> bool:
        """True while a producer built by the last successful connection is in use."""
        return self._producer is not None

    def publish(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> list[Outcome]:
        """Send ``(key, value)`` records to ``topic`` and wait for their acknowledgements.

        Returns one outcome per record, in order: :class:`~streaming.producer.Delivered`
        once the broker acknowledged it, otherwise the exception that explains why not.
        Kafka trouble never raises.
        """
        try:
            producer = self._acquire()
        except KafkaUnavailable as exc:
            return [exc] * len(records)
        futures = []
        stopped: Exception | None = None
        for key, value in records:
            try:
                futures.append(producer.send(topic, key=key, value=value))
            except KafkaError as exc:
                # Metadata or buffer space did not arrive within max_block_ms; every further
                # send would wait just as long for the same reason.
                stopped = KafkaUnavailable(
                    f"Kafka did not take records for topic {topic!r} ({explain(exc)})"
                )
                break
        try:
            producer.flush(timeout=self._flush_timeout_s)
        except KafkaError as exc:
            log.warning("flush did not complete: %s", exc)
        outcomes: list[Outcome] = []
        for future in futures:
            if not future.is_done:
                outcomes.append(TimeoutError("no acknowledgement from Kafka in time"))
            elif future.failed():
                outcomes.append(future.exception)
            else:
                md = future.value
                outcomes.append(Delivered(md.topic, md.partition, md.offset))
        if stopped is not None:
            outcomes.extend([stopped] * (len(records) - len(futures)))
        if any(isinstance(o, Exception) for o in outcomes):
            self._discard(producer)
        return outcomes

    def _acquire(self) -> KafkaProducer:
        finished = self._finished_attempts
        with self._lock:
            if self._closed:
                raise KafkaUnavailable("the API is shutting down")
            if self._producer is not None:
                return self._producer
            if self._finished_attempts != finished and self._last_error is not None:
                # Another request tried to connect while this one waited for the lock, and
                # failed: share its answer instead of queueing one more slow attempt.
                raise self._last_error
            try:
                self._producer = self._factory(self._settings)
            except (KafkaError, OSError) as exc:
                self._last_error = KafkaUnavailable(
                    f"cannot reach Kafka at {self._settings.kafka_bootstrap} ({explain(exc)})"
                )
                raise self._last_error from exc
            finally:
                self._finished_attempts += 1
            self._last_error = None
            log.info("connected to Kafka at %s", self._settings.kafka_bootstrap)
            return self._producer

    def _discard(self, producer: KafkaProducer) -> None:
        with self._lock:
            if self._producer is not producer:
                return  # a concurrent request has discarded it already
            self._producer = None
        # Closing waits for records other requests still have in flight (bounded by the
        # delivery timeout); the failing request should not wait for that.
        threading.Thread(
            target=self._close_quietly, args=(producer,), name="streamrec-producer-close",
            daemon=True,
        ).start()

    def _close_quietly(self, producer: KafkaProducer) -> None:
        try:
            producer.close(timeout=self._flush_timeout_s)
        except KafkaError as exc:
            log.warning("closing a failed Kafka producer: %s", exc)

    def close(self) -> None:
        """Flush what is in flight and disconnect; later calls to :meth:`publish` fail."""
        with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is not None:
            self._close_quietly(producer)
