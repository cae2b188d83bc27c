"""The item co-occurrence graph, its random-walk embeddings and co-visitation neighbours (Spark).

One reading of the event log (the ``graph_days`` days before the run's end), three products:

Graph
    Items a user interacts with in one session are related. A *session* is a ``session_id``
    of a user; a user's events without one are split into sessions where consecutive events
    are more than :data:`~features.definitions.SESSION_GAP` apart.
    Interactions are the event types of :data:`INTERACTION_WEIGHTS` (impressions are what
    was shown, not what the user did, so they are not interactions). Within a session each
    item counts once, at its first interaction, with the weight of its strongest one; each
    item is linked to the next ``pair_window`` items of the session (not to all of them: a
    long session would add O(n²) weak pairs), with the mean weight of the two. Links are
    summed over sessions into undirected edges; edges lighter than ``min_weight`` are
    pruned, then items with fewer than ``min_degree`` neighbours.

Embeddings
    DeepWalk on the weighted graph: ``walks_per_node`` walks start at every item; each step
    moves to a neighbour drawn with probability proportional to the edge weight
    (first-order, node2vec with p = q = 1). Walks are generated in Spark, one join per step
    against an adjacency table holding each item's neighbours with their *cumulative*
    normalised weights: a uniform draw ``r`` picks the first neighbour whose cumulative weight
    exceeds ``r``. The walks stay in Spark, nothing goes through Python (Spark broadcasts
    the adjacency table to the executors when it is small). Spark MLlib's ``Word2Vec`` (skip-gram)
    then reads the walks as sentences and gives one vector per item. The vectors are an
    intermediate artifact, ``<home>/offline/item_graph_vectors`` (:func:`graph_vectors_dir`;
    columns ``item_id``, ``vector`` (list<float>), ``event_timestamp`` = the run's end): the
    text job fits its text→graph projection on them and writes the ``item_embeddings``
    Feast rows. Each run replaces the folder; a window without any item pair writes
    nothing, which leaves the previous run's outputs in place.

Neighbours
    The ``neighbors`` best items of each item by edge weight, best first (ties by item id),
    with their weights: the Feast view ``item_neighbors`` (``feature_repo/item_neighbors.py``)
    that serving reads for candidate generation. Rows are stamped with the run's end under a
    ``date=`` partition of the run's UTC day; a re-run of a day replaces that day's rows.
    An item that drops out of the graph keeps its last neighbours online (the view never
    expires): co-visitation of an item nobody visits any more is still its best evidence.

Examples
--------
>>> INTERACTION_WEIGHTS[EventType.PURCHASE]
4.0
>>> EventType.IMPRESSION in INTERACTION_WEIGHTS
False
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from pyspark.ml.feature import Word2Vec
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window as SparkWindow

from features.definitions import SESSION_GAP, TIMESTAMP_FIELD, epoch_us
from features.historical import (
    PARTITION_COLUMN,
    PreparedLog,
    materialize,
    prepare_events,
    read_events,
    write_stats,
)
from streamrec.contract import EventType
from streamrec.settings import Settings

__all__ = [
    "GRAPH_VECTORS",
    "INTERACTION_WEIGHTS",
    "NEIGHBORS_VIEW",
    "GraphConfig",
    "GraphRun",
    "co_occurrence_edges",
    "embed_walks",
    "graph_start",
    "graph_vectors_dir",
    "interactions",
    "random_walks",
    "run_graph",
    "session_items",
    "top_neighbors",
]

Progress = Callable[[str], None]

INTERACTION_WEIGHTS: Mapping[EventType, float] = MappingProxyType(
    {
        EventType.VIEW: 1.0,
        EventType.CLICK: 2.0,
        EventType.ADD_TO_CART: 3.0,
        EventType.PURCHASE: 4.0,
    }
)
"""How strongly each kind of interaction ties an item to its session: a view is the weakest
evidence of interest, each step down the funnel (engaged click, cart, purchase) stronger.
Event types not listed (impressions) are not interactions."""

GRAPH_VECTORS = "item_graph_vectors"
"""Folder, under ``<home>/offline``, of the graph vectors the text job reads."""

NEIGHBORS_VIEW = "item_neighbors"
"""The Feast view of the co-visitation neighbours (``feature_repo/item_neighbors.py``)."""

_GAP_US = SESSION_GAP // timedelta(microseconds=1)
_SESSION_INPUTS = ("event_id", "event_type", "user_id", "item_id", "ts_us", "session")
"""Columns of the prepared log that :func:`session_items` reads."""
_CHECKPOINT_STEPS = 5
"""Walk steps per checkpoint. Each checkpoint is a Spark job of its own (one after every
step doubled the walks' CPU time, measured); without any, the plan and the time to optimise
it would grow with the walk length."""


def graph_vectors_dir(settings: Settings) -> Path:
    """``<home>/offline/item_graph_vectors``: the latest run's vector per item.

    Examples
    --------
    >>> graph_vectors_dir(Settings(home="/srv/streamrec"))
    PosixPath('/srv/streamrec/offline/item_graph_vectors')
    """
    return settings.home / "offline" / GRAPH_VECTORS


@dataclass(frozen=True, slots=True)
class GraphConfig:
    """The knobs of the graph job (``STREAMREC_GRAPH_*``; see :class:`Settings` for each).

    Examples
    --------
    >>> config = GraphConfig.from_settings(Settings(graph_walk_length=8))
    >>> config.walk_length, config.vector_size
    (8, 64)
    """

    days: int
    pair_window: int
    min_weight: float
    min_degree: int
    walks_per_node: int
    walk_length: int
    vector_size: int
    window_size: int
    min_count: int
    neighbors: int
    seed: int
    broadcast_max_edges: int

    @classmethod
    def from_settings(cls, settings: Settings) -> GraphConfig:
        return cls(
            days=settings.graph_days,
            pair_window=settings.graph_pair_window,
            min_weight=settings.graph_min_weight,
            min_degree=settings.graph_min_degree,
            walks_per_node=settings.graph_walks_per_node,
            walk_length=settings.graph_walk_length,
            vector_size=settings.graph_vector_size,
            window_size=settings.graph_window_size,
            min_count=settings.graph_min_count,
            neighbors=settings.graph_neighbors,
            seed=settings.graph_seed,
            broadcast_max_edges=settings.graph_broadcast_max_edges,
        )


# --- the graph ----------------------------------------------------------------------------


def _interaction_weight(weights: Mapping[EventType, float]) -> Column:
    """The weight of a row's event type; null for event types that are not interactions."""
    weight = F.when(F.lit(False), F.lit(0.0))
    for kind, value in weights.items():
        weight = weight.when(F.col("event_type") == kind.value, F.lit(float(value)))
    return weight


def session_items(
    events: DataFrame, weights: Mapping[EventType, float] = INTERACTION_WEIGHTS
) -> DataFrame:
    """Each session's items in order of first interaction, with their strongest weight.

    ``events`` come from :func:`features.historical.prepare_events`. Returns one row per
    session with at least two items: ``user_id``, ``items`` (array<string>) and ``weights``
    (array<double>, aligned with ``items``).
    """
    acted = events.where(F.col("item_id").isNotNull()).withColumn(
        "w", _interaction_weight(weights)
    )
    acted = acted.where(F.col("w").isNotNull())
    # Sessions by id need no ordering; only the id-less events are split by time gaps.
    named = acted.where(F.col("session") != "").withColumn("run", F.lit(0).cast("long"))
    in_order = SparkWindow.partitionBy("user_id").orderBy("ts_us", "event_id")
    previous = F.lag("ts_us").over(in_order)
    anonymous = (
        acted.where(F.col("session") == "")
        .withColumn(
            "start",
            F.when(previous.isNull() | (F.col("ts_us") - previous > _GAP_US), F.col("ts_us")),
        )
        .withColumn(
            "run", F.max("start").over(in_order.rowsBetween(SparkWindow.unboundedPreceding, 0))
        )
        .drop("start")
    )
    session = ["user_id", "session", "run"]
    per_item = (
        named.unionByName(anonymous)
        .groupBy(*session, "item_id")
        .agg(
            F.min(F.struct("ts_us", "event_id")).alias("first"),
            F.max("w").alias("w"),
        )
    )
    ordered = (
        per_item.groupBy(*session)
        .agg(F.sort_array(F.collect_list(F.struct("first", "item_id", "w"))).alias("s"))
        .where(F.size("s") >= 2)
    )
    return ordered.select(
        "user_id", F.col("s.item_id").alias("items"), F.col("s.w").alias("weights")
    )


def co_occurrence_edges(
    sessions: DataFrame, pair_window: int, min_weight: float, min_degree: int = 1
) -> DataFrame:
    """The pruned, symmetric co-occurrence graph of :func:`session_items`' sessions.

    Returns directed rows ``src``, ``dst``, ``weight`` (double), both directions of every
    undirected edge with the same weight (module docstring).
    """
    n = F.size("items")
    items, weights = F.col("items"), F.col("weights")

    def links_from(i: Column) -> Column:
        following = F.sequence(i + 1, F.least(i + pair_window, n - 1))
        return F.transform(
            following,
            lambda j: F.struct(
                F.least(items[i], items[j]).alias("u"),
                F.greatest(items[i], items[j]).alias("v"),
                ((weights[i] + weights[j]) / 2).alias("weight"),
            ),
        )

    links = sessions.select(
        F.explode(F.flatten(F.transform(F.sequence(F.lit(0), n - 2), links_from))).alias("l")
    )
    # Summing each unordered pair once, then mirroring, shuffles half the rows.
    undirected = (
        links.groupBy("l.u", "l.v")
        .agg(F.sum("l.weight").alias("weight"))
        .where(F.col("weight") >= min_weight)
    )
    edges = undirected.select(
        F.col("u").alias("src"), F.col("v").alias("dst"), "weight"
    ).unionByName(undirected.select(F.col("v").alias("src"), F.col("u").alias("dst"), "weight"))
    if min_degree > 1:
        kept = edges.groupBy("src").count().where(F.col("count") >= min_degree).select("src")
        edges = edges.join(kept, "src", "left_semi").join(
            kept.withColumnRenamed("src", "dst"), "dst", "left_semi"
        )
    return edges


def _ranked(edges: DataFrame) -> DataFrame:
    """Edges with each source's ``rank`` (1 = heaviest, ties by ``dst``) and ``cum``, the
    running share of the source's total weight in that order."""
    order = SparkWindow.partitionBy("src").orderBy(F.desc("weight"), "dst")
    running = F.sum("weight").over(order.rowsBetween(SparkWindow.unboundedPreceding, 0))
    return edges.select(
        "src",
        "dst",
        "weight",
        F.row_number().over(order).alias("rank"),
        (running / F.sum("weight").over(SparkWindow.partitionBy("src"))).alias("cum"),
    )


def top_neighbors(edges: DataFrame, n: int) -> DataFrame:
    """``item_id``, ``neighbors`` (best first, at most ``n``) and ``neighbor_weights``
    (array<float>) of every item of the graph."""
    best = _ranked(edges).where(F.col("rank") <= n)
    lists = best.groupBy("src").agg(
        F.sort_array(F.collect_list(F.struct("rank", "dst", "weight"))).alias("t")
    )
    return lists.select(
        F.col("src").alias("item_id"),
        F.col("t.dst").alias("neighbors"),
        F.col("t.weight").cast("array<float>").alias("neighbor_weights"),
    )


def _adjacency(edges: DataFrame) -> DataFrame:
    """``node``, its neighbours ``next_items`` and their cumulative probabilities ``cum``
    (ascending, the last 1)."""
    lists = (
        _ranked(edges)
        .groupBy("src")
        .agg(F.sort_array(F.collect_list(F.struct("rank", "dst", "cum"))).alias("a"))
    )
    return lists.select(
        F.col("src").alias("node"),
        F.col("a.dst").alias("next_items"),
        F.col("a.cum").alias("cum"),
    )


def random_walks(
    edges: DataFrame,
    walks_per_node: int,
    walk_length: int,
    *,
    seed: int = 0,
    broadcast: bool = False,
    progress: Progress | None = None,
) -> DataFrame:
    """Weighted random walks on ``edges``: one row per walk, ``walk`` (array<string>).

    ``walks_per_node`` walks of ``walk_length`` items start at every node. Each step is a
    join of the walks' last items with the adjacency table, then a draw. The walks are
    checkpointed every :data:`_CHECKPOINT_STEPS` steps, so the plan stays short however
    long the walks. Every node of a symmetric graph has a neighbour, so every walk reaches
    its full length.

    ``broadcast`` ships the adjacency table to every executor, so a step is a map over the
    walks where it is otherwise a shuffle of all of them: half the walks' time on a 1M-event
    log (measured, ``bench/batch_jobs.py``). Only for a graph that fits in memory on each
    executor (see ``Settings.graph_broadcast_max_edges``).
    """
    spark = edges.sparkSession
    adjacency = _adjacency(edges).persist()
    lookup = F.broadcast(adjacency) if broadcast else adjacency
    walks = (
        adjacency.select("node")
        .crossJoin(spark.range(walks_per_node).withColumnRenamed("id", "k"))
        .select(F.array("node").alias("walk"))
        .repartition(spark.sparkContext.defaultParallelism)
    )
    for step in range(1, walk_length):
        drawn = walks.join(
            lookup, F.element_at("walk", -1) == F.col("node")
        ).withColumn("r", F.rand(seed * 1_000_003 + step))
        # cum ascends to 1 and r < 1: the count of cum values below r is the drawn index;
        # least() guards against a last cum rounded a hair under 1.
        index = F.least(
            F.size(F.filter("cum", lambda c: c < F.col("r"))), F.size("next_items") - 1
        )
        walks = drawn.select(F.concat("walk", F.array(F.col("next_items")[index])).alias("walk"))
        if (step + 1) % _CHECKPOINT_STEPS == 0 or step + 1 == walk_length:
            walks = walks.localCheckpoint(eager=True)
            if progress is not None:
                progress(f"  walk step {step + 1}/{walk_length}")
    adjacency.unpersist()
    return walks


def embed_walks(
    walks: DataFrame,
    vector_size: int,
    window_size: int,
    min_count: int,
    *,
    seed: int = 0,
) -> DataFrame:
    """Word2Vec (skip-gram) over the walks: ``item_id``, ``vector`` (array<float>).

    Items appearing fewer than ``min_count`` times in all walks get no vector.
    """
    model = Word2Vec(
        vectorSize=vector_size,
        windowSize=window_size,
        minCount=min_count,
        # One model per core, merged after each pass: the cores share the work at a small
        # cost in accuracy (measured: the retrieval checks of tests/test_item_graph.py hold).
        numPartitions=walks.sparkSession.sparkContext.defaultParallelism,
        maxSentenceLength=max(1000, window_size),
        seed=seed,
        inputCol="walk",
        outputCol="embedding",
    ).fit(walks)
    return model.getVectors().select(
        F.col("word").alias("item_id"), vector_to_array("vector", "float32").alias("vector")
    )


# --- the job ------------------------------------------------------------------------------


@dataclass
class GraphRun:
    """What :func:`run_graph` did: sizes of the graph and its products, seconds per phase.

    ``events`` counts the distinct interactions (:data:`INTERACTION_WEIGHTS`) of the window.

    Examples
    --------
    >>> run = GraphRun(datetime(2026, 3, 2, tzinfo=UTC), events=5000, sessions=400,
    ...                items=300, edges=2100, walks=3000, vectors=300, seconds={"read": 1.5})
    >>> for line in run.lines():
    ...     print(line)
    as of 2026-03-02T00:00:00+00:00
    interactions read: 5,000; sessions with 2+ items: 400
    graph: 300 items, 2,100 edges
    walks: 3,000; graph vectors: 300
    item_neighbors: 300 rows
    read: 1.5 s
    """

    end: datetime
    events: int = 0
    sessions: int = 0
    items: int = 0
    edges: int = 0
    walks: int = 0
    vectors: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        return [
            f"as of {self.end.isoformat()}",
            f"interactions read: {self.events:,}; sessions with 2+ items: {self.sessions:,}",
            f"graph: {self.items:,} items, {self.edges:,} edges",
            f"walks: {self.walks:,}; graph vectors: {self.vectors:,}",
            f"{NEIGHBORS_VIEW}: {self.items:,} rows",
            *(f"{phase}: {s:.1f} s" for phase, s in self.seconds.items()),
        ]

    @contextmanager
    def phase(self, name: str, progress: Progress) -> Iterator[None]:
        """Time a phase into :attr:`seconds`, announcing its start and end."""
        progress(f"{name} ...")
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        progress(f"{name}: {self.seconds[name]:.1f} s")


def _silent(message: str) -> None:
    """Progress sink of a run nobody watches."""


def interactions(
    spark: SparkSession,
    settings: Settings,
    start: datetime,
    end: datetime,
    log: PreparedLog | None = None,
) -> DataFrame:
    """The prepared interactions (:data:`INTERACTION_WEIGHTS`) in ``[start, end)``, with
    the columns :func:`session_items` reads; from ``log`` when it covers the window."""
    kinds = F.col("event_type").isin([kind.value for kind in INTERACTION_WEIGHTS])
    if log is not None and log.covers(start.date(), end):
        prepared = log.events(spark, settings, start.date())
        found = prepared.where(kinds & (F.col("ts_us") >= epoch_us(start)))
    else:
        raw = read_events(spark, settings, since=start.date(), until=end)
        # Copies of an event share its type and time: filtering before the deduplication
        # keeps the same records and spares its shuffle the impressions.
        found = prepare_events(
            raw.where(kinds & (F.col("ts") >= F.lit(start)) & (F.col("ts") < F.lit(end)))
        )
    return found.select(*_SESSION_INPUTS)


def graph_start(end: datetime, days: int) -> datetime:
    """The first instant of the log a graph run of ``days`` days up to ``end`` reads."""
    return end.astimezone(UTC) - timedelta(days=days)


def run_graph(
    spark: SparkSession,
    settings: Settings,
    *,
    end: datetime | None = None,
    online: bool = True,
    progress: Progress | None = None,
    log: PreparedLog | None = None,
) -> GraphRun:
    """Build the item graph from the log, write the graph vectors and ``item_neighbors``.

    Parameters
    ----------
    spark
        The session (:func:`features.spark_session.spark_session`).
    settings
        The home (event log, feature store, whose registry must exist:
        :func:`features.store.apply_repo`) and the ``graph_*`` knobs (:class:`GraphConfig`).
    end
        Events before this instant count, those of the ``graph_days`` days before it
        (default: now); every row written is stamped with it.
    online
        Also materialize ``item_neighbors`` into the online store.
    progress
        Called with a line of text as phases start and end.
    log
        A log shared with other jobs of the run; used when it covers this job's window
        (:func:`graph_start` to ``end``), else the job reads its own.
    """
    from features.store import OnlineFeatureWriter  # Feast takes seconds to import

    if end is not None and end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    report = progress or _silent
    config = GraphConfig.from_settings(settings)
    end = (end or datetime.now(UTC)).astimezone(UTC)
    run = GraphRun(end=end)
    with OnlineFeatureWriter(settings) as store:
        neighbors_folder = store.offline_folder(NEIGHBORS_VIEW)
    stamp = F.lit(end).alias(TIMESTAMP_FIELD)

    with run.phase("read", report):
        start = graph_start(end, config.days)
        events = interactions(spark, settings, start, end, log).persist()
        run.events = events.count()
        sessions = session_items(events).persist()
        run.sessions = sessions.count()
        events.unpersist()
    with run.phase("graph", report):
        edges = co_occurrence_edges(
            sessions, config.pair_window, config.min_weight, config.min_degree
        ).persist()
        run.edges = edges.count() // 2
        sessions.unpersist()
    if run.edges == 0:
        report("no item pairs in the window: nothing to write")
        edges.unpersist()
        return run
    with run.phase(NEIGHBORS_VIEW, report):
        neighbors = top_neighbors(edges, config.neighbors).select(
            "item_id",
            stamp,
            "neighbors",
            "neighbor_weights",
            F.lit(end.date()).alias(PARTITION_COLUMN),
        )
        neighbors = neighbors.persist()
        run.items = neighbors.count()  # every item of the graph has a neighbour
        write_stats(neighbors, neighbors_folder)
        neighbors.unpersist()
    with run.phase("walks", report):
        walks = random_walks(
            edges,
            config.walks_per_node,
            config.walk_length,
            seed=config.seed,
            broadcast=run.edges <= config.broadcast_max_edges,
            progress=report,
        )
        run.walks = run.items * config.walks_per_node
        edges.unpersist()
    with run.phase("word2vec", report):
        vectors = embed_walks(
            walks, config.vector_size, config.window_size, config.min_count, seed=config.seed
        )
        vectors = vectors.select("item_id", "vector", stamp).persist()
        run.vectors = vectors.count()
        vectors.coalesce(1).write.mode("overwrite").parquet(str(graph_vectors_dir(settings)))
        vectors.unpersist()
    if online:
        with run.phase("materialize", report):
            materialize(settings, end, start=end, views=[NEIGHBORS_VIEW])
    return run
