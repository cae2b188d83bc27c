"""The online model on an interaction log: the ``online`` entry of ``streamrec evaluate``.

Public datasets have interactions, not impressions, so there is nothing "shown but not
clicked" to learn from. :class:`OnlineCatalogRanker` replays the training interactions in
timestamp order through :class:`~training.online_model.OnlineModel` exactly as the learner
would (``learn_one`` per row, in order), each interaction as a positive row followed by
``negatives`` sampled items as negative rows. Negatives are drawn uniformly from the items
seen so far in the replay (an online learner cannot know an item before its first
interaction); they teach "what this user picked over what else existed", which makes the
item weights learn popularity, and the user-category crosses learn taste.

Ranking then scores the whole catalog for each test user with :meth:`OnlineModel.score`,
through the same :class:`~training.evaluation.Scorer` protocol and metrics as every other
model. Without a feature store, the numeric features are empty (only the hour of day and
the device, which do not change a user's ranking); the model ranks by its learnt item,
category and user-category weights.

Examples
--------
>>> from training.data import Interactions
>>> from training.evaluation import evaluate, leave_one_out
>>> data = Interactions.from_arrays(
...     catalog=["a", "b", "c", "d"], users=["u", "v", "w"],
...     user=[0, 1, 2, 0, 1, 2, 0], item=[0, 0, 0, 1, 1, 1, 2],
...     ts=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
>>> split = leave_one_out(data)
>>> ranker = OnlineCatalogRanker(negatives=2, seed=0).fit(split.train)
>>> ranker.model.examples
6
>>> ranker.score(split.queries).shape
(3, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Self

import numpy as np

from training.data import Interactions
from training.evaluation import Queries
from training.online_model import OnlineModel, OnlineModelConfig
from training.ranking_batch import RankingBatch

__all__ = ["OnlineCatalogRanker"]

_CHUNK = 2000  # interactions per learn() call: one numeric_matrix per chunk, not per row


class OnlineCatalogRanker:
    """:class:`OnlineModel` learnt over interactions in time order, ranking a catalog.

    Parameters
    ----------
    config
        The online model's hyper-parameters.
    negatives
        Sampled negative rows per interaction.
    seed
        Seed of the negative sampling.
    categories
        Item id → category (MovieLens: the first genre), for the user-category crosses.
    """

    def __init__(
        self,
        config: OnlineModelConfig | None = None,
        *,
        negatives: int = 4,
        seed: int = 0,
        categories: Mapping[str, str] | None = None,
    ) -> None:
        if negatives < 1:
            raise ValueError("negatives must be at least 1")
        self.model = OnlineModel(config, categories=categories)
        self.negatives = negatives
        self.seed = seed
        self._users = np.empty(0, dtype=str)

    def fit(self, data: Interactions, log: Callable[[str], None] = lambda _: None) -> Self:
        """Learn every interaction of ``data`` in time order (with sampled negatives)."""
        self._users = data.users  # queries name users by index into the same array
        rng = np.random.default_rng(self.seed)
        seen = np.empty(data.n_items, dtype=np.int64)
        is_seen = np.zeros(data.n_items, dtype=bool)
        n_seen = 0
        k = self.negatives
        for start in range(0, len(data), _CHUNK):
            stop = min(start + _CHUNK, len(data))
            users, items, labels, rows_ts, devices = [], [], [], [], []
            for n in range(start, stop):
                item = int(data.item[n])
                drawn_at = rng.integers(max(n_seen, 1), size=k)
                # A negative that is the positive itself would teach a contradiction.
                drawn = [int(d) for d in seen[drawn_at] if d != item] if n_seen else []
                row_items = [item, *drawn]
                users += [str(data.users[data.user[n]])] * len(row_items)
                items += [str(data.catalog[i]) for i in row_items]
                labels += [True] + [False] * len(drawn)
                rows_ts += [float(data.ts[n])] * len(row_items)
                devices += [str(data.context["device"][n]) or None] * len(row_items)
                if not is_seen[item]:
                    is_seen[item] = True
                    seen[n_seen] = item
                    n_seen += 1
            self.model.learn(_batch(users, items, rows_ts, devices), np.array(labels))
            log(f"online: learnt {stop:,}/{len(data):,} interactions "
                f"({self.model.examples:,} rows, rolling AUC "
                f"{self.model.metrics()['rolling_auc'] or float('nan'):.4f})")
        return self

    def score(self, queries: Queries) -> np.ndarray:
        """``(len(queries), n_items)`` click probabilities over the whole catalog."""
        out = np.empty((len(queries), queries.n_items), dtype=np.float32)
        catalog = [str(i) for i in queries.catalog]
        devices = queries.context.get("device")
        for q in range(len(queries)):
            batch = RankingBatch.for_request(
                str(self._users[queries.user[q]]), catalog, {}, ts_s=float(queries.ts[q]),
                device=(devices[q] or None) if devices is not None else None,
            )
            out[q] = self.model.score(batch)
        return out


def _batch(users: list[str], items: list[str], ts_s: list[float],
           devices: list[str | None]) -> RankingBatch:
    """Rows of several users without store features (replayed interactions)."""
    n = len(users)
    objects = [np.empty(n, dtype=object) for _ in range(4)]
    for array, values in zip(objects, (users, items, devices, [None] * n), strict=True):
        array[:] = values
    return RankingBatch(user_ids=objects[0], item_ids=objects[1], ts_s=np.array(ts_s),
                        device=objects[2], country=objects[3], features={})
