"""Resumable uploads (issue 21): a cut upload (TCP reset) loses no audio and no session. The
resumed stream's events equal an uncut upload's: the same segments, nothing lost, nothing twice."""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import DATA, Server, start_server, stop_server
from tests.resume_helpers import (
    cut_upload,
    cut_when_received,
    finish_upload,
    head_offset,
    reset,
    send_chunks,
    shape,
    start_chunked,
)
from tests.sse_client import finals, iter_sse, read_all

pytestmark = pytest.mark.anyio

WAV = (DATA / "speech.wav").read_bytes()
WEBM = (DATA / "speech.webm").read_bytes()


@pytest.fixture(scope="module")
def grace_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A short grace period, so its expiry is quick to see."""
    s = start_server(tmp_path_factory.mktemp("grace"), env={"STREAMER_RESUME_GRACE_SECONDS": "1.5"})
    yield s
    stop_server(s)


async def _uncut(client: httpx.AsyncClient, data: bytes) -> list[tuple[object, ...]]:
    created = (await client.post("/v1/sessions", json={"resumable": True})).json()
    r = await client.post(created["audio_url"], content=data)
    assert r.status_code == 200, r.text
    return shape(await read_all(client, created["events_url"]))


async def _cut_and_resumed(
    client: httpx.AsyncClient, data: bytes, rng: random.Random, cuts: int
) -> tuple[list[tuple[object, ...]], httpx.Response, list[int]]:
    created = (await client.post("/v1/sessions", json={"resumable": True})).json()
    url = created["audio_url"]
    offsets: list[int] = []
    offset = 0
    for _ in range(cuts):
        upto = rng.randrange(offset + 1, len(data))
        await cut_upload(url, data, offset, upto, pause=rng.uniform(0.0, 0.2))
        with anyio.fail_after(5):
            while True:  # the server notices the reset within milliseconds
                offset, state = await head_offset(client, url)
                if state == "awaiting_resume":
                    break
                await anyio.sleep(0.02)
        assert offset <= upto
        offsets.append(offset)
    final = await finish_upload(client, url, data)
    events = await read_all(client, created["events_url"])
    ids = [e.id for e in events]
    assert ids == list(range(1, len(ids) + 1))  # one log, nothing twice
    return shape(events), final, offsets


@pytest.mark.parametrize(("name", "data"), [("wav", WAV), ("webm", WEBM)])
async def test_cut_at_random_points_and_resumed_equals_uncut(
    server: Server, name: str, data: bytes
) -> None:
    rng = random.Random(f"resume-{name}")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with anyio.fail_after(60):
            expected = await _uncut(client, data)
            for _ in range(3):
                got, final, offsets = await _cut_and_resumed(client, data, rng, cuts=3)
                assert final.status_code == 200, final.text
                assert final.json()["end_reason"] == "completed"
                assert final.json()["bytes"] == len(data)
                assert final.headers["upload-offset"] == str(len(data))
                assert got == expected, offsets
    assert any(s[0] == "segment" for s in expected)


async def test_head_and_status_report_the_offset(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"resumable": True})).json()
        assert created["config"]["resumable"] is True
        url = created["audio_url"]
        assert await head_offset(client, url) == (0, "created")
        with anyio.fail_after(10):
            await cut_when_received(client, url, WAV, 0, 100_000)
            while (await head_offset(client, url))[1] != "awaiting_resume":
                await anyio.sleep(0.02)
        offset, _ = await head_offset(client, url)
        assert offset == 100_000  # everything sent had reached the server before the reset
        status = (await client.get(created["url"])).json()
        assert status["upload_offset"] == offset
        assert status["awaiting_resume"] is True
        assert status["state"] == "running"
        await client.delete(created["url"])


async def test_a_wrong_offset_gets_409_with_the_right_one(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"resumable": True})).json()
        url = created["audio_url"]
        # Before any upload the only right offset is 0.
        r = await client.post(url, content=WAV[10:], headers={"Upload-Offset": "10"})
        assert r.status_code == 409
        assert r.headers["upload-offset"] == "0"
        assert r.json()["error"] == {
            "code": "offset_mismatch",
            "message": r.json()["error"]["message"],
            "offset": 0,
        }
        with anyio.fail_after(10):
            await cut_when_received(client, url, WAV, 0, 64_000)
            while (await head_offset(client, url))[1] != "awaiting_resume":
                await anyio.sleep(0.02)
            for wrong in (0, 63_999, 64_001, 10**9):
                r = await client.patch(url, content=b"x", headers={"Upload-Offset": str(wrong)})
                assert r.status_code == 409, wrong
                assert r.json()["error"]["code"] == "offset_mismatch"
                assert r.headers["upload-offset"] == "64000"
            r = await client.post(url, content=WAV, headers={"Upload-Offset": "-1"})
            assert r.status_code == 400
            # PATCH continues exactly there, as POST does.
            r = await client.patch(url, content=WAV[64_000:], headers={"Upload-Offset": "64000"})
        assert r.status_code == 200, r.text
        assert r.json()["bytes"] == len(WAV)
        assert r.json()["end_reason"] == "completed"


async def test_a_session_not_created_resumable_cannot_be_resumed(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions")).json()
        url = created["audio_url"]
        with anyio.fail_after(10):
            await cut_when_received(client, url, WAV, 0, 64_000)
            events = await read_all(client, created["events_url"])
        assert events[-1].data["reason"] == "client_disconnected"  # as before: it ends
        r = await client.post(url, content=WAV[64_000:], headers={"Upload-Offset": "64000"})
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "not_resumable"


async def test_grace_expiry_ends_with_everything_received_processed(grace_server: Server) -> None:
    cut = 32000 * 6 + 44  # 6 s: two utterances and the start of the third
    async with httpx.AsyncClient(base_url=grace_server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"resumable": True})).json()
        url = created["audio_url"]
        with anyio.fail_after(15):
            await cut_when_received(client, url, WAV, 0, cut)
            while (await head_offset(client, url))[1] != "awaiting_resume":
                await anyio.sleep(0.02)
            t0 = anyio.current_time()
            events = await read_all(client, created["events_url"])
            waited = anyio.current_time() - t0
        end = events[-1].data
        assert end["type"] == "end" and end["reason"] == "client_disconnected"
        assert end["bytes"] == cut
        assert end["audio_seconds"] == pytest.approx((cut - 44) / 32000, abs=0.001)
        segs = finals(events)
        assert len(segs) == 3  # two whole utterances, the third closed at the last sample
        assert segs[-1]["end_time"] == pytest.approx(end["audio_seconds"], abs=0.001)
        assert waited > 1.0  # it waited for the grace period, not ended at the cut
        # After the grace period it is over for good.
        r = await client.post(url, content=WAV[cut:], headers={"Upload-Offset": str(cut)})
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "session_ended"
        assert await head_offset(client, url) == (cut, "ended")


async def test_a_resume_within_the_grace_period_keeps_the_session(grace_server: Server) -> None:
    """A resumed upload stops the clock: a later cut gets a whole grace period again."""
    async with httpx.AsyncClient(base_url=grace_server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"resumable": True})).json()
        url = created["audio_url"]
        with anyio.fail_after(20):
            await cut_upload(url, WAV, 0, 50_000, pause=0.1)
            await anyio.sleep(1.0)
            offset, state = await head_offset(client, url)
            assert state == "awaiting_resume"
            await cut_upload(url, WAV, offset, 150_000, pause=1.0)  # 1 + 1 s > the grace period
            offset, state = await head_offset(client, url)
            assert state in ("running", "awaiting_resume")
            r = await finish_upload(client, url, WAV)
        assert r.status_code == 200, r.text
        assert r.json()["end_reason"] == "completed"
        assert r.json()["bytes"] == len(WAV)


async def test_a_newer_upload_supersedes_one_whose_client_went_silent(server: Server) -> None:
    """A client whose network vanished without a reset still holds its upload until the server
    notices (idle timeout): its resumed upload takes over, and the old one's late bytes, should
    any still come, are refused rather than decoded twice."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"resumable": True})).json()
        url = created["audio_url"]
        stale = start_chunked(url, {"Upload-Offset": "0"})
        try:
            send_chunks(stale, WAV[:80_000])
            with anyio.fail_after(10):
                while (await head_offset(client, url))[0] < 80_000:
                    await anyio.sleep(0.02)
                assert (await head_offset(client, url))[1] == "running"
                r = await client.post(url, content=WAV[80_000:], headers={"Upload-Offset": "80000"})
            # The old upload was answered when the new one took over (and its connection closed).
            stale.settimeout(5)
            assert stale.recv(4096).startswith(b"HTTP/1.1 202 ")
            with contextlib.suppress(OSError):
                send_chunks(stale, WAV[80_000:90_000])  # late bytes go nowhere
        finally:
            reset(stale)
        assert r.status_code == 200, r.text
        assert r.json()["bytes"] == len(WAV)
        expected = await _uncut(client, WAV)
        assert shape(await read_all(client, created["events_url"])) == expected


async def test_head_on_an_unknown_session_is_404(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.head("/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/audio")
        assert r.status_code == 404


async def test_delete_while_awaiting_resume_cancels_at_once(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"resumable": True})).json()
        url = created["audio_url"]
        with anyio.fail_after(10):
            await cut_when_received(client, url, WAV, 0, 64_000)
            while (await head_offset(client, url))[1] != "awaiting_resume":
                await anyio.sleep(0.02)
            r = await client.delete(created["url"])
            assert r.status_code == 202
            events = await read_all(client, created["events_url"])
        assert events[-1].data["reason"] == "cancelled"
        r = await client.post(url, content=WAV[64_000:], headers={"Upload-Offset": "64000"})
        assert r.json()["error"]["code"] == "session_ended"


async def test_shutdown_ends_a_session_awaiting_resume_without_waiting_for_grace(
    tmp_path: Path,
) -> None:
    """SIGTERM does not wait out the grace period (60 s): a session waiting for its upload is
    drained and ended (``shutdown``) like any other whose input is closed."""
    s = start_server(tmp_path, env={"STREAMER_SHUTDOWN_GRACE_SECONDS": "5"})
    try:
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
            created = (await client.post("/v1/sessions", json={"resumable": True})).json()
            url = created["audio_url"]
            with anyio.fail_after(20):
                await cut_when_received(client, url, WAV, 0, 100_000)
                while (await head_offset(client, url))[1] != "awaiting_resume":
                    await anyio.sleep(0.02)
                async with client.stream("GET", created["events_url"]) as events:
                    s.process.send_signal(signal.SIGTERM)
                    seen = [ev async for ev in iter_sse(events)]
        end = seen[-1].data
        assert (end["type"], end["reason"], end["bytes"]) == ("end", "shutdown", 100_000)
        assert s.process.wait(10) == 0
    finally:
        stop_server(s)
