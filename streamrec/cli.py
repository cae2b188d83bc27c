"""The ``streamrec`` command: one entry point for operators, the demo and CI.

Sub-commands stay thin: they parse options, build :class:`~streamrec.settings.Settings`
and call plain functions that live next to the logic they drive.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from streamrec.settings import Settings, get_settings

app = typer.Typer(
    name="streamrec",
    help="Feature-store-backed streaming recommender: Kafka → Feast → PyTorch/River → FastAPI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
kafka_app = typer.Typer(
    help="A local single-node Apache Kafka broker (KRaft).", no_args_is_help=True
)
topics_app = typer.Typer(help="Kafka topics streamrec uses.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead-letter topics: what was rejected, and why.", no_args_is_help=True)
worker_app = typer.Typer(
    help="Long-running stream workers (stop with SIGTERM).", no_args_is_help=True
)
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(dlq_app, name="dlq")
feast_app = typer.Typer(help="The Feast feature repository.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
app.add_typer(feast_app, name="feast")


@kafka_app.command("up")
def kafka_up() -> None:
    """Start the local broker (fetching its jars once) and create streamrec's topics."""
    from streaming.broker import BrokerError, LocalKafka
    from streaming.topics import ensure_topics, stream_topics

    settings = get_settings()
    broker = LocalKafka.from_settings(settings)
    try:
        broker.start()
    except BrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    ensure_topics(broker.bootstrap, stream_topics(settings), settings.topic_partitions)
    typer.echo(f"Kafka is up: bootstrap {broker.bootstrap} (log: {broker.log_file})", err=True)
    typer.echo(broker.bootstrap)


@kafka_app.command("down")
def kafka_down() -> None:
    """Stop the local broker cleanly."""
    from streaming.broker import LocalKafka

    stopped = LocalKafka.from_settings(get_settings()).stop()
    typer.echo("Kafka stopped" if stopped else "Kafka was not running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Exit 0 when the configured broker answers a metadata request, 1 otherwise."""
    from streaming.broker import broker_answers

    settings = get_settings()
    if broker_answers(settings.kafka_bootstrap):
        typer.echo(f"Kafka answers at {settings.kafka_bootstrap}")
        return
    typer.echo(f"Kafka does not answer at {settings.kafka_bootstrap}", err=True)
    raise typer.Exit(1)


@topics_app.command("create")
def topics_create() -> None:
    """Create the event, item and impression topics and their DLQs (idempotent)."""
    from streaming.topics import ensure_topics, stream_topics

    settings = get_settings()
    created = ensure_topics(
        settings.kafka_bootstrap, stream_topics(settings), settings.topic_partitions
    )
    typer.echo(f"created: {', '.join(created) or 'none (all existed)'}")


@dlq_app.command("show")
def dlq_show(
    topic: Annotated[str, typer.Argument(help="Source topic, e.g. 'events' (reads events.dlq).")],
    limit: Annotated[int, typer.Option(help="Max records to print.")] = 20,
) -> None:
    """Print dead-lettered records as JSON lines: reason, source position, original value."""
    from streaming.dlq import read_dlq

    settings = get_settings()
    for rec in read_dlq(settings, topic, limit=limit):
        typer.echo(json.dumps(rec, ensure_ascii=False))


MaxIdle = Annotated[
    float | None, typer.Option(help="Exit after this long without input (default: never).")
]


def _worker_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


@worker_app.command("archiver")
def worker_archiver(max_idle_s: MaxIdle = None) -> None:
    """Archive valid events and catalog records into the Parquet event log, exactly once."""
    from streaming.archiver import run_archiver

    _worker_logging()
    settings = get_settings()
    summary = run_archiver(settings, max_idle_s=max_idle_s, metrics_port=settings.metrics_port)
    typer.echo(json.dumps(summary))


@worker_app.command("features")
def worker_features(max_idle_s: MaxIdle = None) -> None:
    """Fold events into real-time user/item features in Feast (one replica per deployment)."""
    from features.store import apply_repo
    from streaming.feature_writer import FeatureWriter

    _worker_logging()
    settings = get_settings()
    # Idempotent, and the writer is the only replica: a registry from an older version
    # gains the views this one writes (e.g. item_realtime_vector) before the first row.
    typer.echo("applying feature_repo/ (registers any view this version adds)", err=True)
    apply_repo(settings)
    stats = FeatureWriter(settings).run(max_idle_s=max_idle_s, metrics_port=settings.metrics_port)
    typer.echo(
        json.dumps(
            {
                "events": stats.events,
                "duplicates": stats.duplicates,
                "too_late": stats.too_late,
                "user_rows": stats.user_rows,
                "item_rows": stats.item_rows,
                "snapshots": stats.snapshots,
            }
        )
    )


@feast_app.command("apply")
def feast_apply() -> None:
    """Register feature_repo/ in the Feast registry and create the store tables (idempotent)."""
    from features.store import apply_repo

    settings = get_settings()
    started = time.monotonic()
    apply_repo(settings)
    typer.echo(
        f"feature repository applied in {time.monotonic() - started:.1f}s "
        f"(online store: {settings.online_store})"
    )


@app.command("config")
def config_table() -> None:
    """Print every STREAMREC_* setting with its current value and meaning."""
    settings = get_settings()
    rows = [("variable", "value", "meaning")]
    for name, f in Settings.model_fields.items():
        value = str(getattr(settings, name))
        rows.append((f"STREAMREC_{name.upper()}", value, f.description or ""))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        typer.echo(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}")


@app.command("api")
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
) -> None:
    """Run the HTTP API (ingestion, recommendations, health)."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level="info",
    )


@app.command("demo")
def demo(
    history_days: Annotated[
        float, typer.Option(help="Days of past traffic streamed before batch and training.")
    ] = 28.0,
    history_events: Annotated[
        int, typer.Option(help="At most this many history events.")
    ] = 300_000,
    events: Annotated[int, typer.Option(help="Live events once the API serves.")] = 20_000,
    rate: Annotated[float, typer.Option(help="Live events per second.", min=1)] = 1_000,
    request_rate: Annotated[
        float, typer.Option(help="Recommendation requests per second of the latency probe.")
    ] = 20,
    serve: Annotated[
        bool, typer.Option(help="Keep serving after the summary until Ctrl-C.")
    ] = True,
    keep_kafka: Annotated[bool, typer.Option(help="Leave the broker running afterwards.")] = False,
) -> None:
    """Run the whole pipeline locally on embedded defaults and print a summary."""
    from streaming.broker import BrokerError
    from streamrec.demo import DemoOptions, run_demo

    options = DemoOptions(
        history_days=history_days,
        history_events=history_events,
        live_events=events,
        rate=rate,
        request_rate=request_rate,
        serve=serve,
        keep_kafka=keep_kafka,
    )
    try:
        code = run_demo(get_settings(), options)
    except BrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _register_subcommands() -> None:
    # Each module keeps its heavy imports (Spark, torch) inside its commands.
    from features.backfill_cli import backfill_command
    from features.batch_cli import batch_app
    from streaming.catalog_cli import catalog_command
    from streaming.dlq_cli import replay_command
    from streaming.learner_cli import learner_command
    from streaming.sources_cli import replay_app, simulate_command
    from training.evaluate_cli import evaluate_app
    from training.registry_cli import models_app
    from training.report import report_app
    from training.train_loop import train_command

    app.command("simulate")(simulate_command)
    worker_app.command("catalog")(catalog_command)
    app.command("backfill")(backfill_command)
    dlq_app.command("replay")(replay_command)
    app.add_typer(replay_app, name="replay", help="Replay public datasets as events.")
    app.add_typer(batch_app, name="batch", help="Spark batch jobs over the event log.")
    app.add_typer(evaluate_app, name="evaluate", help="Offline evaluation on public datasets.")
    app.add_typer(models_app, name="models", help="Model registry: versions and champions.")
    worker_app.command("learner")(learner_command)
    app.add_typer(report_app, name="report", help="Reports: model quality against cost.")
    app.command("train")(train_command)


_register_subcommands()
