"""Interleaved little-endian PCM bytes to planar float32, chunk by chunk, with numpy.

Used for declared raw PCM and for the data chunk of WAV files. Bytes arrive split at arbitrary
points, so a partial sample frame is carried over to the next chunk; the output never depends
on where the input was split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.audio.chunk import Samples

SampleKind = Literal["uint", "int", "float"]


@dataclass(frozen=True, slots=True)
class PcmLayout:
    """How one sample frame is laid out: ``channels`` samples of ``width`` bytes each."""

    channels: int
    width: int  # bytes per sample: 1 (uint), 2/3/4 (int), 4/8 (float)
    kind: SampleKind

    def __post_init__(self) -> None:
        allowed = {"uint": (1,), "int": (2, 3, 4), "float": (4, 8)}[self.kind]
        if self.width not in allowed or self.channels < 1:
            raise ValueError(f"unsupported PCM layout: {self}")

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.width

    @property
    def codec(self) -> str:
        """FFmpeg's name for this sample format, e.g. ``pcm_s16le``."""
        if self.kind == "uint":
            return "pcm_u8"
        return f"pcm_{'f' if self.kind == 'float' else 's'}{self.width * 8}le"


def to_float32(data: bytes | bytearray | memoryview, layout: PcmLayout) -> Samples:
    """Whole sample frames of interleaved PCM to a ``(channels, n)`` float32 array in [-1, 1]."""
    n = len(data) // layout.frame_bytes
    if n * layout.frame_bytes != len(data):
        raise ValueError("data is not a whole number of sample frames")
    if layout.kind == "uint":
        # 8-bit WAV is unsigned with 128 as zero.
        flat = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif layout.kind == "float":
        raw = np.frombuffer(data, "<f4" if layout.width == 4 else "<f8")
        # Float input can hold anything; keep the promise of finite samples in [-1, 1].
        flat = np.clip(np.nan_to_num(raw.astype(np.float32), posinf=1.0, neginf=-1.0), -1.0, 1.0)
    elif layout.width == 3:
        # Widen each 24-bit sample into the top three bytes of an int32: sign comes for free.
        padded = np.zeros((n * layout.channels, 4), np.uint8)
        padded[:, 1:] = np.frombuffer(data, np.uint8).reshape(-1, 3)
        flat = padded.view("<i4").reshape(-1).astype(np.float32) / np.float32(2**31)
    else:
        ints = np.frombuffer(data, "<i2" if layout.width == 2 else "<i4")
        flat = ints.astype(np.float32)
        flat *= np.float32(1 / 2 ** (8 * layout.width - 1))  # in place: one array, not two
    if layout.channels == 1:
        return flat.reshape(1, n)  # already one contiguous row
    # Deinterleave: frames are rows, channels columns; the consumer wants one row per channel.
    return np.ascontiguousarray(flat.reshape(n, layout.channels).T, dtype=np.float32)


class PcmDecoder:
    """Feeds arbitrary byte chunks, yields whole frames; keeps a partial frame for the next."""

    def __init__(self, layout: PcmLayout) -> None:
        self.layout = layout
        self._carry = b""

    @property
    def remainder(self) -> int:
        """Bytes of an incomplete sample frame held back so far."""
        return len(self._carry)

    def feed(self, data: bytes) -> Samples:
        if self._carry:
            data = self._carry + data
        whole = len(data) - len(data) % self.layout.frame_bytes
        self._carry = data[whole:]
        return to_float32(memoryview(data)[:whole], self.layout)
