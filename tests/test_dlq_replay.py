"""``streamrec dlq replay`` against a real broker: fixes, as-is re-drives, resumption, dry runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from streaming.consumer import Failure, Message, StreamConsumer
from streaming.dlq import read_dlq
from streaming.dlq_replay import Fixes, Outcome, replay_dlq
from streaming.producer import kafka_producer
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Event, parse_event
from streamrec.settings import Settings

_TS = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)


def _event(user: str, **overrides: object) -> dict[str, object]:
    return {"event_id": str(uuid.uuid4()), "event_type": "view", "user_id": user,
            "item_id": "i1", "ts": _TS.isoformat(), **overrides}


def _read_all(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes, dict]]:
    """Every record of ``topic``, partition by partition (up to the end offsets of now)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap.split(","),
                             enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: dict[TopicPartition, list] = {tp: [] for tp in tps}
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for tp, recs in consumer.poll(timeout_ms=1000).items():
                out[tp] += [(r.key, r.value, dict(r.headers)) for r in recs]
        return [rec for tp in tps for rec in out[tp]]
    finally:
        consumer.close()


def _dead_letter_everything(settings: Settings) -> dict[str, object]:
    """Produce good, poison and malformed records; two groups dead-letter what they reject.

    Group ``a`` (an archiver, say) also fails on the poison user's events in its handler;
    group ``b`` rejects only what the contract rejects. So every malformed record is in the
    DLQ twice, the poison events once.
    """
    ensure_topics(settings.kafka_bootstrap, stream_topics(settings), 2)
    good = [_event(f"u{i}") for i in range(5)]
    poison = [_event("poison") for _ in range(3)]
    bad_ts = _event("u7", ts=_TS.replace(tzinfo=None).isoformat())  # no zone
    bad_id = _event("u8", event_id="not-a-uuid")
    garbage = b"\xff not json at all"
    raw = [orjson.dumps(r) for r in [*good, *poison, bad_ts, bad_id]] + [garbage]
    producer = kafka_producer(settings.kafka_bootstrap)
    for value in raw:
        producer.send(settings.topic_events, key=b"k", value=value)
    producer.flush()
    producer.close()

    def poison_fails(batch: list[Message[Event]]) -> list[Failure]:
        return [Failure(m, "RuntimeError: cannot handle") for m in batch
                if m.value.user_id == "poison"]

    for group, handle in (("a", poison_fails), ("b", lambda batch: [])):
        consumer = StreamConsumer(settings, [settings.topic_events], f"{group}-{uuid.uuid4()}",
                                  parse_event, handle)
        consumer.run(until=lambda c=consumer: c.stats.consumed >= len(raw), max_idle_s=30)
    return {"good": good, "poison": poison, "bad_ts": bad_ts, "bad_id": bad_id}


def _fixes_file(settings: Settings, records: dict, tmp_path: Path) -> tuple[Path, dict, dict]:
    """What an operator writes: one bare corrected event, one edited `dlq show` line."""
    fixed_ts = {**records["bad_ts"], "ts": _TS.isoformat()}
    shown = next(r for r in read_dlq(settings, settings.topic_events)
                 if "not-a-uuid" in r.get("value", ""))
    fixed_id = {**json.loads(shown["value"]), "event_id": str(uuid.uuid4())}
    never_dead = _event("u9")  # a fix for nothing: reported as unmatched
    path = tmp_path / "fixes.jsonl"
    path.write_text("\n".join([
        json.dumps(fixed_ts),
        json.dumps({**shown, "value": json.dumps(fixed_id)}),
        "",
        json.dumps(never_dead),
    ]))
    return path, fixed_ts, fixed_id


@pytest.mark.kafka
def test_fixes_then_as_is_replays_redrive_each_record_once(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    settings = kafka_settings
    records = _dead_letter_everything(settings)
    dlq = settings.dlq_topic(settings.topic_events)
    assert len(_read_all(settings, dlq)) == 9
    path, fixed_ts, fixed_id = _fixes_file(settings, records, tmp_path)
    source_before = len(_read_all(settings, settings.topic_events))
    assert source_before == 11

    outcomes: list[Outcome] = []
    dry = replay_dlq(settings, settings.topic_events, fixes=Fixes.load(path), dry_run=True,
                     on_outcome=outcomes.append)
    assert (dry.sent, dry.skipped, dry.still_invalid, dry.duplicates) == (2, 4, 0, 3)
    assert dry.unmatched_fixes == 1 and dry.dry_run
    assert len(outcomes) == 9 and sum(o.fixed for o in outcomes) == 2
    assert len(_read_all(settings, settings.topic_events)) == source_before
    assert len(_read_all(settings, dlq)) == 9  # a dry run re-parks nothing

    first = replay_dlq(settings, settings.topic_events, fixes=Fixes.load(path))
    assert (first.sent, first.skipped, first.still_invalid, first.duplicates) == (2, 4, 0, 3)
    second = replay_dlq(settings, settings.topic_events, replay_all=True)
    # Only the re-parked records are pending: the poison events now go, the garbage cannot.
    assert (second.sent, second.skipped, second.still_invalid, second.duplicates) == (3, 0, 1, 0)
    third = replay_dlq(settings, settings.topic_events, replay_all=True)
    assert (third.sent, third.still_invalid) == (0, 1)

    # The originals were all keyed b"k"; a re-driven event is keyed by its user.
    redriven = [r for r in _read_all(settings, settings.topic_events) if r[0] != b"k"]
    events = [parse_event(value) for _, value, _ in redriven]
    assert sorted(e.event_id for e in events) == sorted(
        [fixed_ts["event_id"], fixed_id["event_id"], *(p["event_id"] for p in records["poison"])]
    )
    assert all(key == e.user_id.encode() for (key, _, _), e in zip(redriven, events, strict=True))
    assert next(e for e in events if e.event_id == fixed_ts["event_id"]).ts == _TS

    parked = [r for r in _read_all(settings, dlq) if "dlq.replay.attempts" in r[2]]
    assert len(parked) == 4 + 1 + 1  # run 1 re-parks 4, runs 2 and 3 the garbage again
    last_key, last_value, last_headers = next(
        r for r in parked if r[2]["dlq.replay.attempts"] == b"3"
    )
    assert last_value == b"\xff not json at all" and last_key == b"k"
    assert last_headers["dlq.replay.attempts"] == b"3"
    assert last_headers["dlq.replay.outcome"] == b"still_invalid"
    assert last_headers["dlq.source.topic"] == settings.topic_events.encode()
    assert b"json" in last_headers["dlq.replay.error"].lower()


@pytest.mark.kafka
def test_cli_dry_run_lists_each_pending_record_and_sends_nothing(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    settings = kafka_settings
    records = _dead_letter_everything(settings)
    path, _, _ = _fixes_file(settings, records, tmp_path)
    env = {
        **os.environ,
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMREC_TOPIC_EVENTS": settings.topic_events,
        "STREAMREC_TOPIC_ITEMS": settings.topic_items,
        "STREAMREC_DLQ_REPLAY_GROUP": f"replay-{uuid.uuid4()}",
    }
    cmd = [sys.executable, "-m", "streamrec", "dlq", "replay", settings.topic_events, "--all",
           "--fixed-file", str(path), "--dry-run"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    per_record, summary = lines[:-1], lines[-1]
    actions = sorted(r["action"] for r in per_record)
    # With --all the poison events go as they are; the garbage is still invalid.
    assert actions == ["duplicate"] * 3 + ["sent"] * 5 + ["still_invalid"]
    assert summary["sent"] == 5 and summary["dry_run"] is True
    assert all(r["source"].startswith(f"{settings.topic_events}:") for r in per_record)

    missing = subprocess.run(cmd[:6], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--fixed-file, --all" in missing.stderr


def test_fixes_name_the_line_that_is_not_a_fix() -> None:
    with pytest.raises(ValueError, match="line 2"):
        Fixes.from_lines(['{"event_id": "x", "event_type": "view"}', "[1, 2]"])
    with pytest.raises(ValueError, match="line 1"):
        Fixes.from_lines(['{"source.partition": 0, "source.offset": 3}'])
