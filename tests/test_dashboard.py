"""The live dashboard: status files, the stats snapshot, and the page in headless Chromium.

The browser test needs Debian's ``chromium`` and the ``playwright`` package (no browser
download: it drives the system binary); without either it is skipped with the reason.
"""

from __future__ import annotations

import doctest
import importlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from serving.app import create_app
from serving.dashboard import dashboard_stats, worker_statuses
from serving.request_stats import RequestStats
from streaming.broker import free_port
from streaming.consumer import ConsumerStats
from streaming.metrics import WorkerReporter, status_folder
from streamrec.settings import Settings
from training.registry import ModelRegistry

FRESHNESS_P50_MS = 187.4
FRESHNESS_P99_MS = 412.5
AUC = 0.7342
LOG_LOSS = 0.4561


def _settings(home: Path) -> Settings:
    # Nothing listens there: the API connects to Kafka lazily and never needs it here.
    return Settings(home=home, kafka_bootstrap=f"127.0.0.1:{free_port()}")


def _feature_writer_reporter(settings: Settings, interval_s: float = 2.0) -> WorkerReporter:
    """A reporter with the feature writer's fields (see ``FeatureWriter.status``)."""
    stats = ConsumerStats(consumed=120_000, dead_lettered=3, lag={"events:0": 40, "events:1": 2})
    extra = {
        "events": 119_990,
        "too_late": 4,
        "duplicates": 6,
        "user_rows": 8_200,
        "item_rows": 2_100,
        "freshness_p50_ms": FRESHNESS_P50_MS,
        "freshness_p99_ms": FRESHNESS_P99_MS,
    }
    return WorkerReporter("features", stats, extra=lambda: dict(extra),
                          status_dir=status_folder(settings), status_interval_s=interval_s)


def _write_learner(settings: Settings, **fields: object) -> None:
    folder = status_folder(settings)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "learner.json").write_text(json.dumps({"ts": time.time(), **fields}))


def _promote_ranker(settings: Settings, tmp_path: Path) -> str:
    build = tmp_path / "build"
    build.mkdir()
    (build / "weights.safetensors").write_bytes(b"weights")
    registry = ModelRegistry.from_settings(settings)
    version = registry.register("ranker", build, metrics={"ndcg@10": 0.3125, "auc": 0.81},
                                data_window={}, features=["user_realtime__views_1h"])
    registry.promote("ranker", version.version)
    return version.version


def _write_cps_plot(settings: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.scatter([12, 95, 300], [0.21, 0.28, 0.31])
    ax.set_xlabel("train seconds")
    ax.set_ylabel("NDCG@10")
    path = settings.home / "reports" / "cps.png"
    path.parent.mkdir(parents=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


# --- without a browser ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["streaming.metrics", "serving.request_stats", "serving.dashboard"]
)
def test_docstring_examples_run(name: str) -> None:
    failures, tried = doctest.testmod(importlib.import_module(name),
                                      optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_reporter_writes_status_file_atomically(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    reporter = _feature_writer_reporter(settings)
    reporter.stats.consumed = 120_500
    reporter.report(log_line=False)
    path = status_folder(settings) / "features.json"
    status = json.loads(path.read_text())
    assert status["worker"] == "features" and status["running"] is True
    assert status["consumed"] == 120_500 and status["lag"] == 42
    assert status["freshness_p99_ms"] == FRESHNESS_P99_MS
    assert status["consumed_per_s"] > 0 and abs(status["ts"] - time.time()) < 5
    assert status["interval_s"] == 2.0
    reporter.stop()
    assert json.loads(path.read_text())["running"] is False
    assert [p.name for p in path.parent.iterdir()] == ["features.json"]  # no temp files left


def test_reporter_thread_refreshes_status_between_log_lines(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    reporter = _feature_writer_reporter(settings, interval_s=0.05)
    reporter.start()
    path = status_folder(settings) / "features.json"
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    first = json.loads(path.read_text())["ts"]
    time.sleep(0.2)
    assert json.loads(path.read_text())["ts"] > first
    reporter.stop()


def test_stats_from_status_files_registry_and_requests(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    now = time.time()
    _feature_writer_reporter(settings).report(log_line=False)
    folder = status_folder(settings)
    (folder / "archiver.json").write_text(json.dumps(
        {"worker": "archiver", "ts": now - 120, "interval_s": 2, "running": True, "lag": 9}))
    (folder / "old.json").write_text(json.dumps({"ts": now - 5, "running": False}))
    (folder / "half.json").write_text('{"worker": "ha')
    # The learner's format is its own: read any numbers, nested ones too, defensively.
    _write_learner(settings, worker="learner", examples=5000, drift=False, note="warm",
                   bad=float("nan"), metrics={"auc": AUC, "log_loss": LOG_LOSS})
    version = _promote_ranker(settings, tmp_path)
    requests = RequestStats(window_s=10)
    for ms in (2.0, 3.0, 4.0, 80.0):
        requests.record(ms / 1000, 200)

    stats = dashboard_stats(settings, requests, now=now)

    by_name = {w.name: w for w in stats.workers}
    assert sorted(by_name) == ["archiver", "features", "half", "learner", "old"]
    assert by_name["features"].state == "live" and by_name["features"].lag == 42
    assert by_name["archiver"].state == "stale"
    assert by_name["old"].state == "stopped"
    assert by_name["half"].state == "unreadable" and "JSONDecodeError" in by_name["half"].error
    assert stats.freshness is not None and stats.freshness.worker == "features"
    assert (stats.freshness.p50_ms, stats.freshness.p99_ms) == (FRESHNESS_P50_MS,
                                                                FRESHNESS_P99_MS)
    learner = stats.learner
    assert learner is not None and learner.state == "live"
    assert (learner.auc, learner.log_loss) == (AUC, LOG_LOSS)
    assert learner.fields["examples"] == 5000 and "drift" not in learner.fields
    assert "bad" not in learner.fields
    assert (stats.api.requests, stats.api.p50_ms, stats.api.p99_ms) == (4, 3.0, 80.0)
    models = {m.kind: m for m in stats.models}
    assert models["ranker"].version == version and models["ranker"].metrics["ndcg@10"] == 0.3125
    assert models["online"].version is None and models["online"].versions == 0
    assert stats.cps is None


def test_empty_home_is_a_valid_snapshot(tmp_path: Path) -> None:
    stats = dashboard_stats(_settings(tmp_path / "nothing-yet"), RequestStats())
    assert stats.workers == [] and stats.freshness is None and stats.learner is None
    assert stats.api.requests == 0 and stats.api.p99_ms is None and stats.cps is None
    assert [(m.kind, m.version, m.error) for m in stats.models] == [
        ("ranker", None, None), ("online", None, None)]


def test_endpoints_time_api_requests_only(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _write_cps_plot(settings)
    with TestClient(create_app(settings)) as client:
        assert client.get("/dashboard").headers["content-type"].startswith("text/html")
        assert client.get("/dashboard/static/vendor/uPlot.iife.min.js").status_code == 200
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/dashboard/stats").status_code == 200
        assert client.post("/v1/events", content=b"not json").status_code == 422
        body = client.get("/v1/dashboard/stats").json()
        assert body["api"]["requests"] == 1  # the ingest call; probes and polls not counted
        assert body["cps"]["url"].startswith("dashboard/cps.png?v=")
        png = client.get("/" + body["cps"]["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    (settings.home / "reports" / "cps.png").unlink()
    with TestClient(create_app(settings)) as client:
        assert client.get("/dashboard/cps.png").status_code == 404


def test_worker_statuses_without_folder(tmp_path: Path) -> None:
    assert worker_statuses(tmp_path / "absent") == []


# --- in a browser --------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")


@contextmanager
def _serving(settings: Settings) -> Iterator[str]:
    """The real app under uvicorn on a free port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_api(tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    settings = _settings(tmp_path / "home")
    with _serving(settings) as base:
        yield base, settings


_COUNT_COLOUR = """([selector, rgb]) => {
  const canvas = document.querySelector(selector);
  if (!canvas) return -1;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 200 && Math.abs(data[i] - rgb[0]) < 30
        && Math.abs(data[i + 1] - rgb[1]) < 30 && Math.abs(data[i + 2] - rgb[2]) < 30) n++;
  }
  return n;
}"""


def test_dashboard_renders_live_numbers_in_chromium(
    live_api: tuple[str, Settings], tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    base, settings = live_api
    version = _promote_ranker(settings, tmp_path)
    _write_cps_plot(settings)
    _write_learner(settings, progressive_auc=AUC, log_loss=LOG_LOSS, examples=5000)
    reporter = _feature_writer_reporter(settings, interval_s=0.25)
    reporter.start()
    consuming = threading.Event()

    def consume() -> None:  # the worker's consumer advancing, ~5,000 records/s
        while not consuming.wait(0.05):
            reporter.stats.consumed += 250

    threading.Thread(target=consume, daemon=True).start()
    import httpx

    with httpx.Client(base_url=base) as client:  # some API traffic to time
        for _ in range(5):
            assert client.post("/v1/events", content=b"not json").status_code == 422

    screenshot = tmp_path / "dashboard.png"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1500})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{base}/dashboard?poll_ms=400")
                page.wait_for_function("Number(document.body.dataset.polls) >= 4",
                                       timeout=15_000)
                page.wait_for_function(
                    "document.querySelector('#cps-img').naturalWidth > 0", timeout=5_000)
                page.screenshot(path=str(screenshot), full_page=True)

                assert errors == []
                assert page.inner_text("#connection").startswith("live")
                assert page.inner_text("#tile-freshness .tile-value") == f"{FRESHNESS_P99_MS} ms"
                assert f"p50 {FRESHNESS_P50_MS} ms" in page.inner_text("#tile-freshness")
                assert page.inner_text("#tile-auc .tile-value") == f"{AUC:.4f}"
                assert f"log loss {LOG_LOSS:.4f}" in page.inner_text("#tile-auc")
                assert page.inner_text("#tile-lag .tile-value") == "42"
                assert page.inner_text("#tile-latency .tile-value").endswith(" ms")
                row = page.inner_text("#workers tr[data-worker='features']")
                assert "live" in row and "120,000" not in row  # consumed keeps growing
                rate = page.inner_text("#tile-events .tile-value")
                assert rate.endswith("/s") and float(rate[:-2].replace(",", "")) > 1000
                assert version in page.inner_text("#models tr[data-kind='ranker']")
                assert "no model yet" in page.inner_text("#models tr[data-kind='online']")
                for chart in ("freshness", "learner", "throughput", "latency"):
                    assert "has-data" in page.get_attribute(f"#chart-{chart}", "class")
                # The p99 line (#dc2626) and the AUC line (#9333ea) are drawn on the canvases.
                red = page.evaluate(_COUNT_COLOUR, ["#chart-freshness canvas", [220, 38, 38]])
                purple = page.evaluate(_COUNT_COLOUR, ["#chart-learner canvas", [147, 51, 234]])
                assert red > 50 and purple > 50, (red, purple)
            finally:
                browser.close()
    finally:
        consuming.set()
        reporter.stop()
    assert screenshot.stat().st_size > 10_000


def test_dashboard_empty_states_in_chromium(live_api: tuple[str, Settings]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    base, _ = live_api
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            page = browser.new_page()
            page.goto(f"{base}/dashboard?poll_ms=300")
            page.wait_for_function("Number(document.body.dataset.polls) >= 2", timeout=15_000)
            assert page.inner_text("#tile-auc .tile-sub") == "no learner running yet"
            assert page.inner_text("#tile-events .tile-sub") == "no stream worker reporting yet"
            assert page.is_visible("#chart-learner .empty")
            assert "No learner running yet" in page.inner_text("#chart-learner .empty")
            assert page.is_visible("#cps-empty") and page.is_hidden("#cps-img")
            assert page.inner_text("#models tr[data-kind='ranker'] td:nth-child(2)") == (
                "no model yet")
        finally:
            browser.close()


def test_dashboard_asks_for_a_key_when_the_api_needs_one(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    settings = _settings(tmp_path).model_copy(
        update={"api_keys": SecretStr("reader-key:read")})
    _write_learner(settings, progressive_auc=AUC)
    with _serving(settings) as base, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            page = browser.new_page()
            # Whoever serves the page may let it through (a proxy, an open path); the data
            # the page polls still needs the key its user types in.
            page.route(lambda url: "/v1/" not in url, lambda route: route.continue_(
                headers={**route.request.headers, "x-api-key": "reader-key"}))
            page.goto(f"{base}/dashboard?poll_ms=300")
            page.wait_for_selector("#key-form", state="visible", timeout=15_000)
            assert "API key" in page.inner_text("#connection")
            page.fill("#key-input", "reader-key")
            page.click("#key-form button")
            page.wait_for_function(
                "document.querySelector('#tile-auc .tile-value').textContent !== '—'",
                timeout=15_000)
            assert page.inner_text("#tile-auc .tile-value") == f"{AUC:.4f}"
            assert page.is_hidden("#key-form")
        finally:
            browser.close()
