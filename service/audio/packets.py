"""WebM and Ogg Opus uploads: parsed by us, decoded with libopus for every session at once.

Each session's decoding task gathers the upload bytes that have arrived and hands them on as one
step of its stream (demux, then decode); everything pending at that moment runs as ONE batch,
session after session, so a hundred live streams cost one hand-off per batch, not a thread each
(the FFmpeg path, :mod:`service.audio.container`, blocks a thread per session in its
``read()``). Batching comes from load, not from waiting: steps that arrive while a batch runs
form the next one. Two places run the batches:

- :class:`DecodeProcess` (the default): a process of its own (:mod:`service.audio.opus_worker`)
  holds every session's demuxer and libopus state; a batch is one pipe write and one read. In
  the server's process the decoding thread and the event loop waited on each other for the GIL
  (at 300 live streams the thread spent most of its time waiting to take it back); the process
  has its own. If it dies, the sessions it held end with ``decode_failed`` and a new one starts.
- :class:`DecodePool`: one worker thread of the server (``STREAMER_OPUS_DECODER=libopus``).

Memory stays bounded: a session has one step at a time, of at most ``MAX_JOB_BYTES`` of
upload; while it waits, further upload chunks wait in the upload's bounded stream.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import pickle
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread
import numpy as np
from anyio.streams.buffered import BufferedByteReceiveStream

from service.audio.chunk import Samples
from service.audio.container import MAX_CONSECUTIVE_ERRORS, StreamInfo, decode_failure
from service.audio.demux import Demuxer, DemuxError, Packet
from service.audio.ogg import OggDemuxer
from service.audio.opus import OpusDecoder, OpusError
from service.audio.source import ByteSource
from service.audio.webm import WebmDemuxer
from service.audio.writer import ChunkWriter
from service.errors import ErrorCode, StreamerError

T = TypeVar("T")
log = logging.getLogger(__name__)

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


# How far back :class:`Turnaround` averages: as the event loop's busy ratio (observability/loop.py).
TURNAROUND_WINDOW_S = 2.0


class Turnaround:
    """How long the decoder's batches take, lately: what decoding adds to every live stream's
    lag, and the sign that it has run out of CPU. With one batch out at a time and everything
    pending in the next, a decoder is never idle under steady load, so its busy time says
    nothing; its batches grow and slow instead (BENCHMARKS.md: a mean of 2-8 ms at 300 live
    webm streams, 17-60 ms at 400 where they no longer held)."""

    def __init__(self, window_s: float = TURNAROUND_WINDOW_S) -> None:
        self.window_s = window_s
        self._done: collections.deque[tuple[float, float]] = collections.deque()  # (end, s)
        self._since: float | None = None  # the batch out now was sent then

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            now = time.perf_counter()
            self._done.append((now, now - self._since))
            self._since = None

    def seconds(self) -> float:
        """The mean time of the batches that ended in the last window, or the age of the batch
        out now if longer (a stuck decoder reads as slow, not as idle); 0 when idle."""
        now = time.perf_counter()
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()
        mean = sum(s for _, s in self._done) / len(self._done) if self._done else 0.0
        return max(mean, 0.0 if self._since is None else now - self._since)


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
        self.turnaround = Turnaround()  # a batch's time in the thread

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
                self.turnaround.start()
                try:
                    await anyio.to_thread.run_sync(_run_all, batch, limiter=self._limiter)
                finally:
                    self.turnaround.stop()
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
            while (
                j < len(packets)
                and j - i < MAX_RUN
                and packets[j].trim_end == 0
                and packets[j].damage is None
            ):
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
                if packet.damage is not None:
                    raise OpusError(packet.damage)  # lost in the container: counted alike
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

    def failure_state(self) -> _Failures:
        return _Failures(
            self.errors,
            self.consecutive,
            None if self.first_error is None else str(self.first_error),
            None if self.demux_error is None else str(self.demux_error),
        )


# A step's result as it crosses from the decoding process: plain values and the samples' bytes.
# Pickling the two dataclasses and the array cost the process 14 us and the event loop 8 us per
# live chunk (the dataclasses' pickling is Python code); these cost 4 and 2.
StepReply = tuple[bytes | None, int, float, bool, int, int, str | None, str | None]


def pack_step(decoded: _Decoded, failures: _Failures) -> StepReply:
    samples = decoded.samples
    return (
        None if samples is None else samples.tobytes(),
        0 if samples is None else len(samples),
        decoded.busy_s,
        decoded.stop,
        failures.errors,
        failures.consecutive,
        failures.first_error,
        failures.demux_error,
    )


def unpack_step(reply: StepReply) -> tuple[_Decoded, _Failures]:
    data, channels, busy_s, stop, errors, consecutive, first_error, demux_error = reply
    samples = None if data is None else np.frombuffer(data, np.float32).reshape(channels, -1)
    return _Decoded(samples, busy_s, stop), _Failures(errors, consecutive, first_error, demux_error)


@dataclass(frozen=True, slots=True)
class _Failures:
    """What went wrong in a stream so far, as plain values (they cross to the server process)."""

    errors: int
    consecutive: int
    first_error: str | None
    demux_error: str | None

    def check(self, container: str, where: str) -> None:
        """Raise what went wrong, as the FFmpeg path words it."""
        if self.demux_error is None and self.first_error is None:
            return
        raise decode_failure(
            container,
            "opus",
            where,
            damage=self.demux_error,
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
    pool: DecodePool | DecodeProcess,
    writer: ChunkWriter,
) -> StreamInfo:
    """Decode the rest of the upload through ``pool``; ``packets`` are those found while
    :func:`open_demuxer` read the headers. Audio decoded before an error is sent first."""
    step: Callable[[bytes, list[Packet], bool], Awaitable[tuple[_Decoded, _Failures]]]
    if isinstance(pool, DecodeProcess):
        process, key = pool, next(pool.keys)
        channels: int = await process.call(key, "open", demuxer)

        async def step(
            data: bytes, packets: list[Packet], final: bool
        ) -> tuple[_Decoded, _Failures]:
            return unpack_step(await process.call(key, "step", (data, packets, final)))

        def close() -> None:
            process.forget(key)
    else:
        thread, stream = pool, _OpusStream(demuxer)
        channels = stream.decoder.channels

        async def step(
            data: bytes, packets: list[Packet], final: bool
        ) -> tuple[_Decoded, _Failures]:
            decoded = await thread.decode(functools.partial(stream.step, data, packets, final))
            return decoded, stream.failure_state()

        def close() -> None:
            pass

    failures = _Failures(0, 0, None, None)
    try:
        final = False
        while not final:
            data, final = await _job_bytes(src)
            decoded, failures = await step(data or b"", packets, final)
            packets = []
            writer.add_busy(decoded.busy_s)
            if decoded.samples is not None:
                await writer.write(decoded.samples, src.received_at)
            if decoded.stop:
                break
    finally:
        close()
    failures.check(demuxer.container, f"after {src.bytes_in} bytes")
    await src.drain()
    return StreamInfo(demuxer.container, "opus", channels)


async def _job_bytes(src: ByteSource) -> tuple[bytes | None, bool]:
    """The next job's upload bytes: a chunk, waited for, and every chunk already here (up to
    MAX_JOB_BYTES); and whether the upload has ended."""
    data = await src.pull()
    if data is None:
        return None, True
    parts, size = [data], len(data)
    while size < MAX_JOB_BYTES:
        more = src.pull_ready()
        if more is None:
            return b"".join(parts), src.exhausted
        parts.append(more)
        size += len(more)
    return b"".join(parts), False


class _Call:
    __slots__ = ("args", "done", "error", "key", "op", "result")

    def __init__(self, key: int, op: str, args: object) -> None:
        self.key, self.op, self.args = key, op, args
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _lost() -> StreamerError:
    return StreamerError(
        ErrorCode.DECODE_FAILED, "the Opus decoding process restarted: this stream's state was lost"
    )


class DecodeProcess:
    """Every session's Opus decoding in a process of its own (:mod:`service.audio.opus_worker`);
    :meth:`run` is started once in the app's lifespan and restarts the process if it dies (the
    sessions it held fail with ``decode_failed``; new ones go to the new process).

    As with :class:`DecodePool`, everything pending when the process is free goes in one batch:
    one pipe write and one read per batch, no thread. The process has its own GIL, so neither
    libopus nor the demuxing competes with the event loop for it."""

    def __init__(self, *, reply_timeout_s: float = 30.0) -> None:
        # A batch's reply not back within this is a hung process: it is killed and replaced.
        # A batch is at most MAX_JOB_BYTES per session (~10 ms of decoding each), so even
        # a thousand fast uploads at once are well within it.
        self.reply_timeout_s = reply_timeout_s
        self.keys = itertools.count()
        self._pending: list[_Call] = []
        self._changed = anyio.Event()
        self._running = False
        self._live: set[int] = set()  # keys opened in the current process
        self._sent: list[_Call] = []  # the batch the process is working on
        self.batches = 0
        self.jobs = 0
        self.restarts = 0
        # A batch's time from its write to its reply (the pipe both ways and the process's
        # work; the loop's delay in reading the reply too, which only matters when it is busy).
        self.turnaround = Turnaround()

    async def call(self, key: int, op: str, args: object) -> Any:
        if not self._running:
            raise RuntimeError("the Opus decoding process is not running")
        if op != "open" and key not in self._live:
            raise _lost()
        call = _Call(key, op, args)
        self._pending.append(call)
        self._changed.set()
        # If the caller is cancelled meanwhile, the call still runs and its reply is dropped;
        # the session is being torn down then, and forget() follows.
        await call.done.wait()
        if call.error is not None:
            raise call.error
        if op == "open":
            self._live.add(key)
        return call.result

    def forget(self, key: int) -> None:
        """Drop a stream's state in the process (no reply awaited)."""
        if key in self._live:
            self._live.discard(key)
            self._pending.append(_Call(key, "close", None))
            self._changed.set()

    async def run(self) -> None:
        if self._running:
            raise RuntimeError("DecodeProcess.run is already running")
        self._running = True
        try:
            while True:
                await self._serve()
                self.restarts += 1
                self._live.clear()
        finally:
            # Shutdown: nobody may be left waiting for a reply that will not come.
            self._running = False
            stopped = RuntimeError("the Opus decoding process stopped")
            self._fail(self._sent + self._pending, stopped)
            self._sent, self._pending = [], []

    async def _serve(self) -> None:
        command = [sys.executable, "-m", "service.audio.opus_worker"]
        async with await anyio.open_process(command, stderr=None) as process:
            assert process.stdin is not None and process.stdout is not None
            replies = BufferedByteReceiveStream(process.stdout)
            while True:
                while not self._pending:
                    self._changed = anyio.Event()
                    await self._changed.wait()
                batch, self._pending = self._pending, []
                # Steps queued for a process that has since died: their state is gone.
                lost = [c for c in batch if c.op == "step" and c.key not in self._live]
                if lost:
                    self._fail(lost, _lost())
                    batch = [c for c in batch if c not in lost]
                    if not batch:
                        continue
                self._sent = batch
                failure: str | None = None
                self.turnaround.start()
                try:
                    frame = pickle.dumps(
                        [(c.key, c.op, c.args) for c in batch], protocol=pickle.HIGHEST_PROTOCOL
                    )
                    with anyio.fail_after(self.reply_timeout_s):
                        await process.stdin.send(len(frame).to_bytes(4, "little") + frame)
                        size = int.from_bytes(await replies.receive_exactly(4), "little")
                        results = pickle.loads(await replies.receive_exactly(size))
                except TimeoutError:
                    failure = f"no reply in {self.reply_timeout_s:g} s"
                    process.kill()
                except (
                    anyio.EndOfStream,
                    anyio.IncompleteRead,
                    anyio.BrokenResourceError,
                    OSError,
                ) as exc:
                    failure = repr(exc)
                self.turnaround.stop()
                if failure is not None:
                    log.error("the Opus decoding process failed (%s); restarting it", failure)
                    self._fail(
                        batch,
                        StreamerError(ErrorCode.DECODE_FAILED, "the Opus decoding process died"),
                    )
                    self._sent = []
                    return
                self._sent = []
                self.batches += 1
                self.jobs += len(batch)
                for call, (result, error) in zip(batch, results, strict=True):
                    call.result = result
                    if error is not None:
                        call.error = StreamerError(
                            ErrorCode.DECODE_FAILED, f"decoding failed: {error}"
                        )
                    call.done.set()

    @staticmethod
    def _fail(calls: list[_Call], error: BaseException) -> None:
        for call in calls:
            call.error = error
            call.done.set()
