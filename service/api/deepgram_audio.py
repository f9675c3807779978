"""Deepgram's raw encodings to what the decoder reads (16-bit or float PCM), frame by frame.

``linear16`` passes through untouched; ``linear32`` (32-bit integer) becomes float PCM (exact
to 24 bits); G.711 ``mulaw`` and ``alaw`` become 16-bit PCM by table (the standard expansions).
Several channels without ``multichannel`` are averaged to one, as Deepgram transcribes such
audio as one stream. Numpy on whole frames: microseconds for a live frame.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.api.deepgram_params import RawAudio
from service.errors import ErrorCode, StreamerError


def _mulaw_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> npt.NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = (a & 0x0F) << 4
    magnitude = np.where(
        exponent == 0, mantissa + 8, (mantissa + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


MULAW = _mulaw_table()
ALAW = _alaw_table()


class RawConverter:
    """Converts each binary frame the client sends. Frames must hold whole sample frames
    (every channel's sample), as on ``/v1/ws``."""

    def __init__(self, raw: RawAudio) -> None:
        self.raw = raw

    def convert(self, data: bytes) -> bytes:
        raw = self.raw
        if len(data) % raw.frame_bytes:
            raise StreamerError(
                ErrorCode.PARTIAL_SAMPLE,
                f"a binary frame of {len(data)} bytes is not a whole number of "
                f"{raw.frame_bytes}-byte sample frames ({raw.channels} channel(s) of "
                f"{raw.encoding}); the frame was dropped",
            )
        if raw.encoding == "linear16" and not raw.mixdown:
            return data
        if raw.encoding == "linear32":
            ints = np.frombuffer(data, dtype="<i4")
            floats = (ints.astype(np.float64) / 2**31).astype(np.float32)
            if raw.mixdown:
                floats = floats.reshape(-1, raw.channels).mean(axis=1, dtype=np.float32)
            return floats.astype("<f4").tobytes()
        if raw.encoding == "linear16":
            pcm = np.frombuffer(data, dtype="<i2")
        else:
            table = MULAW if raw.encoding == "mulaw" else ALAW
            pcm = table[np.frombuffer(data, dtype=np.uint8)]
        if raw.mixdown:
            mean = pcm.reshape(-1, raw.channels).mean(axis=1)
            pcm = np.round(mean).astype(np.int16)
        return pcm.astype("<i2").tobytes()
