"""Sinks (JSONL, Kafka), pacing and the `simulate` / `replay` commands."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner

from streaming.pump import Progress, RatePacer, SpeedPacer, pump
from streaming.replay import ReplayError
from streaming.simulator import Simulator, SimulatorConfig
from streaming.sinks import JsonlSink, KafkaSink, Record, RecordSink, read_jsonl
from streaming.sources_cli import replay_app, simulate_command
from streaming.topics import ensure_topics
from streamrec.contract import Event, EventType, Item, parse_event, parse_item
from streamrec.settings import Settings

TINY = SimulatorConfig(n_users=40, n_items=120, n_categories=6, seed=5, new_item_rate=200.0)


class ListSink(RecordSink):
    """Keeps what it is given, with the wall-clock time of each write."""

    def __init__(self) -> None:
        self.records: list[tuple[Record, datetime]] = []
        self.flushes = 0

    def write(self, record: Record) -> None:
        self.records.append((record, datetime.now(UTC)))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.flush()


class FakeTime:
    """A monotonic clock that only moves when the pump sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def _sim_records(n: int) -> list[Record]:
    sim = Simulator(TINY)
    return [*sim.catalog(), *sim.events(n)]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = _sim_records(1500)
    assert any(isinstance(r, Item) for r in records[TINY.n_items:])  # launches interleaved
    path = tmp_path / "records.jsonl"
    with JsonlSink(path) as sink:
        stats = pump(records, sink)
    assert (stats.events, stats.items) == (1500, len(records) - 1500)
    assert list(read_jsonl(path)) == records
    first = path.read_bytes().split(b"\n", 1)[0]
    assert first.startswith(b'{"kind":"item","item_id":')


def test_jsonl_to_an_open_stream_leaves_it_open() -> None:
    buffer = io.BytesIO()
    with JsonlSink(buffer) as sink:
        pump(_sim_records(10)[-10:], sink)
    assert buffer.getvalue().count(b"\n") == 10 and not buffer.closed


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "JSONDecodeError"),
        (b'{"event_id": "x"}', '"kind"'),
        (b'{"kind": "event", "event_id": "x"}', "event_id"),
    ],
)
def test_read_jsonl_names_the_bad_line(tmp_path: Path, line: bytes, message: str) -> None:
    good = b'{"kind":"item",' + _sim_records(0)[0].to_json()[1:]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + b"\n\n" + line + b"\n")
    with pytest.raises(ReplayError, match=message) as info:
        list(read_jsonl(path))
    assert info.value.line == 3


def test_rate_pacer_spaces_events_and_not_items() -> None:
    t = FakeTime()
    records = _sim_records(500)
    stats = pump(records, ListSink(), pacer=RatePacer(100.0), clock=t.clock, sleep=t.sleep)
    assert stats.events == 500
    assert t.slept == pytest.approx(499 / 100.0, rel=1e-6)  # the first event goes at once


def test_speed_pacer_compresses_event_time() -> None:
    t = FakeTime()
    records = [r for r in _sim_records(300) if isinstance(r, Event)]
    span = (records[-1].ts - records[0].ts).total_seconds()
    pump(records, ListSink(), pacer=SpeedPacer(600.0), clock=t.clock, sleep=t.sleep)
    assert t.slept == pytest.approx(span / 600.0, rel=1e-6)


def test_pacers_do_not_burst_after_a_stall() -> None:
    rate, speed = RatePacer(10.0), SpeedPacer(1.0)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    assert rate.due(t0, 0.0) == 0.0
    assert rate.due(t0, 30.0) == 30.0  # 30 s late: re-anchored, not 300 events at once
    assert speed.due(t0, 0.0) == 0.0
    assert speed.due(t0 + timedelta(seconds=1), 50.0) == 50.0
    assert speed.due(t0 + timedelta(seconds=3), 50.0) == 52.0
    with pytest.raises(ValueError):
        RatePacer(0)


def test_limit_counts_events_and_ctrl_c_stops_cleanly() -> None:
    records = _sim_records(1000)
    events_seen = 0
    items_before_101st = 0
    for r in records:
        if isinstance(r, Event):
            events_seen += 1
            if events_seen > 100:
                break
        else:
            items_before_101st += 1
    stats = pump(records, ListSink(), limit=100)
    assert (stats.events, stats.items) == (100, items_before_101st)
    assert not stats.interrupted

    def interrupted() -> Iterator[Record]:
        yield from _sim_records(50)
        raise KeyboardInterrupt

    sink = ListSink()
    stats = pump(interrupted(), sink)
    assert stats.interrupted and stats.events == 50 and sink.flushes == 1


def test_progress_reports_every_interval() -> None:
    t = FakeTime()
    out = io.StringIO()
    pump(_sim_records(2000), ListSink(), pacer=RatePacer(200.0), clock=t.clock,
         sleep=t.sleep, progress=Progress(out, interval=2.0))
    lines = out.getvalue().splitlines()
    assert 4 <= len(lines) <= 7  # ~10 s of pacing, a report every 2 s, and the summary
    assert "events/s now" in lines[0]
    assert lines[-1].startswith("done: 2,000 events")


def test_live_stream_is_never_stamped_ahead_of_its_send() -> None:
    sim = Simulator(SimulatorConfig(n_users=40, n_items=120, n_categories=6, live=True))
    sink = ListSink()
    pump(sim.events(300), sink, pacer=RatePacer(3000.0))
    sent = [(r, at) for r, at in sink.records if isinstance(r, Event)]
    assert len(sent) == 300
    assert all(r.ts <= at for r, at in sent)
    assert sent[-1][1] - sent[0][1] >= timedelta(seconds=0.08)  # paced, not a burst


# --- the commands ---------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.add_typer(replay_app, name="replay")
    return app


def test_simulate_command_writes_jsonl(cli: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "sim.jsonl"
    args = ["simulate", "--events", "800", "--users", "30", "--items", "90",
            "--categories", "5", "--seed", "3", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "done: 800 events" in result.output
    records = list(read_jsonl(out))
    assert sum(isinstance(r, Event) for r in records) == 800
    assert all(isinstance(r, Item) for r in records[:90])
    again = tmp_path / "again.jsonl"
    assert CliRunner().invoke(cli, [*args[:-1], str(again)]).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_replay_commands_write_jsonl(cli: typer.Typer, tmp_path: Path) -> None:
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Action|Crime\n")
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},1,4.0,{900000000 + u}\n"
                                                      for u in range(1, 31)))
    out = tmp_path / "ml.jsonl"
    result = CliRunner().invoke(
        cli, ["replay", "movielens", str(folder), "--out", str(out), "--limit", "20"])
    assert result.exit_code == 0, result.output
    records = list(read_jsonl(out))
    assert len(records) == 21 and isinstance(records[0], Item)

    csv_path = tmp_path / "events.csv"
    csv_path.write_text(
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,"
        "user_session\n2019-10-01 00:00:00 UTC,view,5,77,,acme,1.00,9,s\n"
        "2019-10-01 00:00:00 UTC,purchase,5,77,,acme,1.00,9,s\n")
    out = tmp_path / "ec.jsonl"
    result = CliRunner().invoke(
        cli, ["replay", "ecommerce", str(csv_path), "--out", str(out), "--speed", "60"])
    assert result.exit_code == 0, result.output
    assert [r.event_type for r in read_jsonl(out) if isinstance(r, Event)] == [
        EventType.VIEW, EventType.PURCHASE]


def _message(output: str) -> str:
    """The error text without the panel's borders and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def test_commands_reject_bad_options(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["simulate", "--events", "5"])
    assert result.exit_code == 2 and "--out FILE or --kafka" in _message(result.output)
    result = runner.invoke(cli, ["simulate", "--out", "x", "--kafka"])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["replay", "movielens", str(tmp_path), "--out", "x"])
    assert result.exit_code == 2 and "no MovieLens files" in _message(result.output)
    result = runner.invoke(
        cli, ["replay", "movielens", str(tmp_path), "--out", "x", "--rate", "5", "--speed", "2"])
    assert result.exit_code == 2 and "exclude each other" in _message(result.output)
    result = runner.invoke(cli, ["simulate", "--out", "x", "--rate", "0"])
    assert result.exit_code == 2 and "rate must be positive" in _message(result.output)
    assert not Path("x").exists()


# --- against a real broker ------------------------------------------------------------------


def _read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False,
                             consumer_timeout_ms=1000)
    try:
        partitions = [TopicPartition(topic, p)
                      for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        values: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < expected and time.monotonic() < deadline:
            values.extend((m.key, m.value) for m in consumer)
        return values  # type: ignore[return-value]
    finally:
        consumer.close()


@pytest.mark.kafka
def test_kafka_sink_delivers_simulated_events(kafka_settings: Settings) -> None:
    s = kafka_settings
    ensure_topics(s.kafka_bootstrap, [s.topic_events, s.topic_items], 4)
    records = _sim_records(2000)
    with KafkaSink.from_settings(s) as sink:
        stats = pump(records, sink)
    assert stats.events == 2000

    events = [r for r in records if isinstance(r, Event)]
    items = [r for r in records if isinstance(r, Item)]
    got_events = _read_topic(s.kafka_bootstrap, s.topic_events, len(events))
    got_items = _read_topic(s.kafka_bootstrap, s.topic_items, len(items))
    assert len(got_events) == 2000 and len(got_items) == len(items)
    parsed = {e.event_id: (key, e) for key, e in
              ((k, parse_event(v)) for k, v in got_events)}
    assert parsed == {e.event_id: (e.user_id.encode(), e) for e in events}
    assert sorted(parse_item(v).item_id for _, v in got_items) == sorted(
        i.item_id for i in items)
