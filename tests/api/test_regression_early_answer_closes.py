"""Regression: an upload whose session stopped early was not answered, then wedged.

When the pipeline stopped taking input early (unsupported audio, a limit, DELETE) while the
client had declared more body than it had sent, the handler kept waiting for that body: no
answer until the idle timeout. And once answered early, the connection stayed open with the
rest of the body still due, so the next request on that keep-alive connection hung (and so did
the worker's shutdown). The handler now stops reading as soon as the session's input closes,
and early answers carry ``Connection: close``.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

import httpx

from tests.conftest import DATA, Server


def test_early_answer_closes_the_connection(server: Server) -> None:
    created = httpx.post(f"{server.url}/v1/sessions").json()
    u = urlparse(created["audio_url"])
    declared = 2_000_000
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(
            f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Content-Length: {declared}\r\n\r\n".encode()
        )
        sock.sendall(os.urandom(200_000))  # junk, and far less than declared
        deadline = time.monotonic() + 10
        received = b""
        while time.monotonic() < deadline:
            part = sock.recv(65536)
            if not part:
                break  # the server closed the connection after answering
            received += part
        else:
            raise AssertionError(f"connection left open after the answer: {received[:200]!r}")
    head = received.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 415")
    assert "connection: close" in head


def test_an_upload_refused_before_its_body_closes_the_connection(server: Server) -> None:
    """Regression: an upload refused before the handler read its body (here 409
    ``session_ended``; a resume's 409 likewise) was answered without ``Connection: close``, and
    the server then closed the connection with the body unread; a client reusing it for its
    next request found it closed under it (``Server disconnected without sending a response``,
    seen in CI after a resume refused past its grace period)."""
    wav = (DATA / "speech.wav").read_bytes()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        created = client.post("/v1/sessions").json()
        assert client.put(created["audio_url"], content=wav[:20000]).status_code == 200
        again = client.post(created["audio_url"], content=wav)
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "session_ended"
        assert again.headers["connection"] == "close"
        # The client knows to open a new connection: the next request is answered.
        assert client.get(f"/v1/sessions/{created['id']}").status_code == 200
