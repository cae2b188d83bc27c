"""One request's fast paths give the numbers of the general, many-user paths.

A request's rows share the user, the moment and the context: :class:`RankingBatch` computes
the user's numeric features once, the ranker its user, context and history parts once
(``_SharedScorer``), the online model its shared weights once. Each is checked against the
same rows scored inside a batch of several users, which takes the general path.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.context_ranker import GRAPH_DIM, TEXT_DIM, ContextRanker, ContextRankerConfig
from training.online_model import OnlineModel
from training.ranking_batch import RankingBatch, numeric_matrix

CONFIG = ContextRankerConfig(dim=8, hidden=(16, 8), attention_hidden=8, epochs=2,
                             batch_size=64, history=6)
ITEMS = [f"i{j}" for j in range(30)]
CATEGORIES = ["Shoes", "Books", "Games", None]
RNG = np.random.default_rng(3)
GRAPHS = {i: RNG.normal(size=GRAPH_DIM).astype(np.float32) for i in ITEMS[::2]}
TEXTS = {i: RNG.normal(size=TEXT_DIM).astype(np.float32) for i in ITEMS[::3]}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _request(user: int, items: list[str], *, recent: list[str] | None, ts_s: float = 90_000.0,
             device: str | None = "mobile", country: str | None = "de") -> RankingBatch:
    """A request's batch as serving builds it: user features repeated, item features per
    row, some missing, the catalog's vector objects."""
    n = len(items)
    j = np.array([ITEMS.index(i) for i in items])
    features = {
        "user_realtime__recent_items": [recent] * n,
        "user_realtime__views_5m": [user % 3] * n,
        "user_realtime__views_1h": [user + 2] * n,
        "user_realtime__clicks_24h": [user] * n,
        "user_realtime__last_event_ts": [ts_s - 100.0 * user] * n,
        "user_realtime__last_category": [CATEGORIES[user % 4]] * n,
        "user_realtime__session_events": [None if user % 2 else 4] * n,
        "user_stats__views_7d": [10 * user] * n,
        "user_stats__avg_price_30d": [12.5 + user] * n,
        "user_stats__category_affinity": [json.dumps({"Shoes": 0.5, "Games": 0.2})] * n,
        "item_realtime__views_1h": [int(k % 5) for k in j],
        "item_realtime__ctr_24h": [None if k % 4 == 0 else 0.01 * k for k in j],
        "item_realtime__last_event_ts": [ts_s - 1000.0 * k for k in j],
        "item_stats__popularity_7d": [float(k * k) for k in j],
        "item_profile__category": [CATEGORIES[k % 4] for k in j],
        "item_profile__price": [5.0 + k for k in j],
        "item_profile__created_at_s": [1000.0 * k for k in j],
        "item_embeddings__graph_vector": [GRAPHS.get(i) for i in items],
        "item_embeddings__text_vector": [TEXTS.get(i) for i in items],
    }
    return RankingBatch.for_request(f"u{user}", items, features, ts_s=ts_s, device=device,
                                    country=country)


def _concat(*batches: RankingBatch) -> RankingBatch:
    """The rows of several requests as one batch (not one request: the general path)."""
    return RankingBatch.concat(batches)


def _requests() -> list[RankingBatch]:
    return [
        _request(1, ITEMS[:25], recent=["i3", "i4", "unknown", "i3"]),
        _request(2, ITEMS[5:], recent=["i7", *ITEMS[10:20]], device=None, country=None),
        _request(3, ITEMS[::2], recent=None, ts_s=5_000.0),
        _request(4, ITEMS[1::2], recent=[], device="desktop"),
    ]


@pytest.fixture(scope="module", params=["gelu", "relu"])
def rankers(tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> list[ContextRanker]:
    """The fitted ranker (eager) and the same one loaded (TorchScript), as served, for
    each activation."""
    train = _concat(*[_request(u, list(RNG.choice(ITEMS, 12, replace=False)),
                               recent=list(RNG.choice(ITEMS, 4, replace=False)))
                      for u in range(30)])
    labels = (RNG.random(len(train)) < 0.4).astype(float)
    fitted = ContextRanker(replace(CONFIG, activation=request.param)).fit(train, labels)
    net = fitted.net
    assert net is not None
    # Two epochs leave some weights near their small initial values, where a wrong path
    # would change scores by less than the tolerance: give every weight a say.
    torch.manual_seed(0)
    with torch.no_grad():
        for weights in net.parameters():
            weights.normal_(0.0, 0.3)
    fitted._serve_with(net.score_parts)  # forget what the trained weights computed
    folder: Path = tmp_path_factory.mktemp("ranker")
    fitted.save(folder)
    return [fitted, ContextRanker.load(folder)]


def test_a_requests_numeric_features_equal_the_general_paths() -> None:
    requests = _requests()
    together = _concat(*requests)
    assert not together.shared_request and all(r.shared_request for r in requests)
    assert requests[0]._user_row() is not None and together._user_row() is None
    np.testing.assert_array_equal(np.vstack([numeric_matrix(r) for r in requests]),
                                  numeric_matrix(together))


def test_a_batch_built_by_hand_is_recognised_as_one_request() -> None:
    request = _requests()[0]
    rebuilt = RankingBatch(user_ids=request.user_ids, item_ids=request.item_ids,
                           ts_s=request.ts_s, device=request.device, country=request.country,
                           features=request.features)
    assert rebuilt.shared_request
    device = request.device.copy()
    device[-1] = "desktop"
    other = RankingBatch(user_ids=request.user_ids, item_ids=request.item_ids,
                         ts_s=request.ts_s, device=device, country=request.country,
                         features=request.features)
    assert not other.shared_request


@pytest.mark.parametrize("which", ["fitted", "loaded"])
def test_a_requests_ranker_scores_equal_the_general_paths(
    rankers: list[ContextRanker], which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranker = rankers[0] if which == "fitted" else rankers[1]
    requests = _requests()
    ranker.score(requests[0])  # builds the one-request scorer (a loaded ranker has it)
    scorer = ranker._shared_scorer
    assert scorer is not None
    calls: list[int] = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(len(args[0]))
        return scorer(*args)

    monkeypatch.setattr(ranker, "_shared_scorer", counted)
    general = ranker.score(_concat(*requests))  # several users: the general path
    assert not calls
    fast = np.concatenate([ranker.score(r) for r in requests])
    assert calls == [len(r) for r in requests]
    np.testing.assert_allclose(fast, general, rtol=0, atol=1e-5)
    net = ranker.net
    assert net is not None
    with torch.inference_mode():  # and the eager network on the full encoding, no cache
        plain = torch.sigmoid(net(*ranker._encode(_concat(*requests)).inputs(slice(None))))
    np.testing.assert_allclose(fast, plain.numpy(), rtol=0, atol=1e-5)


def test_retraining_rebuilds_the_request_scorer() -> None:
    request = _requests()[0]
    train = _concat(*_requests())
    ranker = ContextRanker(CONFIG).fit(train, np.arange(len(train)) % 2 == 0)
    before = ranker.score(request)
    ranker.fit(train, np.arange(len(train)) % 3 == 0)
    after = ranker.score(request)
    general = ranker.score(_concat(request, _requests()[1]))[: len(request)]
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, general, rtol=0, atol=1e-5)


def test_a_requests_online_scores_equal_the_general_paths() -> None:
    model = OnlineModel()
    requests = _requests()
    for _ in range(5):
        for r in requests:
            model.learn(r, [j % 3 == 0 for j in range(len(r))])
    general = model.score(_concat(*requests))
    fast = np.concatenate([model.score(r) for r in requests])
    np.testing.assert_allclose(fast, general, rtol=0, atol=1e-12)


def test_an_unknown_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="activation"):
        ContextRankerConfig(activation="tanh")


def test_a_ranker_saved_before_the_activation_option_loads_as_the_gelu_it_was(
    tmp_path: Path,
) -> None:
    train = _concat(*_requests())
    ranker = ContextRanker(replace(CONFIG, activation="gelu")).fit(
        train, np.arange(len(train)) % 2 == 0)
    ranker.save(tmp_path)
    meta_file = tmp_path / "context_ranker.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["activation"]  # as written before the option existed
    meta_file.write_text(json.dumps(meta))
    loaded = ContextRanker.load(tmp_path)
    assert loaded.config.activation == "gelu"
    np.testing.assert_allclose(loaded.score(train), ranker.score(train), rtol=0, atol=1e-5)
