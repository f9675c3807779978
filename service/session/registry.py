"""The one place that holds sessions. Nothing else keeps per-session state.

It owns a task group (opened in the app's lifespan) in which every session's pipeline and its
watcher run, so a session outlives the request that feeds it: a client that disconnects, a
WebSocket that closes, a DELETE from another connection all act on the same running pipeline.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import anyio
from anyio.abc import TaskGroup

from service.config import PcmFormat, SessionConfig
from service.errors import ErrorCode, StreamerError
from service.events.log import EventLog, MemoryEventLog
from service.runtime import Runtime
from service.session.session import EndReason, Session, SessionState, new_session_id

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class Registry:
    def __init__(
        self,
        runtime: Runtime,
        task_group: TaskGroup,
        log_factory: Callable[[str], EventLog] = lambda _id: MemoryEventLog(),
    ) -> None:
        self.runtime = runtime
        self._tg = task_group
        self._log_factory = log_factory
        self._sessions: dict[str, Session] = {}
        self.accepting = True

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    @property
    def live(self) -> int:
        return sum(1 for s in self._sessions.values() if s.state is not SessionState.ENDED)

    def create(self, config: SessionConfig) -> Session:
        if not self.accepting:
            raise StreamerError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        limit = self.runtime.settings.max_sessions
        if self.live >= limit:
            raise StreamerError(
                ErrorCode.TOO_MANY_SESSIONS, f"the server holds its maximum of {limit} sessions"
            )
        session_id = new_session_id()
        session = Session(session_id, config, self._log_factory(session_id), self.runtime)
        self._sessions[session_id] = session
        self.runtime.observer.session_created(session)
        self._tg.start_soon(self._watch, session)
        return session

    def get(self, session_id: str) -> Session:
        if not _ID.match(session_id):
            raise StreamerError(ErrorCode.SESSION_NOT_FOUND, "malformed session id")
        session = self._sessions.get(session_id)
        if session is None:
            raise StreamerError(
                ErrorCode.SESSION_NOT_FOUND, "no such session (unknown, or expired after retention)"
            )
        return session

    def start(self, session: Session, fmt: PcmFormat | None = None) -> Session:
        """Claim the session's input and start its pipeline; the caller then writes bytes."""
        if not self.accepting:
            raise StreamerError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        receive = session.open_input(fmt)
        self._tg.start_soon(session.run, receive, name=f"session {session.id}")
        return session

    async def _watch(self, session: Session) -> None:
        settings = self.runtime.settings
        with anyio.move_on_after(settings.unstarted_timeout_seconds):
            await session.started.wait()
        if session.state is SessionState.CREATED:
            # Never started: it timed out, or was cancelled before any audio.
            session.close_input(EndReason.UNSTARTED_TIMEOUT)
            await session.finish()
        await session.done.wait()
        await anyio.sleep(settings.retention_seconds)
        self._sessions.pop(session.id, None)

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop taking sessions, let live ones drain what they received, cancel the rest."""
        self.accepting = False
        sessions = [s for s in self._sessions.values() if s.state is not SessionState.ENDED]
        for s in sessions:
            if s.state is SessionState.CREATED:
                s.close_input(EndReason.SHUTDOWN)
                await s.finish()
            else:
                s.close_input(EndReason.SHUTDOWN)
        with anyio.move_on_after(grace_seconds):
            for s in sessions:
                await s.done.wait()
        for s in sessions:
            if not s.done.is_set():
                s.cancel(EndReason.SHUTDOWN)
        with anyio.move_on_after(2):
            for s in sessions:
                await s.done.wait()
