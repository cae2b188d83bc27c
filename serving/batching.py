"""Dynamic batching: work that queued while a thread was busy is done in one call.

Inference servers batch this way (Triton's dynamic batcher, TorchServe): a thread that
becomes free takes every item waiting, up to ``max_batch``, and hands them to ``work``
together. Nothing waits for a batch to fill: an idle service answers each item alone and
as soon as it arrives, and batches grow only when items already wait, which is when
sharing a call's fixed cost matters.

Examples
--------
>>> import asyncio
>>> batcher = Batcher(lambda items: [(x, len(items)) for x in items], threads=1, max_batch=8)
>>> batcher.start()
>>> async def three():
...     return await asyncio.gather(*(batcher.submit(x) for x in "abc"))
>>> [x for x, _ in asyncio.run(three())]
['a', 'b', 'c']
>>> batcher.close()
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Batcher"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_Entry = tuple[T, asyncio.AbstractEventLoop, "asyncio.Future[R]"]


class Batcher(Generic[T, R]):
    """Runs ``work`` on batches of submitted items in ``threads`` threads.

    Parameters
    ----------
    work
        Items → one result per item, in order; blocking. Should it raise on a batch, the
        batch's items are worked on again one by one, so that one bad item fails only
        itself (its caller gets the exception).
    threads
        Batches worked on at once.
    max_batch
        Largest batch; 1 makes this a plain thread pool, first come, first served.
    name
        Prefix of the threads' names.
    """

    def __init__(self, work: Callable[[list[T]], Sequence[R]], *, threads: int,
                 max_batch: int, name: str = "batcher") -> None:
        if threads < 1 or max_batch < 1:
            raise ValueError("threads and max_batch must be at least 1")
        self.work = work
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Entry[T, R] | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the threads once what was submitted is done; no submissions after this."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)

    async def submit(self, item: T) -> R:
        """``work``'s result for ``item``, computed in a batch with whatever else waits."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put((item, loop, future))
        return await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is None:  # closing: this batch first, the marker for next turn
                    self._queue.put(None)
                    break
                batch.append(entry)
            self._settle(batch)

    def _settle(self, batch: list[_Entry[T, R]]) -> None:
        outcomes = self._outcomes([item for item, _, _ in batch])
        loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[R], R | _Failure]]] = {}
        for (_, loop, future), outcome in zip(batch, outcomes, strict=True):
            loops.setdefault(loop, []).append((future, outcome))
        for loop, settled in loops.items():
            # One wake-up of each event loop for the whole batch.
            loop.call_soon_threadsafe(_deliver, settled)

    def _outcomes(self, items: list[T]) -> list[R | _Failure]:
        try:
            results = list(self.work(items))
            if len(results) != len(items):
                raise RuntimeError(f"{len(results)} results for {len(items)} items")
        except Exception as exc:  # the thread carries on: the next batch is not to blame
            if len(items) == 1:
                log.exception("work on an item failed")
                return [_Failure(exc)]
            log.warning("a batch of %d failed (%s: %s); working on its items one by one",
                        len(items), type(exc).__name__, exc)
            return [outcome for item in items for outcome in self._outcomes([item])]
        return results


@dataclass(frozen=True)
class _Failure:
    """The exception ``work`` raised on one item."""

    error: Exception


def _deliver(settled: list[tuple[asyncio.Future[R], R | _Failure]]) -> None:
    for future, outcome in settled:
        if future.done():  # the caller went away (cancelled)
            continue
        if isinstance(outcome, _Failure):
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome)
