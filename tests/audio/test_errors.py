"""Every failure has its stable code, a human message, and loses no audio decoded before it."""

from __future__ import annotations

import json
import random

import anyio
import numpy as np
import pytest

from service.audio.chunk import AudioChunk
from service.audio.decoder import decode
from service.config import PcmFormat
from service.errors import ErrorCode

S16_MONO = PcmFormat(1, 16000, 16, False)


def junk(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", [None, S16_MONO])
@pytest.mark.parametrize("pieces", [[], [b""], [b"", b"", b""]])
async def test_no_bytes_is_empty_audio(fmt, pieces, decode_chunks) -> None:
    out = await decode_chunks(pieces, fmt)
    assert out.error is not None
    assert out.error.code is ErrorCode.EMPTY_AUDIO
    assert out.chunks == []


TEXT = (
    "Streaming audio in, observations out. This is not audio but prose, the kind of thing a "
    "client sends by mistake when it posts the wrong file. "
) * 80


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "upload"),
    [
        ("random", junk(100_000)),
        ("short random", junk(100)),
        ("one byte", b"\x00"),
        ("zeros", bytes(50_000)),
        ("text", TEXT.encode()),
        # FFmpeg's probe takes this for AMR-NB; nothing decodes, so it is still no audio.
        ("json", json.dumps({"samples": [1, 2, 3] * 3000}).encode()),
        ("html", b"<!DOCTYPE html><html><body>" + b"<p>hello</p>" * 1000 + b"</body></html>"),
        ("riff but not wave", b"RIFF\x10\x00\x00\x00WEBPVP8 " + junk(5000)),
    ],
)
async def test_not_audio_is_unsupported(name, upload, decode_bytes) -> None:
    out = await decode_bytes(upload)
    assert out.error is not None, name
    assert out.error.code is ErrorCode.UNSUPPORTED_FORMAT, out.error
    assert "Traceback" not in out.error.message
    assert out.chunks == []


@pytest.mark.anyio
async def test_unidentified_message_says_how_far_it_looked(decode_bytes) -> None:
    out = await decode_bytes(junk(100_000))
    assert out.error is not None
    # FFmpeg's format probe is capped, so junk is rejected after 4 KiB, not after 1 MiB.
    assert "could not identify an audio container in the first 4096 bytes" in out.error.message
    assert out.error.status == 415


@pytest.mark.anyio
async def test_video_without_audio(data, decode_bytes) -> None:
    out = await decode_bytes(data("video_only.mp4"))
    assert out.error is not None
    assert out.error.code is ErrorCode.NO_AUDIO_STREAM
    assert "mp4" in out.error.message and "video" in out.error.message


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", [S16_MONO, PcmFormat(2, 8000, 16, False)])
async def test_raw_partial_frame_sends_whole_frames_first(fmt, decode_bytes) -> None:
    frames = 1000
    pcm = (np.arange(frames * fmt.channels, dtype=np.int16) % 200 * 100).astype("<i2")
    out = await decode_bytes(pcm.tobytes() + b"\x01", fmt, piece=333)
    assert out.error is not None
    assert out.error.code is ErrorCode.PARTIAL_SAMPLE
    assert "1 bytes into a sample frame" in out.error.message
    assert out.frames == frames * 16000 // fmt.sample_rate
    if fmt.sample_rate == 16000:
        assert np.array_equal(out.samples[0], pcm.astype(np.float32) / 32768.0)


@pytest.mark.anyio
async def test_wav_cut_mid_frame_is_partial_sample(wav, decode_bytes) -> None:
    pcm = np.arange(-500, 500, dtype="<i2").tobytes()
    upload = wav.make(wav.fmt(1, 1, 16000, 2), pcm, data_size=0xFFFFFFFF)
    out = await decode_bytes(upload[:-1])
    assert out.error is not None
    assert out.error.code is ErrorCode.PARTIAL_SAMPLE
    assert out.frames == 999


@pytest.mark.anyio
async def test_wav_header_cut_short_is_decode_failed(data, decode_bytes) -> None:
    out = await decode_bytes(data("speech.wav")[:30])
    assert out.error is not None
    assert out.error.code is ErrorCode.DECODE_FAILED
    assert "WAV" in out.error.message


@pytest.mark.anyio
async def test_wav_with_absurd_rate_is_unsupported(wav, decode_bytes) -> None:
    out = await decode_bytes(wav.make(wav.fmt(1, 1, 5, 2), bytes(100)))
    assert out.error is not None
    assert out.error.code is ErrorCode.UNSUPPORTED_FORMAT


@pytest.mark.anyio
async def test_ogg_magic_then_junk_is_decode_failed(decode_bytes) -> None:
    out = await decode_bytes(b"OggS" + junk(20_000))
    assert out.error is not None
    assert out.error.code is ErrorCode.DECODE_FAILED
    assert "ogg" in out.error.message


def ogg_page_offsets(raw: bytes) -> list[int]:
    offsets, at = [], raw.find(b"OggS")
    while at != -1:
        offsets.append(at)
        at = raw.find(b"OggS", at + 1)
    return offsets


@pytest.mark.anyio
async def test_truncated_at_a_page_boundary_just_ends(data, decode_bytes) -> None:
    raw = data("speech.ogg")
    cut = ogg_page_offsets(raw)[5]
    out = await decode_bytes(raw[:cut])
    assert out.error is None
    assert 0 < out.frames < 120_345


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["speech.m4a", "speech.flac"])
async def test_truncated_mid_packet_decodes_the_rest_then_fails(name, data, decode_bytes) -> None:
    raw = data(name)
    full = await decode_bytes(raw)
    out = await decode_bytes(raw[: len(raw) // 2 + 7])
    assert out.error is not None
    assert out.error.code is ErrorCode.DECODE_FAILED
    assert "Traceback" not in out.error.message
    # Roughly the first half came out before the error, identical to the full decode.
    assert 0.3 * full.frames < out.frames < 0.7 * full.frames
    n = out.frames - 2048  # the resampler's tail is flushed early; compare before it
    assert np.array_equal(out.samples[:, :n], full.samples[:, :n])


@pytest.mark.anyio
async def test_damaged_middle_keeps_audio_after_it(data, decode_bytes) -> None:
    raw = bytearray(data("speech.m4a"))
    rng = random.Random(3)
    for i in range(len(raw) // 3, len(raw) // 3 + 2000):
        raw[i] = rng.randrange(256)
    out = await decode_bytes(bytes(raw))
    assert out.error is not None
    assert out.error.code is ErrorCode.DECODE_FAILED
    assert "failed to decode and were skipped" in out.error.message
    # Damaged packets are skipped, not the rest of the stream.
    assert out.frames > 0.7 * 120_345


class UploadBroke(Exception):
    pass


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("speech.ogg", None),
        ("speech.wav", None),
        ("speech_s16le_8k_stereo.raw", PcmFormat(2, 8000, 16, False)),
    ],
)
async def test_source_error_propagates_after_the_audio_so_far(name, fmt, data) -> None:
    raw = data(name)
    half = len(raw) // 2

    async def source():
        for i in range(0, half, 1000):
            yield raw[i : min(i + 1000, half)]
        raise UploadBroke("client went away")

    send, receive = anyio.create_memory_object_stream[AudioChunk](1000)
    with anyio.fail_after(10), pytest.raises(UploadBroke):
        await decode(source(), fmt, send)
    chunks = [c async for c in receive]  # the stream was closed: iteration ends
    frames = sum(c.frames for c in chunks)
    assert 0.3 * 120_345 < frames < 0.7 * 120_345


@pytest.mark.anyio
async def test_send_is_closed_on_error(decode_chunks) -> None:
    send, receive = anyio.create_memory_object_stream[AudioChunk](10)

    async def nothing():
        return
        yield b""

    with pytest.raises(Exception, match="no bytes"):
        await decode(nothing(), None, send)
    with anyio.fail_after(1), pytest.raises(anyio.EndOfStream):
        await receive.receive()
