"""The online learner: impressions + actions → labels → River ``learn_one``, continuously.

``streamrec worker learner`` consumes ``events`` and ``impressions`` (what serving showed),
merged in event time across partitions (:mod:`streaming.alignment`), and:

1. **Features as of the impression.** When an impression arrives, the ``ranker_features``
   of the user and every shown item are read ONCE from the online store
   (:class:`~features.store.OnlineFeatureReader`, one batched read) into a
   :class:`~training.ranking_batch.RankingBatch` kept with the open slots. Labels arrive
   later; the features stay those of the moment of showing, which is what serving scored.
   A user row newer than the impression means the store already holds what the user did
   *after* it (a click would leak into its own features): such an impression is not
   learnt from (``stale_features``). In a live stream the learner reads within a second
   and this does not happen; on a backlog it does, and history is left to the periodic
   batch retrain, which joins features point-in-time.
2. **Labels** come from :class:`training.labels.LabelJoiner` (late and duplicate events
   handled there) with the learner's own, shorter attribution window
   (``learner_attribution_window_s``, 5 min, + ``learner_allowed_lateness_s``, 1 min): every
   label, positive or negative, is final and learnt when its window closes, in impression
   order. Emitting clicks at once and negatives a window later was tried: the burst of
   unbalanced positives skews an SGD learner's scores (progressive log loss 1.8 instead of
   0.2 on the test shop). An action after the short window still counts in the batch
   labels (30 min).
3. **Learning**: :meth:`training.online_model.OnlineModel.learn` per labelled example.
   Progressive validation (rolling AUC / log loss) judges the model's score *when the
   impression arrived* — what serving showed — not a prediction made when the label came:
   clicks arrive at once and negatives only when their window closes, and a model
   predicting in between would be judged on rows it half knows. Exported as Prometheus
   metrics and in the status file ``<home>/status/learner.json`` (the dashboard reads it).
4. **Snapshots**: every ``learner_snapshot_examples`` examples or
   ``learner_snapshot_interval_s`` seconds (and at shutdown) the model is registered in the
   model registry as kind ``online`` and promoted (serving picks it up), keeping the last
   ``learner_keep_snapshots`` versions. A restart resumes from the champion snapshot
   (checksums verified) and the consumer group's offsets: what was learnt after the last
   snapshot of a *crashed* learner is lost (at most one interval), the labels stay in the
   event log for the batch trainer.
5. **Drift**: when the model's ADWIN detector sees the loss rise, the learner writes a
   retrain request (:func:`retrain_request_path`), a JSON object::

       {"requested_at": "2026-11-24T10:15:00+00:00", "reason": "drift",
        "detector": "adwin", "drifts": 3, "examples": 120000, "rolling_auc": 0.61,
        "rolling_log_loss": 0.32, "online_version": "v0007-20261124T101500Z"}

   replaced atomically on every new drift (the newest request wins). ``streamrec train``
   retrains when the file exists and deletes it when done.

Open slots live in memory only: a restart forgets impressions whose windows were still
open (their labels are not learnt online).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import TopicPartition
from prometheus_client import Counter, Gauge

from features.definitions import epoch_us
from streaming.alignment import EventTimeAligner
from streaming.consumer import Failure, Message, StreamConsumer
from streaming.metrics import WorkerReporter, status_folder
from streamrec.contract import Event, EventType, parse_event
from streamrec.settings import Settings
from training.labels import LabelJoiner, LabelledExample
from training.online_model import KIND, OnlineModel, register_snapshot
from training.ranking_batch import RankingBatch
from training.registry import ModelRegistry, RegistryError

__all__ = ["LearnerStats", "OnlineLearner", "read_retrain_request", "retrain_request_path"]

log = logging.getLogger(__name__)

"""Registry kind of the online model's snapshots."""
WORKER = "learner"

ONLINE_AUC = Gauge("streamrec_online_rolling_auc", "Online model: progressive rolling AUC.")
ONLINE_LOG_LOSS = Gauge(
    "streamrec_online_rolling_log_loss", "Online model: progressive rolling log loss."
)
ONLINE_EXAMPLES = Counter(
    "streamrec_online_examples", "Labelled examples the online model learnt.", ["label"]
)
ONLINE_DRIFTS = Counter("streamrec_online_drifts", "Loss drifts detected (ADWIN).")
ONLINE_SNAPSHOTS = Counter(
    "streamrec_online_snapshots", "Online-model snapshots registered and promoted."
)


def retrain_request_path(settings: Settings) -> Path:
    """``<home>/state/retrain-requested``: present when drift asked for a retrain."""
    return settings.home / "state" / "retrain-requested"


def read_retrain_request(settings: Settings) -> dict[str, Any] | None:
    """The pending retrain request, ``None`` when there is none."""
    try:
        return json.loads(retrain_request_path(settings).read_text())
    except FileNotFoundError:
        return None


@dataclass
class LearnerStats:
    """What the learner did (status file and tests)."""

    impressions: int = 0
    learnt: int = 0
    stale_features: int = 0
    """Impressions whose user row was newer than the impression: not learnt from."""
    feature_read_errors: int = 0
    unmatched_examples: int = 0
    """Labelled examples without stored features (stale, unreadable, or from before start)."""
    snapshots: int = 0
    retrain_requests: int = 0


@dataclass
class _Shown:
    """One impression's features, waiting for its slots' labels."""

    batch: RankingBatch | None  # None: not learnable (stale or unreadable features)
    predicted: np.ndarray  # the model's scores when shown: what progressive validation judges
    rows: dict[str, int]
    ts_s: float
    remaining: int


class OnlineLearner:
    """Joins impressions with actions and feeds the labels to an :class:`OnlineModel`.

    Parameters
    ----------
    settings
        Topics, group, home (registry, status, retrain request), snapshot policy.
    reader
        The online-store reader (an ``OnlineFeatureReader`` of ``settings`` by default).
    registry
        Where snapshots go (``<home>/models`` by default).

    Examples
    --------
    ::

        learner = OnlineLearner(settings)   # resumes from the online champion, if any
        learner.run()                       # until SIGTERM
    """

    def __init__(
        self,
        settings: Settings,
        *,
        reader: Any | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry.from_settings(settings)
        self.model, self.base_version, self._window_start = self._resume()
        self.version = self.base_version
        # Labels leave the joiner in impression order, when their window closes: emitting
        # clicks at once and negatives a window later feeds an online learner a burst of
        # positives it then overshoots on (its scores for the next impressions skew high).
        self.joiner = LabelJoiner(
            settings.learner_attribution_window_s,
            allowed_lateness_s=settings.learner_allowed_lateness_s,
            emit_positives_at_once=False,
        )
        self.stats = LearnerStats()
        self._reader = reader
        self._pending: dict[str, _Shown] = {}
        self._pending_order: deque[tuple[float, str]] = deque()
        self._aligner: EventTimeAligner[Event] = EventTimeAligner()
        self._consumer: StreamConsumer[Event] | None = None
        self._since_snapshot = 0
        self._snapshot_at = time.monotonic()
        self._window_end: float | None = None
        self._last_drift: str | None = None
        self._metrics = self.model.metrics()

    # -- state -----------------------------------------------------------------------------

    def _resume(self) -> tuple[OnlineModel, str | None, float | None]:
        """The champion snapshot (verified), or a fresh model."""
        champion = self.registry.champion(KIND)
        if champion is None:
            log.info("no online champion yet: starting a fresh model")
            return OnlineModel(), None, None
        try:
            model = OnlineModel.load(self.registry.open(KIND, champion.version))
        except (RegistryError, ValueError, OSError) as exc:
            log.error("cannot resume from online champion %s (%s): starting a fresh model",
                      champion.version, exc)
            return OnlineModel(), None, None
        start = champion.manifest.get("data_window", {}).get("start_s")
        log.info("resumed the online model from %s (%d examples)", champion.version,
                 model.examples)
        return model, champion.version, start

    @property
    def reader(self) -> Any:
        if self._reader is None:
            from features.store import OnlineFeatureReader

            self._reader = OnlineFeatureReader(self.settings)
        return self._reader

    # -- consumer hooks --------------------------------------------------------------------

    def decode(self, raw: bytes) -> Event:
        return parse_event(orjson.loads(raw))

    def handle(self, batch: list[Message[Event]]) -> list[Failure]:
        per_partition: dict[TopicPartition, list[tuple[int, int, Event]]] = {}
        for m in batch:
            per_partition.setdefault(TopicPartition(m.topic, m.partition), []).append(
                (epoch_us(m.value.ts), m.offset, m.value)
            )
        for tp, records in per_partition.items():
            self._aligner.add(tp, records)
        self.release()
        return []

    def release(self) -> None:
        """Apply the events event-time alignment lets through."""
        if self._consumer is None or not len(self._aligner):
            return
        released = self._aligner.release(self._consumer.assignment(), self._consumer.caught_up)
        self.apply([r.value for r in released])

    def after_commit(self, positions: dict[TopicPartition, int]) -> None:
        due = time.monotonic() - self._snapshot_at >= self.settings.learner_snapshot_interval_s
        if self._since_snapshot and (
            self._since_snapshot >= self.settings.learner_snapshot_examples or due
        ):
            self.snapshot()

    # -- the join --------------------------------------------------------------------------

    def apply(self, events: list[Event]) -> None:
        """Fold events (in event-time order) into labels and learn from them."""
        for event in events:
            slots_before = self.joiner.stats.slots
            examples = self.joiner.add(event)
            if event.event_type is EventType.IMPRESSION:
                added = self.joiner.stats.slots - slots_before
                if added:
                    self._remember(event, added)
            self._learn(examples)
        self._forget_old()
        # The reporter thread reads this copy: River's metrics must not be read mid-update.
        self._metrics = metrics = self.model.metrics()
        if metrics["rolling_auc"] is not None:
            ONLINE_AUC.set(metrics["rolling_auc"])
        if metrics["rolling_log_loss"] is not None:
            ONLINE_LOG_LOSS.set(metrics["rolling_log_loss"])

    def _remember(self, event: Event, slots: int) -> None:
        """Read the features of the impression's user and shown items, once."""
        self.stats.impressions += 1
        request = event.request_id or event.event_id
        items = list(dict.fromkeys(event.shown_items))
        ts_s = event.ts.timestamp()
        ctx = event.context
        batch: RankingBatch | None
        try:
            from features.store import RANKER_SERVICE

            features = self.reader.read(
                RANKER_SERVICE,
                {"user_id": [event.user_id] * len(items), "item_id": items},
                full_feature_names=True,
            )
            batch = RankingBatch.for_request(
                event.user_id, items, features, ts_s=ts_s,
                device=ctx.device.value if ctx is not None and ctx.device else None,
                country=ctx.country if ctx is not None else None,
            )
        except Exception as exc:  # the store being down must not stop learning for good
            self.stats.feature_read_errors += 1
            log.warning("no features for request %s: %s", request, exc)
            batch = None
        if batch is not None and _newer_than(batch, ts_s):
            self.stats.stale_features += 1
            batch = None
        predicted = self.model.score(batch) if batch is not None else np.zeros(0)
        self._pending[request] = _Shown(
            batch, predicted, {i: n for n, i in enumerate(items)}, ts_s, slots
        )
        self._pending_order.append((ts_s, request))

    def _learn(self, examples: list[LabelledExample]) -> None:
        """Learn the examples, grouped by request (one batch take per group), in order."""
        start = 0
        while start < len(examples):
            request = examples[start].request_id
            stop = start + 1
            while stop < len(examples) and examples[stop].request_id == request:
                stop += 1
            group = examples[start:stop]
            start = stop
            shown = self._pending.get(request)
            if shown is not None:
                shown.remaining -= len(group)
                if shown.remaining <= 0:
                    del self._pending[request]
            if shown is None or shown.batch is None:
                self.stats.unmatched_examples += len(group)
                continue
            rows = [shown.rows[x.item_id] for x in group]
            labels = np.array([x.label for x in group], dtype=bool)
            self.model.learn(shown.batch.take(rows), labels, shown.predicted[rows])
            self.stats.learnt += len(group)
            self._since_snapshot += len(group)
            positives = int(labels.sum())
            ONLINE_EXAMPLES.labels("1").inc(positives)
            ONLINE_EXAMPLES.labels("0").inc(len(group) - positives)
            if self._window_start is None:
                self._window_start = shown.ts_s
            self._window_end = max(self._window_end or shown.ts_s, shown.ts_s)
            if self.model.drift_detected:
                ONLINE_DRIFTS.inc()
                self._request_retrain()

    def _forget_old(self) -> None:
        """Drop impressions the joiner can no longer label (a safety net: their slots closed)."""
        horizon = self.joiner.watermark_s - 2 * self.joiner.horizon_s
        while self._pending_order and self._pending_order[0][0] < horizon:
            _, request = self._pending_order.popleft()
            self._pending.pop(request, None)

    # -- outputs ---------------------------------------------------------------------------

    def _request_retrain(self) -> None:
        metrics = self.model.metrics()
        now = datetime.now(UTC).isoformat()
        request = {
            "requested_at": now,
            "reason": "drift",
            "detector": "adwin",
            "drifts": metrics["drifts"],
            "examples": metrics["examples"],
            "rolling_auc": metrics["rolling_auc"],
            "rolling_log_loss": metrics["rolling_log_loss"],
            "online_version": self.version,
        }
        path = retrain_request_path(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(request))
        os.replace(tmp, path)
        self.stats.retrain_requests += 1
        self._last_drift = now
        log.warning("loss drift detected after %d examples: retrain requested", metrics["examples"])

    def snapshot(self) -> str:
        """Register the model as a new ``online`` version, promote it, prune old ones."""
        window = {
            "start": _iso(self._window_start),
            "end": _iso(self._window_end),
            "start_s": self._window_start,
            "end_s": self._window_end,
            "examples": self.model.examples,
        }
        version = register_snapshot(self.registry, self.model, window,
                                    self.settings.home / "state", self.base_version)
        metrics = self.model.metrics()
        pruned = self.registry.prune(KIND, keep=self.settings.learner_keep_snapshots)
        self.version = version
        self._since_snapshot = 0
        self._snapshot_at = time.monotonic()
        self.stats.snapshots += 1
        ONLINE_SNAPSHOTS.inc()
        log.info("online snapshot %s promoted (%d examples, rolling AUC %s; pruned %d)",
                 version, self.model.examples, metrics["rolling_auc"], len(pruned))
        return version

    def status(self) -> dict[str, Any]:
        """Worker-specific fields of the status line and of ``learner.json``."""
        return {
            **{k: v for k, v in self._metrics.items() if k != "drift_detected"},
            **asdict(self.stats),
            "version": self.version,
            "open_slots": self.joiner.open_slots(),
            "pending_requests": len(self._pending),
            "late_actions": self.joiner.stats.late_actions,
            "late_impressions": self.joiner.stats.late_impressions,
            "last_drift_at": self._last_drift,
            "snapshot_every_examples": self.settings.learner_snapshot_examples,
        }

    # -- running -----------------------------------------------------------------------------

    def consumer(self) -> StreamConsumer[Event]:
        s = self.settings
        self._consumer = StreamConsumer(
            s,
            [s.topic_events, s.topic_impressions],
            s.learner_group,
            self.decode,
            self.handle,
            after_commit=self.after_commit,
            on_idle=self.release,
            # Small per-partition fetches keep the partitions close in event time.
            consumer_config={"max_partition_fetch_bytes": 512 * 1024},
        )
        return self._consumer

    def run(
        self,
        *,
        max_idle_s: float | None = None,
        install_signals: bool = True,
        metrics_port: int = 0,
    ) -> LearnerStats:
        """Learn until SIGTERM (or ``max_idle_s`` without input); snapshot on the way out."""
        consumer = self._consumer or self.consumer()
        if install_signals:
            consumer.install_signal_handlers()
        reporter = WorkerReporter(WORKER, consumer.stats, extra=self.status,
                                  status_dir=status_folder(self.settings))
        reporter.start(metrics_port)
        try:
            consumer.run(max_idle_s=max_idle_s)
        finally:
            if self._since_snapshot:
                self.snapshot()
            reporter.stop()
        return self.stats


def _newer_than(batch: RankingBatch, ts_s: float) -> bool:
    """Whether the user's feature row already holds events after ``ts_s``.

    The row of the impression itself carries its time; a millisecond of slack absorbs the
    float rounding of microsecond timestamps.
    """
    seen = batch.column("user_realtime__last_event_ts")
    return bool(len(batch)) and seen[0] is not None and float(seen[0]) > ts_s + 1e-3


def _iso(ts_s: float | None) -> str | None:
    return None if ts_s is None else datetime.fromtimestamp(ts_s, UTC).isoformat()
