"""Where the upload happens to be split never changes the decoded audio."""

from __future__ import annotations

import itertools

import anyio
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import PcmFormat

# Derandomized and without an example database: the same examples on every run and machine.
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({min(p, len(data)) for p in points} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    # Empty pieces are legal too (a transport may deliver them); put some in.
    return [b"", *pieces[:1], b"", *pieces[1:]] if pieces else [b""]


def assert_same_audio(decode_chunks, data: bytes, fmt: PcmFormat | None, points: list[int]):
    whole = anyio.run(decode_chunks, [data], fmt)
    pieces = anyio.run(decode_chunks, cut(data, points), fmt)
    assert whole.error is None and pieces.error is None
    pieces.assert_contiguous()
    assert pieces.result == whole.result
    assert np.array_equal(pieces.samples, whole.samples)


# Short uploads keep each example fast; odd lengths make frames straddle the cuts.
def _pcm(n_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


RAW_S16_8K_STEREO = _pcm(4 * 1500, 1)
RAW_F32_48K = (np.random.default_rng(2).standard_normal(4000) * 0.3).astype("<f4").tobytes()

cut_points = st.lists(st.integers(0, 7000), max_size=30)


@SETTINGS
@given(points=cut_points)
def test_raw_s16_stereo_8k(points, decode_chunks) -> None:
    assert_same_audio(decode_chunks, RAW_S16_8K_STEREO, PcmFormat(2, 8000, 16, False), points)


@SETTINGS
@given(points=cut_points)
def test_raw_f32_48k(points, decode_chunks) -> None:
    assert_same_audio(decode_chunks, RAW_F32_48K, PcmFormat(1, 48000, 32, True), points)


@SETTINGS
@given(
    points=cut_points,
    layout=st.sampled_from(
        [(1, 1, 16000), (2, 1, 22050), (3, 3, 44100), (1, 2, 16000), (2, 4, 48000), (1, 3, 8000)]
    ),
)
def test_wav(points, layout, decode_chunks, wav) -> None:
    """WAV in every sample width (8-bit unsigned, 16/24/32-bit int, 32-bit float via tag 3)."""
    channels, width, rate = layout
    pcm = _pcm(channels * width * 700 + 1 - 1, channels * width)
    tag = 1
    if width == 4 and channels == 2:
        tag = 3
        pcm = (np.random.default_rng(3).standard_normal(1400) * 0.3).astype("<f4").tobytes()
    header = wav.fmt(tag, channels, rate, width)
    upload = wav.make(header, pcm, before_data=wav.chunk(b"LIST", b"odd"))
    assert_same_audio(decode_chunks, upload, None, points)
