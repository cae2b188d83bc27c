"""The catalog worker against a real broker: a catalog record becomes online rows in seconds."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.dataset as ds
import pytest

from features.coldstart import TextToGraph, projection_dir
from features.store import RANKER_SERVICE, OnlineFeatureReader, OnlineFeatureWriter, apply_repo
from features.text_batch import embedding_row
from features.text_embeddings import TEXT_DIM, TextEncoder, item_text
from streaming.catalog_worker import CatalogWorker
from streaming.producer import EventProducer, kafka_producer
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Item
from streamrec.settings import Settings

pytestmark = pytest.mark.kafka

GRAPH_DIM = 64


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(Settings(torch_threads=1))


def _item(item_id: str, title: str, category: str, price: float) -> Item:
    return Item(
        item_id=item_id,
        title=title,
        category=category,
        price=price,
        created_at=datetime.now(UTC) - timedelta(hours=1),
        attributes={"brand": title.split()[-1]},
    )


def _send(settings: Settings, *items: Item) -> float:
    with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                       settings.topic_items) as producer:
        producer.send_many(items)
    return time.monotonic()


def _wait_for_rows(reader: OnlineFeatureReader, item_ids: list[str]) -> dict[str, list]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = reader.read(RANKER_SERVICE, {"user_id": ["u"] * len(item_ids),
                                           "item_id": item_ids}, full_feature_names=True)
        if all(v is not None for v in got["item_embeddings__text_vector"]) and all(
            v is not None for v in got["item_profile__category"]
        ):
            return got
        time.sleep(0.05)
    pytest.fail(f"no online rows for {item_ids}")


def test_catalog_records_become_online_rows_within_seconds(
    kafka_settings: Settings, encoder: TextEncoder
) -> None:
    settings = kafka_settings
    ensure_topics(settings.kafka_bootstrap, stream_topics(settings), 2)
    apply_repo(settings)
    # An item the graph knows: a re-published record must keep its walk vector.
    walk = np.linspace(-1, 1, GRAPH_DIM, dtype=np.float32)
    with OnlineFeatureWriter(settings) as writer:
        writer.write("item_embeddings", [
            embedding_row("known", datetime.now(UTC) - timedelta(days=1), walk, None)
        ])
    worker = CatalogWorker(settings, encoder=encoder)
    consumer = worker.consumer()
    thread = threading.Thread(target=worker.run,
                              kwargs={"install_signals": False, "consumer": consumer})
    thread.start()
    reader = OnlineFeatureReader(settings)
    first = _item("new-1", "Barista espresso machine Crema", "Home/Coffee", 249.0)
    second = _item("new-2", "Cushioned road running shoe Stride", "Shoes/Running", 119.0)
    known = _item("known", "Thin ultrabook laptop Nimbus", "Electronics/Laptops", 999.0)
    try:
        # No projection saved yet: the text vector and the profile only.
        sent = _send(settings, first)
        got = _wait_for_rows(reader, [first.item_id])
        assert time.monotonic() - sent < 10  # generous for a loaded box; typically < 1 s
        assert got["item_embeddings__graph_vector"] == [None]
        assert got["item_profile__title"] == [first.title]

        # The nightly job saves a projection: the next new item gets a graph-space vector.
        rng = np.random.default_rng(0)
        text = rng.normal(size=(50, TEXT_DIM)).astype(np.float32)
        projection = TextToGraph.fit(text, text @ rng.normal(size=(TEXT_DIM, GRAPH_DIM)))
        projection.save(projection_dir(settings))
        bad = kafka_producer(settings.kafka_bootstrap)
        bad.send(settings.topic_items, key=b"bad", value=b'{"item_id": "bad"}')
        bad.flush()
        bad.close()
        sent = _send(settings, second, known)
        got = _wait_for_rows(reader, [second.item_id, known.item_id])
        assert time.monotonic() - sent < 10
    finally:
        consumer.stop()
        thread.join(timeout=60)
        reader.close()
    assert not thread.is_alive()

    texts = [item_text(it.title, it.category, it.attributes) for it in (second, known)]
    vectors = encoder.encode(texts)
    assert np.allclose(got["item_embeddings__text_vector"][0], vectors[0], atol=1e-6)
    assert np.allclose(got["item_embeddings__text_vector"][1], vectors[1], atol=1e-6)
    assert np.allclose(got["item_embeddings__graph_vector"][0],
                       projection.project(vectors[:1])[0], atol=1e-5)
    assert np.array_equal(got["item_embeddings__graph_vector"][1], walk)
    assert got["item_profile__category"] == [second.category, known.category]
    assert got["item_profile__price"] == [second.price, known.price]
    assert got["item_profile__created_at_s"][0] == int(second.created_at.timestamp())

    stats = worker.stats
    assert (stats.items, stats.text_only, stats.projected, stats.kept_graph) == (3, 1, 1, 1)
    assert consumer.stats.dead_lettered == 1  # the invalid record went to items.dlq

    # The same rows went to the offline folders, where serving's catalog picks them up.
    for view in ("item_embeddings", "item_profile"):
        table = ds.dataset(settings.home / "offline" / view, format="parquet").to_table()
        assert sorted(table.column("item_id").to_pylist()) == ["known", "new-1", "new-2"]
