"""Producer and consumer throughput of the event backbone against a real local broker.

Measures the SDK paths users run, not bare client loops:

* produce: ``EventProducer.send`` (encode + send, ``acks=all``, idempotent) until every
  record is acknowledged;
* consume: ``StreamConsumer`` with the contract decoder (``parse_event``) and a no-op
  handler, committing after every batch — the floor under every stream worker.

Usage::

    .venv/bin/python bench/stream_throughput.py [--events 200000] [--bootstrap HOST:PORT]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer

from streaming.broker import LocalKafka
from streaming.consumer import Failure, Message, StreamConsumer
from streaming.producer import EventProducer
from streaming.simulator import Simulator, SimulatorConfig
from streaming.topics import ensure_topics
from streamrec.contract import Event, parse_event
from streamrec.settings import Settings


def log(msg: str) -> None:
    print(f"[stream_throughput] {msg}", file=sys.stderr, flush=True)


def measure(bootstrap: str, n: int, partitions: int) -> dict[str, float]:
    topic = f"bench-events-{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, [topic, f"{topic}.dlq"], partitions)
    log(f"generating {n:,} simulated events …")
    events = [
        r
        for r in Simulator(SimulatorConfig(seed=1, n_users=5_000, n_items=10_000)).events(n)
        if isinstance(r, Event)
    ]

    log("producing …")
    t0 = time.perf_counter()
    with EventProducer(bootstrap, topic, linger_ms=20) as producer:
        for i, e in enumerate(events, 1):
            producer.send(e)
            if i % 50_000 == 0:
                log(f"  queued {i:,}")
    produce_s = time.perf_counter() - t0
    log(f"produced {len(events):,} in {produce_s:.2f}s (all acknowledged)")

    settings = Settings(kafka_bootstrap=bootstrap, topic_events=topic, consumer_batch_size=5000)
    seen = 0

    def handle(batch: list[Message[Event]]) -> list[Failure]:
        nonlocal seen
        seen += len(batch)
        return []

    log("consuming with the runtime (decode + validate + commit per batch) …")
    consumer = StreamConsumer(
        settings, [topic], f"bench-{uuid.uuid4().hex[:6]}", parse_event, handle
    )
    t0 = time.perf_counter()
    consumer.run(until=lambda: seen >= len(events))
    consume_s = time.perf_counter() - t0

    log("consuming raw bytes with a bare KafkaConsumer (reference) …")
    raw = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=5000,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    got = 0
    t0 = time.perf_counter()
    while got < len(events):
        got += sum(len(v) for v in raw.poll(timeout_ms=500).values())
    raw_s = time.perf_counter() - t0
    raw.close()
    return {
        "events": len(events),
        "partitions": partitions,
        "produce_events_per_s": round(len(events) / produce_s),
        "consume_events_per_s": round(len(events) / consume_s),
        "raw_consume_events_per_s": round(len(events) / raw_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    args = parser.parse_args()
    if args.bootstrap:
        result = measure(args.bootstrap, args.events, args.partitions)
    else:
        with tempfile.TemporaryDirectory() as home:
            broker = LocalKafka.on_free_ports(Path(home), cache_dir=Settings().cache_dir, heap="1g")
            log("starting a local broker …")
            broker.start(quiet=True)
            try:
                result = measure(broker.bootstrap, args.events, args.partitions)
            finally:
                broker.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
