"""Where a record stream (events and catalog items) goes: a JSONL file or Kafka.

JSONL layout: one record per line, its contract JSON with a leading ``"kind"`` key,
``"event"`` or ``"item"``, so one file keeps the interleaving of a stream (a launched item
sits right before the events that mention it). :func:`read_jsonl` strips the key and
validates each record again.

Examples
--------
>>> import tempfile, pathlib
>>> from datetime import datetime, UTC
>>> from streamrec.contract import Item
>>> path = pathlib.Path(tempfile.mkdtemp()) / "records.jsonl"
>>> item = Item(item_id="i1", title="Moka pot", category="Home/Coffee",
...             created_at=datetime(2025, 1, 1, tzinfo=UTC))
>>> with JsonlSink(path) as sink:
...     sink.write(item)
>>> path.read_text()[:40]
'{"kind":"item","item_id":"i1","title":"M'
>>> list(read_jsonl(path)) == [item]
True
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from pydantic import ValidationError

from streaming.producer import EventProducer, Record
from streaming.replay import ReplayError
from streamrec.contract import Item, describe_error, parse_event, parse_item
from streamrec.settings import Settings

__all__ = ["JsonlSink", "KafkaSink", "Record", "RecordSink", "read_jsonl"]


class RecordSink(ABC):
    """Anything a record stream can be written to; closes itself at the end of a block."""

    @abstractmethod
    def write(self, record: Record) -> None:
        """Queue or write one record."""

    @abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable (or raise)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class JsonlSink(RecordSink):
    """Writes records as JSON lines with a ``"kind"`` discriminator.

    Parameters
    ----------
    target
        A file path (created or truncated), ``"-"`` for standard output, or an open
        binary stream (left open on close).
    """

    def __init__(self, target: Path | str | BinaryIO) -> None:
        self._owned = isinstance(target, str | Path) and str(target) != "-"
        self._stream: BinaryIO
        if isinstance(target, str | Path):
            # The sink owns the file for its whole life; close() releases it.
            self._stream = Path(target).open("wb") if self._owned else sys.stdout.buffer  # noqa: SIM115
        else:
            self._stream = target

    def write(self, record: Record) -> None:
        kind = b'{"kind":"item",' if isinstance(record, Item) else b'{"kind":"event",'
        # Splicing the key into the model's own JSON keeps one serialiser for every sink.
        self._stream.write(kind + record.to_json()[1:] + b"\n")

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()


class KafkaSink(RecordSink):
    """Sends events to the events topic and items to the items topic via an EventProducer.

    :meth:`flush` waits for the broker's acknowledgements and raises
    :class:`~streaming.producer.DeliveryError` if any record was lost.

    Examples
    --------
    ::

        with KafkaSink.from_settings(get_settings()) as sink:
            for record in Simulator().events(1000):
                sink.write(record)
    """

    def __init__(self, producer: EventProducer) -> None:
        self.producer = producer

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaSink:
        """A sink with its own producer on the configured bootstrap servers and topics."""
        return cls(EventProducer(
            settings.kafka_bootstrap,
            settings.topic_events,
            settings.topic_items,
            linger_ms=settings.producer_linger_ms,
            max_block_ms=settings.producer_max_block_ms,
        ))

    def write(self, record: Record) -> None:
        if isinstance(record, Item):
            self.producer.send_item(record)
        else:
            self.producer.send(record)

    def flush(self) -> None:
        self.producer.flush()

    def close(self) -> None:
        try:
            self.producer.flush()
        finally:
            self.producer.close()


def read_jsonl(path: Path | str) -> Iterator[Record]:
    """Records of a file written by :class:`JsonlSink`, validated against the contract.

    Raises :class:`~streaming.replay.ReplayError` naming the line of a malformed record.
    """
    p = Path(path)
    with p.open("rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
                kind = data.pop("kind", None) if isinstance(data, dict) else None
                if kind == "event":
                    yield parse_event(data)
                elif kind == "item":
                    yield parse_item(data)
                else:
                    raise ReplayError(p, line, 'each line needs "kind": "event" or "item"')
            except (ValidationError, json.JSONDecodeError) as exc:
                raise ReplayError(p, line, describe_error(exc)) from None
