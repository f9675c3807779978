"""``/v1/listen`` frame by frame with the ``websockets`` client against the real server: what
Deepgram's SDK does not show (close codes and reasons, error messages, handshake statuses), the
encodings converted on the way in, containers, and a client that leaves."""

from __future__ import annotations

import json
import socket
import warnings
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import DATA, Server, start_server, stop_server
from tests.sse_client import finals, read_all

pytestmark = pytest.mark.anyio

KEY = "listen-key"
RAW16 = "encoding=linear16&sample_rate=16000"


def speech_pcm() -> bytes:
    with wave.open(str(DATA / "speech.wav")) as w:
        return w.readframes(w.getnframes())


PCM = speech_pcm()


def ws_url(server: Server, query: str = "") -> str:
    return server.url.replace("http", "ws", 1) + "/v1/listen" + (f"?{query}" if query else "")


def pieces(data: bytes, size: int = 3200) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def read_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    try:
        async for raw in ws:
            assert isinstance(raw, str)  # Deepgram's server messages are all text
            messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    return messages


async def stream(
    server: Server, query: str, frames: Sequence[bytes | str], **kwargs: Any
) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Send the frames, then read everything until the server closes."""
    with anyio.fail_after(60):
        async with connect(ws_url(server, query), **kwargs) as ws:
            for frame in frames:
                await ws.send(frame)
            messages = await read_until_closed(ws)
            return messages, ws.close_code, ws.close_reason


CLOSE = json.dumps({"type": "CloseStream"})


def of_type(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == kind]


async def test_a_container_is_sniffed_without_encoding(server: Server) -> None:
    data = (DATA / "speech.webm").read_bytes()
    messages, code, _ = await stream(server, "model=nova-3", [*pieces(data, 1000), CLOSE])
    results = of_type(messages, "Results")
    assert len([r for r in results if r["is_final"]]) == 3
    assert {r["channel"]["alternatives"][0]["transcript"] for r in results} == {""}  # dummy
    assert messages[-1]["type"] == "Metadata" and messages[-1]["channels"] == 1
    assert code == 1000


@pytest.mark.parametrize("encoding", ["mulaw", "alaw", "linear32"])
async def test_encodings_are_converted(server: Server, encoding: str) -> None:
    samples = np.frombuffer(PCM, dtype="<i2")
    if encoding == "linear32":
        data = (samples.astype(np.int32) << 16).astype("<i4").tobytes()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop  # the standard G.711 encoders, to check ours against

            data = (audioop.lin2ulaw if encoding == "mulaw" else audioop.lin2alaw)(PCM, 2)
    query = f"encoding={encoding}&sample_rate=16000"
    messages, code, _ = await stream(server, query, [*pieces(data), CLOSE])
    assert len([r for r in of_type(messages, "Results") if r["is_final"]]) == 3
    assert messages[-1]["duration"] == pytest.approx(len(PCM) / 32000, abs=0.002)
    assert code == 1000


async def test_audio_that_does_not_decode_closes_with_1008_data_0000(server: Server) -> None:
    garbage = np.random.default_rng(1).bytes(20_000)
    messages, code, reason = await stream(server, "", [garbage, CLOSE])
    errors = of_type(messages, "Error")
    assert errors and errors[0]["variant"] in ("unsupported_format", "decode_failed")
    assert errors[0]["description"]
    assert messages[-1]["type"] == "Metadata"
    assert code == 1008 and reason is not None and reason.startswith("DATA-0000")


async def test_a_partial_sample_frame_is_reported_and_dropped(server: Server) -> None:
    query = "encoding=linear16&sample_rate=16000&channels=2&multichannel=true"
    good = PCM[: 16000 * 4]  # whole stereo frames
    messages, code, _ = await stream(server, query, [good, b"\x01\x02\x03", good, CLOSE])
    errors = of_type(messages, "Error")
    assert [e["variant"] for e in errors] == ["partial_sample"]
    assert messages[-1]["type"] == "Metadata"
    assert messages[-1]["duration"] == pytest.approx(2 * len(good) / 4 / 16000, abs=0.002)
    assert code == 1000


async def test_an_unknown_text_message_is_an_error_and_the_stream_goes_on(server: Server) -> None:
    frames = [PCM[:32000], "not json", json.dumps({"type": "Configure"}), PCM[32000:], CLOSE]
    messages, code, _ = await stream(server, RAW16, frames)
    assert [e["variant"] for e in of_type(messages, "Error")] == ["invalid_message"] * 2
    assert len([r for r in of_type(messages, "Results") if r["is_final"]]) == 3
    assert code == 1000


async def test_an_empty_binary_frame_closes_the_stream(server: Server) -> None:
    messages, code, _ = await stream(server, RAW16, [*pieces(PCM), b""])
    assert len([r for r in of_type(messages, "Results") if r["is_final"]]) == 3
    assert messages[-1]["type"] == "Metadata" and code == 1000


async def test_close_stream_without_audio_is_a_normal_close(server: Server) -> None:
    messages, code, _ = await stream(server, RAW16, [CLOSE])
    assert [m["type"] for m in messages] == ["Metadata"]
    assert messages[0]["duration"] == 0.0 and code == 1000


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("encoding=speex&sample_rate=16000", "speex"),
        ("encoding=linear16", "sample_rate"),
        ("encoding=linear16&sample_rate=fast", "sample_rate"),
        ("interim_results=maybe", "interim_results"),
        ("endpointing=-5", "endpointing"),
    ],
)
async def test_parameters_it_cannot_honour_refuse_the_handshake(
    server: Server, query: str, needle: str
) -> None:
    with anyio.fail_after(30), pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(server, query)):
            pass
    response = refused.value.response
    assert response.status_code == 400
    body = json.loads(response.body or b"{}")
    assert needle in body["err_msg"] and body["err_code"]
    assert response.headers["dg-error"]


async def test_parameters_it_has_no_use_for_are_accepted(server: Server) -> None:
    query = (
        f"{RAW16}&model=nova-3&language=en&punctuate=true&diarize=true&keyterm=x&tag=t&no_such=1"
    )
    messages, code, _ = await stream(server, query, [*pieces(PCM), CLOSE])
    assert messages[-1]["type"] == "Metadata" and code == 1000


async def test_a_client_that_leaves_loses_nothing_on_sse(server: Server) -> None:
    with anyio.fail_after(60):
        async with connect(ws_url(server, RAW16)) as ws:
            for piece in pieces(PCM):
                await ws.send(piece)
            # Wait for the first result: it names the session.
            first = json.loads(await ws.recv())
            while first["type"] != "Results":
                first = json.loads(await ws.recv())
        session = first["metadata"]["request_id"]
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            events = await read_all(http, f"/v1/sessions/{session}/events")
    assert len(finals(events)) == 3
    assert events[-1].data["reason"] == "client_disconnected"


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("impatient"), env={"STREAMER_IDLE_TIMEOUT_SECONDS": "1"}
    )
    yield s
    stop_server(s)


async def test_keep_alive_holds_an_idle_stream_until_it_stops(impatient: Server) -> None:
    with anyio.fail_after(30):
        async with connect(ws_url(impatient, RAW16)) as ws:
            await ws.send(PCM[:32000])
            for _ in range(6):  # 1.8 s, longer than the idle timeout
                await anyio.sleep(0.3)
                await ws.send(json.dumps({"type": "KeepAlive"}))
            assert ws.close_code is None  # still open
            t0 = anyio.current_time()
            messages = await read_until_closed(ws)  # then silence: closed after ~1 s
            assert anyio.current_time() - t0 < 10
    assert [e["variant"] for e in of_type(messages, "Error")] == ["idle_timeout"]
    assert messages[-1]["type"] == "Metadata"
    assert ws.close_code == 1011
    assert ws.close_reason is not None and ws.close_reason.startswith("NET-0001")


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("listen-locked"), env={"STREAMER_API_KEY": KEY})
    yield s
    stop_server(s)


@pytest.mark.parametrize(
    "auth",
    [
        {"additional_headers": {"Authorization": f"Token {KEY}"}},
        {"additional_headers": {"Authorization": f"Bearer {KEY}"}},
        {"subprotocols": ["token", KEY]},
    ],
    ids=["token-header", "bearer-header", "token-subprotocol"],
)
async def test_every_way_deepgram_clients_send_the_key(
    locked: Server, auth: dict[str, Any]
) -> None:
    with anyio.fail_after(60):
        async with connect(ws_url(locked, RAW16), **auth) as ws:
            if "subprotocols" in auth:
                assert ws.subprotocol == "token"  # a browser insists on getting it back
            await ws.send(PCM[:32000])
            await ws.send(CLOSE)
            messages = await read_until_closed(ws)
    assert messages[-1]["type"] == "Metadata" and ws.close_code == 1000


@pytest.mark.parametrize(
    "auth",
    [{}, {"additional_headers": {"Authorization": "Token nope"}}, {"subprotocols": ["token", "x"]}],
    ids=["none", "wrong-header", "wrong-subprotocol"],
)
async def test_a_wrong_or_missing_key_is_a_401(locked: Server, auth: dict[str, Any]) -> None:
    with anyio.fail_after(30), pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(locked, RAW16), **auth):
            pass
    assert refused.value.response.status_code == 401


async def test_the_other_websocket_routes_still_refuse_with_403(locked: Server) -> None:
    url = locked.url.replace("http", "ws", 1) + "/v1/ws"
    with anyio.fail_after(30), pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers={"Authorization": "Token nope"}):
            pass
    assert refused.value.response.status_code == 403


async def test_finalize_of_one_channel(server: Server) -> None:
    """The same speech on both channels; Finalize names channel 1 half way through the first
    sentence: only that channel's utterance ends there."""
    mono = np.frombuffer(PCM, dtype="<i2")
    stereo = np.stack([mono, mono], axis=1).astype("<i2").tobytes()
    query = "encoding=linear16&sample_rate=16000&channels=2&multichannel=true"
    with anyio.fail_after(60):
        async with connect(ws_url(server, query)) as ws:
            for piece in pieces(stereo[: 4 * 16000], 6400):  # 1.0 s
                await ws.send(piece)
            await ws.send(json.dumps({"type": "Finalize", "channel": 1}))
            await ws.send(json.dumps({"type": "Finalize", "channel": "one"}))
            # The rest only once the flush is done: audio that reaches the VAD in the same
            # batch as the Finalize moves the cut to that batch's end (docs/deepgram.md), which
            # on a loaded machine made this test cut at 1.088 s.
            messages = []
            while not any(m.get("from_finalize") for m in messages):
                messages.append(json.loads(await ws.recv()))
            for piece in pieces(stereo[4 * 16000 :], 6400):
                await ws.send(piece)
            await ws.send(CLOSE)
            messages += await read_until_closed(ws)
    flushed = [r for r in of_type(messages, "Results") if r["from_finalize"]]
    assert [r["channel_index"] for r in flushed] == [[1, 2]]
    assert 1.0 - 0.033 <= flushed[0]["start"] + flushed[0]["duration"] <= 1.0
    first = {
        tuple(r["channel_index"]): r
        for r in reversed(of_type(messages, "Results"))
        if r["is_final"] and r["start"] < 0.5
    }
    assert first[(0, 2)]["duration"] > 1.3  # channel 0's sentence ran to its end
    assert [e["variant"] for e in of_type(messages, "Error")] == ["invalid_message"]


async def test_shutdown_sends_the_results_and_metadata_then_closes_1001(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"STREAMER_SHUTDOWN_GRACE_SECONDS": "3"})
    try:
        with anyio.fail_after(30):
            async with connect(ws_url(server, RAW16)) as ws:
                for piece in pieces(PCM):
                    await ws.send(piece)
                first = json.loads(await ws.recv())  # SpeechStarted is off: a Results
                session = first["metadata"]["request_id"]
                async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                    # Every byte in before the signal, so every result is owed.
                    while (await http.get(f"/v1/sessions/{session}")).json()["bytes"] < len(PCM):
                        await anyio.sleep(0.02)
                server.process.terminate()
                messages = [first, *await read_until_closed(ws)]
                assert ws.close_code == 1001
    finally:
        stop_server(server)
    assert len([r for r in of_type(messages, "Results") if r["is_final"]]) == 3
    assert messages[-1]["type"] == "Metadata"


# A client that stops reading, as in test_websocket.py: a socket with a 4 KiB receive buffer
# and a library that stops reading once one message waits, so the server's sends really block.

SEND_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def slow_reader_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("listen-slow-reader"),
        env={"STREAMER_SSE_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT)},
    )
    yield s
    stop_server(s)


async def test_a_client_that_stops_reading_is_dropped_and_its_session_ends(
    slow_reader_server: Server,
) -> None:
    server = slow_reader_server
    junk = "x" * 190  # each answered with an Error of ~400 bytes that quotes it
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    n = (wmem_max + 2 * 1024 * 1024) // 400 + 1
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        with anyio.fail_after(60):
            ws = await connect(
                ws_url(server, RAW16),
                sock=sock,
                max_queue=1,
                compression=None,
                ping_interval=None,
                close_timeout=2,
            )
            try:
                for piece in pieces(PCM):
                    await ws.send(piece)
                first = json.loads(await ws.recv())  # a Results: it names the session
                session = first["metadata"]["request_id"]
                for _ in range(n):
                    await ws.send(junk)
                while (await http.get(f"/v1/sessions/{session}")).json()["state"] != "ended":
                    await anyio.sleep(0.05)
                status = (await http.get(f"/v1/sessions/{session}")).json()
                assert status["end_reason"] == "client_disconnected"
                rest = await read_until_closed(ws)  # reading again: what was on its way
                assert ws.close_code == 1008 and ws.close_reason == "not_reading"
            finally:
                ws.transport.abort()
    # Dropped, not only slow: it got what was already on its way, never the Metadata.
    assert 0 < len(rest) < n and {m["type"] for m in rest} <= {"Results", "Error"}
    assert "deepgram client stopped reading" in server.log()
