"""The live dashboard: one page at ``/dashboard`` and the JSON it polls.

Everything the page shows is gathered by :func:`dashboard_stats` from what the rest of the
stack already leaves behind, so the dashboard adds no moving part of its own:

* **stream workers** — ``<home>/status/<worker>.json``, rewritten every few seconds by
  :class:`streaming.metrics.WorkerReporter` (consumed, records/s, lag; the feature writer
  adds event → online freshness p50/p99);
* **online learner** — ``<home>/status/learner.json``: whatever numeric fields it has, its
  progressive AUC and log loss picked out by name;
* **API latency** — this process's own :class:`serving.request_stats.RequestStats`;
* **models** — the champions of the model registry (``ranker``, ``online``) with their
  manifest metrics;
* **cost-performance plot** — ``<home>/reports/cps.png`` (``streamrec report cps``),
  served at ``/dashboard/cps.png`` when present.

The page (``serving/static/``, charts by the vendored uPlot) polls ``/v1/dashboard/stats``
every 2 s and keeps the last 10 minutes in the browser. Sources that are missing are empty
states, never errors.

Examples
--------
>>> import json, tempfile, time
>>> from pathlib import Path
>>> from streamrec.settings import Settings
>>> settings = Settings(home=Path(tempfile.mkdtemp()))
>>> dashboard_stats(settings, RequestStats()).learner is None
True
>>> (settings.home / "status").mkdir()
>>> _ = (settings.home / "status" / "learner.json").write_text(
...     json.dumps({"ts": time.time(), "progressive_auc": 0.71, "examples": 1200}))
>>> learner = dashboard_stats(settings, RequestStats()).learner
>>> learner.state, learner.auc, learner.fields["examples"]
('live', 0.71, 1200.0)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from serving.deps import SettingsDep
from serving.request_stats import RequestStats, RequestTimer
from streaming.metrics import status_folder
from streamrec.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
MODEL_KINDS = ("ranker", "online")
LEARNER = "learner"
"""Name of the online learner's status file (``<home>/status/learner.json``)."""

# A file that states no interval (the learner may write per N examples) is stale after this.
_DEFAULT_STALE_S = 60.0
_AUC_KEYS = ("progressive_auc", "rolling_auc", "auc")
_LOG_LOSS_KEYS = ("progressive_log_loss", "rolling_log_loss", "log_loss", "logloss")

State = Literal["live", "stale", "stopped", "unreadable"]


class WorkerStatus(BaseModel):
    """One status file: a stream worker (or the learner) as it last reported."""

    name: str = Field(description="The file's name without `.json` (the worker's name).")
    state: State = Field(
        description="`live`: reported recently; `stale`: silent for over three report "
        "intervals; `stopped`: its last report said it was stopping; `unreadable`: the file "
        "is not a JSON object."
    )
    age_s: float | None = Field(description="Seconds since its last report.")
    consumed: float | None = None
    consumed_per_s: float | None = None
    lag: float | None = None
    dead_lettered: float | None = None
    freshness_p50_ms: float | None = None
    freshness_p99_ms: float | None = None
    fields: dict[str, float] = Field(
        default_factory=dict, description="Every numeric field of the file (nested: `a.b`)."
    )
    error: str | None = None


class LearnerStatus(BaseModel):
    """The online (River) learner's progressive validation."""

    state: State
    age_s: float | None
    auc: float | None = Field(None, description="Progressive (rolling) ROC AUC.")
    log_loss: float | None = Field(None, description="Progressive (rolling) log loss.")
    fields: dict[str, float] = Field(default_factory=dict)
    error: str | None = None


class FreshnessStats(BaseModel):
    """Event time → features online, from the feature writer's recent events."""

    worker: str
    p50_ms: float | None
    p99_ms: float | None


class ApiStats(BaseModel):
    """API requests (``/v1/``, the dashboard excluded) that finished in the last window."""

    window_s: float
    requests: int
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int = Field(description="5xx responses in the window.")


class ModelInfo(BaseModel):
    """The champion of one model kind in the registry."""

    kind: str
    version: str | None = Field(description="The champion's id; null before any promotion.")
    created_at: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    versions: int = Field(0, description="Versions registered for this kind.")
    error: str | None = None


class CostPerformancePlot(BaseModel):
    """Where the page finds the newest cost-performance plot."""

    url: str = Field(description="Relative to the API root; changes when the plot does.")
    updated_at: float = Field(description="The plot file's modification time (epoch s).")


class DashboardStats(BaseModel):
    """Everything the dashboard shows, at one moment."""

    ts: float = Field(description="Server time of this snapshot (epoch seconds).")
    workers: list[WorkerStatus]
    freshness: FreshnessStats | None
    learner: LearnerStatus | None
    api: ApiStats
    models: list[ModelInfo]
    cps: CostPerformancePlot | None


def numeric_fields(data: Mapping[str, Any], prefix: str = "", depth: int = 2) -> dict[str, float]:
    """Finite numbers of ``data`` (booleans excluded), nested mappings as ``parent.child``."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, Mapping) and depth > 1:
            out.update(numeric_fields(value, f"{name}.", depth - 1))
    return out


def _pick(fields: Mapping[str, float], preferred: Iterable[str]) -> float | None:
    """The first preferred key present; else any key whose last part contains the last
    preferred name (``metrics.auc``, ``window_auc``)."""
    preferred = list(preferred)
    for key in preferred:
        if key in fields:
            return fields[key]
    for key in sorted(fields):
        leaf = key.rsplit(".", 1)[-1]
        if any(p in leaf for p in preferred):
            return fields[key]
    return None


def _read_status(path: Path, now: float) -> tuple[dict[str, Any] | None, float | None, str | None]:
    """``(data, age_s, error)`` of one status file; ``None`` data when it is unreadable."""
    try:
        mtime = path.stat().st_mtime
    except OSError as exc:  # removed since the listing
        return None, None, f"{type(exc).__name__}: {exc}"
    age_s = round(max(0.0, now - mtime), 1)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, age_s, f"{type(exc).__name__}: {exc}"
    if not isinstance(data, dict):
        return None, age_s, "not a JSON object"
    ts = data.get("ts")
    written = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else mtime
    return data, round(max(0.0, now - written), 1), None


def _state(data: Mapping[str, Any], age_s: float) -> State:
    if data.get("running") is False:
        return "stopped"
    interval = data.get("interval_s")
    stale_after = (
        3 * float(interval)
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0
        else _DEFAULT_STALE_S
    )
    return "stale" if age_s > stale_after else "live"


def worker_statuses(folder: Path, now: float | None = None) -> list[WorkerStatus]:
    """Every ``*.json`` status file in ``folder``, by name (none when it does not exist)."""
    now = time.time() if now is None else now
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        data, age_s, error = _read_status(path, now)
        if data is None or age_s is None:
            out.append(WorkerStatus(name=path.stem, state="unreadable", age_s=age_s, error=error))
            continue
        fields = numeric_fields(data)
        out.append(
            WorkerStatus(
                name=path.stem,
                state=_state(data, age_s),
                age_s=age_s,
                consumed=fields.get("consumed"),
                consumed_per_s=fields.get("consumed_per_s"),
                lag=fields.get("lag"),
                dead_lettered=fields.get("dead_lettered"),
                freshness_p50_ms=fields.get("freshness_p50_ms"),
                freshness_p99_ms=fields.get("freshness_p99_ms"),
                fields=fields,
            )
        )
    return out


def learner_status(workers: Iterable[WorkerStatus]) -> LearnerStatus | None:
    """The learner's entry among the status files, its AUC and log loss picked by name."""
    for w in workers:
        if w.name == LEARNER:
            return LearnerStatus(
                state=w.state,
                age_s=w.age_s,
                auc=_pick(w.fields, _AUC_KEYS),
                log_loss=_pick(w.fields, _LOG_LOSS_KEYS),
                fields=w.fields,
                error=w.error,
            )
    return None


def freshness(workers: Iterable[WorkerStatus]) -> FreshnessStats | None:
    """Freshness of the worker that reports it (the worst p99 if several do)."""
    reporting = [
        w for w in workers if w.freshness_p99_ms is not None and w.state in ("live", "stale")
    ]
    if not reporting:
        return None
    worst = max(reporting, key=lambda w: w.freshness_p99_ms or 0.0)
    return FreshnessStats(
        worker=worst.name, p50_ms=worst.freshness_p50_ms, p99_ms=worst.freshness_p99_ms
    )


def model_champions(settings: Settings, kinds: Iterable[str] = MODEL_KINDS) -> list[ModelInfo]:
    """The registry's champion of each kind; problems become the entry's ``error``."""
    try:
        # Lazy: the registry belongs to training; the API must start without it.
        from training.registry import ModelRegistry
    except ImportError as exc:
        return [ModelInfo(kind=k, version=None, error=f"registry unavailable: {exc}")
                for k in kinds]
    registry = ModelRegistry.from_settings(settings)
    out = []
    for kind in kinds:
        try:
            champion = registry.champion(kind)
            count = len(registry.versions(kind))
        except Exception as exc:  # an unreadable pointer must not take the page down
            out.append(ModelInfo(kind=kind, version=None, error=f"{type(exc).__name__}: {exc}"))
            continue
        if champion is None:
            out.append(ModelInfo(kind=kind, version=None, versions=count))
            continue
        metrics = champion.metrics
        out.append(
            ModelInfo(
                kind=kind,
                version=champion.version,
                created_at=champion.created_at or None,
                metrics=numeric_fields(metrics) if isinstance(metrics, Mapping) else {},
                versions=count,
            )
        )
    return out


def cps_plot_path(settings: Settings) -> Path:
    """Where ``streamrec report cps`` leaves its plot."""
    return settings.home / "reports" / "cps.png"


def cps_plot(settings: Settings) -> CostPerformancePlot | None:
    try:
        mtime = cps_plot_path(settings).stat().st_mtime
    except OSError:
        return None
    # The query string changes with the file, so the browser reloads a new plot only.
    return CostPerformancePlot(url=f"dashboard/cps.png?v={int(mtime)}", updated_at=mtime)


def dashboard_stats(
    settings: Settings, requests: RequestStats, now: float | None = None
) -> DashboardStats:
    """One snapshot of everything the dashboard shows.

    Parameters
    ----------
    settings
        The home folder (status files, registry, reports).
    requests
        This API process's recent requests.
    now
        Epoch seconds to measure ages against (default: the clock).
    """
    now = time.time() if now is None else now
    workers = worker_statuses(status_folder(settings), now)
    return DashboardStats(
        ts=now,
        workers=workers,
        freshness=freshness(workers),
        learner=learner_status(workers),
        api=ApiStats(**asdict(requests.summary())),
        models=model_champions(settings),
        cps=cps_plot(settings),
    )


def app_request_stats(request: Request) -> RequestStats:
    """The app's request timings (created by :func:`install_dashboard`)."""
    stats: RequestStats = request.app.state.request_stats
    return stats


RequestStatsDep = Annotated[RequestStats, Depends(app_request_stats)]

router = APIRouter(tags=["dashboard"])

_EXAMPLE = {
    "ts": 1764000000.0,
    "workers": [{
        "name": "features", "state": "live", "age_s": 0.8, "consumed": 182000,
        "consumed_per_s": 2010.5, "lag": 12, "dead_lettered": 3, "freshness_p50_ms": 212.4,
        "freshness_p99_ms": 431.0, "fields": {"consumed": 182000, "events": 181990},
        "error": None,
    }],
    "freshness": {"worker": "features", "p50_ms": 212.4, "p99_ms": 431.0},
    "learner": {"state": "live", "age_s": 1.5, "auc": 0.734, "log_loss": 0.412,
                "fields": {"progressive_auc": 0.734, "examples": 52000}, "error": None},
    "api": {"window_s": 10.0, "requests": 1990, "requests_per_s": 199.0, "p50_ms": 6.1,
            "p99_ms": 14.8, "errors": 0},
    "models": [{"kind": "ranker", "version": "v0003-20261124T101500Z",
                "created_at": "2026-11-24T10:15:00+00:00", "metrics": {"ndcg@10": 0.31},
                "versions": 3, "error": None},
               {"kind": "online", "version": None, "created_at": None, "metrics": {},
                "versions": 0, "error": None}],
    "cps": None,
}


@router.get("/dashboard", include_in_schema=False)
def dashboard_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")


@router.get(
    "/v1/dashboard/stats",
    summary="Dashboard snapshot",
    description="What the `/dashboard` page polls: stream workers (throughput, lag, "
    "freshness), the online learner's progressive AUC / log loss, this API process's "
    "request latency over the last 10 s, the model champions and the cost-performance "
    "plot. Missing sources are `null` or empty, never errors.",
    response_model=DashboardStats,
    responses={200: {"content": {"application/json": {"example": _EXAMPLE}}}},
)
def get_dashboard_stats(settings: SettingsDep, request_stats: RequestStatsDep) -> DashboardStats:
    return dashboard_stats(settings, request_stats)


@router.get(
    "/dashboard/cps.png",
    include_in_schema=False,
    responses={404: {"description": "No cost-performance report yet."}},
)
def get_cps_plot(settings: SettingsDep) -> FileResponse:
    path = cps_plot_path(settings)
    if not path.is_file():
        raise HTTPException(404, "no cost-performance report yet: run `streamrec report cps`")
    return FileResponse(path, media_type="image/png")


def install_dashboard(app: FastAPI) -> None:
    """Add the dashboard to ``app``: the request timer, the static files and the routes."""
    app.state.request_stats = RequestStats()
    app.add_middleware(RequestTimer, stats=app.state.request_stats)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    app.include_router(router)
