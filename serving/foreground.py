"""Requests first: an API process's background threads wait for a moment without one.

Everything in an API process shares one interpreter lock. A background step that runs while
a request computes — the trending feed folding a batch of events or re-ranking its top
lists, the impression log handing records to Kafka — takes turns with the request
(``sys.setswitchinterval``) and stretches it by about its own length. None of that work is
urgent: trending counts and impressions may be a fraction of a second late. So it waits,
step by step, for a moment with no request in flight, up to a deadline that bounds how
late it gets; under sustained load it runs at the deadline anyway, taking turns as before.

Examples
--------
>>> import time
>>> foreground = Foreground()
>>> foreground.quiet(time.monotonic())
True
>>> foreground.enter()
>>> foreground.quiet(time.monotonic() + 0.01)  # a request in flight: waits until the deadline
False
>>> foreground.leave(); foreground.in_flight
0
"""

from __future__ import annotations

import threading
import time

__all__ = ["Foreground"]


class Foreground:
    """Requests in flight in this process, for background threads to yield to.

    :meth:`enter` and :meth:`leave` bracket a request (any thread, the event loop's
    included); :meth:`quiet` is what a background thread calls between steps.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self._idle.clear()

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def quiet(self, deadline: float) -> bool:
        """Wait until no request is in flight or until ``deadline`` (``time.monotonic``);
        ``True`` when it is quiet."""
        if self._idle.is_set():
            return True
        return self._idle.wait(max(0.0, deadline - time.monotonic()))
