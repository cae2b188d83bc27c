"""Recent API request latency, measured in-process for the dashboard.

:class:`RequestStats` is a bounded ring buffer of finished requests (end time, duration,
status); :meth:`RequestStats.summary` turns the last ``window_s`` of it into p50/p99 and
requests per second. :class:`RequestTimer` is the ASGI middleware that feeds it. Only API
calls count (paths under ``/v1/``), minus the dashboard's own polling: probes and the page
itself would otherwise drown the figures an operator looks for.

This is deliberately independent of the Prometheus histograms: percentiles from fixed
buckets are coarse at the millisecond scale, and the dashboard must work in a process that
exports no metrics at all.

Examples
--------
>>> stats = RequestStats(window_s=10.0)
>>> for ms in (4, 5, 6, 7, 50):
...     stats.record(ms / 1000, 200, now=100.0)
>>> stats.record(0.003, 503, now=100.0)
>>> s = stats.summary(now=101.0)
>>> s.requests, s.requests_per_s, s.p50_ms, s.p99_ms, s.errors
(6, 0.6, 5.0, 50.0, 1)
>>> stats.summary(now=200.0).p99_ms is None
True
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class RequestSummary:
    """Requests that finished in the last ``window_s`` seconds."""

    window_s: float
    requests: int
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    """Responses with a 5xx status (or no response at all)."""


def _nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class RequestStats:
    """The last ``capacity`` finished requests, summarised over a sliding window.

    Parameters
    ----------
    window_s
        Seconds of history :meth:`summary` covers.
    capacity
        Requests kept at most; at a higher rate than ``capacity / window_s`` the summary
        covers the newest ``capacity`` requests only.
    """

    def __init__(self, window_s: float = 10.0, capacity: int = 100_000) -> None:
        self.window_s = window_s
        self._done: deque[tuple[float, float, int]] = deque(maxlen=capacity)
        # The middleware records on the event loop; summaries may come from a thread pool.
        self._lock = threading.Lock()

    def record(self, duration_s: float, status: int, *, now: float | None = None) -> None:
        """One finished request: its duration and HTTP status (500 when none was sent)."""
        end = time.monotonic() if now is None else now
        with self._lock:
            self._done.append((end, duration_s, status))

    def summary(self, *, now: float | None = None) -> RequestSummary:
        """Count, rate, p50/p99 latency (nearest rank) and 5xx count over the window."""
        now = time.monotonic() if now is None else now
        since = now - self.window_s
        with self._lock:
            recent = [(d, code) for end, d, code in self._done if end >= since]
        durations = sorted(d * 1000 for d, _ in recent)
        return RequestSummary(
            window_s=self.window_s,
            requests=len(recent),
            requests_per_s=round(len(recent) / self.window_s, 2),
            p50_ms=round(_nearest_rank(durations, 0.50), 2) if durations else None,
            p99_ms=round(_nearest_rank(durations, 0.99), 2) if durations else None,
            errors=sum(1 for _, code in recent if code >= 500),
        )


class RequestTimer:
    """ASGI middleware: times each API request into a :class:`RequestStats`.

    A request is timed from its arrival until the app returns, i.e. after the last body
    chunk was handed to the server.

    Parameters
    ----------
    app
        The wrapped ASGI app.
    stats
        Where durations go.
    prefix
        Only paths starting with it are timed.
    exclude
        Path prefixes not timed even under ``prefix`` (the dashboard's own polling).
    """

    def __init__(
        self,
        app: ASGIApp,
        stats: RequestStats,
        prefix: str = "/v1/",
        exclude: tuple[str, ...] = ("/v1/dashboard",),
    ) -> None:
        self.app = app
        self.stats = stats
        self.prefix = prefix
        self.exclude = exclude

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not path.startswith(self.prefix)
            or path.startswith(self.exclude)
        ):
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.stats.record(time.perf_counter() - start, status)
