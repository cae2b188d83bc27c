"""Event-time alignment across partitions, so that "too late" means late, not unlucky.

Events are keyed by user, so one item's events arrive through every partition. A consumer
working through a backlog (a restart, a replay of history) reads partitions unevenly:
partition 0 may be hours of event time ahead of partition 3. Fed in that order, an
item's anchor jumps ahead and its events from the slow partition look too late, although
they were on time. :class:`EventTimeAligner` holds records per partition and releases
them merged by event time, and only as far as every partition has shown its hand — the
rule Kafka Streams uses to synchronise stream time across input partitions:

* a partition with buffered records offers its oldest;
* a partition with nothing buffered blocks the release, unless it is caught up (the
  broker had nothing more for it at the last fetch), in which case it cannot hold older
  records and is skipped.

In a live stream every partition is caught up all the time and records pass straight
through; in a backlog the partitions advance together in event time.

Examples
--------
>>> from kafka import TopicPartition
>>> p0, p1 = TopicPartition("events", 0), TopicPartition("events", 1)
>>> a = EventTimeAligner()
>>> a.add(p0, [(10, 100, "a"), (30, 101, "b")])
>>> a.release({p0, p1}, caught_up=lambda tp: False)    # p1 may still hold older events
[]
>>> a.add(p1, [(20, 7, "c")])
>>> [r.value for r in a.release({p0, p1}, caught_up=lambda tp: False)]
['a', 'c']
>>> [r.value for r in a.release({p0, p1}, caught_up=lambda tp: True)]
['b']
>>> a.position(p0), a.position(p1)
(None, None)
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kafka import TopicPartition

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Released(Generic[V]):
    """A record released in event-time order, with where it came from."""

    partition: TopicPartition
    offset: int
    value: V


class EventTimeAligner(Generic[V]):
    """Buffers ``(event_time, offset, value)`` per partition; releases them merged by time."""

    def __init__(self) -> None:
        self._buffers: dict[TopicPartition, deque[tuple[int, int, V]]] = {}

    def add(self, tp: TopicPartition, records: Iterable[tuple[int, int, V]]) -> None:
        """Append one partition's records (in offset order)."""
        self._buffers.setdefault(tp, deque()).extend(records)

    def release(
        self, assigned: set[TopicPartition], caught_up: Callable[[TopicPartition], bool]
    ) -> list[Released[V]]:
        """Every record that can no longer be preceded by an older one, oldest first."""
        for tp in list(self._buffers):
            if tp not in assigned:  # revoked: its records belong to the new owner now
                del self._buffers[tp]
        heads = [(buf[0][0], tp.partition, tp.topic) for tp, buf in self._buffers.items() if buf]
        heapq.heapify(heads)
        blocked = any(
            not self._buffers.get(tp) and not caught_up(tp) for tp in assigned
        )
        if blocked:
            return []
        out: list[Released[V]] = []
        while heads:
            _, partition, topic = heapq.heappop(heads)
            tp = TopicPartition(topic, partition)
            buf = self._buffers[tp]
            _, offset, value = buf.popleft()
            out.append(Released(tp, offset, value))
            if buf:
                heapq.heappush(heads, (buf[0][0], partition, topic))
            elif not caught_up(tp):
                break  # this partition may have older records waiting on the broker
        return out

    def position(self, tp: TopicPartition) -> int | None:
        """Offset of the oldest record still held for ``tp`` (``None`` when none is)."""
        buf = self._buffers.get(tp)
        return buf[0][1] if buf else None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buffers.values())
