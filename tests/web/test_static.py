"""The page's files are served at ``/`` and nothing else is: no escape from ``web/``, and the
API's own 404/405 answers are unchanged by the page's routes."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ROOT, Server

WEB = ROOT / "web"


@pytest.fixture
def client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10)


def test_index_is_served_at_root(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.text == (WEB / "index.html").read_text()
    assert client.get("/index.html").text == r.text


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("timeline.js", "text/javascript"),
        ("pcm.js", "text/javascript"),
        ("pcm-worklet.js", "text/javascript"),
    ],
)
def test_assets_have_their_types(client: httpx.Client, name: str, media_type: str) -> None:
    r = client.get(f"/{name}")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(media_type)
    assert r.headers["cache-control"] == "no-cache"
    assert r.content == (WEB / name).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/missing.js",
        "/..%2Fpyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/..%2Fservice%2Fapp.py",
        "/web/index.html",
        "/README.md",
    ],
)
def test_nothing_outside_web_is_served(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_api_answers_are_unchanged(client: httpx.Client) -> None:
    r = client.get("/v1/sessions")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert client.post("/").status_code == 405
