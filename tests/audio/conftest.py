"""Shared fixtures for the audio stage tests: test files, and a way to run ``decode`` on bytes."""

from __future__ import annotations

import io
import struct
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import anyio
import numpy as np
import pytest

from service.audio.chunk import AudioChunk
from service.audio.decoder import DecodeResult, decode
from service.audio.ogg import page_checksum
from service.audio.packets import DecodePool, DecodeProcess
from service.config import PcmFormat
from service.errors import StreamerError

DATA = Path(__file__).resolve().parent.parent / "data"
# speech.wav: 16 kHz mono, 7.52 s; the 44.1/48 kHz files hold the excerpt [0.35 s, 1.70 s).
SPEECH_SAMPLES = 120_345
EXCERPT_START = 5_600
EXCERPT_SAMPLES = 21_600


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(repr=False)  # asyncio may repr a task's result; numpy reprs of every chunk are slow
class Decoded:
    result: DecodeResult | None
    error: StreamerError | None
    chunks: list[AudioChunk] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Decoded({self.result!r}, {self.error!r}, {len(self.chunks)} chunks)"

    @property
    def samples(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros((self.result.channels if self.result else 1, 0), np.float32)
        return np.concatenate([c.samples for c in self.chunks], axis=1)

    @property
    def frames(self) -> int:
        return sum(c.frames for c in self.chunks)

    def assert_contiguous(self) -> None:
        position = 0
        for chunk in self.chunks:
            assert chunk.start == position
            assert chunk.samples.dtype == np.float32
            assert chunk.samples.flags.c_contiguous
            position = chunk.end


async def _pieces(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece
        await anyio.lowlevel.checkpoint()


async def decode_pieces(
    pieces: Iterable[bytes] | AsyncIterable[bytes],
    fmt: PcmFormat | None = None,
    pool: DecodePool | DecodeProcess | None = None,
) -> Decoded:
    """Run ``decode`` over the given byte pieces, collecting every chunk and the outcome."""
    send, receive = anyio.create_memory_object_stream[AudioChunk](4)
    out = Decoded(None, None)

    async def collect() -> None:
        async with receive:
            async for chunk in receive:
                out.chunks.append(chunk)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect)
            try:
                source = pieces if isinstance(pieces, AsyncIterable) else _pieces(pieces)
                out.result = await decode(source, fmt, send, pool=pool)
            except StreamerError as exc:
                out.error = exc
    return out


def ogg_pages(data: bytes | bytearray) -> list[tuple[int, int]]:
    """``(start, end)`` of every page, walked by the lengths in the headers."""
    pages, pos = [], 0
    while pos < len(data):
        count = data[pos + 26]
        end = pos + 27 + count + sum(data[pos + 27 : pos + 27 + count])
        pages.append((pos, end))
        pos = end
    return pages


def resigned(data: bytes | bytearray) -> bytes:
    """``data`` with every Ogg page's checksum made right again: tests that damage packets on
    purpose, to see what libopus makes of them, must get past the demuxer's check first."""
    out = bytearray(data)
    for start, end in ogg_pages(out):
        out[start + 22 : start + 26] = page_checksum(out[start:end]).to_bytes(4, "little")
    return bytes(out)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


DecodeBytes = Callable[..., Awaitable[Decoded]]


@pytest.fixture(scope="session")
def decode_bytes() -> DecodeBytes:
    """``await decode_bytes(data, fmt=None, piece=4096)``: decode ``data`` fed in pieces."""

    async def run(data: bytes, fmt: PcmFormat | None = None, piece: int = 4096) -> Decoded:
        return await decode_pieces(split(data, piece), fmt)

    return run


@pytest.fixture(scope="session")
def data() -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        return (DATA / name).read_bytes()

    return read


@pytest.fixture(scope="session")
def reference() -> np.ndarray:
    """speech.wav as float32, read independently of the decoder under test."""
    raw = (DATA / "speech.wav").read_bytes()
    start = raw.index(b"data") + 8
    return np.frombuffer(raw[start:], "<i2").astype(np.float32) / 32768.0


def riff_chunk(chunk_id: bytes, body: bytes, size: int | None = None) -> bytes:
    """One RIFF chunk, padded to an even length as RIFF requires."""
    header = chunk_id + struct.pack("<I", len(body) if size is None else size)
    return header + body + (b"\0" if len(body) % 2 else b"")


def fmt_chunk(
    tag: int, channels: int, rate: int, width: int, *, extensible: bool = False, valid: int = 0
) -> bytes:
    block = channels * width
    body = struct.pack(
        "<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, width * 8
    )
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        body += struct.pack("<HHI", 22, valid or width * 8, 0) + struct.pack("<H", tag) + guid_tail
    return riff_chunk(b"fmt ", body)


def make_wav(
    fmt: bytes,
    pcm: bytes,
    *,
    before_data: bytes = b"",
    after_data: bytes = b"",
    data_size: int | None = None,
    riff_id: bytes = b"RIFF",
) -> bytes:
    data = riff_chunk(b"data", pcm, data_size)
    body = b"WAVE" + fmt + before_data + data + after_data
    return riff_id + struct.pack("<I", len(body)) + body


def encode_with_pyav(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Encode mono float samples with FFmpeg (for codecs numpy cannot write, e.g. mu-law)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            (np.clip(samples, -1, 1) * 32767).astype("<i2").reshape(1, -1),
            format="s16",
            layout="mono",
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def decode_chunks() -> Callable[..., Awaitable[Decoded]]:
    """``await decode_chunks(pieces, fmt=None)``: decode exactly these byte pieces."""
    return decode_pieces


@pytest.fixture(scope="session")
def wav() -> SimpleNamespace:
    """WAV builders: ``wav.make(wav.fmt(...), pcm, ...)``, ``wav.chunk(id, body)``."""
    return SimpleNamespace(make=make_wav, fmt=fmt_chunk, chunk=riff_chunk)


@pytest.fixture(scope="session")
def encode() -> Callable[[np.ndarray, int, str, str], bytes]:
    return encode_with_pyav


class _Unseekable:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def encode_opus(
    samples: np.ndarray, container: str, *, rate: int = 48000, live: bool = False
) -> bytes:
    """Encode planar float samples ``(channels, n)`` at ``rate`` as Opus in ``container``
    ("webm" or "ogg") with FFmpeg's libopus encoder; ``live`` writes WebM as a recorder does
    (clusters of unknown size, no cues)."""
    import av

    channels = samples.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    # A recorder cannot seek back to fill in sizes: without seek, FFmpeg writes none either.
    buffer: io.BytesIO | _Unseekable = _Unseekable() if live else io.BytesIO()
    options = {"live": "1"} if live else {}
    with av.open(buffer, mode="w", format=container, options=options) as out:
        stream = out.add_stream("libopus", rate=rate, layout=layout)
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        step = rate // 50
        for i in range(0, pcm.shape[1], step):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm[:, i : i + step].T.reshape(1, -1)),
                format="s16",
                layout=layout,
            )
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def ffmpeg_packets(data: bytes) -> list[bytes]:
    """The audio packets FFmpeg's demuxer finds in ``data`` (first audio stream)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return [bytes(p) for p in container.demux(stream) if p.size]
