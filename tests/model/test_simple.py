"""Simple mode: every sample reaches the model exactly once, in order (the seed's promise)."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

from service.audio.chunk import AudioChunk
from service.model.simple import simple_stage
from service.vad.speech import SpeechAudio, VadOutput

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("consumer_delay", [0.0, 0.01])
async def test_no_sample_lost_or_repeated(consumer_delay: float) -> None:
    rng = np.random.default_rng(0)
    chunks_send, chunks_recv = anyio.create_memory_object_stream[AudioChunk](4)
    out_send, out_recv = anyio.create_memory_object_stream[VadOutput](0)
    total = np.arange(50_000, dtype=np.float32)
    got: list[SpeechAudio] = []

    async def produce() -> None:
        async with chunks_send:
            pos = 0
            while pos < len(total):
                n = int(rng.integers(1, 3000))
                part = total[pos : pos + n]
                await chunks_send.send(AudioChunk(np.stack([part, -part]), pos, 0.0))
                pos += len(part)

    async def consume() -> None:
        async with out_recv:
            async for item in out_recv:
                assert isinstance(item, SpeechAudio)
                got.append(item)
                await anyio.sleep(consumer_delay)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            tg.start_soon(consume)
            tg.start_soon(simple_stage, chunks_recv, out_send)
    for ch, sign in ((0, 1), (1, -1)):
        parts = [g for g in got if g.channel == ch]
        assert np.array_equal(np.concatenate([p.audio for p in parts]), sign * total)
        assert [p.start for p in parts] == [0] + [p.end for p in parts[:-1]]
        assert [p.utterance for p in parts] == list(range(len(parts)))
        assert all(p.is_final for p in parts)
