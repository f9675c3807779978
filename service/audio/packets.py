"""WebM and Ogg Opus uploads: parsed by us, decoded with libopus in one thread for every session.

Each session's decoding task gathers the upload bytes that have arrived and awaits
:meth:`DecodePool.decode`; the pool runs everything pending at that moment in ONE worker-thread
call, demuxing and decoding session after session, so a hundred live streams cost one thread
hop per batch, not a thread each (the FFmpeg path, :mod:`service.audio.container`, blocks a
thread per session in its ``read()``). Batching comes from load, not from waiting: requests that
arrive while a batch runs form the next one.

Memory stays bounded: a session has one request at a time, of at most ``MAX_JOB_BYTES`` of
upload; while it waits, further upload chunks wait in the upload's bounded stream.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
import anyio.to_thread
import numpy as np

from service.audio.chunk import Samples
from service.audio.container import MAX_CONSECUTIVE_ERRORS, StreamInfo, decode_failure
from service.audio.demux import Demuxer, DemuxError, Packet
from service.audio.ogg import OggDemuxer
from service.audio.opus import OpusDecoder, OpusError
from service.audio.source import ByteSource
from service.audio.webm import WebmDemuxer
from service.audio.writer import ChunkWriter

T = TypeVar("T")

# Upload bytes per request: a fast upload's chunks are taken up to this much at a time, so one
# session's request holds the shared thread for a few milliseconds at most (64 KiB of Opus at
# 32 kbit/s is 16 s of audio, ~10 ms to decode) and live sessions' requests are not held up.
MAX_JOB_BYTES = 64 * 1024
# Packets offered to one merged decode: 120 ms is libopus's limit, six 20 ms packets.
MAX_RUN = 6


class _Job(Generic[T]):
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:  # in the worker thread
        try:
            self.result = self.fn()
        except Exception as exc:
            self.error = exc


def _run_all(jobs: list[_Job[object]]) -> None:
    for job in jobs:
        job.run()


class DecodePool:
    """Shared by every session; :meth:`run` is started once in the app's lifespan task group.

    One worker thread. libopus runs without the GIL, but demuxing and the per-packet Python
    need it: a second thread measured worse at 300 live streams (p99 3.1 s against 0.9 s), the
    two decoders and the event loop waiting on each other for the GIL.
    """

    def __init__(self) -> None:
        self._pending: list[_Job[object]] = []
        self._changed = anyio.Event()
        self._running = False
        self._limiter = anyio.CapacityLimiter(1)
        self.batches = 0  # for tests and metrics
        self.jobs = 0

    async def decode(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the pool's thread with whatever else is pending; its result or its
        exception. Without :meth:`run` running (unit tests, shutdown) ``fn`` runs alone in a
        thread. If the caller is cancelled while ``fn`` runs, it still runs to its end."""
        if not self._running:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        job = _Job(fn)
        self._pending.append(job)  # type: ignore[arg-type]
        self._changed.set()
        try:
            await job.done.wait()
        except BaseException:
            if job in self._pending:  # not taken yet: nobody else will ever run it
                self._pending.remove(job)  # type: ignore[arg-type]
            raise
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    async def run(self) -> None:
        if self._running:
            raise RuntimeError("DecodePool.run is already running")
        self._running = True
        try:
            while True:
                while not self._pending:
                    self._changed = anyio.Event()
                    await self._changed.wait()
                batch, self._pending = self._pending, []
                try:
                    await anyio.to_thread.run_sync(_run_all, batch, limiter=self._limiter)
                finally:
                    self.batches += 1
                    self.jobs += len(batch)
                    for job in batch:
                        job.done.set()
        finally:
            self._running = False
            pending, self._pending = self._pending, []
            for job in pending:
                job.error = RuntimeError("the decode pool stopped")
                job.done.set()


@dataclass(frozen=True, slots=True)
class _Decoded:
    samples: Samples | None
    busy_s: float
    stop: bool  # decoding ended early (damaged container, or too many bad packets)


class _OpusStream:
    """One session's demuxer and decoder; :meth:`step` runs in the pool's thread."""

    def __init__(self, demuxer: Demuxer) -> None:
        assert demuxer.head is not None
        self.demuxer = demuxer
        self.decoder = OpusDecoder(demuxer.head)
        self.errors = 0
        self.consecutive = 0
        self.first_error: OpusError | None = None
        self.demux_error: DemuxError | None = None

    def step(self, data: bytes, packets: list[Packet], final: bool) -> _Decoded:
        t0 = time.perf_counter()
        try:
            packets = packets + self.demuxer.feed(data)
            if final:
                packets += self.demuxer.end()
        except DemuxError as exc:
            self.demux_error = exc
        parts: list[Samples] = []
        i = 0
        while i < len(packets):
            # Runs of untrimmed packets decode merged, one call each (OpusDecoder.decode_run);
            # what does not merge, and a trimmed packet (the last), decodes alone.
            j = i
            while j < len(packets) and j - i < MAX_RUN and packets[j].trim_end == 0:
                j += 1
            if j - i >= 2:
                run = self.decoder.decode_run([p.data for p in packets[i:j]])
                if run is not None:
                    parts.append(run[0])
                    self.consecutive = 0
                    i += run[1]
                    continue
            packet = packets[i]
            i += 1
            try:
                samples = self.decoder.decode(packet.data, packet.trim_end)
            except OpusError as exc:
                # Damaged packets are skipped: the audio after them is still worth having.
                self.errors += 1
                self.consecutive += 1
                self.first_error = self.first_error or exc
                if self.consecutive >= MAX_CONSECUTIVE_ERRORS:
                    break
                continue
            self.consecutive = 0
            parts.append(samples)
        stop = self.demux_error is not None or self.consecutive >= MAX_CONSECUTIVE_ERRORS
        joined = np.concatenate(parts, axis=1) if parts else None
        return _Decoded(joined, time.perf_counter() - t0, stop)

    def check(self, where: str) -> None:
        """Raise what went wrong, as the FFmpeg path words it."""
        if self.demux_error is None and self.first_error is None:
            return
        raise decode_failure(
            self.demuxer.container,
            "opus",
            where,
            damage=None if self.demux_error is None else str(self.demux_error),
            errors=self.errors,
            reason=str(self.first_error),
            stopped=self.consecutive >= MAX_CONSECUTIVE_ERRORS,
        )


async def open_demuxer(
    src: ByteSource, head: bytes, demuxer_name: str
) -> tuple[Demuxer | None, list[Packet], bytes]:
    """Read the container's headers with our own demuxer, on the event loop (they are a few
    hundred bytes). Returns the demuxer if the first audio track is Opus we decode (else None:
    FFmpeg's turn), the packets already found, and every byte read so far, ``head`` first."""
    demuxer: Demuxer = WebmDemuxer() if demuxer_name == "matroska" else OggDemuxer()
    seen = [head]
    packets: list[Packet] = []
    try:
        packets += demuxer.feed(head)
        while not demuxer.decided:
            data = await src.pull()
            if data is None:
                break
            seen.append(data)
            packets += demuxer.feed(data)
    except DemuxError:
        return None, [], b"".join(seen)  # FFmpeg reads it from the start and says what is wrong
    return (demuxer if demuxer.head is not None else None), packets, b"".join(seen)


async def decode_opus(
    src: ByteSource,
    demuxer: Demuxer,
    packets: list[Packet],
    pool: DecodePool,
    writer: ChunkWriter,
) -> StreamInfo:
    """Decode the rest of the upload through ``pool``; ``packets`` are those found while
    :func:`open_demuxer` read the headers. Audio decoded before an error is sent first."""
    stream = _OpusStream(demuxer)
    final = False
    while not final:
        data = await src.pull()
        final = data is None
        parts = [] if data is None else [data]
        size = len(data or b"")
        while not final and size < MAX_JOB_BYTES:
            more = src.pull_ready()
            if more is None:
                final = src.exhausted
                break
            parts.append(more)
            size += len(more)
        decoded = await pool.decode(functools.partial(stream.step, b"".join(parts), packets, final))
        packets = []
        writer.add_busy(decoded.busy_s)
        if decoded.samples is not None:
            await writer.write(decoded.samples, src.received_at)
        if decoded.stop:
            break
    stream.check(f"after {src.bytes_in} bytes")
    await src.drain()
    return StreamInfo(demuxer.container, "opus", stream.decoder.channels)
