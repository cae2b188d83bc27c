"""``streamrec dlq replay``: send dead-lettered records back to their source topic.

Registered on the ``dlq`` group of the main app (next to ``dlq show``)::

    dlq_app.command("replay")(replay_command)

The logic lives in :mod:`streaming.dlq_replay`; this module only parses options and prints:
one JSON line per record with ``--dry-run`` (what would happen to it), then the counts as
the last stdout line.

Examples
--------
>>> from typer.testing import CliRunner
>>> import typer
>>> app = typer.Typer()
>>> _ = app.command("replay")(replay_command)
>>> "--fixed-file" in CliRunner().invoke(app, ["--help"]).output
True
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from streamrec.settings import get_settings

__all__ = ["replay_command"]


def replay_command(
    topic: Annotated[
        str, typer.Argument(help="Source topic, e.g. 'events' (replays events.dlq).")
    ],
    fixed_file: Annotated[
        Path | None,
        typer.Option(
            "--fixed-file",
            exists=True,
            dir_okay=False,
            help="JSON lines of corrected records: `dlq show` lines with `value` fixed "
            "(matched by source position) or bare records (matched by event_id / item_id).",
        ),
    ] = None,
    replay_all: Annotated[
        bool,
        typer.Option(
            "--all", help="Re-drive records without a fix as they are (after a consumer fix)."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would happen; send and commit nothing.")
    ] = False,
) -> None:
    """Re-drive dead-lettered records to their source topic, validated, each one once."""
    from streaming.dlq_replay import Fixes, Outcome, replay_dlq

    if fixed_file is None and not replay_all:
        raise typer.BadParameter("give --fixed-file, --all, or both", param_hint="options")
    try:
        fixes = Fixes.load(fixed_file) if fixed_file is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fixed-file") from None

    def show(outcome: Outcome) -> None:
        typer.echo(json.dumps(outcome.to_dict(), ensure_ascii=False))

    settings = get_settings()
    started = time.perf_counter()
    report = replay_dlq(
        settings, topic, fixes=fixes, replay_all=replay_all, dry_run=dry_run,
        on_outcome=show if dry_run else None,
    )
    summary = {**report.to_dict(), "total_s": round(time.perf_counter() - started, 2)}
    typer.echo(
        f"{settings.dlq_topic(topic)}: {report.sent} sent, {report.skipped} skipped, "
        f"{report.still_invalid} still invalid, {report.duplicates} duplicate copies"
        + (" (dry run: nothing sent or committed)" if dry_run else ""),
        err=True,
    )
    typer.echo(json.dumps(summary))
