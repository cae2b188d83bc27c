"""``streamrec demo``: the local pipeline end to end, with live progress and a summary.

What runs (all on embedded defaults, state under ``$STREAMREC_HOME``):

1. a real Kafka broker (KRaft), started unless one already answers;
2. the Feast repository, applied (SQLite online store, Parquet offline store);
3. the two stream workers as separate processes, as in production: the feature writer
   and the archiver (logs in ``$STREAMREC_HOME/logs/``);
4. the simulator streaming live events (and a few deliberately broken records) into
   Kafka at a steady rate, while a probe measures how long each probed event takes to
   show up in Feast's online store.

At the end it prints what arrived where — events archived, features online, records
dead-lettered and why — and the measured freshness. Later stages (batch, training,
serving) plug in here as they land. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from streaming.archiver import events_dir
from streaming.broker import LocalKafka, broker_answers
from streaming.dlq import read_dlq
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, Item
from streamrec.settings import Settings


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


def _start_worker(settings: Settings, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(
        [sys.executable, "-m", "streamrec", "worker", name],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _group_lag(bootstrap: str, group: str, topic: str) -> int | None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="demo-lag")
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), client_id="demo-lag")
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        ends = consumer.end_offsets(parts)
        if not any(tp in committed for tp in parts):
            return None
        return sum(ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in parts)
    finally:
        consumer.close()
        admin.close()


def _wait_until_consuming(
    settings: Settings, workers: dict[str, subprocess.Popen[bytes]], timeout_s: float = 120
) -> bool:
    """Wait until both workers' consumer groups are stable (Feast import + group join)."""
    groups = [settings.feature_writer_group, settings.archiver_group]
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap.split(","), client_id="demo-ready"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in workers.values()):
                return False
            described = admin.describe_groups(groups)
            if all(
                described[g]["group_state"] == "Stable" and described[g]["members"] for g in groups
            ):
                return True
            time.sleep(0.5)
        return False
    finally:
        admin.close()


def run_demo(settings: Settings, *, n_events: int, rate: float, keep_kafka: bool) -> int:
    """Run the demo; returns a process exit code (0 when every record was accounted for)."""
    from features.store import apply_repo

    broker = _ensure_broker(settings)
    if broker is not None:
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    settings = settings.model_copy(update={"home": settings.home.resolve()})
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        ensure_topics(settings.kafka_bootstrap, stream_topics(settings), settings.topic_partitions)
        _say("applying the Feast feature repository (SQLite online store, Parquet offline) …")
        apply_repo(settings)
        env = {
            **os.environ,
            "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "STREAMREC_HOME": str(settings.home),
        }
        for name in ("features", "archiver"):
            workers[name] = _start_worker(settings, name, env)
        _say(
            f"started the feature writer (pid {workers['features'].pid}) and the archiver "
            f"(pid {workers['archiver'].pid}); logs in {settings.home / 'logs'}"
        )
        if not _wait_until_consuming(settings, workers):
            _say(f"the workers did not start consuming; see {settings.home / 'logs'}")
            return 1
        _say("both workers are consuming")
        return _run(settings, n_events=n_events, rate=rate, stop=stop, workers=workers)
    finally:
        signal.signal(signal.SIGINT, previous)
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in workers.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _say(f"{name} did not stop in time; killing it")
                proc.kill()
        if broker is not None and not keep_kafka:
            _say("stopping Kafka …")
            broker.stop()
        elif broker is not None:
            _say(f"Kafka keeps running at {broker.bootstrap}; stop it with 'streamrec kafka down'")


def _run(
    settings: Settings,
    *,
    n_events: int,
    rate: float,
    stop: threading.Event,
    workers: dict[str, subprocess.Popen[bytes]],
) -> int:
    run = uuid.uuid4().hex[:8]
    broken = broken_records(run)
    probe = _Probe(settings)
    prober = threading.Thread(target=probe.run, name="freshness-probe", daemon=True)
    prober.start()
    sim = Simulator(SimulatorConfig(seed=int(time.time()) % 10_000, live=True))
    _say(
        f"streaming {n_events:,} live simulated events into '{settings.topic_events}' at "
        f"{rate:,.0f} events/s, plus {len(broken)} broken records (dead-letter path)"
    )
    produced = items = 0
    ids: set[str] = set()
    started = last_report = time.monotonic()
    with EventProducer(
        settings.kafka_bootstrap, settings.topic_events, settings.topic_items
    ) as producer:
        for rec in sim.events(n_events):
            if stop.is_set():
                break
            if isinstance(rec, Item):
                producer.send_item(rec)
                items += 1
                continue
            producer.send(rec)
            ids.add(rec.event_id)
            produced += 1
            if produced % 97 == 0:
                producer.flush()
                probe.watch(rec)
            ahead = produced / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            now = time.monotonic()
            if now - last_report >= 2:
                last_report = now
                _progress(settings, produced, now - started, probe)
    produce_s = time.monotonic() - started
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","), acks="all")
    for bad in broken:
        raw.send(settings.topic_events, key=b"demo", value=bad)
    raw.flush()
    raw.close()

    _say("waiting for the workers to drain …")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not stop.is_set():
        lags = [
            _group_lag(settings.kafka_bootstrap, g, settings.topic_events)
            for g in (settings.feature_writer_group, settings.archiver_group)
        ]
        if all(lag == 0 for lag in lags):
            break
        if any(p.poll() is not None for p in workers.values()):
            _say("a worker exited early; see its log")
            break
        time.sleep(1)
    time.sleep(1.5)  # the archiver's last batch, the probe's last reads
    probe.stop()
    for proc in workers.values():
        proc.send_signal(signal.SIGTERM)
    for proc in workers.values():
        proc.wait(timeout=60)
    return _summary(settings, run, ids, items, produce_s, probe)


def _progress(settings: Settings, produced: int, elapsed: float, probe: _Probe) -> None:
    lag = _group_lag(settings.kafka_bootstrap, settings.feature_writer_group, settings.topic_events)
    fresh = f"{np.percentile(probe.delays_ms, 50):.0f} ms" if probe.delays_ms else "…"
    _say(
        f"produced {produced:,} ({produced / elapsed:,.0f}/s) · feature-writer lag "
        f"{'…' if lag is None else f'{lag:,}'} · event→online p50 {fresh}"
    )


def _archived(settings: Settings, ids: set[str]) -> int:
    """How many of this run's events are in the archive (earlier runs share the folder)."""
    root: Path = events_dir(settings)
    if not root.exists():
        return 0
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table(columns=["event_id"])
    return len(ids.intersection(table.column("event_id").to_pylist()))


def _summary(
    settings: Settings, run: str, ids: set[str], items: int, produce_s: float, probe: _Probe
) -> int:
    produced = len(ids)
    dead = read_dlq(settings, settings.topic_events, limit=10_000)
    ours = [
        d
        for d in dead
        if d.get("group") == settings.archiver_group and f"demo-{run}" in d.get("value", "")
    ]
    archived = _archived(settings, ids)
    delays = np.array(probe.delays_ms) if probe.delays_ms else np.array([np.nan])
    _say("summary")
    print(
        f"  events produced       {produced:>10,}  ({produced / max(produce_s, 1e-9):,.0f}/s)"
        f", catalog items {items:,}"
    )
    print(f"  events archived       {archived:>10,}  (Parquet under {events_dir(settings)})")
    print(
        f"  event → online        p50 {np.percentile(delays, 50):,.0f} ms · "
        f"p99 {np.percentile(delays, 99):,.0f} ms  ({len(probe.delays_ms)} probed events, "
        f"read back through Feast)"
    )
    print(f"  dead-lettered         {len(ours):>10,}  (reasons, as recorded in headers):")
    for rec in ours:
        print(f"    - {rec['error'][:110]}")
    ok = archived == produced and len(ours) == 3 and bool(probe.delays_ms)
    print(f"  result                {'OK: every record accounted for' if ok else 'INCOMPLETE'}")
    print(
        f"  look around           streamrec dlq show events · "
        f"{settings.home / 'logs'} · {settings.home / 'offline'}"
    )
    return 0 if ok else 1
