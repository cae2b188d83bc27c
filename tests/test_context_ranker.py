"""The context ranker on simulated traffic, its files and export, and the promotion gate."""

from __future__ import annotations

import doctest
import importlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from features.store import apply_repo
from streamrec.settings import Settings, get_settings
from training.context_ranker import GRAPH_DIM, TEXT_DIM, ContextRanker, ContextRankerConfig
from training.dataset import training_set
from training.holdout import (
    Holdout,
    evaluate_holdout,
    interactions_from_log,
    temporal_split,
)
from training.labels import label_event_log, read_event_log
from training.online_model import OnlineModel
from training.ranking_batch import RankingBatch
from training.registry import ModelRegistry
from training.simulated import SimulatedHome, SimulatorConfig, simulate_home
from training.train_loop import KIND, bootstrap_online, gate, train_command, train_once

SMALL = ContextRankerConfig(dim=16, hidden=(32,), attention_hidden=16, epochs=4, patience=2,
                            batch_size=512, lr=3e-3, hash_buckets=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class World:
    settings: Settings
    home: SimulatedHome
    holdout: Holdout
    ranker: ContextRanker


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A simulated shop through the real pipeline pieces, labelled, joined and learnt."""
    settings = Settings(home=tmp_path_factory.mktemp("shop"), torch_threads=1)
    apply_repo(settings)
    home = simulate_home(
        settings,
        SimulatorConfig(n_users=300, n_items=300, n_categories=8, seed=5, new_item_rate=2),
        n_events=12_000,
    )
    examples = label_event_log(settings, home.start, home.end)
    data = training_set(settings, examples)
    train, test, cut = temporal_split(data, 0.25)
    interactions = interactions_from_log(
        read_event_log(settings, home.start, home.end), data.examples["item_id"].unique()
    )
    ranker = ContextRanker(SMALL).fit(train.batch, train.labels)
    return World(settings, home, Holdout(train, test, interactions, cut), ranker)


def test_ranker_learns_planted_tastes_clearly_above_popularity(world: World) -> None:
    result = evaluate_holdout(world.holdout, {"ranker": world.ranker})
    ours, popular = result["ranker"], result["popularity"]
    assert result["ranker"]["requests"] >= 100
    assert ours["auc"] > popular["auc"] + 0.08, result
    assert ours["ndcg@10"] > popular["ndcg@10"] + 0.04, result
    assert ours["auc"] > result["covisitation"]["auc"], result
    # The planted truth: a user's favourite categories score above the ones they ignore.
    test = world.holdout.test
    scores = world.ranker.score(test.batch)
    sim = world.home.simulator
    liked, ignored = [], []
    for user, item, score in zip(test.batch.user_ids, test.batch.item_ids, scores,
                                 strict=True):
        taste = sim.user_preferences(user)[sim.item_category(item)]
        (liked if taste > 0.3 else ignored if taste < 0.02 else []).append(score)
    assert np.mean(liked) > 2 * np.mean(ignored), (np.mean(liked), np.mean(ignored))


def test_files_reload_identically_and_the_optimized_graph_matches(
    world: World, tmp_path: Path
) -> None:
    world.ranker.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "context_ranker.json", "context_ranker.safetensors"
    ]
    eager = ContextRanker.load(tmp_path, optimize=False)
    optimized = ContextRanker.load(tmp_path)
    assert eager.param_count == optimized.param_count == world.ranker.param_count > 0
    test = world.holdout.test.batch
    for rows in (np.arange(1), np.arange(3), np.arange(200), np.arange(len(test))):
        batch = test.take(rows)
        expected = world.ranker.score(batch)
        assert np.array_equal(eager.score(batch), expected)
        np.testing.assert_allclose(optimized.score(batch), expected, rtol=1e-5, atol=1e-6)


def test_unseen_ids_missing_features_and_vectors(world: World) -> None:
    ranker = world.ranker
    cold = RankingBatch.for_request("new-user", ["new-item", "i000001"], {}, ts_s=0.0)
    assert np.isfinite(ranker.score(cold)).all()
    odd = RankingBatch.for_request(
        "u000001", ["new-item", "i000001", "i000002"],
        {
            "user_realtime__recent_items": [["gone", "i000001"]] * 3,
            "item_embeddings__graph_vector": [np.ones(GRAPH_DIM, np.float32), None,
                                              np.ones(3, np.float32)],
            "item_embeddings__text_vector": [None, np.ones(TEXT_DIM, np.float32), [np.nan] * 384],
            "item_profile__category": ["Never/Seen", None, "Shoes/Running"],
        },
        ts_s=1.7e9, device="tablet", country="zz",
    )
    assert np.isfinite(ranker.score(odd)).all()


def test_item_table_keeps_the_newest_graph_vector_of_known_items() -> None:
    def batch(ts: float, value: float) -> RankingBatch:
        return RankingBatch.for_request(
            "u", ["a", "b"],
            {"item_embeddings__graph_vector": [np.full(GRAPH_DIM, value, np.float32), None],
             "item_profile__category": ["Shoes", "Books"]},
            ts_s=ts,
        )

    later, earlier = batch(10.0, 2.0), batch(5.0, 1.0)
    rows = RankingBatch(
        *(np.concatenate([getattr(later, f), getattr(earlier, f)])
          for f in ("user_ids", "item_ids", "ts_s", "device", "country")),
        features={k: list(later.column(k)) + list(earlier.column(k)) for k in later.features},
    )
    ranker = ContextRanker(replace(SMALL, epochs=1)).fit(
        rows, np.array([1.0, 0.0, 1.0, 0.0]), valid=(rows, np.array([1.0, 0.0, 1.0, 0.0]))
    )
    net = ranker.net
    assert net is not None
    a, b = ranker.vocab.rows(["a", "b"]).tolist()
    assert net.table_has_graph[a] == 1 and torch.all(net.table_graph[a] == 2.0)
    assert net.table_has_graph[b] == 0 and net.table_category[b] > 0


# --- the promotion gate ----------------------------------------------------------------------


def test_gate_refuses_a_worse_model_and_accepts_a_better_one(
    world: World, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    train = world.holdout.train
    # Taught the opposite of what users did: it ranks what they click last.
    worse = ContextRanker(replace(SMALL, epochs=2)).fit(train.batch, 1.0 - train.labels)

    def run(model: ContextRanker) -> bool:
        return gate(registry, world.holdout, model, metric="ndcg@10", tolerance=0.002,
                    data_window={"start": "s", "end": "e"}, features=["f"]).promoted

    assert run(worse) is False  # no champion, and it does not even beat popularity
    assert registry.champion(KIND) is None
    weak = registry.versions(KIND)[-1]
    registry.promote(KIND, weak.version)
    assert run(world.ranker) is True  # better than the champion: promoted
    best = registry.champion(KIND)
    assert best is not None and best.version != weak.version
    assert best.metrics["ndcg@10"] > weak.metrics["ndcg@10"] + 0.002
    assert run(worse) is False  # worse than the champion: registered, not promoted
    assert run(world.ranker) is False  # no better than itself by the tolerance
    assert registry.champion(KIND) == best
    assert len(registry.versions(KIND)) == 4


def test_gate_records_a_drift_trigger_in_the_manifest(world: World, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    request = {"requested_at": "2026-11-24T10:00:00+00:00", "reason": "drift", "drifts": 2}
    report = gate(registry, world.holdout, world.ranker, metric="ndcg@10", tolerance=0.0,
                  data_window={"start": "s", "end": "e"}, features=["f"], request=request)
    assert report.trigger == "drift" and report.retrain_request == request
    window = registry.get(KIND, report.version).manifest["data_window"]
    assert window["trigger"] == "drift" and window["retrain_request"] == request
    plain = gate(registry, world.holdout, world.ranker, metric="ndcg@10", tolerance=0.0,
                 data_window={"start": "s", "end": "e"}, features=["f"])
    assert plain.trigger == "schedule"
    assert registry.get(KIND, plain.version).manifest["data_window"]["trigger"] == "schedule"


def test_a_run_without_an_online_model_bootstraps_one_and_never_replaces_it(
    world: World, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    settings = world.settings.model_copy(
        update={"home": tmp_path, "train_online_bootstrap_rows": 400})
    train = world.holdout.train
    version = bootstrap_online(settings, registry, train)
    assert version is not None and registry.champion("online").version == version
    manifest = registry.get("online", version).manifest
    assert manifest["data_window"]["bootstrap"] is True
    assert manifest["data_window"]["examples"] == min(400, len(train))
    # The newest rows, in time order: the window ends with the training set's last moment.
    assert manifest["data_window"]["end_s"] == pytest.approx(float(train.batch.ts_s.max()))
    model = OnlineModel.load(registry.open("online", version))
    scores = model.score(world.holdout.test.batch)
    assert np.isfinite(scores).all() and scores.std() > 0
    assert bootstrap_online(settings, registry, train) is None  # the learner's from now on
    off = settings.model_copy(update={"train_online_bootstrap_rows": 0})
    assert bootstrap_online(off, ModelRegistry(tmp_path / "other"), train) is None


@pytest.mark.slow
def test_train_once_promotes_then_keeps_the_champion(world: World) -> None:
    settings = world.settings
    first = train_once(settings, window_days=30, config=SMALL)
    assert first.promoted and first.champion == first.version
    assert set(first.metrics) == {"candidate", "popularity", "covisitation"}
    second = train_once(settings, window_days=30, tolerance=1.0, config=SMALL)
    assert not second.promoted and second.champion == first.version
    assert set(second.metrics) == {"candidate", "champion", "popularity", "covisitation"}
    stored = ModelRegistry.from_settings(settings).get(KIND, second.version)
    assert stored.manifest["data_window"]["examples"] == second.train_rows + second.holdout_rows
    assert "user_realtime__recent_items" in stored.manifest["features"]


def test_cli_reports_a_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    app = typer.Typer()
    app.command()(train_command)
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, [])
        bad = CliRunner().invoke(app, ["--every", "soon"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "event log" in result.stderr
    assert bad.exit_code == 2 and "not a period" in bad.output


@pytest.mark.parametrize("name", ["training.context_ranker", "training.simulated"])
def test_docstring_examples_run(name: str) -> None:
    failures, tried = doctest.testmod(importlib.import_module(name),
                                      optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
