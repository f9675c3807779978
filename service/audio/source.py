"""The upload's bytes as the decoder consumes them: arrival times, a byte count, and a look-ahead.

Sniffing a format means reading ahead and then handing everything read so far to whichever
decoder the bytes call for; :class:`ByteSource` allows that with ``push_back`` and :class:`Head`
keeps the look-ahead bytes so they can be parsed in place or replayed to FFmpeg.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator

import anyio
from anyio import EndOfStream, WouldBlock
from anyio.streams.memory import MemoryObjectReceiveStream

from service.errors import ErrorCode, StreamerError

# Upper bound on look-ahead kept for sniffing and header parsing: headers are small, and a
# pathological one (a huge chunk ahead of the audio) must not buffer the upload in memory.
MAX_HEAD_BYTES = 1 << 20


class Doorbell:
    """Wakes the one task waiting for a memory object stream (the decoder) when its sender has
    queued a chunk or closed; the sender rings after each.

    Waiting on the stream itself (``receive``) first yields to the loop, then builds an event,
    a receiver record with the task's info, and an exception; woken, the sender checks the
    receiver for cancellation. That hand-off measured 16 us per chunk against 3 us for this
    bell plus ``receive_nowait`` (300 streams, one chunk each per round): at hundreds of live
    streams x 10 chunks a second it was the largest single cost of the decoder's task.
    """

    __slots__ = ("_event", "_event_class")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        # The running backend's Event class, found with the first wait: ``anyio.Event()`` looks
        # the backend up on every call (1.5 us of its 2.3 us), and this is one event per chunk.
        self._event_class: type[anyio.Event] | None = None

    def ring(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        """Until the next :meth:`ring`. The caller checks the stream first, with no await in
        between, so a ring cannot fall between the check and this wait."""
        if self._event_class is None:
            event = anyio.Event()
            self._event_class = type(event)
        else:
            event = self._event_class()
        self._event = event
        await event.wait()


class ByteSource:
    """Pulls non-empty byte chunks from an async iterable, one task at a time.

    ``received_at`` is the ``time.monotonic()`` at which the most recent chunk arrived: the bytes
    that complete any audio decoded so far arrived no later than that.

    With a memory object stream and the :class:`Doorbell` its sender rings, a wait for the next
    chunk is the bell's, not the stream's ``receive``.
    """

    def __init__(self, source: AsyncIterable[bytes], bell: Doorbell | None = None) -> None:
        self._it: AsyncIterator[bytes] = aiter(source)
        # A memory object stream is read without a wait when it has a chunk ready (the usual
        # case for a fast upload): ``receive`` always yields to the loop first.
        self._stream: MemoryObjectReceiveStream[bytes] | None = (
            source if isinstance(source, MemoryObjectReceiveStream) else None
        )
        self._bell = bell if self._stream is not None else None
        self._pushed: list[bytes] = []
        self._exhausted = False
        self.bytes_in = 0
        self.received_at = time.monotonic()

    async def pull(self) -> bytes | None:
        """The next non-empty chunk (pushed-back bytes first), or ``None`` at the end."""
        data = self.pull_ready()
        while data is None and not self._exhausted and self._bell is not None:
            await self._bell.wait()
            data = self.pull_ready()
        if data is not None or self._exhausted:
            return data
        while True:
            try:
                data = await self._next()
            except (StopAsyncIteration, EndOfStream):
                self._exhausted = True
                return None
            if data:
                return self._arrived(data)

    def pull_ready(self) -> bytes | None:
        """The next non-empty chunk if one is here without waiting (pushed back, or queued in
        a memory object stream), else ``None``; :attr:`exhausted` tells the end apart."""
        if self._pushed:
            return self._pushed.pop()
        if self._exhausted or self._stream is None:
            return None
        while True:
            try:
                data = self._stream.receive_nowait()
            except WouldBlock:
                return None
            except EndOfStream:
                self._exhausted = True
                return None
            if data:
                return self._arrived(data)

    @property
    def exhausted(self) -> bool:
        """The upload has ended and every chunk of it was pulled."""
        return self._exhausted and not self._pushed

    def _arrived(self, data: bytes) -> bytes:
        self.received_at = time.monotonic()
        self.bytes_in += len(data)
        return bytes(data)

    async def _next(self) -> bytes:
        # A memory object stream was already tried without a wait (pull_ready): anyio's
        # ``receive`` always yields to the loop first, so a ready chunk is taken without it.
        if self._stream is not None:
            return await self._stream.receive()
        return await anext(self._it)

    def push_back(self, data: bytes) -> None:
        """Make ``data`` the next chunk :meth:`pull` returns (bytes already counted)."""
        if data:
            self._pushed.append(data)

    async def drain(self) -> None:
        """Consume the rest of the upload, so a sender is never left blocked on us."""
        while await self.pull() is not None:
            pass


class Head:
    """A growing look-ahead buffer over a :class:`ByteSource`, read with a cursor.

    Everything pulled stays in ``buffer`` (up to ``MAX_HEAD_BYTES``) so it can be replayed to
    FFmpeg if the format turns out to be one we do not parse ourselves.
    """

    def __init__(self, src: ByteSource) -> None:
        self.src = src
        self.buffer = bytearray()
        self.pos = 0
        # False once skipped bytes had to be dropped: the head can then no longer be replayed.
        self.replayable = True

    @property
    def available(self) -> int:
        return len(self.buffer) - self.pos

    async def fill(self, n: int) -> bool:
        """Make ``n`` bytes available after the cursor; False if the upload ends first."""
        while self.available < n:
            data = await self.src.pull()
            if data is None:
                return False
            self.buffer += data
            if len(self.buffer) > MAX_HEAD_BYTES and self.pos > 0:
                self._drop_consumed()
        return True

    def peek(self, n: int) -> bytes:
        return bytes(self.buffer[self.pos : self.pos + n])

    async def read(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, or ``None`` if the upload ends first."""
        if not await self.fill(n):
            return None
        data = bytes(self.buffer[self.pos : self.pos + n])
        self.pos += n
        return data

    async def skip(self, n: int) -> bool:
        """Move the cursor ``n`` bytes on without keeping them all; False at the end."""
        while n > 0:
            if self.available == 0 and not await self.fill(1):
                return False
            step = min(n, self.available)
            self.pos += step
            n -= step
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._drop_consumed()
        return True

    def rest(self) -> bytes:
        """The bytes pulled but not yet consumed by the cursor."""
        return bytes(self.buffer[self.pos :])

    def replay(self) -> bytes:
        """Everything pulled so far, from the first byte of the upload."""
        if not self.replayable:
            raise StreamerError(
                ErrorCode.UNSUPPORTED_FORMAT,
                f"the header is larger than {MAX_HEAD_BYTES} bytes and cannot be handed to "
                "FFmpeg after parsing it",
            )
        return bytes(self.buffer)

    def _drop_consumed(self) -> None:
        del self.buffer[: self.pos]
        self.pos = 0
        self.replayable = False
