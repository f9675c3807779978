"""Session resources over real HTTP: create, status, cancel, and their errors."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server


@pytest.fixture
def client(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c  # type: ignore[misc]


def test_create_returns_id_and_urls(client: httpx.Client) -> None:
    r = client.post("/v1/sessions", json={"interim_results": True, "vad": {"redemption_ms": 400}})
    assert r.status_code == 201
    body = r.json()
    assert len(body["id"]) >= 22  # 128 random bits, url-safe
    assert body["audio_url"].endswith(f"/v1/sessions/{body['id']}/audio")
    assert body["events_url"].endswith(f"/v1/sessions/{body['id']}/events")
    assert body["config"]["vad"]["redemption_ms"] == 400
    assert r.headers["location"] == body["url"]
    status = client.get(f"/v1/sessions/{body['id']}").json()
    assert status["state"] == "created"


def test_create_without_body(client: httpx.Client) -> None:
    r = client.post("/v1/sessions")
    assert r.status_code == 201
    assert r.json()["config"]["format"] == "auto"


def test_ids_are_unguessable(client: httpx.Client) -> None:
    ids = {client.post("/v1/sessions").json()["id"] for _ in range(20)}
    assert len(ids) == 20


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b'{"nope": 1}', 422, "unknown_field"),
        (b'{"mode": "turbo"}', 422, "invalid_config"),
        (b'{"format": {"bit_depth": 24}}', 415, "unsupported_format"),
        (b'"just a string"', 422, "invalid_config"),
    ],
)
def test_bad_config(client: httpx.Client, content: bytes, status: int, code: str) -> None:
    r = client.post("/v1/sessions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert "Traceback" not in r.text


def test_unknown_and_malformed_ids(client: httpx.Client) -> None:
    r = client.get("/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")
    r = client.get("/v1/sessions/..%2F..%2Fetc")
    assert r.status_code == 404
    r = client.get("/v1/sessions/short/events")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "session_not_found")


def test_method_not_allowed_is_json(client: httpx.Client) -> None:
    r = client.patch("/v1/sessions")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_delete_before_upload_ends_session(client: httpx.Client) -> None:
    sid = client.post("/v1/sessions").json()["id"]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 202
    with client.stream("GET", f"/v1/sessions/{sid}/events") as r:
        text = r.read().decode()
    assert "event: end" in text and '"reason":"cancelled"' in text
    r = client.post(f"/v1/sessions/{sid}/audio", content=b"\0" * 100)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "session_ended")


def test_health(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert 0 <= ready.json()["loop_busy"] < 1  # the shared test server is not saturated
