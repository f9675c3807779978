"""Numbering decoded audio into :class:`AudioChunk` objects and sending them downstream."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.audio.chunk import AudioChunk, ChunkSink, Samples


class ChunkWriter:
    """Gives each chunk its ``start`` (contiguous: each starts where the previous ended).

    Used from the event loop only (the PyAV thread reaches it through ``from_thread.run``).
    """

    def __init__(
        self,
        send: ChunkSink,
        on_chunk: Callable[[AudioChunk, float], None] | None = None,
    ) -> None:
        self._send = send
        self.samples_out = 0
        self.channels: int | None = None
        # Each chunk, with the decoding work since the last one: ``on_chunk(chunk, busy_s)``.
        self._on_chunk = on_chunk
        self._busy_s = 0.0

    def add_busy(self, seconds: float) -> None:
        """Count decoding work. The PyAV thread may call this: ``write`` only runs while that
        thread is blocked in ``from_thread.run``, so the two never overlap."""
        self._busy_s += seconds

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
        if self._on_chunk is not None:
            self._on_chunk(chunk, self._busy_s)
            self._busy_s = 0.0
        await self._send.send(chunk)
