"""The catalog worker: a new item is rankable seconds after its catalog record.

The nightly text job (:mod:`features.text_batch`) embeds the whole catalog; an item
launched during the day would otherwise have no vector, no category and no price for the
ranker until then. This worker consumes the ``items`` topic (its own consumer group,
``Settings.catalog_group``) and, per micro-batch of records:

1. keeps the newest record of each item in the batch (records are keyed by ``item_id``,
   so an item's versions arrive in order on one partition);
2. embeds :func:`~features.text_embeddings.item_text` of each with the same
   :class:`~features.text_embeddings.TextEncoder` as the batch, so an item gets the same
   text vector from both;
3. gives each a graph-space vector: the one the online store already holds for the item
   (a walk vector, or an earlier projection: a re-published or edited record must not
   replace the walk vector the graph learned from behaviour), else its text vector mapped
   by the projection the last text job saved (:class:`~features.coldstart.TextToGraph`,
   reloaded when a new one is saved). Without a saved projection ``graph_vector`` stays
   null and serving falls back to the text space;
4. writes the ``item_embeddings`` and ``item_profile`` rows to the online store
   (:meth:`~features.store.OnlineFeatureWriter.write`) and as one Parquet part per batch to
   the views' offline folders (:meth:`~features.store.OnlineFeatureWriter.append_offline`),
   where serving's catalog refresher picks new items up for its nearest-neighbour indexes.

Row times: an ``item_embeddings`` row is stamped with the Kafka record's timestamp (the
moment the catalog published it), an ``item_profile`` row with the item's creation time,
like the batch's rows; the online store keeps the newer of a stored and a written row.

Delivery: at-least-once through :class:`~streaming.consumer.StreamConsumer` (offsets are
committed after both writes). A re-delivered record writes the same rows again; its
offline part is named after the batch's source offsets, so a replay of the same batch
replaces its part. Records that fail validation go to ``items.dlq``. Any number of
replicas may share the group: each item's records live on one partition.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from features.coldstart import TextToGraph, projection_dir
from features.store import OnlineFeatureReader, OnlineFeatureWriter
from features.text_batch import EMBEDDINGS_VIEW, PROFILE_VIEW, embedding_row, profile_row
from features.text_embeddings import TextEncoder, item_text
from streaming.consumer import Failure, Message, StreamConsumer
from streaming.metrics import WorkerReporter
from streamrec.contract import Item, parse_item
from streamrec.settings import Settings

__all__ = ["CatalogStats", "CatalogWorker"]

log = logging.getLogger(__name__)

_GRAPH_FEATURE = f"{EMBEDDINGS_VIEW}:graph_vector"


@dataclass
class CatalogStats:
    """What the worker did, for logs, metrics and tests."""

    items: int = 0
    """Item rows written (each item once per batch it appears in)."""
    projected: int = 0
    """Items whose graph vector was projected from their text."""
    kept_graph: int = 0
    """Items that kept the graph vector the online store held."""
    text_only: int = 0
    """Items written without a graph vector (no projection saved yet)."""
    embed_seconds: float = 0.0


class CatalogWorker:
    """Embeds catalog records and writes them to Feast as they arrive (see module doc).

    Parameters
    ----------
    settings
        Topic, consumer group, home (projection, offline folders) and the online store.
    encoder
        A loaded :class:`~features.text_embeddings.TextEncoder` to share (loading one
        takes seconds); by default the worker loads its own.

    Examples
    --------
    ::

        worker = CatalogWorker(get_settings())
        worker.run()        # until SIGTERM
    """

    def __init__(self, settings: Settings, *, encoder: TextEncoder | None = None) -> None:
        self.settings = settings
        self.encoder = encoder or TextEncoder(settings)
        self.writer = OnlineFeatureWriter(settings)
        self.reader = OnlineFeatureReader(settings, store=self.writer.store)
        self.stats = CatalogStats()
        self._max_skew = timedelta(seconds=settings.max_future_skew_s)
        self._projection: TextToGraph | None = None
        self._projection_version: int | None = None

    # -- consumer hooks ----------------------------------------------------------------
    def decode(self, raw: bytes) -> Item:
        return parse_item(raw, max_future_skew=self._max_skew)

    def projection(self) -> TextToGraph | None:
        """The saved projection, reloaded when the text job has saved a new one."""
        folder = projection_dir(self.settings)
        version = TextToGraph.saved_version(folder)
        if version != self._projection_version:
            self._projection = TextToGraph.load(folder)
            self._projection_version = version
            if self._projection is not None:
                log.info(
                    "loaded the text-to-graph projection fitted at %s on %d items",
                    self._projection.fitted_at.isoformat(),
                    self._projection.n_items,
                )
        return self._projection

    def handle(self, batch: list[Message[Item]]) -> list[Failure]:
        newest: dict[str, Message[Item]] = {}
        for message in batch:
            newest[message.value.item_id] = message  # later offsets of an item win
        messages = list(newest.values())
        items = [m.value for m in messages]
        ids = [it.item_id for it in items]
        texts = [item_text(it.title, it.category, it.attributes) for it in items]
        started = time.perf_counter()
        text = self.encoder.encode(texts)
        self.stats.embed_seconds += time.perf_counter() - started
        graph = self._graph_vectors(ids, text)
        embeddings = [
            embedding_row(item_id, _record_time(m), vector, text[i])
            for i, (item_id, m, vector) in enumerate(zip(ids, messages, graph, strict=True))
        ]
        profiles = [profile_row(it) for it in items]
        self.writer.write(EMBEDDINGS_VIEW, embeddings)
        self.writer.write(PROFILE_VIEW, profiles)
        part = _part_name(batch)
        self.writer.append_offline(EMBEDDINGS_VIEW, embeddings, part=part)
        self.writer.append_offline(PROFILE_VIEW, profiles, part=part)
        self.stats.items += len(items)
        return []

    def _graph_vectors(self, ids: Sequence[str], text: np.ndarray) -> list[np.ndarray | None]:
        stored = self.reader.read([_GRAPH_FEATURE], {"item_id": list(ids)})["graph_vector"]
        out: list[np.ndarray | None] = list(stored)
        todo = [i for i, vector in enumerate(stored) if vector is None]
        self.stats.kept_graph += len(ids) - len(todo)
        projection = self.projection()
        if todo and projection is not None and projection.text_dim == text.shape[1]:
            for i, vector in zip(todo, projection.project(text[todo]), strict=True):
                out[i] = vector
            self.stats.projected += len(todo)
        else:
            self.stats.text_only += len(todo)
        return out

    # -- running -------------------------------------------------------------------------
    def consumer(self) -> StreamConsumer[Item]:
        s = self.settings
        return StreamConsumer(s, [s.topic_items], s.catalog_group, self.decode, self.handle)

    def status(self) -> dict[str, Any]:
        """Worker-specific fields of the periodic status line."""
        s = self.stats
        return {
            "items": s.items,
            "projected": s.projected,
            "kept_graph": s.kept_graph,
            "text_only": s.text_only,
            "embed_s": round(s.embed_seconds, 2),
        }

    def run(
        self,
        *,
        max_idle_s: float | None = None,
        install_signals: bool = True,
        consumer: StreamConsumer[Item] | None = None,
        metrics_port: int = 0,
    ) -> CatalogStats:
        """Consume until SIGTERM (or ``max_idle_s`` without input)."""
        consumer = consumer or self.consumer()
        if install_signals:
            consumer.install_signal_handlers()
        reporter = WorkerReporter("catalog", consumer.stats, extra=self.status)
        reporter.start(metrics_port)
        try:
            consumer.run(max_idle_s=max_idle_s)
        finally:
            reporter.stop()
            self.reader.close()
            self.writer.close()
        return self.stats


def _record_time(message: Message[Any]) -> datetime:
    """When the catalog published the record (Kafka's timestamp), else now."""
    if message.timestamp_ms >= 0:
        return datetime.fromtimestamp(message.timestamp_ms / 1000, UTC)
    return datetime.now(UTC)


def _part_name(batch: Sequence[Message[Any]]) -> str:
    """An offline part name derived from the source offsets of ``batch``.

    A replay of the same batch after a crash rewrites the same part instead of adding one.
    """
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for m in batch:
        low, high = spans.get((m.topic, m.partition), (m.offset, m.offset))
        spans[(m.topic, m.partition)] = (min(low, m.offset), max(high, m.offset))
    key = ";".join(f"{t}:{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(spans.items()))
    return f"catalog-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}"
