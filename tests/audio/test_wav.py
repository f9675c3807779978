"""WAV variants, parsed by us, checked against the sample values written into them."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service.errors import ErrorCode

RNG = np.random.default_rng(11)
# Mono test signal in [-0.9, 0.9]; each variant stores it in its own sample format.
SIGNAL = (RNG.uniform(-0.9, 0.9, 1600)).astype(np.float64)


def encode(signal: np.ndarray, width: int, kind: str) -> tuple[bytes, np.ndarray]:
    """Signal as little-endian PCM, and the float32 values a correct decoder must return."""
    if kind == "float":
        values = signal.astype("<f4" if width == 4 else "<f8")
        return values.tobytes(), values.astype(np.float32)
    if width == 1:
        q = np.round(signal * 127).astype(np.int16) + 128
        return q.astype(np.uint8).tobytes(), ((q - 128) / 128).astype(np.float32)
    bits = 8 * width
    q = np.round(signal * (2 ** (bits - 1) - 1)).astype(np.int64)
    raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in q)
    return raw, (q / 2 ** (bits - 1)).astype(np.float32)


def interleave(channels: list[bytes], width: int) -> bytes:
    frames = [[c[i : i + width] for i in range(0, len(c), width)] for c in channels]
    return b"".join(b"".join(parts) for parts in zip(*frames, strict=True))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("tag", "width", "kind", "codec"),
    [
        (1, 1, "int", "pcm_u8"),
        (1, 2, "int", "pcm_s16le"),
        (1, 3, "int", "pcm_s24le"),
        (1, 4, "int", "pcm_s32le"),
        (3, 4, "float", "pcm_f32le"),
        (3, 8, "float", "pcm_f64le"),
    ],
)
@pytest.mark.parametrize("extensible", [False, True])
async def test_sample_formats(tag, width, kind, codec, extensible, wav, decode_bytes) -> None:
    pcm, expected = encode(SIGNAL, width, kind)
    upload = wav.make(wav.fmt(tag, 1, 16000, width, extensible=extensible), pcm)
    out = await decode_bytes(upload, piece=997)
    assert out.error is None
    assert out.result is not None
    assert (out.result.container, out.result.codec, out.result.channels) == ("wav", codec, 1)
    assert np.array_equal(out.samples[0], expected)


@pytest.mark.anyio
async def test_channels_are_deinterleaved(wav, decode_bytes) -> None:
    signals = [SIGNAL, -SIGNAL, SIGNAL * 0.5]
    encoded = [encode(s, 3, "int") for s in signals]
    pcm = interleave([e[0] for e in encoded], 3)
    out = await decode_bytes(wav.make(wav.fmt(1, 3, 16000, 3), pcm), piece=1000)
    assert out.result is not None and out.result.channels == 3
    for ch, (_, expected) in enumerate(encoded):
        assert np.array_equal(out.samples[ch], expected)


@pytest.mark.anyio
@pytest.mark.parametrize("data_size", [0, 0xFFFFFFFF])
async def test_unknown_data_size_reads_to_the_end(data_size, wav, decode_bytes) -> None:
    pcm, expected = encode(SIGNAL, 2, "int")
    out = await decode_bytes(wav.make(wav.fmt(1, 1, 16000, 2), pcm, data_size=data_size))
    assert out.error is None
    assert np.array_equal(out.samples[0], expected)


@pytest.mark.anyio
async def test_other_chunks_are_skipped(wav, decode_bytes) -> None:
    pcm, expected = encode(SIGNAL, 2, "int")
    upload = wav.make(
        wav.fmt(1, 1, 16000, 2),
        pcm,
        before_data=wav.chunk(b"LIST", b"INFOodd-sized!")
        + wav.chunk(b"fact", b"\x01" * 5)
        + wav.chunk(b"JUNK", bytes(3001)),
        after_data=wav.chunk(b"LIST", b"trailing metadata, not audio"),
    )
    out = await decode_bytes(upload, piece=7)
    assert out.error is None
    assert np.array_equal(out.samples[0], expected)
    assert out.result is not None and out.result.bytes_in == len(upload)


@pytest.mark.anyio
async def test_chunks_before_fmt_are_skipped(wav, decode_bytes) -> None:
    pcm, expected = encode(SIGNAL, 2, "int")
    fmt = wav.chunk(b"bext", bytes(601)) + wav.fmt(1, 1, 16000, 2)
    out = await decode_bytes(wav.make(fmt, pcm))
    assert np.array_equal(out.samples[0], expected)


@pytest.mark.anyio
@pytest.mark.parametrize("riff_id", [b"RF64", b"BW64"])
async def test_rf64(riff_id, wav, decode_bytes) -> None:
    pcm, expected = encode(SIGNAL, 2, "int")
    ds64 = wav.chunk(b"ds64", struct.pack("<QQQI", 0, len(pcm), len(pcm) // 2, 0))
    upload = wav.make(
        ds64 + wav.fmt(1, 1, 16000, 2),
        pcm,
        data_size=0xFFFFFFFF,
        riff_id=riff_id,
        after_data=wav.chunk(b"LIST", b"x" * 40),
    )
    out = await decode_bytes(upload)
    assert out.error is None
    # The real size comes from ds64, so the trailing chunk is not mistaken for audio.
    assert np.array_equal(out.samples[0], expected)


@pytest.mark.anyio
async def test_resampled_wav(wav, decode_bytes) -> None:
    tone = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100) * 0.5
    pcm, _ = encode(tone, 2, "int")
    out = await decode_bytes(wav.make(wav.fmt(1, 1, 44100, 2), pcm), piece=4096)
    assert out.samples.shape == (1, 16000)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 0.5
    # Away from the edges (filter start-up), the resampled tone is the tone.
    assert np.abs(out.samples[0, 200:-200] - expected[200:-200]).max() < 0.01


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("codec", "tolerance", "padding"),
    # ADPCM codes whole blocks, so the encoder pads the end up to a block.
    [("pcm_mulaw", 0.03, 0), ("pcm_alaw", 0.03, 0), ("adpcm_ima_wav", 0.1, 2 * 1017)],
)
async def test_codecs_numpy_cannot_do_go_to_ffmpeg(
    codec, tolerance, padding, encode, decode_bytes
) -> None:
    tone = np.sin(2 * np.pi * 300 * np.arange(8000) / 8000) * 0.5
    upload = encode(tone, 8000, "wav", codec)
    out = await decode_bytes(upload, piece=500)
    assert out.error is None
    assert out.result is not None
    assert (out.result.container, out.result.codec) == ("wav", codec)
    assert 16000 <= out.frames <= 16000 + padding
    expected = np.sin(2 * np.pi * 300 * np.arange(16000) / 16000) * 0.5
    n = min(out.frames, 16000) - 400
    assert np.abs(out.samples[0, 400:n] - expected[400:n]).max() < tolerance


@pytest.mark.anyio
async def test_pcm_wav_matches_ffmpeg(data, decode_bytes) -> None:
    """Our parser and FFmpeg's agree on a real file."""
    import io

    import av

    raw = data("stereo_two_speakers.wav")
    with av.open(io.BytesIO(raw)) as f:
        ffmpeg = (
            np.concatenate(
                [fr.to_ndarray().reshape(-1, 2).T for fr in f.decode(audio=0)], axis=1
            ).astype(np.float32)
            / 32768.0
        )
    out = await decode_bytes(raw)
    assert np.array_equal(out.samples, ffmpeg)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("upload", "code"),
    [
        (b"RIFF\x00\x00\x00\x00WAVEdata\x10\x00\x00\x00" + bytes(16), ErrorCode.DECODE_FAILED),
        (b"RIFF\x00\x00\x00\x00WAVEfmt \x04\x00\x00\x00abcd", ErrorCode.DECODE_FAILED),
        (b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes(4), ErrorCode.DECODE_FAILED),
        (b"RIFF\x00\x00\x00\x00WAVEfmt \xff\xff\xff\x7f" + bytes(99), ErrorCode.DECODE_FAILED),
    ],
    ids=["data-before-fmt", "short-fmt", "cut-in-fmt", "huge-fmt"],
)
async def test_broken_headers(upload, code, decode_bytes) -> None:
    out = await decode_bytes(upload)
    assert out.error is not None
    assert out.error.code is code
    assert out.error.message.startswith("invalid WAV header")


@pytest.mark.anyio
async def test_too_many_channels(wav, decode_bytes) -> None:
    out = await decode_bytes(wav.make(wav.fmt(1, 40, 16000, 2), bytes(800)))
    assert out.error is not None
    assert out.error.code is ErrorCode.UNSUPPORTED_FORMAT
