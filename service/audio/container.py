"""Everything FFmpeg reads (FLAC, MP3, Ogg/Opus, WebM, MP4/AAC, ...) through PyAV, while the
upload is still arriving.

PyAV's demuxers pull bytes with blocking ``read()`` calls, so each session decodes in a thread of
its own (a fresh ``CapacityLimiter(1)``, not anyio's shared 40-token default: a long upload would
otherwise hold a shared token for its whole duration). The thread's file object fetches the next
upload chunk from the event loop with ``anyio.from_thread.run``, and in that same hop hands back
everything decoded since the previous fetch: one loop round trip per network chunk, not per 20 ms
codec frame. Cancelling the session cancels that hop, which raises inside ``read()``; PyAV passes
the exception out of the demuxer and the thread ends.

MP4/M4A/MOV only stream when the file is "faststart" (``moov`` index ahead of the ``mdat``
media data, e.g. ``ffmpeg -movflags +faststart``); with the index at the end nothing can be
decoded before the last byte arrives, so such uploads are buffered in memory and decoded at the
end (see :func:`decode_buffered`).
"""

from __future__ import annotations

import concurrent.futures
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.from_thread
import anyio.to_thread
import av
import av.container
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream

from service.audio.chunk import Samples
from service.audio.resample import FrameResampler
from service.audio.sniff import Sniffed
from service.audio.source import ByteSource
from service.audio.writer import ChunkWriter
from service.config import MODEL_SAMPLE_RATE
from service.errors import ErrorCode, StreamerError

# Low-latency probing, measured (tests/audio/test_streaming.py): with FFmpeg's defaults MP3 waits
# for ~24 KiB; with these, first audio comes after ~2 KiB for MP3 (FFmpeg's minimum format probe)
# and Ogg (its first audio page), ~1.3 KiB for MP4, under 0.5 KiB for WebM, ~12 KiB for FLAC (its
# header carries an 8 KiB padding block). Probing is skipped where a magic number names the
# demuxer (see sniff.py).
PROBE_SIZE = "32"
ANALYZE_DURATION = "0"
# PyAV's read size: FFmpeg asks for this much per read(); we hand over whatever has arrived.
READ_BUFFER_BYTES = 32 * 1024
# Upload chunks queued for the decoding thread: enough that the network side need not wait for
# every decode step, bounded so a slow decoder pushes back on the upload.
QUEUED_CHUNKS = 8
# Send decoded audio at least this often (in 16 kHz samples) even when a large upload chunk
# keeps the decoder busy without a fetch (a fast upload; a live stream's audio goes out at every
# fetch). Each batch costs the event loop and the VAD a fixed amount on top of its audio (also
# with the server on one core, so not thread contention): on a 60 s webm/opus upload, 4 s
# batches instead of 1 s cut the server's CPU by 0.3-1.0 ms per audio second (of ~5); 8 s
# gained nothing more.
BATCH_SAMPLES = 4 * MODEL_SAMPLE_RATE
# Resample what has been decoded at least this often (seconds of audio) while a batch fills.
# Frames waiting in the resampler's input hold FFmpeg buffers, and FFmpeg's buffer pools keep
# the most that were ever out at once: pulling every 1 s instead, a webm session among 100 live
# streams (decoders running behind) held ~0.1 MB more RSS; 0.2 s costs no measurable CPU.
PULL_SECONDS = 0.2
# A run of packets that all fail to decode means the stream is garbage, not a damaged patch.
MAX_CONSECUTIVE_ERRORS = 32
# When no magic number named the demuxer, FFmpeg probes, and for junk it may settle on a demuxer
# (MP3, MPEG-PS) that resynchronises by reading on and on without ever decoding a frame. Real
# audio decodes its first frame well within this many bytes past the probe, so past it, with
# nothing decoded yet, the upload is reported as unsupported instead of waiting for more junk
# (or for the idle timeout) while the client holds the upload open.
OPEN_SLACK_BYTES = 64 * 1024
# Ceiling for the whole-upload fallback (MP4 with moov at the end).
MAX_BUFFERED_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StreamInfo:
    container: str
    codec: str
    channels: int


class DecodeCancelled(Exception):
    """Raised inside the decoding thread when the session's task is cancelled."""


def _is_cancellation(exc: BaseException) -> bool:
    # From a worker thread, cancellation surfaces as concurrent.futures' CancelledError (an
    # Exception) or as the backend's own (asyncio/trio: a BaseException). Backend helpers such
    # as anyio.get_cancelled_exc_class() cannot be called from the thread.
    return not isinstance(exc, Exception) or isinstance(exc, concurrent.futures.CancelledError)


class _Reader(Protocol):
    def read(self, n: int) -> bytes: ...

    @property
    def bytes_read(self) -> int: ...


def container_name(format_name: str, head: bytes) -> str:
    """FFmpeg's demuxer name, normalised: ``mov,mp4,m4a,...`` -> ``mp4`` and so on."""
    if format_name.startswith("matroska"):
        # One demuxer for both; the EBML header's DocType, within the first bytes, says which.
        return "webm" if b"webm" in head[:64] else "mkv"
    if format_name.startswith("mov"):
        return "mp4"
    return format_name.split(",")[0]


def decode_failure(
    name: str,
    codec: str,
    where: str,
    *,
    damage: str | None,
    errors: int,
    reason: str,
    stopped: bool,
) -> StreamerError:
    """``decode_failed`` in one wording for every decoder: the container damaged ``where``
    (``damage`` says how), else ``errors`` packets failed (the first for ``reason``), and with
    ``stopped`` so many in a row that decoding gave up ``where``."""
    if damage is not None:
        return StreamerError(
            ErrorCode.DECODE_FAILED, f"the {name} container is damaged {where}: {damage}"
        )
    packets = f"{errors} {codec} packet{'s' if errors != 1 else ''} of the {name} stream"
    message = (
        f"{packets} failed to decode ({reason}); decoding stopped {where}"
        if stopped
        else f"{packets} failed to decode and {'was' if errors == 1 else 'were'} skipped ({reason})"
    )
    return StreamerError(ErrorCode.DECODE_FAILED, message)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__


class _Batch:
    """Decoded audio waiting for the next hop to the event loop.

    Decoded frames wait in the resampler's input and are resampled every :data:`PULL_SECONDS`
    of audio and when the batch is taken, not once per 20 ms frame (see
    :class:`FrameResampler`). ``frames`` counts what is waiting, in 16 kHz samples.
    """

    def __init__(self, busy: Callable[[float], None]) -> None:
        self._resampler = FrameResampler()
        # Resampling seconds in take(), for the decode stage's real-time factor (add() runs
        # inside the decoding loop's own timing).
        self._busy = busy
        self._parts: list[Samples] = []
        self._seconds = 0.0  # audio waiting, resampled or not
        self._unpulled = 0.0  # of which still in the resampler's input
        self.frames = 0

    @property
    def channels(self) -> int:
        """Channels of the output, fixed by the first frame (0 before it)."""
        return self._resampler.channels

    def add(self, frame: av.AudioFrame) -> None:
        self._resampler.push(frame)
        seconds = frame.samples / frame.sample_rate
        self._seconds += seconds
        self._unpulled += seconds
        self.frames = int(self._seconds * MODEL_SAMPLE_RATE)
        if self._unpulled >= PULL_SECONDS:
            self._pull()

    def take(self, final: bool = False) -> Samples | None:
        """Everything resampled so far; with ``final``, the resampler's tail too."""
        t0 = time.perf_counter()
        self._pull(final)
        self._busy(time.perf_counter() - t0)
        parts = [part for part in self._parts if part.shape[1]]
        self._parts.clear()
        self._seconds = 0.0
        self.frames = 0
        # Always a fresh array: frames from the resampler may view FFmpeg-owned buffers.
        return np.concatenate(parts, axis=1) if parts else None

    def _pull(self, final: bool = False) -> None:
        self._parts += self._resampler.flush() if final else self._resampler.pull()
        self._unpulled = 0.0


class _FrameDecoder:
    """The decoding loop; runs in the session's thread. Shared by streaming and buffered input."""

    def __init__(
        self,
        sniffed: Sniffed,
        head: bytes,
        batch: _Batch,
        send: Callable[[Samples], None],
        busy: Callable[[float], None],
    ) -> None:
        self._sniffed = sniffed
        self._head = head
        self._batch = batch
        self._send = send
        self._busy = busy  # decode + resample seconds, for the decode stage's real-time factor

    def run(self, reader: _Reader) -> StreamInfo:
        try:
            container = av.open(
                reader,
                mode="r",
                format=self._sniffed.demuxer,
                options={
                    "probesize": PROBE_SIZE,
                    "analyzeduration": ANALYZE_DURATION,
                    "formatprobesize": str(self._sniffed.probe_bytes),
                },
                buffer_size=READ_BUFFER_BYTES,
            )
        except av.FFmpegError as exc:
            raise self._open_error(exc, reader.bytes_read) from None
        with container:
            return self._decode(container, reader)

    def _open_error(self, exc: av.FFmpegError, bytes_read: int) -> StreamerError:
        demuxer = self._sniffed.demuxer
        if demuxer is None:
            return StreamerError(
                ErrorCode.UNSUPPORTED_FORMAT,
                f"could not identify an audio container in the first {bytes_read} bytes "
                "(FFmpeg recognises none; raw PCM must be declared with its format)",
            )
        name = container_name(demuxer, self._head)
        return StreamerError(
            ErrorCode.DECODE_FAILED,
            f"the {name} header is damaged or incomplete after {bytes_read} bytes: {_reason(exc)}",
        )

    def _decode(self, container: av.container.InputContainer, reader: _Reader) -> StreamInfo:
        name = container_name(container.format.name, self._head)
        if not container.streams.audio or container.streams.audio[0].codec_context is None:
            kinds: list[str] = sorted({s.type for s in container.streams}) or ["no streams"]
            holds = ", ".join(kinds)
            # FFmpeg's image demuxers (png_pipe, webp_pipe, ...) yield a one-frame video
            # stream; an uploaded picture is "not audio", not "a video without sound".
            image = container.format.name.endswith("_pipe") or container.format.name == "image2"
            if ("video" in kinds and not image) or container.streams.audio:
                raise StreamerError(
                    ErrorCode.NO_AUDIO_STREAM,
                    f"the {name} container has no audio stream that can be decoded "
                    f"(it holds: {holds})",
                )
            raise StreamerError(
                ErrorCode.UNSUPPORTED_FORMAT,
                f"FFmpeg read the input as {name} ({holds}), which is not audio",
            )
        stream = container.streams.audio[0]
        codec = stream.codec_context.codec.canonical_name
        decoded = errors = consecutive = 0
        first_error: av.FFmpegError | None = None
        demux_error: av.FFmpegError | None = None
        try:
            for packet in container.demux(stream):
                # A large chunk keeps this loop busy without a fetch; notice cancellation here.
                anyio.from_thread.check_cancelled()
                t0 = time.perf_counter()
                try:
                    frames = packet.decode()
                except av.FFmpegError as exc:
                    # Damaged packets are skipped: the audio after them is still worth having.
                    errors += 1
                    consecutive += 1
                    first_error = first_error or exc
                    if consecutive >= MAX_CONSECUTIVE_ERRORS:
                        break
                    continue
                consecutive = 0
                for frame in frames:
                    decoded += frame.samples
                    self._batch.add(frame)
                self._busy(time.perf_counter() - t0)
                if self._batch.frames >= BATCH_SAMPLES:
                    self._flush()
        except av.FFmpegError as exc:
            demux_error = exc
        self._flush(final=True)
        info = StreamInfo(name, codec, self._batch.channels or stream.codec_context.channels)
        if first_error is None and demux_error is None:
            return info
        failure = first_error or demux_error
        assert failure is not None
        if decoded == 0 and self._sniffed.demuxer is None:
            # FFmpeg's probe guessed (it takes some JSON for AMR, for example) and nothing
            # decoded: the input was never audio.
            raise StreamerError(
                ErrorCode.UNSUPPORTED_FORMAT,
                f"could not identify an audio container: FFmpeg guessed {name}/{codec} but "
                f"could not decode any of it ({_reason(failure)})",
            )
        raise decode_failure(
            name,
            codec,
            f"after {reader.bytes_read} bytes",
            damage=None if demux_error is None else _reason(demux_error),
            errors=errors,
            reason=_reason(failure),
            stopped=consecutive >= MAX_CONSECUTIVE_ERRORS,
        )

    def _flush(self, final: bool = False) -> None:
        samples = self._batch.take(final)
        if samples is not None:
            self._send(samples)


class _StreamReader:
    """The file object FFmpeg reads from in the decoding thread: only ``read()``, so PyAV treats
    the input as unseekable (seeking back would mean buffering the upload)."""

    def __init__(
        self,
        first: bytes,
        received_at: float,
        chunks: MemoryObjectReceiveStream[tuple[bytes, float]],
        writer: ChunkWriter,
        batch: _Batch,
    ) -> None:
        self._data = first
        self._offset = 0
        self._chunks = chunks
        self._writer = writer
        self._batch = batch
        self.received_at = received_at
        self.bytes_read = 0
        self.stopped = False
        # Bytes an unidentified input may take without decoding any audio (None: no limit).
        self.open_limit: int | None = None

    def read(self, n: int) -> bytes:
        if self._offset >= len(self._data):
            if (
                self.open_limit is not None
                and self.bytes_read >= self.open_limit
                and self._batch.frames == 0
                and self._writer.samples_out == 0
            ):
                self.stopped = True
                raise StreamerError(
                    ErrorCode.UNSUPPORTED_FORMAT,
                    f"could not identify an audio container in the first {self.bytes_read} "
                    "bytes (FFmpeg recognises none; raw PCM must be declared with its format)",
                )
            if self.stopped:
                # FFmpeg may read again after an error; PyAV keeps only the first exception
                # (and prints the rest), so later reads just report the end of the input.
                return b""
            # About to wait for the network: first hand over what the bytes so far decoded to.
            try:
                item = anyio.from_thread.run(self._exchange, self._batch.take())
            except BaseException as exc:
                self.stopped = True
                if not _is_cancellation(exc):
                    raise  # e.g. the consumer closed its end; PyAV re-raises it from demux()
                # Cancellation arrives as asyncio's CancelledError, a BaseException that PyAV's
                # read callback does not catch (it would log it and call read() again, forever).
                # Raise an Exception instead: PyAV re-raises it from open()/demux().
                raise DecodeCancelled("the session was cancelled") from None
            if item is None:
                return b""
            self._data, self.received_at = item
            self._offset = 0
        # Never more than n: PyAV copies the result into a buffer of exactly n bytes.
        out = self._data[self._offset : self._offset + n]
        self._offset += len(out)
        self.bytes_read += len(out)
        return out

    async def _exchange(self, samples: Samples | None) -> tuple[bytes, float] | None:
        if samples is not None:
            await self._writer.write(samples, self.received_at)
        try:
            data, received_at = await self._chunks.receive()
        except anyio.EndOfStream:
            return None
        # Take whatever else is already queued in the same hop: a client sending tiny chunks
        # would otherwise cost one thread round trip each.
        parts = [data]
        size = len(data)
        while size < READ_BUFFER_BYTES:
            try:
                data, received_at = self._chunks.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts), received_at


class _BufferReader:
    """A whole upload in memory; seekable, so FFmpeg can jump to a ``moov`` at the end."""

    def __init__(self, data: bytes) -> None:
        self._io = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._io.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._io.seek(offset, whence)

    def tell(self) -> int:
        return self._io.tell()

    @property
    def bytes_read(self) -> int:
        return self._io.tell()


async def decode_streaming(
    src: ByteSource, head: bytes, sniffed: Sniffed, writer: ChunkWriter
) -> StreamInfo:
    """Decode with FFmpeg as the bytes arrive; ``head`` is what sniffing already read.

    Decoded audio is sent before any error is raised. An error from the upload itself (the
    source iterator) is raised only after everything that did arrive has been decoded. When
    decoding fails, waiting for the next upload chunk is cancelled so the error is reported at
    once, not when (or if) a stalled client sends more: the source iterator may then have been
    interrupted inside ``anext()``. When decoding ends before the upload does, the rest of the
    upload is read and discarded.
    """
    chunk_send, chunk_recv = anyio.create_memory_object_stream[tuple[bytes, float]](QUEUED_CHUNKS)
    batch = _Batch(writer.add_busy)
    reader = _StreamReader(head, src.received_at, chunk_recv, writer, batch)
    if sniffed.demuxer is None:
        reader.open_limit = sniffed.probe_bytes + OPEN_SLACK_BYTES

    def send(samples: Samples) -> None:
        anyio.from_thread.run(writer.write, samples, reader.received_at)

    decoder = _FrameDecoder(sniffed, head, batch, send, writer.add_busy)
    outcome: list[StreamInfo] = []
    failure: list[Exception] = []
    source_error: Exception | None = None

    async def run_thread(scope: anyio.CancelScope) -> None:
        with chunk_recv:
            try:
                outcome.append(
                    await anyio.to_thread.run_sync(
                        decoder.run, reader, limiter=anyio.CapacityLimiter(1)
                    )
                )
            except Exception as exc:
                failure.append(exc)
                scope.cancel()  # stop waiting for upload bytes nobody will decode

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_thread, tg.cancel_scope)
        with chunk_send:
            try:
                while (data := await src.pull()) is not None:
                    await chunk_send.send((data, src.received_at))
            except anyio.BrokenResourceError:
                pass  # the decoder finished before the upload did
            except Exception as exc:
                source_error = exc
    if failure:
        raise failure[0]
    if source_error is not None:
        raise source_error
    await src.drain()
    return outcome[0]


async def decode_buffered(
    src: ByteSource, head: bytes, sniffed: Sniffed, writer: ChunkWriter
) -> StreamInfo:
    """Read the whole upload into memory, then decode it: for MP4 with ``moov`` at the end."""
    data = bytearray(head)
    while (chunk := await src.pull()) is not None:
        data += chunk
        if len(data) > MAX_BUFFERED_BYTES:
            raise StreamerError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"this MP4 has its index (moov) at the end, so it is decoded only once complete, "
                f"and it is larger than {MAX_BUFFERED_BYTES} bytes; re-encode it with "
                "-movflags +faststart to stream it",
            )
    received_at = src.received_at

    def send(samples: Samples) -> None:
        anyio.from_thread.run(writer.write, samples, received_at)

    decoder = _FrameDecoder(sniffed, head, _Batch(writer.add_busy), send, writer.add_busy)
    reader = _BufferReader(bytes(data))
    del data
    return await anyio.to_thread.run_sync(decoder.run, reader, limiter=anyio.CapacityLimiter(1))
