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

from tests.conftest import Server


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
