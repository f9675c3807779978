"""Session stores: in memory (the default), or Redis when ``REDIS_URL`` is set."""

from __future__ import annotations

from service.settings import Settings
from service.store.base import Adoption, Claim, JournalWrite, Lease, Renewal, SessionStore
from service.store.memory import MemoryStore


def open_store(settings: Settings) -> SessionStore:
    if not settings.redis_url:
        return MemoryStore()
    # Imported here: the in-memory default never loads the Redis client.
    from service.store.redis_store import RedisStore

    return RedisStore(settings)


__all__ = [
    "Adoption",
    "Claim",
    "JournalWrite",
    "Lease",
    "MemoryStore",
    "Renewal",
    "SessionStore",
    "open_store",
]
