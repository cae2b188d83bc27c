"""Training data: labelled examples joined point-in-time with the ``ranker_features`` service.

Each labelled example (:mod:`training.labels`) asks for the features of its user and item
*as they were just before the impression*: the entity timestamp is the impression time
minus :data:`FEATURE_LAG` (1 µs), so a feature row stamped at the impression itself —
which already counts that impression — is not used, exactly as serving read the features
before it logged the impression. Feast's point-in-time rule then picks, per view, the
newest row with ``row time <= entity time`` (and ``>= entity time - ttl`` for views with
a TTL). No feature value can come from after its label's time.

Joined per entity
    The views of one join key are joined on the *distinct* (key, time) pairs: a slate's
    ten rows share one (user, time), so the user views are joined once per request. It is
    also needed for correctness: Feast's file store deduplicates its output on
    (join keys so far, time), which collapses a slate's rows into one when a user view is
    joined first. Results are merged back onto the examples by row id, because the file
    store also *drops* entity rows that have rows in a view but none inside the TTL;
    every example survives, with missing features (``None``) where nothing matched.

Two engines (``STREAMREC_TRAIN_PIT_ENGINE``)
    ``feast`` calls ``FeatureStore.get_historical_features`` once per view (chunks of
    ``STREAMREC_TRAIN_PIT_CHUNK_ROWS``; per view, because a row the file store drops for
    one view would otherwise lose every view's features). The file offline store runs on dask, which
    pickles every object column (``recent_items``, embedding vectors) several times per
    intermediate step to name it: 200 distinct (user, time) pairs of a 56k-row user log
    took ~50 s on a loaded 2-core machine, so it cannot carry ~1M examples. ``asof``
    (default) performs the same join, from the same registry definitions (views, folders,
    timestamp fields, TTLs, feature names), with ``pandas.merge_asof``: O(n log n), about
    a second per million rows. ``tests/test_training_data.py`` holds the two to equal
    results. Ties (two rows of an entity with the same timestamp) go to the row written
    last; Feast leaves them to its sort order. A view whose folder holds no data yet reads
    as missing (Feast's reader fails on an empty folder).

Examples
--------
>>> import tempfile
>>> from datetime import UTC, datetime
>>> from features.store import OnlineFeatureWriter, apply_repo
>>> settings = Settings(home=tempfile.mkdtemp())
>>> apply_repo(settings)  # doctest: +ELLIPSIS
Created project streamrec...
>>> profile = {"item_id": "i1", "event_timestamp": datetime(2026, 1, 1, tzinfo=UTC),
...            "category": "Shoes", "title": "Runner", "price": 80.0, "created_at_s": 0}
>>> _ = OnlineFeatureWriter(settings).append_offline("item_profile", [profile])
>>> examples = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i1", "i2"],
...     "request_id": ["r", "r"], "position": [0, 1], "label": [1, 0],
...     "ts": [datetime(2026, 1, 2, tzinfo=UTC)] * 2, "device": ["mobile", "mobile"],
...     "country": ["DE", "DE"]})
>>> data = training_set(settings, examples)
>>> data.batch.column("item_profile__category"), data.labels.tolist()
(['Shoes', None], [1.0, 0.0])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from features.definitions import TIMESTAMP_FIELD
from features.store import RANKER_SERVICE, feature_store
from streamrec.settings import Settings
from training.ranking_batch import RankingBatch

if TYPE_CHECKING:
    from feast import FeatureStore

__all__ = [
    "FEATURE_LAG",
    "TrainingSet",
    "ViewSpec",
    "point_in_time_features",
    "service_views",
    "training_set",
]

FEATURE_LAG = timedelta(microseconds=1)
"""Features are taken as of the label's time minus this: strictly before the impression."""

Engine = Literal["asof", "feast"]
Progress = Callable[[str], None]

_ROW_ID = "__row_id"


@dataclass(frozen=True)
class ViewSpec:
    """What a point-in-time join needs to know about one view of the service."""

    name: str
    """Prefix of the output columns (``<name>__<feature>``)."""
    view: str
    join_key: str
    folder: Path
    timestamp_field: str
    ttl: timedelta | None
    features: tuple[str, ...]

    @property
    def columns(self) -> list[str]:
        return [f"{self.name}__{f}" for f in self.features]

    def has_data(self) -> bool:
        """Whether the folder holds any Parquet file (hidden and ``_`` files aside)."""
        return self.folder.is_dir() and any(
            not any(part.startswith((".", "_")) for part in p.relative_to(self.folder).parts)
            for p in self.folder.rglob("*.parquet")
        )


def service_views(store: FeatureStore, service: str = RANKER_SERVICE) -> list[ViewSpec]:
    """The views of a feature service as :class:`ViewSpec`, in the service's order."""
    from feast import FileSource

    specs = []
    for projection in store.get_feature_service(service, allow_cache=True).feature_view_projections:
        view = store.get_feature_view(projection.name, allow_registry_cache=True)
        source = view.batch_source
        if not isinstance(source, FileSource):
            raise ValueError(f"{view.name}: only Parquet file sources are supported")
        keys = [c.name for c in view.entity_columns]
        if len(keys) != 1 or source.created_timestamp_column or projection.join_key_map:
            raise ValueError(f"{view.name}: one join key, no created timestamp, no key mapping")
        ttl = view.ttl if view.ttl and view.ttl.total_seconds() else None
        folder = Path(FileSource.get_uri_for_file_path(store.config.repo_path, source.path))
        specs.append(
            ViewSpec(
                name=projection.name_to_use(),
                view=view.name,
                join_key=keys[0],
                folder=folder,
                timestamp_field=source.timestamp_field,
                ttl=ttl,
                features=tuple(f.name for f in projection.features),
            )
        )
    return specs


# --- the two engines ----------------------------------------------------------------------


def _asof(keys: pd.DataFrame, spec: ViewSpec) -> pd.DataFrame:
    """``keys`` (join key, ``event_timestamp``, row id) with the view's columns as of then."""
    columns = [spec.join_key, spec.timestamp_field, *spec.features]
    table = ds.dataset(spec.folder, format="parquet", partitioning="hive").to_table(
        columns=columns
    )
    rows = table.to_pandas(types_mapper=None)
    rows = rows.rename(
        columns={spec.timestamp_field: "__row_ts", **dict(zip(spec.features, spec.columns,
                                                                strict=True))}
    )
    rows["__row_ts"] = pd.to_datetime(rows["__row_ts"], utc=True).astype("datetime64[us, UTC]")
    rows[spec.join_key] = rows[spec.join_key].astype(str)
    # Stable: among rows with one timestamp the last written (file, then row order) wins.
    rows = rows.sort_values("__row_ts", kind="stable")
    left = keys.sort_values(TIMESTAMP_FIELD, kind="stable")
    joined = pd.merge_asof(
        left, rows, left_on=TIMESTAMP_FIELD, right_on="__row_ts", by=spec.join_key,
        direction="backward", allow_exact_matches=True,
    )
    if spec.ttl is not None:
        stale = joined["__row_ts"] < joined[TIMESTAMP_FIELD] - spec.ttl
        if stale.any():
            for column in spec.columns:
                joined[column] = joined[column].mask(stale)  # NaN, as for no row at all
    return joined.drop(columns="__row_ts")


def _feast(
    keys: pd.DataFrame, spec: ViewSpec, store: FeatureStore, chunk_rows: int
) -> pd.DataFrame:
    """:func:`_asof` through ``get_historical_features``, one view per call: the file store
    drops an entity row from the whole result when ONE view has rows for its key but none
    in the TTL, which would blank the other views' features too."""
    refs = [f"{spec.view}:{f}" for f in spec.features]
    parts = []
    ordered = keys.sort_values(TIMESTAMP_FIELD, kind="stable")
    for start in range(0, len(ordered), chunk_rows):
        chunk = ordered.iloc[start : start + chunk_rows]
        out = store.get_historical_features(
            entity_df=chunk, features=refs, full_feature_names=True
        ).to_df()
        parts.append(out.drop_duplicates(_ROW_ID).set_index(_ROW_ID)[spec.columns])
    return keys.join(pd.concat(parts), on=_ROW_ID)


def point_in_time_features(
    settings: Settings,
    entities: pd.DataFrame,
    *,
    engine: Engine | None = None,
    store: FeatureStore | None = None,
    service: str = RANKER_SERVICE,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """The service's features of every entity row as of its ``event_timestamp``.

    Parameters
    ----------
    entities
        ``user_id``, ``item_id`` and ``event_timestamp`` (UTC) per row; the moment is
        used as given (pass the label time minus :data:`FEATURE_LAG`).
    engine
        ``"asof"`` or ``"feast"`` (module docs); default ``settings.train_pit_engine``.

    Returns
    -------
    pandas.DataFrame
        One row per entity row, same order and index, with every ``<view>__<feature>``
        column of the service: ``None``/NaN where no row matched.
    """
    engine = engine or settings.train_pit_engine
    store = store or feature_store(settings)
    specs = service_views(store, service)
    out = pd.DataFrame(index=entities.index)
    stamps = pd.to_datetime(entities[TIMESTAMP_FIELD], utc=True).astype("datetime64[us, UTC]")
    for key in dict.fromkeys(s.join_key for s in specs):
        started = time.perf_counter()
        views = [s for s in specs if s.join_key == key]
        pairs = pd.DataFrame({key: entities[key].astype(str).to_numpy(),
                              TIMESTAMP_FIELD: stamps.reset_index(drop=True)})
        unique = pairs.drop_duplicates().reset_index(drop=True)
        unique[_ROW_ID] = np.arange(len(unique))
        present = [s for s in views if s.has_data()]
        joined = unique
        for spec in present:
            if engine == "feast":
                joined = _feast(joined, spec, store, settings.train_pit_chunk_rows)
            else:
                joined = _asof(joined, spec)
        joined = joined.set_index(_ROW_ID).sort_index()
        row_of = pairs.merge(unique, on=[key, TIMESTAMP_FIELD], how="left")[_ROW_ID].to_numpy()
        for spec in views:
            for column in spec.columns:
                values = (
                    joined[column].to_numpy()[row_of] if spec in present
                    else np.full(len(entities), None, dtype=object)
                )
                out[column] = values
        if progress is not None:
            progress(
                f"point-in-time join ({engine}): {len(unique):,} distinct {key} moments, "
                f"{len(present)}/{len(views)} views with data, "
                f"{time.perf_counter() - started:.1f}s"
            )
    return out


# --- the training set ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSet:
    """Labelled examples with their features: the input of ranker training and evaluation.

    ``examples`` holds the labelled-examples columns (:data:`~training.labels.LABEL_SCHEMA`)
    in the order of ``batch``'s rows.
    """

    examples: pd.DataFrame
    batch: RankingBatch

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def labels(self) -> np.ndarray:
        """0/1 labels as float32."""
        return self.examples["label"].to_numpy(np.float32)

    @property
    def requests(self) -> np.ndarray:
        """The request id of every row (the groups of per-request metrics)."""
        return self.examples["request_id"].to_numpy(object)

    def take(self, index: np.ndarray | Sequence[int]) -> TrainingSet:
        """The rows at ``index``, in that order."""
        idx = np.asarray(index, dtype=np.int64)
        return TrainingSet(self.examples.iloc[idx].reset_index(drop=True), self.batch.take(idx))


def training_set(
    settings: Settings,
    examples: pa.Table | pd.DataFrame,
    *,
    engine: Engine | None = None,
    store: FeatureStore | None = None,
    progress: Progress | None = None,
) -> TrainingSet:
    """Join labelled examples with the ``ranker_features`` service, point in time.

    Parameters
    ----------
    examples
        Labelled examples (:func:`~training.labels.read_labelled_examples`): at least
        ``user_id``, ``item_id``, ``ts``, ``label``, ``request_id``; ``device`` and
        ``country`` become the request context.
    """
    frame = examples.to_pandas() if isinstance(examples, pa.Table) else examples.copy()
    frame = frame.reset_index(drop=True)
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    entities = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(str),
            "item_id": frame["item_id"].astype(str),
            TIMESTAMP_FIELD: frame["ts"] - FEATURE_LAG,
        }
    )
    features = point_in_time_features(
        settings, entities, engine=engine, store=store, progress=progress
    )
    context = {c: frame[c] for c in ("device", "country") if c in frame}
    joined = pd.concat(
        [
            pd.DataFrame(
                {"user_id": entities["user_id"], "item_id": entities["item_id"],
                 TIMESTAMP_FIELD: frame["ts"], **context}
            ),
            features,
        ],
        axis=1,
    )
    return TrainingSet(frame, RankingBatch.from_frame(joined))
