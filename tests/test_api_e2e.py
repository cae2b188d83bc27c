"""End to end through a real broker: clicks steer a user's recommendations within seconds,
and a catalog item nobody has touched yet is recommended to the user it suits.

Running: the feature writer (events → Feast), the catalog worker (items → MiniLM text
vectors → projected graph vectors → Feast and Parquet), the API in uvicorn with its
trending feed and impression log. The shop's catalog carries real MiniLM text vectors;
its graph vectors are category-structured stand-ins for walk vectors, and the text-to-graph
projection is fitted on them exactly as the text job fits it on walk vectors.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from api_world import World, item_rows, populate, serving
from kafka import KafkaConsumer

from features.coldstart import TextToGraph, projection_dir
from features.store import OnlineFeatureWriter
from features.text_embeddings import TextEncoder, item_text
from streaming.catalog_worker import CatalogWorker
from streaming.feature_writer import FeatureWriter
from streaming.producer import EventProducer
from streaming.topics import ensure_topics, stream_topics
from streamrec.contract import Item
from streamrec.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

COFFEE = "Home/Coffee"
CONTEXT = {"device": "mobile", "country": "DE"}


def embed_catalog(settings: Settings, world: World, encoder: TextEncoder) -> None:
    """What the text job does: text vectors for the catalog, and the projection fitted on
    the items that have both vectors, saved where the catalog worker loads it."""
    text = encoder.encode([item_text(i.title, i.category, i.attributes) for i in world.items])
    _, rows = item_rows(world.items, seed=5)
    rows = [{**row, "text_vector": vector} for row, vector in zip(rows, text, strict=True)]
    with OnlineFeatureWriter(settings) as writer:
        writer.write("item_embeddings", rows)
        writer.append_offline("item_embeddings", rows, part="text-job")
    graph = np.stack([row["graph_vector"] for row in rows])
    folder = projection_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    TextToGraph.fit(text, graph).save(folder)


def click_events(user: str, items: list[str]) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    events = []
    for n, item in enumerate(items):
        for event_type in ("view", "click"):
            events.append({
                "event_id": str(uuid.uuid4()), "event_type": event_type, "user_id": user,
                "item_id": item, "session_id": "e2e-session", "context": CONTEXT,
                "ts": (now - timedelta(seconds=2 * (len(items) - n))).isoformat(),
            })
    return events


def recommend(client: httpx.Client, user: str, k: int = 10) -> dict[str, Any]:
    response = client.post("/v1/recommendations",
                           json={"user_id": user, "k": k, "context": CONTEXT})
    assert response.status_code == 200, response.text
    return response.json()


def impression_with(settings: Settings, request_id: str) -> dict[str, Any]:
    consumer = KafkaConsumer(settings.topic_impressions,
                             bootstrap_servers=settings.kafka_bootstrap.split(","),
                             auto_offset_reset="earliest", group_id=None,
                             consumer_timeout_ms=2000)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for record in consumer:
                event = orjson.loads(record.value)
                if event.get("request_id") == request_id:
                    return event
    finally:
        consumer.close()
    pytest.fail(f"no impression with request_id {request_id}")


def test_clicks_steer_recommendations_and_a_new_item_is_recommended_untouched(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings.model_copy(update={
        "serving_catalog_refresh_s": 0.5, "serving_trending_lookback_s": 300.0,
        # The workers share this process: no overload fallback for a request they delay.
        "serving_queue_timeout_ms": 60_000,
    })
    ensure_topics(settings.kafka_bootstrap, stream_topics(settings), 2)
    world = populate(settings)
    encoder = TextEncoder(settings)
    embed_catalog(settings, world, encoder)

    features = FeatureWriter(settings, snapshot_interval_s=3600)
    catalog = CatalogWorker(settings, encoder=encoder)
    consumers = [features.consumer(), catalog.consumer()]
    workers = [
        threading.Thread(target=worker.run,
                         kwargs={"install_signals": False, "consumer": consumer})
        for worker, consumer in zip((features, catalog), consumers, strict=True)
    ]
    for thread in workers:
        thread.start()
    try:
        with serving(settings) as base, httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                checks = client.get("/readyz").json()["checks"]
                if checks["catalog"]["ok"] and checks["feature_store"]["ok"]:
                    break
                assert time.monotonic() < deadline, checks
                time.sleep(0.2)

            # 1. A new visitor clicks coffee things; the next answers lean to coffee.
            user = "e2e-shopper"
            before = recommend(client, user)
            assert before["feature_age_s"] is None
            coffee = [i.item_id for i in world.items if i.category == COFFEE][:6]
            response = client.post("/v1/events", json={"events": click_events(user, coffee)})
            assert response.status_code == 200 and response.json()["accepted"] == 12
            sent = time.monotonic()
            while True:
                after = recommend(client, user)
                share = sum(i["category"] == COFFEE for i in after["items"])
                if share >= 4:  # the diversity cap: ceil(10 * 0.4)
                    break
                assert time.monotonic() - sent < 15, after
                time.sleep(0.2)
            steered_s = time.monotonic() - sent
            assert share > sum(i["category"] == COFFEE for i in before["items"])
            assert steered_s < 10
            assert after["feature_age_s"] is not None and after["feature_age_s"] < 30
            titles = {world.simulator.item(i).title for i in coffee}
            assert any(i["reason"].removeprefix("similar to ").removesuffix(" you viewed")
                       in titles for i in after["items"])
            assert not {i["item_id"] for i in after["items"]} & set(coffee)  # seen

            # 2. What was shown went to Kafka with the request id, in order.
            shown = impression_with(settings, after["request_id"])
            assert shown["event_type"] == "impression" and shown["user_id"] == user
            assert shown["items"] == [i["item_id"] for i in after["items"]]
            assert shown["context"] == {"device": "mobile", "country": "DE"}

            # 3. A launch whose title says what it is, in a category that says nothing.
            launch = Item(item_id="launch-moka", title="Stovetop moka pot espresso maker",
                          category="New arrivals", price=35.0,
                          created_at=datetime.now(UTC) - timedelta(seconds=5))
            with EventProducer(settings.kafka_bootstrap, settings.topic_events,
                               settings.topic_items) as producer:
                producer.send_item(launch)
            deadline = time.monotonic() + 60
            while not (similar := client.get("/v1/items/launch-moka/similar").json())["found"]:
                assert time.monotonic() < deadline, "the launch never reached the catalog"
                time.sleep(0.25)
            neighbours = [i["category"] for i in similar["items"]]
            assert neighbours.count(COFFEE) >= 7, neighbours
            ids = [i["item_id"] for i in recommend(client, user, k=20)["items"]]
            assert "launch-moka" in ids
    finally:
        for consumer in consumers:
            consumer.stop()
        for thread in workers:
            thread.join(timeout=60)
