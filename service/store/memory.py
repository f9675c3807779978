"""The embedded default: one process, nothing shared.

Every session is a ``Session`` in the registry's dict with a ``MemoryEventLog``; this store only
makes those logs. Its record operations are never needed (the registry finds every session in
its own dict first), and a session the registry does not hold does not exist.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio

from service.config import SessionConfig
from service.errors import ErrorCode, StreamerError
from service.events.log import EventLog, MemoryEventLog
from service.store.base import Adoption, Claim, JournalWrite, Lease, Renewal, SessionStore

log = logging.getLogger(__name__)


def _not_found() -> NoReturn:
    raise StreamerError(
        ErrorCode.SESSION_NOT_FOUND, "no such session (unknown, or expired after retention)"
    )


class MemoryStore:
    shared = False

    def __init__(self) -> None:
        self.worker_id = f"pid-{os.getpid()}"

    def log(self, session_id: str, last_id: int = 0) -> EventLog:
        return MemoryEventLog()

    async def create(
        self, session_id: str, config: SessionConfig, summary: Mapping[str, Any]
    ) -> None:
        pass  # the registry's dict is the record

    async def claim(self, session_id: str) -> Claim:
        _not_found()

    async def status(self, session_id: str) -> dict[str, Any]:
        _not_found()

    async def cancel(self, session_id: str) -> dict[str, Any]:
        _not_found()

    async def reader(self, session_id: str) -> EventLog:
        _not_found()

    async def renew(self, sessions: Sequence[Renewal]) -> dict[str, Lease]:
        return {r.session_id: Lease.HELD for r in sessions}  # nobody else could take them

    async def wait_cancels(self, seconds: float) -> list[str]:
        await anyio.sleep(seconds)  # a cancel here is a direct call on the Session
        return []

    async def append_audio(self, writes: Sequence[JournalWrite]) -> dict[str, bool]:
        # Nothing outlives this process, so there is nobody to adopt a session from a journal.
        return {w.session_id: False for w in writes}

    async def read_audio(self, session_id: str, start: int, size: int) -> bytes:
        _not_found()

    async def orphans(self, lapsed_for: float, limit: int) -> list[str]:
        return []

    async def adopt(self, session_id: str) -> Adoption | None:
        return None

    async def release(self, session_id: str) -> None:
        pass  # never journaled here, so never handed over

    async def ping(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def warn_if_unshared_workers(store: SessionStore) -> None:
    """``hypercorn --workers N`` without Redis: each worker would see only its own sessions, so
    a request that lands on another worker gets 404. We cannot refuse (hypercorn, not us, made
    the workers), so say it loudly in every worker's log."""
    if store.shared or multiprocessing.parent_process() is None:
        return
    siblings = _sibling_workers()
    if siblings is not None and siblings <= 1:
        return  # the only worker of its server: nothing to share
    log.warning(
        "this process is one of %s workers of a multi-process server, without REDIS_URL: each "
        "worker holds only its own sessions, so requests that reach another worker fail with "
        "404. Run a single worker, or set REDIS_URL (docs/scaling.md).",
        siblings if siblings is not None else "several",
    )


def _sibling_workers() -> int | None:
    """How many multiprocessing-spawned children our parent has (Linux /proc), or None when
    this cannot be told."""
    parent = os.getppid()
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (entry / "cmdline").read_bytes():
                count += 1
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return count
