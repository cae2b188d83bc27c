"""Reading dead-letter topics: each record's reason, source position and original bytes."""

from __future__ import annotations

import base64
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streamrec.settings import Settings


def decode_dlq_record(headers: list[tuple[str, bytes]], key: bytes | None,
                      value: bytes) -> dict[str, Any]:
    """A DLQ record as a JSON-safe dict; the original value as text when it is UTF-8."""
    meta = {k.removeprefix("dlq."): v.decode(errors="replace") for k, v in headers}
    try:
        original: dict[str, str] = {"value": value.decode()}
    except UnicodeDecodeError:
        original = {"value_base64": base64.b64encode(value).decode()}
    return {**meta, "key": key.decode(errors="replace") if key else None, **original}


def read_dlq(settings: Settings, topic: str, *, limit: int = 100,
             timeout_ms: int = 3000) -> list[dict[str, Any]]:
    """Up to ``limit`` records of ``topic``'s DLQ, oldest first, without joining a group."""
    dlq = settings.dlq_topic(topic)
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        enable_auto_commit=False,
        consumer_timeout_ms=timeout_ms,
        client_id="streamrec-dlq-reader",
    )
    try:
        partitions = consumer.partitions_for_topic(dlq) or set()
        tps = [TopicPartition(dlq, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[dict[str, Any]] = []
        for rec in consumer:
            out.append(decode_dlq_record(list(rec.headers), rec.key, rec.value))
            if len(out) >= limit:
                break
        return out
    finally:
        consumer.close()
