"""``streamrec backfill``: rebuild the real-time online features from the Parquet event log.

Registered on the main app::

    app.command("backfill")(backfill_command)

Progress goes to stderr, the report (counts, seconds per phase, ``events_per_s``) is the last
stdout line as JSON. The work is :func:`features.backfill.backfill`; see its module for what
is rebuilt, from which days, and why the feature writer should be stopped meanwhile.

Examples
--------
>>> from typer.testing import CliRunner
>>> import typer
>>> app = typer.Typer()
>>> _ = app.command("backfill")(backfill_command)
>>> "--from" in CliRunner().invoke(app, ["--help"]).output
True
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Annotated

import typer

from streamrec.settings import Settings, get_settings

__all__ = ["backfill_command", "feature_writer_members"]

def _progress(message: str) -> None:
    typer.echo(f"[{datetime.now():%H:%M:%S}] {message}", err=True)


def _day(value: datetime | None) -> date | None:
    return value.date() if value is not None else None


def feature_writer_members(settings: Settings, timeout_s: float = 3.0) -> int | None:
    """Members of the feature writer's consumer group; ``None`` when Kafka does not answer.

    Kept here, free of Feast, so that a refusal comes before the heavy imports.
    """
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap.split(","),
            request_timeout_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
            client_id="streamrec-backfill",
        )
    except (KafkaError, OSError, ValueError):
        return None
    try:
        groups = admin.describe_groups([settings.feature_writer_group])
        return len(groups.get(settings.feature_writer_group, {}).get("members") or [])
    except (KafkaError, OSError):
        return None
    finally:
        admin.close()


def backfill_command(
    from_day: Annotated[
        datetime | None,
        typer.Option(
            "--from", formats=["%Y-%m-%d"],
            help="First UTC day of the log to read (default: the oldest). Later is faster; "
            "exact for entities active only since then.",
        ),
    ] = None,
    to_day: Annotated[
        datetime | None,
        typer.Option(
            "--to", formats=["%Y-%m-%d"],
            help="Last UTC day to read (default: the newest): the rows as of that day's end. "
            "Newer rows already online are kept.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Run even while the feature writer's consumer group has members."
        ),
    ] = False,
) -> None:
    """Rebuild user/item real-time features from the event log into the online store."""
    if from_day is not None and to_day is not None and from_day > to_day:
        raise typer.BadParameter("--from is after --to", param_hint="--from")
    settings = get_settings()
    if not force:
        members = feature_writer_members(settings)
        if members:
            typer.echo(
                f"error: the feature writer is running ({members} member(s) in consumer group "
                f"'{settings.feature_writer_group}'); stop it first "
                "(docker compose stop feature-writer) or pass --force",
                err=True,
            )
            raise typer.Exit(1)
        if members is None:
            _progress(
                f"could not reach Kafka at {settings.kafka_bootstrap} to check that the "
                "feature writer is stopped; make sure it is"
            )
    from features.backfill import backfill

    report = backfill(
        settings, first_day=_day(from_day), last_day=_day(to_day), progress=_progress
    )
    _progress(
        f"wrote {report.users:,} user and {report.items:,} item rows from "
        f"{report.events:,} events ({report.duplicates:,} duplicates) in {report.total_s:.1f}s"
    )
    typer.echo(json.dumps(report.to_dict()))
