"""CLI commands that feed the pipeline: ``simulate`` and ``replay movielens|ecommerce``.

Register them on the main app::

    app.command("simulate")(simulate_command)
    app.add_typer(replay_app, name="replay")

Each writes a record stream either to a JSONL file (``--out FILE``, ``-`` for stdout;
layout in :mod:`streaming.sinks`) or to Kafka (``--kafka``: events to ``topic_events``,
items to ``topic_items``, bootstrap from the settings, topics created if missing), at
full speed, at ``--rate`` events/s, or (replays) at ``--speed`` times the original pace.
Progress goes to stderr every few seconds; Ctrl-C stops cleanly after flushing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from streamrec.settings import get_settings

if TYPE_CHECKING:
    from streaming.pump import Pacer
    from streaming.sinks import Record, RecordSink

__all__ = ["replay_app", "simulate_command"]

DEFAULT_SIMULATED_EVENTS = 100_000

Out = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Write JSONL records to this file ('-' for stdout)."),
]
Kafka = Annotated[
    bool,
    typer.Option("--kafka", help="Send to Kafka (bootstrap and topics from STREAMREC_* settings)."),
]
Rate = Annotated[
    float | None, typer.Option("--rate", help="Target events per second (default: full speed).")
]

replay_app = typer.Typer(
    help="Replay public datasets (MovieLens, REES46 e-commerce) as catalog items and events.",
    no_args_is_help=True,
)


def _open_sink(out: Path | None, kafka: bool) -> RecordSink:
    # Heavy imports stay inside the commands so that `streamrec --help` remains instant.
    from streaming.sinks import JsonlSink, KafkaSink
    from streaming.topics import ensure_topics

    if (out is None) == (not kafka):
        raise typer.BadParameter("choose exactly one destination: --out FILE or --kafka")
    if out is not None:
        return JsonlSink(out)
    settings = get_settings()
    ensure_topics(settings.kafka_bootstrap, [settings.topic_events, settings.topic_items],
                  settings.topic_partitions)
    return KafkaSink.from_settings(settings)


def _pacer(rate: float | None, speed: float | None) -> Pacer | None:
    from streaming.pump import RatePacer, SpeedPacer

    if rate is not None and speed is not None:
        raise typer.BadParameter("--rate and --speed exclude each other")
    try:
        if rate is not None:
            return RatePacer(rate)
        return SpeedPacer(speed) if speed is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _deliver(
    records: Iterable[Record],
    out: Path | None,
    kafka: bool,
    pacer: Pacer | None,
    limit: int | None = None,
) -> None:
    from kafka.errors import KafkaError

    from streaming.producer import DeliveryError
    from streaming.pump import Progress, pump
    from streaming.replay import ReplayError

    try:
        with _open_sink(out, kafka) as sink:
            stats = pump(records, sink, pacer=pacer, limit=limit, progress=Progress())
    except (ReplayError, DeliveryError, KafkaError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if stats.interrupted:
        raise typer.Exit(130)


def simulate_command(
    events: Annotated[
        int | None,
        typer.Option("--events", "-n", min=0, help=(
            f"Events to generate; default {DEFAULT_SIMULATED_EVENTS:,}, "
            "or unbounded with --live (stop with Ctrl-C)."
        )),
    ] = None,
    rate: Rate = None,
    users: Annotated[int, typer.Option(min=1, help="Simulated users.")] = 1_000,
    items: Annotated[int, typer.Option(min=1, help="Initial catalog size.")] = 2_000,
    categories: Annotated[int, typer.Option(min=1, max=20, help="Catalog categories.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the world and the stream.")] = 0,
    out: Out = None,
    kafka: Kafka = False,
    live: Annotated[
        bool, typer.Option("--live", help="Stamp events with the wall clock as they are sent.")
    ] = False,
) -> None:
    """Stream simulated shop events (catalog first) from users with planted tastes."""
    from streaming.simulator import Simulator, SimulatorConfig

    try:
        sim = Simulator(SimulatorConfig(
            n_users=users, n_items=items, n_categories=categories, seed=seed, live=live,
        ))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    n = events if events is not None else (None if live else DEFAULT_SIMULATED_EVENTS)

    def records() -> Iterable[Record]:
        yield from sim.catalog()
        yield from sim.events(n)

    _deliver(records(), out, kafka, _pacer(rate, None))


Speed = Annotated[
    float | None,
    typer.Option("--speed", help="Replay at N times the original pace (e.g. 60: 1 h per minute)."),
]
Limit = Annotated[
    int | None, typer.Option("--limit", min=0, help="Stop after this many events.")
]
DatasetPath = Annotated[Path, typer.Argument(exists=True, help="Dataset folder or file.")]


def _replay(
    open_source: Callable[[Path], Iterable[Record]],
    path: Path,
    out: Path | None,
    kafka: bool,
    speed: float | None,
    rate: float | None,
    limit: int | None,
) -> None:
    """Open a dataset (a malformed one is a usage error naming file and line) and deliver it."""
    from streaming.replay import ReplayError

    pacer = _pacer(rate, speed)
    try:
        source = open_source(path)
    except ReplayError as exc:
        raise typer.BadParameter(str(exc)) from None
    _deliver(source, out, kafka, pacer, limit)


@replay_app.command("movielens")
def replay_movielens_command(
    path: DatasetPath,
    out: Out = None,
    kafka: Kafka = False,
    speed: Speed = None,
    rate: Rate = None,
    limit: Limit = None,
) -> None:
    """Replay a MovieLens folder (100K: u.data/u.item; latest: ratings.csv/movies.csv).

    Movies first, then one `view` event per rating in time order (context.rating).
    """
    from streaming.replay import replay_movielens

    _replay(replay_movielens, path, out, kafka, speed, rate, limit)


@replay_app.command("ecommerce")
def replay_ecommerce_command(
    path: DatasetPath,
    out: Out = None,
    kafka: Kafka = False,
    speed: Speed = None,
    rate: Rate = None,
    limit: Limit = None,
) -> None:
    """Replay a REES46-style e-commerce CSV (view/cart/purchase), products first."""
    from streaming.replay import replay_ecommerce

    _replay(replay_ecommerce, path, out, kafka, speed, rate, limit)
