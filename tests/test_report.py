"""The cost-performance report over a registry with real ranker and online versions."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from drifting_shop import DriftingShop
from typer.testing import CliRunner

from streaming.simulator import SimulatorConfig
from streamrec.settings import Settings
from training.context_ranker import ContextRanker, ContextRankerConfig
from training.online_model import OnlineModel
from training.registry import ModelRegistry
from training.report import cost_performance, markdown, write_report
from training.simulated import SimulatedHome, simulate_home


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, SimulatedHome]:
    """A simulated home (event log, catalog), two ranker and two online versions (first
    ranker and last online promoted), with holdout metrics like ``streamrec train`` writes."""
    settings = Settings(home=tmp_path_factory.mktemp("report") / "home")
    home = simulate_home(
        settings, SimulatorConfig(n_users=60, n_items=250, n_categories=6, seed=3), 1500
    )
    registry = ModelRegistry.from_settings(settings)
    data = DriftingShop(seed=2)
    shown = list(data.stream(60))
    batches = [data.batch(s) for s in shown]
    labels = np.concatenate([s.labels for s in shown])
    torch.set_num_threads(1)
    holdout = {"popularity": {"ndcg@10": 0.41, "auc": 0.55},
               "covisitation": {"ndcg@10": 0.45, "auc": 0.58}}
    for n, dim in enumerate((8, 16)):
        ranker = ContextRanker(ContextRankerConfig(dim=dim, hidden=(16,), epochs=1))
        ranker.fit(_concat(batches), labels)
        with tempfile.TemporaryDirectory() as tmp:
            ranker.save(tmp)
            version = registry.register(
                "ranker", Path(tmp),
                metrics={"ndcg@10": 0.5 + n / 10, "auc": 0.6 + n / 10, "train_seconds": 1.5,
                         "params": ranker.param_count,
                         "holdout": {"candidate": {"ndcg@10": 0.5 + n / 10}, **holdout}},
                data_window={"start": home.start.isoformat(), "end": home.end.isoformat()},
                features=[],
            )
        if n == 0:
            registry.promote("ranker", version.version)
    online = OnlineModel()
    for step in range(2):
        part = slice(step * 30, (step + 1) * 30)
        for s, b in zip(shown[part], batches[part], strict=True):
            online.learn(b, s.labels)
        with tempfile.TemporaryDirectory() as tmp:
            online.save(Path(tmp))
            metrics = {k: v for k, v in online.metrics().items() if k != "drift_detected"}
            version = registry.register("online", Path(tmp), metrics=metrics,
                                        data_window={}, features=[])
        registry.promote("online", version.version)
    return settings, home


def _concat(batches: list) -> object:
    from training.ranking_batch import RankingBatch

    # Every feature any batch has, so the first batch's names do not decide.
    keys = sorted({k for b in batches for k in b.features})
    return RankingBatch.concat([replace(b, features={k: b.column(k) for k in keys})
                                for b in batches])


def test_every_version_and_baseline_is_measured(shop: tuple[Settings, SimulatedHome]) -> None:
    settings, _ = shop
    rows, probe = cost_performance(settings, repeats=20, user="u000007")
    assert probe["user"] == "u000007" and probe["candidates"] == 200
    names = [r.name for r in rows]
    assert [n.split()[0] for n in names] == ["ranker", "ranker", "online", "online",
                                             "popularity", "covisitation"]
    by_kind = {r.kind: [x for x in rows if x.kind == r.kind] for r in rows}
    assert [r.champion for r in by_kind["ranker"]] == [True, False]
    assert [r.champion for r in by_kind["online"]] == [False, True]
    for r in rows:
        assert r.p99_ms is not None and 0 < r.p50_ms <= r.p99_ms, r
        assert r.params is not None and r.params > 0, r
        assert r.peak_mb is not None and r.peak_mb >= 0, r
    ranker = by_kind["ranker"][1]
    assert ranker.ndcg_at_10 == pytest.approx(0.6) and ranker.quality == "holdout"
    assert ranker.params > by_kind["ranker"][0].params  # dim 16 > dim 8
    online = by_kind["online"][1]
    assert online.quality == "progressive" and online.ndcg_at_10 is None
    assert 0 < online.auc < 1 and online.train_s > 0
    popularity = by_kind["baseline"][0]
    assert popularity.ndcg_at_10 == 0.41 and popularity.params > 0
    assert popularity.train_s is not None

    md, png = write_report(settings, rows, probe)
    table = md.read_text()
    assert table.splitlines()[4:] == markdown(rows, probe).splitlines()[4:]
    assert table.count("\n| ") == len(rows) + 1 and "| popularity |" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_report_command_prints_the_table_then_json(
    shop: tuple[Settings, SimulatedHome], monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamrec.cli import app
    from streamrec.settings import get_settings

    settings, _ = shop
    monkeypatch.setenv("STREAMREC_HOME", str(settings.home))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["report", "cps", "--repeats", "10"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["png"].endswith("reports/cps.png") and summary["probe_candidates"] == 200
    assert len(summary["models"]) == 6 and summary["total_s"] > 0
    assert "| model | champion |" in result.stdout


def test_report_refuses_a_home_without_catalog(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from streamrec.cli import app
    from streamrec.settings import get_settings

    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["report", "cps"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "no catalog" in result.stderr
