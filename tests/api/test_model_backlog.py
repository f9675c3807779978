"""A real server whose model is blocked: the audio path goes on (``active``/``inactive`` at the
pace of the upload), the session is told it is late (``lagging``), new sessions are refused
for model capacity (HTTP 503 and WebSocket 1013, ``server_overloaded``) and admitted again once
the model catches up, an utterance the full queue cannot hold becomes a ``model_overloaded``
error with its times, and every other utterance of the admitted session gets its final."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from tests.api.test_bad_input import assert_clean_error
from tests.api.test_websocket import MONO16, read_until_closed, speech_pcm, ws_connect
from tests.conftest import Server, start_server, stop_server
from tests.sse_client import SseEvent, iter_sse, read_all

pytestmark = pytest.mark.anyio


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    return tmp_path / "gate-open"


@pytest.fixture
def blocked(tmp_path: Path, gate: Path) -> Iterator[Server]:
    s = start_server(
        tmp_path,
        env={
            "STREAMER_MODEL": "tests.model.gated:create",
            "STREAMER_MODEL_OPTIONS": json.dumps({"gate": str(gate), "max_batch_size": 1}),
            "STREAMER_MODEL_THREADS": "1",
            "STREAMER_ADMIT_MAX_MODEL_WAIT_MS": "300",
            "STREAMER_MODEL_LATE_MS": "300",
            # Room for one of speech.wav's utterances waiting (each is 1.3-2.3 s), not two.
            "STREAMER_MODEL_QUEUE_MAX_SECONDS": "3",
            # The start-up probe would wait for the gate; the load gate has its own test.
            "STREAMER_MODEL_PROBE": "false",
        },
    )
    yield s
    stop_server(s)


async def test_a_blocked_model_never_stalls_the_audio_path_and_sheds_new_sessions(
    blocked: Server, gate: Path
) -> None:
    pcm = speech_pcm()
    events: list[SseEvent] = []
    async with httpx.AsyncClient(base_url=blocked.url, timeout=30) as client:
        with anyio.fail_after(60):
            created = (await client.post("/v1/sessions", json={"format": MONO16})).json()
            upload: list[httpx.Response] = []

            async def follow() -> None:
                async with client.stream("GET", created["events_url"]) as r:
                    async for e in iter_sse(r):
                        events.append(e)

            async def send() -> None:
                # speech.wav four times over: 12 utterances, as fast as the server takes it.
                upload.append(await client.put(created["audio_url"], content=pcm * 4))

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                tg.start_soon(send)
                # The whole upload is segmented while no model call has returned.
                while sum(e.event == "inactive" for e in events) < 12:
                    await anyio.sleep(0.05)
                assert not [e for e in events if e.event == "segment"]
                while not any(e.event == "lagging" for e in events):
                    await anyio.sleep(0.05)

                refused = await client.post("/v1/sessions")
                assert_clean_error(refused, 503, "server_overloaded")
                assert "model" in refused.json()["error"]["message"]
                assert int(refused.headers["retry-after"]) > 0
                ready = (await client.get("/readyz")).json()
                assert ready["model"]["wait_seconds"] > 0.3
                assert ready["model"]["queued_finals"] >= 1
                async with ws_connect(blocked, "/v1/ws") as ws:
                    await ws.send(json.dumps({"request": "start", "format": MONO16}))
                    messages = await read_until_closed(ws)
                    assert ws.close_code == 1013, messages
                assert [m["code"] for m in messages] == ["server_overloaded"]

                gate.touch()  # the model runs again
            (response,) = upload
            assert response.status_code == 200, response.text

            # Admitted again once the model has caught up.
            while (r := await client.post("/v1/sessions")).status_code != 201:
                assert_clean_error(r, 503, "server_overloaded")
                await anyio.sleep(0.2)
            metrics = (await client.get("/metrics")).text

    assert events[-1].event == "end"
    inactive = [e.data for e in events if e.event == "inactive"]
    finals = [e.data for e in events if e.event == "segment" and e.data["is_final"]]
    overloaded = [e.data for e in events if e.event == "error"]
    assert overloaded, "the 3 s queue cannot hold 11 utterances"
    assert {e["code"] for e in overloaded} == {"model_overloaded"}
    # Every utterance is accounted for exactly once, a final or an error with its times.
    outcomes = sorted([(e["start_time"], e["end_time"]) for e in finals + overloaded])
    assert len(outcomes) == len(inactive) == 12
    assert [end for _, end in outcomes] == [e["time"] for e in inactive]
    lagging = [e.data["seconds"] for e in events if e.event == "lagging"]
    assert lagging[0] >= 0.3 and lagging[-1] == 0  # rounded to 0.1 s
    assert 'streamer_sessions_refused_total{cause="model"}' in metrics
    refused_line = next(
        x
        for x in metrics.splitlines()
        if x.startswith('streamer_sessions_refused_total{cause="model"}')
    )
    assert float(refused_line.split()[-1]) >= 1
    dropped = next(
        x
        for x in metrics.splitlines()
        if x.startswith('streamer_model_dropped_calls_total{reason="overloaded"}')
    )
    assert float(dropped.split()[-1]) == len(overloaded)


async def test_a_slow_model_refuses_sessions_it_could_not_serve_before_any_backlog(
    tmp_path: Path,
) -> None:
    """The load gate: one thread, one utterance per call, ~0.35 s each (probed at start):
    ~2.9 utterances a second, so at the assumed 0.4 per session and 75% the model serves 5
    sessions. The 6th is refused before any audio has arrived (a steep ramp would otherwise
    be admitted whole before the first utterance queues), and admitted once one ends."""
    model = {"delay": 0.2, "constant_factor": 0.1, "jitter": 0.0, "max_batch_size": 1}
    server = start_server(
        tmp_path,
        env={"STREAMER_MODEL_OPTIONS": json.dumps(model), "STREAMER_MODEL_THREADS": "1"},
    )
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            with anyio.fail_after(30):
                ids = []
                while (r := await client.post("/v1/sessions")).status_code == 201:
                    ids.append(r.json()["id"])
                    assert len(ids) < 50, "the load gate never refused"
                assert_clean_error(r, 503, "server_overloaded")
                assert "capacity" in r.json()["error"]["message"]
                assert len(ids) == 5
                await client.delete(f"/v1/sessions/{ids[0]}")
                while (await client.get("/readyz")).json()["sessions"] >= 5:
                    await anyio.sleep(0.05)
                assert (await client.post("/v1/sessions")).status_code == 201
                metrics = (await client.get("/metrics")).text
        line = next(
            x
            for x in metrics.splitlines()
            if x.startswith('streamer_sessions_refused_total{cause="model"}')
        )
        assert float(line.split()[-1]) == 1
    finally:
        stop_server(server)


async def _finals_of_concurrent_uploads(server: Server, n: int) -> list[list[dict[str, Any]]]:
    """``n`` sessions uploading speech.wav at once; each session's final segments."""
    pcm = speech_pcm()
    out: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def one(i: int) -> None:
            created = (await client.post("/v1/sessions", json={"format": MONO16})).json()
            # A different gain per session: every session's audio, so its checksums, differ.
            samples = np.frombuffer(pcm, np.int16).astype(np.float32) * (0.5 + 0.1 * i)
            body = np.clip(samples, -32768, 32767).astype(np.int16).tobytes()
            r = await client.put(created["audio_url"], content=body)
            assert r.status_code == 200, r.text
            events = await read_all(client, created["events_url"])
            out[i] = [e.data for e in events if e.event == "segment" and e.data["is_final"]]

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
    return out


async def test_batched_results_equal_unbatched_on_a_real_server(tmp_path: Path) -> None:
    env = {
        "STREAMER_MODEL": "tests.model.checksum:create",
        "STREAMER_MODEL_OPTIONS": json.dumps({"delay": 0.1}),
        "STREAMER_MODEL_THREADS": "1",
        "STREAMER_MODEL_BATCH_WAIT_MS": "20",
    }
    results = {}
    for name, batch_max in (("batched", "64"), ("unbatched", "1")):
        (tmp_path / name).mkdir()
        server = start_server(tmp_path / name, env={**env, "STREAMER_MODEL_BATCH_MAX": batch_max})
        try:
            results[name] = await _finals_of_concurrent_uploads(server, 6)
        finally:
            stop_server(server)

    def without_batch(finals: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return [[{k: v for k, v in f.items() if k != "batch"} for f in s] for s in finals]

    assert without_batch(results["batched"]) == without_batch(results["unbatched"])
    assert all(len(s) == 3 for s in results["batched"])  # speech.wav: three utterances each
    assert len({f["checksum"] for s in results["batched"] for f in s}) == 18
    assert max(f["batch"] for s in results["batched"] for f in s) > 1
    assert {f["batch"] for s in results["unbatched"] for f in s} == {1}
