"""The model stage: events in order, finals never lost or reordered, stale interims dropped,
failures and panics become error events and the stage goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import anyio
import numpy as np
import pytest

from service.audio.chunk import Samples
from service.events.types import Event
from service.model.base import ModelError
from service.model.runner import ModelRunner
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput

pytestmark = pytest.mark.anyio


class ScriptedModel:
    """Sleeps per call as told by the audio's first sample; fails on -1, panics on -2."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.threads: set[int] = set()

    def infer(self, audio: Samples) -> Mapping[str, Any]:
        with self.lock:
            self.calls += 1
            self.threads.add(threading.get_ident())
        marker = float(audio[0])
        if marker == -1:
            raise ModelError("bad luck")
        if marker == -2:
            raise ZeroDivisionError("boom")
        time.sleep(marker)
        return {"count": len(audio)}


def audio(seconds_to_sleep: float, n: int = 160) -> Samples:
    a = np.zeros(n, dtype=np.float32)
    a[0] = seconds_to_sleep
    return a


async def run(items: list[VadOutput], model: ScriptedModel) -> list[Event]:
    runner = ModelRunner(model, anyio.CapacityLimiter(4))
    send, receive = anyio.create_memory_object_stream[VadOutput](0)
    out: list[Event] = []

    async def emit(event: Event, received_at: float | None) -> None:
        out.append(event)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as engine_tg:
            engine_tg.start_soon(runner.run)
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.run_stage, receive, emit)
                async with send:
                    for item in items:
                        await send.send(item)
            engine_tg.cancel_scope.cancel()
    return out


async def test_finals_stay_in_order_when_later_calls_finish_first() -> None:
    items: list[VadOutput] = []
    for u, sleep in enumerate([0.3, 0.0, 0.1]):
        items += [
            SpeechStarted(0, u, u * 100, 0.0),
            SpeechEnded(0, u, u * 100 + 50, 0.0),
            SpeechAudio(0, u, u * 100, u * 100 + 50, audio(sleep), True, 0.0),
        ]
    out = await run(items, ScriptedModel())
    finals = [e for e in out if e.type == "segment"]
    assert [f.to_dict()["start_time"] for f in finals] == [0.0, 100 / 16000, 200 / 16000]
    # The boundary events are not held back by slow model calls.
    assert [e.type for e in out[:6]] == ["active", "inactive"] * 3


async def test_failure_and_panic_become_errors_and_the_stage_goes_on() -> None:
    items: list[VadOutput] = [
        SpeechAudio(0, 0, 0, 10, audio(-1), True, 0.0),
        SpeechAudio(0, 1, 10, 20, audio(-2), True, 0.0),
        SpeechAudio(0, 2, 20, 30, audio(0.0), True, 0.0),
    ]
    out = await run(items, ScriptedModel())
    assert [e.to_dict().get("code") for e in out] == ["model_failed", "model_panic", None]
    assert out[2].type == "segment"
    assert "Traceback" not in str(out[1].to_dict())


async def test_interims_are_coalesced_and_never_follow_their_final() -> None:
    model = ScriptedModel()
    items: list[VadOutput] = [SpeechStarted(0, 0, 0, 0.0)]
    for k in range(1, 6):  # five interim ticks while the first one is still running
        items.append(SpeechAudio(0, 0, 0, k * 100, audio(0.2 if k == 1 else 0.0), False, 0.0))
    items += [SpeechEnded(0, 0, 600, 0.0), SpeechAudio(0, 0, 0, 600, audio(0.0), True, 0.0)]
    out = await run(items, model)
    segs = [e.to_dict() for e in out if e.type == "segment"]
    assert segs[-1]["is_final"] is True
    # The slow first interim comes back after the final: it is stale and dropped.
    assert all(s["is_final"] for s in segs)
    assert model.calls < 6


async def test_calls_run_in_worker_threads() -> None:
    model = ScriptedModel()
    items: list[VadOutput] = [SpeechAudio(0, u, u, u + 1, audio(0.05), True, 0.0) for u in range(4)]
    t0 = time.monotonic()
    out = await run(items, model)
    assert len(out) == 4
    assert threading.get_ident() not in model.threads
    assert time.monotonic() - t0 < 0.19  # concurrent, not 4 x 0.05 back to back
