"""Cost-performance report: every model version and baseline, quality against cost.

``streamrec report cps`` writes ``<home>/reports/cps.md`` (a Markdown table) and
``<home>/reports/cps.png`` (quality against p99 latency, point size by parameter count), and
prints one JSON object as its last stdout line.

Quality (from the registry's manifests, nothing is re-trained)
    * ``ranker`` versions: the per-request metrics of their temporal holdout
      (:mod:`training.holdout`, written by ``streamrec train``): NDCG@10 and AUC.
    * ``popularity`` and ``covisitation``: the same holdout metrics, evaluated by
      ``streamrec train`` on the newest ranker version's holdout (so they compare with that
      version exactly).
    * ``online`` versions: the progressive rolling AUC of the learner at the snapshot —
      each slot scored before its label was known, pooled over slots rather than averaged
      per request, so it is close to but not the same measure as the holdout AUC. No NDCG.

Cost (measured now, on this machine)
    * p50/p99 inference ms for 200 candidates: one real :class:`RankingBatch` — a user and
      200 catalog items with their features read from the online store, as serving builds
      it — scored ``repeats`` times by each model loaded from the registry (checksums
      verified). Baselines score the same user over the catalog (full-catalog scoring is
      their serving path).
    * parameter count: learnt numbers (the ranker's trainable parameters; the online
      model's weights and scaler statistics; the baselines' counts / co-visitation
      entries).
    * peak memory: the rise of the process's peak resident set while loading the model and
      scoring, measured in a forked child per model (Linux ``/proc/self/clear_refs`` resets
      the high-water mark) so models do not share heap.
    * train seconds: from the manifest (``train_seconds`` of a ranker fit; the online
      model's cumulative ``learn_seconds``); baselines are fitted now, on the interactions
      of the newest ranker's data window, and timed.
"""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from streamrec.settings import Settings, get_settings

if TYPE_CHECKING:
    from training.data import Interactions
    from training.ranking_batch import RankingBatch
    from training.registry import ModelRegistry, ModelVersion

__all__ = ["CostRow", "cost_performance", "probe_batch", "report_app", "write_report"]

KINDS: dict[str, str] = {
    "ranker": "training.context_ranker:ContextRanker",
    "online": "training.online_model:OnlineModel",
}
"""Model kinds in the registry → the class whose ``load(folder)`` reads a version."""
BASELINES = ("popularity", "covisitation")
CANDIDATES = 200

report_app = typer.Typer(help="Reports over the model registry.", no_args_is_help=True)


@dataclass(frozen=True)
class CostRow:
    """One model (version) of the report."""

    name: str
    kind: str
    version: str | None
    champion: bool
    ndcg_at_10: float | None
    auc: float | None
    quality: str
    """Where the quality comes from: ``holdout`` or ``progressive``."""
    train_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    params: int | None
    peak_mb: float | None


# --- the probe batch ----------------------------------------------------------------------


def probe_batch(settings: Settings, *, user: str | None = None,
                n: int = CANDIDATES, seed: int = 0) -> tuple[RankingBatch, float]:
    """A real request: ``user`` (default: the newest event's user) against ``n`` catalog
    items, features read from the online store as serving reads them.

    Returns the batch and the seconds one online read of its features took.
    """
    from features.store import RANKER_SERVICE, OnlineFeatureReader
    from streaming.archiver import load_catalog
    from training.ranking_batch import RankingBatch

    catalog = load_catalog(settings).column("item_id").to_pylist()
    if not catalog:
        raise RuntimeError(f"no catalog under {settings.home / 'offline'}: run the pipeline "
                           "(e.g. `streamrec demo`) before measuring models on real requests")
    rng = np.random.default_rng(seed)
    items = [catalog[i] for i in rng.choice(len(catalog), size=min(n, len(catalog)),
                                            replace=False)]
    user = user or _newest_user(settings) or "probe-user"
    reader = OnlineFeatureReader(settings)
    entities = {"user_id": [user] * len(items), "item_id": items}
    reader.read(RANKER_SERVICE, entities, full_feature_names=True)  # resolve the service
    started = time.perf_counter()
    features = reader.read(RANKER_SERVICE, entities, full_feature_names=True)
    read_s = time.perf_counter() - started
    batch = RankingBatch.for_request(user, items, features, ts_s=time.time(), device="mobile")
    return batch, read_s


def _newest_user(settings: Settings) -> str | None:
    from training.labels import event_log_end, read_event_log

    end = event_log_end(settings)
    if end is None:
        return None
    log = read_event_log(settings, end - timedelta(hours=1), end)
    return str(log["user_id"][-1]) if log.num_rows else None


# --- measuring in a child -----------------------------------------------------------------


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_reset() -> int | None:
    """Reset the peak-RSS mark (Linux); return the current RSS in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _rss_kb("VmRSS")


def _measure(load: Callable[[], Any], score: Callable[[Any], Any], repeats: int) -> dict:
    """Load and score ``repeats`` times; timings and the peak-RSS rise (this process)."""
    base = _peak_reset()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load()
    score(model)  # warm-up: lazy initialisation, caches
    times = np.empty(repeats)
    for r in range(repeats):
        started = time.perf_counter()
        score(model)
        times[r] = time.perf_counter() - started
    peak = _rss_kb("VmHWM") if base is not None else None
    if peak is not None and base is not None:
        peak_kb = peak - base
    else:  # without clear_refs: the rise of the lifetime peak (0 when it was higher before)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss
    count = getattr(model, "param_count", None)
    return {
        "p50_ms": float(np.percentile(times, 50) * 1000),
        "p99_ms": float(np.percentile(times, 99) * 1000),
        "peak_mb": max(peak_kb, 0) / 1024,
        "params": int(count) if count is not None else None,
    }


def _in_child(job: Callable[[], dict]) -> dict:
    """Run ``job`` in a forked child (its own heap and peak RSS); its result or its error."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe(duplex=False)

    def run() -> None:
        try:
            child.send(job())
        except BaseException as exc:  # report any failure to the parent instead of dying
            child.send({"error": f"{type(exc).__name__}: {exc}"})

    process = context.Process(target=run, daemon=True)
    process.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": "the measuring process died"}
    process.join()
    return result


def _model_job(registry: ModelRegistry, version: ModelVersion, batch: RankingBatch,
               repeats: int, threads: int) -> Callable[[], dict]:
    def job() -> dict:
        module, _, name = KINDS[version.kind].partition(":")
        cls = getattr(importlib.import_module(module), name)
        if version.kind == "ranker":
            import torch

            torch.set_num_threads(threads)

            def score(model: Any) -> Any:
                with torch.inference_mode():
                    return model.score(batch)
        else:
            def score(model: Any) -> Any:
                return model.score(batch)

        return _measure(lambda: cls.load(registry.open(version.kind, version.version)),
                        score, repeats)

    return job


# --- baselines ----------------------------------------------------------------------------


def _baseline_job(name: str, data: Interactions, user: str, repeats: int) -> Callable[[], dict]:
    def job() -> dict:
        from training.baselines import CoVisitation, Popularity
        from training.evaluation import Queries

        cls = Popularity if name == "popularity" else CoVisitation
        started = time.perf_counter()
        fitted = cls().fit(data)
        train_s = time.perf_counter() - started
        users = list(data.users)
        u = users.index(user) if user in users else 0
        history = data.item[data.user == u][-50:].astype(np.int64)
        query = Queries(
            catalog=data.catalog, user=np.array([u]),
            indptr=np.array([0, history.size]), history=history,
            history_ts=data.ts[data.user == u][-50:], target=np.zeros(1, dtype=np.int64),
            ts=np.array([time.time()]), context={},
        )
        result = _measure(lambda: fitted, lambda m: m.score(query), repeats)
        params = (fitted.counts.size if name == "popularity" else fitted.matrix.nnz)
        return {**result, "params": int(params), "train_s": train_s}

    return job


def _baseline_interactions(settings: Settings, window: Mapping[str, Any]) -> Interactions | None:
    from training.holdout import interactions_from_log
    from training.labels import read_event_log

    try:
        start = datetime.fromisoformat(str(window["start"]))
        end = datetime.fromisoformat(str(window["end"]))
    except (KeyError, ValueError):
        return None
    log = read_event_log(settings, start.astimezone(UTC), end.astimezone(UTC))
    return interactions_from_log(log) if log.num_rows else None


# --- the report ---------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def cost_performance(
    settings: Settings,
    *,
    repeats: int = 200,
    user: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[CostRow], dict[str, Any]]:
    """Measure every registered version and the baselines (module docs).

    Returns the rows and facts about the probe (user, candidates, feature read time).
    """
    from training.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    batch, read_s = probe_batch(settings, user=user)
    user = str(batch.user_ids[0]) if len(batch) else ""
    log(f"probe: user {user}, {len(batch)} candidates, features read in {read_s * 1000:.1f} ms")
    threads = max(1, settings.torch_threads or 1)
    rows: list[CostRow] = []
    newest_ranker: ModelVersion | None = None
    for kind in KINDS:
        champion = registry.champion(kind)
        for version in registry.versions(kind):
            log(f"measuring {kind} {version.version}")
            got = _in_child(_model_job(registry, version, batch, repeats, threads))
            if "error" in got:
                log(f"  skipped: {got['error']}")
                continue
            metrics = version.metrics
            if kind == "ranker":
                newest_ranker = version
                quality = "holdout"
                ndcg, auc = _num(metrics.get("ndcg@10")), _num(metrics.get("auc"))
                train_s = _num(metrics.get("train_seconds"))
            else:
                quality = "progressive"
                ndcg, auc = None, _num(metrics.get("rolling_auc"))
                train_s = _num(metrics.get("learn_seconds"))
            rows.append(CostRow(
                name=f"{kind} {version.version}", kind=kind, version=version.version,
                champion=champion is not None and champion.version == version.version,
                ndcg_at_10=ndcg, auc=auc, quality=quality, train_s=train_s,
                p50_ms=got["p50_ms"], p99_ms=got["p99_ms"], params=got["params"],
                peak_mb=got["peak_mb"],
            ))
    if newest_ranker is not None:
        holdout = newest_ranker.metrics.get("holdout", {})
        data = _baseline_interactions(settings, newest_ranker.manifest.get("data_window", {}))
        for name in BASELINES:
            quality_of = holdout.get(name, {})
            got = (_in_child(_baseline_job(name, data, user, repeats)) if data is not None
                   else {"error": "no event log for the window"})
            if "error" in got:
                log(f"baseline {name}: cost not measured ({got['error']})")
                got = {}
            rows.append(CostRow(
                name=name, kind="baseline", version=None, champion=False,
                ndcg_at_10=_num(quality_of.get("ndcg@10")), auc=_num(quality_of.get("auc")),
                quality=f"holdout of ranker {newest_ranker.version}",
                train_s=got.get("train_s"), p50_ms=got.get("p50_ms"), p99_ms=got.get("p99_ms"),
                params=got.get("params"), peak_mb=got.get("peak_mb"),
            ))
    probe = {"user": user, "candidates": len(batch),
             "feature_read_ms": round(read_s * 1000, 3), "repeats": repeats}
    return rows, probe


def _cell(value: float | int | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(rows: Sequence[CostRow], probe: Mapping[str, Any]) -> str:
    """The report as Markdown: a table and how it was measured."""
    head = ("| model | champion | NDCG@10 | AUC | quality from | train s | p50 ms | p99 ms "
            "| params | peak MB |")
    lines = [
        "# Cost-performance report",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}. Latency: one real request of user "
        f"`{probe['user']}` with {probe['candidates']} candidates (features read from the "
        f"online store once, in {probe['feature_read_ms']:.1f} ms), scored {probe['repeats']} "
        "times per model. Peak MB: rise of the peak resident set while loading and scoring.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {'✓' if r.champion else ''} | {_cell(r.ndcg_at_10, '.4f')} "
            f"| {_cell(r.auc, '.4f')} | {r.quality} | {_cell(r.train_s, '.1f')} "
            f"| {_cell(r.p50_ms, '.2f')} | {_cell(r.p99_ms, '.2f')} "
            f"| {_cell(r.params, ',')} | {_cell(r.peak_mb, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[CostRow], path: Path) -> None:
    """Quality against p99 latency (log scale); point area grows with the parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ranker": "tab:blue", "online": "tab:orange", "baseline": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (metric, label) in zip(axes, [("auc", "AUC"), ("ndcg_at_10", "NDCG@10")],
                                   strict=True):
        shown = [r for r in rows if getattr(r, metric) is not None and r.p99_ms]
        for kind, color in colors.items():
            part = [r for r in shown if r.kind == kind]
            if not part:
                continue
            ax.scatter(
                [r.p99_ms for r in part], [getattr(r, metric) for r in part],
                s=[30 + 25 * math.log10(1 + (r.params or 0)) ** 2 for r in part],
                c=color, alpha=0.6, edgecolors="black", linewidths=0.5, label=kind,
            )
            for r in part:
                if r.kind == "online" and not r.champion:
                    continue  # snapshots crowd each other; the colour tells what they are
                tag = r.name if r.kind == "baseline" else f"{r.kind} {r.version.split('-')[0]}"
                ax.annotate(tag + (" *" if r.champion else ""), (r.p99_ms, getattr(r, metric)),
                            textcoords="offset points", xytext=(7, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(f"p99 inference latency, {CANDIDATES} candidates (ms, log scale)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs latency (area ~ parameters; * champion)")
        ax.grid(True, which="both", alpha=0.3)
        if shown:
            legend = ax.legend(loc="best", fontsize=8)
            for handle in legend.legend_handles:
                handle.set_sizes([40])
        else:
            ax.text(0.5, 0.5, f"no model reports {label}", ha="center", va="center",
                    transform=ax.transAxes)
    fig.text(0.01, 0.01, "ranker and baselines: per-request AUC / NDCG@10 on the ranker's "
             "temporal holdout; online: progressive rolling AUC of the learner (pooled over "
             "slots)", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(settings: Settings, rows: Sequence[CostRow],
                 probe: Mapping[str, Any]) -> tuple[Path, Path]:
    """``<home>/reports/cps.md`` and ``cps.png``."""
    folder = settings.home / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    md, png = folder / "cps.md", folder / "cps.png"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(rows, probe))
    os.replace(tmp, md)
    plot(rows, png)
    return md, png


def _log(message: str) -> None:
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


@report_app.command("cps")
def report_cps(
    repeats: Annotated[int, typer.Option(min=10, help="Scorings per model (p99 needs ~100+).")]
    = 200,
    user: Annotated[str | None, typer.Option(help="User of the probe request (default: the "
                                                  "newest event's user).")] = None,
) -> None:
    """Quality vs cost of every model version and baseline: Markdown table + PNG plot."""
    settings = get_settings()
    started = time.perf_counter()
    try:
        rows, probe = cost_performance(settings, repeats=repeats, user=user, log=_log)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    md, png = write_report(settings, rows, probe)
    typer.echo(md.read_text())
    typer.echo(json.dumps({
        "markdown": str(md),
        "png": str(png),
        **{f"probe_{k}": v for k, v in probe.items()},
        "models": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in rows},
        "total_s": round(time.perf_counter() - started, 1),
    }))
