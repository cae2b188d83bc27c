"""``streamrec batch``: the Spark jobs that rebuild features from the event log.

Register it on the main app::

    app.add_typer(batch_app, name="batch")

Every command runs one or more *steps* in one Spark session (``--master``, or
``STREAMREC_SPARK_MASTER``, default ``local[*]``): progress lines go to stderr as the steps
run, then each step's summary (rows written, seconds per phase) to stdout. A step is a
function ``(spark, settings, progress) -> summary lines``; a job of several steps (an
``all`` command running the historical features, the item graph and the text embeddings
in order) passes all of them to :func:`run_steps` and so shares the session start-up.

Examples
--------
>>> from typer.testing import CliRunner
>>> result = CliRunner().invoke(batch_app, ["historical", "--help"])
>>> "--master" in result.output
True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from streamrec.settings import Settings, get_settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from features.historical import PreparedLog

__all__ = [
    "Step",
    "all_command",
    "all_steps",
    "batch_app",
    "graph_command",
    "graph_step",
    "historical_command",
    "historical_step",
    "run_steps",
    "text_command",
]

Progress = Callable[[str], None]
Step = Callable[["SparkSession", Settings, Progress], Sequence[str]]
"""One batch step: given the session, the settings and a progress sink, do the work and
return the lines of its summary."""

batch_app = typer.Typer(
    help="Spark jobs that rebuild features from the Parquet event log.",
    no_args_is_help=True,
)


@batch_app.callback()
def _group() -> None:
    """Spark jobs that rebuild features from the Parquet event log."""
    # A callback keeps batch_app a group while it has a single command.


Master = Annotated[
    str | None,
    typer.Option(
        "--master",
        help="Spark master URL (local[*], spark://host:7077, yarn, ...); "
        "default: STREAMREC_SPARK_MASTER or local[*].",
    ),
]


End = Annotated[
    datetime | None,
    typer.Option(
        formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"],
        help="Count events before this instant (UTC unless it has an offset); default: now.",
    ),
]
Days = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Daily rows per entity, ending with the day of --end; default 2: finish "
        "yesterday, refresh today (30+ backfills training history).",
    ),
]
Online = Annotated[bool, typer.Option(help="Materialize the new rows into the online store.")]


def _utc(end: datetime | None) -> datetime | None:
    """``--end`` with a zone: UTC unless it was given with an offset."""
    return end.replace(tzinfo=UTC) if end is not None and end.tzinfo is None else end


def _progress(message: str) -> None:
    typer.echo(f"[{datetime.now():%H:%M:%S}] {message}", err=True)


def run_steps(
    steps: Mapping[str, Step],
    *,
    master: str | None = None,
    settings: Settings | None = None,
    progress: Progress = _progress,
) -> None:
    """Run ``steps`` in order in one Spark session and print each one's summary.

    The session is stopped afterwards unless it was already running (then it belongs to
    whoever started it, e.g. a notebook or a test).
    """
    from pyspark.sql import SparkSession

    from features.spark_session import spark_session

    settings = settings or get_settings()
    running = SparkSession.getActiveSession() is not None
    progress("starting Spark ...")
    started = time.perf_counter()
    spark = spark_session(settings, master=master)
    progress(
        f"Spark {spark.version} on {spark.sparkContext.master} "
        f"up in {time.perf_counter() - started:.1f} s"
    )
    try:
        for name, step in steps.items():
            progress(f"step {name} ...")
            began = time.perf_counter()
            lines = step(spark, settings, progress)
            typer.echo(f"{name} ({time.perf_counter() - began:.1f} s)")
            for line in lines:
                typer.echo(f"  {line}")
    finally:
        if not running:
            spark.stop()


def _ensure_registry(settings: Settings, progress: Progress) -> None:
    from features.store import apply_repo, registry_exists

    if not registry_exists(settings):
        progress("no feature registry yet: applying the Feast repository")
        apply_repo(settings)


def historical_step(
    end: datetime | None, days: int | None, online: bool, log: PreparedLog | None = None
) -> Step:
    """The step of ``historical``: daily ``user_stats``/``item_stats``, then materialize.

    ``days=None`` is :data:`features.historical.DEFAULT_DAYS`; ``log``, a log shared with
    the other steps of the job.
    """

    def step(spark: SparkSession, settings: Settings, progress: Progress) -> Sequence[str]:
        from features.historical import DEFAULT_DAYS, run_historical

        _ensure_registry(settings, progress)
        run = run_historical(
            spark,
            settings,
            end=end,
            days=days or DEFAULT_DAYS,
            online=online,
            progress=progress,
            log=log,
        )
        return run.lines()

    return step


@batch_app.command("historical")
def historical_command(
    master: Master = None, end: End = None, days: Days = None, online: Online = True
) -> None:
    """User and item 7/30-day statistics from the event log into Feast's offline and online
    stores. Re-running a day replaces its rows."""
    run_steps({"historical": historical_step(_utc(end), days, online)}, master=master)


def graph_step(end: datetime | None, online: bool, log: PreparedLog | None = None) -> Step:
    """The step of ``graph``: the item graph, its vectors and ``item_neighbors`` (``log``,
    a log shared with the other steps of the job)."""

    def step(spark: SparkSession, settings: Settings, progress: Progress) -> Sequence[str]:
        from features.item_graph import run_graph

        _ensure_registry(settings, progress)
        return run_graph(
            spark, settings, end=end, online=online, progress=progress, log=log
        ).lines()

    return step


@batch_app.command("graph")
def graph_command(master: Master = None, end: End = None, online: Online = True) -> None:
    """The item co-occurrence graph of the last STREAMREC_GRAPH_DAYS days: random-walk
    Word2Vec vectors (offline/item_graph_vectors, for the text job) and the item_neighbors
    view. Re-running a day replaces its rows."""
    run_steps({"graph": graph_step(_utc(end), online)}, master=master)


@batch_app.command("text")
def text_command(master: Master = None, end: End = None, online: Online = True) -> None:
    """MiniLM text vectors of the catalog, the text-to-graph projection of cold-start items,
    and the item_embeddings / item_profile views. Re-running a day replaces its rows."""
    from features.text_batch import text_step

    run_steps({"text": text_step(_utc(end), online)}, master=master)


def all_steps(
    end: datetime, days: int | None, online: bool, settings: Settings
) -> tuple[dict[str, Step], PreparedLog]:
    """The steps of ``all`` and the log the first two share: release it after the run.

    Historical features, then the item graph, then the text embeddings, all as of
    ``end``; the event log is read and deduplicated once, for the widest window of the two
    log jobs.
    """
    from features.historical import DEFAULT_DAYS, PreparedLog, history_since
    from features.item_graph import graph_start
    from features.text_batch import text_step

    since = min(
        history_since(end, days or DEFAULT_DAYS), graph_start(end, settings.graph_days).date()
    )
    log = PreparedLog(since, end)
    steps = {
        "historical": historical_step(end, days, online, log),
        "graph": graph_step(end, online, log),
        "text": text_step(end, online),
    }
    return steps, log


@batch_app.command("all")
def all_command(
    master: Master = None, end: End = None, days: Days = None, online: Online = True
) -> None:
    """Historical features, then the item graph, then the text embeddings, in one Spark
    session that reads and deduplicates the event log once for the first two."""
    settings = get_settings()
    # One instant for every step, so their rows line up in time.
    steps, log = all_steps(_utc(end) or datetime.now(UTC), days, online, settings)
    try:
        run_steps(steps, master=master, settings=settings)
    finally:
        log.release()
