"""``streamrec demo``: the whole pipeline locally, on embedded defaults, with live progress.

What runs (state under ``$STREAMREC_HOME``, logs in ``$STREAMREC_HOME/logs/``):

1. a real Kafka broker (KRaft), started unless one already answers; the Feast repository,
   applied (SQLite online store, Parquet offline store);
2. the stream workers as separate processes, as in production: the feature writer, the
   archiver and the catalog worker;
3. **history**: a week of simulated shop traffic, streamed at full speed with its original
   (past) timestamps, so that batch and training have something to learn from;
4. **batch**: ``streamrec batch all`` — Spark historical features, the item graph and its
   embeddings, MiniLM text embeddings and the cold-start projection, all into Feast;
5. **training**: ``streamrec train`` — labels from impressions, a point-in-time training set
   from Feast, the first ranker, registered and promoted;
6. **serving**: the online learner and the API start; the same simulated world then goes
   live at a steady rate (plus a few deliberately broken records) while one probe measures
   event → online-feature freshness and another requests recommendations and measures
   their latency.

It then prints where to look (API, dashboard, logs) and a summary of what was measured, and
keeps serving until Ctrl-C (``--no-serve`` exits after the summary). Ctrl-C at any point
stops every process it started, cleanly.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pyarrow.dataset as ds
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from streaming.archiver import events_dir
from streaming.broker import LocalKafka, broker_answers
from streaming.dlq import read_dlq
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, Item
from streamrec.settings import Settings

STREAM_WORKERS = ("features", "archiver", "catalog")
"""Workers running from the start (``streamrec worker <name>``)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo streams and how fast.

    Parameters
    ----------
    history_days
        Days of past traffic streamed before the batch and training steps, all of them
        labelled for the first ranker: four weeks (≈ 480k labelled examples) let it beat
        popularity on the holdout and be promoted, one week (≈ 120k) did not.
    history_events
        At most this many history events (the simulator makes ≈ 7,500 a day).
    live_events, rate
        Live events after serving starts, and their rate (events/s).
    request_rate
        Recommendation requests per second of the latency probe.
    serve
        Keep everything running after the summary until Ctrl-C.
    keep_kafka
        Leave a broker the demo started running afterwards.
    """

    history_days: float = 28.0
    history_events: int = 300_000
    live_events: int = 20_000
    rate: float = 1_000.0
    request_rate: float = 20.0
    serve: bool = True
    keep_kafka: bool = False
    seed: int = field(default_factory=lambda: int(time.time()) % 10_000)


def broken_records(run: str) -> list[bytes]:
    """Three invalid records, tagged with the run so the summary finds this run's."""
    base = {"event_type": "view", "user_id": f"demo-{run}", "item_id": "i1"}
    return [
        f"{{not json, demo-{run}".encode(),
        json.dumps({**base, "event_id": "not-a-uuid", "ts": "2026-01-01T00:00:00Z"}).encode(),
        json.dumps({**base, "event_id": str(uuid.uuid4()), "ts": "2026-01-01 00:00:00"}).encode(),
    ]


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


@dataclass
class _Probe:
    """Measures produce → readable-online for sampled events, from outside the workers."""

    settings: Settings
    delays_ms: list[float] = field(default_factory=list)
    _pending: list[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self, event: Event) -> None:
        with self._lock:
            if len(self._pending) < 20:
                self._pending.append(event)

    def run(self) -> None:
        from features.definitions import USER_VIEW
        from features.store import OnlineFeatureReader

        reader = OnlineFeatureReader(self.settings)
        ref = [f"{USER_VIEW.name}:last_event_ts"]
        try:
            while not self._stop.is_set():
                with self._lock:
                    pending = list(self._pending)
                if pending:
                    got = reader.read(ref, {USER_VIEW.join_key: [e.user_id for e in pending]})
                    now = time.time()
                    done = [
                        e
                        for e, ts in zip(pending, got["last_event_ts"], strict=True)
                        if ts is not None and ts >= e.ts.timestamp() - 1e-6
                    ]
                    with self._lock:
                        for e in done:
                            self.delays_ms.append((now - e.ts.timestamp()) * 1000)
                            self._pending.remove(e)
                time.sleep(0.01)
        finally:
            reader.close()

    def stop(self) -> None:
        self._stop.set()


@dataclass
class _RecommendationProbe:
    """Requests recommendations for recently active users at a steady rate; keeps latencies."""

    url: str
    rate: float
    users: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    degraded: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self, event: Event) -> None:
        context = {}
        if event.context is not None:
            if event.context.device is not None:
                context["device"] = event.context.device.value
            if event.context.country is not None:
                context["country"] = event.context.country
        with self._lock:
            self.users.append((event.user_id, context))
            del self.users[:-500]

    def run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                with self._lock:
                    pick = rng.choice(self.users) if self.users else None
                if pick is not None:
                    self._request(client, *pick)
                next_at += 1.0 / self.rate
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _request(self, client: httpx.Client, user_id: str, context: dict[str, str]) -> None:
        started = time.perf_counter()
        try:
            response = client.post(
                "/v1/recommendations", json={"user_id": user_id, "context": context, "k": 10}
            )
        except httpx.HTTPError:
            self.errors += 1
            return
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            self.errors += 1
        elif response.json().get("degraded"):
            self.degraded += 1

    def stop(self) -> None:
        self._stop.set()


def _ensure_broker(settings: Settings) -> LocalKafka | None:
    """Reuse a broker that already answers; else start the local one. Returns what we started."""
    if broker_answers(settings.kafka_bootstrap, timeout_s=2):
        _say(f"using the Kafka broker already answering at {settings.kafka_bootstrap}")
        return None
    broker = LocalKafka.from_settings(settings)
    _say(f"starting a local Kafka broker (KRaft) on {broker.bootstrap} …")
    started = time.monotonic()
    broker.start()
    _say(f"Kafka is up in {time.monotonic() - started:.1f}s (log: {broker.log_file})")
    return broker


class _Processes:
    """The child processes of the demo: started in their own session, stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = {
            **os.environ,
            "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "STREAMREC_HOME": str(settings.home),
        }
        self.logs = settings.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        # A session of its own: the terminal's Ctrl-C reaches only the demo, which then
        # stops the children in order instead of having them all die mid-write.
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamrec", *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running[name] = proc
        return proc

    def exited(self) -> list[str]:
        return [name for name, p in self.running.items() if p.poll() is not None]

    def stop(self, names: Iterable[str] | None = None) -> None:
        chosen = {n: self.running[n] for n in (names or list(self.running))}
        for proc in chosen.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in chosen.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _say(f"{name} did not stop in time; killing it")
                proc.kill()
                proc.wait()
            self.running.pop(name, None)


def _group_lag(bootstrap: str, group: str, topics: Sequence[str]) -> int | None:
    """Records of ``topics`` not yet committed by ``group``; ``None`` before its first commit."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="demo-lag")
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), client_id="demo-lag")
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        parts = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or []
        ]
        ends = consumer.end_offsets(parts)
        if not any(tp in committed for tp in parts):
            return None if any(ends.values()) else 0
        return sum(ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in parts)
    finally:
        consumer.close()
        admin.close()


def _wait_until_consuming(
    settings: Settings, procs: _Processes, groups: Sequence[str], stop: threading.Event,
    timeout_s: float = 180,
) -> bool:
    """Wait until the workers' consumer groups are stable (imports + group join)."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap.split(","), client_id="demo-ready"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not stop.is_set():
            if procs.exited():
                return False
            try:
                described = admin.describe_groups(list(groups))
            except KafkaError:
                # A fresh broker creates its group coordinator lazily; ask again shortly.
                time.sleep(0.5)
                continue
            if all(
                described[g]["group_state"] == "Stable" and described[g]["members"]
                for g in groups
            ):
                return True
            time.sleep(0.5)
        return False
    finally:
        admin.close()


def _drain(
    settings: Settings, procs: _Processes, stop: threading.Event, timeout_s: float = 300
) -> bool:
    """Wait until every stream worker has committed everything produced so far."""
    # The topics the demo itself produces to; `impressions` is left out: the API keeps
    # logging the probe's slates to it, so its lag need never reach zero.
    produced = [settings.topic_events, settings.topic_items]
    lags = {
        settings.feature_writer_group: produced,
        settings.archiver_group: produced,
        settings.catalog_group: [settings.topic_items],
    }
    deadline = time.monotonic() + timeout_s
    last = 0.0
    while time.monotonic() < deadline and not stop.is_set():
        try:
            left = {g: _group_lag(settings.kafka_bootstrap, g, t) for g, t in lags.items()}
        except KafkaError:
            time.sleep(1)
            continue
        if all(v == 0 for v in left.values()):
            return True
        if procs.exited():
            _say(f"a worker exited early ({', '.join(procs.exited())}); see its log")
            return False
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            _say("draining: " + " · ".join(f"{g} lag {v if v is not None else '…'}"
                                           for g, v in left.items()))
        time.sleep(1)
    return False


def _run_step(procs: _Processes, name: str, args: Sequence[str], stop: threading.Event) -> bool:
    """Run one ``streamrec`` command to completion, echoing its progress lines."""
    _say(f"{name}: streamrec {' '.join(args)}")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamrec", *args],
        env=procs.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    with open(procs.logs / f"{name}.log", "a") as log:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if stop.is_set():
                proc.terminate()
                break
            line = line.rstrip()
            if line and not line.startswith(("WARN", "Using", "Setting default", "To adjust")):
                print(f"    {line[:160]}", flush=True)
    code = proc.wait()
    ok = code == 0 and not stop.is_set()
    _say(f"{name}: {'done' if ok else f'FAILED (exit {code})'} in "
         f"{time.monotonic() - started:.0f}s")
    return ok


def _wait_ready(url: str, procs: _Processes, stop: threading.Event, timeout_s: float = 180) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        if "api" in procs.exited():
            return False
        try:
            # Serving, not necessarily ready: without a promoted ranker (the gate may refuse
            # the first one on little data) the API answers from its fallbacks, flagged.
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                checks = httpx.get(f"{url}/readyz", timeout=5).json().get("checks", {})
                missing = [name for name, check in checks.items() if not check.get("ok")]
                if missing:
                    _say(f"serving degraded until these are ready: {', '.join(missing)}")
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    return False


@dataclass
class _Streamed:
    ids: set[str] = field(default_factory=set)
    items: int = 0
    seconds: float = 0.0


def _stream(
    settings: Settings,
    records: Iterable[Event | Item],
    *,
    rate: float | None,
    stop: threading.Event,
    until: datetime | None = None,
    watch: Sequence[_Probe | _RecommendationProbe] = (),
    label: str,
) -> _Streamed:
    """Produce ``records`` at ``rate`` events/s (``None``: full speed) until ``until``."""
    out = _Streamed()
    started = last_report = time.monotonic()
    with EventProducer(
        settings.kafka_bootstrap, settings.topic_events, settings.topic_items
    ) as producer:
        for rec in records:
            if stop.is_set():
                break
            if isinstance(rec, Item):
                producer.send_item(rec)
                out.items += 1
                continue
            if until is not None and rec.ts >= until:
                break
            producer.send(rec)
            out.ids.add(rec.event_id)
            n = len(out.ids)
            if watch and n % 97 == 0:
                producer.flush()
                for w in watch:
                    w.watch(rec)
            if rate is not None:
                ahead = n / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            now = time.monotonic()
            if now - last_report >= 3:
                last_report = now
                try:
                    lag = _group_lag(settings.kafka_bootstrap, settings.feature_writer_group,
                                     [settings.topic_events, settings.topic_impressions])
                except KafkaError:
                    lag = None
                _say(f"{label}: produced {n:,} ({n / (now - started):,.0f}/s), "
                     f"event time {rec.ts:%Y-%m-%d %H:%M} · feature-writer lag "
                     f"{'…' if lag is None else f'{lag:,}'}")
    out.seconds = time.monotonic() - started
    return out


def run_demo(settings: Settings, options: DemoOptions | None = None) -> int:
    """Run the demo; returns a process exit code (0 when every stage worked)."""
    from features.store import apply_repo

    options = options or DemoOptions()
    broker = _ensure_broker(settings)
    if broker is not None:
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    settings = settings.model_copy(update={"home": settings.home.resolve()})
    stop = threading.Event()
    # Ctrl-C, or a `kill` from a supervisor: either way the workers and the broker stop too.
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    procs = _Processes(settings)
    try:
        ensure_topics(settings.kafka_bootstrap, stream_topics(settings), settings.topic_partitions)
        _say("applying the Feast feature repository (SQLite online store, Parquet offline) …")
        apply_repo(settings)
        for name in STREAM_WORKERS:
            procs.start(name, ["worker", name])
        _say(f"started the stream workers ({', '.join(STREAM_WORKERS)}); logs in {procs.logs}")
        groups = [settings.feature_writer_group, settings.archiver_group, settings.catalog_group]
        if not _wait_until_consuming(settings, procs, groups, stop):
            _say(f"the workers did not start consuming; see {procs.logs}")
            return 1
        _say("the stream workers are consuming")
        return _run(settings, options, procs, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if procs.running:
            _say("stopping " + ", ".join(procs.running) + " …")
        procs.stop()
        if broker is not None and not options.keep_kafka:
            _say("stopping Kafka …")
            broker.stop()
        elif broker is not None:
            _say(f"Kafka keeps running at {broker.bootstrap}; stop it with 'streamrec kafka down'")


def _run(settings: Settings, options: DemoOptions, procs: _Processes,
         stop: threading.Event) -> int:
    now = datetime.now(UTC)
    history = Simulator(
        SimulatorConfig(seed=options.seed, start=now - timedelta(days=options.history_days))
    )
    _say(f"history: up to {options.history_events:,} simulated events over the past "
         f"{options.history_days:g} days, at full speed")
    records = itertools.chain(history.catalog(), history.events(options.history_events))
    past = _stream(settings, records, rate=None, stop=stop, until=now - timedelta(minutes=1),
                   label="history")
    if stop.is_set() or not _drain(settings, procs, stop):
        return 1
    _say(f"history: {len(past.ids):,} events and {past.items:,} catalog items in "
         f"{past.seconds:.0f}s, processed by every stream worker")

    end = datetime.now(UTC).isoformat(timespec="seconds")
    if not _run_step(procs, "batch", ["batch", "all", "--end", end], stop):
        return 1
    # Every day of the history is labelled: the ranker needs all of it to beat popularity.
    window = ["--window-days", f"{options.history_days:g}"]
    if not _run_step(procs, "train", ["train", *window], stop):
        return 1

    url = f"http://{settings.api_host}:{settings.api_port}"
    procs.start("learner", ["worker", "learner"])
    procs.start("api", ["api"])
    _say(f"starting the online learner and the API on {url} …")
    if not _wait_ready(url, procs, stop):
        _say(f"the API did not become ready; see {procs.logs / 'api.log'}")
        return 1
    _say("the API is serving")

    run = uuid.uuid4().hex[:8]
    broken = broken_records(run)
    probe = _Probe(settings)
    recs = _RecommendationProbe(url, options.request_rate)
    threads = [threading.Thread(target=p.run, daemon=True) for p in (probe, recs)]
    for t in threads:
        t.start()
    live = Simulator(SimulatorConfig(seed=options.seed, live=True))
    _say(f"live: {options.live_events:,} events at {options.rate:,.0f}/s plus {len(broken)} "
         f"broken records; recommendations requested at {options.request_rate:g}/s")
    streamed = _stream(settings, live.events(options.live_events), rate=options.rate,
                       stop=stop, watch=(probe, recs), label="live")
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","), acks="all")
    for bad in broken:
        raw.send(settings.topic_events, key=b"demo", value=bad)
    raw.flush()
    raw.close()
    drained = _drain(settings, procs, stop)
    time.sleep(1.5)  # the archiver's last batch, the probes' last reads
    probe.stop()
    recs.stop()
    for t in threads:
        t.join(timeout=10)
    code = _summary(settings, run, streamed, probe, recs, url, drained)
    if options.serve and not stop.is_set():
        _say(f"still serving: {url}/dashboard · {url}/docs — Ctrl-C stops everything")
        while not stop.is_set() and not procs.exited():
            stop.wait(1)
    return code


def _archived(settings: Settings, ids: set[str]) -> int:
    """How many of this run's events are in the archive (earlier runs share the folder)."""
    root: Path = events_dir(settings)
    if not root.exists():
        return 0
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table(columns=["event_id"])
    return len(ids.intersection(table.column("event_id").to_pylist()))


def _champions(settings: Settings) -> dict[str, str]:
    from training.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    out = {}
    for kind in ("ranker", "online"):
        champion = registry.champion(kind)
        out[kind] = champion.version if champion else "none yet"
    return out


def _percentiles(values: Sequence[float]) -> str:
    if not values:
        return "no samples"
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return f"p50 {p50:,.0f} ms · p99 {p99:,.0f} ms  ({len(values):,} samples)"


def _summary(settings: Settings, run: str, streamed: _Streamed, probe: _Probe,
             recs: _RecommendationProbe, url: str, drained: bool) -> int:
    produced = len(streamed.ids)
    dead = read_dlq(settings, settings.topic_events, limit=10_000)
    ours = [
        d
        for d in dead
        if d.get("group") == settings.archiver_group and f"demo-{run}" in d.get("value", "")
    ]
    archived = _archived(settings, streamed.ids)
    champions = _champions(settings)
    _say("summary")
    per_s = produced / max(streamed.seconds, 1e-9)
    rows = [
        ("live events produced", f"{produced:,}  ({per_s:,.0f}/s)"),
        ("live events archived", f"{archived:,}  (Parquet under {events_dir(settings)})"),
        ("event → online feature", _percentiles(probe.delays_ms)),
        ("recommendation latency", _percentiles(recs.latencies_ms)
         + f", {recs.errors} errors, {recs.degraded} degraded"),
        ("models", f"ranker {champions['ranker']} · online {champions['online']}"),
        ("dead-lettered", f"{len(ours)} (reasons, as recorded in headers):"),
    ]
    for name, value in rows:
        print(f"  {name:<24}{value}")
    for rec in ours:
        print(f"    - {rec['error'][:110]}")
    ok = (drained and archived == produced and len(ours) == 3 and bool(probe.delays_ms)
          and bool(recs.latencies_ms) and recs.errors == 0)
    print(f"  {'result':<24}{'OK: every stage worked' if ok else 'INCOMPLETE'}")
    print(f"  {'look around':<24}{url}/dashboard · {url}/docs · streamrec models list · "
          f"streamrec dlq show events · {settings.home / 'logs'}")
    print(json.dumps({
        "live_events_per_s": round(per_s),
        "freshness_p99_ms": round(float(np.percentile(probe.delays_ms, 99)), 1)
        if probe.delays_ms else None,
        "recommend_p99_ms": round(float(np.percentile(recs.latencies_ms, 99)), 1)
        if recs.latencies_ms else None,
        "recommend_errors": recs.errors,
    }))
    return 0 if ok else 1
