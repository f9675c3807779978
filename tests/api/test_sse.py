"""SSE output: live delivery during the upload, late subscribers, Last-Event-ID, end of stream."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest
from sse_starlette import ServerSentEvent

from service.api.sse import sse_frame
from tests.conftest import DATA, Server
from tests.sse_client import SseEvent, finals, iter_sse, read_all

pytestmark = pytest.mark.anyio


async def paced(data: bytes, bytes_per_second: float, chunk: int = 4000) -> Any:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]
        await anyio.sleep(chunk / bytes_per_second)


async def test_first_utterance_arrives_while_upload_is_still_going(server: Server) -> None:
    data = (DATA / "speech.wav").read_bytes()
    seconds = len(data) / 32000
    upload_done: list[float] = []
    first_final: list[float] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions")).json()

        async def subscribe() -> None:
            async with client.stream("GET", created["events_url"]) as response:
                async for ev in iter_sse(response):
                    if ev.event == "segment" and ev.data["is_final"] and not first_final:
                        first_final.append(time.monotonic())

        async def upload() -> None:
            # 2x real time: the whole upload takes about half the audio's duration.
            r = await client.post(created["audio_url"], content=paced(data, 64000))
            assert r.status_code == 200
            upload_done.append(time.monotonic())

        with anyio.fail_after(seconds + 20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(subscribe)
                tg.start_soon(upload)
    assert first_final and upload_done
    assert first_final[0] < upload_done[0] - 0.5, "results must stream, not wait for the end"


async def test_late_subscriber_gets_whole_log_and_resume(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions")).json()
        with anyio.fail_after(30):
            r = await client.post(created["audio_url"], content=(DATA / "speech.wav").read_bytes())
            assert r.status_code == 200
            everything = await read_all(client, created["events_url"])
            assert everything[-1].event == "end"
            assert len(finals(everything)) == 3
            for cut in (1, 3, len(everything) - 1):
                rest = await read_all(client, created["events_url"], last_event_id=cut)
                assert rest == everything[cut:]
            # Resume after the last id: nothing more, and the stream closes by itself.
            assert (
                await read_all(client, created["events_url"], last_event_id=everything[-1].id) == []
            )
            # For EventSource users who cannot set headers on the first request.
            q = await read_all(client, created["events_url"] + "?last_event_id=2")
            assert q == everything[2:]


async def test_resume_at_random_points_mid_session_gets_every_event_once(server: Server) -> None:
    data = (DATA / "speech.wav").read_bytes()
    seen: list[SseEvent] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        created = (await client.post("/v1/sessions", json={"interim_results": True})).json()

        async def reader() -> None:
            last = 0
            while True:
                headers = {"Last-Event-ID": str(last)} if last else {}
                async with client.stream("GET", created["events_url"], headers=headers) as response:
                    async for k, ev in _enumerate(iter_sse(response)):
                        seen.append(ev)
                        last = ev.id or last
                        if ev.event == "end":
                            return
                        if k == 1:  # drop the connection after two events, then resume
                            break

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                r = await client.post(created["audio_url"], content=paced(data, 128000))
                assert r.status_code == 200
        full = await read_all(client, created["events_url"])
    assert [e.id for e in seen] == [e.id for e in full]
    assert seen == full


async def _enumerate(it: Any) -> Any:
    k = 0
    async for x in it:
        yield k, x
        k += 1


async def test_bad_last_event_id(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        created = (await client.post("/v1/sessions")).json()
        r = await client.get(created["events_url"], headers={"Last-Event-ID": "abc"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_message"
        await client.delete(created["url"])


@pytest.mark.parametrize(
    ("data", "event", "event_id", "retry"),
    [
        ('{"type":"segment","text":"hello"}', "segment", 1, 1000),
        ('{"text":"caf\u00e9 \u2028 \u00a0 \\n \\r"}', "segment", 42, None),
        ('{"code":"store_unavailable"}', "error", None, None),
        ("{}", "end", 7, None),
    ],
)
def test_frames_are_what_sse_starlette_writes(
    data: str, event: str, event_id: int | None, retry: int | None
) -> None:
    """The events are written by hand (once per event per subscriber, in a fraction of the
    cost); they must stay byte for byte what ``ServerSentEvent`` makes of the same fields."""
    expected = ServerSentEvent(
        data=data,
        event=event,
        id=None if event_id is None else str(event_id),
        retry=retry,
        sep="\n",
    ).encode()
    assert sse_frame(data, event, event_id, retry) == expected
