"""The boundary between decoding and VAD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Decoded audio at 16 kHz.

    ``samples`` has shape ``(channels, n)``, float32 in [-1, 1]; ``start`` is the index (per
    channel, at 16 kHz) of its first sample since the session's first sample; ``received_at`` is
    the ``time.monotonic()`` at which the bytes that completed this chunk arrived, so later stages
    can measure event lag from audio arrival.
    """

    samples: Samples
    start: int
    received_at: float

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def frames(self) -> int:
        return int(self.samples.shape[1])

    @property
    def end(self) -> int:
        return self.start + self.frames


class ChunkSink(Protocol):
    """Where decoded chunks go: a memory object stream, or a stage that takes them directly
    (:class:`service.vad.stage.VadStage`, one task hop fewer per chunk)."""

    async def send(self, item: AudioChunk, /) -> None: ...

    async def aclose(self) -> None: ...
