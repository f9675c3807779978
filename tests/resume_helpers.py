"""Cutting and resuming uploads over real sockets, for the resume tests: a chunked upload on a
raw socket that ends in a TCP reset (SO_LINGER 0, then close), and the client's side of resuming
(``HEAD`` for the offset, an upload with ``Upload-Offset``, again on 409)."""

from __future__ import annotations

import socket
import struct
from typing import Any
from urllib.parse import urlparse

import anyio
import httpx

from tests.sse_client import SseEvent


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST, as a client whose network vanished looks to the server."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def start_chunked(url: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A chunked POST on a raw socket, its headers sent and its body open."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=5)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: application/octet-stream\r\n{extra}\r\n"
    )
    sock.sendall(head.encode())
    return sock


def send_chunks(sock: socket.socket, body: bytes, size: int = 4096) -> None:
    for i in range(0, len(body), size):
        part = body[i : i + size]
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")


async def head_offset(client: httpx.AsyncClient, audio_url: str) -> tuple[int, str]:
    r = await client.head(audio_url)
    assert r.status_code == 200, r
    return int(r.headers["upload-offset"]), r.headers["session-state"]


async def cut_upload(audio_url: str, data: bytes, offset: int, upto: int, pause: float) -> None:
    """Send ``data[offset:upto]`` as an upload continuing at ``offset``, then reset the
    connection ``pause`` seconds later (the server may not have read all of it)."""
    headers = {"Upload-Offset": str(offset)}
    sock = start_chunked(audio_url, headers)
    try:
        send_chunks(sock, data[offset:upto])
        await anyio.sleep(pause)
    finally:
        reset(sock)


async def cut_when_received(
    client: httpx.AsyncClient, audio_url: str, data: bytes, offset: int, upto: int
) -> None:
    """As :func:`cut_upload`, but reset only once the server has received all of
    ``data[offset:upto]`` (for tests that assert exact offsets on a busy machine)."""
    sock = start_chunked(audio_url, {"Upload-Offset": str(offset)})
    try:
        send_chunks(sock, data[offset:upto])
        while (await head_offset(client, audio_url))[0] < upto:
            await anyio.sleep(0.01)
    finally:
        reset(sock)


async def finish_upload(client: httpx.AsyncClient, audio_url: str, data: bytes) -> httpx.Response:
    """Resume at the server's offset and send the rest to the end; a 409 names the offset."""
    offset, _ = await head_offset(client, audio_url)
    for _ in range(20):
        r = await client.post(
            audio_url, content=data[offset:], headers={"Upload-Offset": str(offset)}
        )
        if r.status_code != 409 or r.json()["error"]["code"] != "offset_mismatch":
            return r
        offset = int(r.headers["upload-offset"])
        assert offset == r.json()["error"]["offset"]
    raise AssertionError("the offset never settled")


def shape(events: list[SseEvent]) -> list[tuple[Any, ...]]:
    """What must be identical between a cut-and-resumed upload and an uncut one: every event,
    with its times and counts (not wall-clock fields), as a sorted list: the model's results
    and the VAD's may interleave differently from run to run, but the multiset may not differ
    (nothing lost, nothing twice)."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        d = e.data
        if e.event == "segment":
            out.append(("segment", d["is_final"], d["start_time"], d["end_time"], d.get("count")))
        elif e.event in ("active", "inactive"):
            out.append((e.event, d["time"], d["channel"]))
        elif e.event == "end":
            out.append(("end", d["reason"], d["bytes"], d["audio_seconds"], d["segments"]))
        else:
            out.append((e.event, d.get("code")))
    return sorted(out, key=repr)
