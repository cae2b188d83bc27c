"""``streamrec demo``: the local pipeline end to end, with live progress and a summary.

Today the demo runs the event backbone: a real Kafka broker, the simulator streaming
events (and a few deliberately broken records) into it, and a consumer-group worker reading
them back through the same runtime every production worker uses. Later stages (features,
batch, training, serving) plug in here as they land.
"""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kafka import KafkaProducer

from streaming.broker import LocalKafka, broker_answers
from streaming.consumer import Failure, Message, StreamConsumer
from streaming.dlq import read_dlq
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, Item, parse_event
from streamrec.settings import Settings

BROKEN_RECORDS = [
    b"{not json",
    json.dumps({"event_id": "not-a-uuid", "event_type": "view", "user_id": "u1",
                "item_id": "i1", "ts": "2026-01-01T00:00:00Z"}).encode(),
    json.dumps({"event_id": str(uuid.uuid4()), "event_type": "view", "user_id": "u1",
                "item_id": "i1", "ts": "2026-01-01 00:00:00"}).encode(),
]


@dataclass
class _Tally:
    """What the demo worker saw; shared between the worker thread and the reporter."""

    by_type: Counter[str] = field(default_factory=Counter)
    users: set[str] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.by_type.values())


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _ensure_broker(settings: Settings) -> LocalKafka | None:
    """Reuse a broker that already answers; else start the local one. Returns what we started."""
    if broker_answers(settings.kafka_bootstrap, timeout_s=2):
        _say(f"using the Kafka broker already answering at {settings.kafka_bootstrap}")
        return None
    broker = LocalKafka(
        home=settings.kafka_home, port=settings.kafka_local_port,
        controller_port=settings.kafka_local_controller_port, cache_dir=settings.cache_dir,
        heap=settings.kafka_local_heap, partitions=settings.topic_partitions,
    )
    _say(f"starting a local Kafka broker (KRaft) on {broker.bootstrap} …")
    started = time.monotonic()
    broker.start()
    _say(f"Kafka is up in {time.monotonic() - started:.1f}s (log: {broker.log_file})")
    return broker


def run_demo(settings: Settings, *, n_events: int, rate: float, keep_kafka: bool) -> int:
    """Run the demo; returns a process exit code (0 when every record was accounted for)."""
    broker = _ensure_broker(settings)
    settings = settings.model_copy(
        update={"kafka_bootstrap": broker.bootstrap if broker else settings.kafka_bootstrap}
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        ensure_topics(settings.kafka_bootstrap, stream_topics(settings), settings.topic_partitions)
        return _run(settings, n_events=n_events, rate=rate, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        if broker is not None and not keep_kafka:
            _say("stopping Kafka …")
            broker.stop()
        elif broker is not None:
            _say(f"Kafka keeps running at {broker.bootstrap}; stop it with 'streamrec kafka down'")


def _run(settings: Settings, *, n_events: int, rate: float, stop: threading.Event) -> int:
    tally = _Tally()
    group = f"demo-{uuid.uuid4().hex[:6]}"

    def handle(batch: list[Message[Event]]) -> list[Failure]:
        now_ms = time.time() * 1000
        with tally.lock:
            for m in batch:
                tally.by_type[m.value.event_type.value] += 1
                tally.users.add(m.value.user_id)
                tally.latencies_ms.append(now_ms - m.timestamp_ms)
        return []

    consumer = StreamConsumer(settings, [settings.topic_events], group, parse_event, handle)
    worker = threading.Thread(target=consumer.run, name="demo-worker", daemon=True)
    worker.start()

    sim = Simulator(SimulatorConfig(seed=7, live=True))
    _say(f"streaming {n_events:,} simulated events into '{settings.topic_events}'"
         + (f" at {rate:,.0f} events/s" if rate else " as fast as possible")
         + f", plus {len(BROKEN_RECORDS)} broken records to show the dead-letter path")
    produced_events = produced_items = 0
    started = time.monotonic()
    last_report = started
    with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                       settings.topic_items) as producer:
        for rec in sim.events(n_events):
            if stop.is_set():
                break
            if isinstance(rec, Item):
                producer.send_item(rec)
                produced_items += 1
                continue
            producer.send(rec)
            produced_events += 1
            if rate:
                ahead = produced_events / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            now = time.monotonic()
            if now - last_report >= 2:
                last_report = now
                _say(f"produced {produced_events:,} · consumed {tally.total:,} · "
                     f"{produced_events / (now - started):,.0f} events/s")
    produce_s = time.monotonic() - started
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","), acks="all")
    for bad in BROKEN_RECORDS:
        raw.send(settings.topic_events, key=b"demo", value=bad)
    raw.flush()
    raw.close()

    deadline = time.monotonic() + 60
    while tally.total < produced_events and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.2)
    while consumer.stats.dead_lettered < len(BROKEN_RECORDS) and time.monotonic() < deadline:
        time.sleep(0.2)
    consumer.stop()
    worker.join(timeout=30)
    return _summary(settings, tally, consumer.stats.dead_lettered, produced_events,
                    produced_items, produce_s)


def _summary(settings: Settings, tally: _Tally, dead: int, produced: int, items: int,
             produce_s: float) -> int:
    lat = sorted(tally.latencies_ms)
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")
    _say("summary")
    print(f"  events produced      {produced:>10,}  ({produced / max(produce_s, 1e-9):,.0f}/s)")
    print(f"  catalog items        {items:>10,}")
    print(f"  events consumed      {tally.total:>10,}  by type: {dict(tally.by_type)}")
    print(f"  distinct users       {len(tally.users):>10,}")
    print(f"  produce→consume      p50 {p50:,.0f} ms · p99 {p99:,.0f} ms")
    print(f"  dead-lettered        {dead:>10,}  (the {len(BROKEN_RECORDS)} broken records)")
    for rec in read_dlq(settings, settings.topic_events, limit=len(BROKEN_RECORDS)):
        print(f"    - {rec['error'][:110]}")
    ok = tally.total == produced and dead == len(BROKEN_RECORDS)
    print(f"  result               {'OK: every record accounted for' if ok else 'INCOMPLETE'}"
          f"  ({datetime.now(UTC):%H:%M:%S} UTC)")
    return 0 if ok else 1

