"""API key and CORS on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DATA, Server, start_server, stop_server

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("locked"),
        env={"STREAMER_API_KEY": KEY, "STREAMER_CORS_ORIGINS": "https://app.example"},
    )
    yield s
    stop_server(s)


def test_api_needs_the_key(locked: Server) -> None:
    with httpx.Client(base_url=locked.url, timeout=10) as c:
        r = c.post("/v1/sessions")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.post("/v1/sessions", headers={"Authorization": "Bearer nope"}).status_code == 401
        created = c.post("/v1/sessions", headers={"Authorization": f"Bearer {KEY}"})
        assert created.status_code == 201
        sid = created.json()["id"]
        # EventSource cannot set headers: ?token= works for reading.
        assert c.get(f"/v1/sessions/{sid}?token={KEY}").status_code == 200
        assert c.get(f"/v1/sessions/{sid}").status_code == 401
        # Health stays open for load balancers.
        assert c.get("/healthz").status_code == 200


def test_upload_with_key(locked: Server, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=locked.url, timeout=30, headers=auth) as c:
        sid = c.post("/v1/sessions").json()["id"]
        r = c.post(f"/v1/sessions/{sid}/audio", content=(DATA / "speech.wav").read_bytes())
        assert r.status_code == 200 and r.json()["segments"] == 3


def test_cors_preflight_and_headers(locked: Server) -> None:
    with httpx.Client(base_url=locked.url, timeout=10) as c:
        pre = c.options(
            "/v1/sessions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options(
            "/v1/sessions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
