"""Features recomputed by Spark from the Parquet event log: daily statistics and real-time windows.

Two products, one reading of the log.

Daily statistics (``user_stats``, ``item_stats``)
    One row per entity per UTC day ``D`` of the run, *as of* the end of that day: it counts
    the entity's events of the days ``D-6..D`` (7d) and ``D-29..D`` (30d), the bucketed
    windows :data:`~features.definitions.STATS_WINDOWS` with one-day buckets, seen from the
    day's last instant. The row's ``event_timestamp`` is the instant the row is complete, the
    start of ``D+1`` (events are strictly earlier, so a point-in-time join never leaks a
    later event). A run ends at ``end`` (default: now); on the day of ``end`` only the events
    before it count and the row is stamped ``end``, and a later run of that day replaces it
    with the complete one. An entity gets a row on every day whose 30-day window holds one
    of its events, and one more on the day its last event leaves the window, with zero
    counts: materializing that row clears the entity's stale counts online.

    Rows are written under ``date=YYYY-MM-DD`` partitions of each view's offline folder, and
    a run overwrites exactly the days it computes (Spark's dynamic partition overwrite): a
    re-run of a day replaces it, it never adds a second copy. :func:`materialize` then loads
    the newest row of every entity into the online store with Feast.

Real-time windows as of each entity's newest event (:func:`realtime_as_of`)
    The ``user_realtime`` and ``item_realtime`` rows the stream engine
    (:mod:`features.realtime`) holds at the end of the log, computed in batch with the
    semantics and constants of :mod:`features.definitions`: integer event times
    (``unix_micros``), floor-divided buckets, ``array_distinct`` items of an impression,
    newest = largest ``(ts, event_id)``, sessions split by gaps longer than ``SESSION_GAP``.
    Acceptance depends on the arrival order, which the log does not keep across partitions,
    so every event of the log counts once: the rows equal the stream's whenever no event
    was too late for its entity (an in-order log, or one whose disorder stays within the
    allowed lateness). Use them to check the stream, or to rebuild the online store from the
    log.

Duplicates
    The log holds each Kafka record once, but a producer's retry can put one event into two
    records. Every computation here first keeps one record per ``event_id``: the first one
    by ``(kafka_partition, kafka_offset)``, which for a user's events (keyed by ``user_id``,
    so in one partition) is the first delivery, the one the stream accepted. A re-delivery
    carries the original event, so any copy would give the same features.

Examples
--------
>>> stats_days(datetime(2026, 3, 2, 15, 30, tzinfo=UTC), days=2)
(datetime.date(2026, 3, 1), datetime.date(2026, 3, 2))
>>> stats_days(datetime(2026, 3, 2, tzinfo=UTC), days=1)  # midnight: the day before is complete
(datetime.date(2026, 3, 1),)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import reduce
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.window import Window as SparkWindow

from features.definitions import (
    COUNTED_TYPES,
    CTR_PRIOR_CLICKS,
    CTR_PRIOR_IMPRESSIONS,
    EPOCH,
    ITEM_WINDOWS,
    RECENT_ITEMS_MAX,
    SESSION_GAP,
    STATS_WINDOWS,
    TIMESTAMP_FIELD,
    US_PER_S,
    USER_WINDOWS,
    W30D,
    Window,
    count_name,
    epoch_us,
)
from streaming.archiver import EVENT_SCHEMA, ITEM_SCHEMA, event_log_dirs, load_catalog
from streamrec.contract import EventType
from streamrec.settings import Settings

__all__ = [
    "DEFAULT_DAYS",
    "ITEM_STATS",
    "PARTITION_COLUMN",
    "STATS_VIEWS",
    "USER_STATS",
    "HistoricalRun",
    "PreparedLog",
    "StatsView",
    "history_since",
    "item_stats",
    "materialize",
    "prepare_events",
    "read_catalog",
    "read_events",
    "realtime_as_of",
    "realtime_items",
    "realtime_users",
    "run_historical",
    "stats_days",
    "user_stats",
    "write_stats",
]

Progress = Callable[[str], None]

DEFAULT_DAYS = 2
"""Days a run computes by default: the day of its end so far, and the day before, which a
run early in the morning thereby completes."""

PARTITION_COLUMN = "date"
"""Partition column of the stats folders (``date=YYYY-MM-DD``), the UTC day of the row."""

_DAY = W30D.bucket_us
if any(w.bucket_us != _DAY for w in STATS_WINDOWS):
    raise RuntimeError("daily stats rows need every stats window to slide by one day")
_SPAN = max(w.n_buckets for w in STATS_WINDOWS)
"""Days an event stays in some stats window; on day ``day + _SPAN`` it gives a zero row."""

_GAP_US = SESSION_GAP // timedelta(microseconds=1)
_IMPRESSION = EventType.IMPRESSION.value
_CLICK = EventType.CLICK.value
_FEATURE_INPUTS = (
    "event_id",
    "event_type",
    "user_id",
    "item_id",
    "items",
    "ts",
    "session_id",
    "device",
    "country",
)
"""Columns of the log that some feature reads."""


@dataclass(frozen=True, slots=True)
class StatsView:
    """A batch feature view: its Feast name, join key and feature columns, in order.

    The Feast definitions (``feature_repo/user_stats.py``, ``item_stats.py``) declare the
    same names; a test holds the two to each other.

    Examples
    --------
    >>> ITEM_STATS.columns[:4]
    ('item_id', 'event_timestamp', 'popularity_7d', 'unique_users_7d')
    """

    name: str
    join_key: str
    features: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns of its Parquet rows (the partition column aside)."""
        return (self.join_key, TIMESTAMP_FIELD, *self.features)


USER_STATS = StatsView(
    "user_stats",
    "user_id",
    (
        *(count_name(t, w) for w in STATS_WINDOWS for t in COUNTED_TYPES),
        f"purchase_rate_{W30D.name}",
        "category_affinity",
        f"avg_price_{W30D.name}",
    ),
)
ITEM_STATS = StatsView(
    "item_stats",
    "item_id",
    tuple(
        name
        for w in STATS_WINDOWS
        for name in (f"popularity_{w.name}", f"unique_users_{w.name}", f"ctr_{w.name}")
    ),
)
STATS_VIEWS = (USER_STATS, ITEM_STATS)
_STATS_VIEW_NAMES = tuple(v.name for v in STATS_VIEWS)


# --- reading ------------------------------------------------------------------------------


def read_events(
    spark: SparkSession,
    settings: Settings,
    *,
    since: date | None = None,
    until: datetime | None = None,
) -> DataFrame:
    """The archived event log (columns of :data:`~streaming.archiver.EVENT_SCHEMA`): client
    events and served impressions (:func:`~streaming.archiver.event_log_dirs`).

    ``since`` (a UTC day, inclusive) and ``until`` (an instant, exclusive) bound event time;
    the day bounds prune ``date=`` folders unread. Archiver temporaries (``.``-prefixed) and
    ``_manifests`` are skipped, as Spark skips such names.
    """
    schema = from_arrow_schema(EVENT_SCHEMA)
    logs = [
        spark.read.option("basePath", str(root)).parquet(str(root))
        for root in event_log_dirs(settings)
        if root.is_dir() and next(root.glob("date=*/hour=*/part-*.parquet"), None) is not None
    ]
    if not logs:
        return spark.createDataFrame([], schema)
    log = reduce(DataFrame.unionByName, logs)
    if since is not None:
        log = log.where(F.col(PARTITION_COLUMN) >= F.lit(since))
    if until is not None:
        until = until.astimezone(UTC)
        log = log.where(F.col(PARTITION_COLUMN) <= F.lit(until.date())).where(
            F.col("ts") < F.lit(until)
        )
    return log.select(*schema.fieldNames())


def read_catalog(spark: SparkSession, settings: Settings) -> DataFrame:
    """The archived catalog, newest record per item (:func:`~streaming.archiver.load_catalog`)."""
    table = load_catalog(settings)
    if table.num_rows == 0:
        return spark.createDataFrame([], from_arrow_schema(ITEM_SCHEMA))
    return spark.createDataFrame(table)


def _bucket(column: str, window: Window) -> Column:
    # Exact floor division of longs (also before 1970): `/` would go through doubles.
    width = window.bucket_us
    return F.expr(f"({column} - pmod({column}, {width})) div {width}")


def prepare_events(events: DataFrame) -> DataFrame:
    """One record per event id, with ``ts_us`` and ``session`` ("" when absent).

    Keeps the first record of each id by ``(kafka_partition, kafka_offset)``.
    """
    first = events.groupBy("event_id").agg(
        F.min_by(F.struct(*_FEATURE_INPUTS), F.struct("kafka_partition", "kafka_offset")).alias("e")
    )
    return first.select(
        "e.event_id",
        "e.event_type",
        "e.user_id",
        "e.item_id",
        "e.items",
        F.unix_micros("e.ts").alias("ts_us"),
        F.coalesce("e.session_id", F.lit("")).alias("session"),
        "e.device",
        "e.country",
    )


class PreparedLog:
    """:func:`prepare_events` of the log from a UTC day up to an instant, shared by jobs.

    ``batch all`` runs the historical job (the stats windows, 30 days and more) and the
    graph job (``graph_days``) over the same log. Alone, each lists and reads every Parquet
    file of its window and deduplicates it, a shuffle of every event; sharing one persisted
    copy does that once (measured on 1M events: the graph job's read went from about half
    a minute to a few seconds). A job takes its window with a filter on event time, which
    keeps exactly the events it would have prepared itself: the day bounds of
    :func:`read_events` are event-time bounds, and copies of an event share its time.

    The copy is computed on the first :meth:`events` and held until :meth:`release` (or
    the end of the Spark session).
    """

    def __init__(self, since: date, until: datetime) -> None:
        if until.tzinfo is None:
            raise ValueError("until must be timezone-aware")
        self.since = since
        self.until = until.astimezone(UTC)
        self._events: DataFrame | None = None

    def covers(self, since: date, until: datetime) -> bool:
        """Whether a job reading ``[since, until)`` can take its events from here."""
        return since >= self.since and until.astimezone(UTC) == self.until

    def events(self, spark: SparkSession, settings: Settings, since: date) -> DataFrame:
        """The prepared events of the days from ``since`` on (within :meth:`covers`)."""
        if since < self.since:
            raise ValueError(f"the shared log starts on {self.since}, after {since}")
        if self._events is None:
            log = read_events(spark, settings, since=self.since, until=self.until)
            self._events = prepare_events(log).persist()
        if since == self.since:
            return self._events
        start = datetime(since.year, since.month, since.day, tzinfo=UTC)
        return self._events.where(F.col("ts_us") >= epoch_us(start))

    def release(self) -> None:
        """Drop the persisted copy (if the session that holds it still runs)."""
        if self._events is not None and SparkSession.getActiveSession() is not None:
            self._events.unpersist()
        self._events = None


def _no_items() -> Column:
    # Columns need a running session, so this one is built on use, not at import.
    return F.array().cast("array<string>")


def _item_events(events: DataFrame) -> DataFrame:
    """One row per (event, item it counts for): ``event_items`` of the definitions."""
    items = (
        F.when(F.size("items") > 0, F.array_distinct("items"))
        .when(F.col("item_id").isNotNull(), F.array("item_id"))
        .otherwise(_no_items())
    )
    return events.select(
        "event_id", "event_type", "user_id", "ts_us", F.explode(items).alias("item_id")
    )


# --- real-time windows --------------------------------------------------------------------


def _newest_key() -> Column:
    return F.struct("ts_us", "event_id")


def _window_counts(windows: Sequence[Window]) -> list[Column]:
    """Aggregates of the windowed counts, over rows that carry their entity's ``anchor``."""
    lows = {w: _bucket("anchor", w) - (w.n_buckets - 1) for w in windows}
    return [
        F.count(
            F.when((F.col("event_type") == t.value) & (_bucket("ts_us", w) >= lows[w]), True)
        ).alias(count_name(t, w))
        for w in windows
        for t in COUNTED_TYPES
    ]


def _with_anchor(events: DataFrame, key: str) -> DataFrame:
    return events.withColumn("anchor", F.max("ts_us").over(SparkWindow.partitionBy(key)))


def _newest_value(column: str) -> Column:
    """Value of the newest event that has one; "" when none has."""
    present = F.when(F.col(column).isNotNull(), _newest_key())
    return F.coalesce(F.max_by(column, present), F.lit("")).alias(f"last_{column}")


def _seconds(micros: Column) -> Column:
    # long / long is double division in Spark, rounded like Python's int / int.
    return micros / F.lit(US_PER_S)


def realtime_users(events: DataFrame, catalog: DataFrame) -> DataFrame:
    """``user_realtime`` rows, as of each user's newest event (see the module docstring).

    ``events`` comes from :func:`prepare_events`; ``catalog`` has ``item_id`` and
    ``category`` (items it lacks have the category "").
    """
    core = (
        _with_anchor(events, "user_id")
        .groupBy("user_id")
        .agg(
            F.max("anchor").alias("anchor"),
            *_window_counts(USER_WINDOWS),
            _newest_value("device"),
            _newest_value("country"),
        )
    )
    newest_per_item = (
        events.where(F.col("event_type") != _IMPRESSION)
        .groupBy("user_id", "item_id")
        .agg(F.max(_newest_key()).alias("key"))
    )
    recent = newest_per_item.groupBy("user_id").agg(
        F.slice(
            F.sort_array(F.collect_list(F.struct("key", "item_id")), asc=False),
            1,
            RECENT_ITEMS_MAX,
        )
        .getField("item_id")
        .alias("recent_items")
    )
    categories = catalog.select(
        F.col("item_id").alias("head"), F.col("category").alias("last_category")
    )
    recent = recent.withColumn("head", F.try_element_at("recent_items", F.lit(1))).join(
        F.broadcast(categories), "head", "left"
    )
    return (
        core.join(recent, "user_id", "left")
        .join(_newest_session(events), "user_id")
        .select(
            "user_id",
            F.timestamp_micros(F.col("anchor")).alias(TIMESTAMP_FIELD),
            *(count_name(t, w) for w in USER_WINDOWS for t in COUNTED_TYPES),
            F.coalesce("recent_items", _no_items()).alias("recent_items"),
            F.coalesce("last_category", F.lit("")).alias("last_category"),
            "last_device",
            "last_country",
            "session_events",
            _seconds(F.col("session_duration_us")).alias("session_duration_s"),
            _seconds(F.col("anchor")).alias("last_event_ts"),
        )
    )


def _newest_session(events: DataFrame) -> DataFrame:
    """Per user, ``session_events`` and ``session_duration_us`` of the newest event's session.

    Runs of one session id split where consecutive events (in time order) are more than the
    gap apart; a run is named by its first event time. The newest event's run is the run
    holding the largest ``(ts, event_id)``.
    """
    in_session = SparkWindow.partitionBy("user_id", "session").orderBy("ts_us", "event_id")
    previous = F.lag("ts_us").over(in_session)
    starts = events.withColumn(
        "start",
        F.when(previous.isNull() | (F.col("ts_us") - previous > _GAP_US), F.col("ts_us")),
    )
    runs = (
        starts.withColumn(
            "run",
            F.max("start").over(in_session.rowsBetween(SparkWindow.unboundedPreceding, 0)),
        )
        .groupBy("user_id", "session", "run")
        .agg(
            F.count(F.lit(1)).alias("events"),
            (F.max("ts_us") - F.col("run")).alias("duration"),
            F.max(_newest_key()).alias("key"),
        )
    )
    newest = runs.groupBy("user_id").agg(F.max_by(F.struct("events", "duration"), "key").alias("s"))
    return newest.select(
        "user_id",
        F.col("s.events").alias("session_events"),
        F.col("s.duration").alias("session_duration_us"),
    )


def realtime_items(events: DataFrame) -> DataFrame:
    """``item_realtime`` rows, as of each item's newest event (``events``: prepared)."""
    per_item = _item_events(events)
    counted = (
        _with_anchor(per_item, "item_id")
        .groupBy("item_id")
        .agg(F.max("anchor").alias("anchor"), *_window_counts(ITEM_WINDOWS))
    )
    return counted.select(
        "item_id",
        F.timestamp_micros(F.col("anchor")).alias(TIMESTAMP_FIELD),
        *(count_name(t, w) for w in ITEM_WINDOWS for t in COUNTED_TYPES),
        *(
            _smoothed_ctr(
                F.col(count_name(EventType.CLICK, w)), F.col(count_name(EventType.IMPRESSION, w))
            ).alias(f"ctr_{w.name}")
            for w in ITEM_WINDOWS
        ),
        _seconds(F.col("anchor")).alias("last_event_ts"),
    )


def _smoothed_ctr(clicks: Column, impressions: Column) -> Column:
    """:func:`features.definitions.smoothed_ctr` as a column, same operations, same doubles."""
    return (clicks + F.lit(CTR_PRIOR_CLICKS)) / (impressions + F.lit(CTR_PRIOR_IMPRESSIONS))


def realtime_as_of(events: DataFrame, catalog: DataFrame) -> tuple[DataFrame, DataFrame]:
    """``(user_realtime, item_realtime)`` rows of the log's final state, columns as the views.

    ``events`` is the raw log (:func:`read_events`); each entity's row is as of its newest
    event. Equal to the stream engine's rows when no event was too late (module docstring).
    """
    prepared = prepare_events(events)
    return realtime_users(prepared, catalog), realtime_items(prepared)


# --- daily statistics ---------------------------------------------------------------------


def stats_days(end: datetime, days: int = DEFAULT_DAYS) -> tuple[date, ...]:
    """The UTC days a run ending at ``end`` computes: ``days`` of them, the last holding
    ``end``'s last included instant."""
    if days < 1:
        raise ValueError("a run computes at least one day")
    last = (EPOCH + timedelta(microseconds=epoch_us(end) - 1)).date()
    return tuple(last - timedelta(days=n) for n in range(days - 1, -1, -1))


def history_since(end: datetime, days: int = DEFAULT_DAYS) -> date:
    """The first UTC day of the log a run of ``days`` days up to ``end`` reads: its first
    day's windows reach back :data:`_SPAN` days."""
    return stats_days(end, days)[0] - timedelta(days=_SPAN)


def _day_index(day: date) -> int:
    return (day - EPOCH.date()).days


def _spread(daily: DataFrame, first: int, last: int, until: Column | None = None) -> DataFrame:
    """Repeat each per-day row for every output day ``D`` whose windows can see it.

    ``until`` stops a row's repetition earlier, at that day.
    """
    low = F.greatest(F.col("day"), F.lit(first))
    high = F.least(F.col("day") + _SPAN, F.lit(last))
    if until is not None:
        high = F.least(high, until)
    # sequence() counts down when low > high: such rows have no day to go to.
    return daily.where(low <= high).withColumn("D", F.explode(F.sequence(low, high)))


def _in(window: Window) -> Column:
    """Whether a spread row's event day falls in ``window`` as of its output day."""
    return F.col("day") > F.col("D") - window.n_buckets


def _sum_in(window: Window, column: str) -> Column:
    return F.sum(F.when(_in(window), F.col(column)).otherwise(0))


def _stamp_and_date(end_us: int) -> list[Column]:
    next_day = (F.col("D") + 1) * F.lit(_DAY)
    return [
        F.timestamp_micros(F.least(next_day, F.lit(end_us))).alias(TIMESTAMP_FIELD),
        F.date_from_unix_date(F.col("D").cast("int")).alias(PARTITION_COLUMN),
    ]


def _stats_input(events: DataFrame, days: Sequence[date], end: datetime) -> DataFrame:
    """The prepared events a run over ``days`` sees, with their UTC day index ``day``."""
    return (
        events.where(F.col("ts_us") < epoch_us(end))
        .withColumn("day", _bucket("ts_us", W30D))
        .where(F.col("day") >= _day_index(days[0]) - _SPAN)
    )


def user_stats(
    events: DataFrame, catalog: DataFrame, days: Sequence[date], end: datetime
) -> DataFrame:
    """``user_stats`` rows of ``days`` (module docstring); ``events`` from :func:`prepare_events`.

    Affinity and prices use the catalog's category and price of each non-impression event's
    item; items the catalog lacks count in neither (nor do unpriced ones in the price).
    """
    first, last, end_us = _day_index(days[0]), _day_index(days[-1]), epoch_us(end)
    acted = F.col("event_type") != _IMPRESSION
    ev = _stats_input(events, days, end).join(
        F.broadcast(catalog.select("item_id", "category", "price")), "item_id", "left"
    )
    daily = ev.groupBy("user_id", "day").agg(
        *(
            F.count(F.when(F.col("event_type") == t.value, True)).alias(t.value)
            for t in COUNTED_TYPES
        ),
        F.sum(F.when(acted, F.col("price"))).alias("price_sum"),
        F.count(F.when(acted, F.col("price"))).alias("priced"),
    )
    totals = (
        _spread(daily, first, last)
        .groupBy("user_id", "D")
        .agg(
            *(
                _sum_in(w, t.value).alias(count_name(t, w))
                for w in STATS_WINDOWS
                for t in COUNTED_TYPES
            ),
            _sum_in(W30D, "price_sum").alias("price_sum"),
            _sum_in(W30D, "priced").alias("priced"),
        )
    )
    per_category = (
        _spread(
            ev.where(acted & F.col("category").isNotNull())
            .groupBy("user_id", "day", "category")
            .agg(F.count(F.lit(1)).alias("n")),
            first,
            last,
        )
        .where(_in(W30D))
        .groupBy("user_id", "D", "category")
        .agg(F.sum("n").alias("n"))
    )
    affinity = (
        per_category.groupBy("user_id", "D")
        .agg(
            F.sort_array(F.collect_list(F.struct("category", "n"))).alias("counts"),
            F.sum("n").alias("total"),
        )
        .select(
            "user_id",
            "D",
            F.to_json(
                F.map_from_entries(
                    F.transform(
                        "counts", lambda c: F.struct(c["category"], c["n"] / F.col("total"))
                    )
                )
            ).alias("category_affinity"),
        )
    )
    views = F.col(count_name(EventType.VIEW, W30D))
    purchases = F.col(count_name(EventType.PURCHASE, W30D))
    rows = totals.join(affinity, ["user_id", "D"], "left").select(
        "user_id",
        *_stamp_and_date(end_us),
        *(count_name(t, w) for w in STATS_WINDOWS for t in COUNTED_TYPES),
        F.when(views > 0, purchases / views).otherwise(F.lit(0.0)).alias(USER_STATS.features[-3]),
        F.coalesce("category_affinity", F.lit("{}")).alias("category_affinity"),
        F.when(F.col("priced") > 0, F.col("price_sum") / F.col("priced")).alias(
            USER_STATS.features[-1]
        ),
    )
    return rows.select(*USER_STATS.columns, PARTITION_COLUMN)


def item_stats(events: DataFrame, days: Sequence[date], end: datetime) -> DataFrame:
    """``item_stats`` rows of ``days`` (module docstring); ``events`` from :func:`prepare_events`.

    Popularity and unique users count non-impression events; the CTR counts clicks against
    impressions, one per distinct item listed, like the real-time ``ctr_*``.
    """
    first, last, end_us = _day_index(days[0]), _day_index(days[-1]), epoch_us(end)
    ev = _item_events(_stats_input(events, days, end)).withColumn("day", _bucket("ts_us", W30D))
    acted = F.col("event_type") != _IMPRESSION
    daily = ev.groupBy("item_id", "day").agg(
        F.count(F.when(acted, True)).alias("popularity"),
        F.count(F.when(F.col("event_type") == _CLICK, True)).alias("clicks"),
        F.count(F.when(F.col("event_type") == _IMPRESSION, True)).alias("impressions"),
    )
    counts = (
        _spread(daily, first, last)
        .groupBy("item_id", "D")
        .agg(
            *(
                _sum_in(w, c).alias(f"{c}_{w.name}")
                for w in STATS_WINDOWS
                for c in ("popularity", "clicks", "impressions")
            )
        )
    )
    # A user is in an item's window when the user's latest visit up to D is: spreading each
    # visit only until the day before the next one gives one row per (item, user, D), which
    # a plain count then counts, instead of a distinct count over every visit.
    visits = ev.where(acted).select("item_id", "user_id", "day").distinct()
    later = SparkWindow.partitionBy("item_id", "user_id").orderBy("day")
    visitors = (
        _spread(
            visits.withColumn("until", F.lead("day").over(later) - 1),
            first,
            last,
            until=F.col("until"),
        )
        .groupBy("item_id", "D")
        .agg(
            *(F.count(F.when(_in(w), True)).alias(f"unique_users_{w.name}") for w in STATS_WINDOWS)
        )
    )
    rows = counts.join(visitors, ["item_id", "D"], "left").select(
        "item_id",
        *_stamp_and_date(end_us),
        *(
            column
            for w in STATS_WINDOWS
            for column in (
                F.col(f"popularity_{w.name}"),
                F.coalesce(F.col(f"unique_users_{w.name}"), F.lit(0)).alias(
                    f"unique_users_{w.name}"
                ),
                _smoothed_ctr(F.col(f"clicks_{w.name}"), F.col(f"impressions_{w.name}")).alias(
                    f"ctr_{w.name}"
                ),
            )
        ),
    )
    return rows.select(*ITEM_STATS.columns, PARTITION_COLUMN)


def write_stats(rows: DataFrame, folder: Path) -> None:
    """Replace the ``date=`` partitions of ``folder`` that ``rows`` holds; keep the others."""
    (
        rows.write.mode("overwrite")
        .option("partitionOverwriteMode", "dynamic")
        .partitionBy(PARTITION_COLUMN)
        .parquet(str(folder))
    )


# --- the job ------------------------------------------------------------------------------


@dataclass
class HistoricalRun:
    """What :func:`run_historical` did: the days, rows per view, and seconds per phase.

    Examples
    --------
    >>> run = HistoricalRun(datetime(2026, 3, 2, tzinfo=UTC), (date(2026, 3, 1),), 1200,
    ...                     {"user_stats": 80}, {"read": 4.2})
    >>> for line in run.lines():
    ...     print(line)
    days 2026-03-01 as of 2026-03-02T00:00:00+00:00
    distinct events read: 1,200
    user_stats: 80 rows
    read: 4.2 s
    """

    end: datetime
    days: tuple[date, ...]
    events: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        span = f"{self.days[0]}..{self.days[-1]}" if len(self.days) > 1 else f"{self.days[0]}"
        out = [
            f"days {span} as of {self.end.isoformat()}",
            f"distinct events read: {self.events:,}",
        ]
        out += [f"{view}: {n:,} rows" for view, n in self.rows.items()]
        out += [f"{phase}: {s:.1f} s" for phase, s in self.seconds.items()]
        return out


def _silent(message: str) -> None:
    """Progress sink of a run nobody watches."""


@contextmanager
def _timed(run: HistoricalRun, phase: str, progress: Progress) -> Iterator[None]:
    progress(f"{phase} ...")
    started = time.perf_counter()
    yield
    run.seconds[phase] = time.perf_counter() - started
    progress(f"{phase}: {run.seconds[phase]:.1f} s")


def run_historical(
    spark: SparkSession,
    settings: Settings,
    *,
    end: datetime | None = None,
    days: int = DEFAULT_DAYS,
    online: bool = True,
    progress: Progress | None = None,
    log: PreparedLog | None = None,
) -> HistoricalRun:
    """Compute ``user_stats`` and ``item_stats`` for ``days`` days up to ``end``, write them.

    Parameters
    ----------
    spark
        The session (:func:`features.spark_session.spark_session`).
    settings
        The home: event log, catalog, feature store (whose registry must exist:
        :func:`features.store.apply_repo`).
    end
        Events before this instant count (default: now); the last row of each entity is
        as of it.
    days
        Rows per entity, one per UTC day, ending with the day of ``end`` (30 or more to
        backfill training history).
    online
        Also :func:`materialize` the rows into the online store.
    progress
        Called with a line of text as phases start and end.
    log
        A log shared with other jobs of the run; used when it covers this job's window
        (:func:`history_since` to ``end``), else the job reads its own.
    """
    from features.store import OnlineFeatureWriter  # Feast takes seconds to import

    if end is not None and end.tzinfo is None:
        raise ValueError("end must be timezone-aware")
    report = progress or _silent
    end = (end or datetime.now(UTC)).astimezone(UTC)
    run = HistoricalRun(end=end, days=stats_days(end, days))
    with OnlineFeatureWriter(settings) as store:
        folders = {view.name: store.offline_folder(view.name) for view in STATS_VIEWS}
    since = history_since(end, days)
    shared = log is not None and log.covers(since, end)
    with _timed(run, "read", report):
        if log is not None and shared:
            events = log.events(spark, settings, since)
        else:
            events = prepare_events(read_events(spark, settings, since=since, until=end)).persist()
        run.events = events.count()
        catalog = read_catalog(spark, settings).persist()
    jobs = {
        USER_STATS.name: lambda: user_stats(events, catalog, run.days, end),
        ITEM_STATS.name: lambda: item_stats(events, run.days, end),
    }
    for name, build in jobs.items():
        with _timed(run, name, report):
            rows = build().persist()
            run.rows[name] = rows.count()
            write_stats(rows, folders[name])
            rows.unpersist()
    if not shared:
        events.unpersist()
    catalog.unpersist()
    if online:
        with _timed(run, "materialize", report):
            materialize(settings, end)
    return run


def materialize(
    settings: Settings,
    end: datetime,
    *,
    start: datetime | None = None,
    views: Sequence[str] = _STATS_VIEW_NAMES,
) -> None:
    """Load each entity's newest row stamped in ``[start, end]`` into the online store.

    ``start`` defaults to ``end`` minus the longest TTL of ``views``: older rows would be
    expired for a point-in-time join anyway.
    """
    from features.store import feature_store  # Feast takes seconds to import

    store = feature_store(settings)
    if start is None:
        ttl = max(store.get_feature_view(name).ttl for name in views)
        start = end - ttl
    store.materialize(start_date=start, end_date=end, feature_views=list(views))
