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

__all__ = ["Step", "batch_app", "historical_command", "historical_step", "run_steps"]

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


def historical_step(end: datetime | None, days: int | None, online: bool) -> Step:
    """The step of ``historical``: daily ``user_stats``/``item_stats``, then materialize.

    ``days=None`` is :data:`features.historical.DEFAULT_DAYS`.
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
        )
        return run.lines()

    return step


@batch_app.command("historical")
def historical_command(
    master: Master = None,
    end: Annotated[
        datetime | None,
        typer.Option(
            formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"],
            help="Count events before this instant (UTC unless it has an offset); default: now.",
        ),
    ] = None,
    days: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Daily rows per entity, ending with the day of --end; default 2: finish "
            "yesterday, refresh today (30+ backfills training history).",
        ),
    ] = None,
    online: Annotated[
        bool, typer.Option(help="Materialize the new rows into the online store.")
    ] = True,
) -> None:
    """User and item 7/30-day statistics from the event log into Feast's offline and online
    stores. Re-running a day replaces its rows."""
    if end is not None and end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    run_steps({"historical": historical_step(end, days, online)}, master=master)
