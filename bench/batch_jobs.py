"""Wall time of ``streamrec batch all`` (historical, graph, text) on a simulated event log.

``--events`` simulated events (5,000 users, 10,000 items: about 36,000 events a simulated
day, so 1M events span four weeks, inside the 30-day windows) are written straight into the
Parquet event log by the archiver's own writer (``streaming.archiver.Archiver``, keyed by
user over ``STREAMREC_TOPIC_PARTITIONS`` partitions, ``STREAMREC_CONSUMER_BATCH_SIZE``
records per batch, as the archiver worker would), with the catalog. Then the steps of
``batch all`` run in one Spark session through :func:`features.batch_cli.run_steps`, as of
one second after the last event (:func:`features.batch_cli.all_steps`: the historical and
graph jobs share one read of the log).

``total_s`` is the whole ``batch all``: Spark start-up plus every step. Per job:
``<job>_s`` and ``<job>_events_per_s`` = simulated events / the job's seconds (for the text
job, ``text_items_per_s`` = catalog items / seconds).

Usage::

    .venv/bin/python bench/batch_jobs.py [--events 1000000] [--master local[2]] [--home DIR]

``--home`` keeps the home (log, feature store) in DIR and reuses a log already there.
Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pyspark.sql import SparkSession

from features.batch_cli import Progress, Step, all_steps, run_steps
from features.store import apply_repo
from streaming.archiver import (
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    Archiver,
    event_rows,
    events_dir,
    item_rows,
    items_dir,
    load_catalog,
)
from streaming.consumer import Message
from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Event, Item
from streamrec.settings import Settings

USERS = 5_000
ITEMS = 10_000


def log(message: str) -> None:
    print(f"[batch_jobs {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def simulated_days(events: int) -> float:
    """Simulated days ``events`` events take (SimulatorConfig's rule of thumb)."""
    config = SimulatorConfig(n_users=USERS, n_items=ITEMS)
    return events / (USERS * config.sessions_per_user_per_day * config.mean_events_per_session)


def write_log(settings: Settings, n: int) -> datetime:
    """Archive ``n`` simulated events and the catalog; returns the last event time."""
    # Starts far enough back that the stream ends before now (the contract's rule).
    start = datetime.now(UTC) - timedelta(days=simulated_days(n) * 1.25 + 1)
    sim = Simulator(
        SimulatorConfig(n_users=USERS, n_items=ITEMS, seed=1, start=start.replace(microsecond=0))
    )
    log_writer = Archiver(events_dir(settings), EVENT_SCHEMA, event_rows, partition_by_hour=True)
    catalog: list[Item] = list(sim.catalog())
    offsets = [0] * settings.topic_partitions
    batch: list[Message[Event]] = []
    last = start
    for record in sim.events(n):
        if isinstance(record, Item):
            catalog.append(record)
            continue
        partition = zlib.crc32(record.user_id.encode()) % settings.topic_partitions
        batch.append(Message(record, "events", partition, offsets[partition], None, b"", 0))
        offsets[partition] += 1
        last = record.ts
        if len(batch) == settings.consumer_batch_size:
            log_writer.write(batch)
            batch = []
            if log_writer.rows_written % 100_000 == 0:
                log(f"  archived {log_writer.rows_written:,} events (simulated {last:%Y-%m-%d})")
    log_writer.write(batch)
    items = Archiver(items_dir(settings), ITEM_SCHEMA, item_rows, partition_by_hour=False)
    items.write([Message(it, "items", 0, k, None, b"", 0) for k, it in enumerate(catalog)])
    log(f"archived {n:,} events in {log_writer.files_written:,} files, {len(catalog):,} items")
    return last


def archived_log(settings: Settings, n: int) -> tuple[int, datetime]:
    """The home's event count and last event time, writing ``n`` events if it has none."""
    import pyarrow.dataset as ds

    root = events_dir(settings)
    if root.is_dir() and any(root.glob("date=*")):
        table = ds.dataset(root, format="parquet", partitioning="hive").to_table(columns=["ts"])
        log(f"reusing the {table.num_rows:,} events archived in {root}")
        return table.num_rows, max(table.column("ts").to_pylist())
    log(f"simulating {n:,} events into {root} ...")
    started = time.perf_counter()
    last = write_log(settings, n)
    log(f"log written in {time.perf_counter() - started:.0f} s")
    return n, last


def timed(step: Step, seconds: dict[str, float], name: str) -> Step:
    """``step``, recording its wall time under ``name``."""

    def run(spark: SparkSession, settings: Settings, progress: Progress) -> Sequence[str]:
        started = time.perf_counter()
        lines = step(spark, settings, progress)
        seconds[name] = time.perf_counter() - started
        return lines

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--master", default=None, help="Spark master (default: settings)")
    parser.add_argument("--home", type=Path, default=None, help="keep and reuse the home here")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="batch-jobs-"))
    settings = Settings(home=home)
    events, last = archived_log(settings, args.events)
    end = last + timedelta(seconds=1)
    apply_repo(settings)

    steps, shared = all_steps(end, None, True, settings)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    try:
        run_steps(
            {name: timed(step, seconds, name) for name, step in steps.items()},
            master=args.master,
            settings=settings,
            progress=log,
        )
    finally:
        shared.release()
    result: dict[str, float | int | None] = {
        "events": events,
        "total_s": round(time.perf_counter() - started, 1),
    }
    for name in ("historical", "graph"):
        result[f"{name}_s"] = round(seconds[name], 1)
        result[f"{name}_events_per_s"] = round(events / seconds[name])
    result["text_s"] = round(seconds["text"], 1)
    result["text_items_per_s"] = round(load_catalog(settings).num_rows / seconds["text"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
