"""The item graph job: hand-computed graph, weighted walks, and embedding quality on simulator logs.

One local Spark session serves the module (the fixture of ``test_historical_features``), and
logs are written with the archiver's writer in its layout, as there. The quality checks run
the job on the first three quarters (in time) of a simulated shop whose users keep to a few
planted categories per session, then score it on the sessions of the last quarter.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import test_historical_features as historical_tests
from pyspark.sql import DataFrame, SparkSession
from test_historical_features import archive, ev
from typer.testing import CliRunner

from features.batch_cli import batch_app
from features.definitions import epoch_us
from features.historical import PreparedLog, prepare_events, read_events
from features.item_graph import (
    INTERACTION_WEIGHTS,
    NEIGHBORS_VIEW,
    GraphRun,
    co_occurrence_edges,
    graph_vectors_dir,
    interactions,
    random_walks,
    run_graph,
    session_items,
    top_neighbors,
)
from features.store import OnlineFeatureReader, apply_repo, feature_store
from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Event, EventType, Item
from streamrec.settings import Settings, get_settings

pytestmark = pytest.mark.slow

spark = historical_tests.spark  # its local Spark session fixture, one per module

T0 = datetime(2026, 2, 2, 9, tzinfo=UTC)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


# --- the graph of a log small enough to draw ------------------------------------------------


@pytest.fixture(scope="module")
def drawn_log(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> DataFrame:
    """Three users' sessions, archived and read back, prepared; the expected graph is worked
    out in the tests below."""
    settings = Settings(home=tmp_path_factory.mktemp("drawn"))
    events = [
        # u1, session s1: A (view, click: 2), B (view, cart: 3), C (1), D (1); E only shown.
        ev("view", "u1", "A", minutes(0), session_id="s1"),
        ev("click", "u1", "A", minutes(1), session_id="s1"),
        ev("view", "u1", "B", minutes(2), session_id="s1"),
        ev("impression", "u1", None, minutes(2.5), session_id="s1", items=["E", "A"]),
        ev("view", "u1", "C", minutes(3), session_id="s1"),
        ev("add_to_cart", "u1", "B", minutes(4), session_id="s1"),
        ev("view", "u1", "D", minutes(5), session_id="s1"),
        # u2 sends no session id: two sessions, split by the 2-hour gap.
        ev("view", "u2", "A", minutes(0)),
        ev("view", "u2", "B", minutes(5)),
        ev("view", "u2", "B", minutes(125)),
        ev("purchase", "u2", "C", minutes(126)),
        # u3: one item only, no pair.
        ev("view", "u3", "A", minutes(0), session_id="s9"),
        ev("click", "u3", "A", minutes(1), session_id="s9"),
    ]
    archive(settings, events, [])
    return prepare_events(read_events(spark, settings)).persist()


def test_interaction_weights_rise_along_the_funnel() -> None:
    funnel = [EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE]
    assert list(INTERACTION_WEIGHTS) == funnel
    assert [INTERACTION_WEIGHTS[t] for t in funnel] == sorted(INTERACTION_WEIGHTS.values())


def test_sessions_order_items_by_first_interaction_and_keep_the_strongest(
    drawn_log: DataFrame,
) -> None:
    sessions = session_items(drawn_log).collect()
    assert sorted((r["user_id"], r["items"], r["weights"]) for r in sessions) == [
        ("u1", ["A", "B", "C", "D"], [2.0, 3.0, 1.0, 1.0]),
        ("u2", ["A", "B"], [1.0, 1.0]),
        ("u2", ["B", "C"], [1.0, 4.0]),
    ]


def _edges(
    events: DataFrame, min_weight: float, min_degree: int = 1
) -> dict[tuple[str, str], float]:
    frame = co_occurrence_edges(session_items(events), 2, min_weight, min_degree)
    return {(r["src"], r["dst"]): r["weight"] for r in frame.collect()}


def _both_ways(edges: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    return {**edges, **{(b, a): w for (a, b), w in edges.items()}}


def test_edges_link_each_item_to_its_next_ones_symmetrically(drawn_log: DataFrame) -> None:
    # s1 with a window of 2: A-B (2+3)/2, A-C, B-C, B-D, C-D; A-D are 3 apart. u2: A-B and
    # B-C from its two sessions; A-C never shared a session of u2.
    assert _edges(drawn_log, min_weight=0.0) == _both_ways(
        {("A", "B"): 2.5 + 1.0, ("A", "C"): 1.5, ("B", "C"): 2.0 + 2.5, ("B", "D"): 2.0,
         ("C", "D"): 1.0}
    )


def test_light_edges_then_lonely_items_are_pruned(drawn_log: DataFrame) -> None:
    assert _edges(drawn_log, min_weight=1.5) == _both_ways(
        {("A", "B"): 3.5, ("A", "C"): 1.5, ("B", "C"): 4.5, ("B", "D"): 2.0}
    )
    # D has one neighbour left: it goes, with its edge.
    assert _edges(drawn_log, min_weight=1.5, min_degree=2) == _both_ways(
        {("A", "B"): 3.5, ("A", "C"): 1.5, ("B", "C"): 4.5}
    )


def test_top_neighbors_are_the_heaviest_edges_best_first(drawn_log: DataFrame) -> None:
    edges = co_occurrence_edges(session_items(drawn_log), pair_window=2, min_weight=1.5)
    got = {
        r["item_id"]: (r["neighbors"], r["neighbor_weights"])
        for r in top_neighbors(edges, 2).collect()
    }
    assert got == {
        "A": (["B", "C"], [3.5, 1.5]),
        "B": (["C", "A"], [4.5, 3.5]),  # D (2.0) is third
        "C": (["B", "A"], [4.5, 1.5]),
        "D": (["B"], [2.0]),
    }


@pytest.mark.parametrize("broadcast", [False, True], ids=["joined", "broadcast"])
def test_walks_follow_edges_in_proportion_to_their_weights(
    spark: SparkSession, broadcast: bool
) -> None:
    # A star: from "a", "b" weighs 3 and "c" 1; from the leaves the only way is back.
    edges = spark.createDataFrame(
        [("a", "b", 3.0), ("b", "a", 3.0), ("a", "c", 1.0), ("c", "a", 1.0)],
        "src string, dst string, weight double",
    )
    walks = [
        r["walk"] for r in random_walks(edges, 300, 5, seed=7, broadcast=broadcast).collect()
    ]
    assert len(walks) == 900
    assert Counter(w[0] for w in walks) == {"a": 300, "b": 300, "c": 300}
    assert all(len(w) == 5 for w in walks)
    assert all((x == "a") != (y == "a") for w in walks for x, y in itertools.pairwise(w))
    after_a = [y for w in walks for x, y in itertools.pairwise(w) if x == "a"]
    assert len(after_a) >= 1800
    assert after_a.count("b") / len(after_a) == pytest.approx(0.75, abs=0.04)


def test_a_log_without_item_pairs_writes_nothing(spark: SparkSession, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)  # no event log yet: a new home's first nightly run
    apply_repo(settings)
    run = run_graph(spark, settings, end=T0)
    assert (run.events, run.sessions, run.edges, run.items, run.vectors) == (0, 0, 0, 0, 0)
    assert not graph_vectors_dir(settings).exists()
    assert _neighbor_rows(settings) == []


# --- the job on a simulated shop --------------------------------------------------------


@dataclass
class Shop:
    settings: Settings
    events: list[Event]
    split: datetime
    run: GraphRun
    vectors: dict[str, np.ndarray]
    neighbors: dict[str, list[str]]

    @property
    def held_out(self) -> list[Event]:
        return [e for e in self.events if e.ts >= self.split]


@pytest.fixture(scope="module")
def shop(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Shop:
    """The job run on the first 3/4 of a simulated log, as of its split instant."""
    # A log this small gives few repeated pairs: every co-occurrence is kept.
    settings = Settings(home=tmp_path_factory.mktemp("shop"), graph_min_weight=1.0)
    sim = Simulator(
        SimulatorConfig(n_users=150, n_items=400, n_categories=16, seed=21, start=T0)
    )
    records = list(sim.events(5000))
    events = [r for r in records if isinstance(r, Event)]
    archive(settings, events, [*sim.catalog(), *(r for r in records if isinstance(r, Item))])
    apply_repo(settings)
    split = events[len(events) * 3 // 4].ts
    run = run_graph(spark, settings, end=split)
    vectors = {
        r["item_id"]: np.asarray(r["vector"], dtype=np.float32)
        for r in pq.read_table(graph_vectors_dir(settings)).to_pylist()
    }
    rows = _neighbor_rows(settings)
    return Shop(
        settings, events, split, run, vectors, {r["item_id"]: r["neighbors"] for r in rows}
    )


def test_a_shared_log_gives_the_graph_the_same_interactions(
    spark: SparkSession, shop: Shop
) -> None:
    end = shop.split
    start = end - timedelta(days=1, hours=5)  # a window starting mid-day, inside the log's
    columns = ["event_id", "event_type", "user_id", "item_id", "ts_us", "session"]

    def rows(frame: DataFrame) -> list[tuple]:
        return sorted(tuple(r) for r in frame.select(*columns).collect())

    own = rows(interactions(spark, shop.settings, start, end))
    log = PreparedLog(start.date() - timedelta(days=2), end)
    try:
        assert log.covers(start.date(), end)
        assert rows(interactions(spark, shop.settings, start, end, log)) == own
    finally:
        log.release()
    assert own and all(r[4] >= epoch_us(start) for r in own)
    assert {r[1] for r in own} <= {kind.value for kind in INTERACTION_WEIGHTS}


def _neighbor_rows(settings: Settings) -> list[dict]:
    folder = settings.home / "offline" / NEIGHBORS_VIEW
    return ds.dataset(folder, format="parquet", partitioning="hive").to_table().to_pylist()


def _session_items(events: Sequence[Event]) -> list[list[str]]:
    """Each session's distinct interacted items, in order of first interaction."""
    sessions: dict[str, dict[str, None]] = defaultdict(dict)
    for e in events:
        if e.event_type in INTERACTION_WEIGHTS and e.item_id is not None:
            sessions[e.session_id or ""].setdefault(e.item_id)
    return [list(items) for items in sessions.values()]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def co_clicked_and_random_cosines(shop: Shop) -> tuple[float, float, int]:
    """Mean cosine of item pairs clicked in one held-out session, and of random pairs."""
    clicked: dict[str, set[str]] = defaultdict(set)
    for e in shop.held_out:
        if e.event_type == EventType.CLICK and e.item_id in shop.vectors:
            clicked[e.session_id or ""].add(e.item_id)
    pairs = [(a, b) for items in clicked.values() for a in items for b in items if a < b]
    rng = random.Random(3)
    ids = sorted(shop.vectors)
    random_pairs = [tuple(rng.sample(ids, 2)) for _ in range(2000)]

    def mean(pairs: Sequence[tuple[str, ...]]) -> float:
        return float(np.mean([_cosine(shop.vectors[a], shop.vectors[b]) for a, b in pairs]))

    return mean(pairs), mean(random_pairs), len(pairs)


def recall_at_20(shop: Shop) -> dict[str, float | int]:
    """Recall@20 of the next item of held-out sessions given the previous one.

    Queries are consecutive items of the held-out sessions whose first item has a graph
    vector. Three rankings exclude the query item: nearest graph vectors (cosine), the
    item_neighbors list, and popularity (interactions before the split).
    """
    queries = [
        (prev, nxt)
        for items in _session_items(shop.held_out)
        for prev, nxt in itertools.pairwise(items)
        if prev in shop.vectors
    ]
    ids = sorted(shop.vectors)
    matrix = np.stack([shop.vectors[i] for i in ids])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    index = {item: n for n, item in enumerate(ids)}
    popular = [
        item
        for item, _ in Counter(
            e.item_id
            for e in shop.events
            if e.ts < shop.split and e.event_type in INTERACTION_WEIGHTS
        ).most_common(21)
    ]
    hits = Counter[str]()
    for prev, nxt in queries:
        scores = matrix @ matrix[index[prev]]
        scores[index[prev]] = -math.inf
        nearest = [ids[n] for n in np.argsort(-scores)[:20]]
        hits["graph"] += nxt in nearest
        hits["neighbors"] += nxt in shop.neighbors.get(prev, [])[:20]
        hits["popularity"] += nxt in [i for i in popular if i != prev][:20]
    return {
        "queries": len(queries),
        **{f"{name}_recall_at_20": hits[name] / len(queries) for name in
           ("graph", "neighbors", "popularity")},
    }


def test_co_clicked_items_are_nearer_than_random_pairs(shop: Shop) -> None:
    co_clicked, random_pairs, n = co_clicked_and_random_cosines(shop)
    assert n >= 50
    assert co_clicked > random_pairs + 0.15, (co_clicked, random_pairs)


def test_graph_retrieval_beats_popularity_on_a_later_window(shop: Shop) -> None:
    recall = recall_at_20(shop)
    assert recall["queries"] >= 200
    assert recall["graph_recall_at_20"] > 1.5 * recall["popularity_recall_at_20"], recall
    assert recall["neighbors_recall_at_20"] > 1.3 * recall["popularity_recall_at_20"], recall


def test_run_writes_vectors_and_neighbors_and_goes_online(shop: Shop) -> None:
    run, settings = shop.run, shop.settings
    assert run.end == shop.split
    assert 0 < run.vectors == len(shop.vectors) <= run.items
    assert run.items == len(shop.neighbors)
    assert run.walks == run.items * settings.graph_walks_per_node
    assert run.events == sum(
        e.ts < shop.split and e.event_type in INTERACTION_WEIGHTS for e in shop.events
    )
    assert set(run.seconds) == {"read", "graph", NEIGHBORS_VIEW, "walks", "word2vec",
                                "materialize"}

    table = pq.read_table(graph_vectors_dir(settings))
    assert table.column_names == ["item_id", "vector", "event_timestamp"]
    assert str(table.schema.field("vector").type.value_type) == "float"
    assert set(table.column("event_timestamp").to_pylist()) == {shop.split}
    graph_dim = {
        f.name: f.vector_length
        for f in feature_store(settings).get_feature_view("item_embeddings").features
    }["graph_vector"]
    assert {len(v) for v in shop.vectors.values()} == {settings.graph_vector_size} == {graph_dim}

    rows = _neighbor_rows(settings)
    assert {r["event_timestamp"] for r in rows} == {shop.split}
    assert {r["date"] for r in rows} == {str(shop.split.date())}
    assert all(1 <= len(r["neighbors"]) <= settings.graph_neighbors for r in rows)
    assert any(len(r["neighbors"]) == settings.graph_neighbors for r in rows)
    assert all(r["neighbor_weights"] == sorted(r["neighbor_weights"], reverse=True) for r in rows)

    items = [*sorted(shop.neighbors)[:5], "never-seen"]
    online = OnlineFeatureReader(settings).read(
        [f"{NEIGHBORS_VIEW}:neighbors", f"{NEIGHBORS_VIEW}:neighbor_weights"],
        {"item_id": items},
    )
    by_item = {r["item_id"]: r for r in rows}
    assert online["neighbors"] == [*(by_item[i]["neighbors"] for i in items[:5]), None]
    for item, weights in zip(items[:5], online["neighbor_weights"][:5], strict=True):
        assert list(weights) == pytest.approx(by_item[item]["neighbor_weights"])


# Feast's offline store sorts with Dask, which warns about a pandas deprecation.
@pytest.mark.filterwarnings("ignore:Downcasting object dtype arrays:FutureWarning")
def test_batch_all_replaces_the_day_and_feeds_the_text_job(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = (shop.split + timedelta(minutes=1)).replace(microsecond=0)  # as --end takes it
    if later.date() != shop.split.date():
        pytest.skip("the split is a minute before midnight")
    monkeypatch.setenv("STREAMREC_HOME", str(shop.settings.home))
    monkeypatch.setenv("STREAMREC_GRAPH_WALK_LENGTH", "5")
    monkeypatch.setenv("STREAMREC_GRAPH_MIN_WEIGHT", "1")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(batch_app, ["all", "--end", later.isoformat()])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    steps = [line.split("step ")[1] for line in result.stderr.splitlines() if "] step " in line]
    assert steps == ["historical ...", "graph ...", "text ..."]
    assert "walk step 5/5" in result.stderr
    assert f"as of {later.isoformat()}" in result.stdout

    # The graph's outputs of the day were replaced, not added to.
    rows = _neighbor_rows(shop.settings)
    assert {r["event_timestamp"] for r in rows} == {later}
    assert len(rows) >= shop.run.items
    vectors = pq.read_table(graph_vectors_dir(shop.settings)).to_pylist()
    assert {r["event_timestamp"] for r in vectors} == {later}

    # The text job took the walk vectors into item_embeddings, and neighbours are online.
    items = sorted(r["item_id"] for r in vectors)[:5]
    online = OnlineFeatureReader(shop.settings).read(
        [f"{NEIGHBORS_VIEW}:neighbors", "item_embeddings:graph_vector"], {"item_id": items}
    )
    assert all(online["neighbors"])
    walk = {r["item_id"]: r["vector"] for r in vectors}
    for item, vector in zip(items, online["graph_vector"], strict=True):
        assert list(vector) == pytest.approx(walk[item])
