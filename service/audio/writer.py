"""Numbering decoded audio into :class:`AudioChunk` objects and sending them downstream."""

from __future__ import annotations

import numpy as np
from anyio.streams.memory import MemoryObjectSendStream

from service.audio.chunk import AudioChunk, Samples


class ChunkWriter:
    """Gives each chunk its ``start`` (contiguous: each starts where the previous ended).

    Used from the event loop only (the PyAV thread reaches it through ``from_thread.run``).
    """

    def __init__(self, send: MemoryObjectSendStream[AudioChunk]) -> None:
        self._send = send
        self.samples_out = 0
        self.channels: int | None = None

    async def write(self, samples: Samples, received_at: float) -> None:
        if samples.shape[1] == 0:
            return
        if self.channels is None:
            self.channels = int(samples.shape[0])
        elif samples.shape[0] != self.channels:
            raise ValueError(f"channel count changed from {self.channels} to {samples.shape[0]}")
        chunk = AudioChunk(
            np.ascontiguousarray(samples, dtype=np.float32), self.samples_out, received_at
        )
        self.samples_out = chunk.end
        await self._send.send(chunk)
