"""``--retry N``: ask again when the server turns a new session away for now.

A server at its session limit, shedding load, shutting down or without its shared store answers
a new session with HTTP 503 and ``Retry-After``, or answers a WebSocket start with an
``error`` of the same code and closes (1013, "try again later"; 1001 when shutting down, where
another server behind the same address may take it). Nothing has been sent yet, so asking again
loses nothing; as ``curl --retry``, the client waits what the server asked (or
``--retry-delay``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio

# The service's codes for "not now" (service/errors.py: 503 over HTTP).
RETRY_LATER = frozenset(
    {"too_many_sessions", "server_overloaded", "store_unavailable", "shutting_down"}
)
# When the server names no delay (the WebSocket has no Retry-After), and the most we wait.
DEFAULT_DELAY_S = 5.0
MAX_DELAY_S = 60.0


def retry_after_seconds(value: str | None) -> float:
    """``Retry-After`` in seconds (its HTTP-date form, rare here, counts as absent)."""
    try:
        seconds = float(value) if value is not None else DEFAULT_DELAY_S
    except ValueError:
        seconds = DEFAULT_DELAY_S
    return min(max(seconds, 0.0), MAX_DELAY_S)


@dataclass
class Retry:
    """How many more times to ask; ``note`` tells the user each time."""

    retries: int
    delay_s: float | None  # --retry-delay: overrides the server's Retry-After
    note: Callable[[str], None]
    attempts: int = 0

    async def again(self, why: str, retry_after: str | None = None) -> bool:
        """After a refusal: wait and return True, or False once the retries are used up."""
        if self.attempts >= self.retries:
            return False
        self.attempts += 1
        delay = self.delay_s if self.delay_s is not None else retry_after_seconds(retry_after)
        self.note(f"{why}; trying again in {delay:g} s (retry {self.attempts} of {self.retries})")
        await anyio.sleep(delay)
        return True
