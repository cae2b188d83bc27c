"""A stream view's numeric features packed into one stored vector, for reads of many entities.

Feast's online stores keep one value per (entity, feature): a recommendation that reads
``item_realtime``'s 13 features for 200 candidates reads 2,600 stored values, ~1.3 µs each
in SQLite before any decoding. The writer therefore also stores each ``item_realtime`` row as
``item_realtime_vector``: the same features, in the view's order, as one ``Array(Float64)``
``values`` — a pre-computed feature vector, declared in the Feast repository like any view
and written by every write of the row it packs. Serving reads the vector
(one value per candidate) and unpacks it into the columns the view itself would give (as
float arrays, NaN for no row);
training and everything offline keep reading ``item_realtime``. A test holds the two reads
equal.

Examples
--------
>>> from datetime import UTC, datetime
>>> row = {"item_id": "i1", "event_timestamp": datetime(2026, 1, 1, tzinfo=UTC),
...        **{name: 0 for name in ITEM_VECTOR.source.names}, "clicks_1h": 3, "ctr_1h": 0.25}
>>> packed = ITEM_VECTOR.pack(row)
>>> ITEM_VECTOR.name, packed["item_id"], len(packed["values"])
('item_realtime_vector', 'i1', 13)
>>> columns = ITEM_VECTOR.unpack([packed["values"], None])
>>> columns["item_realtime__clicks_1h"].tolist(), columns["item_realtime__ctr_1h"].tolist()
([3.0, nan], [0.25, nan])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.definitions import ITEM_VIEW, TIMESTAMP_FIELD, Kind, RealtimeView

__all__ = ["ITEM_VECTOR", "PACKED", "PackedView"]


@dataclass(frozen=True)
class PackedView:
    """The packed twin of a real-time view whose features are all numbers.

    Parameters
    ----------
    source
        The view whose features are packed, in its order.
    feature
        Name of the vector feature.
    """

    source: RealtimeView
    feature: str = "values"

    def __post_init__(self) -> None:
        kinds = set(self.source.kinds().values())
        if not kinds <= {Kind.INT, Kind.FLOAT}:
            raise ValueError(f"{self.source.name}: only numeric features pack into a vector")

    @property
    def name(self) -> str:
        return f"{self.source.name}_vector"

    def pack(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The packed row of a ``source`` row (same key and timestamp); ``None`` → NaN."""
        values = np.array([row[name] for name in self.source.names], dtype=np.float64)
        return {self.source.join_key: row[self.source.join_key],
                TIMESTAMP_FIELD: row[TIMESTAMP_FIELD], self.feature: values}

    @property
    def columns(self) -> list[str]:
        """The ``<source>__<feature>`` names of the packed values, in order."""
        return [f"{self.source.name}__{feature.name}" for feature in self.source.features]

    def rows(self, vectors: Sequence[np.ndarray | None]) -> np.ndarray:
        """``(len(vectors), len(columns))`` float64, a row per entity, NaN for no row (or
        a vector of another length)."""
        width = len(self.source.features)
        gap = np.full(width, np.nan)
        return np.array([v if v is not None and len(v) == width else gap for v in vectors],
                        dtype=np.float64).reshape(len(vectors), width)

    def unpack(self, vectors: Sequence[np.ndarray | None]) -> dict[str, np.ndarray]:
        """The ``<source>__<feature>`` columns that reading ``source`` with full feature
        names gives, as float64 arrays with NaN where an entity has no row.

        Arrays rather than the lists a read gives: serving hands them to the ranker's
        numeric features, which convert every column to float64 anyway (counts are
        whole numbers either way), so 200 candidates x 13 features never become Python
        objects.
        """
        columns = np.ascontiguousarray(self.rows(vectors).T)
        return dict(zip(self.columns, columns, strict=True))


ITEM_VECTOR = PackedView(ITEM_VIEW)
"""``item_realtime`` packed: what serving reads for its candidates."""

PACKED: dict[str, PackedView] = {ITEM_VIEW.name: ITEM_VECTOR}
"""Packed twin of each real-time view that has one, by the view's name."""
