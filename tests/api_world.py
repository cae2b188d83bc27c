"""A small shop in a streamrec home, as the API's tests need it.

The simulator's events go through the real-time engine into Feast's online store (what the
feature writer does); its catalog becomes ``item_profile`` rows and ``item_embeddings``
rows, online and as Parquet parts (what the catalog worker and the embedding jobs do).
Vectors are built so that items of one category lie close together in both spaces, the
property the real graph and text embeddings have that the API's candidate generation
relies on.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import uvicorn

from features.definitions import TIMESTAMP_FIELD
from features.realtime import RealtimeFeatureEngine
from features.store import RANKER_SERVICE, OnlineFeatureReader, OnlineFeatureWriter, apply_repo
from serving.app import create_app
from streaming.broker import free_port
from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Event, Item
from streamrec.settings import Settings
from training.context_ranker import ContextRanker, ContextRankerConfig
from training.online_model import OnlineModel
from training.ranking_batch import RankingBatch
from training.registry import ModelRegistry

GRAPH_DIM, TEXT_DIM = 64, 384


@dataclass
class World:
    simulator: Simulator
    engine: RealtimeFeatureEngine
    items: list[Item]
    users: list[str]
    """Users with real-time features, most active first."""

    def recent(self, user_id: str) -> list[str]:
        return list(self.engine.user_row(user_id)["recent_items"])


def category_vector(category: str, dim: int, seed: int) -> np.ndarray:
    """A category's centre: the same for the same name, whichever items are written."""
    return np.random.default_rng([seed, zlib.crc32(category.encode())]).normal(size=dim)


def item_rows(
    items: Sequence[Item], *, seed: int = 0, ts: datetime | None = None
) -> tuple[list[dict], list[dict]]:
    """``item_profile`` and ``item_embeddings`` rows of catalog records."""
    ts = ts or datetime.now(UTC)
    rng = np.random.default_rng([seed, len(items)])
    profiles, vectors = [], []
    for item in items:
        profiles.append({
            "item_id": item.item_id, TIMESTAMP_FIELD: ts, "category": item.category,
            "title": item.title, "price": item.price,
            "created_at_s": int(item.created_at.timestamp()),
        })
        graph = category_vector(item.category, GRAPH_DIM, seed) + 0.35 * rng.normal(
            size=GRAPH_DIM)
        text = category_vector(item.category, TEXT_DIM, seed + 7) + 0.35 * rng.normal(
            size=TEXT_DIM)
        vectors.append({
            "item_id": item.item_id, TIMESTAMP_FIELD: ts,
            "graph_vector": graph.astype(np.float32), "text_vector": text.astype(np.float32),
        })
    return profiles, vectors


def write_items(settings: Settings, items: Sequence[Item], *, seed: int = 0,
                part: str | None = None) -> None:
    """Catalog records into ``item_profile`` and ``item_embeddings``, online and offline."""
    profiles, vectors = item_rows(items, seed=seed)
    with OnlineFeatureWriter(settings) as writer:
        writer.write("item_profile", profiles)
        writer.write("item_embeddings", vectors)
        writer.append_offline("item_profile", profiles, part=part)
        writer.append_offline("item_embeddings", vectors, part=part)


def examples(settings: Settings, world: World, seed: int) -> list[tuple[RankingBatch, list[bool]]]:
    """One request per user: their recent items (clicked) and random items (not)."""
    rng = np.random.default_rng(seed)
    reader = OnlineFeatureReader(settings)
    items = [item.item_id for item in world.items]
    out = []
    for user in world.users[:40]:
        positives = world.recent(user)[:5]
        negatives = list(rng.choice(items, size=10, replace=False))
        ids = positives + negatives
        features = reader.read(RANKER_SERVICE, {"user_id": [user] * len(ids), "item_id": ids},
                               full_feature_names=True)
        out.append((RankingBatch.for_request(user, ids, features, ts_s=time.time()),
                    [True] * len(positives) + [False] * len(negatives)))
    reader.close()
    return out


def trained(kind: str, data: list[tuple[RankingBatch, list[bool]]], folder: Path,
            seed: int) -> Path:
    """An online model or a (small) ranker trained on ``data``, saved in ``folder``."""
    if kind == "online":
        model = OnlineModel()
        for batch, labels in data:
            model.learn(batch, labels)
        model.save(folder)
    else:
        batch, labels = data[0]
        ranker = ContextRanker(ContextRankerConfig(dim=8, epochs=2, seed=seed))
        ranker.fit(batch, np.array(labels, dtype=float), valid=(batch, np.array(labels)))
        ranker.save(folder)
    return folder


def register(registry: ModelRegistry, kind: str, folder: Path) -> str:
    version = registry.register(kind, folder, metrics={"auc": 0.6},
                                data_window={"start": "2026-01-01", "end": "2026-01-02"},
                                features=[RANKER_SERVICE])
    registry.promote(kind, version.version)
    return version.version


def populate(
    settings: Settings,
    *,
    n_users: int = 300,
    n_items: int = 600,
    n_categories: int = 6,
    n_events: int = 6000,
    seed: int = 5,
) -> World:
    """Apply the Feast repo and fill it with a simulated shop whose events end about now."""
    apply_repo(settings)
    days = n_events / (n_users * 0.6 * 12)
    config = SimulatorConfig(n_users=n_users, n_items=n_items, n_categories=n_categories,
                             seed=seed, start=datetime.now(UTC) - timedelta(days=days * 1.3))
    sim = Simulator(config)
    engine = RealtimeFeatureEngine()
    items = list(sim.catalog())
    for item in items:
        engine.catalog_update(item)
    events: list[Event] = []
    for record in sim.events(n_events):
        if isinstance(record, Item):
            engine.catalog_update(record)
            items.append(record)
        else:
            events.append(record)
    result = engine.apply(events)
    with OnlineFeatureWriter(settings) as writer:
        writer.write("user_realtime", [engine.user_row(u) for u in result.changed_users])
        writer.write("item_realtime", [engine.item_row(i) for i in result.changed_items])
    write_items(settings, items, seed=seed, part="seed")
    activity: dict[str, int] = {}
    for event in events:
        activity[event.user_id] = activity.get(event.user_id, 0) + 1
    users = sorted(activity, key=lambda u: -activity[u])
    return World(sim, engine, items, users)


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The API in a real uvicorn server on a free port of this process; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
