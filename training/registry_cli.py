"""``streamrec models list|promote|rollback``: the registry from the command line.

Register it on the main app::

    from training.registry_cli import models_app
    app.add_typer(models_app, name="models")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer

from streamrec.settings import get_settings
from training.registry import ModelRegistry, ModelVersion, RegistryError

__all__ = ["format_table", "models_app"]

models_app = typer.Typer(
    help="Registered model versions: list them, promote one, roll back.", no_args_is_help=True
)

Kind = Annotated[str, typer.Option(help="Model kind: ranker or online.")]


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _metrics(metrics: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in sorted(metrics.items())
        if isinstance(v, int | float)
    )


def _status(registry: ModelRegistry, version: ModelVersion) -> str:
    try:
        registry.verify(version)
    except RegistryError as exc:
        return f"TAMPERED ({str(exc).split(': ', 1)[-1]})"
    return "ok"


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@models_app.command("list")
def models_list(
    kind: Annotated[str | None, typer.Option(help="Only this kind (ranker, online).")] = None,
) -> None:
    """Every version with its metrics and checksum status; * marks the champion."""
    registry = ModelRegistry.from_settings(get_settings())
    kinds = [kind] if kind else registry.kinds()
    rows = [["", "kind", "version", "created_at", "code", "checksum", "metrics"]]
    try:
        for k in kinds:
            champion = registry.champion(k)
            for v in registry.versions(k):
                rows.append([
                    "*" if champion and champion.version == v.version else "",
                    k,
                    v.version,
                    v.created_at[:19],
                    str(v.manifest.get("code_version", "")),
                    _status(registry, v),
                    _metrics(v.metrics),
                ])
    except RegistryError as exc:
        raise _fail(exc) from None
    if len(rows) == 1:
        typer.echo(f"no models registered under {registry.root}")
        return
    typer.echo(format_table(rows))


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="Version id, e.g. v0007-20261124T101500Z.")],
    kind: Kind = "ranker",
) -> None:
    """Make VERSION the champion (refused when its files fail the checksum)."""
    registry = ModelRegistry.from_settings(get_settings())
    try:
        promoted = registry.promote(kind, version)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.echo(f"{kind}: champion is now {promoted.version}")


@models_app.command("rollback")
def models_rollback(kind: Kind = "ranker") -> None:
    """Restore the previous champion."""
    registry = ModelRegistry.from_settings(get_settings())
    try:
        restored = registry.rollback(kind)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.echo(f"{kind}: rolled back, champion is now {restored.version}")
