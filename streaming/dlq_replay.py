"""Re-driving dead-lettered records to the topic they came from (``streamrec dlq replay``).

A record lands in ``<topic>.dlq`` when a worker could not take it: the contract rejected it
(``dlq.error.type = validation``) or a handler kept failing on it (``handler``). Once the
cause is dealt with, the replay sends the records back to their source topic (the
``dlq.source.topic`` header), either

* **as they are** (``replay_all``): after a consumer bug is fixed, or when the verdict
  depended on time (an event stamped too far ahead of the clock is valid minutes later); or
* **replaced by fixed versions** (:class:`Fixes`, a JSON-lines file). A line is either a
  record of the ``streamrec dlq show`` output with its ``value`` corrected — matched by its
  source position (``source.topic``/``source.partition``/``source.offset``), which works even
  when the broken field was the id — or a bare corrected event (item), matched by its
  ``event_id`` (``item_id``).

Every candidate is validated with the contract before it is sent, and keyed like every
producer keys it (``user_id``; ``item_id`` for the catalog), so a fix that changes the user
lands in that user's partition.

Progress and resumption
    The replay reads the DLQ in its own consumer group (``settings.dlq_replay_group``) from
    the group's committed position up to the end offsets the run started with, and commits
    after each batch, once the broker acknowledged every record the batch sent. Each record
    read is *resolved*:

    ``sent``
        to the source topic;
    ``duplicate``
        another copy of a source record this run already resolved — every consumer group
        that rejects a record dead-letters its own copy (the archiver's and the feature
        writer's of one malformed event), and the event must go back once;
    ``skipped`` (no fix for it and no ``replay_all``) and ``still_invalid``
        *re-parked*: appended to the DLQ again with the original key, bytes and headers plus
        ``dlq.replay.attempts``, ``dlq.replay.outcome`` and ``dlq.replay.error``, so a later
        replay (with a fix) finds it after the group's position.

    So a second run never re-drives what the first one sent, and what is still pending is
    exactly what lies after the group's position (``dlq replay --dry-run`` lists it). A crash
    between the sends and the commit re-drives that batch once more: at-least-once, harmless
    downstream because ``event_id`` is the idempotency key. Run one replay per topic at a
    time (partitions are assigned, not balanced between replays).

What a re-driven event does downstream
    It is a *late* event. The archiver stores it in its event-time folder; the feature writer
    applies it only within ``STREAMREC_FEATURE_ALLOWED_LATENESS_S`` of the entity's newest
    event and counts it as too late otherwise — ``streamrec backfill`` then rebuilds the
    online features from the log, which has it. Consumer groups that had processed a
    handler-failed record fine see it a second time: the feature writer drops it by
    ``event_id``; the archiver stores a second copy, which every reader of the log
    deduplicates by ``event_id``.

Examples
--------
>>> fixes = Fixes.from_lines([
...     '{"source.topic": "events", "source.partition": "2", "source.offset": "17", '
...     '"value": {"event_id": "0b7e4c1e-5a7e-4f0c-9d0a-1f2e3d4c5b6a", "event_type": "view", '
...     '"user_id": "u1", "item_id": "i1", "ts": "2026-01-02T03:04:05Z"}}',
... ])
>>> fixes.match(("events", 2, 17), b"{broken")["user_id"], len(fixes), fixes.unmatched
('u1', 1, 0)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.producer.future import FutureRecordMetadata

from streaming.dlq import decode_dlq_record
from streaming.producer import kafka_producer
from streamrec.contract import Event, Item, describe_error, parse_event, parse_item
from streamrec.settings import Settings

__all__ = [
    "DUPLICATE",
    "SENT",
    "SKIPPED",
    "STILL_INVALID",
    "Fixes",
    "Outcome",
    "ReplayReport",
    "replay_dlq",
]

log = logging.getLogger(__name__)

SENT, DUPLICATE, SKIPPED, STILL_INVALID = "sent", "duplicate", "skipped", "still_invalid"

Position = tuple[str, int, int]
"""Where a record was originally: source topic, partition, offset."""

_REPLAY_HEADERS = frozenset(
    {"dlq.replay.attempts", "dlq.replay.outcome", "dlq.replay.error", "dlq.replay.at"}
)
_MAX_HEADER_BYTES = 16_000


class Fixes:
    """Corrected records, looked up by source position or by the original's id.

    Build with :meth:`load` (a JSON-lines file) or :meth:`from_lines`. ``len()`` is the
    number of fixes; :attr:`unmatched` counts those no DLQ record has asked for yet, which
    after a replay points at a typo in a position or an id.
    """

    def __init__(self) -> None:
        self._by_position: dict[tuple[str | None, int, int], int] = {}
        self._by_id: dict[str, int] = {}
        self._values: list[dict[str, Any]] = []
        self._used: set[int] = set()

    @classmethod
    def load(cls, path: Path) -> Fixes:
        """Read a JSON-lines file of fixes (blank lines are ignored)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_lines(f)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> Fixes:
        """Parse fixes; ``ValueError`` names the line of anything that is not one."""
        fixes = cls()
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    fixes._add(orjson.loads(line))
                except (ValueError, TypeError, KeyError) as exc:
                    raise ValueError(f"fixes line {number}: {exc}") from None
        return fixes

    def _add(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object")
        index = len(self._values)
        if "source.offset" in obj:  # a `dlq show` record with its value corrected
            value = obj.get("value")
            if isinstance(value, str):
                value = orjson.loads(value)
            if not isinstance(value, dict):
                raise ValueError("'value' must be the corrected record (an object or its JSON)")
            position = (obj.get("source.topic"), int(obj["source.partition"]),
                        int(obj["source.offset"]))
            self._by_position[position] = index
        else:  # a bare corrected record
            value = obj
            self._by_id[_id_key(obj, is_item="event_type" not in obj)] = index
        self._values.append(value)

    def match(self, source: Position | None, original: bytes,
              *, is_item: bool = False) -> dict[str, Any] | None:
        """The fix of a dead-lettered record: by source position first, then by its id."""
        index = None
        if source is not None:
            index = self._by_position.get(source)
            if index is None:
                index = self._by_position.get((None, source[1], source[2]))
        if index is None and self._by_id:
            try:
                data = orjson.loads(original)
                index = self._by_id.get(_id_key(data, is_item=is_item))
            except (ValueError, TypeError, KeyError):
                index = None  # not JSON or no id: only a positional fix can match it
        if index is None:
            return None
        self._used.add(index)
        return self._values[index]

    def __len__(self) -> int:
        return len(self._values)

    @property
    def unmatched(self) -> int:
        """Fixes that no DLQ record matched so far."""
        return len(self._values) - len(self._used)


def _id_key(record: Mapping[str, Any], *, is_item: bool) -> str:
    # The contract lower-cases event ids, so a fix may spell the original's id either way.
    if is_item:
        return f"item:{record['item_id']}"
    return f"event:{str(record['event_id']).lower()}"


@dataclass(frozen=True)
class Outcome:
    """What the replay did — or, dry, would do — with one DLQ record."""

    dlq_partition: int
    dlq_offset: int
    source: Position | None
    action: str
    fixed: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["source"] = ":".join(map(str, self.source)) if self.source else None
        return out


@dataclass
class ReplayReport:
    """Counts of one replay (a dry run counts what it would have done)."""

    sent: int = 0
    skipped: int = 0
    still_invalid: int = 0
    duplicates: int = 0
    unmatched_fixes: int = 0
    dry_run: bool = False

    def add(self, outcome: Outcome) -> None:
        match outcome.action:
            case "sent":
                self.sent += 1
            case "skipped":
                self.skipped += 1
            case "still_invalid":
                self.still_invalid += 1
            case "duplicate":
                self.duplicates += 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source(meta: Mapping[str, Any]) -> Position | None:
    try:
        return meta["source.topic"], int(meta["source.partition"]), int(meta["source.offset"])
    except (KeyError, ValueError):
        return None  # not written by StreamConsumer: no position to dedupe or match by


class _Validator:
    """The contract's check for a source topic, and the key a producer would use."""

    def __init__(self, settings: Settings) -> None:
        self._items_topic = settings.topic_items
        self._skew = timedelta(seconds=settings.max_future_skew_s)

    def is_items(self, topic: str) -> bool:
        return topic == self._items_topic

    def __call__(self, topic: str, value: bytes | dict[str, Any]) -> tuple[bytes, Event | Item]:
        if self.is_items(topic):
            item = parse_item(value, max_future_skew=self._skew)
            return item.item_id.encode(), item
        event = parse_event(value, max_future_skew=self._skew)
        return event.user_id.encode(), event


def _repark_headers(headers: list[tuple[str, bytes]], outcome: str,
                    error: str | None) -> list[tuple[str, bytes]]:
    previous = dict(headers).get("dlq.replay.attempts", b"0")
    attempts = int(previous) + 1 if previous.isdigit() else 1
    out = [(k, v) for k, v in headers if k not in _REPLAY_HEADERS]
    out += [
        ("dlq.replay.attempts", str(attempts).encode()),
        ("dlq.replay.outcome", outcome.encode()),
        ("dlq.replay.at", datetime.now(UTC).isoformat().encode()),
    ]
    if error is not None:
        out.append(("dlq.replay.error", error.encode()[:_MAX_HEADER_BYTES]))
    return out


def replay_dlq(
    settings: Settings,
    topic: str,
    *,
    fixes: Fixes | None = None,
    replay_all: bool = False,
    dry_run: bool = False,
    batch_size: int = 500,
    on_outcome: Callable[[Outcome], None] | None = None,
    stall_timeout_s: float = 30.0,
) -> ReplayReport:
    """Re-drive the pending records of ``topic``'s DLQ (see the module docstring).

    Parameters
    ----------
    settings
        Bootstrap servers, topic names, the replay's consumer group, the contract's clock skew.
    topic
        The source topic whose DLQ (``settings.dlq_topic(topic)``) is replayed.
    fixes
        Corrected records; a record with a fix is re-driven as the fix.
    replay_all
        Re-drive records without a fix as they are (otherwise they are skipped, re-parked).
    dry_run
        Decide and report only: nothing is sent, re-parked or committed.
    on_outcome
        Called with every record's :class:`Outcome`, in DLQ order per partition.
    stall_timeout_s
        Give up (``TimeoutError``) when the DLQ yields nothing this long before its end.
    """
    if fixes is None and not replay_all:
        raise ValueError("nothing to re-drive: give fixes, or replay_all to send records as-is")
    dlq = settings.dlq_topic(topic)
    validate = _Validator(settings)
    report = ReplayReport(dry_run=dry_run)
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        group_id=settings.dlq_replay_group,
        client_id="streamrec-dlq-replay",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batch_size,
    )
    producer = None if dry_run else kafka_producer(settings.kafka_bootstrap)
    handled: set[Position] = set()
    try:
        tps = [TopicPartition(dlq, p) for p in sorted(consumer.partitions_for_topic(dlq) or ())]
        if not tps:
            log.warning("no dead-letter topic %s: nothing to replay", dlq)
            return report
        consumer.assign(tps)
        # Re-parked records are appended behind these ends: this run never reads them back.
        ends = consumer.end_offsets(tps)
        pending = {tp for tp in tps if consumer.position(tp) < ends[tp]}
        consumer.pause(*(set(tps) - pending))
        last_progress = time.monotonic()
        while pending:
            polled = consumer.poll(timeout_ms=500)
            batch: list[ConsumerRecord] = []
            for tp, records in polled.items():
                batch += [r for r in records if r.offset < ends[tp]]
            if batch:
                sends = []
                for rec in batch:
                    outcome, send = _resolve(rec, topic, validate, fixes, replay_all, handled)
                    report.add(outcome)
                    if on_outcome is not None:
                        on_outcome(outcome)
                    if send is not None and producer is not None:
                        sends.append(producer.send(send[0], key=send[1], value=send[2],
                                                   headers=send[3]))
                if producer is not None:
                    _commit_after_acks(consumer, producer, sends, batch)
                last_progress = time.monotonic()
            for tp in list(pending):
                if consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)
            if pending and time.monotonic() - last_progress > stall_timeout_s:
                raise TimeoutError(
                    f"{dlq}: no records for {stall_timeout_s:.0f}s before the end offsets "
                    f"{ {tp.partition: ends[tp] for tp in pending} }"
                )
    finally:
        if producer is not None:
            producer.close(timeout=10)
        consumer.close(autocommit=False)
    report.unmatched_fixes = fixes.unmatched if fixes is not None else 0
    return report


_Send = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]
"""topic, key, value, headers of a record to produce."""


def _resolve(
    rec: ConsumerRecord,
    topic: str,
    validate: _Validator,
    fixes: Fixes | None,
    replay_all: bool,
    handled: set[Position],
) -> tuple[Outcome, _Send | None]:
    """Decide one DLQ record's fate and the record to produce for it, if any."""
    headers = list(rec.headers)
    source = _source(decode_dlq_record(headers, rec.key, rec.value))
    source_topic = source[0] if source else topic

    def outcome(action: str, *, fixed: bool = False, error: str | None = None) -> Outcome:
        return Outcome(rec.partition, rec.offset, source, action, fixed, error)

    def repark(action: str, error: str | None = None) -> _Send:
        return rec.topic, rec.key, rec.value, _repark_headers(headers, action, error)

    if source is not None:
        if source in handled:
            return outcome(DUPLICATE), None
        handled.add(source)
    fix = fixes.match(source, rec.value, is_item=validate.is_items(source_topic)) if fixes else None
    if fix is None and not replay_all:
        return outcome(SKIPPED), repark(SKIPPED)
    try:
        key, record = validate(source_topic, fix if fix is not None else rec.value)
    except Exception as exc:  # any rejection by the contract: the record stays parked
        error = ("fixed version: " if fix is not None else "") + describe_error(exc)
        return outcome(STILL_INVALID, fixed=fix is not None, error=error), repark(
            STILL_INVALID, error
        )
    # As-is records keep their bytes; a fix goes out in the contract's canonical form.
    value = record.to_json() if fix is not None else rec.value
    return outcome(SENT, fixed=fix is not None), (source_topic, key, value, [])


def _commit_after_acks(
    consumer: KafkaConsumer,
    producer: KafkaProducer,
    sends: list[FutureRecordMetadata],
    batch: list[ConsumerRecord],
) -> None:
    """Commit the batch's DLQ positions once every record it produced is acknowledged."""
    producer.flush(timeout=60)
    for future in sends:
        future.get(timeout=30)  # raises: an unacknowledged send must not be committed past
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for rec in batch:
        offsets[TopicPartition(rec.topic, rec.partition)] = OffsetAndMetadata(
            rec.offset + 1, "", -1
        )
    consumer.commit(offsets)
