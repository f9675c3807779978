"""``--resume``: an upload cut by the network continues where the server's bytes end.

The session is created resumable; when the upload's connection fails, the client asks the
server how much arrived (``HEAD .../audio``: ``Upload-Offset``) and uploads again from that byte
with ``Upload-Offset``. What the client sent but the server never read (socket buffers, bytes in
flight) is sent again from :class:`ReplayBuffer`, which keeps the most recent bytes read from
the input; a live input (a recorder on stdin) is not stopped meanwhile, so the audio recorded
during the outage goes out at once on the new connection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

import anyio
import httpx

from service.client.options import ClientFailure

# How far behind the bytes sent the server's offset can be: socket buffers on both sides, and
# the server's few chunks in hand-off; many MB of slack over that.
REPLAY_WINDOW_BYTES = 32 * 1024 * 1024
# How long to keep trying to reach the server after a cut: the server's grace period (60 s by
# default) is the real limit; it ends the session if nothing resumes it by then.
RESUME_PATIENCE_S = 60.0
RESUME_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)


class ReplayBuffer:
    """The input as one byte stream that can be read again from any offset within the last
    ``window`` bytes.

    :meth:`fill` reads the input in a task of its own, so a live input goes on being read while
    the connection is down (what is recorded meanwhile is kept), and a reader that is cancelled
    (a dropped connection) never cancels the input's own iterator. It keeps at most half the
    window ahead of what the current reader has taken: a file read faster than it can be sent
    waits, and an offset the server can report (at most the bytes in flight behind the reader)
    is always still at hand."""

    def __init__(self, audio: AsyncIterable[bytes], window: int = REPLAY_WINDOW_BYTES) -> None:
        self._audio = audio
        self._window = window
        self._kept = bytearray()
        self._kept_from = 0  # the offset of _kept[0]
        self.read = 0  # bytes taken from the input so far
        self.taken = 0  # bytes the current reader has taken
        self.done = False
        self._changed = anyio.Event()  # replaced after each set

    def _ring(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def fill(self) -> None:
        try:
            async for chunk in self._audio:
                self._keep(chunk)
                self._ring()
                while self.read - self.taken >= self._window // 2:
                    await self._changed.wait()
        finally:
            self.done = True
            self._ring()

    def holds(self, offset: int) -> bool:
        """Whether the stream can be read again from ``offset``."""
        return self._kept_from <= offset <= self.read

    async def from_offset(self, offset: int) -> AsyncIterator[bytes]:
        """The stream from ``offset`` to the input's end, as it is read."""
        if not self.holds(offset):
            raise ClientFailure(
                f"cannot resume at byte {offset}: only bytes {self._kept_from}-{self.read} "
                "are still at hand"
            )
        at = offset
        while True:
            if at < self.read:
                data = bytes(self._kept[at - self._kept_from :])
                at = self.read
                self.taken = at
                self._ring()
                yield data
            elif self.done:
                return
            else:
                await self._changed.wait()

    def _keep(self, chunk: bytes) -> None:
        self.read += len(chunk)
        self._kept += chunk
        extra = len(self._kept) - self._window
        if extra > 0:
            del self._kept[:extra]
            self._kept_from += extra


async def server_offset(
    client: httpx.AsyncClient, url: str, note: Callable[[str], None]
) -> tuple[int, str]:
    """``HEAD`` the audio URL until the server answers: its offset and the session's state."""
    deadline = time.monotonic() + RESUME_PATIENCE_S
    attempt = 0
    while True:
        try:
            response = await client.head(url)
        except httpx.HTTPError as exc:
            problem = str(exc) or type(exc).__name__
        else:
            if response.status_code == 200:
                state = response.headers.get("session-state", "")
                return int(response.headers.get("upload-offset", "0")), state
            if response.status_code == 404:
                raise ClientFailure("the session is gone; it cannot be resumed")
            problem = f"HTTP {response.status_code}"
        if time.monotonic() > deadline:
            raise ClientFailure(f"cannot reach the server to resume the upload: {problem}")
        delay = RESUME_BACKOFF_S[min(attempt, len(RESUME_BACKOFF_S) - 1)]
        if attempt == 0:
            note(f"asking the server where the upload stands ({problem})")
        attempt += 1
        await anyio.sleep(delay)
