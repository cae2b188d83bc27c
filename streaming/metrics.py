"""What stream workers export: Prometheus metrics and a periodic one-line JSON status.

Every worker reports consumption, dead letters, retries and consumer lag; the feature
writer adds the two freshness figures the product is judged by — event time → online
write (per event) and how far behind the log it is. Exposed on ``--metrics-port`` (or
``STREAMREC_METRICS_PORT``) at ``/metrics``; the status line goes to the log every
``interval_s`` for people tailing it.

Given a ``status_dir`` (``<home>/status``, see :func:`status_folder`), the reporter also
keeps the same status, with a timestamp and the consumption rate, in
``<status_dir>/<worker>.json``, replaced atomically every ``status_interval_s``: the API's
dashboard reads these files, so it needs no network path to the workers.

Examples
--------
>>> import json, tempfile
>>> from pathlib import Path
>>> from streaming.consumer import ConsumerStats
>>> folder = Path(tempfile.mkdtemp()) / "status"
>>> reporter = WorkerReporter("demo", ConsumerStats(consumed=5, lag={"events:0": 2}),
...                           status_dir=folder)
>>> reporter.status()["lag"]
2
>>> reporter.report()
>>> sorted(json.loads((folder / "demo.json").read_text()))  # doctest: +NORMALIZE_WHITESPACE
['consumed', 'consumed_per_s', 'dead_lettered', 'interval_s', 'lag', 'pid', 'retries',
 'running', 'ts', 'worker']
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from streaming.consumer import ConsumerStats

if TYPE_CHECKING:
    from streamrec.settings import Settings

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


def status_folder(settings: Settings) -> Path:
    """Where processes leave their status files for the dashboard: ``<home>/status``."""
    return settings.home / "status"


def write_status(path: Path, status: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``status`` as JSON, atomically (a reader never sees half a file).

    No fsync: a status is rewritten every few seconds, and losing the last one in a power
    cut costs nothing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(status, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        Seconds between status lines in the log.
    status_dir
        Folder of the status file ``<worker>.json`` for the dashboard (``None``: no file).
    status_interval_s
        Seconds between rewrites of the status file (and Prometheus updates) when it is set;
        shorter than ``interval_s`` so that charts move without flooding the log.
    """

    def __init__(self, worker: str, stats: ConsumerStats,
                 extra: Callable[[], dict[str, Any]] | None = None,
                 interval_s: float = 10.0, *, status_dir: Path | None = None,
                 status_interval_s: float = 2.0) -> None:
        self.worker = worker
        self.stats = stats
        self.extra = extra
        self.interval_s = interval_s
        self.status_path = status_dir / f"{worker}.json" if status_dir is not None else None
        self.tick_s = min(interval_s, status_interval_s) if status_dir else interval_s
        self._seen = ConsumerStats()
        self._reported_at = time.monotonic()
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
        if self._thread.is_alive():
            # A report in flight must not overwrite the final one below.
            self._thread.join()
        self.report(running=False)

    def status(self) -> dict[str, Any]:
        s = self.stats
        out: dict[str, Any] = {"worker": self.worker, "consumed": s.consumed,
                               "dead_lettered": s.dead_lettered, "retries": s.retries,
                               "lag": s.total_lag}
        if self.extra is not None:
            out.update(self.extra())
        return out

    def report(self, *, log_line: bool = True, running: bool = True) -> None:
        """Update Prometheus and the status file; log the status line if ``log_line``.

        ``running=False`` marks the file as the worker's last word (it is stopping).
        """
        s, seen = self.stats, self._seen
        now = time.monotonic()
        elapsed, self._reported_at = now - self._reported_at, now
        consumed = s.consumed - seen.consumed
        CONSUMED.labels(self.worker).inc(consumed)
        DEAD_LETTERED.labels(self.worker).inc(s.dead_lettered - seen.dead_lettered)
        RETRIES.labels(self.worker).inc(s.retries - seen.retries)
        LAG.labels(self.worker).set(s.total_lag)
        seen.consumed, seen.dead_lettered, seen.retries = s.consumed, s.dead_lettered, s.retries
        status = self.status()
        if self.status_path is not None:
            rate = consumed / elapsed if elapsed > 0 else 0.0
            try:
                write_status(self.status_path, {
                    **status, "ts": time.time(), "running": running, "pid": os.getpid(),
                    "interval_s": self.tick_s, "consumed_per_s": round(rate, 1),
                })
            except OSError as exc:
                # The dashboard is a view; a full disk must not stop the worker.
                log.warning("cannot write status file %s: %s", self.status_path, exc)
        if log_line:
            log.info("status %s", json.dumps(status))

    def _loop(self) -> None:
        next_line = time.monotonic() + self.interval_s
        while not self._stop.wait(self.tick_s):
            due = time.monotonic() >= next_line
            if due:
                next_line += self.interval_s
            self.report(log_line=due)
