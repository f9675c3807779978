"""Audio comes out while the upload is still arriving, not at its end.

Each test feeds bytes through a memory stream and keeps the upload open; if the decoder needed
more than it was given, the bounded wait fails instead of hanging.
"""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest

from service.audio.chunk import AudioChunk
from service.audio.container import BATCH_SAMPLES
from service.audio.decoder import DecodeResult, decode
from service.config import PcmFormat


class Feeder:
    """An upload under the test's control: ``push`` bytes, ``close`` to end it."""

    def __init__(self) -> None:
        self.send, self._receive = anyio.create_memory_object_stream[bytes](100)

    async def source(self):
        async with self._receive:
            async for data in self._receive:
                yield data

    async def push(self, data: bytes, piece: int = 64) -> None:
        for i in range(0, len(data), piece):
            await self.send.send(data[i : i + piece])


# The first audio must come out after at most this many bytes (measured: wav 58, raw 146,
# webm 465, m4a 1259, ogg 1755, mp3 2060, flac 11721: its header carries 8 KiB of padding).
FIRST_AUDIO_WITHIN = [
    ("speech.wav", None, 256),
    ("speech_44k_stereo.wav", None, 1024),
    ("speech_s16le_8k_stereo.raw", PcmFormat(2, 8000, 16, False), 256),
    ("speech_f32le_48k.raw", PcmFormat(1, 48000, 32, True), 1024),
    ("speech.webm", None, 1024),
    ("speech.m4a", None, 2048),
    ("speech.ogg", None, 2048),
    ("speech.mp3", None, 3072),
    ("speech.flac", None, 16384),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "fmt", "within"), FIRST_AUDIO_WITHIN)
async def test_first_audio_before_the_upload_ends(name, fmt, within, data) -> None:
    raw = data(name)
    assert within < len(raw) // 4
    feeder = Feeder()
    send, receive = anyio.create_memory_object_stream[AudioChunk](100)
    results: list[DecodeResult] = []

    async def run() -> None:
        results.append(await decode(feeder.source(), fmt, send))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(run)
            sent_at = time.monotonic()
            await feeder.push(raw[:within])
            with anyio.fail_after(5):
                first = await receive.receive()
            assert first.start == 0 and first.frames > 0
            assert sent_at <= first.received_at <= time.monotonic()
            await feeder.push(raw[within:], piece=4096)
            await feeder.send.aclose()
            rest = [chunk async for chunk in receive]
    assert results[0].samples_out == first.frames + sum(c.frames for c in rest)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("rate", "channels", "header"), [(16000, 1, True), (16000, 2, False), (8000, 1, False)]
)
async def test_pcm_emits_every_whole_frame_at_once(rate, channels, header, wav) -> None:
    """Raw PCM and WAV hold back only a partial frame (and the resampler's short delay)."""
    rng = np.random.default_rng(7)
    pcm = (rng.standard_normal(rate * channels) * 3000).astype("<i2").tobytes()
    upload = wav.make(wav.fmt(1, channels, rate, 2), pcm) if header else pcm
    fmt = None if header else PcmFormat(channels, rate, 16, False)
    feeder = Feeder()
    send, receive = anyio.create_memory_object_stream[AudioChunk](100)
    frame_bytes = 2 * channels
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(decode, feeder.source(), fmt, send)
            await feeder.send.send(upload[: len(upload) - len(pcm)])  # the header, if any
            fed = 0
            out = 0
            for size in (1, 3, 700, 2, 1001, 5000, 77, 4096):
                await feeder.send.send(pcm[fed : fed + size])
                fed += size
                whole = fed // frame_bytes
                if rate == 16000:
                    # No resampler: exactly the whole frames so far, right away.
                    while out < whole:
                        with anyio.fail_after(2):
                            out += (await receive.receive()).frames
                    assert out == whole
                else:
                    # The resampler keeps a few samples for its filter; everything else comes.
                    while out < whole * 2 - 64:
                        with anyio.fail_after(2):
                            out += (await receive.receive()).frames
            await feeder.send.send(pcm[fed:])
            await feeder.send.aclose()
            async for chunk in receive:
                out += chunk.frames
    assert out == len(pcm) // frame_bytes * 16000 // rate


@pytest.mark.anyio
async def test_moov_at_end_is_decoded_once_complete(data, decode_bytes) -> None:
    """No streaming possible; the upload is buffered and decoded at its end."""
    out = await decode_bytes(data("speech_moov_end.m4a"), piece=1000)
    faststart = await decode_bytes(data("speech.m4a"), piece=1000)
    assert out.error is None and faststart.error is None
    assert np.array_equal(out.samples, faststart.samples)


@pytest.mark.anyio
async def test_a_backlog_goes_out_in_batches(data, decode_bytes) -> None:
    """Audio decoded from bytes that are all there at once goes out in batches of about
    BATCH_SAMPLES, not per codec frame nor all at the end; the same samples however it is cut."""
    webm = data("speech.webm")  # 7.5 s
    whole = await decode_bytes(webm, piece=len(webm))
    trickled = await decode_bytes(webm, piece=64)
    assert whole.error is None and trickled.error is None
    whole.assert_contiguous()
    sizes = [c.frames for c in whole.chunks]
    # Full batches (overshooting by less than a codec frame), then what the end of the input
    # finds, then possibly the resampler's few-sample tail.
    assert BATCH_SAMPLES <= sizes[0] < BATCH_SAMPLES + 2000
    assert max(sizes) == sizes[0]
    assert len(sizes) <= -(-whole.frames // BATCH_SAMPLES) + 1
    assert np.array_equal(whole.samples, trickled.samples)
