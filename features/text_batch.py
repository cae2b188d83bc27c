"""The text job: catalog → MiniLM text vectors → graph-space vectors for every item → Feast.

Steps of :func:`run_text` (``streamrec batch text``, and the last step of ``batch all``):

1. **Catalog.** The archived catalog (:func:`streaming.archiver.load_catalog`, newest record
   per item), as of the run's ``end``: items created later are left out.
2. **Text vectors.** :func:`~features.text_embeddings.item_text` of every item, embedded by
   :class:`~features.text_embeddings.TextEncoder`. A cache keyed by a hash of the text
   (``<home>/state/text_vectors.parquet``, tied to the model) means a run embeds only texts
   it has not seen: new items and edited ones. The catalog is a few thousand to a few
   hundred thousand rows, one vector each, so the encoder runs in the driver process; the
   event-log jobs are the ones that need Spark's parallelism.
3. **Graph vectors.** The latest item-graph run's Word2Vec vectors,
   ``<home>/offline/item_graph_vectors`` (:mod:`features.item_graph`; the graph job
   replaces the folder on each run). Absent: no graph vectors yet, no projection.
4. **Projection.** On the items that have both vectors, :func:`~features.coldstart.
   evaluate_projection` measures the text-to-graph map on held-out items, then
   :class:`~features.coldstart.TextToGraph` is fitted on all of them and saved (with the
   evaluation) under ``<home>/models/text_to_graph/``, where the catalog worker picks it up.
5. **Rows.** ``item_embeddings``: one row per catalog item and per item of the graph,
   stamped with ``end``; ``graph_vector`` is the walk vector when the item has one, else
   its projected text vector (null without a projection), ``text_vector`` is null for
   items the catalog lacks. ``item_profile``: one row per catalog item (:func:`profile_row`,
   stamped with the item's creation, like the catalog worker's rows).
6. **Offline, then online.** The rows go to the views' Parquet folders as one part each:
   ``item_embeddings`` as ``part-batch-YYYY-MM-DD.parquet`` (the run's UTC day), so a
   re-run of a day replaces its output and earlier days stay for the point-in-time record;
   ``item_profile`` as ``part-batch-catalog.parquet``, replaced by every run (its rows are
   stamped with creation times, so a copy per day would only repeat them). Then into the
   online store (below).

Online rows are written with :class:`~features.store.OnlineFeatureWriter` rather than by
``FeatureStore.materialize``: the run's rows are exactly what materialize would select
(the newest row per item), the writer keeps a row the catalog worker wrote *after* ``end``
(materialize on SQLite overwrites it with the batch's older one), and it is several times
faster on vectors.

Graph spaces
    Each graph run trains Word2Vec afresh, so its vectors live in a space of their own. A
    run therefore rewrites every item's row, and the saved projection always maps into the
    space of the latest run; rows of earlier runs (kept offline for the point-in-time
    record) are not comparable with later ones.

Examples
--------
>>> from datetime import UTC, datetime
>>> from streamrec.contract import Item
>>> item = Item(item_id="i1", title="Moka pot", category="Home/Coffee", price=25.0,
...             created_at="2026-01-05T10:00:00Z")
>>> row = profile_row(item)
>>> row["category"], row["created_at_s"], row["event_timestamp"].isoformat()
('Home/Coffee', 1767607200, '2026-01-05T10:00:00+00:00')
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from features.coldstart import (
    MIN_FIT_ITEMS,
    ProjectionReport,
    TextToGraph,
    atomic_write,
    evaluate_projection,
    projection_dir,
)
from features.definitions import TIMESTAMP_FIELD
from features.text_embeddings import MODEL_NAME, TEXT_DIM, TextEncoder, item_text
from streaming.archiver import load_catalog
from streamrec.contract import Item
from streamrec.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from features.batch_cli import Step

__all__ = [
    "EMBEDDINGS_VIEW",
    "PROFILE_VIEW",
    "TextRun",
    "TextVectorCache",
    "catalog_items",
    "embedding_row",
    "profile_row",
    "read_graph_vectors",
    "run_text",
    "text_cache_path",
    "text_step",
]

Progress = Callable[[str], None]

EMBEDDINGS_VIEW = "item_embeddings"
PROFILE_VIEW = "item_profile"

MIN_EVALUATION_ITEMS = 100
"""Items with both vectors below which a run fits the projection without evaluating it:
a fifth of fewer items would be too few held-out items for a figure worth printing."""


# --- rows ---------------------------------------------------------------------------------


def profile_row(item: Item) -> dict[str, Any]:
    """The ``item_profile`` row of a catalog record, valid from the item's creation.

    Catalog attributes describe the item from the moment it exists, so a point-in-time
    join of any event after its creation finds them.
    """
    return {
        "item_id": item.item_id,
        TIMESTAMP_FIELD: item.created_at,
        "category": item.category,
        "title": item.title,
        "price": item.price,
        "created_at_s": int(item.created_at.timestamp()),
    }


def embedding_row(
    item_id: str, stamp: datetime, graph: np.ndarray | None, text: np.ndarray | None
) -> dict[str, Any]:
    """An ``item_embeddings`` row; a missing vector is stored as null."""
    return {
        "item_id": item_id,
        TIMESTAMP_FIELD: stamp,
        "graph_vector": graph,
        "text_vector": text,
    }


def catalog_items(table: pa.Table) -> list[Item]:
    """The archived catalog (:data:`~streaming.archiver.ITEM_SCHEMA`) as contract items.

    Archived records were validated when they were consumed, so they are not again.
    """
    rows = table.select(
        ["item_id", "title", "category", "price", "created_at", "attributes"]
    ).to_pylist()
    return [
        Item.model_construct(
            item_id=r["item_id"],
            title=r["title"],
            category=r["category"],
            price=r["price"],
            created_at=r["created_at"],
            attributes=orjson.loads(r["attributes"]) if r["attributes"] else {},
        )
        for r in rows
    ]


def _vector_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A list<float> column whose rows all hold ``dim`` values as an ``(n, dim)`` array."""
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size != len(column) * dim:
        raise ValueError(f"expected {dim} values in every row")
    return flat.reshape(len(column), dim)


# --- the text-vector cache ----------------------------------------------------------------


def _text_key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class TextVectorCache:
    """Text vectors of earlier runs, keyed by a hash of the text, in one Parquet file.

    The file records the model that made the vectors; a different model makes it void.

    Examples
    --------
    >>> import tempfile
    >>> cache = TextVectorCache(Path(tempfile.mkdtemp()) / "text_vectors.parquet", "m")
    >>> cache.lookup(["a"]), cache.size
    ([None], 0)
    >>> cache.save({"a": np.ones(2, dtype=np.float32)})
    >>> TextVectorCache(cache.path, "m").lookup(["a", "b"])[0].tolist()
    [1.0, 1.0]
    >>> TextVectorCache(cache.path, "other model").size
    0
    """

    def __init__(self, path: Path, model: str) -> None:
        self.path = path
        self.model = model
        self._vectors: dict[str, np.ndarray] = {}
        if path.is_file():
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if meta.get(b"model") == model.encode() and table.num_rows:
                dim = int(meta[b"dim"])
                matrix = _vector_matrix(table.column("vector"), dim)
                keys = table.column("text_key").to_pylist()
                self._vectors = dict(zip(keys, matrix, strict=True))

    @property
    def size(self) -> int:
        return len(self._vectors)

    def lookup(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        return [self._vectors.get(k) for k in keys]

    def save(self, vectors: Mapping[str, np.ndarray]) -> None:
        """Replace the file with exactly ``vectors`` (a run keeps the texts it used)."""
        self._vectors = dict(vectors)
        if not vectors:
            self.path.unlink(missing_ok=True)
            return
        keys = list(vectors)
        flat = np.concatenate([vectors[k] for k in keys]).astype(np.float32)
        dim = flat.size // len(keys)
        offsets = pa.array(np.arange(0, flat.size + 1, dim, dtype=np.int32))
        table = pa.table(
            {
                "text_key": pa.array(keys, pa.string()),
                "vector": pa.ListArray.from_arrays(offsets, pa.array(flat)),
            }
        ).replace_schema_metadata({"model": self.model, "dim": str(dim)})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write(self.path, sink.getvalue().to_pybytes())


def text_cache_path(settings: Settings) -> Path:
    """Where the text job keeps the vectors of the texts it has embedded."""
    return settings.home / "state" / "text_vectors.parquet"


# --- graph vectors ------------------------------------------------------------------------


def read_graph_vectors(settings: Settings) -> tuple[list[str], np.ndarray, datetime | None]:
    """``(item ids, vectors, run end)`` of the latest graph run; empty when there is none.

    Reads :func:`features.item_graph.graph_vectors_dir`, which each graph run replaces;
    Spark's ``_SUCCESS`` and hidden files are skipped.
    """
    from features.item_graph import graph_vectors_dir  # imports Spark: the batch's business

    folder = graph_vectors_dir(settings)
    if not folder.is_dir() or next(folder.glob("*.parquet"), None) is None:
        return [], np.empty((0, 0), np.float32), None
    table = ds.dataset(folder, format="parquet").to_table(
        columns=["item_id", "vector", TIMESTAMP_FIELD]
    )
    if table.num_rows == 0:
        return [], np.empty((0, 0), np.float32), None
    lengths = pc.list_value_length(table.column("vector"))
    dim = int(pc.max(lengths).as_py())
    if pc.min(lengths).as_py() != dim:
        raise ValueError("graph vectors of one run must share one dimension")
    stamp = pc.max(table.column(TIMESTAMP_FIELD)).as_py()
    return table.column("item_id").to_pylist(), _vector_matrix(table.column("vector"), dim), stamp


# --- the run ------------------------------------------------------------------------------


@dataclass
class TextRun:
    """What :func:`run_text` did.

    Examples
    --------
    >>> run = TextRun(datetime(2026, 3, 2, tzinfo=UTC), items=1200, embedded=40, cached=1160,
    ...               graph_items=900, projected=300, rows={"item_embeddings": 1210},
    ...               seconds={"embed": 0.4})
    >>> for line in run.lines():
    ...     print(line)
    as of 2026-03-02T00:00:00+00:00
    catalog items: 1,200; texts embedded: 40 (1,160 from the cache)
    graph vectors: 900 items; projected from text: 300
    item_embeddings: 1,210 rows
    embed: 0.4 s
    """

    end: datetime
    items: int = 0
    embedded: int = 0
    cached: int = 0
    graph_items: int = 0
    projected: int = 0
    report: ProjectionReport | None = None
    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        out = [
            f"as of {self.end.isoformat()}",
            f"catalog items: {self.items:,}; texts embedded: {self.embedded:,} "
            f"({self.cached:,} from the cache)",
            f"graph vectors: {self.graph_items:,} items; projected from text: "
            f"{self.projected:,}",
        ]
        if self.report is not None:
            out += [f"projection: {line}" for line in self.report.lines()]
        out += [f"{view}: {n:,} rows" for view, n in self.rows.items()]
        out += [f"{phase}: {s:.1f} s" for phase, s in self.seconds.items()]
        return out

    @contextmanager
    def phase(self, name: str, progress: Progress) -> Iterator[None]:
        progress(f"{name} ...")
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        progress(f"{name}: {self.seconds[name]:.1f} s")


def _silent(message: str) -> None:
    """Progress sink of a run nobody watches."""


def _text_vectors(
    texts: Sequence[str], settings: Settings, encoder: TextEncoder | None, run: TextRun,
    progress: Progress,
) -> np.ndarray:
    """Vectors of ``texts``: from the cache where it has them, else embedded now."""
    keys = [_text_key(t) for t in texts]
    cache = TextVectorCache(text_cache_path(settings), MODEL_NAME)
    found = cache.lookup(keys)
    # One embedding per distinct text, however many items share it.
    missing = {k: t for k, t, v in zip(keys, texts, found, strict=True) if v is None}
    fresh: dict[str, np.ndarray] = {}
    if missing:
        encoder = encoder or TextEncoder(settings)
        progress(f"embedding {len(missing):,} new or changed texts ...")
        started = time.perf_counter()
        vectors = encoder.encode(list(missing.values()))
        fresh = dict(zip(missing, vectors, strict=True))
        rate = len(missing) / max(time.perf_counter() - started, 1e-9)
        progress(f"embedded {len(missing):,} texts ({rate:,.0f}/s)")
    out = np.empty((len(texts), TEXT_DIM), dtype=np.float32)
    kept: dict[str, np.ndarray] = {}
    for i, (key, vector) in enumerate(zip(keys, found, strict=True)):
        out[i] = vector if vector is not None else fresh[key]
        kept[key] = out[i]
    run.embedded = len(missing)
    run.cached = len(texts) - sum(v is None for v in found)
    if missing or len(kept) != cache.size:
        cache.save(kept)
    return out


def _projection(
    ids: Sequence[str],
    text: np.ndarray,
    graph_ids: Sequence[str],
    graph: np.ndarray,
    graph_end: datetime | None,
    settings: Settings,
    run: TextRun,
    progress: Progress,
) -> TextToGraph | None:
    """Evaluate, fit and save the projection on the items with both vectors."""
    position = {item: i for i, item in enumerate(ids)}
    both = [(position[g], j) for j, g in enumerate(graph_ids) if g in position]
    if len(both) < MIN_FIT_ITEMS:
        progress(f"{len(both)} items have both vectors: no projection this run")
        return None
    rows, cols = (np.array(side) for side in zip(*both, strict=True))
    x, y = text[rows], graph[cols]
    if len(both) >= MIN_EVALUATION_ITEMS:
        run.report = evaluate_projection(x, y)
        for line in run.report.lines():
            progress(f"projection: {line}")
    metadata = {"text_model": MODEL_NAME, "run_end": run.end.isoformat()}
    if graph_end is not None:
        metadata["graph_run_end"] = graph_end.isoformat()
    projection = TextToGraph.fit(x, y, metadata=metadata)
    report = run.report.as_dict() if run.report is not None else None
    projection.save(projection_dir(settings), report=report)
    return projection


def run_text(
    settings: Settings,
    *,
    end: datetime | None = None,
    online: bool = True,
    progress: Progress | None = None,
    encoder: TextEncoder | None = None,
) -> TextRun:
    """Embed the catalog, fit and save the projection, write both views (module docstring).

    Parameters
    ----------
    settings
        The home: catalog archive, graph vectors, feature store (whose registry must exist:
        :func:`features.store.apply_repo`), models.
    end
        The run's instant (default: now): items created later are left out, and the
        ``item_embeddings`` rows are stamped with it.
    online
        Also write the rows into the online store.
    progress
        Called with a line of text as phases start and end.
    encoder
        A loaded encoder to reuse; by default one is loaded if any text needs embedding.
    """
    from features.store import OnlineFeatureWriter  # Feast takes seconds to import

    if end is not None and end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    report = progress or _silent
    end = (end or datetime.now(UTC)).astimezone(UTC)
    run = TextRun(end=end)
    with run.phase("catalog", report):
        table = load_catalog(settings)
        if table.num_rows:
            table = table.filter(pc.less_equal(table.column("created_at"), pa.scalar(end)))
        items = catalog_items(table)
        run.items = len(items)
        report(f"catalog: {run.items:,} items created up to {end.isoformat()}")
    with run.phase("text vectors", report):
        ids = [it.item_id for it in items]
        texts = [item_text(it.title, it.category, it.attributes) for it in items]
        text = _text_vectors(texts, settings, encoder, run, report)
    with run.phase("projection", report):
        graph_ids, graph, graph_end = read_graph_vectors(settings)
        run.graph_items = len(graph_ids)
        report(f"graph vectors: {run.graph_items:,} items")
        projection = _projection(ids, text, graph_ids, graph, graph_end, settings, run, report)
    with run.phase("rows", report):
        walk = dict(zip(graph_ids, graph, strict=True))
        projected = (
            projection.project(text) if projection is not None and len(ids) else None
        )
        embeddings = []
        for i, item_id in enumerate(ids):
            vector = walk.pop(item_id, None)
            if vector is None and projected is not None:
                vector = projected[i]
                run.projected += 1
            embeddings.append(embedding_row(item_id, end, vector, text[i]))
        # Items of the graph the catalog lacks are still neighbours of the others.
        embeddings += [embedding_row(g, end, v, None) for g, v in walk.items()]
        profiles = [profile_row(it) for it in items]
        run.rows = {EMBEDDINGS_VIEW: len(embeddings), PROFILE_VIEW: len(profiles)}
    with OnlineFeatureWriter(settings) as writer:
        with run.phase("write offline", report):
            writer.append_offline(EMBEDDINGS_VIEW, embeddings, part=f"batch-{end.date()}")
            writer.append_offline(PROFILE_VIEW, profiles, part="batch-catalog")
        if online:
            with run.phase("write online", report):
                writer.write(EMBEDDINGS_VIEW, embeddings)
                writer.write(PROFILE_VIEW, profiles)
    return run


def text_step(end: datetime | None = None, online: bool = True) -> Step:
    """The step of ``batch text`` (and the last one of ``batch all``): :func:`run_text`.

    The step needs no Spark: it reads the catalog and the graph vectors as Parquet files
    and runs the encoder in the driver; it takes the session only to fit in a job of steps.
    """

    def step(spark: SparkSession, settings: Settings, progress: Progress) -> Sequence[str]:
        from features.batch_cli import _ensure_registry

        _ensure_registry(settings, progress)
        return run_text(settings, end=end, online=online, progress=progress).lines()

    return step
