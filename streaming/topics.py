"""Topic provisioning: every stream topic together with its dead-letter topic."""

from __future__ import annotations

import contextlib

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamrec.settings import Settings


def stream_topics(settings: Settings) -> list[str]:
    """The topics streamrec reads and writes, each followed by its DLQ."""
    base = [settings.topic_events, settings.topic_items, settings.topic_impressions]
    return [t for topic in base for t in (topic, settings.dlq_topic(topic))]


def ensure_topics(bootstrap: str, topics: list[str], partitions: int = 4) -> list[str]:
    """Create the topics that do not exist yet; return the ones created. Idempotent."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="streamrec-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        # Another process may win the creation race; the topic is there, which is all we need.
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing]
                )
        return missing
    finally:
        admin.close()
