"""Resuming a cut WebSocket upload (issue 21): ``{"request": "resume", "id", "offset",
"last_event_id"}`` on ``/v1/ws`` continues the session's byte stream, and the events the client
gets over both connections equal an uncut upload's, none lost and none twice."""

from __future__ import annotations

import json
import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.api.ws_protocol import V1, Resume, parse_message
from service.errors import StreamerError
from tests.conftest import DATA, Server, start_server, stop_server
from tests.resume_helpers import head_offset, shape
from tests.sse_client import SseEvent

pytestmark = pytest.mark.anyio

WEBM = (DATA / "speech.webm").read_bytes()
WAV = (DATA / "speech.wav").read_bytes()


def _ws_url(server: Server) -> str:
    return server.url.replace("http", "ws", 1) + "/v1/ws"


def _as_sse(frames: list[dict[str, Any]]) -> list[SseEvent]:
    return [SseEvent(None, f["type"], f) for f in frames if f["type"] != "started"]


def _rst(ws: ClientConnection) -> None:
    sock: socket.socket = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


async def _drain(ws: ClientConnection, into: list[dict[str, Any]]) -> None:
    """Everything the server sends until it closes."""
    try:
        async for message in ws:
            into.append(json.loads(message))
    except ConnectionClosed:
        pass


async def _uncut(server: Server, data: bytes) -> list[tuple[object, ...]]:
    got: list[dict[str, Any]] = []
    async with connect(_ws_url(server)) as ws:
        await ws.send(json.dumps({"request": "start", "resumable": True}))
        for i in range(0, len(data), 4000):
            await ws.send(data[i : i + 4000])
        await ws.send(json.dumps({"request": "stop", "disconnect": True}))
        await _drain(ws, got)
    return shape(_as_sse(got))


async def _received_until(ws: ClientConnection, got: list[dict[str, Any]], pause: float) -> None:
    with anyio.move_on_after(pause):
        async for message in ws:
            got.append(json.loads(message))


def test_parse_resume() -> None:
    assert parse_message({"request": "resume", "id": "abc", "offset": 5}, V1) == Resume("abc", 5, 0)
    msg = {"request": "resume", "id": "abc", "offset": 5, "last_event_id": 7}
    assert parse_message(msg, V1) == Resume("abc", 5, 7)
    for bad in (
        {"request": "resume", "id": "abc"},
        {"request": "resume", "id": "abc", "offset": -1},
        {"request": "resume", "id": "abc", "offset": True},
        {"request": "resume", "id": 3, "offset": 0},
        {"request": "resume", "id": "abc", "offset": 0, "extra": 1},
    ):
        with pytest.raises(StreamerError):
            parse_message(bad, V1)


@pytest.mark.parametrize(("name", "data"), [("webm", WEBM), ("wav", WAV)])
async def test_ws_cut_and_resumed_equals_uncut(server: Server, name: str, data: bytes) -> None:
    rng = random.Random(f"ws-resume-{name}")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(60):
            expected = await _uncut(server, data)
            got: list[dict[str, Any]] = []
            ws = await connect(_ws_url(server))
            await ws.send(json.dumps({"request": "start", "resumable": True}))
            started = json.loads(await ws.recv())
            assert started["type"] == "started"
            session_id = started["session_id"]
            url = f"/v1/sessions/{session_id}/audio"
            sent = 0
            for _ in range(3):
                upto = rng.randrange(sent + 1, len(data))
                for i in range(sent, upto, 3000):
                    await ws.send(data[i : min(i + 3000, upto)])
                await _received_until(ws, got, rng.uniform(0.05, 0.4))
                _rst(ws)
                while (await head_offset(client, url))[1] != "awaiting_resume":
                    await anyio.sleep(0.02)
                ws = await connect(_ws_url(server))
                # The client does not know what the server received: an offset of 0 is answered
                # with the right one, then it resumes there.
                await ws.send(json.dumps({"request": "resume", "id": session_id, "offset": 0}))
                reply = json.loads(await ws.recv())
                assert reply["type"] == "error" and reply["code"] == "offset_mismatch"
                sent = reply["offset"]
                assert sent == (await head_offset(client, url))[0]
                events = [f for f in got if f["type"] != "started"]
                resume = {
                    "request": "resume",
                    "id": session_id,
                    "offset": sent,
                    "last_event_id": len(events),
                }
                await ws.send(json.dumps(resume))
                started = json.loads(await ws.recv())
                assert started["type"] == "started" and started["resumed"] is True
                assert started["offset"] == sent and started["session_id"] == session_id
            for i in range(sent, len(data), 3000):
                await ws.send(data[i : i + 3000])
            await ws.send(json.dumps({"request": "stop", "disconnect": True}))
            await _drain(ws, got)
    assert shape(_as_sse(got)) == expected
    assert got[-1]["type"] == "end" and got[-1]["reason"] == "completed"
    assert got[-1]["bytes"] == len(data)


async def test_ws_resume_of_an_unknown_session_is_refused(server: Server) -> None:
    async with connect(_ws_url(server)) as ws:
        await ws.send(json.dumps({"request": "resume", "id": "A" * 22, "offset": 0}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "error" and reply["code"] == "session_not_found"
        with pytest.raises(ConnectionClosed):
            await ws.recv()


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("ws-idle"),
        env={"STREAMER_IDLE_TIMEOUT_SECONDS": "1", "STREAMER_RESUME_GRACE_SECONDS": "20"},
    )
    yield s
    stop_server(s)


async def _frames_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    await _drain(ws, got)
    return got


async def test_a_silent_connection_is_closed_and_its_session_waits(idle_server: Server) -> None:
    """Silent past the idle timeout: the connection is closed (``idle_timeout``, 1008) at once,
    not when the session ends, and the resumable session waits for a resume."""
    expected = await _uncut(idle_server, WAV)
    async with httpx.AsyncClient(base_url=idle_server.url, timeout=30) as client:
        with anyio.fail_after(30):
            ws = await connect(_ws_url(idle_server))
            await ws.send(json.dumps({"request": "start", "resumable": True}))
            session_id = json.loads(await ws.recv())["session_id"]
            await ws.send(WAV[:100_000])
            t0 = anyio.current_time()
            got = await _frames_until_closed(ws)  # silent from now on
            assert anyio.current_time() - t0 < 5
            assert ws.close_code == 1008
            assert got[-1]["type"] == "error" and got[-1]["code"] == "idle_timeout"
            url = f"/v1/sessions/{session_id}/audio"
            offset, state = await head_offset(client, url)
            assert (offset, state) == (100_000, "awaiting_resume")
            events = [f for f in got if f["type"] != "error"]
            async with connect(_ws_url(idle_server)) as ws2:
                resume = {"request": "resume", "id": session_id, "offset": offset}
                await ws2.send(json.dumps({**resume, "last_event_id": len(events)}))
                assert json.loads(await ws2.recv())["resumed"] is True
                await ws2.send(WAV[offset:])
                await ws2.send(json.dumps({"request": "stop", "disconnect": True}))
                await _drain(ws2, events)
    assert shape(_as_sse(events)) == expected


async def test_a_connection_whose_session_is_resumed_elsewhere_is_told_and_closed(
    server: Server,
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(30):
            old = await connect(_ws_url(server))
            await old.send(json.dumps({"request": "start", "resumable": True}))
            session_id = json.loads(await old.recv())["session_id"]
            await old.send(WAV[:100_000])
            url = f"/v1/sessions/{session_id}/audio"
            while (await head_offset(client, url))[0] < 100_000:
                await anyio.sleep(0.02)
            async with connect(_ws_url(server)) as new:
                msg = {"request": "resume", "id": session_id, "offset": 100_000}
                await new.send(json.dumps(msg))
                assert json.loads(await new.recv())["resumed"] is True
                told = await _frames_until_closed(old)
                assert told[-1]["code"] == "session_busy" and old.close_code == 1008
                await new.send(WAV[100_000:])
                await new.send(json.dumps({"request": "stop", "disconnect": True}))
                rest: list[dict[str, Any]] = []
                await _drain(new, rest)
    assert rest[-1]["type"] == "end" and rest[-1]["reason"] == "completed"
    assert rest[-1]["bytes"] == len(WAV)
