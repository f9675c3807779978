"""Rate conversion to 16 kHz with FFmpeg's resampler (``av.AudioResampler``).

Two shapes of input: planar numpy arrays from the PCM path (:class:`ArrayResampler`) and decoded
``av.AudioFrame`` objects from the container path (:class:`FrameResampler`). Both keep the channel
count: each channel is its own stream for the VAD later.
"""

from __future__ import annotations

import av
import numpy as np
from av.audio.frame import AudioFrame
from av.audio.layout import AudioLayout

from service.audio.chunk import Samples
from service.config import MODEL_SAMPLE_RATE


def empty(channels: int) -> Samples:
    return np.zeros((channels, 0), np.float32)


class ArrayResampler:
    """Planar float32 ``(channels, n)`` at ``rate`` in, planar float32 at 16 kHz out.

    One mono resampler per channel, so any channel count works (FFmpeg's channel layouts stop
    at a few dozen named ones). No resampler at all when the rate is already 16 kHz. Output
    does not depend on how the input was split: FFmpeg's resampler is stateful and exact.
    """

    def __init__(self, channels: int, rate: int) -> None:
        self.channels = channels
        self.rate = rate
        self._resamplers = (
            []
            if rate == MODEL_SAMPLE_RATE
            else [
                av.AudioResampler(format="flt", layout="mono", rate=MODEL_SAMPLE_RATE)
                for _ in range(channels)
            ]
        )
        # Per-channel output not yet returned: channels are resampled independently and are
        # only handed out in equal lengths (in practice they always are equal already).
        self._pending: list[list[Samples]] = [[] for _ in range(channels)]

    def process(self, samples: Samples) -> Samples:
        if not self._resamplers:
            return samples
        if samples.shape[1] == 0:
            return empty(self.channels)
        for ch, resampler in enumerate(self._resamplers):
            frame = AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[ch : ch + 1]), format="flt", layout="mono"
            )
            frame.sample_rate = self.rate
            self._collect(ch, resampler.resample(frame))
        return self._take()

    def flush(self) -> Samples:
        """The resampler's delayed tail; call once at the end of the input."""
        if not self._resamplers:
            return empty(self.channels)
        for ch, resampler in enumerate(self._resamplers):
            self._collect(ch, resampler.resample(None))
        return self._take(final=True)

    def _collect(self, ch: int, frames: list[AudioFrame]) -> None:
        self._pending[ch].extend(np.asarray(f.to_ndarray(), np.float32).reshape(-1) for f in frames)

    def _take(self, final: bool = False) -> Samples:
        columns = [np.concatenate(p) if p else np.zeros(0, np.float32) for p in self._pending]
        n = max(len(c) for c in columns) if final else min(len(c) for c in columns)
        out = np.zeros((self.channels, n), np.float32)
        for ch, column in enumerate(columns):
            out[ch, : min(n, len(column))] = column[:n]
            self._pending[ch] = [column[n:]] if len(column) > n else []
        return out


class FrameResampler:
    """Decoded frames of any sample format and rate to planar float32 at 16 kHz.

    The channel count is fixed by the first frame; should a stream change its layout or rate
    mid-way (chained Ogg, some AAC streams), the old resampler is flushed and a new one maps the
    new input onto the original layout, so downstream sees one consistent shape.
    """

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._input: tuple[str, str, int] | None = None
        self._layout: AudioLayout | None = None
        self.channels = 0

    def process(self, frame: AudioFrame) -> list[Samples]:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        out: list[Samples] = []
        if self._resampler is None or key != self._input:
            if self._resampler is not None:
                out.extend(self._drain(None))
            if self._layout is None:
                self._layout = frame.layout
                self.channels = frame.layout.nb_channels
            self._resampler = av.AudioResampler(
                format="fltp", layout=self._layout, rate=MODEL_SAMPLE_RATE
            )
            self._input = key
        # Timestamps do not matter here (output is contiguous by construction) and odd ones
        # from a damaged stream could make the resampler pad or drop audio.
        frame.pts = None
        out.extend(self._drain(frame))
        return out

    def flush(self) -> list[Samples]:
        if self._resampler is None:
            return []
        out = self._drain(None)
        self._resampler = None
        self._input = None
        return out

    def _drain(self, frame: AudioFrame | None) -> list[Samples]:
        assert self._resampler is not None
        return [
            np.asarray(f.to_ndarray(), np.float32).reshape(self.channels, -1)
            for f in self._resampler.resample(frame)
        ]
