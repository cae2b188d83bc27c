"""Everything a recommendation needs that outlives a request, started and stopped together.

:class:`ServingRuntime` owns the online-store access, the catalog and its indexes, the
trending feed, the served models and the impression log; ``create_app``'s lifespan starts
it and closes it. Nothing here blocks start-up: each dependency connects in the background
and the API answers (degraded) until it is there, which is what ``/readyz`` reports.

:class:`FeatureAccess` is the door to the online store. ``OnlineFeatureReader`` already
reads Feast's own storage several times faster than ``get_online_features``; this adds a
circuit breaker: after a failure, reads are skipped for ``serving_store_retry_s`` so an
unreachable store costs one failed attempt per interval rather than a timeout per request.

Examples
--------
>>> import tempfile
>>> settings = Settings(home=tempfile.mkdtemp())
>>> access = FeatureAccess(settings)
>>> try:
...     access.read(["user_realtime:recent_items"], {"user_id": ["u1"]})
... except StoreUnavailable as exc:
...     print("unavailable:", type(exc.__cause__).__name__)
unavailable: FeatureViewNotFoundException
>>> access.available()
False
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from feast.types import Float32, Float64, Int32, Int64

from features.packed import PACKED, PackedView
from features.store import OnlineFeatureReader
from serving.catalog import CatalogRefresher
from serving.feature_cache import NearCache, NumericNearCache
from serving.feed import EventFeed
from serving.foreground import Foreground
from serving.impressions import ImpressionLog
from serving.metrics import ServingMetrics
from serving.models import KINDS, ModelWatcher, ServedModels
from serving.trending import RecentPurchases, TrendingCounts
from streamrec.settings import Settings

__all__ = ["Admission", "FeatureAccess", "ServingRuntime", "StoreUnavailable"]

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The online store could not be read (or is being skipped after a failure)."""


class FeatureAccess:
    """``OnlineFeatureReader`` behind a circuit breaker.

    Parameters
    ----------
    settings
        Home, online store choice and ``serving_store_retry_s``.

    The reader is created on first use (and again after a failure to create it), so the
    API starts before the feature repository is applied.
    """

    def __init__(self, settings: Settings, metrics: ServingMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.retry_s = settings.serving_store_retry_s
        self._reader: OnlineFeatureReader | None = None
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._services: dict[tuple[str, tuple[str, ...], str | None], list[str]] = {}
        self._caches: dict[tuple[str, ...], list[_Cached]] = {}
        self.last_error: str | None = None

    def available(self) -> bool:
        """False while the breaker is open (the last attempt failed recently)."""
        return time.monotonic() >= self._open_until

    def reader(self) -> OnlineFeatureReader:
        reader = self._reader
        if reader is None:
            with self._lock:
                if self._reader is None:
                    self._reader = OnlineFeatureReader(self.settings)
                reader = self._reader
        return reader

    def read(
        self,
        features: str | Sequence[str],
        entities: Mapping[str, Sequence[Any]],
        *,
        full_feature_names: bool = False,
    ) -> dict[str, list[Any]]:
        """``OnlineFeatureReader.read``, or :class:`StoreUnavailable`."""
        if not self.available():
            raise StoreUnavailable(f"skipping the online store after: {self.last_error}")
        try:
            rows = self.reader().read(features, entities, full_feature_names=full_feature_names)
        except Exception as exc:  # sqlite3, redis, Feast registry errors alike
            self.trip(exc)
            raise StoreUnavailable(str(exc)) from exc
        self.last_error = None
        return rows

    def service_features(
        self, service: str, *, without: Sequence[str] = (), join_key: str | None = None
    ) -> list[str]:
        """``view:feature`` references of a feature service minus the views ``without``
        and, given ``join_key``, of its views with that key only (resolved from the
        registry once); raises :class:`StoreUnavailable`."""
        key = (service, tuple(without), join_key)
        refs = self._services.get(key)
        if refs is None:
            try:
                reader = self.reader()
                projections = reader.store.get_feature_service(
                    service, allow_cache=True).feature_view_projections
                refs = [
                    f"{p.name}:{f.name}" for p in projections if p.name not in without
                    and (join_key is None or reader.join_key(p.name) == join_key)
                    for f in p.features
                ]
            except Exception as exc:  # no registry yet, or no such service
                self.trip(exc)
                raise StoreUnavailable(str(exc)) from exc
            self._services[key] = refs
        return refs

    def read_cached(self, features: Sequence[str], join_key: str,
                    keys: Sequence[Any]) -> dict[str, Sequence[Any]]:
        """``read(features, {join_key: keys}, full_feature_names=True)`` (feature columns
        only) through near caches: values of stream-fed views are reused for
        ``serving_item_features_max_age_ms``, of batch-computed views (which change when a
        Spark job materializes) for ``serving_batch_features_max_age_s``.

        A packed vector (:mod:`features.packed`) comes back as the columns of the view it
        packs. Where every feature of a cache is a number (or a packed vector), its
        columns are float64 arrays with NaN for no value (:class:`NumericNearCache`).
        """
        caches = self._caches.get(tuple(features))
        if caches is None:
            caches = self._caches[tuple(features)] = self._near_caches(features)
        columns: dict[str, Sequence[Any]] = {}
        read = 0
        for cached in caches:
            misses = cached.cache.misses
            columns.update(cached.read(keys, lambda missing, refs=cached.refs: self.read(
                refs, {join_key: missing}, full_feature_names=True)))
            read = max(read, cached.cache.misses - misses)
        if self.metrics is not None:
            self.metrics.item_features.labels(source="store").inc(read)
            self.metrics.item_features.labels(source="cache").inc(len(keys) - read)
        return columns

    def _near_caches(self, features: Sequence[str]) -> list[_Cached]:
        """One cache for the stream-fed views among ``features``, one for the others."""
        stream: list[str] = []
        batch: list[str] = []
        widths: dict[str, int] = {}  # numeric references → values each holds
        try:
            store = self.reader().store
            for ref in features:
                name, _, feature = ref.partition(":")
                view = store.get_feature_view(name, allow_registry_cache=True)
                (stream if view.stream_source is not None else batch).append(ref)
                packed = _PACKED_VECTORS.get(f"{name}__{feature}")
                if packed is not None:
                    widths[ref] = len(packed.columns)
                elif any(f.name == feature and f.dtype in _NUMBERS for f in view.features):
                    widths[ref] = 1
        except Exception as exc:  # no registry yet
            self.trip(exc)
            raise StoreUnavailable(str(exc)) from exc
        settings = self.settings
        return [
            _Cached.of(refs, max_age_s=age, numeric=all(ref in widths for ref in refs),
                       width=sum(widths.get(ref, 0) for ref in refs))
            for refs, age in ((stream, settings.serving_item_features_max_age_ms / 1000),
                              (batch, settings.serving_batch_features_max_age_s))
            if refs
        ]

    def trip(self, exc: Exception) -> None:
        """Open the breaker for ``retry_s`` after ``exc``."""
        first = self.available()
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._open_until = time.monotonic() + self.retry_s
        if first:
            log.warning("online store unavailable (%s); degrading for %.1fs",
                        self.last_error, self.retry_s)

    def probe(self) -> tuple[bool, str]:
        """Read one feature of one user now, ignoring the breaker: ``(ok, detail)``."""
        try:
            self.reader().read(["user_realtime:last_event_ts"], {"user_id": ["readyz"]})
        except Exception as exc:
            self.trip(exc)
            return False, f"{type(exc).__name__}: {exc}"
        self._open_until = 0.0
        self.last_error = None
        return True, f"{self.settings.online_store} online store answers"

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


_NUMBERS = (Int32, Int64, Float32, Float64)
_PACKED_VECTORS = {f"{packed.name}__{packed.feature}": packed for packed in PACKED.values()}
"""Full name of each packed vector → the view it packs."""


@dataclass(frozen=True)
class _Cached:
    """Feature references read together through one near cache, and the columns a read of
    them gives (full feature names; packed vectors as the columns they pack)."""

    refs: list[str]
    cache: NearCache | NumericNearCache
    columns: list[str]
    """What :meth:`read` returns, in order."""
    packed: dict[str, PackedView] = field(default_factory=dict)
    """Full name of each packed vector among ``refs`` → the view it packs."""

    @classmethod
    def of(cls, refs: list[str], *, max_age_s: float, numeric: bool, width: int) -> _Cached:
        names = [ref.replace(":", "__", 1) for ref in refs]
        packed = {name: _PACKED_VECTORS[name] for name in names if name in _PACKED_VECTORS}
        columns = [column for name in names
                   for column in (packed[name].columns if name in packed else [name])]
        cache = (NumericNearCache(width, max_age_s=max_age_s) if numeric
                 else NearCache(names, max_age_s=max_age_s))
        return cls(refs, cache, columns, packed)

    def read(self, keys: Sequence[Any], fetch: Callable[[list[Any]], Mapping[str, list[Any]]]
             ) -> dict[str, Sequence[Any]]:
        """The columns of ``keys`` through the cache; ``fetch`` reads ``refs`` from the
        store for the keys it lacks."""
        cache = self.cache
        if isinstance(cache, NumericNearCache):
            matrix = cache.read(keys, lambda missing: self._rows(fetch(missing)))
            return dict(zip(self.columns, np.ascontiguousarray(matrix.T), strict=True))
        columns: dict[str, Sequence[Any]] = dict(cache.read(keys, fetch))
        for name, packed in self.packed.items():
            columns.update(packed.unpack(columns.pop(name)))
        return columns

    def _rows(self, read: Mapping[str, list[Any]]) -> np.ndarray:
        """The values of a store read as a float matrix, one row per entity."""
        parts = []
        for ref in self.refs:
            name = ref.replace(":", "__", 1)
            packed = self.packed.get(name)
            values = read[name]
            parts.append(packed.rows(values) if packed is not None else np.array(
                [np.nan if v is None else v for v in values], dtype=np.float64)[:, None])
        return np.hstack(parts)


class NeighborAccess:
    """``item_neighbors`` rows of a few items, when the graph job has published the view.

    The view is optional: until the registry has it, or after a read fails, the source is
    skipped for ``retry_s`` and then looked up again (with a registry refresh). Rows are
    reused for ``serving_batch_features_max_age_s`` (a near cache): the view changes only
    when the graph job publishes it.
    """

    FEATURES = ("item_neighbors:neighbors", "item_neighbors:neighbor_weights")

    def __init__(self, settings: Settings, retry_s: float = 30.0) -> None:
        self.settings = settings
        self.retry_s = retry_s
        self._reader: OnlineFeatureReader | None = None
        self._skip_until = 0.0
        self._stale = False
        # A batch view (the graph job publishes it): cached like the other batch features.
        self._cache = NearCache([f.partition(":")[2] for f in self.FEATURES],
                                max_age_s=settings.serving_batch_features_max_age_s)

    def read(
        self, item_ids: Sequence[str]
    ) -> tuple[list[list[str] | None], list[Any]] | None:
        """Neighbours and weights per item, or ``None`` while the view is unavailable."""
        if not item_ids or time.monotonic() < self._skip_until:
            return None
        try:
            if self._reader is None:
                self._reader = OnlineFeatureReader(self.settings)
            elif self._stale:
                self._reader.refresh()
            self._stale = False
            reader = self._reader
            rows = self._cache.read(item_ids, lambda missing: reader.read(
                list(self.FEATURES), {"item_id": missing}))
        except Exception as exc:
            self._stale = True
            self._skip_until = time.monotonic() + self.retry_s
            log.info("co-visitation neighbours unavailable for %.0fs: %s: %s",
                     self.retry_s, type(exc).__name__, exc)
            return None
        return rows["neighbors"], rows["neighbor_weights"]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


class Admission:
    """Guesses, when a recommendation arrives, whether it can start within the budget.

    The expected wait is the work ahead of it — requests admitted and not finished, spread
    over the threads — times the recent mean time one takes (an exponential average).
    Beyond ``budget_s`` the request is answered at once from the in-process fallback
    rather than joining a queue it would time out in. Used from the event loop only.

    Examples
    --------
    >>> admission = Admission(threads=2, budget_s=0.05, initial_s=0.01)
    >>> for _ in range(10):
    ...     admission.started()
    >>> admission.admit()  # 10 ahead on 2 threads, 10 ms each: 50 ms
    True
    >>> admission.started(); admission.admit()
    False
    >>> admission.finished(0.01); admission.admit()
    True
    """

    def __init__(self, threads: int, budget_s: float, *, initial_s: float = 0.01) -> None:
        self.threads = threads
        self.budget_s = budget_s
        self.mean_s = initial_s
        self.pending = 0

    def admit(self) -> bool:
        return self.pending / self.threads * self.mean_s <= self.budget_s

    def started(self) -> None:
        self.pending += 1

    def finished(self, service_s: float | None) -> None:
        """One admitted request is done; ``service_s``: how long its full pipeline took
        (``None`` when it did not run it, e.g. shed after all)."""
        self.pending -= 1
        if service_s is not None:
            self.mean_s += 0.1 * (service_s - self.mean_s)


class ServingRuntime:
    """The long-lived parts of the recommendation service.

    Recommendations run on ``serving_threads`` threads of the app's
    :class:`serving.batching.Batcher`: the pipeline is CPU-bound under the GIL, so requests
    beyond that wait their turn, and those that waited together are answered together
    (``serving_max_batch``), rather than time-slicing each other into uniformly slow
    answers. :attr:`admission` sheds what would wait too long; :attr:`foreground` lets
    background threads run between requests.

    Parameters
    ----------
    settings
        Every ``serving_*`` setting, Kafka and the home.
    metrics
        The app's metrics.
    """

    def __init__(self, settings: Settings, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = FeatureAccess(settings, metrics)
        self.neighbors = NeighborAccess(settings)
        self.catalog = CatalogRefresher(settings, metrics)
        self.foreground = Foreground()
        self.trending = TrendingCounts(settings.serving_trending_half_life_s)
        self.purchases = RecentPurchases()
        self.feed = EventFeed(settings, self.trending, self.purchases, metrics,
                              foreground=self.foreground)
        self.models = ServedModels()
        self.watcher = ModelWatcher(settings, self.models, metrics)
        self.impressions = ImpressionLog(settings, metrics, self.foreground)
        self.admission = Admission(settings.serving_threads,
                                   settings.serving_queue_timeout_ms / 1000)

    def start(self) -> None:
        sys.setswitchinterval(self.settings.serving_gil_switch_ms / 1000)
        for part in (self.catalog, self.feed, self.watcher, self.impressions):
            part.start()
        # Opening Feast's registry takes seconds: done here rather than by the first request.
        threading.Thread(target=self.store.probe, name="streamrec-store-warmup",
                         daemon=True).start()

    def close(self) -> None:
        for part in (self.impressions, self.watcher, self.feed, self.catalog):
            part.close()
        self.store.close()
        self.neighbors.close()

    def readiness(self) -> dict[str, dict[str, Any]]:
        """Each dependency's state: ``{"ok": bool, "detail": str}``."""
        ok, detail = self.store.probe()
        checks: dict[str, dict[str, Any]] = {"feature_store": {"ok": ok, "detail": detail}}
        catalog = self.catalog.catalog
        checks["catalog"] = (
            {"ok": True, "detail": f"{len(catalog)} items, {len(catalog.graph)} with graph "
             f"vectors, {len(catalog.text)} with text vectors"}
            if self.catalog.loaded else {"ok": False, "detail": "first load in progress"}
        )
        for kind in KINDS:
            served = self.models.get(kind)
            if served is not None:
                checks[f"{kind}_model"] = {"ok": True, "detail": f"serving {served.version}"}
            else:
                problem = self.watcher.problems.get(kind, "not loaded yet")
                checks[f"{kind}_model"] = {"ok": False, "detail": problem}
        return checks
