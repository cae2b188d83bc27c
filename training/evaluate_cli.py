"""CLI of the offline evaluation: ``streamrec evaluate movielens PATH``.

Register it on the main app::

    from training.evaluate_cli import evaluate_app
    app.add_typer(evaluate_app, name="evaluate")

Progress goes to stderr; stdout gets a table and, as its last line, one JSON object keyed
by model (``ranker``, ``online``, ``popularity``, ``covisitation``, ``ease``), each with
``ndcg@10``, ``recall@10``, ``recall@50``, ``hr@10``, ``auc`` and ``fit_seconds`` (``null``
for a model left out with ``--models``).

Until it is registered: ``python -m training.evaluate_cli PATH [OPTIONS]``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from streamrec.settings import get_settings

if TYPE_CHECKING:
    from training.comparison import ModelResult

__all__ = ["evaluate_app", "evaluate_movielens"]

evaluate_app = typer.Typer(
    help="Offline evaluation: leave-one-out, full-catalog ranking, every model on one split.",
    no_args_is_help=True,
)

_COLUMNS = ("ndcg@10", "recall@10", "recall@50", "hr@10", "auc")
#: Co-visitation features the MovieLens ranker blends in: one per recent item, the
#: newest first (see ``RankerConfig.covisitation_recent``).
MOVIELENS_COVISITATION_RECENT = 10


def _log(message: str) -> None:
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _table(results: list[ModelResult]) -> str:
    header = f"{'model':<13}" + "".join(f"{c:>18}" for c in _COLUMNS) + f"{'fit s':>9}  params"
    lines = [header, "-" * len(header)]
    for r in results:
        cells = "".join(
            f"{r.metrics[c]:>10.4f} ± {r.stderr[c]:<5.4f}" if math.isfinite(r.stderr[c])
            else f"{r.metrics[c]:>18.4f}"
            for c in _COLUMNS
        )
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
        )
        lines.append(f"{r.name:<13}{cells}{r.fit_seconds:>9.1f}  {params}")
    return "\n".join(lines)


@evaluate_app.command("movielens")
def evaluate_movielens(
    path: Annotated[
        Path, typer.Argument(help="A MovieLens-100K folder (u.data) or 'latest' folder "
                                  "(ratings.csv)."),
    ],
    models: Annotated[
        str, typer.Option(help="Comma-separated: ranker, online, popularity, covisitation, "
                                "ease."),
    ] = "ranker,online,popularity,covisitation,ease",
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Most epochs of the ranker (early-stopped)."),
    ] = None,
    max_len: Annotated[
        int | None, typer.Option(min=1, help="Recent items the ranker reads (default 200)."),
    ] = None,
    covisitation_recent: Annotated[
        int, typer.Option(min=0, help="Recent items whose co-visitation features the ranker "
                                      "blends into its scores (0: the sequence model alone)."),
    ] = MOVIELENS_COVISITATION_RECENT,
    seed: Annotated[int, typer.Option(help="Seed of the ranker.")] = 0,
    save: Annotated[
        Path | None, typer.Option(help="Save the trained ranker (safetensors + JSON) here."),
    ] = None,
) -> None:
    """Compare the ranker with popularity, co-visitation and EASE on a MovieLens dataset.

    Every rating is an implicit interaction; each user's last one is the test item, the
    second-to-last the validation item (hyper-parameters, early stopping, the ranker's
    blend weights). Models rank the whole catalog minus the user's history.

    The ``ranker`` is the SASRec-style sequence model blended with co-visitation features
    of the user's last ``--covisitation-recent`` items (weights fitted on the validation
    items; see :mod:`training.ranker`); ``--covisitation-recent 0`` evaluates the
    sequence model alone.
    """
    import torch

    from streaming.replay import ReplayError, replay_movielens
    from training.comparison import MODELS, MOVIELENS_RANKER, compare_models
    from training.data import Interactions
    from training.ranker import Ranker

    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    chosen = [m.strip() for m in models.split(",") if m.strip()]
    unknown = set(chosen) - set(MODELS)
    if unknown:
        raise typer.BadParameter(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    config = replace(
        MOVIELENS_RANKER, seed=seed, epochs=epochs or MOVIELENS_RANKER.epochs,
        max_len=max_len or MOVIELENS_RANKER.max_len, covisitation_recent=covisitation_recent,
    )

    t0 = time.perf_counter()
    try:
        source = replay_movielens(path)
        data = Interactions.from_records(source)
        categories = {item.item_id: item.category for item in source.items()}
    except ReplayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _log(f"{source.format} at {path}: {len(data):,} interactions, {data.n_users:,} users, "
         f"{data.n_items:,} items (read in {time.perf_counter() - t0:.1f} s, "
         f"torch threads {torch.get_num_threads()})")
    results = compare_models(data, models=chosen, ranker_config=config, categories=categories,
                             log=_log)

    if save is not None:
        ranker = next((r.model for r in results if r.name == "ranker"), None)
        if isinstance(ranker, Ranker):
            ranker.save(save)
            _log(f"ranker saved to {save}")

    typer.echo(_table(results))
    summary: dict[str, dict[str, float] | None] = {}
    for name in ("ranker", "online", "popularity", "covisitation", "ease"):
        result = next((r for r in results if r.name == name), None)
        summary[name] = None if result is None else {
            **{c: round(result.metrics[c], 6) for c in _COLUMNS},
            "fit_seconds": round(result.fit_seconds, 1),
        }
    typer.echo(json.dumps(summary))



if __name__ == "__main__":  # python -m training.evaluate_cli PATH, before registration
    evaluate_app()
