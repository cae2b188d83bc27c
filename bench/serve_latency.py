"""Recommendation latency under open-loop load, with 200 candidates and fresh features.

Setup (a temp home, or ``--home``):

* a simulated shop (``--users``, ``--items``, ``--events``) folded by the real-time engine
  into Feast's online store (``user_realtime``, ``item_realtime``), its catalog as
  ``item_profile`` rows and ``item_embeddings`` vectors (online and as Parquet parts, which
  the API indexes), co-visitation neighbours (``item_neighbors``) from the simulated
  sessions, and a ranker and an online model trained quickly on the users' recent items,
  promoted in the model registry;
* a local Kafka broker (``--no-kafka`` to leave it out);
* the API as ``--replicas`` single-process uvicorn servers, as ``streamrec api`` runs it,
  each on its own port, so the load generator does not share their interpreters; the
  client spreads requests over them as a least-request load balancer would
  (:class:`Balancer`);
* fresh features throughout: a live simulator keeps writing user and item rows at
  ``--write-rate`` events/s through the engine into the online store, as the feature writer
  does, and sends the same events to the ``events`` topic, which the API's trending feed
  reads; the API logs every answer's impression to Kafka.

Load: an asyncio client (uvloop, a minimal keep-alive HTTP/1.1 connection pool) sends
``POST /v1/recommendations`` for known users (recent items, co-visitation and trending fill
the 200 candidates) at fixed rates, each for ``--seconds``:
*open loop*, requests leave on schedule whether or not earlier ones have returned, and
latency is measured from the scheduled moment (no coordinated omission).
Per-stage timings come from the server itself (its ``Server-Timing`` header). A warm-up
(``--warmup-rate`` x ``--warmup-seconds``, 2,400 requests by default) runs first, so the
API's per-process caches are as warm as in a service that has been running a while.

Usage::

    .venv/bin/python bench/serve_latency.py [--rates 50,100,200,400] [--seconds 20]

Overload: the API answers a request it could not start within
``STREAMREC_SERVING_QUEUE_TIMEOUT_MS`` from its in-process fallback, flagged ``degraded``
(``overload``). Each rate reports the share of such answers, the percentiles of all answers
and of full ones (``full``), and per-stage server timings of full answers.

Progress goes to stderr; the last stdout line is one JSON object whose top-level
``p99_ms`` and ``errors`` are those at 200 requests/s (all answers; ``full_p99_ms`` and
``degraded_share`` beside them), with every rate under ``rates``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import uvloop

from features.definitions import TIMESTAMP_FIELD
from features.realtime import RealtimeFeatureEngine
from features.store import RANKER_SERVICE, OnlineFeatureReader, OnlineFeatureWriter, apply_repo
from streaming.broker import LocalKafka, free_port
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, Item
from streamrec.settings import Settings
from training.context_ranker import ContextRanker, ContextRankerConfig
from training.online_model import OnlineModel
from training.ranking_batch import RankingBatch
from training.registry import ModelRegistry

STAGES = ("queue", "user", "candidates", "features", "ranker", "online", "total")
GRAPH_DIM, TEXT_DIM = 64, 384
_INTERACTIONS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 4.0}


def log(msg: str) -> None:
    print(f"[serve_latency] {msg}", file=sys.stderr, flush=True)


# --- the shop ---------------------------------------------------------------------------------


def _vectors(items: list[Item], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Graph and text vectors with the structure of real ones: items of a category cluster."""
    rng = np.random.default_rng(seed)
    categories = sorted({i.category for i in items})
    graph_c = {c: rng.normal(size=GRAPH_DIM) for c in categories}
    text_c = {c: rng.normal(size=TEXT_DIM) for c in categories}
    graph = np.stack([graph_c[i.category] for i in items]) + 0.4 * rng.normal(
        size=(len(items), GRAPH_DIM))
    text = np.stack([text_c[i.category] for i in items]) + 0.4 * rng.normal(
        size=(len(items), TEXT_DIM))
    return graph.astype(np.float32), text.astype(np.float32)


def _neighbours(events: list[Event], n: int = 50) -> dict[str, tuple[list[str], list[float]]]:
    """Co-visitation: items of one session linked to the next five, weights summed."""
    sessions: dict[tuple[str, str | None], list[tuple[str, float]]] = defaultdict(list)
    for e in events:
        weight = _INTERACTIONS.get(e.event_type.value)
        if weight and e.item_id:
            sessions[(e.user_id, e.session_id)].append((e.item_id, weight))
    edges: dict[str, Counter[str]] = defaultdict(Counter)
    for seq in sessions.values():
        for i, (a, wa) in enumerate(seq):
            for b, wb in seq[i + 1 : i + 6]:
                if a != b:
                    edges[a][b] += (wa + wb) / 2
                    edges[b][a] += (wa + wb) / 2
    return {item: ([b for b, _ in c.most_common(n)], [w for _, w in c.most_common(n)])
            for item, c in edges.items()}


def build_shop(settings: Settings, args: argparse.Namespace) -> tuple[list[str], SimulatorConfig]:
    """Fill the home; returns the users with real-time features (and the world's config)."""
    started = time.perf_counter()
    apply_repo(settings)
    per_day = args.users * 0.6 * 12
    config = SimulatorConfig(n_users=args.users, n_items=args.items, n_categories=16,
                             seed=args.seed,
                             start=datetime.now(UTC) - timedelta(days=args.events / per_day))
    sim = Simulator(config)
    engine = RealtimeFeatureEngine()
    items = list(sim.catalog())
    for item in items:
        engine.catalog_update(item)
    events: list[Event] = []
    for record in sim.events(args.events):
        if isinstance(record, Item):
            engine.catalog_update(record)
            items.append(record)
        else:
            events.append(record)
    result = engine.apply(events)
    log(f"simulated {len(events)} events, {len(items)} items")
    now = datetime.now(UTC)
    graph, text = _vectors(items, args.seed)
    profiles = [{"item_id": i.item_id, TIMESTAMP_FIELD: now, "category": i.category,
                 "title": i.title, "price": i.price,
                 "created_at_s": int(i.created_at.timestamp())} for i in items]
    vectors = [{"item_id": i.item_id, TIMESTAMP_FIELD: now, "graph_vector": g,
                "text_vector": t} for i, g, t in zip(items, graph, text, strict=True)]
    neighbours = [{"item_id": item, TIMESTAMP_FIELD: now, "neighbors": ids,
                   "neighbor_weights": np.asarray(w, dtype=np.float32)}
                  for item, (ids, w) in _neighbours(events).items()]
    with OnlineFeatureWriter(settings) as writer:
        writer.write("user_realtime", [engine.user_row(u) for u in result.changed_users])
        writer.write("item_realtime", [engine.item_row(i) for i in result.changed_items])
        for view, rows in (("item_profile", profiles), ("item_embeddings", vectors),
                           ("item_neighbors", neighbours)):
            writer.write(view, rows)
        writer.append_offline("item_profile", profiles, part="bench")
        writer.append_offline("item_embeddings", vectors, part="bench")
    users = sorted(result.changed_users)
    log(f"online store filled in {time.perf_counter() - started:.0f}s: {len(users)} users, "
        f"{len(items)} items with vectors, {len(neighbours)} neighbour lists")
    return users, config


def training_rows(settings: Settings, users: list[str], n_items: int,
                  seed: int) -> tuple[RankingBatch, np.ndarray]:
    """Rows for quick models: each user's recent items as positives, random items as
    negatives, with their features from one online read. The models' quality does not
    matter here, only that scoring costs what it costs in production."""
    rng = np.random.default_rng(seed)
    chosen = [str(u) for u in rng.choice(users, size=min(400, len(users)), replace=False)]
    reader = OnlineFeatureReader(settings)
    recent = reader.read(["user_realtime:recent_items"], {"user_id": chosen})["recent_items"]
    pairs: list[tuple[str, str]] = []
    labels: list[float] = []
    for user, items in zip(chosen, recent, strict=True):
        positives = list(items or [])[:5]
        negatives = [f"i{j:06d}" for j in rng.integers(0, n_items, size=10)]
        pairs += [(user, item) for item in positives + negatives]
        labels += [1.0] * len(positives) + [0.0] * len(negatives)
    user_ids, item_ids = (list(column) for column in zip(*pairs, strict=True))
    rows = reader.read(RANKER_SERVICE, {"user_id": user_ids, "item_id": item_ids},
                       full_feature_names=True)
    reader.close()
    n = len(pairs)
    none = np.full(n, None, dtype=object)
    batch = RankingBatch(
        user_ids=np.array(user_ids, dtype=object), item_ids=np.array(item_ids, dtype=object),
        ts_s=np.full(n, time.time()), device=none, country=none.copy(),
        features={k: v for k, v in rows.items() if "__" in k},
    )
    return batch, np.array(labels)


def train_models(settings: Settings, users: list[str], n_items: int, seed: int) -> list[str]:
    """Train, register and promote a ranker and an online model; returns their versions."""
    batch, labels = training_rows(settings, users, n_items, seed)
    online = OnlineModel()
    online.learn(batch, labels.astype(bool))
    ranker = ContextRanker(ContextRankerConfig(epochs=3)).fit(batch, labels)
    registry = ModelRegistry.from_settings(settings)
    promoted = []
    for kind, model in (("ranker", ranker), ("online", online)):
        folder = settings.home / "build" / kind
        model.save(folder)
        version = registry.register(kind, folder, metrics={}, data_window={},
                                    features=[RANKER_SERVICE])
        registry.promote(kind, version.version)
        promoted.append(f"{kind}/{version.version}")
    log(f"promoted {', '.join(promoted)} (trained on {len(batch)} rows)")
    return promoted


def live_writer(settings: Settings, config: SimulatorConfig, rate: float, kafka: bool,
                stop: Any, events: Any) -> None:
    """Keeps features fresh (a process of its own): a live simulator's events through the
    engine into the store, users written every 100 ms and items every second, as the
    feature writer does; with ``kafka``, the events also go to the ``events`` topic, where
    the API's trending feed reads them."""
    engine = RealtimeFeatureEngine()
    stream = Simulator(SimulatorConfig(**{**config.__dict__, "live": True})).events()
    tick_s = 0.1
    last_items = time.monotonic()
    dirty_items: set[str] = set()
    producer = EventProducer(settings.kafka_bootstrap, settings.topic_events) if kafka else None
    with OnlineFeatureWriter(settings) as writer:
        while not stop.is_set():
            started = time.monotonic()
            batch = [r for r in (next(stream) for _ in range(int(rate * tick_s)))
                     if isinstance(r, Event)]
            if producer is not None:
                producer.send_many(batch)
                producer.flush(timeout=30)
            result = engine.apply(batch)
            writer.write("user_realtime", [engine.user_row(u) for u in result.changed_users])
            dirty_items |= result.changed_items
            if started - last_items >= 1.0:
                writer.write("item_realtime", [engine.item_row(i) for i in dirty_items])
                dirty_items.clear()
                last_items = started
            with events.get_lock():
                events.value += len(batch)
            stop.wait(max(0.0, tick_s - (time.monotonic() - started)))


# --- the API process --------------------------------------------------------------------------


def start_api(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    """One API replica as ``streamrec api`` runs it: a single uvicorn process."""
    env = {
        **os.environ,
        "STREAMREC_HOME": str(settings.home),
        "STREAMREC_ONLINE_STORE": settings.online_store,
        "STREAMREC_REDIS_URL": settings.redis_url,
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMREC_SERVING_MODEL_POLL_S": "2",
    }
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "serving.app:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--no-access-log",
           # The load keeps connections busy; idle ones between rates must not be cut.
           "--timeout-keep-alive", "120"]
    return subprocess.Popen(cmd, env=env)


def stop_api(api: subprocess.Popen[bytes]) -> None:
    """Stop one replica, forcibly if a backlog keeps it busy."""
    api.terminate()
    try:
        api.wait(timeout=30)
    except subprocess.TimeoutExpired:
        api.kill()
        api.wait(timeout=30)


def wait_ready(base: str, timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            checks = httpx.get(f"{base}/readyz", timeout=5).json()["checks"]
            if all(check["ok"] for check in checks.values()):
                return checks
        except (httpx.HTTPError, KeyError, ValueError):
            checks = None
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API never became ready: {checks}")
        time.sleep(0.5)


# --- load -------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    a = np.asarray(values)
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}


class Connections:
    """A minimal HTTP/1.1 keep-alive client for one endpoint: a few syscalls per request.

    httpx costs milliseconds of CPU per request, which on two cores would make the load
    generator itself the bottleneck at a few hundred requests per second.
    """

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port = host, port
        self.head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of one request."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if value:
                    headers[name.strip().lower()] = value.strip()
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, headers, payload

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class Balancer:
    """Spreads requests over API replicas as a least-request load balancer does (Envoy's
    ``LEAST_REQUEST``, nginx's ``least_conn``): each goes to the replica with the fewest
    requests in flight, ties taken in turn.

    Keep-alive connections to one multi-worker uvicorn stick to the worker that accepted
    them, and a client reusing its most recent connection sends most requests to one of
    them: measured here, 709 vs 446 ms CPU/s across two workers at 150 requests/s, so the
    busier one queued while the other idled. Replicas behind a balancer are how
    ``streamrec api`` is scaled (one process each), and what this measures.
    """

    def __init__(self, ports: list[int], path: str) -> None:
        self.replicas = [Connections("127.0.0.1", port, path) for port in ports]
        self.in_flight = [0] * len(ports)
        self._turn = 0

    async def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        n = len(self.replicas)
        self._turn = (self._turn + 1) % n
        pick = min(range(n), key=lambda i: (self.in_flight[i], (i - self._turn) % n))
        self.in_flight[pick] += 1
        try:
            return await self.replicas[pick].post(body)
        finally:
            self.in_flight[pick] -= 1

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


async def _run_rate(ports: list[int], users: list[str], rate: float, seconds: float,
                    rng: random.Random) -> dict[str, Any]:
    n = int(rate * seconds)
    latencies: list[float] = []
    full: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    degraded = 0
    devices, countries = ("mobile", "desktop", "tablet"), ("DE", "US", "FR", "GB", "JP")
    client = Balancer(ports, "/v1/recommendations")

    async def one(scheduled: float, body: bytes) -> None:
        nonlocal degraded
        try:
            status, headers, payload = await asyncio.wait_for(client.post(body), timeout=10)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            return
        done = time.perf_counter()
        if status != 200:
            errors[f"http_{status}"] += 1
            return
        latency = (done - scheduled) * 1000
        latencies.append(latency)
        if b'"degraded":true' in payload:
            degraded += 1
            fallbacks.update(json.loads(payload)["fallbacks"])
            return
        full.append(latency)
        for part in headers.get("server-timing", "").split(","):
            name, _, dur = part.strip().partition(";dur=")
            if dur:
                stages[name].append(float(dur))

    tasks = []
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = json.dumps({
            "user_id": rng.choice(users), "k": 10,
            "context": {"device": rng.choice(devices), "country": rng.choice(countries)},
        }).encode()
        tasks.append(asyncio.create_task(one(scheduled, body)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    client.close()
    return {
        "requests": n,
        "achieved_rps": round(n / elapsed, 1),
        **_percentiles(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "degraded_share": round(degraded / max(len(latencies), 1), 4),
        "fallbacks": dict(fallbacks),
        "full": _percentiles(full),
        "stages": {s: _percentiles(stages[s]) for s in STAGES},
    }


async def _drain(ports: list[int], user: str, timeout_s: float = 180.0) -> None:
    """Wait until every replica answers promptly again: a rate must not inherit the backlog
    of the one before (requests the client gave up on are still computed)."""
    body = json.dumps({"user_id": user}).encode()
    deadline = time.perf_counter() + timeout_s
    for port in ports:
        client = Connections("127.0.0.1", port, "/v1/recommendations")
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await client.post(body)
                if time.perf_counter() - started < 0.1:
                    break
                await asyncio.sleep(0.5)
        finally:
            client.close()


def _batches(ports: list[int]) -> tuple[float, float, float]:
    """Requests, batches and requests answered alone so far, over the replicas (their
    ``streamrec_api_batch_size`` histograms)."""
    total = [0.0, 0.0, 0.0]
    wanted = {"streamrec_api_batch_size_sum": 0, "streamrec_api_batch_size_count": 1,
              'streamrec_api_batch_size_bucket{le="1.0"}': 2}
    for port in ports:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text.splitlines():
            name, _, value = line.rpartition(" ")
            if name in wanted:
                total[wanted[name]] += float(value)
    return total[0], total[1], total[2]


def _batching(before: tuple[float, float, float], after: tuple[float, float, float]
              ) -> dict[str, float]:
    """Mean requests per batch and the share of requests answered in a batch of several."""
    requests, batches, alone = (a - b for a, b in zip(after, before, strict=True))
    return {"requests_per_batch": round(requests / max(batches, 1), 2),
            "batched_share": round(1 - alone / max(requests, 1), 4)}


def _stage_line(result: dict[str, Any]) -> str:
    return ", ".join(f"{s} {result['stages'][s]['p99_ms']}" for s in STAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,100,200,400")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--write-rate", type=float, default=1000.0,
                        help="Live events per second written into the store during the load.")
    parser.add_argument("--kafka", action=argparse.BooleanOptionalAction, default=True,
                        help="Run a local broker: live events feed the API's trending "
                        "counts, impressions are logged (--no-kafka: neither).")
    parser.add_argument("--replicas", type=int, default=2,
                        help="API replicas (one process each, load spread by least requests "
                        "in flight); one per core uses them all.")
    parser.add_argument("--online-store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--redis-url", default=None,
                        help="Redis of --online-store redis (default: a private redis-server "
                        "started for the run).")
    parser.add_argument("--home", type=Path, default=None,
                        help="Where to build the shop (default: a temp folder).")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--warmup-rate", type=float, default=80.0)
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="How long the API's CPU is measured without requests first.")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    with contextlib.ExitStack() as stack:
        home = args.home or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="serve-latency-")))
        home.mkdir(parents=True, exist_ok=True)  # a private redis-server runs in it
        redis_url = stack.enter_context(online_store(args, home))
        # Without a broker the API's trending feed and impression log keep retrying in the
        # background (impressions are dropped and counted).
        bootstrap = (stack.enter_context(broker(home)) if args.kafka
                     else f"127.0.0.1:{free_port()}")
        settings = Settings(home=home, online_store=args.online_store, redis_url=redis_url,
                            kafka_bootstrap=bootstrap)
        if args.kafka:
            ensure_topics(bootstrap, stream_topics(settings), settings.topic_partitions)
        report = run(settings, args, rates)
    print(json.dumps(report))


@contextlib.contextmanager
def broker(home: Path) -> Iterator[str]:
    """A local Kafka broker for the run; yields its bootstrap address."""
    kafka = LocalKafka.on_free_ports(home / "kafka", cache_dir=Settings().cache_dir,
                                     heap="384m")
    log("starting a local broker …")
    kafka.start(quiet=True)
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop()


@contextlib.contextmanager
def online_store(args: argparse.Namespace, home: Path) -> Iterator[str]:
    """The Redis URL to use: ``--redis-url``, or a private redis-server for the run."""
    if args.online_store != "redis" or args.redis_url is not None:
        yield args.redis_url or "redis://127.0.0.1:6379/0"
        return
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(home)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(settings: Settings, args: argparse.Namespace, rates: list[float]) -> dict[str, Any]:
    users, config = build_shop(settings, args)
    promoted = train_models(settings, users, args.items, args.seed)
    spawn = multiprocessing.get_context("spawn")
    stop, written = spawn.Event(), spawn.Value("q", 0)
    writer = spawn.Process(target=live_writer,
                           args=(settings, config, args.write_rate, args.kafka, stop, written))
    ports = [free_port() for _ in range(args.replicas)]
    apis = [start_api(settings, port) for port in ports]
    base = f"http://127.0.0.1:{ports[0]}"
    results: dict[str, Any] = {}
    try:
        for port in ports:
            checks = wait_ready(f"http://127.0.0.1:{port}")
        log(f"API ready: {json.dumps({k: v['detail'] for k, v in checks.items()})}")
        writer.start()
        while not written.value:  # the writer's imports take a while
            time.sleep(0.2)
        rng = random.Random(args.seed)
        servers = [psutil.Process(api.pid) for api in apis]

        def replica_cpu_s() -> list[float]:
            return [_cpu_s(server) for server in servers]

        def server_cpu_s() -> float:
            return sum(replica_cpu_s())

        parts = {"writer": psutil.Process(writer.pid), "load_generator": psutil.Process()}

        def machine_cpu_s(api_s: float) -> dict[str, float]:
            """CPU seconds so far of the API (``api_s``), the writer, this process and the
            whole box."""
            times = psutil.cpu_times()
            return {"api": api_s,
                    **{name: _cpu_s(process) for name, process in parts.items()},
                    "machine": sum(getattr(times, field, 0.0) for field in
                                   ("user", "nice", "system", "irq", "softirq"))}

        # Warm-up: connections, and the per-process caches a running service has warm (each
        # seed's neighbours, each candidate's ranker parts, item features); without it the
        # first rates would measure a cold start of 10,000 items.
        log(f"warm-up: {args.warmup_rate:g} requests/s for {args.warmup_seconds:g} s …")
        uvloop.run(_run_rate(ports, users, args.warmup_rate, args.warmup_seconds, rng))
        # What the API burns without requests (trending feed, catalog and model polls):
        # part of every rate's CPU per request, the more so the lower the rate.
        cpu_before = server_cpu_s()
        time.sleep(args.idle_seconds)
        idle_cpu_ms_per_s = (server_cpu_s() - cpu_before) * 1000 / args.idle_seconds
        log(f"idle API: {idle_cpu_ms_per_s:.1f} ms CPU per second")
        for rate in rates:
            batches_before = _batches(ports)
            replicas_before = replica_cpu_s()
            machine_before = machine_cpu_s(sum(replicas_before))
            events_before = written.value
            started = time.perf_counter()
            result = uvloop.run(_run_rate(ports, users, rate, args.seconds, rng))
            elapsed = time.perf_counter() - started
            replicas_after = replica_cpu_s()
            used = [after - before for after, before in
                    zip(replicas_after, replicas_before, strict=True)]
            cpu_ms = sum(used) * 1000
            # How evenly the balancer spread the work (each replica's CPU, ms per second).
            result["replica_cpu_ms_per_s"] = [round(u * 1000 / elapsed, 1) for u in used]
            # Where the box's 2 cores went: everything shares them.
            result["cpu_ms_per_s"] = _budget(machine_before,
                                             machine_cpu_s(sum(replicas_after)), elapsed)
            result["server_cpu_ms_per_request"] = round(cpu_ms / max(result["requests"], 1), 2)
            result["server_cpu_ms_per_request_beyond_idle"] = round(
                (cpu_ms - idle_cpu_ms_per_s * args.seconds) / max(result["requests"], 1), 2)
            result["live_events_per_s"] = round(
                (written.value - events_before) / args.seconds, 1)
            result["batching"] = _batching(batches_before, _batches(ports))
            results[f"{rate:g}"] = result
            log(f"{rate:g} rps: server CPU {result['server_cpu_ms_per_request']} ms per request "
                f"({result['server_cpu_ms_per_request_beyond_idle']} beyond idle); "
                f"p50 {result['p50_ms']} p95 {result['p95_ms']} p99 "
                f"{result['p99_ms']} ms, errors {result['errors']}, degraded "
                f"{result['degraded_share']:.1%} {result['fallbacks']}; full answers p99 "
                f"{result['full']['p99_ms']} ms, server p99 per stage: {_stage_line(result)}; "
                f"CPU ms/s {result['cpu_ms_per_s']}; batching {result['batching']}")
            uvloop.run(_drain(ports, users[0]))
        metrics = httpx.get(f"{base}/metrics", timeout=60).text
    finally:
        stop.set()
        if writer.pid is not None:
            writer.join(timeout=30)
            writer.kill()
        for api in apis:
            stop_api(api)
    at_200 = results.get("200", {})
    return {
        "p99_ms": at_200.get("p99_ms"),
        "errors": at_200.get("errors"),
        "full_p99_ms": at_200.get("full", {}).get("p99_ms"),
        "degraded_share": at_200.get("degraded_share"),
        "rates": results,
        "server_idle_cpu_ms_per_s": round(idle_cpu_ms_per_s, 1),
        "candidates_per_request": _candidates_per_request(metrics),
        "models": promoted,
        "warmup_requests": int(args.warmup_rate * args.warmup_seconds),
        "online_store": args.online_store,
        "api_replicas": args.replicas,
        "users": args.users, "items": args.items, "events": args.events,
        "write_rate_events_per_s": args.write_rate,
        "kafka": args.kafka,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _budget(before: dict[str, float], after: dict[str, float],
            elapsed_s: float) -> dict[str, float]:
    """CPU ms per second of each part between two :func:`machine_cpu_s` snapshots; ``other``
    is the rest of the machine (the broker, a Redis server, the OS), ``idle`` what was left
    of all cores."""
    used = {name: (after[name] - before[name]) * 1000 / elapsed_s for name in after}
    machine = used.pop("machine")
    out = {name: round(ms, 1) for name, ms in used.items()}
    out["other"] = round(max(machine - sum(used.values()), 0.0), 1)
    out["idle"] = round(max((os.cpu_count() or 1) * 1000 - machine, 0.0), 1)
    return out


def _candidates_per_request(metrics: str) -> float | None:
    """Mean candidates per full (feature-reading) request of the worker that answered
    ``/metrics``."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("streamrec_api_candidates_sum"):
            total += float(line.split()[-1])
        elif line.startswith('streamrec_api_stage_seconds_count{stage="features"}'):
            count = float(line.split()[-1])
    return round(total / count, 1) if count else None


if __name__ == "__main__":
    main()
