"""Requests that queue together are answered together, each exactly as if alone.

The batcher is tested on plain data; the pipeline on a real Feast store with a trained
ranker and online model (``tests/api_world.py``), Kafka deliberately unreachable.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from api_world import World, examples, populate, register, trained

import serving.recommend as pipeline
from serving.batching import Batcher
from serving.foreground import Foreground
from serving.metrics import ServingMetrics
from serving.recommend import Stopwatch, recommend, recommend_many
from serving.runtime import ServingRuntime
from serving.schemas import RecommendationRequest
from streaming.broker import free_port
from streamrec.settings import Settings
from training.registry import ModelRegistry

# --- the batcher ----------------------------------------------------------------------------


def held_batcher(max_batch: int) -> tuple[Batcher[int, int], threading.Event, list[list[int]]]:
    """A one-thread batcher whose first batch holds the thread until the event is set."""
    release = threading.Event()
    batches: list[list[int]] = []

    def work(items: list[int]) -> list[int]:
        batches.append(items)
        if len(batches) == 1:
            release.wait(10)
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [x * 10 for x in items]

    batcher = Batcher(work, threads=1, max_batch=max_batch)
    batcher.start()
    return batcher, release, batches


async def submit_while_held(batcher: Batcher[int, int], release: threading.Event,
                            first: int, rest: list[int]) -> list[int | BaseException]:
    held = asyncio.ensure_future(batcher.submit(first))
    await asyncio.sleep(0.05)  # the thread has taken the first item
    queued = [asyncio.ensure_future(batcher.submit(x)) for x in rest]
    await asyncio.sleep(0.05)
    release.set()
    return await asyncio.gather(held, *queued, return_exceptions=True)


def test_items_that_queue_while_the_thread_is_busy_are_worked_on_together() -> None:
    batcher, release, batches = held_batcher(max_batch=4)
    results = asyncio.run(submit_while_held(batcher, release, 0, [1, 2, 3, 4, 5, 6]))
    batcher.close()
    assert results == [0, 10, 20, 30, 40, 50, 60]
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]


def test_a_bad_item_fails_only_itself_and_the_next_batch_runs() -> None:
    batcher, release, batches = held_batcher(max_batch=2)
    results = asyncio.run(submit_while_held(batcher, release, 0, [1, -1, 2]))
    batcher.close()
    # The failing batch is worked on again item by item.
    assert batches == [[0], [1, -1], [1], [-1], [2]]
    assert results[:2] == [0, 10] and results[3] == 20
    assert isinstance(results[2], ValueError)


def test_a_closed_batcher_finishes_what_was_submitted_and_takes_nothing_more() -> None:
    batcher, release, _ = held_batcher(max_batch=8)

    async def main() -> tuple[list[int], BaseException | None]:
        held = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.05)
        batcher.close()
        release.set()
        done = await asyncio.gather(held, queued)
        try:
            await batcher.submit(3)
        except RuntimeError as exc:
            return done, exc
        return done, None

    done, refused = asyncio.run(main())
    assert done == [10, 20]
    assert isinstance(refused, RuntimeError)


def test_background_work_waits_for_requests_in_flight_but_not_past_its_deadline() -> None:
    foreground = Foreground()
    foreground.enter()
    threading.Timer(0.05, foreground.leave).start()
    started = time.monotonic()
    assert foreground.quiet(started + 5) is True  # woken when the request left
    assert 0.03 < time.monotonic() - started < 2
    foreground.enter()
    started = time.monotonic()
    assert foreground.quiet(started + 0.05) is False  # still busy: runs at the deadline
    assert time.monotonic() - started < 2
    foreground.leave()


# --- the pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, ServingRuntime]]:
    folder = tmp_path_factory.mktemp("batching")
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", home=folder / "home",
                        serving_queue_timeout_ms=60_000)
    world = populate(settings, n_events=3000)
    data = examples(settings, world, 1)
    registry = ModelRegistry.from_settings(settings)
    for kind in ("ranker", "online"):
        register(registry, kind, trained(kind, data, folder / kind, 1))
    rt = ServingRuntime(settings, ServingMetrics())
    rt.start()
    try:
        assert rt.catalog.wait_loaded(30)
        deadline = time.monotonic() + 60
        while not (rt.models.get("ranker") and rt.models.get("online")):
            assert time.monotonic() < deadline, rt.watcher.problems
            time.sleep(0.1)
        yield world, rt
    finally:
        rt.close()


def arrived_ago(seconds: float) -> Stopwatch:
    """A stopwatch of a request that arrived ``seconds`` ago."""
    first = iter([time.perf_counter() - seconds])
    return Stopwatch(clock=lambda: next(first, None) or time.perf_counter())


def test_requests_answered_together_get_the_answers_each_gets_alone(
    served: tuple[World, ServingRuntime], monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, runtime = served
    # One request moment for every call: scores depend on the time of the request.
    moment = time.time()
    monkeypatch.setattr(pipeline, "time", SimpleNamespace(time=lambda: moment,
                                                          perf_counter=time.perf_counter))
    users = world.users
    items = [item.item_id for item in world.items]
    requests = [
        RecommendationRequest(user_id=users[0], k=10, context={"device": "mobile",
                                                               "country": "DE"}),
        RecommendationRequest(user_id=users[1], k=20, exclude_seen=False),
        RecommendationRequest(user_id="never-seen", k=5, context={"device": "desktop"}),
        RecommendationRequest(user_id=users[0], k=3),  # the same user twice in a batch
        RecommendationRequest(user_id=users[2], k=4, candidates=items[:30]),
        RecommendationRequest(user_id=users[3], k=10, context={"country": "FR"}),
    ]
    alone = [recommend(runtime, r) for r in requests]
    watches = [Stopwatch() for _ in requests]
    together = recommend_many(runtime, requests, watches)

    def visible(answer: pipeline.RecommendationResponse) -> dict[str, object]:
        return answer.model_dump(exclude={"request_id"})

    assert [visible(a) for a in together] == [visible(a) for a in alone]
    assert all(a.model_versions.ranker and a.model_versions.online for a in together)
    assert not any(a.degraded for a in together if a.user_id != "never-seen")
    assert {w.batch for w in watches} == {len(requests)}
    # Every request waited for each shared stage, and its timing says so.
    stages = {"queue", "user", "candidates", "features", "ranker", "online", "respond",
              "total"}
    assert all(set(w.stages) == stages for w in watches)


def test_an_overloaded_request_in_a_batch_is_shed_alone(
    served: tuple[World, ServingRuntime],
) -> None:
    world, runtime = served
    requests = [RecommendationRequest(user_id=u, k=5) for u in world.users[:3]]
    # The middle one queued for two minutes, past the 60 s timeout.
    watches = [Stopwatch(), arrived_ago(120), Stopwatch()]
    answers = recommend_many(runtime, requests, watches)
    assert answers[1].fallbacks == ["overload"]
    assert answers[1].model_versions.ranker is None
    assert [a.degraded for a in (answers[0], answers[2])] == [False, False]
