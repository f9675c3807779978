"""What the command line asks for, and what came of it: the two values every transport shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Transport = Literal["http1", "http2", "ws"]

# Sizes of the pieces an upload is cut into: paced pieces are ``chunk_ms`` of audio; unpaced
# ones are as large as a socket write usefully gets.
FAST_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class RawFormat:
    """Declared raw PCM: interleaved little-endian s16le or f32le."""

    encoding: Literal["s16le", "f32le"]
    sample_rate: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return (2 if self.encoding == "s16le" else 4) * self.channels

    @property
    def bytes_per_second(self) -> int:
        return self.frame_bytes * self.sample_rate

    def to_config(self) -> dict[str, Any]:
        """The session config's ``format`` object."""
        is_float = self.encoding == "f32le"
        return {
            "channels": self.channels,
            "sample_rate": self.sample_rate,
            "bit_depth": 32 if is_float else 16,
            "is_float": is_float,
        }


@dataclass(frozen=True, slots=True)
class Options:
    input: str  # a path, or "-" for stdin
    url: str
    transport: Transport
    config: Mapping[str, Any]  # the session config sent to the server
    raw: RawFormat | None = None
    api_key: str | None = None
    real_time: bool = False
    chunk_ms: int = 100
    json_lines: bool = False
    progress: bool | None = None  # None: when stderr is a terminal and the input is long
    quiet: bool = False
    retries: int = 0  # --retry: times to ask again when turned away for now (503 / 1013)
    retry_delay_s: float | None = None  # --retry-delay: instead of the server's Retry-After
    resume: bool = False  # --resume: a cut upload continues where the server's bytes end

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class ClientFailure(Exception):
    """The client could not do its job (bad usage, no connection, a refused request): exit 2."""


@dataclass
class Outcome:
    """What the session reported, for the exit code."""

    session_id: str | None = None
    errors: list[Mapping[str, Any]] = field(default_factory=list)
    end: Mapping[str, Any] | None = None
    failure: str | None = None  # why the session's end was never seen (a transport problem)

    def observe(self, event: Mapping[str, Any]) -> bool:
        """Record one event; true when it was the session's last."""
        kind = event.get("type")
        if kind == "error":
            self.errors.append(event)
        elif kind == "end":
            self.end = event
            return True
        return False

    @property
    def exit_code(self) -> int:
        if self.end is None:
            return 2
        if self.errors or self.end.get("reason") != "completed":
            return 1
        return 0
