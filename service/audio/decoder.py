"""The audio stage's entry point: an upload's bytes in, 16 kHz float32 chunks out, as they arrive.

Which path the bytes take:

- declared raw PCM (``fmt`` given): numpy, chunk by chunk (:mod:`service.audio.pcm`);
- WAV with integer or float PCM: header parsed here (:mod:`service.audio.wav`), then numpy;
- WebM and Ogg with Opus (what browsers record), with a decode pool: our own demuxers and
  libopus, in one process or thread shared by every session (:mod:`service.audio.packets`);
- anything else, including WAV with other codecs: FFmpeg through PyAV in a thread of its own
  (:mod:`service.audio.container`); MP4 only streams with its index first ("faststart").

Rates other than 16 kHz go through FFmpeg's resampler (:mod:`service.audio.resample`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass

from service.audio import opus
from service.audio.chunk import AudioChunk, ChunkSink
from service.audio.container import decode_buffered, decode_streaming
from service.audio.packets import DecodePool, DecodeProcess, decode_opus, open_demuxer
from service.audio.pcm import PcmDecoder, PcmLayout
from service.audio.resample import ArrayResampler
from service.audio.sniff import Kind, sniff
from service.audio.source import ByteSource, Doorbell, Head
from service.audio.wav import read_header
from service.audio.writer import ChunkWriter
from service.config import PcmFormat
from service.errors import ErrorCode, StreamerError

# FFmpeg demuxer names (as sniffing tells them) of the containers we read ourselves for Opus.
OPUS_CONTAINERS = ("matroska", "ogg")


@dataclass(frozen=True, slots=True)
class DecodeResult:
    bytes_in: int
    samples_out: int  # per channel, at 16 kHz
    channels: int
    container: str  # "raw", "wav", "mp3", "ogg", "webm", "flac", "mp4", ...
    codec: str  # "pcm_s16le", "opus", ...


async def decode(
    source: AsyncIterable[bytes],
    fmt: PcmFormat | None,
    send: ChunkSink,
    *,
    on_chunk: Callable[[AudioChunk, float], None] | None = None,
    pool: DecodePool | DecodeProcess | None = None,
    bell: Doorbell | None = None,
) -> DecodeResult:
    """Decode an upload while it arrives, sending :class:`AudioChunk` objects to ``send``.

    ``fmt`` declares raw interleaved PCM; ``None`` sniffs the format. ``send`` is closed on
    return, also on error. Chunks are contiguous (each ``start`` is the previous ``end``) and go
    out as soon as the bytes that complete them arrive: for PCM and WAV nothing is held back but
    a partial sample frame and the resampler's few-sample delay.

    Raises :class:`StreamerError` (``EMPTY_AUDIO``, ``UNSUPPORTED_FORMAT``, ``NO_AUDIO_STREAM``,
    ``DECODE_FAILED``, ``PARTIAL_SAMPLE``, ``PAYLOAD_TOO_LARGE``) only after sending all audio
    decoded before the failure. An exception from ``source`` itself propagates the same way.

    ``on_chunk(chunk, busy_s)`` is called for each chunk sent, with the decoding work that
    produced it (for metrics: the decode stage's real-time factor).

    With a ``pool``, WebM and Ogg with Opus are demuxed by us and decoded with libopus in the
    pool's process or shared thread (:mod:`service.audio.packets`); without one, by FFmpeg.

    ``bell``: the :class:`Doorbell` that the sender of ``source`` (a memory object stream) rings
    after each chunk and on close; the decoder then waits on it instead of on the stream.
    """
    try:
        return await _decode(source, fmt, send, on_chunk, pool, bell)
    finally:
        await send.aclose()


async def _decode(
    source: AsyncIterable[bytes],
    fmt: PcmFormat | None,
    send: ChunkSink,
    on_chunk: Callable[[AudioChunk, float], None] | None,
    pool: DecodePool | DecodeProcess | None,
    bell: Doorbell | None,
) -> DecodeResult:
    src = ByteSource(source, bell)
    writer = ChunkWriter(send, on_chunk)
    if fmt is not None:
        layout = _raw_layout(fmt)
        await _decode_pcm(src, layout, fmt.sample_rate, None, writer, "raw PCM")
        if src.bytes_in == 0:
            raise StreamerError(ErrorCode.EMPTY_AUDIO, "the upload contained no bytes")
        return DecodeResult(src.bytes_in, writer.samples_out, layout.channels, "raw", layout.codec)

    head = Head(src)
    sniffed = await sniff(head)
    if sniffed.kind is Kind.WAV:
        header = await read_header(head)
        if header.layout is not None:
            src.push_back(head.rest())
            await _decode_pcm(
                src, header.layout, header.format.sample_rate, header.data_size, writer, "WAV"
            )
            return DecodeResult(
                src.bytes_in,
                writer.samples_out,
                header.layout.channels,
                "wav",
                header.layout.codec,
            )
        # A WAV codec numpy cannot do (mu-law, ADPCM, ...): FFmpeg reads it from byte 0.

    replay = head.replay()
    if pool is not None and sniffed.demuxer in OPUS_CONTAINERS and opus.available():
        demuxer, packets, replay = await open_demuxer(src, replay, sniffed.demuxer)
        if demuxer is not None:
            info = await decode_opus(src, demuxer, packets, pool, writer)
            return DecodeResult(
                src.bytes_in, writer.samples_out, info.channels, info.container, info.codec
            )
    if sniffed.kind is Kind.MP4_MOOV_AT_END:
        info = await decode_buffered(src, replay, sniffed, writer)
    else:
        info = await decode_streaming(src, replay, sniffed, writer)
    return DecodeResult(src.bytes_in, writer.samples_out, info.channels, info.container, info.codec)


def _raw_layout(fmt: PcmFormat) -> PcmLayout:
    try:
        return PcmLayout(fmt.channels, fmt.sample_bytes, "float" if fmt.is_float else "int")
    except ValueError:
        raise StreamerError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"raw PCM must be s16le or f32le, got {fmt.encoding} with {fmt.channels} channels",
        ) from None


async def _decode_pcm(
    src: ByteSource,
    layout: PcmLayout,
    rate: int,
    data_size: int | None,
    writer: ChunkWriter,
    what: str,
) -> None:
    """Interleaved PCM from ``src`` to the writer; ``data_size`` bytes of it, or all if None.

    Every incoming chunk is converted and sent at once. Bytes after ``data_size`` (trailing WAV
    chunks) are read and ignored.
    """
    decoder = PcmDecoder(layout)
    resampler = ArrayResampler(layout.channels, rate)
    remaining = data_size
    while (data := await src.pull()) is not None:
        if remaining is not None:
            if remaining == 0:
                continue
            data = data[:remaining]
            remaining -= len(data)
        t0 = time.perf_counter()
        samples = resampler.process(decoder.feed(data))
        writer.add_busy(time.perf_counter() - t0)
        await writer.write(samples, src.received_at)
    t0 = time.perf_counter()
    samples = resampler.flush()
    writer.add_busy(time.perf_counter() - t0)
    await writer.write(samples, src.received_at)
    if decoder.remainder:
        raise StreamerError(
            ErrorCode.PARTIAL_SAMPLE,
            f"the {what} data ended {decoder.remainder} bytes into a sample frame "
            f"({layout.frame_bytes} bytes: {layout.channels} channel"
            f"{'s' if layout.channels != 1 else ''} of {layout.codec}); "
            "the whole frames before it were decoded",
        )
