"""The session store: where sessions, their state and their event logs live.

The registry runs pipelines; the store keeps what other processes must see. Two
implementations:

- :class:`~service.store.memory.MemoryStore`, the embedded default: nothing leaves this process.
  The registry's own dict holds every session, and each log is a ``MemoryEventLog``.
- :class:`~service.store.redis_store.RedisStore` (``REDIS_URL``): each session's record (config,
  state, counters, owner), its event log (a Redis Stream) and its owner's lease live in Redis, so
  any worker on any host serves status, events and cancel, while exactly one worker, the one that
  received the audio, runs the pipeline.

The store speaks in session ids, JSON-able dicts and logs; it never sees a ``Session`` object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from service.config import SessionConfig
from service.events.log import EventLog


@dataclass(frozen=True, slots=True)
class Claim:
    """A session this worker now owns: its pipeline runs here."""

    config: SessionConfig
    created_at: float
    started_at: float


class SessionStore(Protocol):
    @property
    def shared(self) -> bool:
        """True when other processes see these sessions (the registry then keeps only the
        sessions whose pipeline runs here)."""
        ...

    @property
    def worker_id(self) -> str: ...

    def log(self, session_id: str) -> EventLog:
        """The log the pipeline running here appends to."""
        ...

    async def create(
        self, session_id: str, config: SessionConfig, summary: Mapping[str, Any]
    ) -> None:
        """Record a new session (state ``created``), startable until the unstarted timeout."""
        ...

    async def claim(self, session_id: str) -> Claim:
        """Atomically ``created`` -> ``running`` with this worker as owner; raises
        ``session_not_found``, ``session_busy`` or ``session_ended`` otherwise."""
        ...

    async def status(self, session_id: str) -> dict[str, Any]:
        """The status of a session running elsewhere (or nowhere), as ``Session.status()``."""
        ...

    async def cancel(self, session_id: str) -> dict[str, Any]:
        """Ask the owner to stop (or end a session nobody started); returns the status."""
        ...

    async def reader(self, session_id: str) -> EventLog:
        """A log to follow; raises ``session_not_found`` for an unknown session."""
        ...

    async def renew(
        self, session_id: str, config: Mapping[str, Any], summary: Mapping[str, Any]
    ) -> bool:
        """The owner's heartbeat: extend the lease, publish live counters. False once this
        worker no longer owns the session (another worker declared it lost)."""
        ...

    async def wait_cancel(self, session_id: str, seconds: float) -> bool:
        """Wait up to ``seconds`` for a cancel request made on another worker."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` if the store cannot serve requests now."""
        ...

    async def aclose(self) -> None: ...
