"""``streamrec worker learner``: the online learner's command (imports stay inside it).

Registered on the main app with ``worker_app.command("learner")(learner_command)``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Annotated

import typer

__all__ = ["learner_command"]


def learner_command(
    max_idle_s: Annotated[
        float | None, typer.Option(help="Exit after this long without input (default: never).")
    ] = None,
) -> None:
    """Learn the River online model from impressions and actions (ONE replica per deployment).

    Snapshots go to the model registry as kind ``online`` (promoted); drift writes
    ``<home>/state/retrain-requested``.
    """
    from features.store import apply_repo, registry_exists
    from streaming.learner import OnlineLearner
    from streamrec.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    if not registry_exists(settings):
        typer.echo("no Feast registry yet: applying feature_repo/ first", err=True)
        apply_repo(settings)
    learner = OnlineLearner(settings)
    stats = learner.run(max_idle_s=max_idle_s, metrics_port=settings.metrics_port)
    typer.echo(json.dumps({**asdict(stats), "version": learner.version,
                           **learner.model.metrics()}))

