"""The models being served, and the watcher that swaps in newly promoted champions.

Two kinds score candidates: the ``ranker`` (PyTorch, retrained periodically) and the
``online`` model (River, re-snapshotted as it learns). :class:`ModelWatcher` polls the
registry's champion pointers every ``serving_model_poll_s`` in a background thread; a new
champion is verified (:meth:`ModelRegistry.open` checks every file's sha256), loaded and
then published with a single reference assignment, so a request sees either the old model
or the new one, never a half-loaded state, and nothing is loaded on the request path.

A version that fails verification (tampered) is refused for good: the old model stays,
the refusal is logged and counted. A version that fails to *load* is retried after a
while. Until a kind has a champion — or while its code is not installed — it is simply
absent, and requests fall back (``degraded``).

Examples
--------
>>> import numpy as np
>>> class Constant:
...     def score(self, batch): return np.full(len(batch), 0.5)
>>> models = ServedModels()
>>> models.get("ranker") is None
True
>>> models.publish(LoadedModel("ranker", "v0001-20260101T000000Z", Constant()))
>>> models.versions()
{'ranker': 'v0001-20260101T000000Z', 'online': None}
"""

from __future__ import annotations

import gc
import importlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from serving.metrics import ServingMetrics
from streamrec.settings import Settings

if TYPE_CHECKING:
    from training.ranking_batch import RankingBatch

__all__ = ["KINDS", "LoadedModel", "ModelWatcher", "Scorer", "ServedModels", "settle_heap"]

log = logging.getLogger(__name__)

KINDS = ("ranker", "online")

_LOADERS: dict[str, tuple[str, str]] = {
    "ranker": ("training.context_ranker", "ContextRanker"),
    "online": ("training.online_model", "OnlineModel"),
}
"""Kind → (module, class with ``load(folder)``), imported only when a champion exists."""

_RETRY_FAILED_S = 60.0


class Scorer(Protocol):
    """What serving needs of a model: probabilities for a batch of candidates."""

    def score(self, batch: RankingBatch) -> np.ndarray: ...


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score, with the registry version it came from."""

    kind: str
    version: str
    model: Scorer


class ServedModels:
    """The current model of each kind; :meth:`publish` replaces one atomically."""

    def __init__(self) -> None:
        self._current: Mapping[str, LoadedModel | None] = dict.fromkeys(KINDS)
        self._lock = threading.Lock()

    def get(self, kind: str) -> LoadedModel | None:
        return self._current[kind]

    def snapshot(self) -> Mapping[str, LoadedModel | None]:
        """Every kind at one instant: a request scores with one consistent pair."""
        return self._current

    def publish(self, model: LoadedModel) -> None:
        with self._lock:
            # A new mapping, never a mutation: readers holding the old one keep it whole.
            self._current = {**self._current, model.kind: model}

    def versions(self) -> dict[str, str | None]:
        current = self._current
        return {kind: m.version if m is not None else None for kind, m in current.items()}


def settle_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's sight.

    An API process holds ~400,000 long-lived objects (torch, Feast, pandas, the models).
    Every full collection walks all of them: a pause of ~200 ms every few seconds under
    load, ~0.6 ms per request on average, and a p99 spike. Frozen (``gc.freeze``), they
    are never walked again; a request's own garbage is still collected, and frozen objects
    are still freed when nothing refers to them. The collection before freezing pauses once
    (~200 ms), so it runs when a kind of model is first served, not on every reload.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _load(kind: str, folder: Path, settings: Settings) -> Scorer:
    module_name, class_name = _LOADERS[kind]
    if kind == "ranker":
        import torch

        # Requests score concurrently: one thread each rather than all cores per call.
        torch.set_num_threads(settings.serving_torch_threads)
    model: Scorer = getattr(importlib.import_module(module_name), class_name).load(folder)
    return model


class ModelWatcher:
    """Polls the registry and publishes new champions into :class:`ServedModels`.

    Parameters
    ----------
    settings
        Home (the registry is ``<home>/models``) and the poll interval.
    models
        Where loaded champions are published.
    metrics
        ``streamrec_api_model_reloads_total`` and ``streamrec_api_model_info``.
    """

    def __init__(self, settings: Settings, models: ServedModels, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.refused: dict[str, str] = {}
        """``kind/version`` → why it was refused (tampered)."""
        self.problems: dict[str, str] = {}
        """Kind → why its champion is not being served (for ``/readyz``)."""
        self._failed_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._polled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamrec-model-watcher",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_polled(self, timeout: float) -> bool:
        """Block until the first poll finished."""
        return self._polled.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._polled.set()
            self._stop.wait(self.settings.serving_model_poll_s)

    def poll(self) -> None:
        """Check each kind's champion once; load and publish it if it is new."""
        try:
            from training.registry import ModelRegistry
        except ImportError as exc:
            for kind in KINDS:
                self.problems[kind] = f"model registry unavailable: {exc}"
            return
        registry = ModelRegistry.from_settings(self.settings)
        for kind in KINDS:
            try:
                self._poll_kind(registry, kind)
            except Exception as exc:  # the watcher must outlive any registry surprise
                log.exception("checking the %s champion failed", kind)
                self.problems[kind] = f"registry error: {exc}"

    def _poll_kind(self, registry: Any, kind: str) -> None:
        from training.registry import TamperedModelError

        champion = registry.champion(kind)
        served = self.models.get(kind)
        if champion is None:
            if served is None:
                self.problems[kind] = f"no {kind} champion in the registry yet"
            return
        version = champion.version
        if served is not None and served.version == version:
            return
        name = f"{kind}/{version}"
        if name in self.refused:
            return
        failed = self._failed_at.get(name)
        if failed is not None and time.monotonic() - failed < _RETRY_FAILED_S:
            return
        try:
            folder = registry.open(kind, version)
            model = _load(kind, folder, self.settings)
        except TamperedModelError as exc:
            self.refused[name] = str(exc)
            self.metrics.model_reloads.labels(kind=kind, outcome="refused").inc()
            log.error("refusing %s: %s (still serving %s)", name, exc,
                      served.version if served else "nothing")
            if served is None:
                self.problems[kind] = f"champion {version} refused: {exc}"
            return
        except Exception as exc:
            self._failed_at[name] = time.monotonic()
            self.metrics.model_reloads.labels(kind=kind, outcome="failed").inc()
            log.warning("cannot load %s (%s: %s); retrying in %.0fs", name,
                        type(exc).__name__, exc, _RETRY_FAILED_S)
            if served is None:
                self.problems[kind] = f"champion {version} failed to load: {exc}"
            return
        self.models.publish(LoadedModel(kind, version, model))
        if served is None:
            settle_heap()
        else:
            self.metrics.model_info.remove(kind, served.version)
        self.metrics.model_info.labels(kind=kind, version=version).set(1)
        self.metrics.model_reloads.labels(kind=kind, outcome="loaded").inc()
        self.problems.pop(kind, None)
        log.info("serving %s %s (was %s)", kind, version, served.version if served else "none")
