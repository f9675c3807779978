"""Bad input over real HTTP: each case gets the right status and a stable error code, no
traceback, and never disturbs a good session running at the same time."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import DATA, Server, start_server, stop_server
from tests.sse_client import finals, read_all

pytestmark = pytest.mark.anyio

WAV = (DATA / "speech.wav").read_bytes()


def wav_header(channels: int = 1, rate: int = 16000, bits: int = 16, tag: int = 1) -> bytes:
    fmt = struct.pack(
        "<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits
    )
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt


def corrupt_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + os.urandom(4096) + data[mid + 4096 :]


# (name, body, query, expected status, expected code or None for success)
UPLOAD_CASES: list[tuple[str, bytes, str, int, str | None]] = [
    ("random-bytes", os.urandom(50_000), "", 415, "unsupported_format"),
    ("text", b"hello, this is definitely not audio\n" * 100, "", 415, "unsupported_format"),
    ("json", json.dumps({"audio": "base64..."}).encode() * 50, "", 415, "unsupported_format"),
    ("zero-bytes", b"", "", 400, "empty_audio"),
    ("video-only", (DATA / "video_only.mp4").read_bytes(), "", 415, "no_audio_stream"),
    # FFmpeg opens the WAV but has no decoder for codec tag 0x1234: no audio stream it can use.
    (
        "wav-unknown-codec",
        wav_header(tag=0x1234) + b"data" + b"\xff" * 4 + os.urandom(8000),
        "",
        415,
        "no_audio_stream",
    ),
    (
        "wav-zero-channels",
        wav_header(channels=0) + b"data\0\0\0\0" + b"\0" * 100,
        "",
        422,
        "decode_failed",
    ),
    ("raw-partial-sample", WAV[44 : 44 + 32001], "?encoding=s16le", 422, "partial_sample"),
    ("raw-f32-partial-sample", b"\0" * 4003, "?encoding=f32le", 422, "partial_sample"),
    ("absurd-sample-rate", WAV, "?encoding=s16le&sample_rate=1", 422, "invalid_config"),
    ("huge-sample-rate", WAV, "?encoding=s16le&sample_rate=99999999", 422, "invalid_config"),
    ("absurd-channels", WAV, "?encoding=s16le&channels=5000", 422, "invalid_config"),
    ("zero-channels", WAV, "?encoding=s16le&channels=0", 422, "invalid_config"),
    ("channels-not-a-number", WAV, "?encoding=s16le&channels=two", 422, "invalid_config"),
    ("unknown-encoding", WAV, "?encoding=mulaw", 415, "unsupported_format"),
    ("rate-without-encoding", WAV, "?sample_rate=8000", 422, "invalid_config"),
    ("truncated-mp3", (DATA / "speech.mp3").read_bytes()[:9000], "", 200, None),
    ("truncated-wav-header", WAV[:30], "", 422, "decode_failed"),
    ("wav-header-only", WAV[:44], "", 200, None),
    ("truncated-webm", (DATA / "speech.webm").read_bytes()[:6000], "", 200, None),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def upload(client: httpx.AsyncClient, body: bytes, query: str = "") -> httpx.Response:
    created = (await client.post("/v1/sessions")).json()
    return await client.post(created["audio_url"] + query, content=body)


def assert_clean_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


@pytest.mark.parametrize(
    ("name", "body", "query", "status", "code"), UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES]
)
async def test_bad_upload(
    server: Server, name: str, body: bytes, query: str, status: int, code: str | None
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(30):
            r = await upload(client, body, query)
            if code is None:
                assert r.status_code == status, r.text
                return
            assert_clean_error(r, status, code)
            if "session" not in r.json():
                # Refused before the pipeline started (bad query): the session is still
                # unused and a corrected upload can follow.
                return
            # The SSE log tells the same story, ending with `end`.
            session_id = r.json()["session"]["id"]
            events = await read_all(client, f"/v1/sessions/{session_id}/events")
    assert [e.data["code"] for e in events if e.event == "error"] == [code]
    assert events[-1].event == "end" and events[-1].data["reason"] == "error"


async def test_partial_sample_keeps_the_whole_samples(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await upload(client, WAV[44:] + b"\x01", "?encoding=s16le")
        assert_clean_error(r, 422, "partial_sample")
        session = r.json()["session"]
        assert session["segments"] == 3  # every utterance before the odd byte was processed
        assert session["audio_seconds"] == pytest.approx((len(WAV) - 44) / 32000, abs=0.002)


async def test_corrupt_middle_keeps_what_decodes(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await upload(client, corrupt_middle((DATA / "speech.mp3").read_bytes()))
        # FFmpeg resynchronises on MP3 frames: audio on both sides of the damage survives.
        assert r.status_code in (200, 422), r.text
        session = r.json().get("session", r.json())
        assert session["audio_seconds"] > 3


CONFIG_CASES: list[tuple[str, bytes, int, str]] = [
    ("not-json", b"{mode: segmented}", 400, "invalid_json"),
    ("truncated-json", b'{"mode": "segmented"', 400, "invalid_json"),
    ("binary", b"\xff\xfe\x00garbage", 400, "invalid_json"),
    ("array", b"[]", 422, "invalid_config"),
    ("number", b"42", 422, "invalid_config"),
    ("unknown-field", b'{"model": "whisper"}', 422, "unknown_field"),
    ("unknown-vad-field", b'{"vad": {"aggressiveness": 3}}', 422, "unknown_field"),
    ("unknown-format-field", b'{"format": {"endian": "big"}}', 422, "unknown_field"),
    ("vad-not-object", b'{"vad": 0.5}', 422, "invalid_config"),
    ("threshold-out-of-range", b'{"vad": {"negative_threshold": -1}}', 422, "invalid_config"),
    ("threshold-nan", b'{"vad": {"positive_threshold": NaN}}', 422, "invalid_config"),
    ("channels-fraction", b'{"format": {"channels": 1.5}}', 422, "invalid_config"),
    ("bool-as-number", b'{"format": {"channels": true}}', 422, "invalid_config"),
    ("interim-too-fast", b'{"interim_interval_ms": 1}', 422, "invalid_config"),
    ("bit-depth-24", b'{"format": {"bit_depth": 24}}', 415, "unsupported_format"),
    ("oversized", b'{"trace_id": "' + b"x" * 70_000 + b'"}', 413, "config_too_large"),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "code"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
async def test_bad_config(server: Server, name: str, body: bytes, status: int, code: str) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        r = await client.post(
            "/v1/sessions", content=body, headers={"content-type": "application/json"}
        )
        assert_clean_error(r, status, code)


async def test_routing_errors(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        sid = (await client.post("/v1/sessions")).json()["id"]
        cases = [
            ("GET", f"/v1/sessions/{sid}/audio", 405, "method_not_allowed"),
            ("PATCH", f"/v1/sessions/{sid}", 405, "method_not_allowed"),
            ("GET", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/events", 404, "session_not_found"),
            ("DELETE", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA", 404, "session_not_found"),
            ("POST", "/v1/sessions/not-an-id!/audio", 404, "session_not_found"),
            ("GET", "/v1/nothing-here", 404, "not_found"),
        ]
        for method, path, status, code in cases:
            assert_clean_error(await client.request(method, path), status, code)
        r = await client.get(f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": "x"})
        assert_clean_error(r, 400, "invalid_message")
        await client.delete(f"/v1/sessions/{sid}")


async def test_second_concurrent_upload_is_busy(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions")).json()
        gate = anyio.Event()

        async def slow() -> Any:
            yield WAV[:20_000]
            await gate.wait()
            yield WAV[20_000:]

        results: dict[str, httpx.Response] = {}

        async def first() -> None:
            results["first"] = await client.post(created["audio_url"], content=slow())

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                while (await client.get(created["url"])).json()["state"] != "running":
                    await anyio.sleep(0.02)
                second = await client.post(created["audio_url"], content=WAV)
                gate.set()
        assert_clean_error(second, 409, "session_busy")
        assert results["first"].status_code == 200
        assert results["first"].json()["segments"] == 3


async def test_bad_sessions_do_not_disturb_a_good_one(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        good = (await client.post("/v1/sessions")).json()
        out: dict[str, httpx.Response] = {}

        async def good_upload() -> None:
            async def paced() -> Any:
                for i in range(0, len(WAV), 8000):
                    yield WAV[i : i + 8000]
                    await anyio.sleep(0.01)

            out["good"] = await client.post(good["audio_url"], content=paced())

        async def bad(k: int) -> None:
            case = UPLOAD_CASES[k % 8]
            await upload(client, case[1], case[2])

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(good_upload)
                for k in range(16):
                    tg.start_soon(bad, k)
            events = await read_all(client, good["events_url"])
    assert out["good"].status_code == 200
    assert len(finals(events)) == 3
    assert events[-1].data["reason"] == "completed"


# -- limits, on servers configured for them ------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("limited"),
        env={
            "STREAMER_MAX_SESSIONS": "3",
            "STREAMER_MAX_UPLOAD_BYTES": "100000",
            "STREAMER_IDLE_TIMEOUT_SECONDS": "1",
            "STREAMER_RETENTION_SECONDS": "1",
            "STREAMER_UNSTARTED_TIMEOUT_SECONDS": "2",
        },
    )
    yield s
    stop_server(s)


async def test_oversized_body_keeps_audio_up_to_the_limit(limited: Server) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as client:
        r = await upload(client, WAV)
        assert_clean_error(r, 413, "payload_too_large")
        session = r.json()["session"]
        assert session["end_reason"] == "payload_too_large"
        assert 2.5 < session["audio_seconds"] <= 100_000 / 32000 + 0.01
        assert session["segments"] >= 1


async def test_idle_upload_times_out_and_keeps_results(limited: Server) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as client:
        created = (await client.post("/v1/sessions")).json()

        async def stalls() -> Any:
            yield WAV[:64_000]  # 2 s: the first utterance
            await anyio.sleep(10)
            yield WAV[64_000:]

        async def send() -> None:
            # The server answers 408 and closes while this client is still "sending": httpx
            # only notices when it writes again, so the session status is what we check.
            with pytest.raises(httpx.TransportError):
                await client.post(created["audio_url"], content=stalls())

        with anyio.fail_after(8):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                while (status := (await client.get(created["url"])).json())["state"] != "ended":
                    await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
        assert status["end_reason"] == "idle_timeout"
        assert status["segments"] == 1
        events = await read_all(client, created["events_url"])
        assert [e.data["code"] for e in events if e.event == "error"] == ["idle_timeout"]


async def test_session_limit_and_retention(limited: Server) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as client:
        with anyio.fail_after(15):
            while (await client.get("/readyz")).json().get("sessions", 0):
                await anyio.sleep(0.1)  # earlier tests' sessions end
            ids = [(await client.post("/v1/sessions")).json()["id"] for _ in range(3)]
            r = await client.post("/v1/sessions")
            assert_clean_error(r, 503, "too_many_sessions")
            assert r.headers["retry-after"]
            # Unstarted sessions end by themselves, then the log expires after retention.
            while (await client.post("/v1/sessions")).status_code == 503:
                await anyio.sleep(0.2)
            while (await client.get(f"/v1/sessions/{ids[0]}")).status_code != 404:
                await anyio.sleep(0.2)
        events_gone = await client.get(f"/v1/sessions/{ids[0]}/events")
        assert_clean_error(events_gone, 404, "session_not_found")


async def test_model_failures_and_panics_are_events(tmp_path: Path) -> None:
    s = start_server(
        tmp_path,
        env={
            "STREAMER_MODEL_OPTIONS": json.dumps(
                {
                    "delay": 0.01,
                    "constant_factor": 0,
                    "jitter": 0,
                    "failure_rate": 0.5,
                    "panic_rate": 0.5,
                    "seed": 3,
                }
            )
        },
    )
    try:
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
            created = (await client.post("/v1/sessions")).json()
            r = await client.post(created["audio_url"], content=WAV)
            events = await read_all(client, created["events_url"])
    finally:
        stop_server(s)
    assert r.status_code == 200  # model errors do not fail the upload: the session went on
    codes = [e.data["code"] for e in events if e.event == "error"]
    assert codes and set(codes) <= {"model_failed", "model_panic"}
    assert len(codes) + len(finals(events)) == 3
    assert all("start_time" in e.data for e in events if e.event == "error")
    assert events[-1].data["reason"] == "completed"
