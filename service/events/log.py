"""Per-session event logs.

:class:`EventLog` is the interface the rest of the service uses, so a shared store (Redis
Streams) can replace the in-memory one. Readers never block writers: the pipeline appends and
moves on, each subscriber follows at its own pace from its own cursor, so a slow SSE reader can
never stall a session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio

from service.events.types import Event, LoggedEvent


class EventLog(Protocol):
    @property
    def closed(self) -> bool: ...

    @property
    def last_id(self) -> int: ...

    async def append(self, event: Event) -> LoggedEvent: ...

    async def close(self) -> None:
        """No more events; subscribers finish after reading what is there."""

    def follow(self, after: int = 0) -> AsyncIterator[LoggedEvent]:
        """Every event with id > ``after``, then the live ones, until the log is closed."""
        ...


class MemoryEventLog:
    """The embedded default: a list per session, bounded by the session's own limits
    (duration and events per second of audio), dropped by the registry after retention."""

    def __init__(self) -> None:
        self._events: list[LoggedEvent] = []
        self._closed = False
        self._changed = anyio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_id(self) -> int:
        return len(self._events)

    def snapshot(self) -> list[LoggedEvent]:
        return list(self._events)

    async def append(self, event: Event) -> LoggedEvent:
        if self._closed:
            raise RuntimeError("append to a closed event log")
        data: dict[str, Any] = event.to_dict()
        logged = LoggedEvent(id=len(self._events) + 1, type=event.type, data=data)
        self._events.append(logged)
        self._wake()
        return logged

    async def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        # One Event per generation: setting it wakes every waiting follower, then a fresh one
        # waits for the next change. No per-subscriber queues, nothing to overflow.
        self._changed.set()
        self._changed = anyio.Event()

    async def follow(self, after: int = 0) -> AsyncIterator[LoggedEvent]:
        cursor = max(0, after)
        while True:
            while cursor < len(self._events):
                yield self._events[cursor]
                cursor += 1
            if self._closed:
                return
            await self._changed.wait()
