"""Helpers shared by the VAD tests: reading WAV files, running the stage, scripted models."""

from __future__ import annotations

import itertools
import wave
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import numpy as np
import numpy.typing as npt

from service.audio.chunk import AudioChunk
from service.config import VadParams
from service.vad.batcher import VadBatcher
from service.vad.silero import FRAME, Floats, VadStream
from service.vad.speech import SpeechAudio, SpeechEnded, SpeechStarted, VadOutput
from service.vad.stage import VadSummary, vad_stage


def read_wav(path: Path) -> npt.NDArray[np.float32]:
    """(channels, n) float32 from a 16-bit PCM WAV."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        channels = w.getnchannels()
    return (raw.reshape(-1, channels).T.astype(np.float32) / 32768.0).copy()


def chunks_of(audio: npt.NDArray[np.float32], cuts: Sequence[int]) -> list[AudioChunk]:
    """Split (channels, n) audio at the given sample positions; chunk i has received_at=i."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < audio.shape[1]}), audio.shape[1]]
    return [
        AudioChunk(audio[:, a:b].copy(), a, float(i))
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


async def run_stage(
    chunks: Sequence[AudioChunk],
    batcher: VadBatcher,
    params: VadParams | None = None,
    interim_interval_s: float | None = None,
) -> tuple[list[VadOutput], VadSummary]:
    """Feed chunks through ``vad_stage`` and collect every output until it closes its stream."""
    chunk_send, chunk_recv = anyio.create_memory_object_stream[AudioChunk](2)
    out_send, out_recv = anyio.create_memory_object_stream[VadOutput](4)
    outputs: list[VadOutput] = []
    summary: list[VadSummary] = []

    async def produce() -> None:
        async with chunk_send:
            for chunk in chunks:
                await chunk_send.send(chunk)

    async def consume() -> None:
        async with out_recv:
            async for item in out_recv:
                outputs.append(item)

    async def stage() -> None:
        summary.append(
            await vad_stage(
                chunk_recv,
                out_send,
                batcher=batcher,
                params=params or VadParams(),
                interim_interval_s=interim_interval_s,
            )
        )

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            tg.start_soon(consume)
            tg.start_soon(stage)
    return outputs, summary[0]


def finals(outputs: Sequence[VadOutput], channel: int = 0) -> list[SpeechAudio]:
    return [
        o for o in outputs if isinstance(o, SpeechAudio) and o.is_final and o.channel == channel
    ]


def check_protocol(outputs: Sequence[VadOutput]) -> None:
    """Per channel: Started, interims, Ended, final Audio; utterances numbered 0, 1, ...; finals
    do not overlap; interims and finals carry the utterance's start."""
    by_channel: dict[int, list[VadOutput]] = {}
    for o in outputs:
        by_channel.setdefault(o.channel, []).append(o)
    for items in by_channel.values():
        open_utt: SpeechStarted | None = None
        ended: SpeechEnded | None = None
        expected = 0
        last_end = 0
        for o in items:
            if isinstance(o, SpeechStarted):
                assert open_utt is None and ended is None
                assert o.utterance == expected and o.start >= last_end
                open_utt = o
            elif isinstance(o, SpeechEnded):
                assert open_utt is not None and o.utterance == open_utt.utterance
                assert o.end > open_utt.start
                ended = o
            else:
                assert open_utt is not None and o.utterance == open_utt.utterance
                assert o.start == open_utt.start and len(o.audio) == o.end - o.start
                if o.is_final:
                    assert ended is not None and o.end == ended.end
                    last_end = o.end
                    expected += 1
                    open_utt = ended = None
                else:
                    assert ended is None
        assert open_utt is None and ended is None, "an utterance was left open"


ProbFn = Callable[[int, int], float]
"""(stream number, frame index within that stream) -> probability."""


class ScriptedBatcher(VadBatcher):
    """A batcher whose 'model' is a script, for exact stage tests. Streams are numbered in the
    order they are first seen."""

    def __init__(self, prob: ProbFn) -> None:
        super().__init__(None, limiter=anyio.CapacityLimiter(1))
        self._prob = prob
        self._ids: dict[int, int] = {}
        self._frames: dict[int, int] = {}
        self.calls: list[list[int]] = []

    async def infer(self, requests: Sequence[tuple[VadStream, Floats]]) -> list[Floats]:
        await anyio.lowlevel.checkpoint()
        return self.infer_sync(requests)

    def infer_sync(self, requests: Sequence[tuple[VadStream, Floats]]) -> list[Floats]:
        out: list[Floats] = []
        self.calls.append([len(f) for _, f in requests])
        for stream, frames in requests:
            assert frames.shape[1] == FRAME
            number = self._ids.setdefault(id(stream), len(self._ids))
            first = self._frames.get(number, 0)
            self._frames[number] = first + len(frames)
            out.append(
                np.array([self._prob(number, first + t) for t in range(len(frames))], np.float32)
            )
        return out
