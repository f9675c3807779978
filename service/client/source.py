"""The audio to send: a file, or stdin read as it arrives (a live recorder in a pipe works)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Awaitable, Callable

import anyio

from service.client.options import ClientFailure

Reader = Callable[[int], Awaitable[bytes]]


def _pipe_reader(fd: int) -> Reader:
    """Reads a pipe, socket or terminal through the event loop: a read waiting for a recorder
    that never ends can be cancelled, where one in a worker thread would hold the exit."""

    async def read(n: int) -> bytes:
        await anyio.wait_readable(fd)
        return os.read(fd, n)  # readable: returns what is there, up to n, without blocking

    return read


class Source:
    """Bytes from a file or stdin, with a look-ahead buffer so the pacing can read headers."""

    def __init__(
        self,
        name: str,
        read: Reader,
        size: int | None,
        live: bool,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.size = size  # None for a pipe (until everything has been read)
        self._read = read
        self._live = live  # reads return what has arrived rather than waiting for n bytes
        self._close = close
        self._pending = bytearray()
        self._eof = False

    @classmethod
    async def open(cls, path: str) -> Source:
        if path == "-":
            fd = sys.stdin.fileno()
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return cls("stdin", _pipe_reader(fd), None, live=True)
            stdin = anyio.wrap_file(os.fdopen(os.dup(fd), "rb"))
            return cls("stdin", stdin.read, info.st_size, live=False, close=stdin.aclose)
        try:
            stream = await anyio.open_file(path, "rb")
            size = os.fstat(stream.wrapped.fileno()).st_size
        except OSError as exc:
            raise ClientFailure(f"cannot read {path}: {exc.strerror or exc}") from None
        return cls(path, stream.read, size, live=False, close=stream.aclose)

    async def _fill(self, n: int) -> bytes:
        data = await self._read(n)
        if not data:
            self._eof = True
        return data

    async def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes from the start of what is still unread (fewer only at the end)."""
        while len(self._pending) < n and not self._eof:
            self._pending += await self._fill(n - len(self._pending))
        return bytes(self._pending[:n])

    async def read_all(self) -> bytes:
        """Buffer the rest of the input (stdin in a container whose duration pacing needs)."""
        while not self._eof:
            self._pending += await self._fill(1 << 20)
        if self.size is None:
            self.size = len(self._pending)
        return bytes(self._pending)

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end."""
        if self._pending:
            data = bytes(self._pending[:n])
            del self._pending[:n]
            if len(data) < n and not self._live and not self._eof:
                data += await self._fill(n - len(data))  # after a peek, still full pieces
            return data
        if self._eof:
            return b""
        return await self._fill(n)

    async def aclose(self) -> None:
        if self._close is not None:
            await self._close()
