"""Sending at real time: how many bytes make a second of audio, and a clock to send by.

- Raw PCM: the declared format gives the byte rate.
- WAV: its header gives the byte rate and where the samples start.
- Any other container: PyAV reads the duration (from the header, or by demuxing every packet when
  the header has none, as in a browser's MediaRecorder webm) and the bytes go at the file's average
  rate, size / duration. That is exact for constant-bitrate audio; with a variable bitrate the
  upload runs a little ahead or behind within the file and ends on time. From stdin, such a
  container is read to the end first, since its duration is only known then.

A piece of audio leaves when it would have been recorded: the bytes up to ``t`` seconds of audio
are sent at ``start + t``, as from a live microphone.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

import anyio

from service.client.options import FAST_CHUNK_BYTES, RawFormat
from service.client.source import Source

WAV_HEADER_PEEK_BYTES = 64 * 1024
MIN_CHUNK_BYTES = 64


@dataclass(frozen=True, slots=True)
class Timing:
    """Bytes to audio seconds: ``(offset - header_bytes) / bytes_per_second``."""

    bytes_per_second: float
    header_bytes: int = 0
    duration: float | None = None  # seconds, when known
    frame_bytes: int = 1  # paced chunks are whole frames of this size
    basis: str = "raw"  # how the rate was found, for messages

    def seconds_at(self, offset: int) -> float:
        return max(0.0, (offset - self.header_bytes) / self.bytes_per_second)

    def chunk_bytes(self, chunk_ms: int) -> int:
        n = self.bytes_per_second * chunk_ms / 1000
        frames = max(1, round(n / self.frame_bytes))
        return max(MIN_CHUNK_BYTES, frames * self.frame_bytes)


@dataclass(frozen=True, slots=True)
class WavHeader:
    byte_rate: int
    block_align: int
    data_offset: int
    data_size: int | None  # None when the header does not say (a streamed WAV)


def parse_wav_header(head: bytes) -> WavHeader | None:
    """The RIFF/WAVE chunks up to ``data``; ``None`` if ``head`` is not a WAV header."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, byte_rate, block_align = 12, 0, 1
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk_id == b"fmt " and size >= 16 and body + 16 <= len(head):
            byte_rate = int.from_bytes(head[body + 8 : body + 12], "little")
            block_align = max(1, int.from_bytes(head[body + 12 : body + 14], "little"))
        elif chunk_id == b"data":
            if byte_rate <= 0:
                return None
            # 0 and 0xFFFFFFFF are what streaming writers put there before they know.
            known = size if 0 < size < 0xFFFFFFFF else None
            return WavHeader(byte_rate, block_align, body, known)
        pos = body + size + (size & 1)
    return None


def raw_timing(fmt: RawFormat, size: int | None) -> Timing:
    bps = fmt.bytes_per_second
    return Timing(bps, 0, None if size is None else size / bps, fmt.frame_bytes, "raw")


def wav_timing(header: WavHeader, size: int | None) -> Timing:
    data = header.data_size
    if size is not None and (data is None or header.data_offset + data > size):
        data = size - header.data_offset
    duration = None if data is None else data / header.byte_rate
    return Timing(header.byte_rate, header.data_offset, duration, header.block_align, "wav header")


def container_duration(file: str | BinaryIO) -> float | None:
    """Seconds of audio in any container FFmpeg reads, or ``None``."""
    import av  # imported here: only pacing of containers needs it, and it is slow to import

    try:
        with av.open(file, mode="r") as container:
            if container.duration:
                return float(container.duration) / av.time_base
            if not container.streams.audio:
                return None
            # No duration in the header (a live recording): the end of the last packet.
            end = 0.0
            for packet in container.demux(container.streams.audio[0]):
                if packet.pts is not None and packet.time_base is not None:
                    end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            return end or None
    except (av.FFmpegError, OSError, ValueError):
        return None


async def probe_timing(source: Source, raw: RawFormat | None) -> Timing | None:
    """How to pace ``source``, or ``None`` when its duration cannot be found."""
    if raw is not None:
        return raw_timing(raw, source.size)
    header = parse_wav_header(await source.peek(WAV_HEADER_PEEK_BYTES))
    if header is not None:
        return wav_timing(header, source.size)
    if source.size is None:
        data = await source.read_all()
        duration = await anyio.to_thread.run_sync(container_duration, io.BytesIO(data))
    else:
        duration = await anyio.to_thread.run_sync(container_duration, source.name)
    if not duration or not source.size:
        return None
    return Timing(source.size / duration, 0, duration, 1, "container duration")


class Pacer:
    """Holds each chunk until the audio in it would have been recorded."""

    def __init__(self, timing: Timing, clock: Callable[[], float] = time.monotonic) -> None:
        self.timing = timing
        self._clock = clock
        self.started_at = clock()

    def start(self) -> None:
        self.started_at = self._clock()

    def due(self, offset: int) -> float:
        """The clock time at which the bytes before ``offset`` are due."""
        return self.started_at + self.timing.seconds_at(offset)

    async def wait(self, offset: int) -> None:
        delay = self.due(offset) - self._clock()
        if delay > 0:
            await anyio.sleep(delay)


def chunk_size(timing: Timing | None, chunk_ms: int, paced: bool) -> int:
    if paced and timing is not None:
        return timing.chunk_bytes(chunk_ms)
    frame = timing.frame_bytes if timing is not None else 1
    return max(frame, FAST_CHUNK_BYTES // frame * frame)


async def chunks(
    source: Source,
    size: int,
    pacer: Pacer | None = None,
    on_sent: Callable[[int], None] | None = None,
    frame_bytes: int = 1,
) -> AsyncIterator[bytes]:
    """The input in pieces of ``size`` bytes (fewer from a live pipe), paced if asked.

    Pieces hold whole frames of ``frame_bytes`` (a WebSocket frame of raw PCM must); a partial
    frame at the very end is sent as it is, for the server to report.
    """
    offset = 0
    carry = b""
    if pacer is not None:
        pacer.start()
    while True:
        data = await source.read(size - len(carry))
        if not data:
            break
        if carry:
            data, carry = carry + data, b""
        cut = len(data) - len(data) % frame_bytes
        if cut == 0:
            carry = data
            continue
        if cut < len(data):
            data, carry = data[:cut], data[cut:]
        offset += len(data)
        if pacer is not None:
            await pacer.wait(offset)
        yield data
        if on_sent is not None:
            on_sent(offset)
    if carry:
        offset += len(carry)
        yield carry
        if on_sent is not None:
            on_sent(offset)
