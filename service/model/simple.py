"""``mode: "simple"``: every sample goes to the model, in order, with no VAD (the seed's simple
route). Audio accumulates while the model is busy and goes in one call when it is free, so a slow
model sees fewer, longer calls instead of a growing backlog; nothing is dropped."""

from __future__ import annotations

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.audio.chunk import AudioChunk, Samples
from service.config import MODEL_SAMPLE_RATE
from service.vad.speech import SpeechAudio, VadOutput

MIN_SAMPLES = 512  # the seed's min_data
MAX_SAMPLES = 30 * MODEL_SAMPLE_RATE


class _Pending:
    def __init__(self) -> None:
        self.parts: list[Samples] = []
        self.start = 0
        self.size = 0
        self.count = 0  # calls sent so far, the "utterance" number


async def simple_stage(
    chunks: MemoryObjectReceiveStream[AudioChunk],
    send: MemoryObjectSendStream[VadOutput],
    *,
    min_samples: int = MIN_SAMPLES,
    max_samples: int = MAX_SAMPLES,
) -> int:
    """Returns the number of model calls requested. ``send`` should be unbuffered so that a
    successful ``send_nowait`` means the model stage took the audio right away."""
    pending: dict[int, _Pending] = {}
    received_at = 0.0

    def take(ch: int, p: _Pending) -> SpeechAudio:
        audio = np.concatenate(p.parts) if len(p.parts) > 1 else p.parts[0]
        item = SpeechAudio(ch, p.count, p.start, p.start + p.size, audio, True, received_at)
        p.start += p.size
        p.parts, p.size = [], 0
        p.count += 1
        return item

    async with chunks, send:
        async for chunk in chunks:
            received_at = chunk.received_at
            for ch in range(chunk.channels):
                p = pending.setdefault(ch, _Pending())
                if p.size == 0:
                    p.start = chunk.start
                p.parts.append(chunk.samples[ch])
                p.size += chunk.frames
                if p.size < min_samples:
                    continue
                if p.size >= max_samples:
                    await send.send(take(ch, p))
                    continue
                item = take(ch, p)
                try:
                    send.send_nowait(item)
                except anyio.WouldBlock:
                    # Model busy: put it back and keep accumulating.
                    p.count -= 1
                    p.start, p.size, p.parts = item.start, item.end - item.start, [item.audio]
        for ch, p in sorted(pending.items()):
            if p.size:
                await send.send(take(ch, p))
        return sum(p.count for p in pending.values())
