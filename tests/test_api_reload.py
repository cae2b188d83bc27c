"""Hot reload: a newly promoted ranker is served without a restart and without one failed
request; a tampered one is refused and the old one kept.

The API runs in a real uvicorn server (a thread of the test) under constant load from four
client threads while the registry's champion changes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from api_world import examples, populate, register, serving, trained

from streaming.broker import free_port
from streamrec.settings import Settings
from training.context_ranker import WEIGHTS_FILE
from training.registry import ModelRegistry


@pytest.mark.slow
def test_a_promoted_model_is_swapped_in_under_load_and_a_tampered_one_refused(
    tmp_path: Path,
) -> None:
    # No overload shedding on a busy test machine: every answer must come from the models.
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", home=tmp_path / "home",
                        serving_model_poll_s=0.2, serving_queue_timeout_ms=60_000)
    world = populate(settings, n_events=3000)
    data = examples(settings, world, 1)
    registry = ModelRegistry.from_settings(settings)
    online = register(registry, "online", trained("online", data, tmp_path / "o1", 1))
    first = register(registry, "ranker", trained("ranker", data, tmp_path / "r1", 1))

    seen: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def load(base: str, offset: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            n = offset
            while not stop.is_set():
                user = world.users[n % 50]
                n += 1
                try:
                    response = client.post("/v1/recommendations", json={"user_id": user})
                except httpx.HTTPError as exc:
                    seen.append((time.monotonic(), 0, repr(exc)))
                    continue
                versions = (response.json()["model_versions"]
                            if response.status_code == 200 else {"error": response.text})
                version = versions.get("ranker")
                if versions.get("online") != online:
                    version = f"unexpected online model: {versions}"
                seen.append((time.monotonic(), response.status_code, version))

    with serving(settings) as base:
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the first champions were never loaded"
            time.sleep(0.1)
        clients = [threading.Thread(target=load, args=(base, i * 7)) for i in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        second = register(registry, "ranker", trained("ranker", data, tmp_path / "r2", 2))
        swapped_at = time.monotonic()
        while not any(v == second for _, _, v in seen[-20:]):
            assert time.monotonic() - swapped_at < 20, "v2 was never served"
            time.sleep(0.05)
        time.sleep(0.5)
        # A version altered on disk after registration becomes the champion. (promote()
        # would refuse it; the pointer is written as an out-of-band change would, so the
        # watcher cannot load it between a promotion and the tampering.)
        third = registry.register("ranker", tmp_path / "r2", metrics={}, data_window={},
                                  features=[])
        weights = third.path / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
        registry._write_pointer("ranker", third.version, registry.history("ranker"))
        time.sleep(1.5)  # several polls
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
        metrics = httpx.get(f"{base}/metrics").text

    assert len(seen) > 50
    failures = [s for s in seen if s[1] != 200]
    assert not failures, failures[:5]
    versions = [v for _, _, v in seen]
    assert set(versions) == {first, second}
    # Once the new model answered, the old one never did again: the swap is atomic.
    assert first not in versions[versions.index(second) + 10:]
    assert versions[-1] == second
    assert 'streamrec_api_model_reloads_total{kind="ranker",outcome="refused"} 1.0' in metrics
    assert 'streamrec_api_model_reloads_total{kind="ranker",outcome="loaded"} 2.0' in metrics
    assert f'streamrec_api_model_info{{kind="ranker",version="{second}"}} 1.0' in metrics
    assert f'streamrec_api_model_info{{kind="ranker",version="{first}"}}' not in metrics
