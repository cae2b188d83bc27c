"""``streamrec worker catalog``: text vectors (and graph-space vectors) of new catalog items.

Registered on the ``worker`` group of the main app (next to ``worker features``)::

    worker_app.command("catalog")(catalog_command)

The logic lives in :mod:`streaming.catalog_worker`; this module stays light (no Feast, no
PyTorch at import) so that ``streamrec --help`` remains instant.

Examples
--------
>>> from typer.testing import CliRunner
>>> import typer
>>> app = typer.Typer()
>>> _ = app.command("catalog")(catalog_command)
>>> "--max-idle-s" in CliRunner().invoke(app, ["--help"]).output
True
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Annotated

import typer

from streamrec.settings import get_settings

__all__ = ["catalog_command"]


def catalog_command(
    max_idle_s: Annotated[
        float | None, typer.Option(help="Exit after this long without input (default: never).")
    ] = None,
) -> None:
    """Embed new and changed catalog records and write them to Feast within seconds."""
    from features.store import apply_repo, registry_exists
    from streaming.catalog_worker import CatalogWorker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    if not registry_exists(settings):
        typer.echo("no Feast registry yet: applying feature_repo/ first", err=True)
        apply_repo(settings)
    stats = CatalogWorker(settings).run(max_idle_s=max_idle_s, metrics_port=settings.metrics_port)
    typer.echo(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                           for k, v in asdict(stats).items()}))
