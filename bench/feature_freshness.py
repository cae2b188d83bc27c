"""Feature-writer throughput and freshness, against a real broker and Feast (SQLite) store.

Two phases, one local broker, a fresh Feast repository in a temp home:

1. **Throughput**: ``--events`` simulated events are loaded into the topic first, then ONE
   feature-writer (in this process) consumes them from the beginning: validation, the
   event-time engine, and upserts of every changed user/item row into Feast's online store.
   ``events_per_s`` = events / time from the first poll to the last online write.
   ``cpu_us_per_event`` is the process CPU time per event over the same span (all threads),
   and ``cpu_events_per_s`` its inverse: what the writer sustains on one core of its own.
   Wall time depends on what else shares the machine; CPU time much less so.
2. **Freshness**: ``streamrec simulate --live --rate R`` (a separate process) produces events
   stamped with the wall clock at a fixed rate while the writer runs; for every event,
   freshness = the moment its features were committed online minus its event time. Reported
   as p50/p99 over the steady part of the run (the first 3 s are warm-up). The write is a
   committed transaction of Feast's online store, so that is when a reader sees it
   (``tests/test_feature_writer.py`` checks it through Feast's read path).

Usage::

    .venv/bin/python bench/feature_freshness.py [--events 200000] [--rate 5000] [--seconds 30]

``--profile FILE`` writes a cProfile of the throughput phase (read it with
``python -m pstats FILE``; profiling slows the writer, so that run's ``events_per_s`` is no
benchmark); ``--seconds 0`` skips the freshness phase.

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from features.store import apply_repo
from streaming.broker import LocalKafka
from streaming.feature_writer import FeatureWriter, tune_gc
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics, stream_topics
from streamrec.settings import Settings


def log(msg: str) -> None:
    print(f"[feature_freshness] {msg}", file=sys.stderr, flush=True)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _settings(bootstrap: str, home: Path, tag: str, store: str, redis_url: str) -> Settings:
    # Topics of their own, so that a reused broker (--bootstrap) holds nothing older.
    run = f"{tag}-{uuid.uuid4().hex[:8]}"
    return Settings(
        kafka_bootstrap=bootstrap,
        home=home / tag,
        online_store=store,
        redis_url=redis_url,
        topic_events=f"events-{run}",
        topic_items=f"items-{run}",
        topic_impressions=f"impressions-{run}",
        feature_writer_group=f"fw-{run}",
        feature_snapshot_interval_s=30,
    )


def throughput(
    bootstrap: str, home: Path, n: int, store: str, redis_url: str, profile: Path | None = None
) -> dict[str, float]:
    settings = _settings(bootstrap, home, "tput", store, redis_url)
    ensure_topics(bootstrap, stream_topics(settings), settings.topic_partitions)
    apply_repo(settings)
    log(f"loading {n:,} simulated events into Kafka …")
    sim = Simulator(SimulatorConfig(seed=11, n_users=20_000, n_items=20_000))
    with EventProducer(bootstrap, settings.topic_events, settings.topic_items) as producer:
        total = producer.send_many(sim.events(n))
    log(f"loaded {total:,} records; running one feature writer over the backlog …")
    writer = FeatureWriter(settings)
    consumer = writer.consumer()
    tune_gc()  # as FeatureWriter.run does in the worker
    cpu_started = _cpu_s()
    started = time.perf_counter()
    last_report = started

    def done() -> bool:
        nonlocal last_report
        now = time.perf_counter()
        if now - last_report >= 5:
            last_report = now
            log(
                f"  {writer.stats.events:,} events · {writer.stats.events / (now - started):,.0f}/s"
            )
        return writer.stats.events >= n

    profiler = cProfile.Profile() if profile is not None else None
    with profiler or contextlib.nullcontext():
        consumer.run(until=done)
        writer.flush()
    elapsed = time.perf_counter() - started
    cpu_s = _cpu_s() - cpu_started
    writer.writer.close()
    if profiler is not None:
        profiler.dump_stats(profile)
        log(f"profile of the throughput phase written to {profile}")
    stats = writer.stats
    log(
        f"{stats.events:,} events in {elapsed:.1f}s → {stats.events / elapsed:,.0f} events/s, "
        f"{cpu_s / stats.events * 1e6:.1f} µs CPU per event "
        f"({stats.user_rows:,} user rows, {stats.item_rows:,} item rows written)"
    )
    return {
        "events": stats.events,
        "events_per_s": round(stats.events / elapsed),
        "cpu_us_per_event": round(cpu_s / stats.events * 1e6, 1),
        "cpu_events_per_s": round(stats.events / cpu_s),
        "rows_written": stats.user_rows + stats.item_rows,
    }


def freshness(
    bootstrap: str, home: Path, rate: int, seconds: int, store: str, redis_url: str
) -> dict[str, float]:
    settings = _settings(bootstrap, home, "fresh", store, redis_url)
    ensure_topics(bootstrap, stream_topics(settings), settings.topic_partitions)
    apply_repo(settings)
    writer = FeatureWriter(settings)
    consumer = writer.consumer()
    worker = threading.Thread(
        target=writer.run, kwargs={"install_signals": False, "consumer": consumer}
    )
    worker.start()
    time.sleep(3)  # group join before the first event, so startup is not measured
    env = {
        **os.environ,
        "STREAMREC_KAFKA_BOOTSTRAP": bootstrap,
        "STREAMREC_TOPIC_EVENTS": settings.topic_events,
        "STREAMREC_TOPIC_ITEMS": settings.topic_items,
    }
    n = rate * seconds
    log(f"producing {n:,} live events at {rate:,}/s for {seconds}s …")
    producer = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamrec",
            "simulate",
            "--kafka",
            "--live",
            "--rate",
            str(rate),
            "--events",
            str(n),
            "--seed",
            str(uuid.uuid4().int % 1000),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if producer.returncode != 0:
        raise RuntimeError(producer.stderr[-2000:])
    deadline = time.monotonic() + 60
    while writer.stats.events < n and time.monotonic() < deadline:
        time.sleep(0.2)
    consumer.stop()
    worker.join(timeout=60)
    samples = list(writer.stats.freshness_ms)
    steady = np.array(samples[min(len(samples) // 10, rate * 3) :])
    log(
        f"{len(samples):,} events measured; p50 {np.percentile(steady, 50):.0f} ms, "
        f"p99 {np.percentile(steady, 99):.0f} ms"
    )
    return {
        "freshness_rate_events_per_s": rate,
        "freshness_events": len(samples),
        "freshness_p50_ms": round(float(np.percentile(steady, 50)), 1),
        "freshness_p99_ms": round(float(np.percentile(steady, 99)), 1),
        "freshness_max_ms": round(float(steady.max()), 1),
        "freshness_mean_ms": round(statistics.fmean(steady), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the throughput phase")
    parser.add_argument("--online-store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="with --online-store redis (the database is flushed first)",
    )
    args = parser.parse_args()
    if args.online_store == "redis":
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        broker = None
        bootstrap = args.bootstrap
        if not bootstrap:
            broker = LocalKafka.on_free_ports(
                home / "kafka", cache_dir=Settings().cache_dir, heap="1g"
            )
            log("starting a local broker …")
            broker.start(quiet=True)
            bootstrap = broker.bootstrap
        try:
            store, url = args.online_store, args.redis_url
            result = {
                "online_store": store,
                **throughput(bootstrap, home, args.events, store, url, args.profile),
            }
            if args.seconds > 0:
                result.update(freshness(bootstrap, home, args.rate, args.seconds, store, url))
        finally:
            if broker is not None:
                broker.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
