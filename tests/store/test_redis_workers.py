"""Several server processes sharing one real redis-server, as behind a load balancer without
sticky sessions: the audio goes to one worker, events, status and cancel to any other; a killed
owner, a lost Redis, and ``--workers N`` (with and without Redis)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from websockets.asyncio.client import connect

from service.workers import STARTUP_FAILURE_S
from tests.conftest import DATA, ROOT, Server, start_server, stop_server
from tests.sse_client import SseEvent, finals, iter_sse, read_all
from tests.store.conftest import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

LEASE_S = 1.0
POLL_S = 0.2
# worker_lost must reach subscribers within the lease, one blocking read, and some slack.
LOST_BOUND_S = LEASE_S + POLL_S + 1.5
SPEECH = (DATA / "speech.wav").read_bytes()
REAL_TIME = 32000  # bytes per second of 16 kHz mono s16 audio


def redis_env(redis: RedisServer) -> dict[str, str]:
    return {
        "REDIS_URL": redis.url,
        "STREAMER_REDIS_PREFIX": f"t{uuid.uuid4().hex[:8]}",
        "STREAMER_REDIS_LEASE_SECONDS": str(LEASE_S),
        "STREAMER_REDIS_POLL_SECONDS": str(POLL_S),
        "STREAMER_REDIS_TIMEOUT_SECONDS": "1",
    }


def start_servers(tmp: Path, env: dict[str, str], n: int = 2) -> list[Server]:
    """Start ``n`` servers at once (each takes seconds to load its models)."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: start_server(tmp, env=env), range(n)))


@pytest.fixture(scope="module")
def shared_env(redis_server: RedisServer) -> dict[str, str]:
    return redis_env(redis_server)


@pytest.fixture(scope="module")
def pair(
    shared_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    """Two workers of one deployment (same Redis, same prefix), on different ports."""
    a, b = start_servers(tmp_path_factory.mktemp("pair"), shared_env)
    yield a, b
    for s in (a, b):
        stop_server(s)


async def paced(data: bytes, bytes_per_second: float, chunk: int = 4000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]
        await anyio.sleep(chunk / bytes_per_second)


async def stalled(data: bytes, bytes_per_second: float) -> AsyncIterator[bytes]:
    """Sends ``data`` paced, then keeps the upload open without sending, like a live mic."""
    async for chunk in paced(data, bytes_per_second):
        yield chunk
    await anyio.sleep(60)


def without_links(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if not k.endswith("url")}


async def test_upload_on_a_events_on_b_and_resume_on_a(pair: tuple[Server, Server]) -> None:
    a, b = pair
    seen: list[SseEvent] = []
    first_event_at: list[float] = []
    async with httpx.AsyncClient(timeout=30) as client:
        sid = (await client.post(f"{b.url}/v1/sessions")).json()["id"]

        async def subscribe_on_b() -> None:
            async with client.stream("GET", f"{b.url}/v1/sessions/{sid}/events") as response:
                assert response.status_code == 200
                async for ev in iter_sse(response):
                    first_event_at[:] = first_event_at or [time.monotonic()]
                    seen.append(ev)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(subscribe_on_b)
                # 4x real time: about 2 s of upload, so events flow while it goes on.
                r = await client.put(
                    f"{a.url}/v1/sessions/{sid}/audio", content=paced(SPEECH, 4 * REAL_TIME)
                )
                upload_done = time.monotonic()
        assert r.status_code == 200, r.text
        assert first_event_at[0] < upload_done, "events must cross workers live"
        assert [e.id for e in seen] == list(range(1, len(seen) + 1))
        assert (seen[-1].event, seen[-1].data["reason"]) == ("end", "completed")
        assert len(finals(seen)) == 3
        assert r.json()["last_event_id"] == len(seen)

        # The client reconnects to the other worker, where it has never been, and resumes.
        k = len(seen) // 2
        resumed = await read_all(client, f"{a.url}/v1/sessions/{sid}/events", last_event_id=k)
        assert resumed == seen[k:]
        status_a = (await client.get(f"{a.url}/v1/sessions/{sid}")).json()
        status_b = (await client.get(f"{b.url}/v1/sessions/{sid}")).json()
        assert without_links(status_a) == without_links(status_b)
        assert (status_b["state"], status_b["end_reason"]) == ("ended", "completed")
        assert status_b["segments"] == 3 and status_b["bytes"] == len(SPEECH)


async def test_second_upload_elsewhere_is_busy_and_delete_elsewhere_stops_it(
    pair: tuple[Server, Server],
) -> None:
    a, b = pair
    async with httpx.AsyncClient(timeout=30) as client:
        sid = (await client.post(f"{a.url}/v1/sessions")).json()["id"]
        audio = f"/v1/sessions/{sid}/audio"
        outcome: list[Any] = []
        seen: list[SseEvent] = []

        async def upload_on_a() -> None:
            # A client still sending when its session is cancelled may see the response or a
            # reset (the server closes with unread body bytes); either way it stops waiting.
            try:
                async with httpx.AsyncClient(timeout=30) as uploader:
                    r = await uploader.post(f"{a.url}{audio}", content=stalled(SPEECH, REAL_TIME))
                outcome.append(r.json()["end_reason"])
            except httpx.TransportError as exc:
                outcome.append(exc)

        async def subscribe_on_b() -> None:
            async with client.stream("GET", f"{b.url}/v1/sessions/{sid}/events") as response:
                async for ev in iter_sse(response):
                    seen.append(ev)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(subscribe_on_b)
                tg.start_soon(upload_on_a)
                while (await client.get(f"{b.url}/v1/sessions/{sid}")).json()["state"] != "running":
                    await anyio.sleep(0.05)
                busy = await client.post(f"{b.url}{audio}", content=b"RIFF")
                assert busy.status_code == 409
                assert busy.json()["error"]["code"] == "session_busy"
                again = await client.post(f"{a.url}{audio}", content=b"RIFF")
                assert again.json()["error"]["code"] == "session_busy"

                t0 = time.monotonic()
                assert (await client.delete(f"{b.url}/v1/sessions/{sid}")).status_code == 202
                while not outcome or not seen or seen[-1].event != "end":
                    await anyio.sleep(0.02)
                stopped = time.monotonic() - t0
        # A's pipeline stopped at once: its upload is over although its client kept sending.
        assert stopped < 2, stopped
        assert outcome[0] == "cancelled" or isinstance(outcome[0], httpx.TransportError)
        assert seen[-1].data["reason"] == "cancelled"
        status = (await client.get(f"{b.url}/v1/sessions/{sid}")).json()
        assert (status["state"], status["end_reason"]) == ("ended", "cancelled")
        late = await client.post(f"{b.url}{audio}", content=b"RIFF")
        assert (late.status_code, late.json()["error"]["code"]) == (409, "session_ended")


async def test_websocket_on_a_sse_on_b(pair: tuple[Server, Server]) -> None:
    a, b = pair
    pcm_start = json.dumps(
        {
            "request": "start",
            "format": {"channels": 1, "sample_rate": 16000, "bit_depth": 16, "is_float": False},
        }
    )
    with anyio.fail_after(30):
        async with connect(a.url.replace("http", "ws", 1) + "/v1/ws") as ws:
            await ws.send(pcm_start)
            started = json.loads(await ws.recv())
            assert started["type"] == "started"
            for i in range(44, len(SPEECH), 8000):
                await ws.send(SPEECH[i : i + 8000])
            await ws.send(json.dumps({"request": "stop", "disconnect": True}))
            over_ws = [json.loads(m) async for m in ws]
        async with httpx.AsyncClient(timeout=30) as client:
            events = await read_all(client, f"{b.url}/v1/sessions/{started['session_id']}/events")
    assert [e.data for e in events] == over_ws
    assert events[-1].data["reason"] == "completed" and len(finals(events)) == 3


async def test_killed_owner_ends_as_worker_lost(
    pair: tuple[Server, Server], shared_env: dict[str, str], tmp_path: Path
) -> None:
    _, b = pair
    owner = start_server(tmp_path, env=shared_env)
    seen: list[SseEvent] = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            sid = (await client.post(f"{b.url}/v1/sessions")).json()["id"]

            async def upload_on_owner() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its server is killed
                    await client.post(
                        f"{owner.url}/v1/sessions/{sid}/audio",
                        content=stalled(SPEECH[: 4 * REAL_TIME], REAL_TIME),
                    )

            async def subscribe_on_b() -> None:
                async with client.stream("GET", f"{b.url}/v1/sessions/{sid}/events") as response:
                    async for ev in iter_sse(response):
                        seen.append(ev)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(subscribe_on_b)
                    tg.start_soon(upload_on_owner)
                    while not any(e.event == "segment" for e in seen):
                        await anyio.sleep(0.05)
                    owner.process.kill()  # SIGKILL: no shutdown, no end event from it
                    t0 = time.monotonic()
                    with anyio.fail_after(LOST_BOUND_S + 2):
                        while not seen or seen[-1].event != "end":
                            await anyio.sleep(0.02)
                    elapsed = time.monotonic() - t0
                    tg.cancel_scope.cancel()
            assert elapsed < LOST_BOUND_S, f"worker_lost took {elapsed:.2f} s"
            assert seen[-1].data["reason"] == "worker_lost"
            assert [e.id for e in seen] == list(range(1, len(seen) + 1))
            status = (await client.get(f"{b.url}/v1/sessions/{sid}")).json()
            assert (status["state"], status["end_reason"]) == ("ended", "worker_lost")
            retry = await client.post(f"{b.url}/v1/sessions/{sid}/audio", content=b"RIFF")
            assert retry.json()["error"]["code"] == "session_ended"
    finally:
        stop_server(owner)


async def test_redis_lost_mid_session_is_a_clear_error_then_recovers(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    env = {**redis_env(own_redis), "STREAMER_SHUTDOWN_GRACE_SECONDS": "2"}
    a, b = start_servers(tmp_path, env)
    seen: list[SseEvent] = []
    sse_closed: list[float] = []
    responses: list[httpx.Response] = []
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            sid = (await client.post(f"{a.url}/v1/sessions")).json()["id"]

            async def live_audio() -> AsyncIterator[bytes]:
                async for chunk in paced(SPEECH, REAL_TIME):
                    if sse_closed:
                        return  # the speaker gives up once the results stop
                    yield chunk

            async def upload_on_a() -> None:
                # Its own connection: one answered before its body ended is not reusable.
                async with httpx.AsyncClient(timeout=30) as uploader:
                    responses.append(
                        await uploader.post(
                            f"{a.url}/v1/sessions/{sid}/audio", content=live_audio()
                        )
                    )

            async def subscribe_on_b() -> None:
                async with client.stream("GET", f"{b.url}/v1/sessions/{sid}/events") as response:
                    async for ev in iter_sse(response):
                        seen.append(ev)
                sse_closed.append(time.monotonic())

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(subscribe_on_b)
                    tg.start_soon(upload_on_a)
                    while not seen:
                        await anyio.sleep(0.05)
                    own_redis.stop(kill=True)
                    t0 = time.monotonic()
            # Both ends heard about it, promptly; neither hung.
            assert sse_closed[0] - t0 < 5
            assert (seen[-1].event, seen[-1].id) == ("error", None)
            assert seen[-1].data["code"] == "store_unavailable"
            assert responses[0].status_code == 503, responses[0].text
            assert responses[0].json()["error"]["code"] == "store_unavailable"
            for server in (a, b):
                ready = await client.get(f"{server.url}/readyz")
                assert ready.status_code == 503
                assert ready.json()["reason"] == "session store unreachable"
                created = await client.post(f"{server.url}/v1/sessions")
                assert (created.status_code, created.json()["error"]["code"]) == (
                    503,
                    "store_unavailable",
                )

            own_redis.start()  # back, empty (no persistence)
            with anyio.fail_after(10):
                while (await client.get(f"{a.url}/readyz")).status_code != 200:
                    await anyio.sleep(0.1)
                assert (await client.get(f"{b.url}/v1/sessions/{sid}")).status_code == 404
                fresh = (await client.post(f"{a.url}/v1/sessions")).json()["id"]
                r = await client.put(f"{b.url}/v1/sessions/{fresh}/audio", content=SPEECH)
                assert r.status_code == 200, r.text
                events = await read_all(client, f"{a.url}/v1/sessions/{fresh}/events")
                assert events[-1].data["reason"] == "completed"
    finally:
        for server in (a, b):
            stop_server(server)


def test_workers_flag_needs_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if "REDIS_URL" not in k}
    done = subprocess.run(
        [sys.executable, "-m", "service", "--workers", "2", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "REDIS_URL" in done.stderr and "docs/scaling.md" in done.stderr


async def test_workers_flag_with_redis_serves_and_shuts_down_every_worker(
    shared_env: dict[str, str], tmp_path: Path
) -> None:
    server = start_server(
        tmp_path,
        env={**shared_env, "STREAMER_SHUTDOWN_GRACE_SECONDS": "2"},
        args=["--workers", "2"],
    )
    try:
        workers: set[str] = set()
        # A fresh connection each time, so the kernel hands it to either worker.
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            with anyio.fail_after(30):
                while len(workers) < 2:
                    r = await client.get("/readyz", headers={"Connection": "close"})
                    if r.status_code == 200:
                        workers.add(r.json()["worker"])
                sid = (await client.post("/v1/sessions")).json()["id"]
                r = await client.put(f"/v1/sessions/{sid}/audio", content=SPEECH)
                assert r.status_code == 200
                events = await read_all(client, f"{server.url}/v1/sessions/{sid}/events")
                assert len(finals(events)) == 3
        children = psutil.Process(server.process.pid).children(recursive=True)
        assert len([c for c in children if "spawn_main" in " ".join(c.cmdline())]) == 2
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0, server.log()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left running after SIGTERM: {alive}"
    finally:
        stop_server(server)


async def test_workers_supervisor_notices_a_worker_that_dies(
    shared_env: dict[str, str], tmp_path: Path
) -> None:
    """Regression: the supervisor woke for a worker's exit, then blocked reading its signal
    pipe (no signal had written to it), so a dead worker was never reaped nor replaced. One
    dead this soon after starting (within STARTUP_FAILURE_S) is taken for a startup failure:
    the supervisor stops the other worker and exits 1. (A later death is replaced:
    tests/client/test_cli_failover.py.)"""
    server = start_server(tmp_path, env=shared_env, args=["--workers", "2"])
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2
        if time.time() - workers[0].create_time() > STARTUP_FAILURE_S - 2:
            pytest.skip("the workers took too long to start for this test's premise")
        workers[0].kill()
        with anyio.fail_after(20):
            while server.process.poll() is None:
                await anyio.sleep(0.1)
        assert server.process.returncode == 1, server.log()
        assert f"worker {workers[0].pid} exited with -9" in server.log()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left running: {alive}"
    finally:
        stop_server(server)


async def test_deepgram_listen_on_a_sse_on_b(pair: tuple[Server, Server]) -> None:
    """/v1/listen is a transport over an ordinary session, with a shared store too: Deepgram's
    Results come from worker A, and worker B serves the same session's events over SSE under
    the id A gave as Metadata's request_id."""
    query = "?encoding=linear16&sample_rate=16000&channels=1"
    listen = pair[0].url.replace("http", "ws", 1) + "/v1/listen" + query
    with anyio.fail_after(30):
        async with connect(listen) as ws:
            for i in range(44, len(SPEECH), 8000):
                await ws.send(SPEECH[i : i + 8000])
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = [json.loads(m) async for m in ws]
        results = [m for m in messages if m["type"] == "Results" and m["is_final"]]
        (metadata,) = [m for m in messages if m["type"] == "Metadata"]
        async with httpx.AsyncClient(timeout=30) as client:
            events = await read_all(
                client, f"{pair[1].url}/v1/sessions/{metadata['request_id']}/events"
            )
    assert len(results) == len(finals(events)) == 3
    assert [r["start"] for r in results] == [f["start_time"] for f in finals(events)]
    assert events[-1].data["reason"] == "completed"
