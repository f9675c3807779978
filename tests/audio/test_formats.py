"""Every test file decodes to the right length, channel count and content."""

from __future__ import annotations

import numpy as np
import pytest

from service.config import PcmFormat

SPEECH = 120_345  # samples in speech.wav (16 kHz)
EXCERPT = (5_600, 21_600)  # [start, length) of speech.wav held by the 44.1/48 kHz files
TOLERANCE = 800  # 50 ms at 16 kHz


def lag_and_correlation(reference: np.ndarray, x: np.ndarray) -> tuple[int, float]:
    """Delay of ``x`` against ``reference`` in samples, and their normalised correlation."""
    n = 1 << int(np.ceil(np.log2(len(reference) + len(x))))
    xc = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(reference, n)), n)
    k = int(np.argmax(xc))
    lag = k if k < n // 2 else k - n
    norm = float(np.sqrt(np.dot(reference, reference) * np.dot(x, x)))
    return lag, float(xc.max()) / norm


# name, declared format, channels, container, codec, max |lag| in samples
CASES = [
    ("speech.wav", None, 1, "wav", "pcm_s16le", 0),
    ("speech.flac", None, 1, "flac", "flac", 0),
    ("speech.mp3", None, 1, "mp3", "mp3", 2),
    ("speech.ogg", None, 1, "ogg", "opus", 2),
    ("speech.webm", None, 1, "webm", "opus", 80),
    ("speech.m4a", None, 1, "mp4", "aac", 2),
    ("speech_moov_end.m4a", None, 1, "mp4", "aac", 2),
    ("speech_s16le_8k_stereo.raw", PcmFormat(2, 8000, 16, False), 2, "raw", "pcm_s16le", 1),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "fmt", "channels", "container", "codec", "max_lag"), CASES)
async def test_speech_decodes_like_the_wav(
    name, fmt, channels, container, codec, max_lag, data, decode_bytes, reference
) -> None:
    out = await decode_bytes(data(name), fmt)
    assert out.error is None
    assert out.result is not None
    assert (out.result.channels, out.result.container, out.result.codec) == (
        channels,
        container,
        codec,
    )
    assert out.result.bytes_in == len(data(name))
    assert out.result.samples_out == out.frames
    out.assert_contiguous()
    samples = out.samples
    assert samples.shape[0] == channels
    assert abs(samples.shape[1] - SPEECH) <= TOLERANCE
    assert np.abs(samples).max() <= 1.0
    lag, correlation = lag_and_correlation(reference, samples[0])
    # Lossy codecs start where the WAV starts once FFmpeg drops the encoder's priming samples
    # (MP3: LAME/Info header, AAC: MP4 edit list, Opus: pre-skip); WebM keeps ~4 ms of it
    # because Matroska timestamps are whole milliseconds.
    assert abs(lag) <= max_lag, f"{name}: {lag} samples ({lag / 16:.1f} ms) late"
    assert correlation > 0.95
    print(f"{name}: {samples.shape[1] - SPEECH:+d} samples, lag {lag}, r={correlation:.3f}")


@pytest.mark.anyio
async def test_raw_stereo_second_channel_is_silent(data, decode_bytes) -> None:
    out = await decode_bytes(data("speech_s16le_8k_stereo.raw"), PcmFormat(2, 8000, 16, False))
    assert np.abs(out.samples[1]).max() == 0.0
    assert np.abs(out.samples[0]).max() > 0.1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "fmt", "channels"),
    [
        ("speech_44k_stereo.wav", None, 2),
        ("speech_f32le_48k.raw", PcmFormat(1, 48000, 32, True), 1),
    ],
)
async def test_high_rate_excerpts_resample_to_16k(
    name, fmt, channels, data, decode_bytes, reference
) -> None:
    out = await decode_bytes(data(name), fmt)
    assert out.error is None
    assert out.result is not None
    assert out.result.channels == channels
    start, length = EXCERPT
    samples = out.samples
    assert samples.shape == (channels, length)
    expected = reference[start : start + length]
    for ch in range(channels):
        lag, correlation = lag_and_correlation(expected, samples[ch])
        assert lag == 0
        assert correlation > 0.999
        # Down- and re-sampling only loses what lies above 8 kHz: the excerpt has almost none.
        assert np.abs(samples[ch] - expected).max() < 0.01


@pytest.mark.anyio
async def test_noise_and_silence(data, decode_bytes) -> None:
    noise = await decode_bytes(data("noise.wav"))
    silence = await decode_bytes(data("silence.wav"))
    assert noise.samples.shape == silence.samples.shape == (1, 48_000)
    assert 0.001 < float(np.sqrt(np.mean(noise.samples**2))) < 0.05
    assert not silence.samples.any()


@pytest.mark.anyio
async def test_two_speakers_take_turns(data, decode_bytes) -> None:
    out = await decode_bytes(data("stereo_two_speakers.wav"))
    assert out.result is not None
    assert out.result.channels == 2
    samples = out.samples
    assert samples.shape == (2, 70_400)

    def energy(ch: int, t0: float, t1: float) -> float:
        return float(np.abs(samples[ch, int(t0 * 16000) : int(t1 * 16000)]).max(initial=0.0))

    assert energy(0, 0.5, 1.5) > 0.1 and energy(1, 0.0, 2.9) == 0.0
    assert energy(1, 3.0, 4.0) > 0.1 and energy(0, 1.7, 4.4) == 0.0
