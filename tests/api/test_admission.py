"""Shedding load on a real server: while its event loop is busier than
``STREAMER_ADMIT_MAX_LOOP_BUSY``, new sessions are turned away (HTTP 503 and WebSocket 1013,
code ``server_overloaded``) and the session already running is untouched."""

from __future__ import annotations

import json
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.api.test_bad_input import assert_clean_error
from tests.api.test_websocket import MONO16, read_until_closed, ws_connect
from tests.conftest import DATA, Server, start_server, stop_server
from tests.sse_client import read_all

pytestmark = pytest.mark.anyio

# Far below what a fast upload makes of the loop (~0.5 on a 2-core machine), far above idle.
LIMIT = 0.2


@pytest.fixture
def shedding(tmp_path: Path) -> Iterator[Server]:
    # Pacing off: this is the hard gate, which refuses at once.
    s = start_server(
        tmp_path,
        env={"STREAMER_ADMIT_MAX_LOOP_BUSY": str(LIMIT), "STREAMER_ADMIT_PACE_LOOP_BUSY": "0"},
    )
    yield s
    stop_server(s)


def _pcm() -> bytes:
    with wave.open(str(DATA / "speech.wav")) as w:
        return w.readframes(w.getnframes())


async def _busy(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    (line,) = [x for x in text.splitlines() if x.startswith("streamer_event_loop_busy_ratio ")]
    return float(line.split()[1])


async def test_a_busy_server_turns_new_sessions_away_and_keeps_the_one_it_runs(
    shedding: Server,
) -> None:
    pcm = _pcm()
    shed = anyio.Event()
    sent = 0

    async def audio() -> AsyncIterator[bytes]:
        # As fast as the server takes it, until a new session has been turned away, in 100 ms
        # pieces: the server's loop then does the most work per second of audio.
        nonlocal sent
        while not shed.is_set():
            for i in range(0, len(pcm), 3200):
                yield pcm[i : i + 3200]
                sent += len(pcm[i : i + 3200])

    async with httpx.AsyncClient(base_url=shedding.url, timeout=30) as client:
        with anyio.fail_after(60):
            while (r := await client.post("/v1/sessions")).status_code != 201:
                await anyio.sleep(0.1)  # an idle server admits
            running = r.json()
            url = running["audio_url"] + "?encoding=s16le&sample_rate=16000&channels=1"
            upload: list[httpx.Response] = []

            async def send() -> None:
                upload.append(await client.post(url, content=audio()))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                while (refused := await client.post("/v1/sessions")).status_code == 201:
                    await anyio.sleep(0.05)
                assert_clean_error(refused, 503, "server_overloaded")
                assert int(refused.headers["retry-after"]) > 0
                assert await _busy(client) > LIMIT
                # The WebSocket's start is refused the same way, with "try again later".
                async with ws_connect(shedding, "/v1/ws") as ws:
                    await ws.send(json.dumps({"request": "start", "format": MONO16}))
                    messages = await read_until_closed(ws)
                    assert ws.close_code == 1013, messages
                assert [m["code"] for m in messages] == ["server_overloaded"]
                shed.set()

            # The running session took everything sent and kept its results.
            (response,) = upload
            assert response.status_code == 200, response.text
            summary = response.json()
            assert summary["end_reason"] == "completed"
            assert summary["bytes"] == sent
            events = await read_all(client, running["events_url"])
            finals = [e for e in events if e.event == "segment" and e.data["is_final"]]
            assert len(finals) >= sent // len(pcm)  # speech.wav has at least one utterance
            assert events[-1].event == "end"
            assert not [e.data for e in events if e.event == "error"]

            # Once the load has gone, sessions are admitted again.
            refusals = 1  # HTTP ones: a WebSocket's refusal before any session is not counted
            while (await client.post("/v1/sessions")).status_code != 201:
                refusals += 1
                await anyio.sleep(0.1)
            metrics = (await client.get("/metrics")).text
    assert f'streamer_errors_total{{code="server_overloaded"}} {refusals:.1f}' in metrics


async def test_a_busy_loop_makes_new_sessions_wait_their_turn_then_refuses(
    tmp_path: Path,
) -> None:
    """Pacing: while a fast upload keeps the loop over the mark, a new session's POST waits
    instead of being refused: refused (503) only after STREAMER_ADMIT_WAIT_SECONDS, and
    admitted, late, when the load goes within that time."""
    server = start_server(
        tmp_path,
        env={"STREAMER_ADMIT_PACE_LOOP_BUSY": str(LIMIT), "STREAMER_ADMIT_WAIT_SECONDS": "1.5"},
    )
    pcm = _pcm()
    stop = anyio.Event()

    async def audio() -> AsyncIterator[bytes]:
        while not stop.is_set():
            for i in range(0, len(pcm), 3200):
                yield pcm[i : i + 3200]

    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            with anyio.fail_after(60):
                running = (await client.post("/v1/sessions")).json()
                url = running["audio_url"] + "?encoding=s16le&sample_rate=16000&channels=1"

                async def upload() -> None:
                    await client.post(url, content=audio())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(upload)
                    while await _busy(client) <= LIMIT + 0.1:
                        await anyio.sleep(0.1)
                    t0 = anyio.current_time()
                    refused = await client.post("/v1/sessions")
                    waited = anyio.current_time() - t0
                    assert_clean_error(refused, 503, "server_overloaded")
                    assert "waited" in refused.json()["error"]["message"]
                    assert 1.4 <= waited < 10, waited

                    # One that arrives now, while the load goes within its wait: admitted.
                    async def end_load_soon() -> None:
                        await anyio.sleep(0.3)
                        stop.set()

                    tg.start_soon(end_load_soon)
                    t0 = anyio.current_time()
                    admitted = await client.post("/v1/sessions")
                    assert admitted.status_code == 201, admitted.text
                    assert anyio.current_time() - t0 >= 0.25  # it waited its turn
                metrics = (await client.get("/metrics")).text
        assert 'streamer_sessions_refused_total{cause="event_loop"} 1.0' in metrics
    finally:
        stop_server(server)
