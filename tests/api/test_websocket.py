"""The WebSocket routes over a real connection (the `websockets` client) against the running
server: the seed's exact protocol, stop/restart cycles, Deepgram-style control messages, every
error path, the results of a client that leaves staying readable on SSE, and clients that stop
reading (over a socket whose receive window really closes)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import DATA, Server, start_server, stop_server
from tests.sse_client import SseEvent, iter_sse, read_all

pytestmark = pytest.mark.anyio

MONO16 = {"channels": 1, "sample_rate": 16000, "bit_depth": 16, "is_float": False}
SEED_TYPES = {"segment", "active", "inactive", "error"}


def speech_pcm() -> bytes:
    """speech.wav's samples: 16 kHz mono s16le, three utterances with pauses."""
    with wave.open(str(DATA / "speech.wav")) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 16000, 2)
        return w.readframes(w.getnframes())


PCM = speech_pcm()
SAMPLES = len(PCM) // 2
HALF = SAMPLES // 2 * 2  # bytes: a whole number of samples


def frames(data: bytes, size: int = 8000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def seed_start(fmt: dict[str, Any] | None = None, interim: bool = False) -> str:
    # Field order and null trace_id exactly as serde serialises the seed's StartMessage.
    return json.dumps(
        {"request": "start", "trace_id": None, "format": fmt or MONO16, "interim_results": interim}
    )


def stop(disconnect: bool) -> str:
    return json.dumps({"request": "stop", "disconnect": disconnect})


def ws_url(server: Server, path: str) -> str:
    return server.url.replace("http", "ws", 1) + path


@asynccontextmanager
async def ws_connect(server: Server, path: str) -> AsyncIterator[ClientConnection]:
    async with connect(ws_url(server, path), open_timeout=10, close_timeout=5) as ws:
        yield ws


async def send_all(ws: ClientConnection, data: bytes, size: int = 8000) -> None:
    for chunk in frames(data, size):
        await ws.send(chunk)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    message = await ws.recv()
    assert isinstance(message, str), "the server sends text frames only"
    data: dict[str, Any] = json.loads(message)
    return data


async def read_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        while True:
            out.append(await recv_json(ws))
    except ConnectionClosed:
        return out


async def read_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Messages up to and including the first of type ``kind``."""
    out: list[dict[str, Any]] = []
    while not out or out[-1]["type"] != kind:
        out.append(await recv_json(ws))
    return out


async def wait_received(client: httpx.AsyncClient, session_id: str, n: int) -> None:
    """Until the server holds ``n`` bytes of the session (it is another process: poll)."""
    while True:
        if (await client.get(f"/v1/sessions/{session_id}")).json()["bytes"] >= n:
            return
        await anyio.sleep(0.02)


def finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "segment" and m["is_final"]]


def split_sessions(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """/v1/ws messages, one list per session: from its `started` to its `end`."""
    sessions: list[list[dict[str, Any]]] = []
    for m in messages:
        if m["type"] == "started":
            sessions.append([])
        if sessions:
            sessions[-1].append(m)
    assert all(s[-1]["type"] == "end" for s in sessions), [m["type"] for m in messages]
    return sessions


def assert_utterances(messages: list[dict[str, Any]], n: int = 3) -> None:
    """n utterances on channel 0, each final after its own active and inactive, counting its
    samples (the dummy model returns the number of samples it was given)."""
    types = [m["type"] for m in messages]
    assert types.count("active") == types.count("inactive") == len(finals(messages)) == n, types
    actives = [i for i, t in enumerate(types) if t == "active"]
    inactives = [i for i, t in enumerate(types) if t == "inactive"]
    segs = [i for i, m in enumerate(messages) if m["type"] == "segment" and m["is_final"]]
    for a, b, s in zip(actives, inactives, segs, strict=True):
        assert a < b < s, types
        seg = messages[s]
        assert seg["channel"] == 0
        assert seg["count"] == round((seg["end_time"] - seg["start_time"]) * 16000)
        assert seg["start_time"] == messages[a]["time"] and seg["end_time"] == messages[b]["time"]


# -- the seed's protocol ------------------------------------------------------------------------


async def test_seed_sequence_on_segmented(server: Server) -> None:
    """What the seed's Rust client does: start, 256-byte PCM frames, stop with disconnect, then
    read until the server closes."""
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(seed_start())
            await send_all(ws, PCM, 256)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    assert {m["type"] for m in messages} <= SEED_TYPES, "the seed's routes send only its events"
    assert_utterances(messages)


async def test_seed_interim_results(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(seed_start(interim=True))
            # Paced at 4x real time so that utterances last long enough for interim ticks.
            for chunk in frames(PCM, 3200):
                await ws.send(chunk)
                await anyio.sleep(0.025)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
    assert {m["type"] for m in messages} <= SEED_TYPES
    interims = [m for m in messages if m["type"] == "segment" and not m["is_final"]]
    assert interims
    assert_utterances([m for m in messages if m not in interims])


async def test_seed_float_pcm_at_48k(server: Server) -> None:
    fmt = {"channels": 1, "sample_rate": 48000, "bit_depth": 32, "is_float": True}
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(seed_start(fmt))
            # A 1.35 s excerpt of speech.wav: its first utterance.
            await send_all(ws, (DATA / "speech_f32le_48k.raw").read_bytes(), 4096)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    assert_utterances(messages, n=1)


async def test_seed_8k_stereo_one_vad_per_channel(server: Server) -> None:
    fmt = {"channels": 2, "sample_rate": 8000, "bit_depth": 16, "is_float": False}
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(seed_start(fmt))
            # Speech on channel 0, silence on channel 1; frames of 1000 sample frames.
            await send_all(ws, (DATA / "speech_s16le_8k_stereo.raw").read_bytes(), 4000)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    assert {m["channel"] for m in messages} == {0}
    assert_utterances(messages)


async def test_seed_simple_counts_every_sample(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/simple") as ws:
            await ws.send(seed_start())
            await send_all(ws, PCM, 256)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    assert {m["type"] for m in messages} == {"segment"}
    assert all(m["is_final"] for m in messages)
    assert sum(m["count"] for m in messages) == SAMPLES
    starts = [m["start_time"] for m in messages]
    assert starts == sorted(starts)


async def test_seed_stop_without_disconnect_then_new_start(server: Server) -> None:
    """A stop without disconnect flushes; the next start begins a new pipeline; each flush
    delivers its finals before anything of the next."""
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            for _ in range(2):
                await ws.send(seed_start())
                await send_all(ws, PCM)
                await ws.send(stop(False))
            # Still open: the first two cycles' results arrive while the connection lives.
            first: list[dict[str, Any]] = []
            while len(finals(first)) < 6:
                first.append(await recv_json(ws))
            await ws.send(stop(True))
            rest = await read_until_closed(ws)
            assert ws.close_code == 1000
    assert rest == []
    assert_utterances(first[: len(first) // 2])
    assert_utterances(first[len(first) // 2 :])


async def test_seed_start_replaced_before_audio_leaves_nothing_behind(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(seed_start({**MONO16, "channels": 2}))
            await ws.send(stop(False))
            await ws.send(seed_start({**MONO16, "channels": 2}))
            await ws.send(seed_start())
            await send_all(ws, PCM)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    assert_utterances(messages)  # no error, one session


async def test_seed_audio_after_stop_without_disconnect_starts_again(server: Server) -> None:
    """As in the seed, after a stop without disconnect the same config goes on with new audio."""
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(seed_start())
            await send_all(ws, PCM)
            await ws.send(stop(False))
            await send_all(ws, PCM)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    sessions = split_sessions(messages)
    assert len(sessions) == 2
    assert sessions[0][0]["session_id"] != sessions[1][0]["session_id"]
    for s in sessions:
        assert_utterances(s)
        assert s[-1]["reason"] == "completed"


async def test_v1_empty_session_is_reported_and_the_connection_goes_on(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await ws.send(stop(False))
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await send_all(ws, PCM)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    empty, full = split_sessions(messages)
    assert [m["type"] for m in empty] == ["started", "error", "end"]
    assert empty[1]["code"] == "empty_audio" and empty[-1]["bytes"] == 0
    assert_utterances(full)


async def test_new_start_mid_stream_flushes(server: Server) -> None:
    half = HALF
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await send_all(ws, PCM[:half])
            await ws.send(json.dumps({"request": "start", "format": MONO16, "mode": "simple"}))
            await send_all(ws, PCM[half:])
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    first, second = split_sessions(messages)
    assert first[0]["config"]["mode"] == "segmented" and second[0]["config"]["mode"] == "simple"
    assert first[-1]["reason"] == "completed"
    assert first[-1]["audio_seconds"] == pytest.approx(half / 2 / 16000, abs=0.001)
    assert sum(m["count"] for m in finals(second)) == (len(PCM) - half) // 2


async def test_stop_with_disconnect_sends_finals_before_close(server: Server) -> None:
    """Results of audio sent right before the stop are not lost (the seed's weak spot)."""
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await ws.send(PCM)  # everything in one frame, then stop at once
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    (session,) = split_sessions(messages)
    assert_utterances(session)
    assert session[-1]["segments"] == 3 and session[-1]["reason"] == "completed"


# -- /v1/ws extensions ---------------------------------------------------------------------------


async def test_v1_session_is_readable_on_sse(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            started = await recv_json(ws)
            assert started["type"] == "started"
            assert started["events_url"].startswith(server.url + "/v1/sessions/")
            await send_all(ws, PCM)
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
        async with httpx.AsyncClient(timeout=30) as client:
            logged = await read_all(client, started["events_url"])
            status = (await client.get(f"{server.url}/v1/sessions/{started['session_id']}")).json()
    # Same events, same JSON, on both transports.
    assert [e.data for e in logged] == messages
    assert status["state"] == "ended" and status["segments"] == 3
    assert_utterances(messages)


async def test_v1_webm_container(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start"}))  # format omitted: sniff
            await send_all(ws, (DATA / "speech.webm").read_bytes(), 1024)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    (session,) = split_sessions(messages)
    assert session[0]["config"]["format"] == "auto"
    assert len(finals(session)) == 3
    assert session[-1]["container"] is not None and session[-1]["reason"] == "completed"


async def test_v1_takes_vad_options(server: Server) -> None:
    # A threshold no speech reaches: nothing is segmented, and the session still ends cleanly.
    config = {"request": "start", "format": MONO16, "vad": {"positive_threshold": 1.0}}
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps(config))
            await send_all(ws, PCM)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
    (session,) = split_sessions(messages)
    assert session[0]["config"]["vad"]["positive_threshold"] == 1.0
    assert finals(session) == [] and session[-1]["reason"] == "completed"


async def test_finalize_flushes_and_next_audio_starts_a_new_session(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await ws.send(PCM)
            await ws.send(stop(True))
            reference = finals(await read_until_closed(ws))
        # Cut in the middle of the second utterance.
        middle = (reference[1]["start_time"] + reference[1]["end_time"]) / 2
        cut = round(middle * 16000) * 2
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await send_all(ws, PCM[:cut])
            await ws.send(json.dumps({"type": "Finalize"}))
            # Flushed: the first session's results and end arrive while the connection lives.
            first = await read_until(ws, "end")
            await send_all(ws, PCM[cut:])
            await ws.send(json.dumps({"type": "CloseStream"}))
            rest = await read_until_closed(ws)
            assert ws.close_code == 1000
    s1, s2 = split_sessions(first + rest)
    assert s1[-1]["reason"] == s2[-1]["reason"] == "completed"
    assert s1[-1]["audio_seconds"] == pytest.approx(cut / 32000, abs=0.001)
    assert s1[-1]["audio_seconds"] + s2[-1]["audio_seconds"] == pytest.approx(
        SAMPLES / 16000, abs=0.002
    )
    assert s1[0]["session_id"] != s2[0]["session_id"]
    # The utterance cut by Finalize is finished in the first session, not lost.
    assert len(finals(s1)) == 2
    assert finals(s1)[-1]["end_time"] == pytest.approx(cut / 32000, abs=0.04)


async def test_attach_to_a_session_created_over_http(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"format": MONO16})).json()
        with anyio.fail_after(60):
            async with connect(created["ws_url"], open_timeout=10) as ws:
                started = await recv_json(ws)
                assert started["session_id"] == created["id"]
                await send_all(ws, PCM)
                await ws.send(json.dumps({"type": "CloseStream"}))
                messages = [started, *await read_until_closed(ws)]
                assert ws.close_code == 1000
            logged = await read_all(client, created["events_url"])
    assert len(finals(messages)) == 3
    assert [e.data for e in logged] == messages[1:]


async def test_delete_from_another_client_ends_the_connection(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(60):
            async with ws_connect(server, "/v1/ws") as ws:
                await ws.send(json.dumps({"request": "start", "format": MONO16}))
                started = await recv_json(ws)
                await send_all(ws, PCM[:HALF])
                r = await client.delete(f"/v1/sessions/{started['session_id']}")
                assert r.status_code == 202
                messages = await read_until_closed(ws)
                assert ws.close_code == 1000 and ws.close_reason == "cancelled"
    assert messages[-1]["type"] == "end" and messages[-1]["reason"] == "cancelled"


# -- a client that leaves ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_client_leaving_mid_stream_keeps_results_in_the_log(server: Server, how: str) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(60):
            async with ws_connect(server, "/v1/ws") as ws:
                await ws.send(json.dumps({"request": "start", "format": MONO16}))
                started = await recv_json(ws)
                await send_all(ws, PCM)
                # Deterministic: leave once the server has every byte, before any stop.
                await wait_received(client, started["session_id"], len(PCM))
                if how == "abort":
                    ws.transport.abort()  # no close frame: a vanished client
                else:
                    await ws.close()
            logged = await read_all(client, started["events_url"])
    assert logged[-1].event == "end"
    end = logged[-1].data
    assert end["reason"] == "client_disconnected"
    assert end["audio_seconds"] == pytest.approx(SAMPLES / 16000, abs=0.001)
    assert_utterances([e.data for e in logged])


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/segmented", "/v1/ws"])
async def test_invalid_json_is_answered_and_the_connection_stays_usable(
    server: Server, path: str
) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, path) as ws:
            await ws.send("{not json")
            error = await recv_json(ws)
            assert error == {
                "type": "error",
                "code": "invalid_json",
                "message": error["message"],
                "channel": None,
            }
            await ws.send(seed_start())
            await send_all(ws, PCM[:HALF])
            # Mid-session, the error goes into the session's own log, in order.
            await ws.send('{"request": "pause"}')
            await send_all(ws, PCM[HALF:])
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["invalid_message"]
    assert len(finals(messages)) == 3


async def test_audio_before_start(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(PCM[:3200])
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == "audio_before_start"
            assert error["channel"] is None
            await ws.send(seed_start())
            await send_all(ws, PCM)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    assert_utterances(messages)


async def test_partial_sample_frame_is_dropped_and_reported(server: Server) -> None:
    stereo = {**MONO16, "channels": 2}
    # Both channels the same speech: 4-byte sample frames.
    samples = [PCM[i : i + 2] for i in range(0, len(PCM), 2)]
    interleaved = b"".join(s + s for s in samples)
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(seed_start(stereo))
            await ws.send(interleaved[:6])  # one and a half sample frames
            await send_all(ws, interleaved)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["partial_sample"]
    assert "6 bytes" in errors[0]["message"]
    # The dropped frame shifted nothing: both channels find the same three utterances.
    for ch in (0, 1):
        assert len([m for m in finals(messages) if m["channel"] == ch]) == 3


@pytest.mark.parametrize("path", ["/api/v1/segmented", "/v1/ws"])
async def test_unsupported_format_closes_1003(server: Server, path: str) -> None:
    with anyio.fail_after(30):
        async with ws_connect(server, path) as ws:
            await ws.send(seed_start({**MONO16, "bit_depth": 24}))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1003
            assert ws.close_reason == "unsupported_format"
    assert [m["code"] for m in messages] == ["unsupported_format"]
    assert "24" in messages[0]["message"]


async def test_bad_config_is_answered_and_a_corrected_start_works(server: Server) -> None:
    with anyio.fail_after(60):
        async with ws_connect(server, "/api/v1/segmented") as ws:
            await ws.send(json.dumps({"request": "start", "interim_results": False}))
            assert (await recv_json(ws))["code"] == "invalid_config"  # format missing
            await ws.send(json.dumps({"request": "start", "format": MONO16, "vad": {}}))
            assert (await recv_json(ws))["code"] == "unknown_field"
            await ws.send(seed_start())
            await send_all(ws, PCM)
            await ws.send(stop(True))
            messages = await read_until_closed(ws)
    assert_utterances(messages)


async def test_garbage_container_bytes_close_with_an_error(server: Server) -> None:
    garbage = bytes(range(256)) * 64
    with anyio.fail_after(60):
        async with ws_connect(server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start"}))
            # The server may close as soon as it knows the bytes are not audio, mid-send.
            with contextlib.suppress(ConnectionClosed):
                await send_all(ws, garbage, 4096)
                await ws.send(stop(True))
            messages = await read_until_closed(ws)
            assert ws.close_code in (1003, 1007)
    (session,) = split_sessions(messages)
    errors = [m for m in session if m["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["code"] in ("decode_failed", "unsupported_format", "no_audio_stream")
    assert ws.close_reason == errors[0]["code"]
    assert session[-1]["reason"] == "error"


async def test_unknown_session_id(server: Server) -> None:
    with anyio.fail_after(30):
        async with ws_connect(server, "/v1/ws?session=" + "x" * 22) as ws:
            messages = await read_until_closed(ws)
            assert ws.close_code == 1008
    assert [m["code"] for m in messages] == ["session_not_found"]


# -- limits: a server with a 1 s idle timeout and room for one session ----------------------------


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("tight"),
        env={"STREAMER_IDLE_TIMEOUT_SECONDS": "1", "STREAMER_MAX_SESSIONS": "1"},
    )
    yield s
    stop_server(s)


async def test_idle_timeout_keeps_results_and_closes_1008(tight_server: Server) -> None:
    with anyio.fail_after(30):
        async with ws_connect(tight_server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await send_all(ws, PCM)
            messages = await read_until_closed(ws)  # then nothing: idle
            assert ws.close_code == 1008 and ws.close_reason == "idle_timeout"
    (session,) = split_sessions(messages)
    assert [m["code"] for m in session if m["type"] == "error"] == ["idle_timeout"]
    assert session[-1]["reason"] == "idle_timeout"
    assert_utterances(session)


async def test_idle_timeout_without_a_session(tight_server: Server) -> None:
    with anyio.fail_after(30):
        async with ws_connect(tight_server, "/api/v1/segmented") as ws:
            messages = await read_until_closed(ws)
            assert ws.close_code == 1008
    assert [m["code"] for m in messages] == ["idle_timeout"]


async def test_keepalive_holds_an_idle_connection(tight_server: Server) -> None:
    with anyio.fail_after(30):
        async with ws_connect(tight_server, "/v1/ws") as ws:
            await ws.send(json.dumps({"request": "start", "format": MONO16}))
            await send_all(ws, PCM[:HALF])
            for _ in range(8):  # 2.4 s of silence from the client, idle timeout 1 s
                await anyio.sleep(0.3)
                await ws.send(json.dumps({"type": "KeepAlive"}))
            await send_all(ws, PCM[HALF:])
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await read_until_closed(ws)
            assert ws.close_code == 1000
    (session,) = split_sessions(messages)
    assert not [m for m in session if m["type"] == "error"]
    assert_utterances(session)


async def test_at_capacity_closes_1013(tight_server: Server) -> None:
    with anyio.fail_after(30):
        async with ws_connect(tight_server, "/v1/ws") as first:
            await first.send(json.dumps({"request": "start", "format": MONO16}))
            assert (await recv_json(first))["type"] == "started"
            async with ws_connect(tight_server, "/api/v1/segmented") as second:
                await second.send(seed_start())
                await second.send(PCM[:3200])  # the seed's routes open a session with audio
                messages = await read_until_closed(second)
                assert second.close_code == 1013
            assert [m["code"] for m in messages] == ["too_many_sessions"]
            await first.send(json.dumps({"type": "CloseStream"}))
            await read_until_closed(first)
            assert first.close_code == 1000


async def test_shutdown_closes_1001_after_the_results(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"STREAMER_SHUTDOWN_GRACE_SECONDS": "3"})
    try:
        with anyio.fail_after(30):
            async with ws_connect(server, "/v1/ws") as ws:
                await ws.send(json.dumps({"request": "start", "format": MONO16}))
                started = await recv_json(ws)
                await send_all(ws, PCM)
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                    # Every byte in before the signal, so every result is owed.
                    await wait_received(client, started["session_id"], len(PCM))
                messages = [started, *await read_until(ws, "segment")]
                server.process.terminate()
                messages += await read_until_closed(ws)
                assert ws.close_code == 1001
    finally:
        stop_server(server)
    (session,) = split_sessions(messages)
    assert session[-1]["reason"] == "shutdown"
    assert_utterances(session)


# -- a client that stops reading ---------------------------------------------------------------
#
# A real slow reader: a `websockets` client on a socket with a 4 KiB receive buffer (set before
# connecting, so the advertised window stays that small), whose library stops reading the socket
# once one message waits (max_queue=1). When the test stops calling recv(), the TCP window closes
# and the server's writes block for real. To get there the server must owe more than the kernel
# buffers on its side (its send buffer autotunes up to tcp_wmem's maximum): every ECHO message is
# answered with an `invalid_message` error that quotes its 60 kB value.

SEND_TIMEOUT = 2.0  # STREAMER_SSE_SEND_TIMEOUT_SECONDS of slow_reader_server
ECHO = json.dumps({"request": "x" * 60_000})
SILENCE = bytes(32000)  # 1 s: speech.wav's last utterance ends inside the audio, not at a flush
DROPPED = "websocket client stopped reading; dropping the connection"
NOT_READING = "websocket client does not read its messages; closing"


def flood_count() -> int:
    """ECHO messages whose answers are more than the kernel can hold for a stalled reader."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 1024 * 1024
    return (wmem_max + 2 * 1024 * 1024) // 60_000 + 1


@asynccontextmanager
async def stalled_client(server: Server, path: str = "/v1/ws") -> AsyncIterator[ClientConnection]:
    """A client that reads only when the test calls recv(). No compression: deflated, the 60 kB
    answers are a hundred bytes and nothing would block. No pings: hypercorn's pong would wait
    behind the stuck send, and its reading of the socket with it. It leaves by aborting: no
    closing handshake with a server that may be stuck writing to it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    ws = await connect(
        ws_url(server, path),
        sock=sock,
        max_queue=1,
        compression=None,
        ping_interval=None,
        open_timeout=10,
        close_timeout=2,
    )
    try:
        yield ws
    finally:
        ws.transport.abort()
        with anyio.move_on_after(2):
            await ws.wait_closed()


@pytest.fixture(scope="module")
def slow_reader_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("slow-reader"),
        env={"STREAMER_SSE_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT)},
    )
    yield s
    stop_server(s)


async def session_status(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    data: dict[str, Any] = (await client.get(f"/v1/sessions/{session_id}")).json()
    return data


async def wait_status(
    client: httpx.AsyncClient, session_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the session's status (the server is another process) until ``done``."""
    while True:
        status = await session_status(client, session_id)
        if done(status):
            return status
        await anyio.sleep(0.02)


async def stall(ws: ClientConnection, client: httpx.AsyncClient, session_id: str) -> int:
    """Make the server owe more than can be buffered; return once it has taken every message, so
    that its send to this client (which reads nothing) is blocked."""
    n = flood_count()
    for _ in range(n):
        await ws.send(ECHO)
    await wait_status(client, session_id, lambda s: s["errors"] >= n)
    return n


async def start_stalled(ws: ClientConnection) -> dict[str, Any]:
    """Start a session; its `started` frame is the last message the client reads."""
    await ws.send(json.dumps({"request": "start", "format": MONO16}))
    started = await recv_json(ws)
    assert started["type"] == "started"
    return started


async def test_stalled_reader_is_dropped_after_the_send_timeout_while_others_go_on(
    slow_reader_server: Server,
) -> None:
    """A client that stops reading while the server owes it megabytes: the server's send blocks,
    and after STREAMER_SSE_SEND_TIMEOUT_SECONDS (not before) the connection is dropped and its
    session ends (`client_disconnected`). Meanwhile another session on another connection runs
    start to finish normally."""
    server = slow_reader_server
    drops = server.log().count(DROPPED)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        with anyio.fail_after(20):
            async with stalled_client(server) as slow:
                started = await start_stalled(slow)
                stopped_reading = time.time()
                session_id = started["session_id"]
                n = await stall(slow, client, session_id)
                flooded = time.time()

                assert (await client.get("/healthz")).status_code == 200
                async with ws_connect(server, "/v1/ws") as other:
                    await other.send(json.dumps({"request": "start", "format": MONO16}))
                    await send_all(other, PCM)
                    await other.send(json.dumps({"type": "CloseStream"}))
                    messages = await read_until_closed(other)
                    assert other.close_code == 1000
                status = await session_status(client, session_id)
                assert status["state"] == "running", "the stuck connection went before its timeout"
                assert server.log().count(DROPPED) == drops

                ended = await wait_status(client, session_id, lambda s: s["state"] == "ended")
                assert server.log().count(DROPPED) == drops + 1
                # Dropped, not only slow: reading again, the client gets what was already on its
                # way, never its session's `end` (logged after the drop), then the close.
                rest = await read_until_closed(slow)
                assert slow.close_code == 1008 and slow.close_reason == "not_reading"
    (other_session,) = split_sessions(messages)
    assert other_session[-1]["reason"] == "completed"
    assert_utterances(other_session)

    assert ended["end_reason"] == "client_disconnected"
    assert ended["ended_at"] - stopped_reading >= SEND_TIMEOUT
    assert ended["ended_at"] - flooded < SEND_TIMEOUT + 2
    assert 0 < len(rest) < n
    assert {(m["type"], m["code"]) for m in rest} == {("error", "invalid_message")}


async def test_audio_received_before_the_drop_is_processed_and_on_sse(
    slow_reader_server: Server,
) -> None:
    """What a dropped reader is guaranteed: every byte the server received is decoded, segmented
    and sent to the model; the results, then `end {reason: "client_disconnected"}`, are in the
    session's log, readable on SSE by the id its `started` frame gave."""
    server = slow_reader_server
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        with anyio.fail_after(20):
            async with stalled_client(server) as slow:
                started = await start_stalled(slow)
                await send_all(slow, PCM)
                await wait_received(client, started["session_id"], len(PCM))
                n = await stall(slow, client, started["session_id"])
                await wait_status(client, started["session_id"], lambda s: s["state"] == "ended")
            logged = await read_all(client, started["events_url"])
    assert [e.id for e in logged] == list(range(1, len(logged) + 1))
    assert logged[-1].event == "end"
    end = logged[-1].data
    assert end["reason"] == "client_disconnected"
    assert end["bytes"] == len(PCM)
    assert end["audio_seconds"] == pytest.approx(SAMPLES / 16000, abs=0.001)
    assert end["segments"] == 3
    events = [e.data for e in logged]
    assert_utterances([m for m in events if m["type"] != "error"])
    errors = [m for m in events if m["type"] == "error"]
    assert len(errors) == n and {e["code"] for e in errors} == {"invalid_message"}


async def test_stalled_reader_never_stalls_receiving(slow_reader_server: Server) -> None:
    """With the server's send to the client blocked (it owes megabytes to a client that reads
    nothing), audio the client sends still goes into the pipeline: every byte is taken and every
    utterance is segmented and sent to the model before the send timeout drops the connection."""
    server = slow_reader_server
    audio = PCM + SILENCE
    drops = server.log().count(DROPPED)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        with anyio.fail_after(20):
            async with stalled_client(server) as slow:
                started = await start_stalled(slow)
                session_id = started["session_id"]
                await stall(slow, client, session_id)
                await send_all(slow, audio)
                while_stuck = await wait_status(client, session_id, lambda s: s["segments"] == 3)
                # Still the same stuck connection: the results did not wait for the drop.
                assert server.log().count(DROPPED) == drops
                assert while_stuck["state"] == "running" and while_stuck["bytes"] == len(audio)
                # The results are in the log, behind the megabytes the client has not read.
                seen: list[SseEvent] = []
                async with client.stream("GET", started["events_url"]) as response:
                    async for event in iter_sse(response):
                        seen.append(event)
                        if len(finals([e.data for e in seen])) == 3:
                            break
                assert server.log().count(DROPPED) == drops
                ended = await wait_status(client, session_id, lambda s: s["state"] == "ended")
            logged = await read_all(client, started["events_url"])
    assert server.log().count(DROPPED) == drops + 1
    assert ended["end_reason"] == "client_disconnected"
    end = logged[-1].data
    assert end["type"] == "end" and end["bytes"] == len(audio)
    assert end["audio_seconds"] == pytest.approx(len(audio) / 32000, abs=0.001)
    results = [e.data for e in logged if e.event != "error"]
    assert_utterances(results)
    assert [e.data for e in seen if e.event != "error"] == results[:-1]  # all but `end`


async def test_flood_behind_a_stalled_send_closes_1008_not_reading(
    slow_reader_server: Server,
) -> None:
    """Over 256 messages queued for a client whose send is stuck (answers of its own flood, with
    no session running): the server stops taking its input and, once the client reads again
    (before the send timeout), delivers what it had queued and closes with 1008 `not_reading`."""
    server = slow_reader_server
    flagged = server.log().count(NOT_READING)
    n, small = flood_count(), 300
    with anyio.fail_after(20):
        async with stalled_client(server) as slow:
            for _ in range(n):
                await slow.send(ECHO)  # the server's send gets stuck behind these answers
            for _ in range(small):
                await slow.send("{")  # each answered with a small `invalid_json` frame
            while server.log().count(NOT_READING) == flagged:
                await anyio.sleep(0.02)
            messages = await read_until_closed(slow)
            assert slow.close_code == 1008 and slow.close_reason == "not_reading"
    assert {m["type"] for m in messages} == {"error"}
    assert all(m["channel"] is None for m in messages)
    codes = [m["code"] for m in messages]
    big = codes.count("invalid_message")
    answered = codes.count("invalid_json")
    assert codes == ["invalid_message"] * big + ["invalid_json"] * answered
    # Everything queued before the bound was delivered; the flood past it was not answered.
    assert big == n and 0 < answered < small


def sessions_created(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("streamer_sessions_created_total "):
            return float(line.split()[1])
    raise AssertionError("no streamer_sessions_created_total in /metrics")


async def test_regression_drop_while_the_pipeline_is_behind_loses_no_audio(
    tmp_path: Path,
) -> None:
    """Regression, three things broke when the send timeout dropped a client that was still
    sending audio faster than the pipeline took it:
    - the sender ended the session's input under the receiver's pending write: that chunk was
      counted as received (`bytes`) but never decoded;
    - audio frames already queued in the server were taken, before the cancellation arrived, as
      the start of a new session the client was never told about;
    - the handler returned with client messages still coming: hypercorn's reader of the socket
      then waited forever to hand over the next one, so the connection outlived the client and
      held the server's shutdown for its whole grace period (10 s)."""
    server = start_server(
        tmp_path,
        env={
            "STREAMER_SSE_SEND_TIMEOUT_SECONDS": "1",
            # Audio sent at full speed over loopback outruns decoding and the VAD (the model no
            # longer holds the pipeline back: it queues), so the receiver soon waits in writes.
            "STREAMER_MODEL_OPTIONS": '{"delay": 0.1, "constant_factor": 0.0, "jitter": 0.0}',
        },
    )
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            before = sessions_created((await client.get("/metrics")).text)
            with anyio.fail_after(30):
                async with stalled_client(server) as slow:
                    started = await start_stalled(slow)
                    session_id = started["session_id"]
                    await stall(slow, client, session_id)
                    # Audio as fast as the client can send: the receiver waits in its writes, and
                    # the client in its own sends, when the send timeout drops the connection.
                    async with anyio.create_task_group() as tg:

                        async def stream() -> None:
                            while True:
                                await send_all(slow, PCM, 16000)

                        tg.start_soon(stream)
                        while DROPPED not in server.log():
                            await anyio.sleep(0.02)
                        tg.cancel_scope.cancel()
                    ended = await wait_status(client, session_id, lambda s: s["state"] == "ended")
            after = sessions_created((await client.get("/metrics")).text)
    finally:
        stopping = time.monotonic()
        stop_server(server)
        stopped_in = time.monotonic() - stopping
    assert DROPPED in server.log()
    assert ended["end_reason"] == "client_disconnected"
    assert ended["bytes"] > len(PCM)
    # Every byte counted as received was decoded (s16le mono: 32000 bytes a second).
    assert ended["audio_seconds"] == pytest.approx(ended["bytes"] / 32000, abs=0.001)
    assert after - before == 1, "a session was opened after the drop"
    assert stopped_in < 5, "the dropped client's connection held the shutdown"
