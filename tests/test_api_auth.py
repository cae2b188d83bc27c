"""API keys: 401 without a (known) key, 403 without the scope, probes and docs stay open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from serving.app import create_app
from serving.auth import ApiKeys
from streaming.broker import free_port
from streamrec.settings import Settings

KEYS = "reader-key:read,writer-key:ingest,admin-key:ingest+read"


def settings(tmp_path: Path, keys: str) -> Settings:
    # No broker and no feature store: auth is decided before either is touched.
    return Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", home=tmp_path / "home",
                    api_keys=SecretStr(keys), api_kafka_max_block_ms=200)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path_factory.mktemp("auth"), KEYS))) as client:
        yield client


REC = {"user_id": "u1"}


def test_a_request_without_a_key_is_401_with_a_challenge(client: TestClient) -> None:
    response = client.post("/v1/recommendations", json=REC)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key is required" in response.json()["detail"]


@pytest.mark.parametrize("headers", [{"X-API-Key": "guess"},
                                     {"Authorization": "Bearer reader-ke"},
                                     {"Authorization": "Basic cmVhZGVyLWtleQ=="}])
def test_an_unknown_key_is_401(client: TestClient, headers: dict[str, str]) -> None:
    assert client.post("/v1/recommendations", json=REC, headers=headers).status_code == 401


@pytest.mark.parametrize("headers", [{"X-API-Key": "reader-key"},
                                     {"Authorization": "Bearer reader-key"},
                                     {"Authorization": "bearer admin-key"}])
def test_a_read_key_reads_by_header_or_bearer(
    client: TestClient, headers: dict[str, str]
) -> None:
    assert client.post("/v1/recommendations", json=REC, headers=headers).status_code == 200
    assert client.get("/v1/items/i1/similar", headers=headers).status_code == 200


def test_a_key_without_the_scope_is_403(client: TestClient) -> None:
    writer = {"X-API-Key": "writer-key"}
    response = client.post("/v1/recommendations", json=REC, headers=writer)
    assert response.status_code == 403
    assert "'read'" in response.json()["detail"]
    reader = {"X-API-Key": "reader-key"}
    assert client.post("/v1/events", json={"events": [{}]}, headers=reader).status_code == 403


def test_an_ingest_key_reaches_ingestion(client: TestClient) -> None:
    # Past auth, the (invalid) record meets the contract: 422, not 401/403.
    for key in ("writer-key", "admin-key"):
        response = client.post("/v1/events", json={"events": [{}]},
                               headers={"X-API-Key": key})
        assert response.status_code == 422


def test_probes_metrics_and_docs_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # not ready, but answered
    assert client.get("/metrics").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_an_unknown_path_is_401_not_404_to_strangers(client: TestClient) -> None:
    assert client.get("/v1/secret-new-route").status_code == 401
    assert client.get("/v1/secret-new-route",
                      headers={"X-API-Key": "reader-key"}).status_code == 404


def test_the_openapi_document_declares_the_schemes_per_operation(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
    rec = schema["paths"]["/v1/recommendations"]["post"]
    assert rec["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert "`read` scope" in rec["description"]
    assert "`ingest` scope" in schema["paths"]["/v1/events"]["post"]["description"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_without_keys_the_api_is_open(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path, ""))) as client:
        assert client.post("/v1/recommendations", json=REC).status_code == 200
        assert "securitySchemes" not in client.get("/openapi.json").json()["components"]


def test_a_malformed_key_list_stops_the_app_from_starting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        create_app(settings(tmp_path, "k1:read,k2:admin"))
    with pytest.raises(ValueError, match="key:scope"):
        create_app(settings(tmp_path, "just-a-key"))


def test_keys_are_compared_in_full() -> None:
    keys = ApiKeys.parse("abc:read,abcd:ingest")
    assert keys.scopes_of("abc") == {"read"}
    assert keys.scopes_of("abcd") == {"ingest"}
    assert keys.scopes_of("ab") is None and keys.scopes_of("abcde") is None
