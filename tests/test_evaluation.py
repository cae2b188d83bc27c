"""The evaluation protocol, metrics and baselines, on small data generated here."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from streaming.simulator import Simulator, SimulatorConfig
from streamrec.contract import Event, EventType, Item
from training.baselines import EASE, CoVisitation, Popularity
from training.data import Interactions
from training.evaluate_cli import evaluate_app
from training.evaluation import (
    Queries,
    RankCounts,
    evaluate,
    evaluate_per_query,
    leave_one_out,
    metric_values,
    rank_counts,
    tune,
)


class Fixed:
    """Scores from a fixed catalog-wide table, the same for every query row."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = np.asarray(table, dtype=np.float32)

    def score(self, queries: Queries) -> np.ndarray:
        return np.tile(self.table, (len(queries), 1))


class Oracle:
    """Puts each query's target at a chosen rank: ``rank_of(query index) -> rank``."""

    def __init__(self, ranks: dict[int, int]) -> None:
        self.ranks = ranks

    def score(self, queries: Queries) -> np.ndarray:
        scores = np.zeros((len(queries), queries.n_items), dtype=np.float32)
        excluded = queries.excluded()
        for q in range(len(queries)):
            # Distinct scores n, n-1, ... over candidates in catalog order, target moved in.
            candidates = [i for i in np.flatnonzero(~excluded[q]) if i != queries.target[q]]
            rank = self.ranks[int(queries.user[q])]
            order = [*candidates[: rank - 1], int(queries.target[q]), *candidates[rank - 1 :]]
            scores[q, order] = np.arange(len(order), 0, -1)
            scores[q, excluded[q]] = 1e6  # excluded items must not count, however high
        return scores


def _data(catalog: int, rows: list[tuple[int, int, float]], users: int | None = None):
    n_users = users if users is not None else max(u for u, _, _ in rows) + 1
    return Interactions.from_arrays(
        catalog=[f"i{i}" for i in range(catalog)], users=[f"u{u}" for u in range(n_users)],
        user=[r[0] for r in rows], item=[r[1] for r in rows], ts=[r[2] for r in rows],
    )


# --- metrics ----------------------------------------------------------------------------


def test_rank_counts_exclude_history_but_never_the_target() -> None:
    scores = np.array([[5.0, 4.0, 4.0, 3.0, 9.0, 4.0]])
    excluded = np.array([[False, False, False, False, True, True]])  # 4 and 5: history
    counts = rank_counts(scores, np.array([1]), excluded)
    # Item 0 is above; item 2 ties; item 4 (9.0) and 5 (tie) are history, not candidates.
    assert (counts.above[0], counts.tied[0], counts.candidates[0]) == (1, 1, 3)
    excluded[0, 1] = True  # the target was had before (repeat): still a candidate
    assert rank_counts(scores, np.array([1]), excluded).candidates[0] == 3


def test_metrics_at_hand_computed_ranks_and_k_boundaries() -> None:
    # Ranks 1, 2, 10, 11, 50, 51 without ties.
    above = np.array([0, 1, 9, 10, 49, 50])
    counts = RankCounts(above, np.zeros(6, dtype=np.int64), np.full(6, 100))
    ndcg = metric_values(counts, "ndcg@10")
    expected = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0, 0.0]
    np.testing.assert_allclose(ndcg, expected)
    assert metric_values(counts, "hr@10").tolist() == [1, 1, 1, 0, 0, 0]
    assert metric_values(counts, "recall@10").tolist() == [1, 1, 1, 0, 0, 0]
    assert metric_values(counts, "recall@50").tolist() == [1, 1, 1, 1, 1, 0]
    np.testing.assert_allclose(metric_values(counts, "auc"), (100 - above) / 100)


def test_ties_are_broken_at_random_in_expectation() -> None:
    # The target ties with two others, one item above: rank 2, 3 or 4, each 1/3.
    counts = RankCounts(np.array([1]), np.array([2]), np.array([10]))
    assert metric_values(counts, "hr@1")[0] == 0.0
    assert metric_values(counts, "hr@2")[0] == pytest.approx(1 / 3)
    assert metric_values(counts, "hr@3")[0] == pytest.approx(2 / 3)
    assert metric_values(counts, "hr@4")[0] == pytest.approx(1.0)
    assert metric_values(counts, "ndcg@3")[0] == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(4)) / 3
    )
    assert metric_values(counts, "auc")[0] == pytest.approx((10 - 1 - 1) / 10)


def test_constant_scores_earn_exactly_chance() -> None:
    n = 50
    data = _data(n, [(0, 0, 1.0), (0, 1, 2.0), (0, 2, 3.0)])
    result = evaluate(Fixed(np.zeros(n)), leave_one_out(data).queries)
    candidates = n - 2  # two history items
    assert result["hr@10"] == pytest.approx(10 / candidates)
    assert result["recall@50"] == pytest.approx(1.0)
    assert result["auc"] == pytest.approx(0.5)


def test_unknown_metric_and_bad_shapes_are_refused() -> None:
    data = _data(5, [(0, 0, 1.0), (0, 1, 2.0)])
    queries = leave_one_out(data).queries
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(Fixed(np.zeros(5)), queries, metrics=["map@10"])
    with pytest.raises(ValueError, match="shape"):
        evaluate(Fixed(np.zeros(4)), queries)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(Fixed(np.full(5, np.nan)), queries)


def test_evaluate_ranks_oracle_targets_where_placed() -> None:
    rng = np.random.default_rng(0)
    rows = [(u, int(i), float(t)) for u in range(6)
            for t, i in enumerate(rng.choice(80, size=8, replace=False))]
    split = leave_one_out(_data(80, rows))
    ranks = {0: 1, 1: 2, 2: 10, 3: 11, 4: 50, 5: 51}
    per_query = evaluate_per_query(Oracle(ranks), split.queries, batch_size=4)
    expected_ndcg = [1 / math.log2(ranks[u] + 1) if ranks[u] <= 10 else 0.0 for u in range(6)]
    np.testing.assert_allclose(per_query["ndcg@10"], expected_ndcg)
    assert per_query["hr@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert per_query["recall@50"].tolist() == [1, 1, 1, 1, 1, 0]
    # Batching does not change anything.
    one = evaluate(Oracle(ranks), split.queries, batch_size=1)
    assert one == evaluate(Oracle(ranks), split.queries, batch_size=100)


# --- the split --------------------------------------------------------------------------


def _reference_split(rows: list[tuple[int, int, float]]):
    """Leave-one-out by the book: per user, sort by (ts, position in input)."""
    by_user: dict[int, list[tuple[float, int, int]]] = {}
    for pos, (u, i, t) in enumerate(rows):
        by_user.setdefault(u, []).append((t, pos, i))
    held_out, queries = set(), {}
    for u, events in by_user.items():
        events.sort()
        if len(events) >= 2:
            held_out.add(events[-1][1])
            queries[u] = ([i for _, _, i in events[:-1]], events[-1][2])
    train = sorted(
        ((t, pos, u, i) for pos, (u, i, t) in enumerate(rows) if pos not in held_out)
    )
    return [(u, i) for _, _, u, i in train], queries


def test_leave_one_out_matches_a_reference_with_ties_and_repeats() -> None:
    rng = np.random.default_rng(7)
    rows = [
        (int(u), int(i), float(t))
        for u, i, t in zip(rng.integers(0, 12, 300), rng.integers(0, 30, 300),
                           rng.integers(0, 40, 300), strict=True)  # many time ties
    ]
    rows.append((12, 3, 5.0))  # a user with one interaction
    data = _data(30, rows)
    split = leave_one_out(data)
    train, queries = _reference_split(rows)

    assert list(zip(split.train.user.tolist(), split.train.item.tolist(), strict=True)) == train
    assert split.queries.user.tolist() == sorted(queries)
    for q, u in enumerate(split.queries.user.tolist()):
        history, target = queries[u]
        lo, hi = split.queries.indptr[q], split.queries.indptr[q + 1]
        assert split.queries.history[lo:hi].tolist() == history
        assert int(split.queries.target[q]) == target
    assert 12 not in split.queries.user.tolist()
    assert (12, 3) in train  # nobody's test item: stays in training
    # Train + held-out targets = all interactions.
    assert len(split.train) + len(split.queries) == len(data)


def test_validation_split_holds_out_the_second_to_last() -> None:
    rows = [(0, 0, 1.0), (0, 1, 2.0), (0, 2, 3.0), (0, 3, 4.0), (1, 4, 1.0), (1, 0, 2.0)]
    split = leave_one_out(_data(5, rows))
    validation = leave_one_out(split.train)
    assert split.queries.target.tolist() == [3, 0]
    assert validation.queries.target.tolist() == [2]  # user 1 has one training item left
    assert validation.queries.history.tolist() == [0, 1]


def test_queries_rows_rebase_histories() -> None:
    rows = [(u, i, float(t)) for u in range(3) for t, i in enumerate(range(u, u + 3))]
    queries = leave_one_out(_data(6, rows)).queries
    part = queries.rows(1, 3)
    assert part.indptr.tolist() == [0, 2, 4]
    assert part.history.tolist() == [1, 2, 2, 3]
    assert part.target.tolist() == [3, 4]
    assert part.excluded()[0].nonzero()[0].tolist() == [1, 2]


# --- data from events -------------------------------------------------------------------


def _event(n: int, kind: str, user: str, item: str | None, ts: datetime, **extra) -> Event:
    return Event(event_id=f"00000000-0000-0000-0000-{n:012d}", event_type=kind,
                 user_id=user, item_id=item, ts=ts, **extra)


def test_interactions_from_records_order_context_and_first_only() -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    records = [
        Item(item_id="b", title="B", category="x", created_at=t0),
        _event(1, "view", "u", "a", t0 + timedelta(seconds=5),
               context={"device": "mobile", "country": "de"}),
        _event(2, "impression", "u", None, t0, items=["a", "b"]),
        _event(3, "click", "u", "a", t0 + timedelta(seconds=5)),  # tie: arrival order
        _event(4, "purchase", "v", "b", t0),
    ]
    data = Interactions.from_records(records)
    assert data.catalog.tolist() == ["b", "a"]  # catalog first, then items events name
    assert data.users[data.user].tolist() == ["v", "u", "u"]
    assert data.catalog[data.item].tolist() == ["b", "a", "a"]
    assert data.context["device"].tolist() == ["", "mobile", ""]
    assert data.context["country"].tolist() == ["", "DE", ""]
    first = Interactions.from_records(records, first_only=True)
    assert len(first) == 2 and first.context["device"].tolist() == ["", "mobile"]
    purchases = Interactions.from_records(records, event_types=[EventType.PURCHASE])
    assert len(purchases) == 1


# --- baselines --------------------------------------------------------------------------


def test_popularity_counts_training_interactions() -> None:
    data = _data(4, [(0, 1, 1.0), (1, 1, 1.0), (1, 2, 2.0), (0, 3, 3.0)])
    model = Popularity().fit(data)
    assert model.counts.tolist() == [0, 2, 1, 1]
    queries = leave_one_out(data).queries
    assert model.score(queries).shape == (2, 4)


def test_covisitation_weights_by_distance_direction_and_recency() -> None:
    # One user: a b c. window 2: a->b 1, b->c 1, a->c 1/2; reverse pairs x backward.
    data = _data(4, [(0, 0, 1.0), (0, 1, 2.0), (0, 2, 3.0)])
    model = CoVisitation(window=2, backward=0.5).fit(data)
    raw = np.array([[0, 1, 0.5, 0], [0.5, 0, 1, 0], [0.25, 0.5, 0, 0], [0, 0, 0, 0]])
    totals = np.maximum(raw.sum(1, keepdims=True), 1e-12)
    np.testing.assert_allclose(model.matrix.toarray(), raw / totals, rtol=1e-6)

    queries = Queries(
        catalog=data.catalog, user=np.array([0]), indptr=np.array([0, 2]),
        history=np.array([0, 1]), history_ts=np.array([1.0, 2.0]), target=np.array([2]),
        ts=np.array([3.0]), context={},
    )
    scores = CoVisitation(window=2, recent=2, recency_decay=0.5).fit(data).score(queries)
    m = model.matrix.toarray()
    np.testing.assert_allclose(scores[0], m[1] + 0.5 * m[0], rtol=1e-6)
    only_last = CoVisitation(window=2, recent=1).fit(data).score(queries)
    np.testing.assert_allclose(only_last[0], m[1], rtol=1e-6)


def test_covisitation_time_window_drops_distant_pairs() -> None:
    data = _data(3, [(0, 0, 0.0), (0, 1, 10.0), (0, 2, 10_000.0)])
    matrix = CoVisitation(window=2, max_gap_s=60).fit(data).matrix.toarray()
    assert matrix[0, 1] > 0 and matrix[1, 2] == 0 and matrix[0, 2] == 0


def test_ease_matches_the_closed_form() -> None:
    rng = np.random.default_rng(3)
    rows = [(int(u), int(i), float(t)) for t, (u, i) in
            enumerate(zip(rng.integers(0, 20, 150), rng.integers(0, 12, 150), strict=True))]
    data = _data(14, rows)  # items 12, 13: never seen
    model = EASE(l2=2.0).fit(data)
    x = np.zeros((20, 14))
    for u, i, _ in rows:
        x[u, i] = 1.0
    seen = np.flatnonzero(x.sum(0))
    g = x[:, seen].T @ x[:, seen] + 2.0 * np.eye(seen.size)
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(model.weights.numpy(), b, atol=1e-4)

    queries = leave_one_out(data).queries
    scores = model.score(queries)
    h = queries.history_matrix().toarray()
    np.testing.assert_allclose(scores[:, seen], h[:, seen] @ b, atol=1e-4)
    assert (scores[:, [12, 13]] == 0).all()


def test_baselines_find_the_planted_structure_of_the_simulator() -> None:
    sim = Simulator(SimulatorConfig(n_users=150, n_items=200, n_categories=6, seed=2,
                                    new_item_rate=0))
    data = Interactions.from_records(sim.events(8000), first_only=True)
    split = leave_one_out(data)
    results = {
        type(m).__name__: evaluate(m.fit(split.train), split.queries)
        for m in (Popularity(), CoVisitation(), EASE(l2=10.0))
    }
    assert results["CoVisitation"]["ndcg@10"] > 1.5 * results["Popularity"]["ndcg@10"]
    assert results["EASE"]["ndcg@10"] > 1.5 * results["Popularity"]["ndcg@10"]


def test_tune_picks_the_best_grid_value_on_validation() -> None:
    rows = [(u, i, float(t)) for u in range(5) for t, i in enumerate([0, 1, 2, 3])]
    validation = leave_one_out(leave_one_out(_data(6, rows)).train)  # target: item 2
    tables = {"good": np.array([0, 0, 9, 0, 0, 0]), "bad": np.array([0, 0, 0, 9, 9, 9])}
    seen: list[str] = []
    best, result = tune(lambda v, _: Fixed(tables[v]), ["bad", "good"], validation,
                        on_result=lambda v, _: seen.append(v))
    assert best == "good" and result["ndcg@10"] == 1.0 and seen == ["bad", "good"]


# --- the command ------------------------------------------------------------------------


def test_evaluate_movielens_command_prints_a_table_then_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    folder = tmp_path / "ml"
    folder.mkdir()
    movies = ["movieId,title,genres"] + [f"{m},Movie {m} (1999),Drama" for m in range(1, 61)]
    (folder / "movies.csv").write_text("\n".join(movies) + "\n")
    ratings = ["userId,movieId,rating,timestamp"]
    for u in range(1, 31):
        start = int(rng.integers(1, 45))  # each user rates a run of neighbouring movies
        for k, m in enumerate(rng.permutation(np.arange(start, start + 15))[:10]):
            ratings.append(f"{u},{m},4.0,{900_000_000 + 1000 * u + 10 * k}")
    (folder / "ratings.csv").write_text("\n".join(ratings) + "\n")

    app = typer.Typer()
    app.add_typer(evaluate_app, name="evaluate")
    app.command("noop")(lambda: None)  # a real multi-command app, as streamrec's
    result = CliRunner().invoke(app, ["evaluate", "movielens", str(folder), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("model") and any(ln.startswith("ease") for ln in lines)
    summary = json.loads(lines[-1])
    assert list(summary) == ["ranker", "online", "popularity", "covisitation", "ease"]
    for name in ("ranker", "online", "popularity", "covisitation", "ease"):
        assert {"ndcg@10", "recall@10", "recall@50", "hr@10"} <= set(summary[name])
        assert 0.0 <= summary[name]["ndcg@10"] <= 1.0
    assert summary["covisitation"]["ndcg@10"] > summary["popularity"]["ndcg@10"]


def test_evaluate_movielens_command_reports_a_bad_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(evaluate_app, [str(tmp_path)])
    assert result.exit_code == 1
    assert "no MovieLens files here" in result.stderr
