"""POST /v1/events: per-record validation, Kafka acknowledgement, outage answers, limits."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError
from starlette.testclient import TestClient

from serving.app import create_app
from serving.ingest import build_report, status_code, validate_records
from serving.publisher import KafkaUnavailable, Publisher
from streaming.broker import LocalKafka, free_port
from streaming.producer import Delivered
from streaming.topics import ensure_topics
from streamrec.settings import Settings

URL = "/v1/events"


def event(**overrides: Any) -> dict[str, Any]:
    """A valid v1 event as a producer would send it, one minute old."""
    record = {
        "event_id": str(uuid.uuid4()),
        "event_type": "view",
        "user_id": f"u{uuid.uuid4().hex[:6]}",
        "item_id": "i1",
        "ts": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        "context": {"device": "mobile", "country": "de"},
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}


def closed_port_settings(**overrides: Any) -> Settings:
    """Settings whose Kafka address has no listener: any attempt to write fails."""
    return Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", **overrides)


@pytest.fixture
def offline() -> Iterator[TestClient]:
    """The API with Kafka unreachable and a 64 KiB body limit."""
    app = create_app(closed_port_settings(api_max_body_bytes=64 * 1024))
    with TestClient(app) as client:
        yield client


# --- contract errors: nothing reaches Kafka ------------------------------------------------

IN_ONE_HOUR = (datetime.now(UTC) + timedelta(hours=1)).isoformat()


@pytest.mark.parametrize(
    ("overrides", "loc", "type_", "words"),
    [
        ({"event_type": "like"}, ["event_type"], "enum", "'view'"),
        ({"ts": None}, ["ts"], "missing", "required"),
        ({"ts": "2026-01-02T03:04:05"}, ["ts"], "value_error", "zone"),
        ({"ts": IN_ONE_HOUR}, ["ts"], "value_error", "future"),
        ({"event_id": "1234-not-a-uuid"}, ["event_id"], "value_error", "UUID"),
        ({"user_id": ""}, ["user_id"], "string_too_short", "at least 1"),
    ],
    ids=["wrong-enum", "missing-ts", "naive-ts", "future-ts", "bad-uuid", "empty-user"],
)
def test_a_contract_error_is_reported_per_field_with_422(
    offline: TestClient, overrides: dict[str, Any], loc: list[str], type_: str, words: str
) -> None:
    response = offline.post(URL, json={"events": [event(**overrides)]})
    assert response.status_code == 422
    body = response.json()
    assert (body["accepted"], body["rejected"], body["failed"]) == (0, 1, 0)
    [result] = body["results"]
    assert result["index"] == 0 and result["status"] == "rejected"
    [error] = result["errors"]
    assert error["loc"] == loc
    assert error["type"] == type_
    assert words in error["msg"]
    assert "Retry-After" not in response.headers


def test_each_record_of_an_all_bad_batch_gets_its_own_errors(offline: TestClient) -> None:
    batch = [event(event_type="like"), "not an object", event(user_id="", ts=None)]
    response = offline.post(URL, json={"events": batch})
    assert response.status_code == 422
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert {r["status"] for r in results} == {"rejected"}
    assert results[1]["errors"][0]["type"] == "model_type"
    assert {tuple(e["loc"]) for e in results[2]["errors"]} == {("user_id",), ("ts",)}


def test_more_records_than_max_batch_is_a_malformed_body(offline: TestClient) -> None:
    response = offline.post(URL, json={"events": [{}] * 1001})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "events"]
    assert "1000" in error["msg"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"records": []}', b'{"events": {}}', b'{"events": []}'],
    ids=["not-json", "no-events", "events-not-a-list", "empty"],
)
def test_a_malformed_body_gets_fastapi_style_detail(offline: TestClient, body: bytes) -> None:
    response = offline.post(URL, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail and all({"loc", "msg", "type"} <= set(d) for d in detail)


def test_a_body_over_the_limit_is_refused_with_413_before_parsing(offline: TestClient) -> None:
    big = {"events": [event(context={"page": "x" * 2000}) for _ in range(40)]}
    response = offline.post(URL, json=big)
    assert response.status_code == 413
    assert "65536 bytes" in response.json()["detail"]


def test_a_chunked_body_over_the_limit_is_counted_and_refused(offline: TestClient) -> None:
    chunk = b"x" * 8192

    def stream() -> Iterator[bytes]:
        yield b'{"events": ["'
        for _ in range(10):
            yield chunk

    response = offline.post(URL, content=stream(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413


def test_a_body_under_the_limit_passes_through_intact(offline: TestClient) -> None:
    def stream() -> Iterator[bytes]:
        yield b'{"events": [{"event_type": '
        yield b'"like"}]}'

    response = offline.post(URL, content=stream(), headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["rejected"] == 1


# --- Kafka down -----------------------------------------------------------------------------


def test_app_starts_and_stays_alive_with_kafka_down(offline: TestClient) -> None:
    assert offline.get("/healthz").json() == {"status": "ok"}


def test_kafka_down_answers_503_with_retry_after_quickly() -> None:
    settings = closed_port_settings(api_retry_after_s=7)
    with TestClient(create_app(settings)) as client:
        for _ in range(2):  # a second request tries to reconnect, and fails as fast
            started = time.monotonic()
            response = client.post(URL, json={"events": [event(), event(event_type="like")]})
            elapsed = time.monotonic() - started
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "7"
            assert elapsed < settings.api_kafka_max_block_ms / 1000 + 2
            body = response.json()
            assert (body["accepted"], body["rejected"], body["failed"]) == (0, 1, 1)
            assert [r["status"] for r in body["results"]] == ["failed", "rejected"]
            assert "cannot reach Kafka" in body["results"][0]["error"]
            assert "idempotency key" in body["detail"]
        assert client.get("/healthz").status_code == 200


def test_concurrent_writers_share_one_failed_connection_attempt() -> None:
    publisher = Publisher(closed_port_settings(api_kafka_max_block_ms=1000))
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: publisher.publish("events", [(b"u", b"{}")]), range(4)))
    # Four attempts one after another would take four seconds.
    assert time.monotonic() - started < 2.5
    assert all(isinstance(o, KafkaUnavailable) for [o] in outcomes)
    assert not publisher.connected


def test_records_kafka_did_not_acknowledge_are_failed_and_the_batch_503() -> None:
    now = datetime.now(UTC)
    records = [event(), event(event_type="like"), event()]
    checked = validate_records(records, max_future_skew=timedelta(minutes=5), now=now)
    lost = KafkaTimeoutError("Expiring 1 record(s): delivery timeout")
    report = build_report(checked, [Delivered("events", 1, 7), lost])
    assert [r.status for r in report.results] == ["accepted", "rejected", "failed"]
    assert (report.accepted, report.rejected, report.failed) == (1, 1, 1)
    assert report.results[2].event_id == records[2]["event_id"]
    assert "delivery timeout" in report.results[2].error
    assert status_code(report) == 503
    assert "did not acknowledge 1 record" in (report.detail or "")


def test_openapi_documents_the_endpoint_and_the_contract(offline: TestClient) -> None:
    schema = offline.get("/openapi.json").json()
    post = schema["paths"][URL]["post"]
    assert {"200", "413", "422", "503"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["503"]["headers"]
    assert "idempotency key" in post["description"]
    assert {"one", "mixed"} <= set(post["requestBody"]["content"]["application/json"]["examples"])
    assert {"Event", "Context", "EventType"} <= set(schema["components"]["schemas"])
    assert "/healthz" in schema["paths"]


# --- against a real broker ------------------------------------------------------------------


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 20) -> list[Any]:
    """Every record of ``topic`` from the beginning, once ``expected`` have arrived."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=1000)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer)
        return records
    finally:
        consumer.close()


@pytest.fixture
def live(kafka_settings: Settings) -> Iterator[TestClient]:
    ensure_topics(kafka_settings.kafka_bootstrap, [kafka_settings.topic_events], 4)
    with TestClient(create_app(kafka_settings)) as client:
        yield client


@pytest.mark.kafka
def test_a_mixed_batch_is_200_and_accepted_events_are_in_the_topic(
    live: TestClient, kafka_settings: Settings
) -> None:
    good = [event(user_id=f"u{i % 7}") for i in range(300)]
    batch: list[Any] = list(good)
    batch.insert(10, event(event_type="like"))
    batch.insert(200, event(ts="2026-01-02T03:04:05"))
    response = live.post(URL, json={"events": batch})
    assert response.status_code == 200
    body = response.json()
    assert (body["accepted"], body["rejected"], body["failed"]) == (300, 2, 0)
    assert [r["index"] for r in body["results"]] == list(range(302))
    assert [r["index"] for r in body["results"] if r["status"] == "rejected"] == [10, 200]

    records = read_topic(kafka_settings.kafka_bootstrap, kafka_settings.topic_events, 300)
    stored = {json.loads(r.value)["event_id"]: r for r in records}
    assert set(stored) == {e["event_id"] for e in good}
    users = {e["event_id"]: e["user_id"] for e in good}
    for result in body["results"]:
        if result["status"] == "accepted":
            rec = stored[result["event_id"]]
            assert rec.key.decode() == users[result["event_id"]]
            assert (rec.partition, rec.offset) == (result["partition"], result["offset"])


@pytest.mark.kafka
@pytest.mark.slow
def test_one_app_instance_rides_out_a_kafka_outage(tmp_path: Path) -> None:
    """Down at start → 503; broker starts → 200 on the next request; broker stops → 503."""
    broker = LocalKafka(home=tmp_path / "kafka", port=free_port(),
                        controller_port=free_port(), cache_dir=Settings().cache_dir,
                        heap="256m", partitions=2)
    settings = Settings(kafka_bootstrap=broker.bootstrap, topic_events="events-outage",
                        api_kafka_max_block_ms=1000, api_kafka_ack_timeout_ms=2000,
                        home=tmp_path / "streamrec")
    with TestClient(create_app(settings)) as client:
        down = client.post(URL, json={"events": [event()]})
        assert down.status_code == 503 and "Retry-After" in down.headers

        broker.start(quiet=True)
        try:
            ensure_topics(broker.bootstrap, [settings.topic_events], 2)
            sent = event()
            up = client.post(URL, json={"events": [sent]})
            assert up.status_code == 200, up.text
            assert up.json()["results"][0]["event_id"] == sent["event_id"]
        finally:
            broker.stop()

        started = time.monotonic()
        gone = client.post(URL, json={"events": [event(), event()]})
        assert gone.status_code == 503
        assert gone.json()["failed"] == 2
        assert time.monotonic() - started < 10

