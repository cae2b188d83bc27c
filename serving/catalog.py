"""The catalog as serving needs it: item profiles, fresh items and nearest-neighbour indexes.

Built from the offline store's Parquet parts — the newest row per item of ``item_profile``
(category, title, price, ``created_at_s``) and of ``item_embeddings`` (``graph_vector``,
``text_vector``) — and kept current by :class:`CatalogRefresher`, which polls both folders
and reads only parts that are new or rewritten since its last look. So an item the catalog
worker has just written (with its text vector projected into graph space) becomes a
candidate within ``serving_catalog_refresh_s``, without a restart and before anyone has
interacted with it.

Two :class:`VectorSpace` indexes (``usearch`` HNSW, cosine) answer "items near these":

* ``graph``: the co-occurrence walk vectors (and projected vectors of cold-start items);
* ``text``: the MiniLM title vectors, searched for a seed item that has no graph vector.

Each item has a stable integer key (its position in :attr:`Catalog.ids`), so an update
replaces the item's vector in place. A seed's neighbours are searched once and kept until
either index changes (:meth:`Catalog.near`): popular items seed many requests. Updates
are applied in small chunks under each index's lock, so a request never waits long behind
a refresh; a part that disappeared (compaction, a job that rewrote the folder) triggers a
full rebuild off to the side and one swap.

Examples
--------
>>> import numpy as np
>>> catalog = Catalog(graph_dim=2, text_dim=3)
>>> catalog.upsert_profiles([
...     {"item_id": "a", "category": "Shoes", "title": "Trail shoe", "price": 90.0,
...      "created_at_s": 100, "ts_us": 1},
...     {"item_id": "b", "category": "Shoes", "title": "Road shoe", "price": 80.0,
...      "created_at_s": 200, "ts_us": 1}])
2
>>> catalog.upsert_vectors(["a", "b"], [1, 1],
...                        np.array([[1, 0], [0.9, 0.1]], dtype=np.float32), None)
>>> [(item, round(sim, 2)) for item, sim in catalog.similar("a", 5)]
[('b', 0.99)]
>>> catalog.refresh_fresh(now_s=300, max_age_s=1000, per_category=1)
>>> catalog.fresh("Shoes")
('b',)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from usearch.index import Index, Matches

from serving.metrics import ServingMetrics
from streamrec.settings import Settings

__all__ = ["CATALOG_VIEWS", "Catalog", "CatalogRefresher", "ItemProfile", "Near", "VectorSpace"]

log = logging.getLogger(__name__)

GRAPH_DIM = 64
TEXT_DIM = 384
"""Vector sizes of ``feature_repo/item_embeddings.py`` (its module is not importable: Feast
loads the repo folder by path)."""

_CHUNK = 64
"""Vectors added per lock hold: about a millisecond of HNSW inserts."""

_NEAR_CACHE_MAX = 100_000
"""Searches :meth:`Catalog.near` keeps (about 1.5 KB each); beyond, it starts over."""


PROFILE_FIELDS = ("category", "title", "price", "created_at_s")
NUMBER_FIELDS = ("price", "created_at_s")
"""Profile fields :meth:`Catalog.item_features` gives as float arrays (NaN: no value)."""
CATALOG_VIEWS = ("item_profile", "item_embeddings")
"""Feature views :meth:`Catalog.item_features` can serve."""


@dataclass(frozen=True, slots=True)
class ItemProfile:
    """The catalog facts serving shows and filters by."""

    category: str | None
    title: str | None
    price: float | None
    created_at_s: int | None


@dataclass(frozen=True, slots=True)
class Near:
    """One seed's nearest items: their numbers, cosine similarities and ids, nearest
    first."""

    space: str
    keys: np.ndarray
    sims: np.ndarray
    items: tuple[str, ...]
    """The ids of ``keys``."""


class VectorSpace:
    """Item vectors of one kind: a cosine HNSW index and the vectors by item number.

    Parameters
    ----------
    ndim
        Vector size; rows of another size are ignored.

    The index answers "nearest to"; the matrix answers "the vectors of these items" in one
    numpy indexing without a lookup per item, and :meth:`vectors` gives them as read-only
    row views that stay the same objects until the item's vector changes (so the ranker can
    memoise what it computes from them). Searches and index updates are serialised by a
    lock (a search takes a fraction of a millisecond; updates come in chunks of
    :data:`_CHUNK`). The matrix is written by the one refresher thread and only grows by
    replacement, so readers need no lock.
    """

    def __init__(self, ndim: int) -> None:
        self.ndim = ndim
        self._index = Index(ndim=ndim, metric="cos", dtype="f32", expansion_add=64)
        self._lock = threading.Lock()
        self._rows: tuple[np.ndarray, np.ndarray] = (
            np.zeros((0, ndim), dtype=np.float32), np.zeros(0, dtype=bool)
        )
        # Row views handed out by :meth:`vectors`, made on first use; replaced together with
        # the matrix, so a view always belongs to the matrix it is stored beside.
        self._views: tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]] = (*self._rows, {})
        self.version = 0
        """Bumped after every :meth:`upsert`: search results of an older version may differ."""

    def __len__(self) -> int:
        return len(self._index)

    def upsert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace the vectors of ``keys``."""
        matrix, present = self._rows
        size = int(keys.max()) + 1 if len(keys) else 0
        if size > len(present):
            grown = max(size, 2 * len(present), 1024)
            matrix = np.concatenate([matrix, np.zeros((grown - len(matrix), self.ndim),
                                                      dtype=np.float32)])
            present = np.concatenate([present, np.zeros(grown - len(present), dtype=bool)])
        views_of, _, views = self._views
        changed = keys.tolist()
        # A changed vector is a new object. Dropped before the write too: a view made while
        # the row was being written (a torn read, as any unlocked read may see) then lives
        # no longer than the request that made it, so nothing memoised from it outlasts it.
        for key in changed:
            views.pop(key, None)
        matrix[keys] = vectors
        present[keys] = True
        self._rows = (matrix, present)
        if views_of is not matrix:
            self._views = (matrix, present, {})
        else:
            for key in changed:
                views.pop(key, None)
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            with self._lock:
                known = chunk[self._index.contains(chunk)]
                if len(known):
                    self._index.remove(known)
                self._index.add(chunk, vectors[start : start + _CHUNK], threads=1)
        # After the whole change: a result cached while it was under way is never reused.
        self.version += 1

    def rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of ``keys`` and whether each has one (``-1``: an unknown item)."""
        matrix, present = self._rows
        inside = (keys >= 0) & (keys < len(present))
        safe = np.where(inside, keys, 0)
        has = inside & present[safe] if len(present) else np.zeros(len(keys), dtype=bool)
        return (matrix[safe] if len(matrix) else np.zeros((len(keys), self.ndim),
                                                          dtype=np.float32)), has

    def vectors(self, keys: Sequence[int]) -> list[np.ndarray | None]:
        """The vector of each key as a read-only row view (``None``: none), the same object
        on every call until the key's vector changes."""
        matrix, present, views = self._views
        out: list[np.ndarray | None] = []
        for key in keys:
            view = views.get(key)
            if view is None and 0 <= key < len(present) and present[key]:
                view = views[key] = matrix[key]
                view.flags.writeable = False
            out.append(view)
        return out

    def search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query, up to ``k`` keys (int64) and their cosine similarities (float64),
        nearest first."""
        if not len(queries):
            return []
        with self._lock:
            if not len(self._index):
                empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
                return [empty for _ in queries]
            found = self._index.search(queries, k, threads=1)
        if isinstance(found, Matches):  # usearch unwraps a batch of one
            return [(found.keys.astype(np.int64), 1.0 - found.distances.astype(np.float64))]
        keys = found.keys.astype(np.int64)
        sims = 1.0 - found.distances.astype(np.float64)
        return [(keys[i, :count], sims[i, :count]) for i, count in enumerate(found.counts)]


class Catalog:
    """Items by id with profiles, vectors in two spaces and the newest items per category.

    Parameters
    ----------
    graph_dim, text_dim
        Sizes of ``graph_vector`` and ``text_vector``.

    One writer (the refresher) mutates it; requests read it from any thread. Item numbers
    only grow, and an item's data is in place before its key enters an index.
    """

    def __init__(self, graph_dim: int = GRAPH_DIM, text_dim: int = TEXT_DIM) -> None:
        self.ids: list[str] = []
        self.number: dict[str, int] = {}
        self.profiles: dict[str, ItemProfile] = {}
        # The same profiles as rows by item number: 200 candidates' columns in one gather.
        self._profile_rows = np.full((0, len(PROFILE_FIELDS)), None, dtype=object)
        # Their numbers as floats too: the ranker converts them, and a None costs a slow path.
        self._profile_numbers = np.full((0, len(NUMBER_FIELDS)), np.nan)
        self.graph = VectorSpace(graph_dim)
        self.text = VectorSpace(text_dim)
        self._profile_ts: dict[str, int] = {}
        self._vector_ts: dict[str, int] = {}
        self._fresh: Mapping[str, tuple[str, ...]] = {}
        # Neighbours by (seed number, k), for the index versions they were searched in:
        # popular items are the seeds of many requests, and a search costs ~0.1 ms a seed.
        self._near: tuple[tuple[int, int], dict[tuple[int, int], Near]] = ((-1, -1), {})

    def __len__(self) -> int:
        return len(self.ids)

    def _key(self, item_id: str) -> int:
        key = self.number.get(item_id)
        if key is None:
            key = len(self.ids)
            self.ids.append(item_id)
            self.number[item_id] = key
        return key

    # --- writes (one thread) ----------------------------------------------------------

    def upsert_profiles(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Take each row (``item_id``, ``ts_us``, profile fields) newer than what is known."""
        taken: dict[int, ItemProfile] = {}
        for row in rows:
            item_id, ts_us = row["item_id"], row["ts_us"]
            if ts_us < self._profile_ts.get(item_id, -1):
                continue
            self._profile_ts[item_id] = ts_us
            profile = self.profiles[item_id] = ItemProfile(
                category=row.get("category"), title=row.get("title"),
                price=row.get("price"), created_at_s=row.get("created_at_s"),
            )
            taken[self._key(item_id)] = profile
        if taken:
            table, numbers = self._profile_rows, self._profile_numbers
            size = max(taken) + 1
            if size > len(table):
                rows = max(size, 2 * len(table), 1024)
                grown = np.full((rows, len(PROFILE_FIELDS)), None, dtype=object)
                grown[: len(table)] = table
                table = grown
                grown = np.full((rows, len(NUMBER_FIELDS)), np.nan)
                grown[: len(numbers)] = numbers
                numbers = grown
            for key, profile in taken.items():
                table[key] = (profile.category, profile.title, profile.price,
                              profile.created_at_s)
                numbers[key] = [_float(getattr(profile, f)) for f in NUMBER_FIELDS]
            self._profile_numbers = numbers
            self._profile_rows = table
        return len(taken)

    def upsert_vectors(
        self,
        item_ids: Sequence[str],
        ts_us: Sequence[int],
        graph: np.ndarray | None,
        text: np.ndarray | None,
        *,
        graph_valid: np.ndarray | None = None,
        text_valid: np.ndarray | None = None,
    ) -> None:
        """Take the vectors of rows newer than what is known (``*_valid``: row has one)."""
        newest: dict[str, int] = {}
        for row, (item_id, ts) in enumerate(zip(item_ids, ts_us, strict=True)):
            if ts < self._vector_ts.get(item_id, -1):
                continue
            seen = newest.get(item_id)
            if seen is None or ts >= ts_us[seen]:
                newest[item_id] = row
        if not newest:
            return
        rows = np.fromiter(newest.values(), dtype=np.int64, count=len(newest))
        keys = np.array([self._key(item_ids[r]) for r in rows], dtype=np.int64)
        for item_id, row in newest.items():
            self._vector_ts[item_id] = ts_us[row]
        for space, vectors, valid in ((self.graph, graph, graph_valid),
                                      (self.text, text, text_valid)):
            if vectors is None:
                continue
            ok = np.ones(len(rows), bool) if valid is None else valid[rows]
            if ok.any():
                space.upsert(keys[ok], np.ascontiguousarray(vectors[rows[ok]]))

    def refresh_fresh(self, *, now_s: float, max_age_s: float, per_category: int) -> None:
        """Recompute the newest items of each category (created within ``max_age_s``)."""
        by_category: dict[str, list[tuple[int, str]]] = {}
        oldest = now_s - max_age_s
        for item_id, profile in list(self.profiles.items()):
            created = profile.created_at_s
            if profile.category is None or created is None or created < oldest:
                continue
            by_category.setdefault(profile.category, []).append((created, item_id))
        self._fresh = {
            category: tuple(item for _, item in sorted(pairs, reverse=True)[:per_category])
            for category, pairs in by_category.items()
        }

    # --- reads (any thread) -----------------------------------------------------------

    def fresh(self, category: str) -> tuple[str, ...]:
        """Newest items of ``category``, newest first."""
        return self._fresh.get(category, ())

    def fresh_categories(self) -> list[str]:
        """Categories that have new items."""
        return list(self._fresh)

    def title(self, item_id: str) -> str | None:
        profile = self.profiles.get(item_id)
        return profile.title if profile is not None else None

    def category(self, item_id: str) -> str | None:
        profile = self.profiles.get(item_id)
        return profile.category if profile is not None else None

    def neighbours(
        self, seeds: Sequence[str], k: int
    ) -> list[tuple[str, list[tuple[str, float]], str]]:
        """For each seed known to an index: ``(seed, [(item, similarity)], space)``.

        A seed is searched in graph space when it has a graph vector, else in text space;
        the seed itself is left out of its own neighbours.
        """
        return [(seed, list(zip(near.items, near.sims.tolist(), strict=True)), near.space)
                for seed, near in self.near(seeds, k)]

    def near(self, seeds: Sequence[str], k: int) -> list[tuple[str, Near]]:
        """:meth:`neighbours` as arrays of item numbers (see :attr:`ids`): graph-space seeds
        first, then text-space ones, each in ``seeds`` order.

        Results are kept until either index changes, so a seed is searched once per
        catalog version; the arrays are shared and read-only.
        """
        versions = (self.graph.version, self.text.version)
        state = self._near
        if state[0] != versions or len(state[1]) > _NEAR_CACHE_MAX:
            state = self._near = (versions, {})
        cache = state[1]
        number = self.number
        keyed = [(seed, number[seed]) for seed in seeds if seed in number]
        missing = [pair for pair in keyed if (pair[1], k) not in cache]
        ids = self.ids
        for name, space in (("graph", self.graph), ("text", self.text)):
            if not missing:
                break
            vectors, has = space.rows(np.array([key for _, key in missing], dtype=np.int64))
            if has.any():
                found = [pair for pair, ok in zip(missing, has, strict=True) if ok]
                for (_, key), (keys, sims) in zip(found, space.search(vectors[has], k + 1),
                                                     strict=True):
                    others = keys != key
                    keys, sims = keys[others][:k], sims[others][:k]
                    keys.flags.writeable = sims.flags.writeable = False
                    cache[key, k] = Near(name, keys, sims,
                                         tuple(ids[n] for n in keys.tolist()))
            missing = [pair for pair, ok in zip(missing, has, strict=True) if not ok]
        chosen = [(seed, cache.get((key, k))) for seed, key in keyed]
        return [(seed, near) for space in ("graph", "text") for seed, near in chosen
                if near is not None and near.space == space]

    def item_features(self, item_ids: Sequence[str]) -> dict[str, Sequence[Any]]:
        """The ``item_profile`` and ``item_embeddings`` columns of ``item_ids``, named like
        ``OnlineFeatureReader.read(..., full_feature_names=True)`` returns them: lists with
        ``None`` where the catalog has no value, except :data:`NUMBER_FIELDS`, float64
        arrays with NaN there."""
        number = self.number.get
        key_list = [number(item, -1) for item in item_ids]
        keys = np.array(key_list, dtype=np.int64)
        out: dict[str, Sequence[Any]] = {
            "item_embeddings__graph_vector": self.graph.vectors(key_list),
            "item_embeddings__text_vector": self.text.vectors(key_list),
        }
        numbers, table = self._profile_numbers, self._profile_rows
        # The refresher replaces the two tables one after the other: use the rows both have.
        inside = (keys >= 0) & (keys < min(len(table), len(numbers)))
        at = np.where(inside, keys, 0)
        rows = table[at] if len(table) else np.full(
            (len(keys), len(PROFILE_FIELDS)), None, dtype=object)
        rows[~inside] = None
        values = numbers[at] if len(numbers) else np.full((len(keys), len(NUMBER_FIELDS)),
                                                          np.nan)
        values[~inside] = np.nan
        for j, field in enumerate(PROFILE_FIELDS):
            if field not in NUMBER_FIELDS:
                out[f"item_profile__{field}"] = rows[:, j].tolist()
        for j, field in enumerate(NUMBER_FIELDS):
            out[f"item_profile__{field}"] = np.ascontiguousarray(values[:, j])
        return out

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` items nearest to ``item_id`` (graph space, else text; empty if unknown)."""
        found = self.neighbours([item_id], k)
        return found[0][1] if found else []


def _float(value: Any) -> float:
    return np.nan if value is None else float(value)


# --- Parquet --------------------------------------------------------------------------------


def _parts(folder: Path) -> dict[str, tuple[int, int]]:
    """Visible Parquet files under ``folder`` with (size, mtime): hidden and ``_`` ones are
    in-progress or metadata (Spark, the atomic writers) and skipped."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.rglob("*.parquet"):
        rel = path.relative_to(folder)
        if any(part.startswith((".", "_")) for part in rel.parts):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found[rel.as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def _ts_us(table: pa.Table) -> list[int]:
    column = table.column("event_timestamp")
    stamps = pc.cast(column, pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return stamps.fill_null(0).to_pylist()


def _vectors(table: pa.Table, name: str, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(n, dim)`` float32 and a mask of rows holding a vector of that size."""
    if name not in table.column_names:
        return None
    column = table.column(name).combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        return None
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    valid = lengths == dim
    out = np.zeros((len(column), dim), dtype=np.float32)
    if valid.any():
        values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        offsets = column.offsets.to_numpy()[:-1][valid]
        out[valid] = values[offsets[:, None] + np.arange(dim)]
    return out, valid


def read_profile_part(path: Path) -> list[dict[str, Any]]:
    """Rows of one ``item_profile`` part as dicts with ``ts_us``."""
    table = pq.read_table(path)
    ts = _ts_us(table)
    wanted = [c for c in ("item_id", "category", "title", "price", "created_at_s")
              if c in table.column_names]
    rows = table.select(wanted).to_pylist()
    for row, stamp in zip(rows, ts, strict=True):
        row["ts_us"] = stamp
    return [row for row in rows if row.get("item_id")]


class CatalogRefresher:
    """Keeps a :class:`Catalog` in step with the Parquet folders, in a background thread.

    Parameters
    ----------
    settings
        Home (``offline/item_profile``, ``offline/item_embeddings``), refresh interval and
        the fresh-item window.
    metrics
        ``streamrec_api_catalog_items`` per space.
    """

    def __init__(self, settings: Settings, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        offline = settings.home / "offline"
        self.profile_dir = offline / "item_profile"
        self.vector_dir = offline / "item_embeddings"
        self.catalog = Catalog()
        self._seen: dict[Path, dict[str, tuple[int, int]]] = {}
        self._stop = threading.Event()
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamrec-catalog",
                                        daemon=True)

    @property
    def loaded(self) -> bool:
        """True after the first complete pass over both folders."""
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float) -> bool:
        return self._loaded.wait(timeout)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # a bad part must not end the refresher; logged, retried
                log.exception("catalog refresh failed")
            self._loaded.set()
            self._stop.wait(self.settings.serving_catalog_refresh_s)

    def refresh(self, now_s: float | None = None) -> bool:
        """One pass: read new or rewritten parts; rebuild if a part vanished.

        Returns whether anything changed.
        """
        profiles = self._changes(self.profile_dir)
        vectors = self._changes(self.vector_dir)
        if profiles is None or vectors is None:
            self._rebuild()
            changed = True
        else:
            changed = bool(profiles or vectors)
            self._apply(self.catalog, self.profile_dir, profiles, self.vector_dir, vectors)
        if changed:
            settings = self.settings
            self.catalog.refresh_fresh(
                now_s=time.time() if now_s is None else now_s,
                max_age_s=settings.serving_fresh_max_age_s,
                per_category=settings.serving_fresh_per_category,
            )
            self.metrics.catalog_items.labels(space="graph").set(len(self.catalog.graph))
            self.metrics.catalog_items.labels(space="text").set(len(self.catalog.text))
        return changed

    def _changes(self, folder: Path) -> list[str] | None:
        """New or rewritten parts since the last look; ``None`` if one disappeared."""
        now = _parts(folder)
        before = self._seen.get(folder, {})
        if set(before) - set(now):
            return None
        return sorted(name for name, sig in now.items() if before.get(name) != sig)

    def _rebuild(self) -> None:
        log.info("catalog parts were removed; rebuilding the indexes")
        self._seen.clear()
        fresh = Catalog(self.catalog.graph.ndim, self.catalog.text.ndim)
        self._apply(fresh, self.profile_dir, sorted(_parts(self.profile_dir)),
                    self.vector_dir, sorted(_parts(self.vector_dir)))
        self.catalog = fresh

    def _apply(self, catalog: Catalog, profile_dir: Path, profiles: Sequence[str],
               vector_dir: Path, vectors: Sequence[str]) -> None:
        for name in profiles:
            path = profile_dir / name
            try:
                catalog.upsert_profiles(read_profile_part(path))
            except (OSError, pa.ArrowException) as exc:
                log.warning("skipping unreadable part %s this round: %s", path, exc)
                continue
            self._remember(profile_dir, name, path)
        for name in vectors:
            path = vector_dir / name
            try:
                table = pq.read_table(path)
                graph = _vectors(table, "graph_vector", catalog.graph.ndim)
                text = _vectors(table, "text_vector", catalog.text.ndim)
                catalog.upsert_vectors(
                    table.column("item_id").to_pylist(), _ts_us(table),
                    None if graph is None else graph[0], None if text is None else text[0],
                    graph_valid=None if graph is None else graph[1],
                    text_valid=None if text is None else text[1],
                )
            except (OSError, KeyError, pa.ArrowException) as exc:
                log.warning("skipping unreadable part %s this round: %s", path, exc)
                continue
            self._remember(vector_dir, name, path)

    def _remember(self, folder: Path, name: str, path: Path) -> None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        self._seen.setdefault(folder, {})[name] = (stat.st_size, stat.st_mtime_ns)
