"""Implicit interactions, indexed once for every model and for the evaluation protocol.

Every event of contract v1 that names an item (``view``, ``click``, ``add_to_cart``,
``purchase``; impressions only say what was shown) counts as one implicit interaction of
its user with its item. Events are kept in timestamp order, ties in arrival order, so a
user's interactions read in index order are their sequence. Users and items become dense
indexes: items in catalog order (catalog records first, then items first named by an
event), users in order of first appearance.

Context travels with each interaction as plain strings (``""`` when absent): the device
and country of contract v1. Hour of day is not stored: it follows from ``ts``, and a
model derives it where it needs it.

Examples
--------
>>> from datetime import UTC, datetime
>>> from streamrec.contract import Event, Item
>>> t = lambda s: datetime.fromtimestamp(s, UTC)
>>> records = [
...     Item(item_id="a", title="A", category="x", created_at=t(0)),
...     Event(event_id="00000000-0000-0000-0000-000000000002", event_type="view",
...           user_id="u", item_id="b", ts=t(20)),
...     Event(event_id="00000000-0000-0000-0000-000000000001", event_type="click",
...           user_id="u", item_id="a", ts=t(10), context={"device": "mobile"}),
... ]
>>> data = Interactions.from_records(records)
>>> data.catalog.tolist(), data.item.tolist(), data.context["device"].tolist()
(['a', 'b'], [0, 1], ['mobile', ''])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

from streamrec.contract import Event, EventType, Item

__all__ = ["CONTEXT_FIELDS", "INTERACTION_TYPES", "Interactions"]

#: Event types that count as an interaction with their ``item_id``.
INTERACTION_TYPES: frozenset[EventType] = frozenset(
    {EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE}
)
#: Categorical context kept per interaction (``""`` when the event has none).
CONTEXT_FIELDS: tuple[str, ...] = ("device", "country")


def _column(values: Iterable, dtype: type) -> np.ndarray:
    return np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=dtype)


@dataclass(frozen=True, eq=False)
class Interactions:
    """Implicit user-item interactions in time order, with dense user and item indexes.

    Parameters
    ----------
    catalog
        Item ids; an item's index is its position here.
    users
        User ids; a user's index is its position here.
    user, item
        Per interaction: user and item indexes (``int32``).
    ts
        Per interaction: event time in seconds since the epoch (``float64``),
        non-decreasing.
    context
        Per interaction and field of :data:`CONTEXT_FIELDS`: a string array, ``""`` when
        missing.

    Examples
    --------
    >>> import numpy as np
    >>> data = Interactions.from_arrays(
    ...     catalog=["a", "b", "c"], users=["u", "v"],
    ...     user=[0, 1, 0], item=[2, 0, 1], ts=[1.0, 2.0, 3.0])
    >>> data.item_counts().tolist()
    [1, 1, 1]
    >>> [data.item[idx].tolist() for idx in data.sequences()]
    [[2, 1], [0]]
    """

    catalog: np.ndarray
    users: np.ndarray
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    context: Mapping[str, np.ndarray]

    @classmethod
    def from_arrays(
        cls,
        catalog: Iterable[str],
        users: Iterable[str],
        user: Iterable[int],
        item: Iterable[int],
        ts: Iterable[float],
        context: Mapping[str, Iterable[str]] | None = None,
    ) -> Interactions:
        """Interactions from columns, sorted stably by ``ts`` (ties keep the given order)."""
        catalog_arr = _column(catalog, str)
        users_arr = _column(users, str)
        user_arr = _column(user, np.int32)
        item_arr = _column(item, np.int32)
        ts_arr = _column(ts, np.float64)
        n = ts_arr.size
        if user_arr.size != n or item_arr.size != n:
            raise ValueError("user, item and ts must have the same length")
        if n and (item_arr.min() < 0 or item_arr.max() >= catalog_arr.size):
            raise ValueError("an item index is outside the catalog")
        if n and (user_arr.min() < 0 or user_arr.max() >= users_arr.size):
            raise ValueError("a user index is outside the users")
        ctx: dict[str, np.ndarray] = {}
        for name in CONTEXT_FIELDS:
            values = (context or {}).get(name)
            column = np.full(n, "", dtype=str) if values is None else _column(values, str)
            if column.size != n:
                raise ValueError(f"context {name!r} must have one value per interaction")
            ctx[name] = column
        order = np.argsort(ts_arr, kind="stable")
        return cls(
            catalog=catalog_arr,
            users=users_arr,
            user=user_arr[order],
            item=item_arr[order],
            ts=ts_arr[order],
            context={name: col[order] for name, col in ctx.items()},
        )

    @classmethod
    def from_records(
        cls,
        records: Iterable[Event | Item],
        *,
        event_types: Iterable[EventType] = INTERACTION_TYPES,
        first_only: bool = False,
    ) -> Interactions:
        """Interactions from catalog records and events, e.g. a replay or the simulator.

        Parameters
        ----------
        records
            :class:`~streamrec.contract.Item` and :class:`~streamrec.contract.Event` records
            in any mix (a :class:`~streaming.replay.ReplaySource` yields the catalog, then
            the events).
        event_types
            Which event types count as interactions.
        first_only
            Keep only each user's first interaction with an item. A shop's funnel repeats
            the item (view, click, cart, purchase); the next-item task asks for items the
            user has not had yet.
        """
        kinds = frozenset(event_types)
        catalog: dict[str, int] = {}
        users: dict[str, int] = {}
        user: list[int] = []
        item: list[int] = []
        ts: list[float] = []
        ctx: dict[str, list[str]] = {name: [] for name in CONTEXT_FIELDS}
        for record in records:
            if isinstance(record, Item):
                catalog.setdefault(record.item_id, len(catalog))
                continue
            if record.event_type not in kinds or record.item_id is None:
                continue
            item.append(catalog.setdefault(record.item_id, len(catalog)))
            user.append(users.setdefault(record.user_id, len(users)))
            ts.append(record.ts.timestamp())
            c = record.context
            ctx["device"].append(c.device.value if c is not None and c.device else "")
            ctx["country"].append((c.country or "") if c is not None else "")
        data = cls.from_arrays(catalog, users, user, item, ts, ctx)
        return data.first_interactions() if first_only else data

    def __len__(self) -> int:
        return int(self.ts.size)

    @property
    def n_items(self) -> int:
        """Catalog size."""
        return int(self.catalog.size)

    @property
    def n_users(self) -> int:
        """Number of known users (some may have no interaction left after a split)."""
        return int(self.users.size)

    def take(self, index: np.ndarray) -> Interactions:
        """The interactions selected by a boolean mask or increasing indexes, same indexes."""
        return Interactions(
            catalog=self.catalog,
            users=self.users,
            user=self.user[index],
            item=self.item[index],
            ts=self.ts[index],
            context={name: col[index] for name, col in self.context.items()},
        )

    def first_interactions(self) -> Interactions:
        """Only the first interaction of each (user, item) pair."""
        pair = self.user.astype(np.int64) * self.n_items + self.item
        _, first = np.unique(pair, return_index=True)
        return self.take(np.sort(first))

    def item_counts(self) -> np.ndarray:
        """Interactions per item (``int64``, catalog order)."""
        return np.bincount(self.item, minlength=self.n_items)

    def sequences(self) -> list[np.ndarray]:
        """Per user index, the indexes of their interactions in time order."""
        order = np.argsort(self.user, kind="stable")  # stable: time order within a user
        bounds = np.cumsum(np.bincount(self.user, minlength=self.n_users))
        return np.split(order, bounds[:-1])

    def user_item_matrix(self, binary: bool = True) -> csr_matrix:
        """Users x items sparse matrix of interaction counts (or 1 where any)."""
        values = np.ones(len(self), dtype=np.float32)
        matrix = csr_matrix(
            (values, (self.user, self.item)), shape=(self.n_users, self.n_items)
        )
        matrix.sum_duplicates()
        if binary:
            matrix.data[:] = 1.0
        return matrix
