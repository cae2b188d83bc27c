"""Latency of the context ranker for one request of 200 candidates, eager and TorchScript.

A request is built as serving builds it: ``RankingBatch.for_request`` over one user and 200
candidate items with every column of the ``ranker_features`` service. The values are
real: the user's and items' point-in-time features at a labelled moment of the home's
offline store (``training.dataset.point_in_time_features``), plus a 64-d graph and a
384-d text vector per candidate (random unit vectors when the home has no embedding job
output yet: the cost does not depend on their values). 10 % of the candidates are ids the
model never saw.

Timed: ``ContextRanker.score(batch)`` — encoding (numeric features, hashing, vector
tables) plus the network — for ``--requests`` requests after a warm-up, on
``--threads`` torch threads, with the eager network (``load(optimize=False)``) and with
the frozen TorchScript graph serving uses (``load()``). ``forward_*`` time the network
alone; ``*cpu_*`` are the calling thread's CPU time (with one thread, what a call costs
on an idle core).

Usage::

    .venv/bin/python bench/context_ranker_latency.py --home DIR [--requests 500]

DIR is a home with a champion ranker in its registry (``streamrec train`` ran on it).
Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from features.definitions import TIMESTAMP_FIELD
from streamrec.settings import Settings
from training.context_ranker import GRAPH, GRAPH_DIM, TEXT, TEXT_DIM, ContextRanker
from training.dataset import point_in_time_features
from training.labels import event_log_end, read_labelled_examples
from training.ranking_batch import RankingBatch
from training.registry import ModelRegistry

CANDIDATES = 200


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def requests(settings: Settings, ranker: ContextRanker, n: int, seed: int) -> list[RankingBatch]:
    """``n`` requests of 200 candidates with real point-in-time features."""
    rng = np.random.default_rng(seed)
    end = event_log_end(settings)
    assert end is not None, "the home has no event log"
    examples = read_labelled_examples(settings, end - timedelta(days=30), end).to_pandas()
    picks = examples.drop_duplicates("request_id").sample(n, random_state=seed, replace=True)
    known = ranker.vocab.ids
    out = []
    for row in picks.itertuples():
        items = [known[i] for i in rng.choice(len(known), CANDIDATES - 20, replace=False)]
        items += [f"unseen-{row.Index}-{k}" for k in range(20)]
        entities = pd.DataFrame({"user_id": [row.user_id] * CANDIDATES, "item_id": items,
                                 TIMESTAMP_FIELD: [row.ts - timedelta(microseconds=1)]
                                 * CANDIDATES})
        features = point_in_time_features(settings, entities)
        # As the online reader returns them: None where the store has no value.
        columns = {
            c: [None if isinstance(v, float) and math.isnan(v) else v for v in features[c]]
            for c in features.columns
        }
        if all(v is None for v in columns.get(GRAPH, [None])):
            columns[GRAPH] = [_unit(rng, GRAPH_DIM) for _ in items]
            columns[TEXT] = [_unit(rng, TEXT_DIM) for _ in items]
        out.append(RankingBatch.for_request(row.user_id, items, columns,
                                            ts_s=row.ts.timestamp(), device=row.device,
                                            country=row.country))
    return out


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000.0
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


def timed(ranker: ContextRanker, batches: list[RankingBatch], rounds: int) -> dict[str, float]:
    """Wall and CPU time percentiles of ``score`` and of the network alone.

    On a shared machine a call also waits for a core; its CPU time (one thread: the
    calling thread's) is what it would take on an idle one.
    """
    for batch in batches[:20]:
        ranker.score(batch)  # warm-up
    wall, cpu, forward, forward_cpu = [], [], [], []
    for _ in range(rounds):
        for batch in batches:
            t0, c0 = time.perf_counter(), time.thread_time()
            ranker.score(batch)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        encoded = [ranker._encode(b).inputs(slice(None)) for b in batches]
        with torch.inference_mode():
            for inputs in encoded:
                t0, c0 = time.perf_counter(), time.thread_time()
                ranker._forward(*inputs)  # type: ignore[misc]
                forward.append(time.perf_counter() - t0)
                forward_cpu.append(time.thread_time() - c0)
    out: dict[str, float] = {}
    for name, values in (("", wall), ("cpu_", cpu), ("forward_", forward),
                         ("forward_cpu_", forward_cpu)):
        p50, p99 = _percentiles(values)
        out[f"{name}p50_ms"], out[f"{name}p99_ms"] = p50, p99
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=100, help="Distinct requests.")
    parser.add_argument("--rounds", type=int, default=5, help="Passes over the requests.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(home=args.home)
    folder = ModelRegistry.from_settings(settings).open("ranker")
    ranker = ContextRanker.load(folder, optimize=False)
    print(f"building {args.requests} requests from {args.home} ...", file=sys.stderr)
    batches = requests(settings, ranker, args.requests, seed=0)
    eager = timed(ranker, batches, args.rounds)
    print(f"eager: {eager}", file=sys.stderr)
    optimized = timed(ContextRanker.load(folder), batches, args.rounds)
    print(f"torchscript: {optimized}", file=sys.stderr)
    result = {
        "candidates": CANDIDATES,
        "requests_timed": args.requests * args.rounds,
        "threads": args.threads,
        "params": ranker.param_count,
        **{f"eager_{k}": v for k, v in eager.items()},
        **{f"torchscript_{k}": v for k, v in optimized.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
