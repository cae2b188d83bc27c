"""Periodic retraining of the context ranker, promoted only when it beats the champion.

One run (:func:`train_once`, ``streamrec train``):

1. **Window.** The labelled window ends at the newest archived event minus the attribution
   window and the allowed lateness (floored to the hour), so every example in it is final,
   and starts ``STREAMREC_TRAIN_WINDOW_DAYS`` (``--window-days``) earlier.
2. **Labels.** :func:`~training.labels.label_event_log` labels the window's impressions
   into the labelled-examples table (idempotent per hour).
3. **Training set.** :func:`~training.dataset.training_set`: Feast point-in-time features
   for every example.
4. **Holdout.** The newest ``STREAMREC_TRAIN_HOLDOUT_FRACTION`` of the requests is held out
   (:func:`~training.holdout.temporal_split`); a :class:`~training.context_ranker.ContextRanker`
   candidate is fitted on the rest.
5. **Gate.** Candidate, current champion (loaded through the registry, checksums verified)
   and the popularity and co-visitation baselines are evaluated on the *same* holdout.
   The candidate is registered (manifest: its holdout metrics, every model's metrics,
   data window, features, hyper-parameters) and promoted only if its promotion metric
   beats the champion's by more than the tolerance (``--tolerance``,
   ``STREAMREC_TRAIN_PROMOTION_TOLERANCE``). Without a champion (first run, or a champion
   whose files fail the checksum) it must beat popularity instead.

The promotion metric is NDCG@10 per request by default (``STREAMREC_TRAIN_PROMOTION_METRIC``,
``auc`` possible): serving shows the top of its ranking, and NDCG@10 weighs exactly the
order there, while AUC counts a swap at rank 150 as much as one at rank 1.

``--every 1h`` repeats runs on that period, with progress on stderr and one JSON line per
run on stdout; a failed run is reported and the loop carries on.

Drift-triggered runs
    The online learner writes a retrain request (``<home>/state/retrain-requested``, see
    :mod:`streaming.learner`) when ADWIN sees its loss drift. Between scheduled runs the
    loop polls for it every ``STREAMREC_TRAIN_RETRAIN_POLL_S`` seconds and starts a run at
    once when it appears; a run that starts with a request pending (early or on schedule,
    and a single ``streamrec train``) answers it. Such a run records ``"trigger":
    "drift"`` and the request in its JSON line and in the manifest's ``data_window``
    (otherwise ``"trigger": "schedule"``). When the run finishes, promoted or not, the
    request is consumed (:func:`consume_retrain_request`): removed only if it is still the
    one the run answered, so a newer drift that arrived meanwhile stays pending and
    triggers the next run. A failed run leaves it pending; the loop then waits for the
    schedule (or a newer request) instead of retrying at once.

Examples
--------
>>> parse_period("90m"), parse_period("2d"), parse_period("45")
(5400.0, 172800.0, 45.0)
>>> promotion_decision({"candidate": {"ndcg@10": 0.61}, "champion": {"ndcg@10": 0.60}},
...                    metric="ndcg@10", tolerance=0.002).promote
True
>>> promotion_decision({"candidate": {"ndcg@10": 0.601}, "champion": {"ndcg@10": 0.60}},
...                    metric="ndcg@10", tolerance=0.002).reason
'candidate ndcg@10 0.6010 does not beat champion 0.6000 by more than 0.002'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from streamrec.settings import Settings, get_settings

__all__ = [
    "KIND",
    "Decision",
    "TrainReport",
    "consume_retrain_request",
    "gate",
    "parse_period",
    "promotion_decision",
    "run_loop",
    "train_command",
    "train_once",
]

KIND = "ranker"
"""Registry kind of the context ranker."""

Progress = Callable[[str], None]

_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}

if TYPE_CHECKING:  # torch and friends load lazily: `streamrec --help` stays fast
    from training.context_ranker import ContextRanker, ContextRankerConfig
    from training.dataset import TrainingSet
    from training.holdout import Holdout
    from training.registry import ModelRegistry


def parse_period(text: str) -> float:
    """Seconds of a period like ``"1h"``, ``"30m"``, ``"45s"``, ``"2d"`` or ``"90"``."""
    match = _PERIOD.match(text)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"not a period: {text!r} (use e.g. 30m, 1h, 2d)")
    return float(match[1]) * _UNIT_S[match[2]]


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and why (recorded in the run's report)."""

    promote: bool
    reason: str


def promotion_decision(
    metrics: Mapping[str, Mapping[str, float]], *, metric: str, tolerance: float
) -> Decision:
    """The gate: ``metrics`` holds ``candidate`` and, when there is one, ``champion`` (else
    ``popularity``), all measured on one holdout."""
    candidate = metrics["candidate"].get(metric, math.nan)
    if not math.isfinite(candidate):
        return Decision(False, f"candidate {metric} is not a number ({candidate})")
    if "champion" in metrics:
        champion = metrics["champion"][metric]
        if candidate > champion + tolerance:
            return Decision(
                True, f"candidate {metric} {candidate:.4f} beats champion {champion:.4f} "
                f"by more than {tolerance:g}"
            )
        return Decision(
            False, f"candidate {metric} {candidate:.4f} does not beat champion "
            f"{champion:.4f} by more than {tolerance:g}"
        )
    baseline = metrics.get("popularity", {}).get(metric, -math.inf)
    if candidate > baseline:
        return Decision(
            True, f"no champion; candidate {metric} {candidate:.4f} beats popularity "
            f"{baseline:.4f}"
        )
    return Decision(
        False, f"no champion, and candidate {metric} {candidate:.4f} does not beat "
        f"popularity {baseline:.4f}"
    )


@dataclass(frozen=True)
class TrainReport:
    """What one run did (printed as JSON by ``streamrec train``)."""

    version: str
    promoted: bool
    reason: str
    champion: str | None
    """The champion after the run."""
    metrics: dict[str, dict[str, float]]
    data_window: dict[str, Any]
    train_rows: int
    holdout_rows: int
    train_seconds: float
    total_seconds: float
    trigger: str = "schedule"
    """``"drift"`` when the run answered the online learner's retrain request."""
    retrain_request: dict[str, Any] | None = None
    """That request, as the learner wrote it."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)


def _round(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {m: {k: round(v, 6) for k, v in values.items()} for m, values in metrics.items()}


def gate(
    registry: ModelRegistry,
    holdout: Holdout,
    candidate: ContextRanker,
    *,
    metric: str,
    tolerance: float,
    data_window: Mapping[str, Any],
    features: list[str],
    progress: Progress | None = None,
    started: float | None = None,
    request: Mapping[str, Any] | None = None,
) -> TrainReport:
    """Evaluate ``candidate`` against the champion on ``holdout``, register it, and promote
    it if it passes :func:`promotion_decision`.

    ``request`` is the drift retrain request the run answers, if any: the manifest's
    ``data_window`` and the report record it with ``trigger="drift"``.
    """
    from training.context_ranker import ContextRanker
    from training.holdout import evaluate_holdout
    from training.registry import RegistryError

    say = progress or (lambda _: None)
    started = time.perf_counter() if started is None else started
    trigger = "schedule" if request is None else "drift"
    data_window = {**data_window, "trigger": trigger}
    if request is not None:
        data_window["retrain_request"] = dict(request)
    models: dict[str, Any] = {"candidate": candidate}
    current = registry.champion(KIND)
    refused = ""
    if current is not None:
        try:
            models["champion"] = ContextRanker.load(registry.open(KIND, current.version))
        except (RegistryError, ValueError, OSError) as exc:
            refused = f"champion {current.version} unusable ({exc}); "
            say(f"cannot use the champion: {exc}")
    say(f"evaluating {', '.join(models)} and baselines on {len(holdout.test):,} held-out rows")
    metrics = evaluate_holdout(holdout, models)
    decision = promotion_decision(metrics, metric=metric, tolerance=tolerance)
    with tempfile.TemporaryDirectory() as folder:
        candidate.save(folder)
        version = registry.register(
            KIND,
            Path(folder),
            metrics={
                **{k: round(v, 6) for k, v in metrics["candidate"].items()},
                "train_seconds": round(candidate.train_seconds, 3),
                "train_rows": candidate.train_rows,
                "params": candidate.param_count,
                "holdout": _round(metrics),
            },
            data_window=dict(data_window),
            features=features,
            params=asdict(candidate.config),
        )
    if decision.promote:
        registry.promote(KIND, version.version)
    champion = registry.champion(KIND)
    say(f"registered {version.version}: {'PROMOTED' if decision.promote else 'kept'} "
        f"({decision.reason})")
    return TrainReport(
        version=version.version,
        promoted=decision.promote,
        reason=refused + decision.reason,
        champion=champion.version if champion else None,
        metrics=_round(metrics),
        data_window=dict(data_window),
        train_rows=len(holdout.train),
        holdout_rows=len(holdout.test),
        train_seconds=round(candidate.train_seconds, 3),
        total_seconds=round(time.perf_counter() - started, 3),
        trigger=trigger,
        retrain_request=None if request is None else dict(request),
    )


def bootstrap_online(
    settings: Settings, registry: ModelRegistry, data: TrainingSet
) -> str | None:
    """A first online model when the registry has none: the champion version, else ``None``.

    The River model learns from every labelled impression, but a new deployment has none
    yet, and serving flags every answer without it as degraded until the learner's first
    snapshot. So a run that finds no online champion teaches a fresh model the newest
    ``train_online_bootstrap_rows`` of its labelled examples, in time order, registers and
    promotes it; the learner then resumes from it. An existing champion is never replaced:
    it is the learner's.
    """
    import numpy as np

    from training.online_model import KIND, OnlineModel, register_snapshot

    if registry.champion(KIND) is not None or not len(data) or not (
        limit := settings.train_online_bootstrap_rows
    ):
        return None
    newest = np.argsort(data.batch.ts_s, kind="stable")[-limit:]
    rows = data.take(newest)
    model = OnlineModel()
    model.learn(rows.batch, rows.labels > 0.5)
    first, last = float(rows.batch.ts_s[0]), float(rows.batch.ts_s[-1])
    window = {
        "start": datetime.fromtimestamp(first, UTC).isoformat(),
        "end": datetime.fromtimestamp(last, UTC).isoformat(),
        "start_s": first,
        "end_s": last,
        "examples": model.examples,
        "bootstrap": True,
    }
    return register_snapshot(registry, model, window, settings.home / "state")


def train_once(
    settings: Settings,
    *,
    window_days: float | None = None,
    tolerance: float | None = None,
    config: ContextRankerConfig | None = None,
    progress: Progress | None = None,
    request: Mapping[str, Any] | None = None,
) -> TrainReport:
    """One retraining run over the latest complete window (module docs); ``request`` is
    the drift retrain request it answers (see :func:`gate`)."""
    import torch

    from features.store import feature_store
    from training.context_ranker import ContextRanker
    from training.dataset import service_views, training_set
    from training.holdout import Holdout, interactions_from_log, temporal_split
    from training.labels import (
        event_log_end,
        label_event_log,
        read_event_log,
        read_labelled_examples,
    )
    from training.registry import ModelRegistry

    say = progress or (lambda _: None)
    started = time.perf_counter()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    log_end = event_log_end(settings)
    if log_end is None:
        raise RuntimeError(f"the event log under {settings.home / 'offline'} is empty")
    horizon = timedelta(
        seconds=settings.label_attribution_window_s + settings.feature_allowed_lateness_s
    )
    end = (log_end - horizon).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(days=window_days or settings.train_window_days)
    say(f"labelling {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} (log ends {log_end:%H:%M:%S})")
    label_event_log(settings, start, end)
    examples = read_labelled_examples(settings, start, end)
    if not examples.num_rows:
        raise RuntimeError(f"no labelled examples in {start} .. {end}")
    say(f"{examples.num_rows:,} labelled examples; point-in-time features ...")
    store = feature_store(settings)
    data = training_set(settings, examples, store=store, progress=say)
    train, test, cut = temporal_split(data, settings.train_holdout_fraction)
    say(f"training on {len(train):,} rows before {cut:%Y-%m-%d %H:%M}, holding out {len(test):,}")
    candidate = ContextRanker(config).fit(
        train.batch,
        train.labels,
        on_epoch=lambda e: say(
            f"epoch {e.epoch}: loss {e.loss:.4f}, valid {e.valid_loss:.4f} ({e.seconds:.0f}s)"
            + (" *" if e.best else "")
        ),
    )
    candidates = data.examples["item_id"].astype(str).unique()
    interactions = interactions_from_log(read_event_log(settings, start, end), candidates)
    window = {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "holdout_from": cut.astimezone(UTC).isoformat(),
        "examples": len(data),
        "sampled": bool(data.examples["sampled"].any()) if "sampled" in data.examples else False,
    }
    features = [c for spec in service_views(store) for c in spec.columns]
    registry = ModelRegistry.from_settings(settings)
    online = bootstrap_online(settings, registry, data)
    if online is not None:
        say(f"no online model yet: registered and promoted {online}, learnt from the "
            f"newest {settings.train_online_bootstrap_rows:,} labelled examples at most")
    return gate(
        registry,
        Holdout(train, test, interactions, cut),
        candidate,
        metric=settings.train_promotion_metric,
        tolerance=settings.train_promotion_tolerance if tolerance is None else tolerance,
        data_window=window,
        features=features,
        progress=say,
        started=started,
        request=request,
    )


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def consume_retrain_request(settings: Settings, request: Mapping[str, Any]) -> bool:
    """Remove the pending retrain request if it is still ``request``; ``True`` if removed.

    The file is first renamed away (atomic), so the learner's next request, written to
    the usual path, can never be deleted by mistake: when what was taken is not
    ``request`` (a newer drift replaced it during the run), it is linked back, unless an
    even newer one already took its place.

    Examples
    --------
    >>> import json, tempfile
    >>> from streaming.learner import read_retrain_request, retrain_request_path
    >>> settings = Settings(home=tempfile.mkdtemp())
    >>> path = retrain_request_path(settings)
    >>> path.parent.mkdir(parents=True)
    >>> _ = path.write_text(json.dumps({"requested_at": "10:00", "reason": "drift"}))
    >>> consume_retrain_request(settings, {"requested_at": "09:00", "reason": "drift"})
    False
    >>> read_retrain_request(settings)["requested_at"]  # the newer request stays
    '10:00'
    >>> consume_retrain_request(settings, {"requested_at": "10:00", "reason": "drift"})
    True
    >>> read_retrain_request(settings) is None
    True
    """
    from streaming.learner import retrain_request_path

    path = retrain_request_path(settings)
    taken = path.with_name(f".{path.name}.{uuid.uuid4().hex}.consumed")
    try:
        os.replace(path, taken)
    except FileNotFoundError:
        return False
    try:
        try:
            same = json.loads(taken.read_text()) == dict(request)
        except ValueError:
            same = False
        if not same:
            with contextlib.suppress(FileExistsError):
                os.link(taken, path)
        return same
    finally:
        taken.unlink()


def _pending_request(settings: Settings) -> dict[str, Any] | None:
    from streaming.learner import read_retrain_request

    try:
        return read_retrain_request(settings)
    except ValueError:  # the learner replaces it atomically: only a foreign write gets here
        _log("ignoring an unreadable retrain request")
        return None


def run_loop(
    settings: Settings,
    train: Callable[[Mapping[str, Any] | None], TrainReport],
    *,
    period: float | None,
    max_runs: int | None = None,
    progress: Progress = _log,
) -> int:
    """Run ``train`` now and then every ``period`` seconds, early on a drift request.

    Parameters
    ----------
    settings
        Home (where the retrain request lives) and the poll period
        (``train_retrain_poll_s``).
    train
        One run; receives the pending retrain request (``None`` on a plain schedule).
    period
        Seconds from the start of one run to the next; ``None`` runs once.
    max_runs
        Stop after this many runs (default: never, with a period).
    progress
        Receives progress lines.

    Returns
    -------
    How many runs failed. Each run prints one JSON line on stdout (the
    :class:`TrainReport`, or the error).
    """
    runs = failures = 0
    failed_request: dict[str, Any] | None = None
    while True:
        started = time.monotonic()
        runs += 1
        request = _pending_request(settings)
        if request is not None:
            progress(f"run {runs} answers the retrain request of {request.get('requested_at')}")
        try:
            report = train(request)
        except Exception as exc:
            failures += 1
            failed_request = request
            progress(f"training failed: {type(exc).__name__}: {exc}" if period is None
                     else f"run {runs} failed; the loop carries on:\n{traceback.format_exc()}")
            print(json.dumps({"run": runs, "error": f"{type(exc).__name__}: {exc}"}),
                  flush=True)
        else:
            print(report.to_json(), flush=True)
            if request is not None and consume_retrain_request(settings, request):
                progress("retrain request consumed")
        if period is None or (max_runs is not None and runs >= max_runs):
            return failures
        due = started + period
        progress(f"next run in {max(0.0, due - time.monotonic()) / 60:.1f} min, or on drift")
        while (left := due - time.monotonic()) > 0:
            pending = _pending_request(settings)
            if pending is not None and pending != failed_request:
                progress("drift: the online learner requested a retrain; starting now")
                break
            time.sleep(min(settings.train_retrain_poll_s, left))


def train_command(
    every: Annotated[
        str | None,
        typer.Option(help="Repeat on this period (30m, 1h, 1d), and early when the online "
                          "learner requests a retrain; default: run once."),
    ] = None,
    window_days: Annotated[
        float | None,
        typer.Option(min=0.001, help="Days of labelled examples (default "
                                     "STREAMREC_TRAIN_WINDOW_DAYS)."),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(min=0.0, help="Promote only when beating the champion by more than "
                                   "this (default STREAMREC_TRAIN_PROMOTION_TOLERANCE)."),
    ] = None,
) -> None:
    """Retrain the ranker on the latest window; promote it only if it beats the champion."""
    settings = get_settings()
    try:
        period = parse_period(every) if every is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--every") from None

    def train(request: Mapping[str, Any] | None) -> TrainReport:
        return train_once(settings, window_days=window_days, tolerance=tolerance,
                          progress=_log, request=request)

    if run_loop(settings, train, period=period) and period is None:
        raise typer.Exit(1)
