"""Clients that vanish: an uploader cut mid-stream keeps every byte it sent, a reader that stops
reading never stalls the session."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import anyio
import httpx
import pytest

from tests.conftest import DATA, Server
from tests.sse_client import finals, read_all

pytestmark = pytest.mark.anyio

WAV = (DATA / "speech.wav").read_bytes()


def raw_chunked_upload(url: str, body: bytes) -> socket.socket:
    """Starts a chunked POST on a raw socket and sends ``body``, leaving the request open."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=5)
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    sock.sendall(head.encode())
    for i in range(0, len(body), 8192):
        part = body[i : i + 8192]
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    return sock


async def test_upload_cut_mid_stream_keeps_every_byte(server: Server) -> None:
    cut = 32000 * 6 + 44  # 6 s: two utterances and the start of the third (5.26 s)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions")).json()
        sock = raw_chunked_upload(created["audio_url"], WAV[:cut])
        await anyio.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST: the client is gone without finishing the body
        with anyio.fail_after(15):
            events = await read_all(client, created["events_url"])
    end = events[-1].data
    assert end["type"] == "end" and end["reason"] == "client_disconnected"
    assert end["bytes"] == cut
    assert end["audio_seconds"] == pytest.approx((cut - 44) / 32000, abs=0.001)
    segs = finals(events)
    # Two whole utterances, and the third closed at the last sample received.
    assert len(segs) == 3
    assert segs[-1]["end_time"] == pytest.approx(end["audio_seconds"], abs=0.001)


async def test_a_reader_that_stops_reading_does_not_stall_the_session(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"interim_results": True})).json()
        u = urlparse(created["events_url"])
        stuck = socket.create_connection((u.hostname, u.port), timeout=5)
        # A tiny receive buffer, and this client never reads.
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stuck.sendall(f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode())
        try:
            t0 = time.monotonic()
            with anyio.fail_after(20):
                total = 0
                for _ in range(3):
                    sid = (await client.post("/v1/sessions")).json()["id"]
                    r = await client.post(f"/v1/sessions/{sid}/audio", content=WAV)
                    total += r.json()["segments"]
                pcm = WAV[44:] * 3  # raw PCM: a WAV's declared data size would end it early
                r = await client.post(created["audio_url"] + "?encoding=s16le", content=pcm)
                assert r.status_code == 200
                events = await read_all(client, created["events_url"])
            assert total == 9
            assert len(finals(events)) == 9
            assert time.monotonic() - t0 < 15
        finally:
            stuck.close()
