"""What stream workers export: Prometheus metrics and a periodic one-line JSON status.

Every worker reports consumption, dead letters, retries and consumer lag; the feature
writer adds the two freshness figures the product is judged by — event time → online
write (per event) and how far behind the log it is. Exposed on ``--metrics-port`` (or
``STREAMREC_METRICS_PORT``) at ``/metrics``; the status line goes to the log every
``interval_s`` for people tailing it.

Examples
--------
>>> from streaming.consumer import ConsumerStats
>>> reporter = WorkerReporter("demo", ConsumerStats(consumed=5, lag={"events:0": 2}))
>>> reporter.status()["lag"]
2
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from streaming.consumer import ConsumerStats

log = logging.getLogger(__name__)

CONSUMED = Counter("streamrec_worker_records_consumed", "Records polled from Kafka.", ["worker"])
DEAD_LETTERED = Counter(
    "streamrec_worker_records_dead_lettered", "Records sent to a dead-letter topic.", ["worker"]
)
RETRIES = Counter("streamrec_worker_batch_retries", "Handler failures retried.", ["worker"])
LAG = Gauge("streamrec_worker_consumer_lag", "Records on the broker not yet consumed.", ["worker"])
FRESHNESS = Histogram(
    "streamrec_feature_freshness_seconds",
    "Event time → the moment the event's features were committed to the online store.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
FEATURE_EVENTS = Counter(
    "streamrec_feature_events", "Events judged by the feature writer.", ["outcome"]
)
FEATURE_ROWS = Counter("streamrec_feature_rows_written", "Online rows written.", ["view"])


class WorkerReporter:
    """Copies a worker's counters into Prometheus and logs a status line periodically.

    Parameters
    ----------
    worker
        Label value, e.g. ``features`` or ``archiver``.
    stats
        The consumer runtime's live counters.
    extra
        Returns worker-specific fields for the status line.
    interval_s
        Seconds between status lines.
    """

    def __init__(self, worker: str, stats: ConsumerStats,
                 extra: Callable[[], dict[str, Any]] | None = None,
                 interval_s: float = 10.0) -> None:
        self.worker = worker
        self.stats = stats
        self.extra = extra
        self.interval_s = interval_s
        self._seen = ConsumerStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{worker}-reporter",
                                        daemon=True)

    def start(self, metrics_port: int = 0) -> None:
        if metrics_port:
            # All interfaces: Prometheus scrapes workers from another host or container.
            start_http_server(metrics_port, addr="0.0.0.0")
            log.info("metrics on :%d/metrics", metrics_port)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.report()

    def status(self) -> dict[str, Any]:
        s = self.stats
        out: dict[str, Any] = {"worker": self.worker, "consumed": s.consumed,
                               "dead_lettered": s.dead_lettered, "retries": s.retries,
                               "lag": s.total_lag}
        if self.extra is not None:
            out.update(self.extra())
        return out

    def report(self) -> None:
        s, seen = self.stats, self._seen
        CONSUMED.labels(self.worker).inc(s.consumed - seen.consumed)
        DEAD_LETTERED.labels(self.worker).inc(s.dead_lettered - seen.dead_lettered)
        RETRIES.labels(self.worker).inc(s.retries - seen.retries)
        LAG.labels(self.worker).set(s.total_lag)
        seen.consumed, seen.dead_lettered, seen.retries = s.consumed, s.dead_lettered, s.retries
        log.info("status %s", json.dumps(self.status()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()
