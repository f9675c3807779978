"""PCM conversion and resampling units."""

from __future__ import annotations

import numpy as np
import pytest

from service.audio.pcm import PcmDecoder, PcmLayout, to_float32
from service.audio.resample import ArrayResampler


def test_s16_scale_and_deinterleave() -> None:
    pcm = np.array([-32768, 32767, 0, 16384, 1, -1], "<i2").tobytes()
    out = to_float32(pcm, PcmLayout(2, 2, "int"))
    assert out.dtype == np.float32 and out.shape == (2, 3)
    assert out.tolist() == [[-1.0, 0.0, 1 / 32768], [32767 / 32768, 0.5, -1 / 32768]]


def test_s24_sign_extension() -> None:
    pcm = b"\x00\x00\x80" + b"\xff\xff\x7f" + b"\xff\xff\xff" + b"\x01\x00\x00"
    out = to_float32(pcm, PcmLayout(1, 3, "int"))
    assert out[0].tolist() == [-1.0, (2**23 - 1) / 2**23, -1 / 2**23, 1 / 2**23]


def test_u8_is_offset_binary() -> None:
    out = to_float32(bytes([0, 128, 255]), PcmLayout(1, 1, "uint"))
    assert out[0].tolist() == [-1.0, 0.0, 127 / 128]


def test_float_is_made_finite_and_bounded() -> None:
    pcm = np.array([0.5, 2.0, -np.inf, np.nan], "<f4").tobytes()
    out = to_float32(pcm, PcmLayout(1, 4, "float"))
    assert out[0].tolist() == [0.5, 1.0, -1.0, 0.0]


def test_decoder_carries_partial_frames() -> None:
    pcm = np.arange(-300, 300, dtype="<i2").tobytes()  # 300 stereo frames
    decoder = PcmDecoder(PcmLayout(2, 2, "int"))
    parts = [decoder.feed(pcm[i : i + 7]) for i in range(0, len(pcm), 7)]
    assert decoder.remainder == 0
    joined = np.concatenate(parts, axis=1)
    assert np.array_equal(joined, to_float32(pcm, PcmLayout(2, 2, "int")))
    decoder.feed(b"\x01\x02\x03")
    assert decoder.remainder == 3


def test_invalid_layouts() -> None:
    with pytest.raises(ValueError):
        PcmLayout(1, 3, "float")
    with pytest.raises(ValueError):
        PcmLayout(0, 2, "int")


def test_no_resampling_at_16k() -> None:
    x = np.ones((2, 100), np.float32)
    r = ArrayResampler(2, 16000)
    assert r.process(x) is x
    assert r.flush().shape == (2, 0)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000])
def test_resampled_length(rate) -> None:
    r = ArrayResampler(3, rate)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (3, rate)).astype(np.float32)
    out = np.concatenate(
        [r.process(x[:, i : i + 999]) for i in range(0, rate, 999)] + [r.flush()], axis=1
    )
    assert out.shape == (3, 16000)
    assert out.dtype == np.float32
