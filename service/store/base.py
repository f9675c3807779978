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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from service.config import SessionConfig
from service.events.log import EventLog
from service.events.progress import LoggedProgress

# How long after a resumable session's lease lapsed the workers' sweeps adopt it (until then,
# an upload resuming it adopts it where it lands, so the client need not find the adopter).
ADOPT_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class Claim:
    """A session this worker now owns: its pipeline runs here."""

    config: SessionConfig
    created_at: float
    started_at: float


@dataclass(frozen=True, slots=True)
class Adoption:
    """A resumable session this worker took over from an owner that died: its pipeline runs
    here again, over the audio received so far (the journal), and goes on from there."""

    config: SessionConfig
    created_at: float
    started_at: float
    received: int  # bytes in the journal: where the input continues
    input_end: str | None  # why the input had ended (its reason), or None: it goes on
    logged: LoggedProgress  # what the event log holds already
    last_id: int


@dataclass(frozen=True, slots=True)
class Renewal:
    """One session in the owner's periodic renewal of all its leases."""

    session_id: str
    summary: Mapping[str, Any]  # live counters, for status on other workers
    config: Mapping[str, Any] | None = None  # None: unchanged since its last renewal
    # A resumable session: adoptable by another worker once this lease lapses.
    journaled: bool = False


@dataclass(frozen=True, slots=True)
class JournalWrite:
    """Received bytes of a resumable session, to keep: ``data`` starts at byte ``offset`` of
    its input; ``input_end``: the input ended after them (its reason), or None."""

    session_id: str
    offset: int
    data: bytes
    input_end: str | None = None


class Lease(StrEnum):
    """What a renewal found for one session."""

    HELD = "held"  # renewed: this worker still owns it
    CANCEL = "cancel"  # renewed, and a cancel was requested on another worker
    LOST = "lost"  # no longer this worker's (another worker declared it lost), or ended


class SessionStore(Protocol):
    @property
    def shared(self) -> bool:
        """True when other processes see these sessions (the registry then keeps only the
        sessions whose pipeline runs here)."""
        ...

    @property
    def worker_id(self) -> str: ...

    def log(self, session_id: str, last_id: int = 0) -> EventLog:
        """The log the pipeline running here appends to (holding ``last_id`` events already:
        an adopted session's)."""
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

    async def renew(self, sessions: Sequence[Renewal]) -> dict[str, Lease]:
        """The owner's heartbeat for all of its sessions at once: extend their leases and
        publish their live counters, in as few round trips as the store can (one per several
        hundred sessions for Redis). A session missing from the answer was not renewed this
        time (its own command failed); raises ``StoreUnavailable`` if none could be."""
        ...

    async def wait_cancels(self, seconds: float) -> list[str]:
        """Wait up to ``seconds`` for cancel requests, made on other workers, for sessions this
        worker owns; returns their ids (empty when none came). One waiter per worker."""
        ...

    async def append_audio(self, writes: Sequence[JournalWrite]) -> dict[str, bool]:
        """Keep received bytes of resumable sessions this worker runs (one round trip for
        all); returns, per session, whether its journal still holds every byte (False: not
        kept, the session can no longer be adopted). Raises ``StoreUnavailable`` if none
        could be written."""
        ...

    async def read_audio(self, session_id: str, start: int, size: int) -> bytes:
        """Up to ``size`` bytes of a session's journal from byte ``start``."""
        ...

    async def orphans(self, lapsed_for: float, limit: int) -> list[str]:
        """Resumable sessions whose owner's lease lapsed at least ``lapsed_for`` seconds ago
        (candidates: :meth:`adopt` decides)."""
        ...

    async def adopt(self, session_id: str) -> Adoption | None:
        """Take over a resumable session whose owner died (its lease lapsed): this worker is
        its owner from now on. None if it is not to be adopted (ended, its owner alive, or
        unknown); a session that cannot be (no journal) is ended ``worker_lost`` here."""
        ...

    async def release(self, session_id: str) -> None:
        """Give up a resumable session this worker runs, without ending it (this worker shuts
        down): another worker adopts it at once, from its journal."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` if the store cannot serve requests now."""
        ...

    async def aclose(self) -> None: ...
