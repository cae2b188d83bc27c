"""Moves a record stream into a sink at a chosen pace, reporting progress.

Pace applies to events only; catalog items go through as soon as they come, since a
replay sends its whole catalog before its first event.

- full speed: no pacer;
- :class:`RatePacer`: a target number of events per second;
- :class:`SpeedPacer`: the original timestamps, compressed (``speed=60``: an hour of data
  per minute).

A pacer that falls more than a second behind (slow sink, long pause) re-anchors rather
than bursting to catch up, so a consumer never sees more than a second of backlog at once.

Examples
--------
>>> import io
>>> from streaming.simulator import Simulator, SimulatorConfig
>>> from streaming.sinks import JsonlSink
>>> sim = Simulator(SimulatorConfig(n_users=10, n_items=30, n_categories=3))
>>> buffer = io.BytesIO()
>>> stats = pump(sim.events(200), JsonlSink(buffer), pacer=RatePacer(100_000))
>>> stats.events, buffer.getvalue().count(b'"kind":"event"')
(200, 200)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TextIO

from streaming.sinks import Record, RecordSink
from streamrec.contract import Event

__all__ = ["Pacer", "Progress", "PumpStats", "RatePacer", "SpeedPacer", "pump"]

_MAX_BACKLOG_S = 1.0


class Pacer(Protocol):
    """Decides when the next event may go (times on the pump's monotonic clock)."""

    def due(self, ts: datetime, now: float) -> float:
        """The clock time at which the event stamped ``ts`` may be sent."""
        ...


class RatePacer:
    """A steady target rate, in events per second.

    Examples
    --------
    >>> from datetime import datetime, UTC
    >>> p, ts = RatePacer(4.0), datetime.now(UTC)
    >>> [p.due(ts, now=100.0) for _ in range(3)]
    [100.0, 100.25, 100.5]
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self._next: float | None = None

    def due(self, ts: datetime, now: float) -> float:
        if self._next is None or now - self._next > _MAX_BACKLOG_S:
            self._next = now
        due = self._next
        self._next = due + self.interval
        return due


class SpeedPacer:
    """The original event-time spacing, ``speed`` times faster.

    Examples
    --------
    >>> from datetime import datetime, timedelta, UTC
    >>> p, t0 = SpeedPacer(60.0), datetime(2025, 1, 1, tzinfo=UTC)
    >>> p.due(t0, now=5.0), p.due(t0 + timedelta(minutes=2), now=5.0)
    (5.0, 7.0)
    """

    def __init__(self, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._anchor: tuple[float, float] | None = None  # (clock, event time) pairs

    def due(self, ts: datetime, now: float) -> float:
        event_time = ts.timestamp()
        if self._anchor is None:
            self._anchor = (now, event_time)
        due = self._anchor[0] + (event_time - self._anchor[1]) / self.speed
        if now - due > _MAX_BACKLOG_S:
            self._anchor = (now, event_time)
            due = now
        return due


@dataclass
class PumpStats:
    """What a pump run delivered."""

    events: int = 0
    items: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def rate(self) -> float:
        """Events per second over the run."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


class Progress:
    """Prints counts and rates every ``interval`` seconds (to stderr by default).

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> Progress(out, interval=0).report(PumpStats(events=1500, items=2, seconds=3.0), final=True)
    >>> out.getvalue()
    'done: 1,500 events, 2 items in 3.0 s (500 events/s)\\n'
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._last = (0.0, 0)  # (seconds, events) at the previous report

    def is_due(self, seconds: float) -> bool:
        """Whether a report is owed at ``seconds`` into the run."""
        return seconds - self._last[0] >= self.interval

    def report(self, stats: PumpStats, *, final: bool = False) -> None:
        if final:
            state = "interrupted" if stats.interrupted else "done"
            line = (f"{state}: {stats.events:,} events, {stats.items:,} items in "
                    f"{stats.seconds:.1f} s ({stats.rate:,.0f} events/s)")
        else:
            span = stats.seconds - self._last[0]
            recent = (stats.events - self._last[1]) / span if span > 0 else 0.0
            line = (f"{stats.events:,} events, {stats.items:,} items | "
                    f"{recent:,.0f} events/s now, {stats.rate:,.0f} average | "
                    f"{stats.seconds:.0f} s")
        print(line, file=self.stream, flush=True)
        self._last = (stats.seconds, stats.events)


def pump(
    records: Iterable[Record],
    sink: RecordSink,
    *,
    pacer: Pacer | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
    flush_interval: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> PumpStats:
    """Write ``records`` to ``sink``, paced, until exhausted, ``limit`` events, or Ctrl-C.

    The sink is flushed every ``flush_interval`` seconds (so a Kafka delivery failure
    surfaces within seconds, not at the end) and once at the end, also after Ctrl-C;
    closing it stays the caller's job.
    """
    stats = PumpStats()
    start = last_flush = clock()
    # Sleeps are cut into slices so that progress keeps coming during long gaps.
    slice_s = min(progress.interval, 1.0) if progress else 1.0
    try:
        for record in records:
            if isinstance(record, Event):
                if limit is not None and stats.events >= limit:
                    break
                if pacer is not None:
                    due = pacer.due(record.ts, clock())
                    while (wait := due - clock()) > 0:
                        sleep(min(wait, slice_s))
                        stats.seconds = clock() - start
                        if progress and progress.is_due(stats.seconds):
                            progress.report(stats)
                sink.write(record)
                stats.events += 1
            else:
                sink.write(record)
                stats.items += 1
            # Reading the clock per record would cost more than writing a JSON line.
            if (stats.events + stats.items) % 256 == 0:
                now = clock()
                stats.seconds = now - start
                if now - last_flush >= flush_interval:
                    sink.flush()
                    last_flush = now
                if progress and progress.is_due(stats.seconds):
                    progress.report(stats)
    except KeyboardInterrupt:
        stats.interrupted = True
    sink.flush()
    stats.seconds = clock() - start
    if progress:
        progress.report(stats, final=True)
    return stats
