"""Property: however the upload's bytes are split into chunks, the decoded samples and the
segments are the same (real decoder, real Silero VAD through the batcher, real segmenter)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

import anyio
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.audio.chunk import AudioChunk
from service.audio.decoder import decode
from service.config import PcmFormat, VadParams
from service.vad.batcher import VadBatcher
from service.vad.silero import load_session
from service.vad.speech import SpeechAudio, VadOutput
from service.vad.stage import vad_stage
from tests.conftest import DATA


@cache
def onnx() -> Any:
    return load_session()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


async def pipeline(parts: list[bytes], fmt: PcmFormat | None) -> tuple[str, list[tuple[int, int]]]:
    batcher = VadBatcher(onnx(), limiter=anyio.CapacityLimiter(1))
    audio_send, audio_recv = anyio.create_memory_object_stream[AudioChunk](4)
    tap_send, tap_recv = anyio.create_memory_object_stream[AudioChunk](4)
    out_send, out_recv = anyio.create_memory_object_stream[VadOutput](16)
    decoded: list[np.ndarray[Any, Any]] = []
    segments: list[tuple[int, int]] = []

    async def source() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    async def tap() -> None:
        async with audio_recv, tap_send:
            async for chunk in audio_recv:
                decoded.append(chunk.samples)
                await tap_send.send(chunk)

    async def collect() -> None:
        async with out_recv:
            async for item in out_recv:
                if isinstance(item, SpeechAudio) and item.is_final:
                    segments.append((item.start, item.end))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            tg.start_soon(tap)
            tg.start_soon(collect)
            async with anyio.create_task_group() as inner:
                inner.start_soon(decode, source(), fmt, audio_send)
                inner.start_soon(
                    lambda: vad_stage(
                        tap_recv,
                        out_send,
                        batcher=batcher,
                        params=VadParams(),
                        interim_interval_s=None,
                    )
                )
            tg.cancel_scope.cancel()
    # Per channel, the whole signal: chunk boundaries must not matter.
    whole = np.ascontiguousarray(np.concatenate(decoded, axis=1))
    return hashlib.sha256(whole.tobytes()).hexdigest(), segments


CASES = {
    "wav": ((DATA / "speech.wav").read_bytes(), None),
    "mp3": ((DATA / "speech.mp3").read_bytes(), None),
    "raw": ((DATA / "speech_s16le_8k_stereo.raw").read_bytes(), PcmFormat(2, 8000, 16, False)),
}


@cache
def reference(name: str) -> tuple[str, list[tuple[int, int]]]:
    data, fmt = CASES[name]
    return anyio.run(pipeline, [data], fmt)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(CASES)),
    cuts=st.lists(st.integers(min_value=1, max_value=10**7), min_size=1, max_size=40),
)
def test_any_split_gives_same_samples_and_segments(name: str, cuts: list[int]) -> None:
    data, fmt = CASES[name]
    got = anyio.run(pipeline, split(data, cuts), fmt)
    want = reference(name)
    assert got[1] == want[1]
    assert len(want[1]) == 3
    assert got[0] == want[0]
