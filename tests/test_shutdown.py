"""SIGTERM mid-session: subscribers get `end {reason: "shutdown"}`, the results of audio already
received are delivered, and the process exits within the grace period."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import DATA, start_server, stop_server
from tests.sse_client import SseEvent, iter_sse

pytestmark = pytest.mark.anyio


async def test_sigterm_ends_live_sessions_and_exits(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"STREAMER_SHUTDOWN_GRACE_SECONDS": "3"})
    data = (DATA / "speech.wav").read_bytes()
    seen: list[SseEvent] = []
    upload_status: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            created = (await client.post("/v1/sessions")).json()

            async def slow_body() -> Any:
                # About 3.5 s of speech, then the client keeps the upload open and idle.
                yield data[: 32000 * 4]
                await anyio.sleep(60)

            async def upload() -> None:
                try:
                    r = await client.post(created["audio_url"], content=slow_body())
                    upload_status.append(r.status_code)
                except httpx.HTTPError:
                    upload_status.append(-1)

            async def subscribe() -> None:
                async with client.stream("GET", created["events_url"]) as response:
                    async for ev in iter_sse(response):
                        seen.append(ev)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(subscribe)
                    tg.start_soon(upload)
                    while not any(e.event == "inactive" for e in seen):
                        await anyio.sleep(0.05)
                    t0 = time.monotonic()
                    server.process.send_signal(signal.SIGTERM)
                    code = await anyio.to_thread.run_sync(server.process.wait, 15)
                    elapsed = time.monotonic() - t0
                    tg.cancel_scope.cancel()
    finally:
        stop_server(server)
    assert code == 0, server.log()
    assert elapsed < 8, f"took {elapsed:.1f} s to exit"
    assert seen[-1].event == "end", [e.event for e in seen]
    assert seen[-1].data["reason"] == "shutdown"
    # The utterances received before the signal were finished, not dropped.
    assert sum(1 for e in seen if e.event == "segment" and e.data["is_final"]) >= 1
