"""`streamrec train --every`: drift retrain requests start a run early and are consumed."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from streaming.learner import read_retrain_request, retrain_request_path
from streamrec.settings import Settings
from training.train_loop import TrainReport, consume_retrain_request, run_loop


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, train_retrain_poll_s=0.02)


def _request(settings: Settings, at: str) -> dict[str, Any]:
    """Write a request the way the learner does (atomic replace)."""
    request = {"requested_at": at, "reason": "drift", "detector": "adwin", "drifts": 1}
    path = retrain_request_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(request))
    os.replace(tmp, path)
    return request


def _report(request: Mapping[str, Any] | None) -> TrainReport:
    return TrainReport(
        version="v1", promoted=False, reason="test", champion=None, metrics={},
        data_window={}, train_rows=0, holdout_rows=0, train_seconds=0.0, total_seconds=0.0,
        trigger="schedule" if request is None else "drift",
        retrain_request=None if request is None else dict(request),
    )


class _Recorder:
    """A tiny train function: records what each run received and when."""

    def __init__(self, during: Any = None) -> None:
        self.calls: list[tuple[float, dict[str, Any] | None]] = []
        self.during = during

    def __call__(self, request: Mapping[str, Any] | None) -> TrainReport:
        self.calls.append((time.monotonic(), None if request is None else dict(request)))
        if self.during is not None:
            self.during(len(self.calls), request)
        return _report(request)


def test_a_drift_request_starts_a_run_early_and_is_consumed(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _Recorder()
    requested: dict[str, Any] = {}

    def drift() -> None:
        time.sleep(0.2)
        requested.update(_request(settings, "2026-11-24T10:00:00+00:00"))

    thread = threading.Thread(target=drift)
    started = time.monotonic()
    thread.start()
    failures = run_loop(settings, train, period=3600.0, max_runs=2, progress=lambda _: None)
    thread.join()
    assert failures == 0
    assert time.monotonic() - started < 30  # did not wait for the hour
    (_, first), (_, second) = train.calls
    assert first is None and second == requested
    assert read_retrain_request(settings) is None  # consumed once the run finished
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["trigger"] for line in lines] == ["schedule", "drift"]
    assert lines[1]["retrain_request"] == requested


def test_a_request_pending_at_start_is_answered_by_a_single_run(settings: Settings) -> None:
    request = _request(settings, "t0")
    train = _Recorder()
    assert run_loop(settings, train, period=None, progress=lambda _: None) == 0
    assert train.calls[0][1] == request
    assert not retrain_request_path(settings).exists()


def test_a_newer_request_written_during_the_run_stays_pending(settings: Settings) -> None:
    _request(settings, "t0")
    newer: dict[str, Any] = {}
    train = _Recorder(during=lambda n, _: newer.update(_request(settings, "t1")) if n == 1
                      else None)
    run_loop(settings, train, period=3600.0, max_runs=2, progress=lambda _: None)
    # run 1 answered t0; t1 arrived meanwhile, survived, and triggered run 2 at once
    assert [call[1]["requested_at"] for call in train.calls] == ["t0", "t1"]
    assert read_retrain_request(settings) is None


def test_a_failed_run_keeps_the_request_and_waits_for_the_schedule(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    request = _request(settings, "t0")
    calls: list[float] = []

    def train(got: Mapping[str, Any] | None) -> TrainReport:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("no labelled examples")
        assert got == request  # still pending for the next scheduled run
        return _report(got)

    failures = run_loop(settings, train, period=0.5, max_runs=2, progress=lambda _: None)
    assert failures == 1
    assert calls[1] - calls[0] >= 0.5  # no immediate retry of the same request
    assert read_retrain_request(settings) is None
    first, second = capsys.readouterr().out.splitlines()
    assert "no labelled examples" in json.loads(first)["error"]
    assert json.loads(second)["trigger"] == "drift"


def test_consume_leaves_no_temporary_files(settings: Settings) -> None:
    request = _request(settings, "t0")
    assert consume_retrain_request(settings, request) is True
    assert consume_retrain_request(settings, request) is False  # nothing left to consume
    assert list(retrain_request_path(settings).parent.iterdir()) == []
