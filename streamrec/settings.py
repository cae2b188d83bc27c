"""All configuration in one place, read from ``STREAMREC_*`` environment variables.

Every process of the stack (API, workers, CLI, trainer) builds one :class:`Settings` and
passes it down; nothing else reads the environment. Each field documents itself so that
``streamrec config`` can print the table of variables an operator may set.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamrec"


class Settings(BaseSettings):
    """Configuration of every streamrec process.

    Examples
    --------
    >>> s = Settings(kafka_bootstrap="broker:9092")
    >>> s.kafka_bootstrap, s.topic_events, s.dlq_topic("events")
    ('broker:9092', 'events', 'events.dlq')
    """

    model_config = SettingsConfigDict(env_prefix="STREAMREC_", extra="ignore")

    # --- Kafka -------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma separated."
    )
    topic_events: str = Field("events", description="User actions, keyed by user_id.")
    topic_items: str = Field("items", description="Catalog records, keyed by item_id.")
    topic_impressions: str = Field(
        "impressions", description="What serving showed, with request_id."
    )
    dlq_suffix: str = Field(".dlq", description="Suffix of each topic's dead-letter topic.")
    topic_partitions: int = Field(4, ge=1, description="Partitions of topics streamrec creates.")
    consumer_batch_size: int = Field(
        2000, ge=1, description="Max records a worker handles per batch."
    )
    consumer_poll_timeout_ms: int = Field(500, ge=1, description="Poll wait when idle.")
    producer_linger_ms: int = Field(5, ge=0, description="Producer batching delay.")
    producer_max_block_ms: int = Field(
        5000, ge=100, description="How long a send may block when the broker is unreachable."
    )

    archiver_group: str = Field("archiver", description="Consumer group of the archiver.")
    feature_writer_group: str = Field(
        "feature-writer", description="Consumer group of the feature writer."
    )
    catalog_group: str = Field(
        "catalog",
        description="Consumer group of the catalog worker (text vectors of new items).",
    )
    dlq_replay_group: str = Field(
        "dlq-replay",
        description="Consumer group `streamrec dlq replay` records its progress through the "
        "dead-letter topics in (a replay resumes there; nothing is re-driven twice).",
    )

    feature_allowed_lateness_s: float = Field(
        600.0,
        gt=0,
        description="Events older than an entity's newest by more than this are too late "
        "for real-time features (still archived). Dedup memory grows with it.",
    )
    feature_flush_interval_ms: float = Field(
        200.0,
        ge=0,
        description="Under load, the feature writer writes each changed entity at most once "
        "per interval (coalescing); idle input is written at once.",
    )
    feature_item_flush_interval_ms: float = Field(
        1000.0,
        ge=0,
        description="The same for item rows (an impression touches many items; their "
        "hour/day counts move slowly).",
    )
    feature_batch_size: int = Field(
        10_000,
        ge=1,
        description="Max records the feature writer folds in per batch (and commits at "
        "once): a live stream fills far less; a backlog amortises per-batch costs.",
    )
    feature_backlog_flush_interval_ms: float = Field(
        2000.0,
        ge=0,
        description="A feature writer at least this far behind its input (records behind / "
        "its rate) writes each user at most once per this interval, and items the same "
        "multiple of theirs: its rows are that stale anyway; fewer writes catch up faster.",
    )
    feature_snapshot_interval_s: float = Field(
        30.0,
        gt=0,
        description="How often the feature writer persists state + offsets (bounds replay).",
    )

    metrics_port: int = Field(
        0, ge=0, description="Port of a worker's Prometheus /metrics endpoint (0: off)."
    )

    # --- Local broker (`streamrec kafka up`) ---------------------------------------------
    kafka_local_port: int = Field(9092, description="Client port of the local broker.")
    kafka_local_controller_port: int = Field(
        9093, description="KRaft controller port of the local broker."
    )
    kafka_local_heap: str = Field("512m", description="JVM heap of the local broker.")
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Downloaded jars and other reusable artefacts.",
    )
    home: Path = Field(
        Path(".streamrec"),
        description="Runtime state: local broker data and logs, feature store, models.",
    )

    # --- Feature store (Feast) ------------------------------------------------------------
    online_store: Literal["sqlite", "redis"] = Field(
        "sqlite",
        description="Feast online store: `sqlite` (a file under the home) or `redis`.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis of the online store when online_store=redis "
        "(redis://[:password@]host:port/db, rediss:// for TLS).",
    )

    # --- Event contract -----------------------------------------------------------------
    max_future_skew_s: float = Field(
        300.0, ge=0, description="Events stamped further in the future are rejected."
    )

    # --- API ----------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Interface the API binds to.")
    api_port: int = Field(8000, description="Port the API listens on.")
    api_max_batch: int = Field(1000, ge=1, description="Max events per POST /v1/events.")
    api_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Max request body size in bytes."
    )
    api_retry_after_s: int = Field(
        5, ge=1, description="Retry-After sent with 503 when Kafka is unreachable."
    )
    api_kafka_max_block_ms: int = Field(
        2000,
        ge=100,
        description="How long the API waits to reach Kafka (bootstrap, topic metadata) "
        "before answering 503.",
    )
    api_kafka_ack_timeout_ms: int = Field(
        5000,
        ge=1000,
        description="How long the API waits for Kafka to acknowledge a batch before "
        "reporting its records as failed (503).",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="API keys with scopes, e.g. `key1:ingest+read,key2:read`; empty: no "
        "authentication. Scopes: `ingest` (POST /v1/events), `read` (everything else but "
        "health and metrics). Clients send `X-API-Key` or `Authorization: Bearer`.",
    )

    # --- Recommendations (serving/) -------------------------------------------------------
    serving_max_candidates: int = Field(
        200, ge=1, le=1000, description="Candidates scored per recommendation request."
    )
    serving_online_weight: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Weight of the online (River) model's score in the blend with the "
        "ranker's: score = (1 - w) * ranker + w * online.",
    )
    serving_category_share: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Diversity: at most ceil(k * share) recommended items per category "
        "(filled past the cap only when too few other items remain).",
    )
    serving_ann_seeds: int = Field(
        5, ge=0, description="The user's most recent items used as seeds of the "
        "nearest-neighbour and co-visitation candidates."
    )
    serving_ann_neighbors: int = Field(
        40, ge=1, description="Neighbours taken per seed item: nearest in graph (or text) "
        "space, and co-visitation."
    )
    serving_trending_per_scope: int = Field(
        40, ge=0, description="Trending candidates from the request's context, and overall."
    )
    serving_trending_half_life_s: float = Field(
        1800.0, gt=0, description="Half-life of the in-process trending counts."
    )
    serving_trending_lookback_s: float = Field(
        3600.0,
        ge=0,
        description="At start the API reads the events topic from this long ago, to warm "
        "its trending counts and recent-purchase cache.",
    )
    serving_fresh_max_age_s: float = Field(
        7 * 86_400.0, gt=0, description="Catalog items younger than this count as new."
    )
    serving_fresh_per_category: int = Field(
        5, ge=0, description="Newest items per category offered as candidates."
    )
    serving_catalog_refresh_s: float = Field(
        5.0,
        gt=0,
        description="How often the API looks for new item_embeddings / item_profile Parquet "
        "parts to add to its nearest-neighbour indexes.",
    )
    serving_model_poll_s: float = Field(
        5.0, gt=0, description="How often the API checks the registry for new champions."
    )
    serving_store_retry_s: float = Field(
        1.0,
        gt=0,
        description="After an online-store failure, requests skip the store (degraded) for "
        "this long before trying it again.",
    )
    serving_impression_queue: int = Field(
        10_000,
        ge=1,
        description="Impressions waiting for Kafka; beyond this they are dropped (counted), "
        "never blocking a response.",
    )
    serving_torch_threads: int = Field(
        1, ge=1, description="PyTorch threads per ranker call in the API (requests run "
        "concurrently, so one thread each avoids oversubscription)."
    )
    serving_threads: int = Field(
        1,
        ge=1,
        description="Threads computing recommendations per API process, each a batch at a "
        "time (serving_max_batch). The work is CPU bound under the GIL: more threads only "
        "time-slice it (every request slower), so requests queue instead; raise it when the "
        "online store is remote (Redis).",
    )
    serving_max_batch: int = Field(
        8,
        ge=1,
        description="Recommendations that queued while a thread was busy are computed "
        "together, up to this many: one store read for their users, one for their "
        "candidates, the models called back to back. An idle API answers each alone; 1 "
        "turns batching off.",
    )
    serving_gil_switch_ms: float = Field(
        1.0,
        gt=0,
        description="How long one thread of an API process may hold the GIL while others wait "
        "(sys.setswitchinterval; Python's default is 5). The trending feed folds events in "
        "batches: a shorter turn keeps a request from waiting on a batch.",
    )
    serving_background_defer_ms: float = Field(
        250.0,
        ge=0,
        description="Background work of an API process (the trending feed, the impression "
        "log) waits up to this long for a moment with no request in flight before it runs "
        "anyway: it shares the interpreter lock with requests, and running in their gaps "
        "keeps it from stretching them. Trending counts and impressions are that much later.",
    )
    serving_queue_timeout_ms: float = Field(
        200.0,
        gt=0,
        description="A recommendation that waited longer than this for a thread (overload) "
        "is answered at once from trending and new items, flagged degraded (`overload`), "
        "so latency stays bounded instead of every answer timing out.",
    )
    serving_item_features_max_age_ms: float = Field(
        250.0,
        ge=0,
        description="Stream-fed item features (item_realtime) read from the online store are "
        "reused for this long by later requests of the same API process (a near cache); 0 "
        "reads every candidate every time. Served item features are at most this much older "
        "than the store's; user features are always read fresh.",
    )
    serving_batch_features_max_age_s: float = Field(
        60.0,
        ge=0,
        description="The same near cache for batch-computed item features (item_stats), which "
        "change only when a Spark job materializes them.",
    )
    serving_catalog_features: bool = Field(
        True,
        description="Take the candidates' item_profile and item_embeddings features from the "
        "API's catalog snapshot (the views' Parquet, also behind the nearest-neighbour "
        "indexes) instead of the online store; the batched online read then covers the "
        "user views and the fast-moving item views only.",
    )

    # --- Batch jobs (Spark) ---------------------------------------------------------------
    spark_master: str = Field(
        "local[*]",
        description="Spark master of the batch jobs: local[*] (this machine, all cores), "
        "spark://host:7077, yarn, ...",
    )
    spark_driver_memory: str = Field(
        "2g", description="JVM heap of the Spark driver (all of a local run's memory)."
    )

    # --- Item graph and its embeddings (Spark; features/item_graph.py) -------------------
    graph_days: int = Field(
        30, ge=1, description="Days of the event log, up to the run's end, the item graph reads."
    )
    graph_pair_window: int = Field(
        3, ge=1, description="Each item of a session is linked to this many items after it."
    )
    graph_min_weight: float = Field(
        2.0, ge=0, description="Co-occurrence edges lighter than this (summed) are pruned."
    )
    graph_min_degree: int = Field(
        1, ge=1, description="Items with fewer neighbours than this (after pruning) are dropped."
    )
    graph_walks_per_node: int = Field(10, ge=1, description="Random walks started per item.")
    graph_walk_length: int = Field(
        10, ge=2,
        description="Items per random walk (20 embedded no better on simulator logs, at twice "
        "the cost).",
    )
    graph_vector_size: int = Field(
        64, ge=1,
        description="Dimension of the graph vectors; must equal GRAPH_DIM of "
        "feature_repo/item_embeddings.py.",
    )
    graph_window_size: int = Field(5, ge=1, description="Word2Vec context window, in walk steps.")
    graph_min_count: int = Field(
        5, ge=1, description="Word2Vec ignores items appearing fewer times in all walks."
    )
    graph_neighbors: int = Field(
        50, ge=1, description="Co-visitation neighbours kept per item (view item_neighbors)."
    )
    graph_seed: int = Field(0, description="Seed of the random walks and of Word2Vec.")
    graph_broadcast_max_edges: int = Field(
        2_000_000, ge=0,
        description="Graphs with at most this many edges are broadcast to every executor for "
        "the random walks (a map per step instead of a shuffle); larger ones are joined. "
        "Each edge costs about 80 bytes of executor memory (both directions).",
    )

    # --- Training and evaluation ----------------------------------------------------------
    torch_threads: int = Field(
        0, ge=0,
        description="CPU threads of PyTorch training and inference (0: one per core). "
        "Fewer than the cores helps when other processes share the machine.",
    )
    label_attribution_window_s: float = Field(
        1800.0,
        gt=0,
        description="An action (click, add to cart, purchase) within this long after an "
        "impression labels the shown item positive; afterwards the slot is a negative.",
    )
    label_sampled_negatives: int = Field(
        4,
        ge=1,
        description="Without impressions (cold system, replayed datasets): catalog items "
        "sampled as negatives per positive interaction.",
    )
    train_window_days: float = Field(
        7.0, gt=0, description="Days of labelled examples `streamrec train` learns from."
    )
    train_holdout_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Newest share of the window's examples (by time) held out to evaluate "
        "and compare candidate and champion.",
    )
    train_promotion_metric: Literal["ndcg@10", "auc"] = Field(
        "ndcg@10",
        description="Holdout metric (per request) a candidate must improve to be promoted.",
    )
    train_promotion_tolerance: float = Field(
        0.002,
        ge=0,
        description="A candidate is promoted only if it beats the champion's promotion "
        "metric by more than this.",
    )
    train_online_bootstrap_rows: int = Field(
        200_000,
        ge=0,
        description="A training run that finds no online model registered teaches a fresh "
        "one this many of its newest labelled examples and promotes it, so serving has one "
        "before the learner's first snapshot (0: never).",
    )
    train_retrain_poll_s: float = Field(
        10.0,
        gt=0,
        description="Between scheduled runs, `streamrec train --every` checks this often "
        "for the online learner's drift retrain request and starts a run early on one.",
    )
    train_pit_chunk_rows: int = Field(
        50_000,
        ge=1,
        description="Label rows per Feast point-in-time join call (bounds the join's memory).",
    )
    train_pit_engine: Literal["asof", "feast"] = Field(
        "asof",
        description="Point-in-time join of training data: `feast` (get_historical_features "
        "of the file offline store; slow on list columns) or `asof` (the same join of the "
        "same Feast views and folders with pandas merge_asof; tested equal).",
    )

    # --- Online learner (River; streaming/learner.py) --------------------------------------
    learner_group: str = Field(
        "online-learner", description="Consumer group of the online learner."
    )
    learner_attribution_window_s: float = Field(
        300.0,
        gt=0,
        description="The online learner's attribution window: shorter than the batch "
        "labels' (label_attribution_window_s), so that it learns within minutes. Labels "
        "are final when it closes; an action after it counts as positive only in batch.",
    )
    learner_allowed_lateness_s: float = Field(
        60.0,
        ge=0,
        description="How long the online learner keeps a closed window open for late "
        "actions (its labels wait this much longer).",
    )
    learner_snapshot_examples: int = Field(
        20_000,
        ge=1,
        description="The online learner registers (and promotes) a snapshot of its model "
        "after this many labelled examples...",
    )
    learner_snapshot_interval_s: float = Field(
        300.0, gt=0, description="...or after this long, whichever comes first."
    )
    learner_keep_snapshots: int = Field(
        10, ge=2, description="Online-model versions kept in the registry (older are pruned)."
    )

    def dlq_topic(self, topic: str) -> str:
        """Name of the dead-letter topic that belongs to ``topic``."""
        return f"{topic}{self.dlq_suffix}"

    @property
    def kafka_home(self) -> Path:
        """Data and logs of the local broker."""
        return self.home / "kafka"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
