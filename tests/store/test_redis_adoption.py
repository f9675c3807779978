"""A resumable session outlives its worker (issue 21: "the resumed upload may land on another
worker when the first one is gone").

The owner keeps the audio it receives in Redis (its journal). When it dies, another worker
adopts the session: its pipeline runs again over the kept audio, emitting only what the log
lacks, then an upload resumes it there. Each test kills a real server process (SIGKILL) and
compares the session's events with an uncut upload of the same file: nothing lost, nothing
twice, ids without gaps."""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.api.test_ws_resume import _as_sse, _drain, _received_until, _uncut, _ws_url
from tests.conftest import DATA, Server, start_server, stop_server
from tests.resume_helpers import head_offset, reset, send_chunks, shape, start_chunked
from tests.sse_client import SseEvent, iter_sse, read_all
from tests.store.conftest import RedisServer
from tests.store.test_redis_workers import redis_env, start_servers

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

WAV = (DATA / "speech.wav").read_bytes()
WEBM = (DATA / "speech.webm").read_bytes()
GRACE_S = 4.0


@pytest.fixture(scope="module")
def env(redis_server: RedisServer) -> dict[str, str]:
    return {**redis_env(redis_server), "STREAMER_RESUME_GRACE_SECONDS": str(GRACE_S)}


@pytest.fixture(scope="module")
def pair(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    servers = start_servers(tmp_path_factory.mktemp("adopt-pair"), env)
    yield servers
    for s in servers:
        stop_server(s)


@pytest.fixture
def owner(env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    """A third worker of the same deployment, to be killed."""
    server = start_server(tmp_path, env=env)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def expected(pair: list[Server]) -> list[tuple[object, ...]]:
    """The events of an uncut upload of the file, on a worker nobody kills."""

    async def run() -> list[tuple[object, ...]]:
        a, _ = pair
        async with httpx.AsyncClient(timeout=30) as client:
            with anyio.fail_after(60):
                ref = (await client.post(f"{a.url}/v1/sessions", json={"resumable": True})).json()
                r = await client.post(f"{a.url}/v1/sessions/{ref['id']}/audio", content=WAV)
                assert r.status_code == 200
                return shape(await read_all(client, f"{a.url}/v1/sessions/{ref['id']}/events"))

    return anyio.run(run)


async def _first_events(client: httpx.AsyncClient, url: str, finals: int) -> list[SseEvent]:
    """Follow the events until ``finals`` final segments are out."""
    seen: list[SseEvent] = []
    async with client.stream("GET", url) as response:
        async for ev in iter_sse(response):
            seen.append(ev)
            if sum(e.event == "segment" and e.data["is_final"] for e in seen) >= finals:
                return seen
    raise AssertionError(f"the session ended before {finals} finals: {seen}")


async def _resume_anywhere(
    client: httpx.AsyncClient, workers: list[Server], sid: str, data: bytes
) -> tuple[httpx.Response, int]:
    """What a client behind a load balancer does once its worker is gone: ask where the
    upload stands, and resume there, on whichever worker takes it (421: another one runs it,
    try the next; 409: the offset moved)."""
    path = f"/v1/sessions/{sid}/audio"
    offset, state = await head_offset(client, f"{workers[0].url}{path}")
    while state != "awaiting_resume":  # until the dead owner's lease lapses
        await anyio.sleep(0.05)
        offset, state = await head_offset(client, f"{workers[0].url}{path}")
    for attempt in range(40):
        worker = workers[attempt % len(workers)]
        r = await client.post(
            f"{worker.url}{path}", content=data[offset:], headers={"Upload-Offset": str(offset)}
        )
        if r.status_code == 409 and r.json()["error"]["code"] == "offset_mismatch":
            offset = int(r.headers["upload-offset"])
            continue
        if r.status_code != 421:
            return r, offset
        await anyio.sleep(0.05)
    raise AssertionError("no worker took the resume")


async def _adopted(client: httpx.AsyncClient, workers: list[Server]) -> float:
    """Sessions adopted so far by ``workers`` (their /metrics)."""
    total = 0.0
    for w in workers:
        text = (await client.get(f"{w.url}/metrics")).text
        match = re.search(r"^streamer_sessions_adopted_total (\S+)$", text, re.M)
        assert match, "streamer_sessions_adopted_total is missing"
        total += float(match.group(1))
    return total


def _assert_whole(events: list[SseEvent]) -> None:
    """Ids without gaps, and no VAD event or final twice."""
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    once = [
        s for s in shape(events) if s[0] in ("active", "inactive") or s[:2] == ("segment", True)
    ]
    assert len(once) == len(set(once)), once


async def test_owner_killed_mid_upload_resumed_on_another_worker_equals_uncut(
    pair: list[Server], owner: Server, expected: list[tuple[object, ...]]
) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(60):
            adopted = await _adopted(client, pair)
            sid = (await client.post(f"{a.url}/v1/sessions", json={"resumable": True})).json()["id"]
            sock = start_chunked(f"{owner.url}/v1/sessions/{sid}/audio", {"Upload-Offset": "0"})
            try:
                send_chunks(sock, WAV[: len(WAV) * 2 // 3])
                # Some results are out (and more are on their way) when the owner dies, and
                # some of the audio is in its journal (written every 0.25 s).
                before = await _first_events(client, f"{b.url}/v1/sessions/{sid}/events", 1)
                await anyio.sleep(0.5)
                owner.process.kill()
                owner.process.wait(5)
            finally:
                reset(sock)
            r, offset = await _resume_anywhere(client, [b, a], sid, WAV)
            assert r.status_code == 200, r.text
            assert 0 < offset <= len(WAV) * 2 // 3  # it resumed from the journal's end
            events = await read_all(client, f"{b.url}/v1/sessions/{sid}/events")
            assert await _adopted(client, pair) == adopted + 1
    _assert_whole(events)
    assert [e.data for e in events[: len(before)]] == [e.data for e in before]
    assert shape(events) == expected
    assert events[-1].data["reason"] == "completed"
    assert events[-1].data["bytes"] == len(WAV)


async def test_owner_killed_after_the_upload_ended_finishes_it_completed(
    pair: list[Server], owner: Server, expected: list[tuple[object, ...]]
) -> None:
    """The whole file was received; the owner dies with results still to come. Another worker
    finishes them, and the session ends ``completed`` without waiting for any upload."""
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(60):
            sid = (await client.post(f"{a.url}/v1/sessions", json={"resumable": True})).json()["id"]
            sock = start_chunked(f"{owner.url}/v1/sessions/{sid}/audio", {"Upload-Offset": "0"})
            try:
                send_chunks(sock, WAV)
                sock.sendall(b"0\r\n\r\n")  # the body's end: the input is complete
                await _first_events(client, f"{b.url}/v1/sessions/{sid}/events", 1)
                owner.process.kill()
                owner.process.wait(5)
            finally:
                reset(sock)
            t0 = anyio.current_time()
            events = await read_all(client, f"{b.url}/v1/sessions/{sid}/events")
            took = anyio.current_time() - t0
    _assert_whole(events)
    assert shape(events) == expected
    assert events[-1].data["reason"] == "completed"
    assert took < GRACE_S  # it did not wait for an upload


async def test_owner_killed_and_nobody_resumes_ends_after_grace_with_all_received(
    pair: list[Server], owner: Server
) -> None:
    """Nobody resumes: the adopter processes everything the dead owner received, waits the
    grace period, and ends the session ``client_disconnected``, as the owner would have."""
    a, b = pair
    cut = 32000 * 3 + 44  # the WAV header and 3 s of audio
    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(60):
            sid = (await client.post(f"{a.url}/v1/sessions", json={"resumable": True})).json()["id"]
            url = f"{owner.url}/v1/sessions/{sid}/audio"
            sock = start_chunked(url, {"Upload-Offset": "0"})
            try:
                send_chunks(sock, WAV[:cut])
                while (await head_offset(client, url))[0] < cut:
                    await anyio.sleep(0.01)
                await anyio.sleep(0.5)  # its journal writes every 0.25 s
                owner.process.kill()
                owner.process.wait(5)
            finally:
                reset(sock)
            events = await read_all(client, f"{b.url}/v1/sessions/{sid}/events")
    _assert_whole(events)
    end = events[-1].data
    assert (end["reason"], end["bytes"]) == ("client_disconnected", cut)
    assert end["audio_seconds"] == pytest.approx(3.0, abs=0.001)
    assert end["segments"] == sum(e.event == "segment" and e.data["is_final"] for e in events)


async def test_a_session_not_created_resumable_still_ends_worker_lost(
    pair: list[Server], owner: Server
) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(60):
            sid = (await client.post(f"{a.url}/v1/sessions")).json()["id"]
            sock = start_chunked(f"{owner.url}/v1/sessions/{sid}/audio")
            try:
                send_chunks(sock, WAV[: len(WAV) // 2])
                await _first_events(client, f"{b.url}/v1/sessions/{sid}/events", 1)
                owner.process.kill()
                owner.process.wait(5)
            finally:
                reset(sock)
            events = await read_all(client, f"{b.url}/v1/sessions/{sid}/events")
    assert events[-1].data["reason"] == "worker_lost"


def _read_response_head(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(4096)
        if not part:
            break
        data += part
    return data.decode("latin-1")


async def test_owner_shut_down_mid_upload_hands_the_session_over(
    pair: list[Server], owner: Server, expected: list[tuple[object, ...]]
) -> None:
    """A rolling restart: SIGTERM to the owner drains what it received, answers the upload
    ``503 shutting_down`` with its offset, and hands the session over (no ``end``): another
    worker adopts it at once and the resumed upload finishes it as if nothing happened."""
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as client:
        with anyio.fail_after(60):
            adopted = await _adopted(client, pair)
            sid = (await client.post(f"{a.url}/v1/sessions", json={"resumable": True})).json()["id"]
            url = f"{owner.url}/v1/sessions/{sid}/audio"
            sock = start_chunked(url, {"Upload-Offset": "0"})
            try:
                send_chunks(sock, WAV[: len(WAV) // 2])
                while (await head_offset(client, url))[0] < len(WAV) // 2:
                    await anyio.sleep(0.01)
                owner.process.send_signal(signal.SIGTERM)
                head = await anyio.to_thread.run_sync(_read_response_head, sock)
            finally:
                reset(sock)
            assert head.startswith("HTTP/1.1 503"), head
            assert "upload-offset: " + str(len(WAV) // 2) in head.lower(), head
            await anyio.to_thread.run_sync(owner.process.wait, 15)
            r, offset = await _resume_anywhere(client, [b, a], sid, WAV)
            assert r.status_code == 200, r.text
            assert offset == len(WAV) // 2  # everything received was kept: nothing to resend
            events = await read_all(client, f"{b.url}/v1/sessions/{sid}/events")
            assert await _adopted(client, pair) == adopted + 1
    _assert_whole(events)
    assert shape(events) == expected
    assert [e.data["reason"] for e in events if e.event == "end"] == ["completed"]


async def test_ws_upload_of_webm_survives_its_worker(pair: list[Server], owner: Server) -> None:
    """Over the WebSocket, with a container split anywhere: the adopter's new decoder reads the
    kept WebM from its first byte, and the resume on another worker continues it."""
    a, b = pair
    with anyio.fail_after(90):
        expected = await _uncut(a, WEBM)
        got: list[dict[str, Any]] = []
        ws = await connect(_ws_url(owner))
        await ws.send(json.dumps({"request": "start", "resumable": True}))
        started = json.loads(await ws.recv())
        sid = started["session_id"]
        for i in range(0, len(WEBM) // 2, 3000):
            await ws.send(WEBM[i : min(i + 3000, len(WEBM) // 2)])
        while not any(f.get("is_final") for f in got):
            await _received_until(ws, got, 0.2)
        await anyio.sleep(0.5)  # some of it is in the journal
        owner.process.kill()
        owner.process.wait(5)
        await _drain(ws, got)  # the connection dies with the worker
        offset, resumed = 0, None
        for attempt in range(100):
            ws = await connect(_ws_url([b, a][attempt % 2]))
            events = [f for f in got if f["type"] != "started"]
            await ws.send(
                json.dumps(
                    {"request": "resume", "id": sid, "offset": offset, "last_event_id": len(events)}
                )
            )
            try:
                reply = json.loads(await ws.recv())
            except ConnectionClosed:
                continue
            if reply["type"] == "error" and reply["code"] == "offset_mismatch":
                offset = reply["offset"]
                await ws.close()
                continue
            if reply["type"] == "started":
                resumed = reply
                break
            await ws.close()  # session_elsewhere: the dead owner's lease has not lapsed yet
            await anyio.sleep(0.1)
        assert resumed is not None and resumed["offset"] == offset > 0
        for i in range(offset, len(WEBM), 3000):
            await ws.send(WEBM[i : i + 3000])
        await ws.send(json.dumps({"request": "stop", "disconnect": True}))
        await _drain(ws, got)
    assert shape(_as_sse(got)) == expected
    assert got[-1]["type"] == "end" and got[-1]["reason"] == "completed"
