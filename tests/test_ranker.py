"""The PyTorch ranker: learning, persistence, export and unknown ids, on generated data."""

from __future__ import annotations

import doctest
import importlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.simulator import Simulator, SimulatorConfig
from training.baselines import Popularity
from training.data import Interactions
from training.evaluation import Queries, evaluate, leave_one_out
from training.ranker import ItemVocab, Ranker, RankerConfig, encode_context, stable_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = RankerConfig(max_len=20, dim=16, heads=2, layers=1, dropout=0.1, negatives=64,
                     epochs=3, batch_size=32, hash_buckets=16, context_buckets=16)


@pytest.fixture(scope="module")
def shop() -> Interactions:
    """A simulated shop whose users have planted category tastes (with device, country)."""
    sim = Simulator(SimulatorConfig(n_users=200, n_items=240, n_categories=8, seed=5,
                                    new_item_rate=0))
    return Interactions.from_records(sim.events(12_000), first_only=True)


@pytest.fixture(scope="module")
def trained(shop: Interactions) -> tuple[Ranker, Queries]:
    split = leave_one_out(shop)
    ranker = Ranker(RankerConfig(max_len=30, dim=32, heads=2, layers=1, dropout=0.1,
                                 negatives=128, epochs=8, batch_size=16, lr=1e-2,
                                 hash_buckets=16, context_buckets=16))
    return ranker.fit(split.train), split.queries


def test_ranker_learns_planted_tastes_and_beats_popularity(
    shop: Interactions, trained: tuple[Ranker, Queries]
) -> None:
    ranker, queries = trained
    split = leave_one_out(shop)
    ours = evaluate(ranker, queries)
    popularity = evaluate(Popularity().fit(split.train), queries)
    assert ours["ndcg@10"] > 1.5 * popularity["ndcg@10"], (ours, popularity)
    assert ours["recall@50"] > popularity["recall@50"]
    assert ranker.context_inputs == ("hour", "device", "country")
    losses = [e.loss for e in ranker.history]
    assert losses[-1] < losses[0]


def test_early_stopping_keeps_the_best_epoch(shop: Interactions) -> None:
    split = leave_one_out(shop)
    validation = leave_one_out(split.train)
    config = replace(SMALL, epochs=6, patience=2)
    logs = []
    ranker = Ranker(config).fit(validation.train, validation=validation.queries,
                                on_epoch=logs.append)
    assert [e.epoch for e in logs] == [e.epoch for e in ranker.history]
    best = max(logs, key=lambda e: e.validation["ndcg@10"])
    assert best.best
    again = evaluate(ranker, validation.queries, metrics=("ndcg@10",))["ndcg@10"]
    assert again == pytest.approx(best.validation["ndcg@10"])


def test_save_load_round_trip_gives_identical_scores_without_pickle(
    trained: tuple[Ranker, Queries], tmp_path: Path
) -> None:
    ranker, queries = trained
    ranker.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "ranker.json", "ranker.safetensors"]
    loaded = Ranker.load(tmp_path / "model")
    assert loaded.context_inputs == ranker.context_inputs
    np.testing.assert_array_equal(loaded.score(queries), ranker.score(queries))


def test_exported_program_scores_like_the_eager_model(trained: tuple[Ranker, Queries],
                                                     tmp_path: Path) -> None:
    ranker, queries = trained
    ranker.save(tmp_path / "m")
    copy = Ranker.load(tmp_path / "m")
    eager = copy.score(queries.rows(0, 7))
    copy.use_exported()
    np.testing.assert_allclose(copy.score(queries.rows(0, 7)), eager, rtol=1e-4, atol=1e-4)
    one = copy.score(queries.rows(3, 4))  # other batch size and sequence length
    np.testing.assert_allclose(one, eager[3:4], rtol=1e-4, atol=1e-4)


def test_unknown_ids_are_hashed_not_rejected(trained: tuple[Ranker, Queries]) -> None:
    ranker, queries = trained
    known = ranker.vocab.ids[:3]
    scores = ranker.score_items(
        [*known, "brand-new-item"], ["never-seen", known[0], "another-new"],
        at=datetime(2025, 3, 1, 20, tzinfo=UTC),
        context={"device": "smartwatch", "country": "ZZ"},
    )
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert np.isfinite(ranker.score_items([], ["x"])).all()  # no history, no context
    # A catalog with items the ranker never saw (the shop's catalog grew).
    catalog = np.concatenate([queries.catalog, ["launched-1", "launched-2"]])
    grown = Queries(catalog, queries.user, queries.indptr, queries.history,
                    queries.history_ts, queries.target, queries.ts, queries.context)
    assert ranker.score(grown).shape == (len(queries), catalog.size)


def test_ranker_works_without_any_context() -> None:
    rng = np.random.default_rng(1)
    # Two item "worlds": users stay in theirs (0-9 or 10-19).
    rows = [(u, int(rng.integers(10) + 10 * (u % 2)), float(t)) for u in range(40)
            for t in range(12)]
    data = Interactions.from_arrays(
        [f"i{i}" for i in range(20)], [f"u{u}" for u in range(40)],
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    split = leave_one_out(data)
    config = replace(SMALL, context=(), epochs=15)
    ranker = Ranker(config).fit(split.train)
    assert ranker.context_inputs == ()
    scores = ranker.score(split.queries)
    own_world = (np.arange(20)[None, :] // 10) == (split.queries.user[:, None] % 2)
    assert scores[own_world].mean() > scores[~own_world].mean()


def test_missing_context_columns_are_dropped_at_fit() -> None:
    data = Interactions.from_arrays(["a", "b", "c"], ["u"], [0, 0, 0], [0, 1, 2], [1, 2, 3])
    ranker = Ranker(SMALL).fit(data)
    assert ranker.context_inputs == ("hour",)  # no device or country anywhere


def test_vocab_and_context_hashing_are_stable() -> None:
    vocab = ItemVocab(["a", "b"], buckets=8)
    rows = vocab.rows(["b", "zz", "a", "zz"])
    assert rows[0] == 2 and rows[2] == 1 and rows[1] == rows[3]
    assert 3 <= rows[1] < vocab.n_rows
    assert stable_hash(["mobile"], 1 << 30).tolist() == stable_hash(["mobile"], 1 << 30).tolist()
    ctx = encode_context(("hour", "device"), np.array([0.0, 3600.0 * 25]),
                         {"device": np.array(["", "mobile"])}, buckets=4)
    assert ctx[:, 0].tolist() == [1, 2]  # 00:xx and 01:xx UTC
    assert ctx[0, 1] == 0 and 1 <= ctx[1, 1] <= 4
    with pytest.raises(ValueError, match="unknown context"):
        RankerConfig(context=("weather",))


def test_hybrid_fits_its_blend_on_validation_and_round_trips(
    shop: Interactions, tmp_path: Path
) -> None:
    split = leave_one_out(shop)
    validation = leave_one_out(split.train)
    ranker = Ranker(replace(SMALL, covisitation_recent=3)).fit(
        validation.train, validation=validation.queries)
    assert ranker.prior is not None
    blend = ranker._require_model().blend
    assert blend.shape == (4,) and not torch.equal(blend, torch.ones(4))
    network = Ranker(replace(SMALL, covisitation_recent=3)).fit(validation.train)
    assert network.prior is None  # no validation queries: nothing to fit the blend on
    hybrid = evaluate(ranker, validation.queries, metrics=("ndcg@10",))["ndcg@10"]
    alone = max(e.validation["ndcg@10"] for e in ranker.history)
    assert hybrid > alone  # the co-visitation features add what the network misses
    ranker.save(tmp_path / "m")
    loaded = Ranker.load(tmp_path / "m")
    assert loaded.prior is not None
    np.testing.assert_array_equal(loaded.score(split.queries), ranker.score(split.queries))
    eager = loaded.score_items(ranker.vocab.ids[:4], ranker.vocab.ids[4:9])
    np.testing.assert_allclose(loaded.use_exported().score_items(
        ranker.vocab.ids[:4], ranker.vocab.ids[4:9]), eager, rtol=1e-4, atol=1e-4)
    # Before the test the prior is recounted on the data with the validation items.
    before = ranker.prior.matrix.sum()
    ranker.recount_covisitation(split.train)
    assert ranker.prior.matrix.nnz and ranker.prior.matrix.sum() != before
    assert not np.array_equal(ranker.score(split.queries), loaded.score(split.queries))
    assert network.recount_covisitation(split.train).prior is None


def test_full_softmax_when_negatives_cover_every_item(shop: Interactions) -> None:
    split = leave_one_out(shop)
    ranker = Ranker(replace(SMALL, negatives=10_000, epochs=4)).fit(split.train)
    losses = [e.loss for e in ranker.history]
    # The exact softmax over every row starts near log(rows) and goes down.
    assert losses[0] == pytest.approx(np.log(ranker.vocab.n_rows - 1), rel=0.1)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["training.ranker", "training.baselines"])
def test_docstring_examples_run(name: str) -> None:
    failures, tried = doctest.testmod(importlib.import_module(name),
                                      optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
