"""A tiny shop whose users' tastes flip mid-stream: the online model's and learner's tests.

Each user likes two of eight categories; every minute one user is shown a slate of eight
items and clicks each with 50% when its category is liked, 2% otherwise (so even the true
tastes score an AUC of only about 0.87). At ``flip_at`` every user's tastes move to two
other categories. Impressions and clicks are contract events (clicks carry the
``request_id`` and ``position``, a few seconds after the impression).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from streamrec.contract import Event
from training.ranking_batch import RankingBatch

START = datetime(2025, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Shown:
    """One impression, the clicks that followed, and each slot's label."""

    impression: Event
    clicks: list[Event]
    labels: np.ndarray
    index: int


class DriftingShop:
    """Seeded users, items and planted tastes (see the module docstring)."""

    def __init__(self, seed: int, n_users: int = 20, n_items: int = 240,
                 n_categories: int = 8, slate: int = 8) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_users, self.n_items, self.n_categories, self.slate = (
            n_users, n_items, n_categories, slate)
        self.item_category = self.rng.integers(n_categories, size=n_items)
        self.liked = self._tastes()

    def _tastes(self) -> np.ndarray:
        liked = np.zeros((self.n_users, self.n_categories), dtype=bool)
        for u in range(self.n_users):
            liked[u, self.rng.choice(self.n_categories, size=2, replace=False)] = True
        return liked

    def _flip(self) -> None:
        liked = ~self.liked & self._tastes()
        for u in np.flatnonzero(liked.sum(axis=1) < 2):  # keep two liked categories
            liked[u, self.rng.choice(np.flatnonzero(~liked[u] & ~self.liked[u]), size=1)] = True
        self.liked = liked

    def category(self, item_id: str) -> str:
        return f"c{self.item_category[int(item_id[1:])]}"

    def _id(self) -> str:
        return str(uuid.UUID(int=int(self.rng.integers(2**63)) << 64, version=4))

    def stream(self, n: int, flip_at: int | None = None) -> Iterator[Shown]:
        """``n`` impressions, one a minute from :data:`START`."""
        for t in range(n):
            if t == flip_at:
                self._flip()
            u = int(self.rng.integers(self.n_users))
            items = self.rng.choice(self.n_items, size=self.slate, replace=False)
            p = np.where(self.liked[u, self.item_category[items]], 0.5, 0.02)
            labels = self.rng.random(self.slate) < p
            ts = START + timedelta(minutes=t)
            request = f"r{t}"
            context = {"device": ["mobile", "desktop"][u % 2], "country": "de"}
            impression = Event(
                event_id=self._id(), event_type="impression", user_id=f"u{u}",
                items=[f"i{i}" for i in items], request_id=request, ts=ts, context=context,
            )
            clicks = [
                Event(event_id=self._id(), event_type="click", user_id=f"u{u}",
                      item_id=f"i{items[pos]}", request_id=request, position=int(pos),
                      ts=ts + timedelta(seconds=3 + int(pos)), context=context)
                for pos in np.flatnonzero(labels)
            ]
            yield Shown(impression, clicks, labels, t)

    def batch(self, shown: Shown) -> RankingBatch:
        """The impression's rows with the category and a little store-like activity."""
        event = shown.impression
        items = list(event.items or [])
        ts = event.ts.timestamp()
        n = len(items)
        features = {
            "item_profile__category": [self.category(i) for i in items],
            "item_realtime__views_1h": self.rng.integers(0, 20, size=n).tolist(),
            "item_realtime__last_event_ts": [ts - 30.0] * n,
            "user_realtime__views_1h": [int(self.rng.integers(0, 5))] * n,
            "user_realtime__last_event_ts": [ts - 10.0] * n,
        }
        return RankingBatch.for_request(
            event.user_id, items, features, ts_s=ts,
            device=event.context.device.value if event.context and event.context.device
            else None,
            country="de",
        )
