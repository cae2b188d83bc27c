"""The SparkSession every streamrec batch job runs in.

One place decides how Spark is started, so the jobs (historical features, the item graph,
text embeddings) and their tests behave alike: any master (``local[*]`` by default, a
``spark://`` or ``yarn`` master for scale), UTC session time (the event log and every
feature are UTC; a local time zone would move daily buckets), Parquet timestamps as
microseconds (what pyarrow, Feast and the event log use) rather than the legacy INT96,
and quiet logs.

A local master also gets what a laptop or a CI box needs: workers run this very Python
(PYSPARK_PYTHON; the system Python lacks pyarrow), everything binds to 127.0.0.1, no web
UI, and a few shuffle partitions instead of 200, which would cost more in task overhead
than the data of a local run does in work. Startup takes 5-10 s on two cores.

Examples
--------
>>> spark = spark_session(master="local[1]")  # doctest: +SKIP
>>> spark.range(3).count()  # doctest: +SKIP
3
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pyspark.sql import SparkSession

from streamrec.settings import Settings, get_settings

__all__ = ["is_local", "spark_session"]

_LOCAL_PARALLELISM_FACTOR = 2
"""Shuffle partitions per core in local mode: enough to keep every core busy when one task
is skewed, few enough that a small job is not dominated by scheduling."""

_LOG4J2 = """\
# Written by features/spark_session.py: only errors, on stderr.
rootLogger.level = error
# Spark prints a banner when its own loggers have no level of their own.
logger.spark.name = org.apache.spark
logger.spark.level = error
rootLogger.appenderRef.stderr.ref = stderr
appender.console.type = Console
appender.console.name = stderr
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n%ex
"""


def _log4j2_file() -> Path:
    """A log4j2 configuration that keeps Spark to errors from the JVM's first line on.

    ``setLogLevel`` only acts once the session is up, after Spark's start-up chatter.
    """
    path = Path(tempfile.gettempdir()) / "streamrec-spark-log4j2.properties"
    if not path.exists() or path.read_text() != _LOG4J2:
        staged = path.with_name(f".{path.name}.{os.getpid()}")
        staged.write_text(_LOG4J2)
        staged.replace(path)  # atomic: parallel starts never read half a file
    return path


def is_local(master: str) -> bool:
    """Whether ``master`` runs Spark inside this machine (``local``, ``local[4]``, ...).

    Examples
    --------
    >>> is_local("local[*]"), is_local("spark://head:7077")
    (True, False)
    """
    return master == "local" or master.startswith("local[")


def _local_cores(master: str) -> int:
    inside = master.partition("[")[2].partition("]")[0].partition(",")[0]
    if inside.isdigit():
        return int(inside)
    return 1 if master == "local" else os.cpu_count() or 1


def spark_session(
    settings: Settings | None = None,
    *,
    master: str | None = None,
    app_name: str = "streamrec",
) -> SparkSession:
    """Start (or reuse) the SparkSession of this process.

    Parameters
    ----------
    settings
        ``spark_master`` and ``spark_driver_memory`` come from here; default:
        :func:`~streamrec.settings.get_settings`.
    master
        Overrides ``settings.spark_master`` (``STREAMREC_SPARK_MASTER``, default
        ``local[*]``).
    app_name
        Name shown by the cluster manager.

    Notes
    -----
    Spark allows one active session per process: if one is running already it is returned,
    with this function's SQL options applied to it, and its master is kept.
    """
    settings = settings or get_settings()
    master = master or settings.spark_master
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", settings.spark_driver_memory)
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_log4j2_file()}")
    )
    if is_local(master):
        # Workers of a local master are child processes: they must run this interpreter.
        os.environ["PYSPARK_PYTHON"] = sys.executable
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (
            builder.config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            # Listing the log's date=/hour= folders in a Spark job pays off on a remote file
            # system; on a local disk the job costs more than the listing it spreads.
            .config("spark.sql.sources.parallelPartitionDiscovery.threshold", "100000")
            .config(
                "spark.sql.shuffle.partitions",
                str(_LOCAL_PARALLELISM_FACTOR * _local_cores(master)),
            )
        )
    else:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
