"""Regression: a request whose target is in absolute form (``GET http://host/healthz
HTTP/1.1``) got 404, because hypercorn passes the whole URL on as the ASGI path and no route
matched it. RFC 9112 section 3.2.2 says a server must accept it (and take the authority from the
target, not from ``Host``)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import Server, start_server, stop_server


def raw_request(server: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("keyed"), env={"STREAMER_API_KEY": "sesame"})
    yield s
    stop_server(s)


def test_absolute_form_get_is_served(server: Server) -> None:
    target = f"http://127.0.0.1:{server.port}/healthz"
    status, _, body = raw_request(
        server,
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"


def test_absolute_form_takes_the_authority_from_the_target(server: Server) -> None:
    target = f"http://127.0.0.1:{server.port}/v1/sessions?x=1"
    status, headers, body = raw_request(
        server,
        f"POST {target} HTTP/1.1\r\nHost: elsewhere.invalid\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert status == 201, body
    assert headers["location"].startswith(f"http://127.0.0.1:{server.port}/v1/sessions/")
    session_id = json.loads(body)["id"]
    status, _, body = raw_request(
        server,
        f"GET http://127.0.0.1:{server.port}/v1/sessions/{session_id} HTTP/1.1\r\n"
        "Host: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 200 and json.loads(body)["state"] == "created"


def test_absolute_form_does_not_get_past_the_api_key(keyed_server: Server) -> None:
    base = f"http://127.0.0.1:{keyed_server.port}"
    request = f"POST {base}/v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    status, _, _ = raw_request(keyed_server, f"{request}Connection: close\r\n\r\n".encode())
    assert status == 401
    status, _, _ = raw_request(
        keyed_server,
        f"{request}Authorization: Bearer sesame\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 201
