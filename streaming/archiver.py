"""The archiver: every valid event into the Parquet event log, exactly once.

The event log is the offline store's source of truth: Spark builds historical features and
embeddings from it, training reads labels from it, and ``streamrec backfill`` rebuilds the
online store from it. So the archive must hold every valid event once — no gaps after a
crash, no duplicates after a re-delivery.

Layout (Hive-style partitions by *event* time, so late events land where they belong)::

    <home>/offline/events/date=2026-11-24/hour=06/part-p0003-o00000000000000120000-o00000000000000121999.parquet
    <home>/offline/items/part-p0001-o…-o….parquet          (catalog records, newest per item wins)

How exactly-once works: each file holds records of ONE source partition, and its name
carries the first and last source offset of the batch it came from. A batch may span
several hour folders, so its files are first written under hidden temporary names
(readers skip names starting with ``.``), fsynced, then renamed into place, and finally an
empty manifest ``_manifests/p0003/o…-o…`` records the batch as complete — the manifest is
the commit point. When the archiver is (re)assigned a partition it resumes after the
highest manifested offset, whatever Kafka's committed offset says, and first deletes the
part files of that partition from batches that never got their manifest. So a crash at
any point neither loses nor duplicates records (the recovery the Kafka Connect HDFS sink
uses, extended to batches that span folders).

Examples
--------
>>> part_name(3, 120_000, 121_999)
'part-p0003-o00000000000000120000-o00000000000000121999.parquet'
>>> parse_part_name('part-p0003-o00000000000000120000-o00000000000000121999.parquet')
(3, 120000, 121999)
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from kafka import TopicPartition

from streaming.consumer import Failure, Message, StreamConsumer
from streaming.metrics import WorkerReporter, status_folder
from streamrec.contract import Event, Item, parse_event, parse_item
from streamrec.settings import Settings

log = logging.getLogger(__name__)

_PART = re.compile(r"^part-p(\d+)-o(\d+)-o(\d+)\.parquet$")

EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("event_type", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("items", pa.list_(pa.string())),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("session_id", pa.string()),
        ("device", pa.string()),
        ("country", pa.string()),
        ("page", pa.string()),
        ("referrer", pa.string()),
        ("query", pa.string()),
        ("context_extra", pa.string()),
        ("request_id", pa.string()),
        ("position", pa.int32()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("category", pa.string()),
        ("price", pa.float64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("attributes", pa.string()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
    ]
)


def part_name(partition: int, first: int, last: int) -> str:
    """File name of a part holding offsets ``first..last`` of one source partition."""
    return f"part-p{partition:04d}-o{first:020d}-o{last:020d}.parquet"


def parse_part_name(name: str) -> tuple[int, int, int] | None:
    """``(partition, first, last)`` of a part file name, ``None`` for anything else."""
    m = _PART.match(name)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def events_dir(settings: Settings) -> Path:
    return settings.home / "offline" / "events"


def items_dir(settings: Settings) -> Path:
    return settings.home / "offline" / "items"


def impressions_dir(settings: Settings) -> Path:
    """Archive of the ``impressions`` topic (what serving showed), laid out like events."""
    return settings.home / "offline" / "impressions"


def event_log_dirs(settings: Settings) -> tuple[Path, Path]:
    """Every folder of the event log: client events, then served impressions.

    They are separate archives because each topic has its own partitions and offsets (the
    names of the exactly-once parts); readers of "the event log" read both.
    """
    return events_dir(settings), impressions_dir(settings)


def _manifest_dir(root: Path, partition: int) -> Path:
    return root / "_manifests" / f"p{partition:04d}"


def archived_positions(root: Path) -> dict[int, int]:
    """Per source partition, the offset after the last completely archived batch."""
    positions: dict[int, int] = {}
    manifests = root / "_manifests"
    if not manifests.exists():
        return positions
    for path in manifests.glob("p*/o*"):
        first_last = path.name.split("-")
        partition, last = int(path.parent.name[1:]), int(first_last[1][1:])
        positions[partition] = max(positions.get(partition, 0), last + 1)
    return positions


def remove_uncommitted(root: Path, partition: int, position: int) -> int:
    """Delete part files of ``partition`` at or after ``position`` (from unfinished batches)."""
    removed = 0
    for path in root.rglob(f"part-p{partition:04d}-*.parquet"):
        parsed = parse_part_name(path.name)
        if parsed and parsed[1] >= position:
            path.unlink()
            removed += 1
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a rename or create must survive a power cut, not just the bytes
    finally:
        os.close(fd)


def _write_hidden(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    return tmp


def event_rows(batch: Sequence[Message[Event]]) -> dict[str, list[Any]]:
    """Columns of :data:`EVENT_SCHEMA` for a batch of decoded events."""
    cols: dict[str, list[Any]] = {name: [] for name in EVENT_SCHEMA.names}
    for m in batch:
        e = m.value
        ctx = e.context
        extra = ctx.model_extra if ctx is not None else None
        cols["event_id"].append(e.event_id)
        cols["event_type"].append(e.event_type.value)
        cols["user_id"].append(e.user_id)
        cols["item_id"].append(e.item_id)
        cols["items"].append(list(e.items) if e.items is not None else None)
        cols["ts"].append(e.ts)
        cols["session_id"].append(e.session_id)
        cols["device"].append(ctx.device.value if ctx and ctx.device else None)
        cols["country"].append(ctx.country if ctx else None)
        cols["page"].append(ctx.page if ctx else None)
        cols["referrer"].append(ctx.referrer if ctx else None)
        cols["query"].append(ctx.query if ctx else None)
        cols["context_extra"].append(orjson.dumps(extra).decode() if extra else None)
        cols["request_id"].append(e.request_id)
        cols["position"].append(e.position)
        cols["kafka_partition"].append(m.partition)
        cols["kafka_offset"].append(m.offset)
    return cols


def item_rows(batch: Sequence[Message[Item]]) -> dict[str, list[Any]]:
    """Columns of :data:`ITEM_SCHEMA` for a batch of catalog records."""
    cols: dict[str, list[Any]] = {name: [] for name in ITEM_SCHEMA.names}
    for m in batch:
        it = m.value
        cols["item_id"].append(it.item_id)
        cols["title"].append(it.title)
        cols["category"].append(it.category)
        cols["price"].append(it.price)
        cols["created_at"].append(it.created_at)
        cols["attributes"].append(orjson.dumps(it.attributes).decode())
        cols["kafka_partition"].append(m.partition)
        cols["kafka_offset"].append(m.offset)
    return cols


class Archiver:
    """Writes batches of one topic as offset-named Parquet parts (see the module docstring).

    Parameters
    ----------
    root
        Folder of this topic's archive.
    schema, to_columns
        The Parquet schema and how a batch becomes its columns.
    partition_by_hour
        Split files into ``date=/hour=`` folders by event time (events); the catalog is
        small and is kept flat.
    """

    def __init__(
        self,
        root: Path,
        schema: pa.Schema,
        to_columns: Callable[[Sequence[Message[Any]]], dict[str, list[Any]]],
        *,
        partition_by_hour: bool,
    ) -> None:
        self.root = root
        self.schema = schema
        self.to_columns = to_columns
        self.partition_by_hour = partition_by_hour
        self.files_written = 0
        self.rows_written = 0

    def resume_positions(self, assigned: set[TopicPartition]) -> Mapping[TopicPartition, int]:
        """Where each newly assigned partition resumes; drops leftovers of unfinished batches."""
        done = archived_positions(self.root)
        positions = {}
        for tp in assigned:
            position = done.get(tp.partition, 0)
            removed = remove_uncommitted(self.root, tp.partition, position)
            if removed:
                log.warning(
                    "removed %d part file(s) of unfinished batches of partition %d",
                    removed,
                    tp.partition,
                )
            if tp.partition in done:
                positions[tp] = position
        return positions

    def write(self, batch: list[Message[Any]]) -> list[Failure]:
        by_partition: dict[int, list[Message[Any]]] = defaultdict(list)
        for m in batch:
            by_partition[m.partition].append(m)
        for partition, msgs in by_partition.items():
            first, last = msgs[0].offset, msgs[-1].offset
            name = part_name(partition, first, last)
            groups: dict[str, list[Message[Any]]] = defaultdict(list)
            if self.partition_by_hour:
                for m in msgs:
                    ts: datetime = m.value.ts.astimezone(UTC)
                    groups[f"date={ts:%Y-%m-%d}/hour={ts:%H}"].append(m)
            else:
                groups[""] = msgs
            staged = [
                (self._stage(group, self.root / folder / name), self.root / folder / name)
                for folder, group in groups.items()
            ]
            for tmp, final in staged:
                os.replace(tmp, final)
            for folder in {final.parent for _, final in staged}:
                _fsync_dir(folder)
            manifest = _manifest_dir(self.root, partition)
            manifest.mkdir(parents=True, exist_ok=True)
            (manifest / f"o{first:020d}-o{last:020d}").touch()
            _fsync_dir(manifest)
            self.rows_written += len(msgs)
        return []

    def _stage(self, msgs: list[Message[Any]], path: Path) -> Path:
        table = pa.Table.from_pydict(self.to_columns(msgs), schema=self.schema)
        self.files_written += 1
        return _write_hidden(table, path)


def run_archiver(
    settings: Settings,
    *,
    max_idle_s: float | None = None,
    batch_wait_s: float = 5.0,
    metrics_port: int = 0,
) -> dict[str, int]:
    """Archive ``events``, ``impressions`` and ``items`` until SIGTERM (or ``max_idle_s`` idle)."""
    archives = {
        settings.topic_events: Archiver(
            events_dir(settings), EVENT_SCHEMA, event_rows, partition_by_hour=True
        ),
        settings.topic_impressions: Archiver(
            impressions_dir(settings), EVENT_SCHEMA, event_rows, partition_by_hour=True
        ),
        settings.topic_items: Archiver(
            items_dir(settings), ITEM_SCHEMA, item_rows, partition_by_hour=False
        ),
    }
    events, items = archives[settings.topic_events], archives[settings.topic_items]

    def decode(raw: bytes) -> Event | Item:
        data = orjson.loads(raw)
        # The topics share one consumer; the shape tells them apart.
        return parse_event(data) if "event_type" in data else parse_item(data)

    def handle(batch: list[Message[Event | Item]]) -> list[Failure]:
        failures: list[Failure] = []
        for topic, archive in archives.items():
            failures += archive.write([m for m in batch if m.topic == topic])
        return failures

    def on_assign(assigned: set[TopicPartition]) -> Mapping[TopicPartition, int]:
        positions: dict[TopicPartition, int] = {}
        for topic, archive in archives.items():
            positions.update(archive.resume_positions({tp for tp in assigned if tp.topic == topic}))
        return positions

    consumer = StreamConsumer(
        settings,
        list(archives),
        settings.archiver_group,
        decode,
        handle,
        max_batch_wait_s=batch_wait_s,
        on_assign=on_assign,
    )
    consumer.install_signal_handlers()
    reporter = WorkerReporter(
        "archiver",
        consumer.stats,
        extra=lambda: {
            "event_rows": events.rows_written,
            "impression_rows": archives[settings.topic_impressions].rows_written,
            "item_rows": items.rows_written,
        },
        status_dir=status_folder(settings),
    )
    reporter.start(metrics_port)
    try:
        stats = consumer.run(max_idle_s=max_idle_s)
    finally:
        reporter.stop()
    return {
        "consumed": stats.consumed,
        "dead_lettered": stats.dead_lettered,
        "event_rows": events.rows_written,
        "impression_rows": archives[settings.topic_impressions].rows_written,
        "item_rows": items.rows_written,
        "files": sum(a.files_written for a in archives.values()),
    }


def load_catalog(settings: Settings) -> pa.Table:
    """The archived catalog, one row per item: the newest record of each ``item_id`` wins.

    Catalog records are keyed by ``item_id``, so all versions of an item sit in one
    partition and the highest offset is the newest.
    """
    root = items_dir(settings)
    files = sorted(root.glob("part-*.parquet")) if root.exists() else []
    if not files:
        return ITEM_SCHEMA.empty_table()
    table = pa.concat_tables(pq.read_table(f, schema=ITEM_SCHEMA) for f in files)
    df = table.to_pandas()
    df = df.sort_values("kafka_offset").drop_duplicates("item_id", keep="last")
    return pa.Table.from_pandas(df.reset_index(drop=True), schema=ITEM_SCHEMA, preserve_index=False)
