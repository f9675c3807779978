"""A worker's journal of received audio (``REDIS_URL``, resumable sessions only).

A resumable session's decoder state lives in the worker that runs it; should that worker die,
another one adopts the session and runs its pipeline again over the audio received so far
(docs/resume.md). That audio is kept in the store as it arrives: one writer per worker sends
every session's new bytes together, one pipelined round trip per interval, not a round trip per
chunk (hundreds of live streams send tens of chunks a second each).

What the store holds trails what was received by up to an interval; the offset a client
resumes at after its worker died is the store's, so it sends those bytes again (clients keep
a window of what they sent: ``service/client/resume.py``). An upload whose session has more
than ``MAX_PENDING_BYTES`` not yet kept waits for the store: received audio is never dropped
from the journal to keep up, since a gap would make the session impossible to adopt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from service.errors import StoreUnavailable
from service.store import JournalWrite, SessionStore

log = logging.getLogger(__name__)

# Not yet kept, per session, before its upload waits for the store: seconds of any live
# stream, and what a fast upload sends in a few ms.
MAX_PENDING_BYTES = 1024 * 1024


@dataclass(eq=False, slots=True)
class _Pending:
    offset: int  # of data[0] in the session's input
    data: bytearray = field(default_factory=bytearray)
    input_end: str | None = None
    kept: anyio.Event = field(default_factory=anyio.Event)  # set when written (or given up)


class AudioJournal:
    """Keeps the received bytes of the resumable sessions this worker runs in the store."""

    def __init__(self, store: SessionStore, task_group: TaskGroup, interval_s: float) -> None:
        self.store = store
        self._tg = task_group
        self._interval_s = interval_s
        self._pending: dict[str, _Pending] = {}
        self._writing_now: dict[str, _Pending] = {}  # the batch being written
        self._sessions: set[str] = set()  # journaled here and not broken
        self._writing = False
        self._now = anyio.Event()  # set to write at once (a cut, an end)

    def open(self, session_id: str) -> None:
        """Journal this session's input from here on."""
        self._sessions.add(session_id)

    def close(self, session_id: str) -> None:
        """Stop journaling it (the session ended: its journal goes with its ``end``)."""
        self._sessions.discard(session_id)
        pending = self._pending.pop(session_id, None)
        if pending is not None:
            pending.kept.set()

    def add(self, session_id: str, offset: int, data: bytes) -> None:
        """``data``, received at byte ``offset`` of the session's input, is to be kept."""
        if session_id not in self._sessions:
            return
        pending = self._pending.get(session_id)
        if pending is None:
            pending = self._pending[session_id] = _Pending(offset)
        pending.data += data
        self._start()

    def end(self, session_id: str, received: int, reason: str) -> None:
        """The input ended (``reason``) after ``received`` bytes: an adopter then ends it the
        same way, not waiting for an upload. Written at once, with whatever is pending."""
        if session_id not in self._sessions:
            return
        pending = self._pending.get(session_id)
        if pending is None:
            pending = self._pending[session_id] = _Pending(received)
        pending.input_end = reason
        self.write_now()

    def write_now(self) -> None:
        """Write what is pending now (an upload was cut: its offset should be kept exactly)."""
        if self._pending:
            self._now.set()
            self._start()

    def keeps(self, session_id: str) -> bool:
        """Whether the session's journal holds (or will hold) every byte it received."""
        return session_id in self._sessions

    async def flush(self, session_id: str) -> bool:
        """Write the session's pending bytes now and wait until they are written; returns
        whether its journal holds every byte."""
        while (
            pending := self._pending.get(session_id) or self._writing_now.get(session_id)
        ) is not None:
            self.write_now()
            await pending.kept.wait()
        return self.keeps(session_id)

    def behind(self, session_id: str) -> bool:
        pending = self._pending.get(session_id)
        return pending is not None and len(pending.data) > MAX_PENDING_BYTES

    async def catch_up(self, session_id: str) -> None:
        """Wait until the session's pending bytes are written (or no longer will be)."""
        while (pending := self._pending.get(session_id)) is not None and self.behind(session_id):
            self._now.set()
            await pending.kept.wait()

    def _start(self) -> None:
        if not self._writing:
            self._writing = True
            self._tg.start_soon(self._write_all, name="audio journal")

    async def _write_all(self) -> None:
        """One task per worker: every interval (or at once when asked), write every session's
        pending bytes in one call. Runs while anything is pending."""
        failing = False
        batch: dict[str, _Pending] = {}
        try:
            while self._pending:
                with anyio.move_on_after(self._interval_s):
                    await self._now.wait()
                self._now = anyio.Event()
                batch, self._pending = self._pending, {}
                self._writing_now = batch
                writes = [
                    JournalWrite(sid, p.offset, bytes(p.data), p.input_end)
                    for sid, p in batch.items()
                ]
                try:
                    kept = await self.store.append_audio(writes)
                except StoreUnavailable as exc:
                    if not failing:
                        log.warning(
                            "keeping received audio failed; retrying", extra={"error": str(exc)}
                        )
                    failing = True
                    kept = {}
                    await anyio.sleep(min(self._interval_s, 0.5))
                else:
                    failing = False
                self._writing_now = {}
                for sid, pending in batch.items():
                    written = kept.get(sid)
                    if written is None and sid in self._sessions:
                        self._retry(sid, pending)  # not written: first in line next time
                        continue
                    if written is False:
                        self._sessions.discard(sid)  # broken: the session cannot be adopted
                    pending.kept.set()
        except Exception:
            log.exception("audio journal failed; sessions running here cannot be adopted")
            # The batch being written too: an upload may wait for it (catch_up).
            for pending in (*batch.values(), *self._pending.values()):
                pending.kept.set()
            self._pending.clear()
            self._sessions.clear()
        finally:
            self._writing = False
            self._writing_now = {}

    def _retry(self, session_id: str, pending: _Pending) -> None:
        newer = self._pending.get(session_id)
        if newer is not None:
            # Bytes that came meanwhile follow the ones not yet written.
            pending.data += newer.data
            pending.input_end = newer.input_end or pending.input_end
            newer.kept.set()
        self._pending[session_id] = pending
