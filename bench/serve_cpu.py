"""CPU per recommendation, stage by stage, in one process: what each answer costs.

``bench/serve_latency.py`` measures what a client sees, with the API, a live writer, the
broker and the load generator sharing the cores, so its stage timings include waiting for a
core and vary from run to run near saturation. This benchmark measures the work itself:
:func:`serving.recommend.recommend_many` called in-process at a steady ``--rate``
(``--batch`` requests at a time, 1 by default) against the same shop (same world, models,
fresh features from a live writer at ``--write-rate``, the trending feed reading the
broker), each stage timed in CPU time of the calling thread
(``time.thread_time``), so a stage's figure does not include time another process held
the core. It is the figure to compare before and after a change to the pipeline.

Also reported: the whole API process's CPU per request beyond idle (the trending feed and
impression log threads included, HTTP excluded) and the near caches' hit shares.

Usage::

    .venv/bin/python bench/serve_cpu.py [--requests 3000] [--rate 100]

Progress goes to stderr; the last stdout line is one JSON object: ``pipeline_cpu_ms`` (mean
thread CPU per request), ``stages_cpu_ms`` (mean per stage), ``process_cpu_ms_per_request``,
``item_features_hit_share`` (candidates whose item features all came from the near caches)
and the run's parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
from serve_latency import broker, build_shop, live_writer, train_models

from serving.metrics import ServingMetrics
from serving.recommend import Stopwatch, recommend_many
from serving.runtime import ServingRuntime
from serving.schemas import RecommendationRequest
from streaming.topics import ensure_topics, stream_topics
from streamrec.settings import Settings


def log(msg: str) -> None:
    print(f"[serve_cpu] {msg}", file=sys.stderr, flush=True)


def _request(rng: random.Random, users: list[str]) -> RecommendationRequest:
    return RecommendationRequest.model_validate({
        "user_id": rng.choice(users), "k": 10,
        "context": {"device": rng.choice(("mobile", "desktop", "tablet")),
                    "country": rng.choice(("DE", "US", "FR", "GB", "JP"))},
    })


def _paced(rt: ServingRuntime, users: list[str], n: int, rate: float, batch: int,
           rng: random.Random) -> tuple[dict[str, float], int]:
    """``n`` requests at ``rate`` per second, ``batch`` at a time (:func:`recommend_many`);
    summed CPU seconds per stage, degraded count."""
    stages: dict[str, float] = defaultdict(float)
    degraded = 0
    started = time.perf_counter()
    for i in range(0, n, batch):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        requests = [_request(rng, users) for _ in range(min(batch, n - i))]
        watches = [Stopwatch(clock=time.thread_time) for _ in requests]
        answers = recommend_many(rt, requests, watches)
        degraded += sum(answer.degraded for answer in answers)
        # Every watch holds the whole batch's stages: count them once.
        for stage, seconds in watches[0].stages.items():
            stages[stage] += seconds
        if (i // batch + 1) % max(n // batch // 5, 1) == 0:
            log(f"{i + len(requests)}/{n} requests")
    return stages, degraded


def _hits(rt: ServingRuntime) -> tuple[int, int]:
    """Candidates whose item features came from the near caches, and from the store (the
    ``streamrec_api_item_features_total`` counter)."""
    def count(source: str) -> int:
        value = rt.metrics.registry.get_sample_value("streamrec_api_item_features_total",
                                                     {"source": source})
        return int(value or 0)

    return count("cache"), count("store")


def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    # One thread, as the API scores (STREAMREC_SERVING_TORCH_THREADS), from before the quick
    # training: a process that ran torch on 2 threads keeps an OpenMP worker spinning after
    # scoring calls, measured here at 700 ms CPU/s (7 ms per request) that the API never pays.
    torch.set_num_threads(1)
    users, config = build_shop(settings, args)
    promoted = train_models(settings, users, args.items, args.seed)
    spawn = multiprocessing.get_context("spawn")
    stop, written = spawn.Event(), spawn.Value("q", 0)
    writer = spawn.Process(target=live_writer,
                           args=(settings, config, args.write_rate, True, stop, written))
    rt = ServingRuntime(settings, ServingMetrics())
    rt.start()
    try:
        deadline = time.monotonic() + 180
        while not (rt.catalog.loaded and rt.models.get("ranker") and rt.models.get("online")):
            if time.monotonic() > deadline:
                raise RuntimeError("catalog or models never loaded")
            time.sleep(0.2)
        writer.start()
        while not written.value:
            time.sleep(0.2)
        rng = random.Random(args.seed)
        log(f"warm-up: {args.warmup} requests at {args.rate:g}/s …")
        _paced(rt, users, args.warmup, args.rate, args.batch, rng)
        me = psutil.Process()
        cpu = me.cpu_times()
        time.sleep(args.idle_seconds)
        after = me.cpu_times()
        idle_ms_per_s = ((after.user + after.system) - (cpu.user + cpu.system)) * 1000 / (
            args.idle_seconds)
        hits_before, misses_before = _hits(rt)
        cpu, wall = me.cpu_times(), time.perf_counter()
        log(f"measuring {args.requests} requests at {args.rate:g}/s …")
        stages, degraded = _paced(rt, users, args.requests, args.rate, args.batch, rng)
        after, elapsed = me.cpu_times(), time.perf_counter() - wall
        process_ms = ((after.user + after.system) - (cpu.user + cpu.system)) * 1000
        hits, misses = (a - b for a, b in zip(_hits(rt), (hits_before, misses_before),
                                              strict=True))
    finally:
        stop.set()
        if writer.pid is not None:
            writer.join(timeout=30)
            writer.kill()
        rt.close()
    n = args.requests
    per_stage = {stage: round(seconds * 1000 / n, 3) for stage, seconds in stages.items()
                 if stage not in ("queue", "total")}
    return {
        "pipeline_cpu_ms": round(stages["total"] * 1000 / n, 3),
        "stages_cpu_ms": per_stage,
        "process_cpu_ms_per_request": round((process_ms - idle_ms_per_s * elapsed) / n, 3),
        "process_idle_cpu_ms_per_s": round(idle_ms_per_s, 1),
        "item_features_hit_share": round(hits / max(hits + misses, 1), 4),
        "degraded": degraded,
        "requests": n,
        "batch": args.batch,
        "rate_per_s": args.rate,
        "write_rate_events_per_s": args.write_rate,
        "models": promoted,
        "online_store": settings.online_store,
        "users": args.users, "items": args.items, "events": args.events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=100.0,
                        help="Requests per second (the near caches' hit share depends on it).")
    parser.add_argument("--warmup", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=1,
                        help="Requests answered together (as the API batches those that "
                        "queued while its thread was busy); figures stay per request.")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--write-rate", type=float, default=1000.0)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        home = args.home or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="serve-cpu-")))
        bootstrap = stack.enter_context(broker(home))
        settings = Settings(home=home, kafka_bootstrap=bootstrap)
        ensure_topics(bootstrap, stream_topics(settings), settings.topic_partitions)
        report = run(settings, args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
